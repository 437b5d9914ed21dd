"""Task files on a real filesystem: private modes, atomic rewrites, symlink refusal, lookup."""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from exceptions import TaskFileError, TaskNotFoundError, UnsafeTaskPathError
from standins.agents import load_yaml
from taskfiles.documents import MAX_TASK_FILE_BYTES, add_history, new_task, read_task, task_filename
from taskfiles.lookup import find_task, task_file_path, update_task, write_task
from taskfiles.safe_io import write_private_atomic
from tests.agents import SCHEMA_PATH, assert_valid_task_file
from vocabulary import (
    ARCHIVE_DIR,
    BUILD_PHASE,
    DEAD_LETTERS_DIR,
    IN_PROGRESS,
    SUBMITTED,
    TASK_BUILD_PHASE,
)

CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def a_task(task_id: str | None = None) -> dict:
    task_id = task_id or str(uuid.uuid4())
    path = f"/q/{task_filename(task_id, CREATED)}"
    return new_task(task_id=task_id, target_agent="builder", task_type=TASK_BUILD_PHASE,
                    summary="a phase",
                    payload={"build_name": "b", "plan_name": "b", "phase": 1, "phase_number": 1,
                             "description": "a phase", "context_refs": [],
                             "instruction": "line one\nline two",
                             "complete_command": ["/venv/bin/python", "/w/complete_activity.py",
                                                  "--task-file", path],
                             "temporal": {"address": "localhost:7233", "namespace": "default",
                                          "task_queue": "q", "require_tls": False,
                                          "tls": False},
                             "task_token": "dG9rZW4=", "workflow_id": "wf", "run_id": "r",
                             "activity_id": "1", "activity_type": BUILD_PHASE, "attempt": 1},
                    created=CREATED)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 000: anything not explicitly private would come out world-writable."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("open_umask")
def test_private_modes_under_open_umask(tmp_path: Path) -> None:
    queue = tmp_path / "home" / ".claude" / "task-queue"
    task = a_task()

    path = write_task(queue, task)

    assert path == queue / task_filename(task["id"], CREATED)
    assert path.name == f"20260102-030405-{task['id'][:8]}.yml"
    assert mode(path) == 0o600
    assert mode(queue) == 0o700
    # Folders created on the way are private too, not 0777 from the open umask.
    assert mode(tmp_path / "home" / ".claude") == 0o700
    assert mode(tmp_path / "home") == 0o700
    assert load_yaml(path) == task
    assert_valid_task_file(path)


