"""Task files: the YAML contract between the worker and the agents.

Every write is private and atomic: the directory is 0700, the file is created 0600
under a random temp name with O_EXCL|O_NOFOLLOW, fsynced, then renamed into place, so
no reader ever sees a partial file and a token is never group- or world-readable.
A symlink where a task file belongs is refused, never followed.
"""

from __future__ import annotations

import errno
import glob
import os
import secrets
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent

from exceptions import TaskFileError, TaskNotFoundError, UnsafeTaskPathError

SOURCE_AGENT = "temporal-worker"
TASK_TTL_DAYS = 7
MAX_TASK_FILE_BYTES = 1024 * 1024
MAX_TASK_DEPTH = 32  # the schema needs 4 levels; hand edits get plenty of room
SEARCH_SUBDIRS = ("archive", "dead-letters")
TASK_SUFFIX = ".yml"
# Statuses an operator or agent may set on the originating task.
APPROVED = "approved"
REJECTING_STATUSES = frozenset({"rejected", "cancelled", "failed"})
DECIDING_STATUSES = REJECTING_STATUSES | {APPROVED}
# Agent task statuses in which an agent may still be working on it.
OPEN_STATUSES = frozenset({"submitted", "in-progress"})
# Top-level key of an originating task while a pipeline waits on its decision:
# {workflow_id, run_id, since}, written at stage 6, removed once the decision is recorded.
AWAITING_DECISION = "awaiting_decision"
MAX_ACTOR_CHARS = 100


def utc_now() -> datetime:
    return datetime.now(UTC)


