"""Task files: the YAML contract between the worker and the agents.

Every file here can be written by an agent, so every read and write assumes the worst
(a FIFO, a link swapped in after a check, an alias bomb, a shadow copy, a huge file):

- Reads (`read_agent_file`) open without following a link and without blocking
  (O_NOFOLLOW|O_NONBLOCK), require a regular file by fstat of the open descriptor and
  read at most the cap + 1 bytes. Task YAML is parsed with no anchors/aliases, no tags
  beyond the plain ones and bounded nesting, and the fields the worker acts on are
  type-checked.
- Writes are private and atomic: folders are 0700, the file is created 0600 under a
  random temp name with O_EXCL|O_NOFOLLOW, fsynced, then renamed into place, all through
  a descriptor of the folder. Below `base` (the configured root the caller names) every
  folder is opened with O_NOFOLLOW|O_DIRECTORY, so a link planted or swapped in after a
  check cannot redirect a write or a chmod.
- A lookup by id that finds two files carrying the id is an error naming both.
- A full or read-only folder (ENOSPC, EDQUOT, EROFS) is a DiskWriteError naming the
  folder and the errno; the temp file is removed, and the file in place (if any) is the
  old one, whole: nothing half-written is ever visible under the file's name.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from exceptions import (
    TaskFileError,
    TaskNotFoundError,
)
from taskfiles.bounded_yaml import dump_yaml, load_agent_yaml
from taskfiles.safe_io import read_agent_file, shown_path
from taskfiles.visible_text import visible_line
from vocabulary import SUBMITTED

log = logging.getLogger(__name__)

SOURCE_AGENT = "temporal-worker"
TASK_TTL_DAYS = 7
MAX_TASK_FILE_BYTES = 1024 * 1024
TASK_SUFFIX = ".yml"
# Top-level key of an originating task while a pipeline waits on its decision:
# {workflow_id, run_id, since}, written at stage 6, removed once the decision is recorded.
AWAITING_DECISION = "awaiting_decision"
# A claimed actor as shown in decisions (BlockDecision.claimed_by).
CLAIMED_ACTOR_CHARS = 100
# The fields the worker acts on must be short strings (see check_task_fields).
MAX_STATUS_CHARS = 64
MAX_ACTOR_CHARS = 200
MAX_NOTE_CHARS = 2000


def utc_now() -> datetime:
    return datetime.now(UTC)


def timestamp(moment: datetime | None = None) -> str:
    return (moment or utc_now()).astimezone(UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _short_string(value: Any, limit: int) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= limit)


def check_task_fields(shown: str, task: dict[str, Any]) -> None:
    """The fields the worker acts on: `id`, `status` and each history entry's `status`,
    `actor` and `note` are strings (or absent/null), short enough to show."""
    if "id" in task and not isinstance(task["id"], str):
        raise TaskFileError(f"{shown}: id must be a string, got {type(task['id']).__name__}")
    if not _short_string(task.get("status"), MAX_STATUS_CHARS):
        raise TaskFileError(f"{shown}: status must be a string of at most "
                            f"{MAX_STATUS_CHARS} characters")
    history = task.get("history")
    if history is None:
        return
    if not isinstance(history, list):
        raise TaskFileError(f"{shown}: history must be a list, got {type(history).__name__}")
    for index, entry in enumerate(history):
        if not isinstance(entry, dict):
            raise TaskFileError(f"{shown}: history[{index}] must be a mapping, got "
                                f"{type(entry).__name__}")
        for key, limit in (("status", MAX_STATUS_CHARS), ("actor", MAX_ACTOR_CHARS),
                           ("note", MAX_NOTE_CHARS)):
            if not _short_string(entry.get(key), limit):
                raise TaskFileError(f"{shown}: history[{index}].{key} must be a string of "
                                    f"at most {limit} characters")


def parse_task(shown: str, raw: bytes) -> dict[str, Any]:
    """Parse task YAML already read (at most the cap + 1 bytes) and check its fields.

    Anchors and aliases are accepted within the expansion budget: the platform's tools
    write them into every file they touch (PROTOCOL.md §1.3)."""
    if len(raw) > MAX_TASK_FILE_BYTES:
        raise TaskFileError(f"{shown}: larger than {MAX_TASK_FILE_BYTES} bytes")
    try:
        document = load_agent_yaml(raw.decode("utf-8"), allow_aliases=True)
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TaskFileError(f"{shown}: not valid YAML: {first}") from None
    if not isinstance(document, dict):
        raise TaskFileError(f"{shown}: top level must be a mapping, got "
                            f"{type(document).__name__}")
    check_task_fields(shown, document)
    return document


def read_task(path: Path, *, base: Path | None = None) -> dict[str, Any]:
    """Parse one task file; refuse links, non-regular and oversized files, unsafe YAML,
    non-mappings and mistyped fields (all TaskFileError naming the file). With `base`
    (the task folder it was found in), no link below `base` is followed."""
    try:
        raw = read_agent_file(path, MAX_TASK_FILE_BYTES, base=base)
    except FileNotFoundError:
        raise TaskNotFoundError(f"{shown_path(path)}: no such task file") from None
    return parse_task(shown_path(path), raw)


def task_time(task: dict[str, Any], moment: datetime | None = None) -> datetime | str:
    """A timestamp in the style of `task`: a native YAML timestamp when its `created` is
    one (the platform's tools write them so, PROTOCOL.md §1.3), else v0.5.0's string."""
    moment = (moment or utc_now()).astimezone(UTC)
    return moment if isinstance(task.get("created"), datetime) else timestamp(moment)


def created_at(task: dict[str, Any]) -> datetime:
    """The moment a task says it was created, in either form (str or native)."""
    created = task["created"]
    if isinstance(created, datetime):
        return created if created.tzinfo is not None else created.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(created).replace("Z", "+00:00"))


def task_filename(task_id: str, created: datetime) -> str:
    return f"{created.astimezone(UTC):%Y%m%d-%H%M%S}-{task_id[:8]}.yml"


def new_task(*, task_id: str, target_agent: str, task_type: str, summary: str,
             payload: dict[str, Any], created: datetime | None = None) -> dict[str, Any]:
    """A task document in v0.5.0's words with every schema field, status `submitted`."""
    created_at = timestamp(created)
    return {
        "id": task_id,
        "created": created_at,
        "source_agent": SOURCE_AGENT,
        "target_agent": target_agent,
        "task_type": task_type,
        "risk_level": "low",
        "requires_approval": False,
        "status": SUBMITTED,
        "summary": summary,
        "ttl_days": TASK_TTL_DAYS,
        "payload": payload,
        "result": {"output": None, "completed_by": None, "completed_at": None},
        "history": [{"timestamp": created_at, "status": SUBMITTED, "actor": SOURCE_AGENT,
                     "note": "task created"}],
    }


def new_platform_task(*, task_id: str, target_agent: str, task_type: str, summary: str,
                      payload: dict[str, Any], workflow_mode: str,
                      created: datetime | None = None) -> dict[str, Any]:
    """A task document as the platform's task tools write one (PROTOCOL.md §1.2, their key
    order): native timestamps with offset, every key a submitted task has, status
    `submitted` (the dispatcher's to route)."""
    moment = (created or utc_now()).astimezone(UTC)
    return {
        "id": task_id,
        "created": moment,
        "source_agent": SOURCE_AGENT,
        "target_agent": target_agent,
        "task_type": task_type,
        "risk_level": "low",
        "requires_approval": False,
        "workflow_mode": workflow_mode,
        "status": SUBMITTED,
        "summary": summary,
        "ttl_days": TASK_TTL_DAYS,
        "payload": payload,
        "result": {"output": None, "completed_by": None, "completed_at": None},
        "history": [{"timestamp": moment, "status": SUBMITTED, "actor": SOURCE_AGENT,
                     "note": "task created"}],
        "retry_policy": {"next_retry_at": None, "retry_count": 0},
    }


def dump_task(task: dict[str, Any]) -> bytes:
    return dump_yaml(task)


def claimed_actor(task: dict[str, Any], status: str) -> tuple[str, str]:
    """(actor, note) of the newest history entry that set `status`, as the file claims
    them: anyone who can write the folder can write any name here, so callers show the
    actor as claimed, never as who decided. Empty when nothing usable is there."""
    history = task.get("history")
    for entry in reversed(history if isinstance(history, list) else []):
        if isinstance(entry, dict) and entry.get("status") == status:
            actor, note = entry.get("actor"), entry.get("note")
            return (visible_line(actor, CLAIMED_ACTOR_CHARS) if isinstance(actor, str) else "",
                    visible_line(note, MAX_NOTE_CHARS) if isinstance(note, str) else "")
    return "", ""


def add_history(task: dict[str, Any], *, status: str, actor: str, note: str) -> None:
    """Set the task's status and record who changed it and why (cut to the lengths the
    reader accepts, so the worker never writes a file it would refuse)."""
    task["status"] = status
    history = task.get("history")
    if not isinstance(history, list):
        history = []
        task["history"] = history
    if len(note) > MAX_NOTE_CHARS:
        note = note[:MAX_NOTE_CHARS - 1] + "…"
    history.append({"timestamp": task_time(task), "status": status,
                    "actor": actor[:MAX_ACTOR_CHARS], "note": note})
