"""PLATFORM TOOLS STAND-IN: plays the platform's task tools (task-queue-mcp's queue
operations and one task-dispatcher tick) against a task folder, for tests that put this
worker's files in front of them. It is NOT the platform's code: it is written only from
the facts in the task tools' PROTOCOL.md ("PROTOCOL", kept beside the repository in
../shared/task-queue/; § numbers are its sections; [TQ] = task-queue-mcp, [TD] =
task-dispatcher), is as strict as those facts, and answers with their texts.

The vocabularies below are the TOOLS' words (PROTOCOL §2), deliberately not imported from
vocabulary.py: the point is to check this project's files against the other side.

Covered
  TaskTools (§1-§4): submit_task with its checks and the notify shortcut (§1.2), the
    §3.5 auto-close; list_tasks (§4.1 order, §1.4 TTL rule, limit 1..200, ValueError on
    a bad status filter, TypeError from a naive `created`); get_task; update_task (§3.1,
    checks in PROTOCOL's order); set_task_status standard / override / repair moves,
    cancel_task, park_task, unpark_task (§3.2); requeue_dead_letter (§3.3); the dead-letter
    and archive refusals (§3.4, §1.1); the operator-only refusals of §3.6 (set_task_status,
    cancel_task, requeue_dead_letter with an actor other than `operator`); the HTTP
    operator routes (§4.3: actor pinned to `operator`, the client name as history
    `channel`; `http_status` maps a result to 200/404/400).
  Rewrites (§1.3): PyYAML `yaml.dump` with the pure-Python Dumper, block style,
    allow_unicode, sort_keys off (so one object dumped twice gives &id001/*id001), keys in
    load order, new keys appended; [TQ] datetimes, [TD] quoted ISO strings; [TQ] writes
    `<name>.yml.tmp` with default permissions (0666 & ~umask; `umask=` plays the
    container's) under flock on `.locks/<task-id>.lock`; [TD] writes `<stem>.tmp` 0600 and
    takes no lock; both rename into place. Files are loaded with yaml.safe_load.
  Dispatcher (§5): one tick = submitted pass (§5.2 steps 1-9, incl. the TypeError that a
    YAML-timestamp or naive `next_retry_at` raises) → routing-failed retry pass → archive
    (§1.4); kinds (§5.3): `temporal` runs the start script exactly as §5.4 says, `audit` and
    `headless` are only recorded in `launches`, `operator-pickup` sends `[task ready]`;
    routing failures, retry_policy, dead letters (§5.5); roster checks (§5.7); Matrix
    messages as (room, title, body) in `messages` (§5.8).
  validate_task: what a file must be for these tools (§9 items 1, 6, 7, 9, 10, 12 and the
    §1.2 value checks); an empty list means they accept it.

Left out: the reap/sweep of run records (§5.6, skipped: no run records are written and
every run slot is free), the auth-outage stamp, ntfy, agent-bus events (§5.9, §7) and their
signatures, tokens and the MCP identity binding (§3.6, except the operator-only refusals),
amend_task, `/queue/summary`, the UIs' own reads (§6), real `claude` launches, headless
launch refusals (roster miss, credentials: PROTOCOL gives no texts), the audit request
resolution of §5.3.

Where PROTOCOL writes `[...]` or `{…}` in a text, the stand-in fills in the sorted values as
a Python list / set literal, as update_task's known `['completed', 'failed', 'in-progress']`
is. Where PROTOCOL elides (`…`), the stand-in keeps the known words and ends with `…`: match
those texts on their prefix. Texts PROTOCOL does not give at all are the stand-in's own,
marked "stand-in text" where they are made; so are the success results beyond `ok`, the
Auto-approved / Needs approval reasons, the roster errors, the notify history note and room,
and the fixture roster's project dirs.
The dead-letter refusal keeps PROTOCOL's literal `POST /tasks/<id>/requeue`.

Choices where PROTOCOL is silent: records handed out (get_task, list_tasks) carry datetimes
as ISO strings, as the MCP tools send them (§4.2); a standard operator move needs no note
even with allow_override; set_task_status, cancel_task and requeue_dead_letter refuse any
actor but `operator` (§3.6: only the HTTP routes reach them), park/unpark accept the target
agent too; list_tasks sorts every loaded record before filtering, so a naive `created`
makes filtered lists raise too; [TD] writes `target_agent` resolved from `auto` and the
inherited `workflow_mode` into the file.

Use:
    tools = TaskTools(queue_dir, umask=0o022)
    tools.approve(task_id)                       # the operator, through the Matrix bot
    Dispatcher(queue_dir, start_script=script, log_dir=logs).tick()
    problems = validate_task(yaml.safe_load(text), filename)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

# --- §2 vocabularies, the tools' words --------------------------------------------------
STATUSES = (
    "submitted", "approved", "pending-approval", "in-progress", "parked", "routing-failed",
    "completed", "failed", "cancelled",
)
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
TASK_TYPES = (
    "build", "deploy", "fix", "research", "review", "audit", "notify", "docs",
    "ticket_audit", "ticket_audit_complete",
)
SELF_TERMINAL_TYPE = "notify"
DISPATCHER_ONLY_TYPE = "workflow"
RISK_LEVELS = ("low", "medium", "high")
PRIORITIES = ("normal", "high", "urgent")
WORKFLOW_MODES = ("semi-auto", "auto", "manual-then-auto")
TEMPORAL_WORKFLOW_TYPES = ("BuildPipelineWorkflow", "BuildPlanWorkflow")
DEFAULT_WORKFLOW_TYPE = "BuildPipelineWorkflow"
NOT_STATUSES = ("input-required", "working", "needs-input", "rejected", "expired", "pending")

QUEUE, ARCHIVE, DEAD_LETTERS = "queue", "archive", "dead-letters"  # queue_location values
FOLDERS = {QUEUE: "", ARCHIVE: "archive", DEAD_LETTERS: "dead-letters"}
LOCK_DIR = ".locks"
OPERATOR = "operator"
DISPATCHER = "dispatcher"
AUTO_TARGET = "auto"
DEFAULT_TTL_DAYS = 30
DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT = 20, 200

# §3.1: update_task's targets and where each may come from.
UPDATE_ALLOWED_FROM = {
    "in-progress": ("approved",),
    "completed": ("in-progress",),
    "failed": ("submitted", "pending-approval", "approved", "in-progress"),
}

# --- texts (PROTOCOL's words) -----------------------------------------------------------
INVALID_TASK_ID = "invalid task_id format"
NOT_FOUND = "not found"
ARCHIVED = "task is archived and cannot be updated"
DEAD_LETTERED = ("task is dead-lettered and cannot be mutated in place — requeue it first "
                 "(operator only, POST /tasks/<id>/requeue)")
EMPTY_ACTOR = "actor must not be empty"
OVERRIDE_NEEDS_NOTE = "an override transition requires a non-empty note for the audit trail"
OPERATOR_TRANSITION_HELP = (
    "Standard targets: approved (from submitted/pending-approval), cancelled or parked (from "
    "any non-terminal). For other non-terminal moves pass allow_override=True.")
UPDATE_TASK_HINT = (
    " This transition is available via update_task (agent-facing) — set_task_status is "
    "operator-only and cannot reach terminal statuses via override.")
SUBMIT_NOTE = "Task submitted via task-queue-mcp"
NOTIFY_NOTE = "Notification delivered — no session required"
NOTIFY_APPROVAL_IGNORED = " (requires_approval=True ignored: notify is self-terminal)"
REQUEUE_NOTE = "Requeued from dead-letters"
START_SCRIPT_NAME = "temporal-workflow-start.sh"
TEMPORAL_SUBMITTED = "Temporal workflow submitted"
RETRY_SUCCEEDED = "Routing retry succeeded"
HEADLESS_PROMPT = "You have a pending task (id={id}). Check your task queue and proceed."

_UUID_LOWER = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID4_LOWER = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_PLAN_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_FILE_NAME = re.compile(r"\d{8}-\d{6}-(?P<id8>.{8})\.yml")


def _listing(values: Iterable[str]) -> str:
    return repr(sorted(values))


def _err(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text}


def invalid_status(status: object) -> str:
    return f"Invalid status: {status!r}. Must be one of: {_listing(STATUSES)}"


def terminal_refusal(status: object) -> str:
    return f"Task is in terminal status {status!r} and cannot be updated"


def operator_only(tool: str, actor: str) -> str:
    return (f"{tool} is operator-only and is not reachable with an agent identity ({actor!r}). "
            "Use the HTTP control routes, which are the operator surface.")


def unknown_task_type_reason(task_type: object) -> str:
    vocabulary = _listing((*TASK_TYPES, DISPATCHER_ONLY_TYPE))
    return (f"Unknown task_type {task_type!r} — not in task-queue-mcp's vocabulary "
            f"({vocabulary}). Queue file written outside submit_task?")


def unknown_workflow_mode_reason(mode: object) -> str:
    return (f"Unknown workflow_mode {mode!r} — not in task-queue-mcp's vocabulary "
            f"({_listing(WORKFLOW_MODES)}). Refusing to guess: …")


def http_status(result: dict[str, Any]) -> int:
    """The HTTP status the §4.3 routes answer a handler result with."""
    if result.get("ok"):
        return 200
    return 404 if result.get("error") == NOT_FOUND else 400


# --- YAML and files ---------------------------------------------------------------------
def dump_yaml(record: Any) -> str:
    """Both tools' serializer (§1.3): shared objects come out as &idNNN / *idNNN."""
    return yaml.dump(record, default_flow_style=False, allow_unicode=True, sort_keys=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def write_tq(path: Path, record: dict[str, Any], umask: int | None = None) -> None:
    """[TQ]'s rewrite: `<name>.yml.tmp` with default permissions, renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        if umask is not None:  # the container's umask, not this process's
            os.fchmod(handle.fileno(), 0o666 & ~umask)
        handle.write(dump_yaml(record))
    os.replace(tmp, path)


def write_td(path: Path, record: dict[str, Any]) -> None:
    """[TD]'s rewrite: `<stem>.tmp` created 0600, renamed into place."""
    tmp = path.with_name(path.stem + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(dump_yaml(record))
    os.replace(tmp, path)


def yml_files(folder: Path, pattern: str = "*.yml") -> list[Path]:
    """Task files of one folder, by name, dot-files skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith(".") and p.is_file())


def _try_load(path: Path) -> dict[str, Any] | None:
    try:
        record = load_yaml(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        log.warning("skipping %s: %s", path, error)
        return None
    return record if isinstance(record, dict) else None


def _is_uuid(value: object) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return isinstance(value, str)


def _outward(value: Any) -> Any:
    """A record as the tools hand it out: datetimes as ISO 8601 strings (§4.2)."""
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: _outward(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_outward(item) for item in value]
    return value


def task_file_name(created: datetime, task_id: str) -> str:
    return f"{created.strftime('%Y%m%d-%H%M%S')}-{task_id[:8]}.yml"


# --- TaskTools ------------------------------------------------------------------------
@dataclass
class _Move:
    """One status change [TQ] applies to a loaded record."""

    status: str
    actor: str
    note: str
    extra: dict[str, Any] = field(default_factory=dict)
    output: Any = None


def _apply_move(record: dict[str, Any], move: _Move, now: datetime) -> None:
    previous = record.get("status")
    record["status"] = move.status
    if move.status == "parked" and previous != "parked":
        record["parked_from"] = previous
    elif previous == "parked" and move.status != "parked":
        record.pop("parked_from", None)
    entry = {"timestamp": now, "status": move.status, "actor": move.actor, "note": move.note}
    entry.update(move.extra)
    record["history"].append(entry)
    if move.status in TERMINAL_STATUSES:
        result = record["result"]
        result["completed_by"] = move.actor
        result["completed_at"] = now  # the same object as the entry's: anchor + alias
        if move.output is not None:
            result["output"] = move.output


def _history_extra(**values: Any) -> dict[str, Any]:
    """Optional history keys in the order PROTOCOL lists them, unset ones left out."""
    order = ("on_behalf_of", "channel", "override", "repaired_from", "action",
             "requeued_from", "cleared_failed_reason")
    return {key: values[key] for key in order if values.get(key) is not None}


def _update_refusal(record: dict[str, Any], status: str, actor: str,
                    on_behalf_of: str | None) -> str | None:
    current = record.get("status")
    if current in TERMINAL_STATUSES:
        return terminal_refusal(current)
    target = record.get("target_agent")
    if actor not in (target, OPERATOR):
        return (f"actor {actor!r} is not the target agent for this task ({target!r}) "
                "and may not update it.")
    if on_behalf_of and on_behalf_of != target:
        return f"on_behalf_of {on_behalf_of!r} is not the target agent for this task ({target!r})."
    allowed = UPDATE_ALLOWED_FROM[status]
    if current not in allowed:
        return f"Invalid transition: {current!r} → {status!r}. Allowed from: {_listing(allowed)}"
    return None


def _standard_operator_move(current: object, target: str) -> bool:
    if current not in STATUSES or current in TERMINAL_STATUSES:
        return False
    if target == "approved":
        return current in ("submitted", "pending-approval")
    if target == "parked":
        return current != "parked"
    return target == "cancelled"


def _invalid_operator_transition(current: object, target: str) -> str:
    text = f"Invalid operator transition: {current!r} → {target!r}. {OPERATOR_TRANSITION_HELP}"
    if current in UPDATE_ALLOWED_FROM.get(target, ()):
        text += UPDATE_TASK_HINT
    return text


def _operator_refusal(current: object, target: str, note: str,
                      allow_override: bool) -> tuple[str | None, dict[str, Any]]:
    """(refusal, history extras) of a set_task_status move (§3.2). A standard move needs
    no override and so no note, even when allow_override is passed."""
    if current in TERMINAL_STATUSES:
        return terminal_refusal(current), {}
    if _standard_operator_move(current, target):
        return None, {}
    if not allow_override:
        return _invalid_operator_transition(current, target), {}
    if not note.strip():
        return OVERRIDE_NEEDS_NOTE, {}
    if current not in STATUSES:  # repair of an out-of-vocabulary status
        return None, {"override": True, "repaired_from": current}
    if target in TERMINAL_STATUSES:
        return _invalid_operator_transition(current, target), {}
    return None, {"override": True}


def _park_gate(actor: str) -> Callable[[dict[str, Any]], str | None]:
    def gate(record: dict[str, Any]) -> str | None:
        target = record.get("target_agent")
        if actor in (target, OPERATOR):
            return None
        # stand-in text up to "and may not": PROTOCOL gives only `… and may not park or
        # unpark it.`; the start is update_task's refusal.
        return (f"actor {actor!r} is not the target agent for this task ({target!r}) "
                "and may not park or unpark it.")
    return gate


def _submit_refusal(source_agent: str, target_agent: str, task_type: str, summary: str,
                    ttl_days: Any) -> str | None:
    if not str(source_agent or "").strip():
        return "source_agent must not be empty"
    if not str(target_agent or "").strip():
        return "target_agent must not be empty"
    if task_type not in TASK_TYPES:
        return f"Invalid task_type: {task_type!r}. Must be one of: {_listing(TASK_TYPES)}"
    if not str(summary or "").strip():
        return "summary must not be empty"
    if isinstance(ttl_days, bool) or not isinstance(ttl_days, int) or ttl_days < 1:
        return f"Invalid ttl_days: {ttl_days}. Must be a positive integer."
    return None


def _choice_refusal(risk_level: str, priority: str, workflow_mode: str,
                    context_refs: list[str], originating_task_id: str | None) -> str | None:
    for name, value, allowed in (("risk_level", risk_level, RISK_LEVELS),
                                 ("priority", priority, PRIORITIES),
                                 ("workflow_mode", workflow_mode, WORKFLOW_MODES)):
        if value not in allowed:  # stand-in text: PROTOCOL gives none for these three
            return f"Invalid {name}: {value!r}. Must be one of: {_listing(allowed)}"
    for ref in context_refs:
        if not isinstance(ref, str) or not ref.startswith("/"):
            return f"Invalid context_ref: {ref!r} — must be an absolute path starting with '/'"
    if originating_task_id is not None and not _is_uuid(originating_task_id):
        return f"Invalid originating_task_id: {originating_task_id!r} — must be a UUID"
    return None


def _sort_key(item: tuple[str, dict[str, Any]]) -> tuple[Any, ...]:
    """Dead letters first, then `created` newest first; a non-datetime sorts oldest. Two
    datetimes are compared directly, so a naive one next to aware ones raises TypeError."""
    location, record = item
    created = record.get("created")
    if isinstance(created, datetime):
        return (location == DEAD_LETTERS, 1, created)
    return (location == DEAD_LETTERS, 0, 0)


def _hidden_by_ttl(location: str, record: dict[str, Any], now: datetime) -> bool:
    created = record.get("created")
    if location == DEAD_LETTERS or record.get("status") not in TERMINAL_STATUSES:
        return False
    if not isinstance(created, datetime):
        return False
    ttl = record.get("ttl_days", DEFAULT_TTL_DAYS)
    return now > created + timedelta(days=ttl)


class TaskTools:
    """Stand-in for task-queue-mcp's queue operations (PROTOCOL §1-§4) on `queue_dir`.
    `umask`: the container's umask for [TQ]'s rewrites (None: this process's)."""

    def __init__(self, queue_dir: Path, *, umask: int | None = None) -> None:
        self.queue_dir = Path(queue_dir)
        self.umask = umask

    # -- files
    def _folder(self, location: str) -> Path:
        return self.queue_dir / FOLDERS[location] if FOLDERS[location] else self.queue_dir

    def _write(self, path: Path, record: dict[str, Any]) -> None:
        write_tq(path, record, self.umask)

    @contextlib.contextmanager
    def _locked(self, task_id: str) -> Iterator[None]:
        locks = self.queue_dir / LOCK_DIR
        locks.mkdir(exist_ok=True)
        with open(locks / f"{task_id}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def find(self, task_id: str, locations: Iterable[str] = (QUEUE, ARCHIVE, DEAD_LETTERS),
             ) -> tuple[Path, dict[str, Any], str] | None:
        """[TQ]'s lookup (§1.1): `*-<id8>.yml` in each folder, then a full scan; the
        record's `id` must equal `task_id` exactly."""
        folders = [(location, self._folder(location)) for location in locations]
        id8 = task_id[:8]
        if re.fullmatch(r"[0-9a-fA-F]{8}", id8):
            for location, folder in folders:
                for path in yml_files(folder, f"*-{id8}.yml"):
                    record = _try_load(path)
                    if record is not None and record.get("id") == task_id:
                        return path, record, location
        for location, folder in folders:
            for path in yml_files(folder):
                record = _try_load(path)
                if record is not None and record.get("id") == task_id:
                    log.warning("task %s found only by full scan … filename does not end in "
                                "-%s.yml", id8, id8)
                    return path, record, location
        return None

    def _mutate(self, task_id: str,
                plan: Callable[[dict[str, Any]], _Move | str]) -> dict[str, Any]:
        """Lock, find, refuse dead letters and archived tasks, apply `plan`'s move, rewrite."""
        with self._locked(task_id):
            found = self.find(task_id)
            if found is None:
                return _err(NOT_FOUND)
            path, record, location = found
            if location == DEAD_LETTERS:
                return _err(DEAD_LETTERED)
            if location == ARCHIVE:
                return _err(ARCHIVED)
            previous = record.get("status")
            move = plan(record)
            if isinstance(move, str):
                return _err(move)
            _apply_move(record, move, datetime.now(UTC))
            self._write(path, record)
        return {"ok": True, "task_id": task_id, "status": move.status,
                "previous_status": previous}

    # -- §1.2 submit
    def submit_task(self, source_agent: str, target_agent: str, task_type: str, summary: str,
                    description: str, risk_level: str = "low", requires_approval: bool = False,
                    priority: str = "normal", context_refs: list[str] | None = None,
                    ttl_days: int = DEFAULT_TTL_DAYS, workflow_mode: str = "semi-auto",
                    originating_task_id: str | None = None) -> dict[str, Any]:
        refs = list(context_refs or [])
        refusal = (_submit_refusal(source_agent, target_agent, task_type, summary, ttl_days)
                   or _choice_refusal(risk_level, priority, workflow_mode, refs,
                                      originating_task_id))
        if refusal:
            return _err(refusal)
        now = datetime.now(UTC)
        task_id = str(uuid.uuid4())
        notify = task_type == SELF_TERMINAL_TYPE
        payload: dict[str, Any] = {"description": description, "context_refs": refs,
                                   "priority": priority}
        if originating_task_id is not None:
            payload["originating_task_id"] = originating_task_id
        record = {
            "id": task_id, "created": now, "source_agent": source_agent,
            "target_agent": target_agent, "task_type": task_type, "risk_level": risk_level,
            "requires_approval": False if notify else requires_approval,
            "workflow_mode": workflow_mode, "status": "completed" if notify else "submitted",
            "summary": summary, "ttl_days": ttl_days, "payload": payload,
            "result": {"output": None, "completed_by": None, "completed_at": None},
            "history": [{"timestamp": now, "status": "submitted", "actor": source_agent,
                         "note": SUBMIT_NOTE}],
            "retry_policy": {"next_retry_at": None, "retry_count": 0},
        }
        if notify:
            _close_notify(record, now, requires_approval)
        name = task_file_name(now, task_id)
        self._write(self.queue_dir / name, record)
        answer: dict[str, Any] = {"ok": True, "task_id": task_id, "filename": name}
        if notify:
            answer.update(status="completed", self_terminal=True)
        if originating_task_id is not None:
            closed = self._auto_close(record, originating_task_id)
            if closed:
                answer["auto_closed_task_id"] = closed
        return answer

    def _auto_close(self, new: dict[str, Any], parent_id: str) -> str | None:
        """§3.5: close the originating task a return task answers; failures only logged."""
        found = self.find(parent_id, (QUEUE, ARCHIVE))
        if found is None or found[2] != QUEUE:
            log.info("auto-close: %s not found or archived", parent_id)
            return None
        parent = found[1]
        if parent.get("status") not in ("approved", "in-progress"):
            return None
        if (parent.get("target_agent") != new["source_agent"]
                or parent.get("source_agent") != new["target_agent"]):
            log.info("auto-close: %s is a forward request, skipped", parent_id)
            return None
        actor = new["source_agent"]
        note = f"auto-closed: return task {new['id']} submitted — {new['summary']}"
        steps = ["in-progress", "completed"] if parent["status"] == "approved" else ["completed"]
        for status in steps:
            result = self.update_task(parent_id, status, actor, note)
            if not result["ok"]:
                log.warning("auto-close of %s failed: %s", parent_id, result["error"])
                return None
        return parent_id

    # -- §4.1 reading
    def list_tasks(self, target_agent: str | None = None, source_agent: str | None = None,
                   status: str | None = None, task_type: str | None = None,
                   include_archived: bool = False, include_dead_letters: bool = False,
                   limit: int = DEFAULT_LIST_LIMIT) -> list[dict[str, Any]]:
        wanted = self._status_filter(status)
        locations = [QUEUE]
        locations += [ARCHIVE] if include_archived else []
        locations += [DEAD_LETTERS] if include_dead_letters else []
        loaded = [(location, record) for location in locations
                  for path in yml_files(self._folder(location))
                  if (record := _try_load(path)) is not None]
        loaded.sort(key=_sort_key, reverse=True)
        now = datetime.now(UTC)
        filters = {"target_agent": target_agent, "source_agent": source_agent,
                   "task_type": task_type}
        out = []
        for location, record in loaded:
            if _hidden_by_ttl(location, record, now):
                continue
            if any(value is not None and record.get(key) != value
                   for key, value in filters.items()):
                continue
            if wanted is not None and record.get("status") not in wanted:
                continue
            out.append({**_outward(record), "queue_location": location})
        return out[:max(1, min(MAX_LIST_LIMIT, limit))]

    @staticmethod
    def _status_filter(status: str | None) -> list[str] | None:
        if not status:
            return None
        values = [value.strip() for value in status.split(",")]
        invalid = [value for value in values if value not in STATUSES]
        if invalid:
            raise ValueError(f"Invalid status filter: {invalid!r}. Must be one of: "
                             f"{_listing(STATUSES)} (single value or comma-separated).")
        return values

    def get_task(self, task_id: str) -> dict[str, Any]:
        if not _is_uuid(task_id):
            return _err(INVALID_TASK_ID)
        found = self.find(task_id)
        if found is None:
            return _err(NOT_FOUND)
        _, record, location = found
        return {"ok": True, "task": {**_outward(record), "queue_location": location}}

    # -- §3.1 agent
    def update_task(self, task_id: str, status: str, actor: str, note: str = "",
                    output: Any = None, on_behalf_of: str | None = None, *,
                    channel: str | None = None) -> dict[str, Any]:
        if not _is_uuid(task_id):
            return _err(INVALID_TASK_ID)
        if on_behalf_of and actor != OPERATOR:
            return _err(f"on_behalf_of is reserved for the 'operator' actor; {actor!r} may not "
                        "act for another agent.")
        if status not in UPDATE_ALLOWED_FROM:
            return _err(f"Invalid status: {status!r}. update_task accepts: "
                        f"{_listing(UPDATE_ALLOWED_FROM)}")

        def plan(record: dict[str, Any]) -> _Move | str:
            refusal = _update_refusal(record, status, actor, on_behalf_of)
            extra = _history_extra(on_behalf_of=on_behalf_of or None, channel=channel)
            return refusal or _Move(status, actor, note, extra, output)

        return self._mutate(task_id, plan)

    # -- §3.2 operator
    def _operator_move(self, task_id: str, status: str, actor: str, note: str,
                       allow_override: bool, channel: str | None,
                       gate: Callable[[dict[str, Any]], str | None] | None = None
                       ) -> dict[str, Any]:
        if not _is_uuid(task_id):
            return _err(INVALID_TASK_ID)
        if not str(actor or "").strip():
            return _err(EMPTY_ACTOR)
        if status not in STATUSES:
            return _err(invalid_status(status))

        def plan(record: dict[str, Any]) -> _Move | str:
            refusal = gate(record) if gate else None
            if refusal:
                return refusal
            refusal, flags = _operator_refusal(record.get("status"), status, note, allow_override)
            extra = _history_extra(channel=channel, **flags)
            return refusal or _Move(status, actor, note, extra)

        return self._mutate(task_id, plan)

    def set_task_status(self, task_id: str, status: str, actor: str, note: str = "",
                        allow_override: bool = False, channel: str | None = None) -> dict[str, Any]:
        if actor and actor != OPERATOR:
            return _err(operator_only("set_task_status", actor))
        return self._operator_move(task_id, status, actor, note, allow_override, channel)

    def cancel_task(self, task_id: str, actor: str, note: str = "", *,
                    channel: str | None = None) -> dict[str, Any]:
        if actor and actor != OPERATOR:
            return _err(operator_only("cancel_task", actor))
        return self._operator_move(task_id, "cancelled", actor, note or "Cancelled by operator",
                                   False, channel)

    def park_task(self, task_id: str, actor: str, note: str = "", *,
                  channel: str | None = None) -> dict[str, Any]:
        return self._operator_move(task_id, "parked", actor, note or "Parked by operator",
                                   False, channel, _park_gate(actor))

    def unpark_task(self, task_id: str, actor: str, note: str = "", status: str | None = None,
                    *, channel: str | None = None) -> dict[str, Any]:
        if not _is_uuid(task_id):
            return _err(INVALID_TASK_ID)
        if not str(actor or "").strip():
            return _err(EMPTY_ACTOR)
        if status is not None and status not in STATUSES:
            return _err(invalid_status(status))
        gate = _park_gate(actor)

        def plan(record: dict[str, Any]) -> _Move | str:
            current = record.get("status")
            refusal = gate(record)
            if refusal or current != "parked":
                return refusal or f"task is not parked (status: {current!r})"
            target = status or record.get("parked_from")
            if not target:
                return ("task has no recorded parked_from status — pass an explicit status to "
                        f"unpark it. Valid statuses: {_listing(STATUSES)}")
            if target not in STATUSES:
                return invalid_status(target)
            text = note or f"Unparked by operator (→ {target})"
            refusal, flags = _operator_refusal(current, target, text, True)
            return refusal or _Move(target, actor, text, _history_extra(channel=channel, **flags))

        return self._mutate(task_id, plan)

    # -- §3.3 requeue
    def requeue_dead_letter(self, task_id: str, actor: str, note: str = "", *,
                            channel: str | None = None) -> dict[str, Any]:
        if actor and actor != OPERATOR:
            return _err(operator_only("requeue_dead_letter", actor))
        if not _is_uuid(task_id):
            return _err(INVALID_TASK_ID)
        if not str(actor or "").strip():
            return _err(EMPTY_ACTOR)
        with self._locked(task_id):
            found = self.find(task_id, (DEAD_LETTERS,))
            if found is None:
                return _err(NOT_FOUND)
            path, record, _ = found
            target = self.queue_dir / path.name
            if target.exists():
                return _err(f"cannot requeue: {path.name} already exists in the queue root. "
                            "Resolve the collision by hand.")
            failed = record.pop("failed_reason", None)
            reason = failed.get("reason") if isinstance(failed, dict) else failed
            record["status"] = "submitted"
            record["retry_policy"] = {"next_retry_at": None, "retry_count": 0}
            entry = {"timestamp": datetime.now(UTC), "status": "submitted", "actor": actor,
                     "note": note or REQUEUE_NOTE}
            entry.update(_history_extra(channel=channel, action="requeue",
                                        requeued_from=DEAD_LETTERS,
                                        cleared_failed_reason=reason))
            record["history"].append(entry)
            self._write(target, record)
            path.unlink()
        return {"ok": True, "task_id": task_id, "status": "submitted", "filename": path.name}

    # -- §4.3 / §6 HTTP operator routes: actor pinned to `operator`
    def approve(self, task_id: str, note: str = "", channel: str = "matrix-bot") -> dict[str, Any]:
        return self.set_task_status(task_id, "approved", OPERATOR, note, False, channel)

    def cancel(self, task_id: str, note: str = "", channel: str = "cloudcli") -> dict[str, Any]:
        return self.cancel_task(task_id, OPERATOR, note, channel=channel)

    def status(self, task_id: str, status: str, note: str = "", allow_override: bool = False,
               channel: str = "cloudcli") -> dict[str, Any]:
        return self.set_task_status(task_id, status, OPERATOR, note, allow_override, channel)

    def park(self, task_id: str, note: str = "", channel: str = "cloudcli") -> dict[str, Any]:
        return self.park_task(task_id, OPERATOR, note, channel=channel)

    def unpark(self, task_id: str, note: str = "", status: str | None = None,
               channel: str = "cloudcli") -> dict[str, Any]:
        return self.unpark_task(task_id, OPERATOR, note, status, channel=channel)

    def requeue(self, task_id: str, note: str = "", channel: str = "cloudcli") -> dict[str, Any]:
        return self.requeue_dead_letter(task_id, OPERATOR, note, channel=channel)

    def update(self, task_id: str, status: str, note: str = "", output: Any = None,
               on_behalf_of: str | None = None, channel: str = "cloudcli") -> dict[str, Any]:
        return self.update_task(task_id, status, OPERATOR, note, output, on_behalf_of,
                                channel=channel)


def _close_notify(record: dict[str, Any], now: datetime, requires_approval: bool) -> None:
    note = NOTIFY_NOTE + (NOTIFY_APPROVAL_IGNORED if requires_approval else "")
    record["result"] = {"output": record["payload"]["description"],
                        "completed_by": f"{record['source_agent']} (notify)",
                        "completed_at": now}
    record["history"].append({"timestamp": now, "status": "completed",
                              "actor": record["source_agent"], "note": note})


# --- §5.7 roster ------------------------------------------------------------------------
class RosterError(ValueError):
    """A missing or invalid `agent-launch.yml`: [TD] fails every tick (messages are
    stand-in text)."""


# The fixture's agents (§5.7); their project folder names are the stand-in's.
FIXTURE_ROSTER: dict[str, dict[str, str]] = {
    **{name: {"project_dir": f"~/.claude/projects/{name}"}
       for name in ("sysadmin", "developer", "research", "writer", "security")},
    "steward": {"project_dir": "~/.claude/projects/steward", "run_as_user": "agent-steward",
                "launcher": "/usr/local/sbin/forge/run-steward.sh"},
}
_ROSTER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_RUN_AS_USER = re.compile(r"agent-[a-z0-9-]{1,30}")
_ROSTER_KEYS = {"project_dir", "run_as_user", "launcher"}
LAUNCHER_DIR = "/usr/local/sbin/forge/"


def _roster_entry_problem(name: object, entry: object) -> str | None:
    if not isinstance(name, str) or not _ROSTER_NAME.fullmatch(name):
        return f"invalid agent name {name!r}"
    if not isinstance(entry, dict) or set(entry) - _ROSTER_KEYS:
        return f"{name}: entry must be a mapping with keys among {sorted(_ROSTER_KEYS)}"
    project = entry.get("project_dir")
    projects = Path(os.path.expanduser("~/.claude/projects"))
    if not isinstance(project, str):
        return f"{name}: project_dir is required"
    expanded = Path(os.path.normpath(os.path.expanduser(project)))
    if not expanded.is_absolute() or not expanded.is_relative_to(projects):
        return f"{name}: project_dir must be under {projects}"
    user, launcher = entry.get("run_as_user"), entry.get("launcher")
    if (user is None) != (launcher is None):
        return f"{name}: run_as_user and launcher go together"
    if user is not None and not (isinstance(user, str) and _RUN_AS_USER.fullmatch(user)):
        return f"{name}: invalid run_as_user {user!r}"
    if launcher is not None and not (isinstance(launcher, str)
                                     and os.path.normpath(launcher) == launcher
                                     and launcher.startswith(LAUNCHER_DIR)):
        return f"{name}: launcher must be a normalised path under {LAUNCHER_DIR}"
    return None


def check_roster(roster: object) -> dict[str, dict[str, Any]]:
    if not isinstance(roster, dict) or not roster:
        raise RosterError("roster must be a non-empty mapping of agent name to entry")
    for name, entry in roster.items():
        problem = _roster_entry_problem(name, entry)
        if problem:
            raise RosterError(problem)
    return roster


def load_roster(path: Path | None) -> dict[str, dict[str, Any]]:
    """`path` None: the fixture roster. Missing, unparseable or invalid → RosterError."""
    if path is None:
        return check_roster({name: dict(entry) for name, entry in FIXTURE_ROSTER.items()})
    try:
        return check_roster(load_yaml(Path(path)))
    except (OSError, yaml.YAMLError) as error:
        raise RosterError(f"cannot load roster {path}: {error}") from error


# --- §5 Dispatcher ----------------------------------------------------------------------
_RISK_RANK = {level: rank for rank, level in enumerate(RISK_LEVELS)}


def _risk_rank(value: object) -> int:
    return _RISK_RANK.get(value, 0) if isinstance(value, str) else 0  # unknown ranks as low


def _td_entry(now: datetime, status: str, note: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"timestamp": now.isoformat(), "status": status,
                             "actor": DISPATCHER}
    if note:
        entry["note"] = note
    return entry


def _set_td_status(record: dict[str, Any], status: str, note: str, now: datetime) -> None:
    record["status"] = status
    record["history"].append(_td_entry(now, status, note))


def _launch_kind(record: dict[str, Any]) -> str:
    """§5.3."""
    if record.get("task_type") == DISPATCHER_ONLY_TYPE:
        return "temporal"
    if record.get("task_type") == "audit" and record.get("target_agent") == "security":
        return "audit"
    if record.get("workflow_mode", "semi-auto") == "auto":
        return "headless"
    return "operator-pickup"


def _routing_problem(record: dict[str, Any]) -> str | None:
    """§5.2 steps 2-3, also run again by the retry pass."""
    task_type = record.get("task_type")
    if task_type not in (*TASK_TYPES, DISPATCHER_ONLY_TYPE):
        return unknown_task_type_reason(task_type)
    mode = record.get("workflow_mode", "semi-auto")
    if mode not in WORKFLOW_MODES:
        return unknown_workflow_mode_reason(mode)
    return None


def _waiting_for_retry(record: dict[str, Any], now: datetime) -> bool:
    """§5.2 step 1. A YAML timestamp raises `TypeError: fromisoformat: argument must be
    str`, a string without offset raises on the naive/aware comparison: the tick fails."""
    next_retry = record.get("retry_policy", {}).get("next_retry_at")
    if not next_retry:
        return False
    return datetime.fromisoformat(next_retry) > now


def _created_for_archive(record: dict[str, Any]) -> datetime | None:
    created = record.get("created")
    if created is None:
        return None
    try:
        parsed = datetime.fromisoformat(str(created))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _workflow_id8(task_id: object) -> str:
    """§5.4: an id not in lowercase UUID form becomes `invalid-id`."""
    safe = task_id if isinstance(task_id, str) and _UUID_LOWER.fullmatch(task_id) else "invalid-id"
    return safe[:8]


class Dispatcher:
    """Stand-in for ONE task-dispatcher tick (PROTOCOL §5) over `queue_dir`'s root.

    `start_script` plays `~/scripts/temporal-workflow-start.sh`, `log_dir` `~/.pm2/logs`,
    `roster_file` `agent-launch.yml` (None: the fixture roster), `manifests_dir`
    `~/.claude/manifests` (None: no manifests), `comms_dir` `~/.claude/comms` (kept for
    callers; the audit request resolution is not modelled). `messages` collects the
    Matrix messages (room, title, body) it would send, `launches` what it launched."""

    def __init__(self, queue_dir: Path, *, start_script: Path, log_dir: Path,
                 roster_file: Path | None = None, manifests_dir: Path | None = None,
                 comms_dir: Path | None = None, max_retries: int = 3,
                 start_timeout: float = 30.0) -> None:
        self.queue_dir = Path(queue_dir)
        self.start_script = Path(start_script)
        self.log_dir = Path(log_dir)
        self.roster_file = roster_file
        self.manifests_dir = manifests_dir
        self.comms_dir = comms_dir
        self.max_retries = max_retries
        self.start_timeout = start_timeout
        self.roster: dict[str, dict[str, Any]] = {}
        self.messages: list[tuple[str, str, str]] = []
        self.launches: list[dict[str, Any]] = []

    def tick(self, now: datetime | None = None) -> None:
        """§5.1 without the reap/sweep of run records (not modelled): submitted pass →
        routing-failed retry pass → archive."""
        now = now or datetime.now(UTC)
        self.roster = load_roster(self.roster_file)
        for path, record in self._root_records():
            if record.get("status") == "submitted":
                self._route(path, record, now)
        for path, record in self._root_records():
            if record.get("status") == "routing-failed":
                self._retry(path, record, now)
        self._archive(now)

    def _root_records(self) -> list[tuple[Path, dict[str, Any]]]:
        return [(path, record) for path in yml_files(self.queue_dir)
                if (record := _try_load(path)) is not None]

    # -- §5.2
    def _route(self, path: Path, record: dict[str, Any], now: datetime) -> None:
        if _waiting_for_retry(record, now):
            return
        problem = _routing_problem(record)
        if problem:
            return self._fail(path, record, problem, now)
        if record["task_type"] == SELF_TERMINAL_TYPE:
            return self._deliver_notify(path, record, now)
        if record.get("target_agent") == AUTO_TARGET:
            agent = self._agent_for(record["task_type"])
            if agent is None:
                return self._fail(path, record, f"No agent found for task_type="
                                  f"{record['task_type']}", now)
            record["target_agent"] = agent
        self._inherit_workflow_mode(record)
        gate, reason = self._approval(record)
        if gate:
            return self._gate(path, record, reason, now)
        _set_td_status(record, "approved", f"Auto-approved: {reason}", now)
        write_td(path, record)
        kind = _launch_kind(record)
        if kind != "temporal":
            self._send("announcements", f"[auto-approved] {record.get('summary')}",
                       f"Agent: {record.get('target_agent')} | Risk: {record.get('risk_level')}"
                       f" | Mode: {record.get('workflow_mode', 'semi-auto')}")
        self._launch(path, record, now, kind, retry=False)
        return None

    def _retry(self, path: Path, record: dict[str, Any], now: datetime) -> None:
        """§5.5 retry pass: type and mode checked again, no approval or slot checks."""
        if _waiting_for_retry(record, now):
            return
        problem = _routing_problem(record)
        if problem:
            return self._fail(path, record, problem, now)
        kind = _launch_kind(record)
        if kind != "temporal":
            _set_td_status(record, "approved", RETRY_SUCCEEDED, now)
            write_td(path, record)
        self._launch(path, record, now, kind, retry=True)
        return None

    def _inherit_workflow_mode(self, record: dict[str, Any]) -> None:
        """§5.2 step 6."""
        payload = record.get("payload") or {}
        parent_id = payload.get("originating_task_id") if isinstance(payload, dict) else None
        if not parent_id:
            return
        for folder in (self.queue_dir, self.queue_dir / FOLDERS[ARCHIVE]):
            for candidate in yml_files(folder):
                parent = _try_load(candidate)
                if parent is not None and parent.get("id") == parent_id:
                    mode = parent.get("workflow_mode", "semi-auto")
                    record["workflow_mode"] = "auto" if mode == "manual-then-auto" else mode
                    return

    def _manifests(self) -> list[dict[str, Any]]:
        if self.manifests_dir is None:
            return []
        out = []
        for path in yml_files(Path(self.manifests_dir)):
            manifest = _try_load(path)
            if path.stem != "example-manifest" and manifest is not None:
                out.append(manifest)
        return out

    @staticmethod
    def _manifest_name(manifest: dict[str, Any]) -> Any:
        return manifest.get("agent_type") or manifest.get("name")

    def _agent_for(self, task_type: str) -> str | None:
        """§5.2 step 5: a capable manifest on `all`/`forge` hosts, else any capable one."""
        capable = [m for m in self._manifests() if task_type in (m.get("capabilities") or [])]
        here = [m for m in capable
                if {"all", "forge"} & set((m.get("scope") or {}).get("hosts") or [])]
        chosen = next(iter(here or capable), None)
        return None if chosen is None else self._manifest_name(chosen)

    def _approval(self, record: dict[str, Any]) -> tuple[bool, str]:
        """§5.2 step 7, first match wins: (gate, reason). Reason words are the stand-in's."""
        if record.get("bypass_approval"):
            return False, "bypass_approval"
        if record.get("requires_approval") is True:
            return True, "requires_approval=true"
        if record.get("requires_approval") is False:
            return False, "requires_approval=false"
        target = record.get("target_agent")
        manifest = next((m for m in self._manifests() if self._manifest_name(m) == target), {})
        permissions = manifest.get("interaction_permissions") or {}
        source = record.get("submitted_by") or record.get("source_agent")
        if source in (permissions.get("auto_approved") or []):
            return False, f"source {source} is auto-approved for {target}"
        if source in (permissions.get("needs_approval") or []):
            return True, f"source {source} needs approval for {target}"
        risk, ceiling = record.get("risk_level"), manifest.get("max_auto_risk", "low")
        if _risk_rank(risk) > _risk_rank(ceiling):
            return True, f"risk {risk} above max_auto_risk {ceiling}"
        return False, f"risk {risk} within max_auto_risk {ceiling}"

    def _gate(self, path: Path, record: dict[str, Any], reason: str, now: datetime) -> None:
        _set_td_status(record, "pending-approval", f"Needs approval: {reason}", now)
        write_td(path, record)
        self._send("approvals", f"[APPROVAL NEEDED] {record.get('summary')}",
                   f"Source: {record.get('source_agent')} | Type: {record.get('task_type')} | "
                   f"Risk: {record.get('risk_level')} | Agent: {record.get('target_agent')}\n"
                   f"`task-approve {record.get('id')}`")

    def _deliver_notify(self, path: Path, record: dict[str, Any], now: datetime) -> None:
        """§5.2 step 4 (history note and the room choice are the stand-in's)."""
        record["result"]["completed_by"] = f"{DISPATCHER} (notify)"
        record["result"]["completed_at"] = now.isoformat()
        _set_td_status(record, "completed", "Notification delivered", now)
        write_td(path, record)
        target = record.get("target_agent")
        room = target if target in self.roster else "alerts"
        self._send(room, f"[notify] {record.get('summary')}",
                   f"From: {record.get('source_agent')}\nNo action required …")

    # -- §5.3 / §5.4 launches
    def _launch(self, path: Path, record: dict[str, Any], now: datetime, kind: str,
                retry: bool) -> None:
        agent, task_id = record.get("target_agent"), record.get("id")
        if kind == "temporal":
            return self._start_temporal(path, record, now, retry)
        if kind == "operator-pickup":
            self._send(str(agent), f"[task ready] {record.get('summary')}",
                       f"Task ID: {task_id}\nFrom: {record.get('source_agent')} | Risk: "
                       f"{record.get('risk_level')}\nResume: Check task queue (id={task_id}) "
                       "and run shared-build-review.")
            return None
        self.launches.append({"kind": kind, "agent": agent, "task_id": task_id,
                              "workflow_mode": record.get("workflow_mode", "semi-auto"),
                              "prompt": HEADLESS_PROMPT.format(id=task_id),
                              "roster_entry": self.roster.get(str(agent))})
        return None

    def _start_temporal(self, path: Path, record: dict[str, Any], now: datetime,
                        retry: bool) -> None:
        payload = record["payload"]
        workflow_type = payload.get("workflow_type") or DEFAULT_WORKFLOW_TYPE
        if workflow_type not in TEMPORAL_WORKFLOW_TYPES:
            allowed = "{" + ", ".join(repr(t) for t in sorted(TEMPORAL_WORKFLOW_TYPES)) + "}"
            return self._fail(path, record, f"Unknown workflow_type: {workflow_type!r} "
                              f"(allowed: {allowed})", now)
        plan = payload.get("plan_name")
        if not isinstance(plan, str) or not _PLAN_NAME.fullmatch(plan):
            return self._fail(path, record,
                              f"Invalid plan_name for workflow submission: {plan!r}", now)
        id8 = _workflow_id8(record.get("id"))
        dropped = ("workflow_type", "plan_name", "task_token")
        start_input = {"plan_name": plan,
                       **{key: value for key, value in payload.items() if key not in dropped}}
        argv = [str(self.start_script), workflow_type, f"{plan}-{id8}", json.dumps(start_input)]
        launch = {"kind": "temporal", "agent": record.get("target_agent"),
                  "task_id": record.get("id"), "argv": argv}
        self.launches.append(launch)
        with (self.log_dir / f"temporal-start-{id8}.log").open("ab") as out:
            try:
                launch["returncode"] = subprocess.run(
                    argv, stdout=out, stderr=subprocess.STDOUT, timeout=self.start_timeout,
                    check=False).returncode
            except subprocess.TimeoutExpired:
                launch["timed_out"] = True
                return self._fail(path, record, f"{START_SCRIPT_NAME} timed out "
                                  f"({self.start_timeout:g}s)", now)
        if launch["returncode"] != 0:
            return self._fail(path, record,
                              f"{START_SCRIPT_NAME} exited {launch['returncode']}", now)
        note = TEMPORAL_SUBMITTED + (" (routing-failed retry)" if retry else "")
        _set_td_status(record, "in-progress", note, now)
        write_td(path, record)
        if not retry:
            self._send("announcements", f"[temporal] {record.get('summary')}",
                       f"Workflow: {workflow_type} | plan: {plan}")
        return None

    # -- §5.5
    def fail_routing(self, task_id: str, reason: str, now: datetime | None = None) -> None:
        """One routing failure of the root task `task_id` with `reason`, through the same
        path a failed launch takes (§5.5): `routing-failed` while retries are left, else
        the dead letter. For tests of a failure no real launch here produces."""
        for path, record in self._root_records():
            if record.get("id") == task_id:
                self._fail(path, record, reason, now or datetime.now(UTC))
                return
        raise LookupError(f"no task {task_id} in {self.queue_dir}")

    def _fail(self, path: Path, record: dict[str, Any], reason: str, now: datetime) -> None:
        policy = record.setdefault("retry_policy", {})
        count = policy.get("retry_count", 0)
        most = policy.setdefault("max_retries", self.max_retries)
        policy["last_failure_reason"] = reason
        record["history"].append(_td_entry(now, "routing-failed", reason))
        if count < most:
            policy["retry_count"] = count + 1
            policy["next_retry_at"] = (now + timedelta(seconds=300 * 2**count)).isoformat()
            record["status"] = "routing-failed"
            write_td(path, record)
            return
        record["status"] = "failed"
        record["failed_reason"] = {"timestamp": now.isoformat(), "reason": reason,
                                   "retry_count": count}
        dead = self.queue_dir / FOLDERS[DEAD_LETTERS]
        dead.mkdir(exist_ok=True)
        write_td(dead / path.name, record)
        path.unlink()
        self._send("alerts", f"[dead-letter] {record.get('summary')}",
                   f"Task {record.get('id')} failed after max retries.\nReason: {reason}")

    # -- §1.4
    def _archive(self, now: datetime) -> None:
        archive = self.queue_dir / FOLDERS[ARCHIVE]
        for path, record in self._root_records():
            if record.get("status") not in TERMINAL_STATUSES:
                continue
            created = _created_for_archive(record)
            ttl = record.get("ttl_days", DEFAULT_TTL_DAYS)
            if created is not None and (now - created).days >= ttl:
                archive.mkdir(exist_ok=True)
                os.replace(path, archive / path.name)

    def _send(self, room: str, title: str, body: str) -> None:
        self.messages.append((room, title, body))


# --- validate_task ----------------------------------------------------------------------
def _problem_if(condition: bool, text: str) -> list[str]:
    return [text] if condition else []


def _non_empty_str(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _aware_iso(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def _check_identity(record: dict[str, Any]) -> list[str]:
    task_id = record.get("id")
    return (
        _problem_if(not (isinstance(task_id, str) and _UUID4_LOWER.fullmatch(task_id)),
                    f"id {task_id!r} is not a lowercase UUID4 (§9.10)")
        + [f"{key} must be a non-empty string (§1.2)"
           for key in ("source_agent", "target_agent", "summary")
           if not _non_empty_str(record.get(key))])


def _check_vocabulary(record: dict[str, Any]) -> list[str]:
    task_type, status = record.get("task_type"), record.get("status")
    mode = record.get("workflow_mode", "semi-auto")
    return (
        _problem_if(task_type not in (*TASK_TYPES, DISPATCHER_ONLY_TYPE),
                    f"task_type {task_type!r} is not one of the tools' task types (§2, §9.1)")
        + _problem_if(task_type == SELF_TERMINAL_TYPE and status != "completed",
                      "notify is self-terminal: never a task to work on (§9.1)")
        + _problem_if(status not in STATUSES, f"status {status!r} is not a tools' status (§2)")
        + _problem_if(record.get("risk_level") not in RISK_LEVELS,
                      f"risk_level {record.get('risk_level')!r} is not one of {list(RISK_LEVELS)}")
        + _problem_if(mode not in WORKFLOW_MODES,
                      f"workflow_mode {mode!r} is not one of {list(WORKFLOW_MODES)}")
        + _problem_if("requires_approval" in record
                      and not isinstance(record["requires_approval"], bool),
                      "requires_approval must be a boolean"))


def _check_created(record: dict[str, Any]) -> list[str]:
    created = record.get("created")
    aware = isinstance(created, datetime) and created.utcoffset() is not None
    return _problem_if(not aware, f"created must load as a timezone-aware timestamp (unquoted, "
                       f"with offset), got {type(created).__name__} {created!r} (§1.4, §9.6)")


def _check_shapes(record: dict[str, Any]) -> list[str]:
    policy = record.get("retry_policy")
    problems = _problem_if(not isinstance(policy, dict), "retry_policy must be a mapping (§9.7)")
    if isinstance(policy, dict):
        next_retry, count = policy.get("next_retry_at"), policy.get("retry_count")
        problems += _problem_if(
            next_retry is not None and not _aware_iso(next_retry),
            f"retry_policy.next_retry_at must be null or a quoted ISO string with offset, got "
            f"{next_retry!r} (§5.2)")
        problems += _problem_if(isinstance(count, bool) or not isinstance(count, int),
                                "retry_policy.retry_count must be an integer (§9.7)")
    for key, kind, name in (("payload", dict, "mapping"), ("result", dict, "mapping"),
                            ("history", list, "list")):
        problems += _problem_if(not isinstance(record.get(key), kind),
                                f"{key} must be a {name} (§9.7)")
    return problems + _problem_if(not _positive_int(record.get("ttl_days")),
                                  f"ttl_days must be a positive integer, got "
                                  f"{record.get('ttl_days')!r} (§9.7)")


def _check_payload(record: dict[str, Any]) -> list[str]:
    payload = record.get("payload")
    if not isinstance(payload, dict):
        return []
    refs, parent = payload.get("context_refs", []), payload.get("originating_task_id")
    return (
        _problem_if(not isinstance(payload.get("description"), str),
                    "payload.description must hold the human text (§9.9)")
        + _problem_if(payload.get("priority") not in PRIORITIES,
                      f"payload.priority {payload.get('priority')!r} is not one of "
                      f"{list(PRIORITIES)} (§9.9)")
        + _problem_if(not isinstance(refs, list)
                      or not all(isinstance(r, str) and r.startswith("/") for r in refs),
                      "payload.context_refs must be a list of absolute paths (§9.9)")
        + _problem_if(parent is not None and not _is_uuid(parent),
                      f"payload.originating_task_id {parent!r} is not a UUID (§1.2)"))


def _check_history(record: dict[str, Any]) -> list[str]:
    history = record.get("history")
    if not isinstance(history, list):
        return []
    return [f"history[{n}] must be a mapping whose status is a tools' status (§2)"
            for n, entry in enumerate(history)
            if not isinstance(entry, dict) or entry.get("status") not in STATUSES]


def _check_workflow(record: dict[str, Any]) -> list[str]:
    """§9.12: what a `workflow` task needs to be launched."""
    payload = record.get("payload")
    if record.get("task_type") != DISPATCHER_ONLY_TYPE or not isinstance(payload, dict):
        return []
    plan = payload.get("plan_name")
    try:
        json.dumps(payload)
        encodable = True
    except (TypeError, ValueError):
        encodable = False
    return (
        _problem_if(record.get("target_agent") == AUTO_TARGET,
                    "a workflow task needs an explicit target_agent, not auto")
        + _problem_if(record.get("requires_approval") is not False,
                      "a workflow task needs requires_approval: false written explicitly")
        + _problem_if(not (isinstance(plan, str) and _PLAN_NAME.fullmatch(plan)),
                      f"payload.plan_name {plan!r} is not valid for workflow submission")
        + _problem_if(payload.get("workflow_type", DEFAULT_WORKFLOW_TYPE)
                      not in TEMPORAL_WORKFLOW_TYPES,
                      f"payload.workflow_type {payload.get('workflow_type')!r} is not one of "
                      f"{list(TEMPORAL_WORKFLOW_TYPES)}")
        + _problem_if(not encodable, "payload values must be JSON-encodable (§5.4)"))


def _check_filename(record: dict[str, Any], filename: str) -> list[str]:
    match = _FILE_NAME.fullmatch(filename)
    task_id = record.get("id")
    ok = match is not None and isinstance(task_id, str) and match["id8"] == task_id[:8]
    return _problem_if(not ok, f"file name {filename!r} is not YYYYMMDD-HHMMSS-<id8>.yml for "
                       f"id {task_id!r} (§1.1, §9.10)")


def validate_task(record: Any, filename: str | None = None) -> list[str]:
    """Every problem `record` (as yaml.safe_load gave it) has for the platform's tools;
    `filename`: also check the file name rule. Empty: the tools accept it."""
    if not isinstance(record, dict):
        return [f"a task file must be a mapping, got {type(record).__name__}"]
    checks = (_check_identity, _check_vocabulary, _check_created, _check_shapes,
              _check_payload, _check_history, _check_workflow)
    problems = [problem for check in checks for problem in check(record)]
    if filename is not None:
        problems += _check_filename(record, filename)
    return problems