@pytest.mark.usefixtures("open_umask")
def test_existing_loose_queue_dir_is_tightened(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.mkdir(mode=0o777)
    assert mode(queue) == 0o777
    write_task(queue, a_task())
    assert mode(queue) == 0o700


def test_symlink_at_task_path_is_refused(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    task = a_task()
    link = queue / task_filename(task["id"], CREATED)
    link.symlink_to(victim)

    with pytest.raises(UnsafeTaskPathError) as caught:
        write_task(queue, task)

    assert str(link) in str(caught.value)
    assert victim.read_text() == "precious\n"
    assert mode(victim) == 0o644
    assert link.is_symlink()
    assert [p.name for p in queue.iterdir()] == [link.name]  # no temp file left behind
    with pytest.raises(UnsafeTaskPathError):
        read_task(link)
    with pytest.raises(UnsafeTaskPathError):
        update_task(link, lambda t: add_history(t, status="approved", actor="x", note="y"))
    assert victim.read_text() == "precious\n"


def test_symlinked_directory_entry_is_refused(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.mkdir(mode=0o700)
    (queue / "odd.yml").mkdir()
    with pytest.raises(UnsafeTaskPathError):
        write_private_atomic(queue / "odd.yml", b"x: 1\n")


@pytest.mark.parametrize(("fault", "message"), [
    (FileNotFoundError(2, "No such file or directory"), "vanished while being created"),
    (PermissionError(13, "Permission denied"), "cannot open: Permission denied"),
])
def test_folder_that_cannot_be_made_is_a_task_file_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: OSError, message: str) -> None:
    """A fake mkdir: as root, a folder is always writable, and the one above vanishing
    between two calls cannot be timed. Either way the caller gets a TaskFileError."""

    def failing_mkdir(*_args: object, **_kwargs: object) -> None:
        raise fault

    monkeypatch.setattr(os, "mkdir", failing_mkdir)
    with pytest.raises(TaskFileError, match=message) as caught:
        write_private_atomic(tmp_path / "audit" / "build" / "request.md", b"x", base=tmp_path)
    assert "audit" in str(caught.value)
    assert not (tmp_path / "audit").exists()


@pytest.mark.usefixtures("open_umask")
def test_update_is_atomic_and_keeps_0600(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    path = write_task(queue, a_task())
    inode_before = path.stat().st_ino

    updated = update_task(path, lambda t: add_history(t, status=IN_PROGRESS, actor="ted",
                                                      note="working on it"))

    assert mode(path) == 0o600
    # Replaced by rename (new inode), never rewritten in place where a reader could
    # see half a file.
    assert path.stat().st_ino != inode_before
    assert sorted(p.name for p in queue.iterdir()) == [path.name]  # no leftover .tmp
    on_disk = load_yaml(path)
    assert on_disk == updated
    assert on_disk["status"] == IN_PROGRESS
    assert [h["status"] for h in on_disk["history"]] == [SUBMITTED, IN_PROGRESS]
    assert on_disk["history"][-1]["actor"] == "ted"
    assert_valid_task_file(path)


def test_failed_mutation_leaves_file_untouched(tmp_path: Path) -> None:
    path = write_task(tmp_path / "queue", a_task())
    before = path.read_bytes()

    def explode(task: dict) -> None:
        task["status"] = "half-done"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        update_task(path, explode)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_rewrite_by_id_keeps_the_same_file(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    task = a_task()
    first = write_task(queue, task)
    task["summary"] = "changed"
    second = write_task(queue, task, created=datetime(2027, 1, 1, tzinfo=UTC))
    assert second == first
    assert load_yaml(first)["summary"] == "changed"
    assert len(list(queue.glob("*.yml"))) == 1


@pytest.mark.parametrize("odd", ["\x85", "\u2028", "\u2029", "\r", "\r\n", "\t", "\ufeff"])
def test_every_string_reads_back_as_written(tmp_path: Path, odd: str) -> None:
    """A note an agent or operator wrote (copied back into the task by the worker) comes
    back unchanged, whatever line breaks it holds, in one line or in a literal block."""
    task = a_task()
    notes = [odd, f"a{odd}b", f"  lead {odd} middle{odd}  "]
    for note in notes:
        add_history(task, status="input-required", actor="agent", note=note)
    task["payload"]["instruction"] = f"first line\n{odd}\nlast{odd}"
    path = write_task(tmp_path / "queue", task)
    again = read_task(path)
    assert [entry["note"] for entry in again["history"][-3:]] == notes
    assert again["payload"]["instruction"] == task["payload"]["instruction"]


def test_find_task_by_prefix_name(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    task = a_task()
    other = a_task()
    path = write_task(queue, task)
    write_task(queue, other)
    # The prefix-named file alone decides: no scan needed.
    assert find_task(queue, task["id"], full_scan=False, search_archives=False) == path
    assert find_task(queue, other["id"]) != path


def test_find_task_prefix_collision(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    first = a_task("abcdef12-0000-4000-8000-000000000001")
    second = a_task("abcdef12-0000-4000-8000-000000000002")
    path_one = write_task(queue, first)
    path_two = write_task(queue, second, created=datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC))
    assert path_one != path_two
    assert find_task(queue, second["id"], full_scan=False) == path_two
    assert find_task(queue, first["id"], full_scan=False) == path_one


def test_find_task_by_fallback_scan(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    task = a_task()
    renamed = queue / "renamed-by-a-human.yml"
    shutil.move(write_task(queue, task), renamed)

    with pytest.raises(TaskNotFoundError):
        find_task(queue, task["id"], full_scan=False)
    assert find_task(queue, task["id"]) == renamed


@pytest.mark.parametrize("subdir", [ARCHIVE_DIR, DEAD_LETTERS_DIR])
@pytest.mark.parametrize("rename", [False, True])
def test_find_task_in_archive_folders(tmp_path: Path, subdir: str, rename: bool) -> None:
    queue = tmp_path / "queue"
    task = a_task()
    written = write_task(queue, task)
    (queue / subdir).mkdir()
    moved = queue / subdir / ("other-name.yml" if rename else written.name)
    shutil.move(written, moved)

    assert find_task(queue, task["id"]) == moved
    with pytest.raises(TaskNotFoundError):
        find_task(queue, task["id"], search_archives=False)


def test_find_task_hint_wins(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    task = a_task()
    elsewhere = write_task(tmp_path / "elsewhere", task)
    assert find_task(queue, task["id"], hint=elsewhere) == elsewhere


def test_find_task_missing(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    write_task(queue, a_task())
    (queue / ARCHIVE_DIR).mkdir()
    (queue / "broken.yml").write_text("- not\n- a mapping\n")
    missing = str(uuid.uuid4())
    with pytest.raises(TaskNotFoundError) as caught:
        find_task(queue, missing)
    assert missing in str(caught.value)
    with pytest.raises(TaskNotFoundError):
        find_task(tmp_path / "no-such-queue", missing)


@pytest.mark.parametrize(("content", "problem"), [
    (b"- a\n- list\n", "top level must be a mapping, got list"),
    (b"just a string\n", "top level must be a mapping, got str"),
    (b"", "top level must be a mapping, got NoneType"),
    (b"id: [unclosed\n", "not valid YAML"),
    (b"id: caf\xe9\n", "not valid YAML"),
    (b"id: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    (b"x: '" + b"a" * MAX_TASK_FILE_BYTES + b"'\n", "larger than"),
])
def test_read_task_refuses_bad_files(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.yml"
    path.write_bytes(content)
    with pytest.raises(TaskFileError) as caught:
        read_task(path)
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)


def test_read_task_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.yml"
    with pytest.raises(TaskNotFoundError) as caught:
        read_task(path)
    assert str(path) in str(caught.value)


def test_task_file_path_is_where_write_task_writes(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    task = a_task()
    expected = task_file_path(queue, task)
    assert expected == queue / task_filename(task["id"], CREATED)
    assert write_task(queue, task, path=expected) == expected
    # A re-dispatch (same id, later `created`) names the file already there.
    again = {**task, "created": "2027-01-01T00:00:00Z"}
    assert task_file_path(queue, again) == expected
    assert task_file_path(queue, again, may_exist=False) != expected
    assert write_task(queue, again) == expected
    assert load_yaml(expected) == again


def schema_for(definition: str) -> dict:
    schema = json.loads(SCHEMA_PATH.read_text())
    schema.pop("oneOf")  # the root: either dialect's agent task
    return {**schema, "$ref": f"#/$defs/{definition}"}


@pytest.mark.parametrize(("document", "valid"), [
    ({"id": "T-123", "status": SUBMITTED}, True),
    ({"id": "T-123", "status": "approved", "history": [
        {"timestamp": "2026-01-02T03:04:05Z", "status": "approved", "actor": "ted",
         "note": "ok"}], "anything": {"else": 1}}, True),
    ({"id": "T-123"}, False),
    ({"status": "approved"}, False),
    ({"id": "../T-123", "status": "approved"}, False),
    ({"id": "T-123", "status": "approved", "history": "not a list"}, False),
])
def test_schema_describes_the_minimal_originating_task(document: dict, valid: bool) -> None:
    validator = jsonschema.Draft202012Validator(schema_for("originatingTask"))
    assert validator.is_valid(document) == valid


def test_schema_is_exact_per_task_type() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    task = a_task()
    assert validator.is_valid(task)
    for change in ({"flags": ["x"]}, {"audit_request_path": "/a/request.md"},
                   {"complete_command": ["python", "complete_activity.py"]},
                   {"temporal": {"address": "localhost:7233"}}):
        assert not validator.is_valid({**task, "payload": {**task["payload"], **change}}), change
    without = {k: v for k, v in task["payload"].items() if k != "phase_number"}
    assert not validator.is_valid({**task, "payload": without})