def timestamp(moment: datetime | None = None) -> str:
    return (moment or utc_now()).astimezone(UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def ensure_private_dir(directory: Path) -> Path:
    """Create `directory` and every missing parent as 0700, and make sure the leaf is 0700.

    mkdir(parents=True) would give the parents the umask's mode (0777 under umask 000);
    folders that already existed above the leaf are the operator's and left alone."""
    missing: list[Path] = []
    current = directory
    while not current.exists() and not current.is_symlink() and current != current.parent:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another writer made it meanwhile
        os.chmod(folder, 0o700)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not directory.is_dir():
        raise TaskFileError(f"{directory}: exists but is not a directory")
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode != 0o700:
        os.chmod(directory, 0o700)
    return directory


def _refuse_symlink(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeTaskPathError(f"{path}: is a symlink; refusing to follow it")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeTaskPathError(f"{path}: is not a regular file")


def write_private_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` as a 0600 file via temp file + rename; refuse symlinks."""
    ensure_private_dir(path.parent)
    _refuse_symlink(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(temp, flags, 0o600)
    except FileExistsError:
        raise UnsafeTaskPathError(f"{temp}: temp path already exists; refusing") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def task_filename(task_id: str, created: datetime) -> str:
    return f"{created.astimezone(UTC):%Y%m%d-%H%M%S}-{task_id[:8]}.yml"


def new_task(*, task_id: str, target_agent: str, task_type: str, summary: str,
             payload: dict[str, Any], created: datetime | None = None) -> dict[str, Any]:
    """A task document with every schema field, status `submitted`."""
    created_at = timestamp(created)
    return {
        "id": task_id,
        "created": created_at,
        "source_agent": SOURCE_AGENT,
        "target_agent": target_agent,
        "task_type": task_type,
        "risk_level": "low",
        "requires_approval": False,
        "status": "submitted",
        "summary": summary,
        "ttl_days": TASK_TTL_DAYS,
        "payload": payload,
        "result": {"output": None, "completed_by": None, "completed_at": None},
        "history": [{"timestamp": created_at, "status": "submitted", "actor": SOURCE_AGENT,
                     "note": "task created"}],
    }


class _TaskDumper(yaml.SafeDumper):
    """Multi-line strings (instructions) as literal blocks, readable by humans."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_TaskDumper.add_representer(str, _represent_str)


def dump_yaml(document: Any) -> bytes:
    return yaml.dump(document, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True,
                     width=2**16).encode()


def dump_task(task: dict[str, Any]) -> bytes:
    return dump_yaml(task)


def task_file_path(queue_dir: Path, task: dict[str, Any], created: datetime | None = None, *,
                   may_exist: bool = True) -> Path:
    """Where `write_task` puts `task`: the file already carrying its id, else a new name.

    Known before the write, so a task can name its own file (its completion command)."""
    if may_exist:
        try:
            return find_task(queue_dir, task["id"], search_archives=False, full_scan=False)
        except TaskNotFoundError:
            pass
    moment = created or datetime.fromisoformat(task["created"].replace("Z", "+00:00"))
    return queue_dir / task_filename(task["id"], moment)


def write_task(queue_dir: Path, task: dict[str, Any], created: datetime | None = None, *,
               may_exist: bool = True, path: Path | None = None) -> Path:
    """Write a new task file; a file already carrying this id is rewritten in place.

    `may_exist=False` skips that lookup (a directory listing) when the caller knows the id
    is new, e.g. the first attempt of a dispatch. `path` is a `task_file_path` result the
    caller already holds."""
    target = path or task_file_path(queue_dir, task, created, may_exist=may_exist)
    return write_private_atomic(target, dump_task(task))


class DepthLimitedLoader(yaml.SafeLoader):
    """SafeLoader with a nesting limit (and optionally no anchors/aliases), checked while
    composing, before any object is built. PyYAML slows down quadratically with nesting
    depth and recurses once per level, so one "[[[[…" file would otherwise cost seconds on
    every read (or end it with a RecursionError)."""

    max_depth = MAX_TASK_DEPTH
    allow_aliases = True

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if not self.allow_aliases and self.check_event(AliasEvent):
            line = self.peek_event().start_mark.line + 1
            raise yaml.YAMLError(f"anchors/aliases are not allowed (line {line})")
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                raise yaml.YAMLError(f"nesting deeper than {self.max_depth} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_agent_file(path: Path, limit: int) -> bytes:
    """The bytes of a file an agent may have written: no link followed, no blocking on a
    FIFO or device (only a regular file is read), at most `limit` bytes."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise TaskNotFoundError(f"{path}: no such file") from None
    except OSError as err:
        reason = "is a symlink" if err.errno == errno.ELOOP else err.strerror
        raise UnsafeTaskPathError(f"{path}: cannot open: {reason}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeTaskPathError(f"{path}: is not a regular file")
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise TaskFileError(f"{path}: larger than {limit} bytes")
    return raw


def read_task(path: Path) -> dict[str, Any]:
    """Parse one task file; refuse symlinks, oversized files and non-mappings."""
    _refuse_symlink(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TASK_FILE_BYTES + 1)
    except FileNotFoundError:
        raise TaskNotFoundError(f"{path}: no such task file") from None
    except OSError as err:
        raise TaskFileError(f"{path}: cannot read: {err.strerror}") from None
    if len(raw) > MAX_TASK_FILE_BYTES:
        raise TaskFileError(f"{path}: larger than {MAX_TASK_FILE_BYTES} bytes")
    try:
        document = yaml.load(raw.decode("utf-8"), Loader=DepthLimitedLoader)  # noqa: S506 - safe
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise TaskFileError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(document, dict):
        raise TaskFileError(f"{path}: top level must be a mapping, got "
                            f"{type(document).__name__}")
    return document


def _matches(path: Path, task_id: str) -> bool:
    try:
        # Most files of a full scan are other tasks: skip them without parsing YAML.
        if task_id.encode() not in read_agent_file(path, MAX_TASK_FILE_BYTES):
            return False
        return str(read_task(path).get("id")) == task_id
    except TaskFileError:
        return False


def find_task(queue_dir: Path, task_id: str, *, hint: Path | None = None,
              search_archives: bool = True, full_scan: bool = True) -> Path:
    """Locate the task file with `task_id`.

    Order: the hinted path; files named with the id's 8-char prefix (no file reads
    beyond those candidates); then a full scan of the queue, archive/ and dead-letters/.
    """
    if hint is not None and hint.exists() and _matches(hint, task_id):
        return hint
    folders = [queue_dir] + ([queue_dir / sub for sub in SEARCH_SUBDIRS]
                             if search_archives else [])
    pattern = f"*-{glob.escape(task_id[:8])}.yml"
    for folder in folders:
        for candidate in sorted(folder.glob(pattern)):
            if _matches(candidate, task_id):
                return candidate
    for folder in folders if full_scan else []:
        if not folder.is_dir():
            continue
        for candidate in sorted(folder.glob("*.yml")):
            if _matches(candidate, task_id):
                return candidate
    raise TaskNotFoundError(f"task {task_id!r} not found in {queue_dir} "
                            f"(nor in {', '.join(SEARCH_SUBDIRS)})")


def update_task(path: Path, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read, change and atomically rewrite a task file (mode stays 0600)."""
    task = read_task(path)
    mutate(task)
    write_private_atomic(path, dump_task(task))
    return task


def claimed_actor(task: dict[str, Any], status: str) -> tuple[str, str]:
    """(actor, note) of the newest history entry that set `status`, as the file claims
    them: anyone who can write the folder can write any name here, so callers show the
    actor as claimed, never as who decided. Empty when nothing usable is there."""
    history = task.get("history")
    for entry in reversed(history if isinstance(history, list) else []):
        if isinstance(entry, dict) and entry.get("status") == status:
            actor, note = entry.get("actor"), entry.get("note")
            return (" ".join(actor.split())[:MAX_ACTOR_CHARS] if isinstance(actor, str) else "",
                    " ".join(note.split())[:2000] if isinstance(note, str) else "")
    return "", ""


def add_history(task: dict[str, Any], *, status: str, actor: str, note: str) -> None:
    """Set the task's status and record who changed it and why."""
    task["status"] = status
    history = task.get("history")
    if not isinstance(history, list):
        history = []
        task["history"] = history
    history.append({"timestamp": timestamp(), "status": status, "actor": actor, "note": note})
