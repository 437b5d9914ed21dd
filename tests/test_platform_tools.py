"""The platform tools stand-in (standins/task_tools.py) against PROTOCOL.md's facts: each
transition row and refusal text, the rewrite style (anchors, modes), list order / TTL /
limit, and one dispatcher tick's rows. Expected texts are written out here from PROTOCOL,
not taken from the module. No Temporal, no network: files in tmp_path only."""

from __future__ import annotations

import json
import os
import stat
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from standins.task_tools import (
    Dispatcher,
    RosterError,
    TaskTools,
    dump_yaml,
    http_status,
    load_yaml,
    task_file_name,
    validate_task,
    write_td,
)

NON_TERMINAL = ["submitted", "approved", "pending-approval", "in-progress", "parked",
                "routing-failed"]
ALL_STATUSES = "['approved', 'cancelled', 'completed', 'failed', 'in-progress', 'parked', " \
               "'pending-approval', 'routing-failed', 'submitted']"
STANDARD_HELP = ("Standard targets: approved (from submitted/pending-approval), cancelled or "
                 "parked (from any non-terminal). For other non-terminal moves pass "
                 "allow_override=True.")
UPDATE_HINT = (" This transition is available via update_task (agent-facing) — set_task_status "
               "is operator-only and cannot reach terminal statuses via override.")
DEAD_LETTERED = ("task is dead-lettered and cannot be mutated in place — requeue it first "
                 "(operator only, POST /tasks/<id>/requeue)")
# §3.1, written out from PROTOCOL: target -> statuses update_task accepts it from.
AGENT_MOVES = {"in-progress": {"approved"}, "completed": {"in-progress"},
               "failed": {"submitted", "pending-approval", "approved", "in-progress"}}
AGENT_FROM_TEXT = {"in-progress": "['approved']", "completed": "['in-progress']",
                   "failed": "['approved', 'in-progress', 'pending-approval', 'submitted']"}


@pytest.fixture
def queue(tmp_path: Path) -> Path:
    folder = tmp_path / "queue"
    folder.mkdir()
    return folder


@pytest.fixture
def tools(queue: Path) -> TaskTools:
    return TaskTools(queue, umask=0o022)


def submit(tools: TaskTools, **fields: Any) -> tuple[str, Path]:
    args = {"source_agent": "developer", "target_agent": "sysadmin", "task_type": "build",
            "summary": "Build the thing", "description": "Build it."} | fields
    result = tools.submit_task(**args)
    assert result["ok"], result
    return result["task_id"], tools.queue_dir / result["filename"]


def force(path: Path, **fields: Any) -> dict[str, Any]:
    """Set fields of a task file as a producer writing it would (no tool involved)."""
    record = load_yaml(path)
    record.update(fields)
    path.write_text(dump_yaml(record), encoding="utf-8")
    return record


def record_file(folder: Path, **fields: Any) -> tuple[str, Path]:
    """A task file in the shape submit_task writes, with `fields` replaced."""
    task_id = str(uuid.uuid4())
    created = fields.get("created", datetime.now(UTC))
    record = {"id": task_id, "created": created, "source_agent": "developer",
              "target_agent": "sysadmin", "task_type": "build", "risk_level": "low",
              "requires_approval": False, "workflow_mode": "semi-auto", "status": "submitted",
              "summary": "A task", "ttl_days": 30,
              "payload": {"description": "d", "context_refs": [], "priority": "normal"},
              "result": {"output": None, "completed_by": None, "completed_at": None},
              "history": [{"timestamp": created, "status": "submitted", "actor": "developer",
                           "note": ""}],
              "retry_policy": {"next_retry_at": None, "retry_count": 0}} | fields
    folder.mkdir(parents=True, exist_ok=True)
    name = task_file_name(created if isinstance(created, datetime) else datetime.now(UTC),
                          task_id)
    path = folder / name
    path.write_text(dump_yaml(record), encoding="utf-8")
    return task_id, path


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- submit --------------------------------------------------------------------------------
def test_submit_writes_the_record_in_key_order_with_an_anchor(tools: TaskTools) -> None:
    task_id, path = submit(tools, context_refs=["/srv/plan.md"], priority="high")
    record = load_yaml(path)
    assert list(record) == ["id", "created", "source_agent", "target_agent", "task_type",
                            "risk_level", "requires_approval", "workflow_mode", "status",
                            "summary", "ttl_days", "payload", "result", "history",
                            "retry_policy"]
    assert record["status"] == "submitted"
    assert record["payload"] == {"description": "Build it.", "context_refs": ["/srv/plan.md"],
                                 "priority": "high"}
    assert record["history"] == [{"timestamp": record["created"], "status": "submitted",
                                  "actor": "developer",
                                  "note": "Task submitted via task-queue-mcp"}]
    assert record["created"].utcoffset() == timedelta(0)
    text = path.read_text()
    assert "created: &id001 " in text
    assert "- timestamp: *id001\n" in text
    assert path.name == f"{record['created']:%Y%m%d-%H%M%S}-{task_id[:8]}.yml"
    assert validate_task(record, path.name) == []


def test_submit_notify_is_self_terminal(tools: TaskTools) -> None:
    result = tools.submit_task("developer", "sysadmin", "notify", "FYI", "text",
                               requires_approval=True)
    assert result["status"] == "completed"
    assert result["self_terminal"] is True
    record = load_yaml(tools.queue_dir / result["filename"])
    assert record["requires_approval"] is False
    assert record["status"] == "completed"
    assert record["result"] == {"output": "text", "completed_by": "developer (notify)",
                                "completed_at": record["created"]}
    assert record["history"][1]["note"] == ("Notification delivered — no session required"
                                            " (requires_approval=True ignored: notify is "
                                            "self-terminal)")


@pytest.mark.parametrize(("fields", "error"), [
    ({"source_agent": ""}, "source_agent must not be empty"),
    ({"target_agent": " "}, "target_agent must not be empty"),
    ({"task_type": "build_prefab"}, "Invalid task_type: 'build_prefab'. Must be one of: "
     "['audit', 'build', 'deploy', 'docs', 'fix', 'notify', 'research', 'review', "
     "'ticket_audit', 'ticket_audit_complete']"),
    ({"task_type": "workflow"}, "Invalid task_type: 'workflow'. Must be one of: "
     "['audit', 'build', 'deploy', 'docs', 'fix', 'notify', 'research', 'review', "
     "'ticket_audit', 'ticket_audit_complete']"),
    ({"summary": ""}, "summary must not be empty"),
    ({"ttl_days": 0}, "Invalid ttl_days: 0. Must be a positive integer."),
    ({"context_refs": ["rel"]},
     "Invalid context_ref: 'rel' — must be an absolute path starting with '/'"),
    ({"originating_task_id": "x"}, "Invalid originating_task_id: 'x' — must be a UUID"),
])
def test_submit_refusals(tools: TaskTools, fields: dict[str, Any], error: str) -> None:
    args = {"source_agent": "developer", "target_agent": "sysadmin", "task_type": "build",
            "summary": "s", "description": "d"} | fields
    assert tools.submit_task(**args) == {"ok": False, "error": error}
    assert list(tools.queue_dir.iterdir()) == []


def test_submit_with_a_return_shape_auto_closes_an_approved_parent(tools: TaskTools) -> None:
    parent_id, parent_path = submit(tools, source_agent="developer", target_agent="research")
    assert tools.approve(parent_id)["ok"]
    forward = tools.submit_task("research", "writer", "docs", "Forward", "d",
                                originating_task_id=parent_id)
    assert "auto_closed_task_id" not in forward
    back = tools.submit_task("research", "developer", "review", "Answer", "d",
                             originating_task_id=parent_id)
    assert back["auto_closed_task_id"] == parent_id
    parent = load_yaml(parent_path)
    note = f"auto-closed: return task {back['task_id']} submitted — Answer"
    assert [(h["status"], h["actor"], h["note"]) for h in parent["history"][-2:]] == [
        ("in-progress", "research", note), ("completed", "research", note)]
    assert parent["status"] == "completed"
    assert parent["result"]["completed_by"] == "research"


# --- §3.1 update_task ----------------------------------------------------------------------
@pytest.mark.parametrize("current", NON_TERMINAL)
@pytest.mark.parametrize("target", ["in-progress", "completed", "failed"])
def test_update_task_rows(tools: TaskTools, current: str, target: str) -> None:
    task_id, path = submit(tools)
    force(path, status=current)
    result = tools.update_task(task_id, target, "sysadmin", "why", output="out")
    record = load_yaml(path)
    if current in AGENT_MOVES[target]:
        assert result["ok"], result
        assert record["status"] == target
        entry = record["history"][-1]
        assert entry == {"timestamp": entry["timestamp"], "status": target,
                         "actor": "sysadmin", "note": "why"}
        if target != "in-progress":
            assert record["result"] == {"output": "out", "completed_by": "sysadmin",
                                        "completed_at": entry["timestamp"]}
            assert "completed_at: &id002 " in path.read_text()
            assert "- timestamp: *id002\n" in path.read_text()
    else:
        assert result == {"ok": False, "error": f"Invalid transition: '{current}' → "
                          f"'{target}'. Allowed from: {AGENT_FROM_TEXT[target]}"}
        assert record["status"] == current


def test_update_task_refusals_in_order(tools: TaskTools, queue: Path) -> None:
    task_id, path = submit(tools)
    missing = str(uuid.uuid4())
    cases = [
        (("nope", "failed", "sysadmin"), {}, "invalid task_id format"),
        ((task_id, "failed", "sysadmin"), {"on_behalf_of": "x"},
         "on_behalf_of is reserved for the 'operator' actor; 'sysadmin' may not act for "
         "another agent."),
        ((task_id, "approved", "sysadmin"), {},
         "Invalid status: 'approved'. update_task accepts: ['completed', 'failed', "
         "'in-progress']"),
        ((missing, "failed", "sysadmin"), {}, "not found"),
        ((task_id, "failed", "writer"), {},
         "actor 'writer' is not the target agent for this task ('sysadmin') and may not "
         "update it."),
        ((task_id, "failed", "operator"), {"on_behalf_of": "writer"},
         "on_behalf_of 'writer' is not the target agent for this task ('sysadmin')."),
    ]
    for args, kwargs, error in cases:
        assert tools.update_task(*args, **kwargs) == {"ok": False, "error": error}
    done = tools.update_task(task_id, "failed", "operator", "swept", on_behalf_of="sysadmin")
    assert done["ok"]
    assert load_yaml(path)["history"][-1]["on_behalf_of"] == "sysadmin"
    assert tools.update_task(task_id, "failed", "sysadmin") == {
        "ok": False, "error": "Task is in terminal status 'failed' and cannot be updated"}
    (queue / "archive").mkdir()
    path.rename(queue / "archive" / path.name)
    assert tools.update_task(task_id, "failed", "sysadmin")["error"] == (
        "task is archived and cannot be updated")
    assert tools.get_task(task_id)["task"]["queue_location"] == "archive"


# --- §3.2 set_task_status and friends -------------------------------------------------------
@pytest.mark.parametrize("current", NON_TERMINAL)
@pytest.mark.parametrize("target", ["approved", "cancelled", "parked"])
def test_standard_operator_rows(tools: TaskTools, current: str, target: str) -> None:
    task_id, path = submit(tools)
    force(path, status=current)
    result = tools.set_task_status(task_id, target, "operator")
    allowed = {"approved": {"submitted", "pending-approval"},
               "cancelled": set(NON_TERMINAL),
               "parked": set(NON_TERMINAL) - {"parked"}}[target]
    record = load_yaml(path)
    if current in allowed:
        assert result["ok"], result
        assert record["status"] == target
        assert "override" not in record["history"][-1]
        assert record.get("parked_from") == (current if target == "parked" else None)
        if target == "cancelled":
            assert record["result"]["completed_by"] == "operator"
            assert "completed_at: &id002 " in path.read_text()
    else:
        assert result == {"ok": False, "error": f"Invalid operator transition: '{current}' "
                          f"→ '{target}'. {STANDARD_HELP}"}


def test_override_moves_and_their_refusals(tools: TaskTools) -> None:
    task_id, path = submit(tools)
    force(path, status="routing-failed")
    assert tools.set_task_status(task_id, "submitted", "operator", allow_override=True) == {
        "ok": False,
        "error": "an override transition requires a non-empty note for the audit trail"}
    assert tools.status(task_id, "submitted", "retry by hand", allow_override=True)["ok"]
    entry = load_yaml(path)["history"][-1]
    assert (entry["actor"], entry["channel"], entry["override"]) == ("operator", "cloudcli",
                                                                      True)
    force(path, status="in-progress")
    for target in ("completed", "failed"):
        result = tools.set_task_status(task_id, target, "operator", "n", allow_override=True)
        assert result["error"] == (f"Invalid operator transition: 'in-progress' → '{target}'. "
                                   f"{STANDARD_HELP}{UPDATE_HINT}")
    force(path, status="approved")
    assert tools.set_task_status(task_id, "in-progress", "operator")["error"] == (
        f"Invalid operator transition: 'approved' → 'in-progress'. {STANDARD_HELP}{UPDATE_HINT}")
    force(path, status="submitted")
    assert tools.set_task_status(task_id, "completed", "operator", "n",
                                 allow_override=True)["error"] == (
        f"Invalid operator transition: 'submitted' → 'completed'. {STANDARD_HELP}")


def test_out_of_vocabulary_status_only_repairs(tools: TaskTools) -> None:
    task_id, path = submit(tools)
    force(path, status="input-required")
    refused = f"Invalid operator transition: 'input-required' → '%s'. {STANDARD_HELP}"
    assert tools.approve(task_id)["error"] == refused % "approved"
    assert tools.cancel(task_id)["error"] == refused % "cancelled"
    assert tools.park_task(task_id, "operator")["error"] == refused % "parked"
    assert tools.status(task_id, "rejected", "no", allow_override=True)["error"] == (
        f"Invalid status: 'rejected'. Must be one of: {ALL_STATUSES}")
    assert tools.status(task_id, "cancelled", "repair", allow_override=True)["ok"]
    record = load_yaml(path)
    assert record["history"][-1] | {"timestamp": None} == {
        "timestamp": None, "status": "cancelled", "actor": "operator", "note": "repair",
        "channel": "cloudcli", "override": True, "repaired_from": "input-required"}
    assert record["result"]["completed_by"] == "operator"
    assert "completed_at: &id002 " in path.read_text()
    assert tools.approve(task_id)["error"] == (
        "Task is in terminal status 'cancelled' and cannot be updated")


def test_operator_refusals(tools: TaskTools) -> None:
    task_id, _ = submit(tools)
    assert tools.set_task_status(task_id, "approved", "")["error"] == "actor must not be empty"
    for call, tool in ((tools.set_task_status, "set_task_status"),
                       (tools.cancel_task, "cancel_task"),
                       (tools.requeue_dead_letter, "requeue_dead_letter")):
        args = (task_id, "approved", "developer") if tool == "set_task_status" else (
            task_id, "developer")
        assert call(*args)["error"] == (
            f"{tool} is operator-only and is not reachable with an agent identity "
            "('developer'). Use the HTTP control routes, which are the operator surface.")
    assert tools.get_task("abc") == {"ok": False, "error": "invalid task_id format"}
    missing = tools.approve(str(uuid.uuid4()))
    assert missing == {"ok": False, "error": "not found"}
    assert http_status(missing) == 404


def test_cancel_park_unpark(tools: TaskTools) -> None:
    task_id, path = submit(tools)
    force(path, status="pending-approval")
    assert tools.park_task(task_id, "writer")["error"] == (
        "actor 'writer' is not the target agent for this task ('sysadmin') and may not park "
        "or unpark it.")
    assert tools.unpark_task(task_id, "operator")["error"] == (
        "task is not parked (status: 'pending-approval')")
    assert tools.park_task(task_id, "sysadmin")["ok"]
    record = load_yaml(path)
    assert (record["parked_from"], record["history"][-1]["note"]) == ("pending-approval",
                                                                      "Parked by operator")
    assert tools.unpark_task(task_id, "operator")["ok"]
    record = load_yaml(path)
    assert record["status"] == "pending-approval"
    assert "parked_from" not in record
    assert record["history"][-1]["note"] == "Unparked by operator (→ pending-approval)"
    assert record["history"][-1]["override"] is True
    force(path, status="parked")
    assert tools.unpark_task(task_id, "operator")["error"] == (
        "task has no recorded parked_from status — pass an explicit status to unpark it. "
        f"Valid statuses: {ALL_STATUSES}")
    assert tools.unpark_task(task_id, "operator", status="submitted")["ok"]
    assert tools.cancel_task(task_id, "operator")["ok"]
    assert load_yaml(path)["history"][-1]["note"] == "Cancelled by operator"


def test_dead_letters_are_read_only_until_requeued(tools: TaskTools, queue: Path) -> None:
    created = datetime.now(UTC) - timedelta(hours=1)
    task_id, path = record_file(queue / "dead-letters", status="failed", created=created,
                                failed_reason={"timestamp": "x", "reason": "boom",
                                               "retry_count": 3})
    for result in (tools.update_task(task_id, "failed", "sysadmin"), tools.approve(task_id),
                   tools.cancel(task_id), tools.park(task_id), tools.unpark(task_id)):
        assert result == {"ok": False, "error": DEAD_LETTERED}
    assert tools.get_task(task_id)["task"]["queue_location"] == "dead-letters"
    (queue / path.name).write_text("id: other\n")
    assert tools.requeue(task_id)["error"] == (
        f"cannot requeue: {path.name} already exists in the queue root. Resolve the collision "
        "by hand.")
    (queue / path.name).unlink()
    assert tools.requeue(task_id, channel="matrix-bot")["ok"]
    record = load_yaml(queue / path.name)
    assert not path.exists()
    assert "failed_reason" not in record
    assert record["status"] == "submitted"
    assert record["created"] == created
    assert record["retry_policy"] == {"next_retry_at": None, "retry_count": 0}
    assert record["history"][-1] | {"timestamp": None} == {
        "timestamp": None, "status": "submitted", "actor": "operator",
        "note": "Requeued from dead-letters", "channel": "matrix-bot", "action": "requeue",
        "requeued_from": "dead-letters", "cleared_failed_reason": "boom"}
    assert mode_of(queue / path.name) == 0o644
    assert tools.requeue(task_id) == {"ok": False, "error": "not found"}


# --- §1.3 modes ----------------------------------------------------------------------------
def test_tq_rewrite_takes_the_umask_mode_td_rewrite_stays_private(tmp_path: Path,
                                                                   tools: TaskTools) -> None:
    task_id, path = submit(tools, requires_approval=True)
    path.chmod(0o600)
    assert tools.approve(task_id)["ok"]
    assert mode_of(path) == 0o644
    assert (tools.queue_dir / ".locks" / f"{task_id}.lock").exists()
    _, other = submit(tools, requires_approval=True)
    other.chmod(0o600)
    _, loose = submit(tools, requires_approval=True)
    assert mode_of(loose) == 0o644
    dispatcher(tmp_path).tick()
    for rewritten in (other, loose):
        assert load_yaml(rewritten)["status"] == "pending-approval"
        assert mode_of(rewritten) == 0o600
        assert "timestamp: '" in rewritten.read_text()  # [TD] writes quoted ISO strings
    assert sorted(p.name for p in tools.queue_dir.iterdir()) == sorted(
        [".locks", path.name, other.name, loose.name])


# --- §4.1 list_tasks -----------------------------------------------------------------------
def test_list_order_ttl_and_limit(tools: TaskTools, queue: Path) -> None:
    now = datetime.now(UTC)
    old_done, _ = record_file(queue, status="completed", created=now - timedelta(days=31))
    old_open, _ = record_file(queue, status="pending-approval", created=now - timedelta(days=99))
    newer, _ = record_file(queue, created=now - timedelta(hours=1))
    newest, _ = record_file(queue, created=now)
    quoted, _ = record_file(queue, created="2099-01-01T00:00:00Z")
    dead, _ = record_file(queue / "dead-letters", status="failed",
                          created=now - timedelta(days=400))
    listed = tools.list_tasks()
    assert [t["id"] for t in listed] == [newest, newer, old_open, quoted]
    assert {t["queue_location"] for t in listed} == {"queue"}
    assert [t["id"] for t in tools.list_tasks(include_dead_letters=True, limit=2)] == [
        dead, newest]
    assert len(tools.list_tasks(limit=0)) == 1
    assert [t["id"] for t in tools.list_tasks(status="pending-approval, submitted",
                                              target_agent="sysadmin")] == [
        newest, newer, old_open, quoted]
    assert old_done not in [t["id"] for t in tools.list_tasks(limit=500)]
    with pytest.raises(ValueError, match="Invalid status filter") as caught:
        tools.list_tasks(status="approved,input-required")
    assert str(caught.value) == (
        f"Invalid status filter: ['input-required']. Must be one of: {ALL_STATUSES} "
        "(single value or comma-separated).")
    record_file(queue, created=datetime(2026, 1, 1), target_agent="nobody")  # naive
    with pytest.raises(TypeError, match="offset-naive and offset-aware"):
        tools.list_tasks(target_agent="sysadmin")


# --- §5 dispatcher ---------------------------------------------------------------------------
def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(0o755)
    return path


def recording_script(tmp_path: Path, exit_code: int = 0) -> Path:
    """A start script that records its argv, writes to stdout and stderr, exits `exit_code`."""
    out = tmp_path / "argv.json"
    return script(tmp_path, f"start-{exit_code}.py", f"#!{sys.executable}\n"
                  "import json, sys\n"
                  f"open({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
                  "print('to stdout'); print('to stderr', file=sys.stderr)\n"
                  f"sys.exit({exit_code})\n")


def dispatcher(tmp_path: Path, **kwargs: Any) -> Dispatcher:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    kwargs.setdefault("start_script", recording_script(tmp_path))
    return Dispatcher(tmp_path / "queue", log_dir=logs, **kwargs)


def test_unknown_task_type_is_retried_then_dead_lettered(tmp_path: Path, queue: Path) -> None:
    task_id, path = record_file(queue, task_type="build_prefab", summary="Prefab web")
    reason = ("Unknown task_type 'build_prefab' — not in task-queue-mcp's vocabulary (['audit', "
              "'build', 'deploy', 'docs', 'fix', 'notify', 'research', 'review', "
              "'ticket_audit', 'ticket_audit_complete', 'workflow']). Queue file written "
              "outside submit_task?")
    tick = dispatcher(tmp_path)
    now = datetime.now(UTC)
    for count, wait in enumerate((300, 600, 1200), start=1):
        tick.tick(now)
        record = load_yaml(path)
        assert record["status"] == "routing-failed"
        assert record["retry_policy"] == {
            "next_retry_at": (now + timedelta(seconds=wait)).isoformat(), "retry_count": count,
            "max_retries": 3, "last_failure_reason": reason}
        assert record["history"][-1] == {"timestamp": now.isoformat(),
                                         "status": "routing-failed", "actor": "dispatcher",
                                         "note": reason}
        assert "next_retry_at: '" in path.read_text()
        tick.tick(now + timedelta(seconds=wait - 1))  # not yet due: untouched
        assert len(load_yaml(path)["history"]) == count + 1
        now += timedelta(seconds=wait + 1)
    assert tick.messages == []
    tick.tick(now)
    dead = queue / "dead-letters" / path.name
    assert not path.exists()
    assert mode_of(dead) == 0o600
    record = load_yaml(dead)
    assert record["status"] == "failed"
    assert record["failed_reason"] == {"timestamp": now.isoformat(), "reason": reason,
                                       "retry_count": 3}
    assert [h["status"] for h in record["history"]] == ["submitted"] + ["routing-failed"] * 4
    assert tick.messages == [("alerts", "[dead-letter] Prefab web",
                              f"Task {task_id} failed after max retries.\nReason: {reason}")]


def test_gate_sets_pending_approval(tmp_path: Path, tools: TaskTools) -> None:
    task_id, path = submit(tools, requires_approval=True, summary="Deploy web")
    tick = dispatcher(tmp_path)
    tick.tick()
    record = load_yaml(path)
    assert record["status"] == "pending-approval"
    assert record["history"][-1]["note"].startswith("Needs approval: ")
    assert tick.launches == []
    assert tick.messages == [("approvals", "[APPROVAL NEEDED] Deploy web",
                              "Source: developer | Type: build | Risk: low | Agent: sysadmin\n"
                              f"`task-approve {task_id}`")]
    tick.tick()  # approved by nobody: nothing more happens
    assert len(load_yaml(path)["history"]) == 2


def test_no_approval_needed_approves_then_launches(tmp_path: Path, tools: TaskTools) -> None:
    auto_id, auto_path = submit(tools, workflow_mode="auto")
    pickup_id, pickup_path = submit(tools, summary="Pick me", risk_level="high")
    tick = dispatcher(tmp_path)
    tick.tick()
    for path in (auto_path, pickup_path):
        entry = load_yaml(path)["history"][-1]
        assert load_yaml(path)["status"] == "approved"
        assert entry["actor"] == "dispatcher"
        assert entry["note"] == "Auto-approved: requires_approval=false"
    assert [(lc["kind"], lc["agent"], lc["task_id"]) for lc in tick.launches] == [
        ("headless", "sysadmin", auto_id)]
    assert ("sysadmin", "[task ready] Pick me",
            f"Task ID: {pickup_id}\nFrom: developer | Risk: high\n"
            f"Resume: Check task queue (id={pickup_id}) and run shared-build-review.") in (
        tick.messages)


def test_workflow_mode_is_copied_from_the_parent(tmp_path: Path, queue: Path,
                                                  tools: TaskTools) -> None:
    parent_id, _ = record_file(queue / "archive", status="completed",
                               workflow_mode="manual-then-auto")
    _child_id, child = submit(tools, originating_task_id=parent_id)
    tick = dispatcher(tmp_path)
    tick.tick()
    assert load_yaml(child)["workflow_mode"] == "auto"
    assert [lc["kind"] for lc in tick.launches] == ["headless"]


def workflow_task(queue: Path, **payload: Any) -> tuple[str, Path]:
    return record_file(queue, task_type="workflow", target_agent="temporal",
                       summary="Build web", payload={
                           "plan_name": "web", "description": "d", "task_token": "secret",
                           "workflow_type": "BuildPlanWorkflow", "extra": [1, 2]} | payload)


def test_temporal_launch_runs_the_start_script_exactly(tmp_path: Path, queue: Path) -> None:
    task_id, path = workflow_task(queue)
    tick = dispatcher(tmp_path)
    tick.tick()
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv == ["BuildPlanWorkflow", f"web-{task_id[:8]}",
                    '{"plan_name": "web", "description": "d", "extra": [1, 2]}']
    log = (tmp_path / "logs" / f"temporal-start-{task_id[:8]}.log").read_text()
    assert "to stdout" in log
    assert "to stderr" in log
    record = load_yaml(path)
    assert record["status"] == "in-progress"
    assert [(h["status"], h.get("note")) for h in record["history"][1:]] == [
        ("approved", "Auto-approved: requires_approval=false"),
        ("in-progress", "Temporal workflow submitted")]
    assert tick.messages == [("announcements", "[temporal] Build web",
                              "Workflow: BuildPlanWorkflow | plan: web")]


def test_temporal_start_failures_are_routing_failures(tmp_path: Path, queue: Path) -> None:
    _failing, failing_path = workflow_task(queue)
    dispatcher(tmp_path, start_script=recording_script(tmp_path, exit_code=3)).tick()
    record = load_yaml(failing_path)
    assert record["status"] == "routing-failed"
    assert record["retry_policy"]["last_failure_reason"] == "temporal-workflow-start.sh exited 3"
    failing_path.unlink()
    _, slow_path = workflow_task(queue)
    slow = script(tmp_path, "slow.sh", "#!/bin/sh\nexec sleep 20\n")
    started = datetime.now(UTC)
    dispatcher(tmp_path, start_script=slow, start_timeout=0.3).tick()
    assert datetime.now(UTC) - started < timedelta(seconds=10)
    assert load_yaml(slow_path)["retry_policy"]["last_failure_reason"] == (
        "temporal-workflow-start.sh timed out (0.3s)")
    slow_path.unlink()
    _, bad_path = workflow_task(queue, plan_name="Web_1")
    dispatcher(tmp_path).tick()
    assert load_yaml(bad_path)["history"][-1]["note"] == (
        "Invalid plan_name for workflow submission: 'Web_1'")


def test_retry_pass_relaunches_without_approval(tmp_path: Path, queue: Path) -> None:
    due = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    _, path = workflow_task(queue)
    force(path, status="routing-failed", requires_approval=True,
          retry_policy={"next_retry_at": due, "retry_count": 1})
    tick = dispatcher(tmp_path)
    tick.tick()
    record = load_yaml(path)
    assert record["status"] == "in-progress"
    assert record["history"][-1]["note"] == (
        "Temporal workflow submitted (routing-failed retry)")
    assert tick.messages == []


def test_bad_next_retry_at_makes_the_tick_raise(tmp_path: Path, queue: Path) -> None:
    _, path = record_file(queue, retry_policy={"next_retry_at": datetime.now(UTC),
                                               "retry_count": 1})
    with pytest.raises(TypeError, match="fromisoformat: argument must be str"):
        dispatcher(tmp_path).tick()
    force(path, retry_policy={"next_retry_at": "2026-01-01T00:00:00", "retry_count": 1})
    with pytest.raises(TypeError, match="offset-naive and offset-aware"):
        dispatcher(tmp_path).tick()


def test_roster_must_load(tmp_path: Path) -> None:
    with pytest.raises(RosterError):
        dispatcher(tmp_path, roster_file=tmp_path / "missing.yml").tick()
    bad = tmp_path / "roster.yml"
    for text in ("{}\n", "Dev:\n  project_dir: ~/.claude/projects/dev\n",
                 "dev:\n  project_dir: /tmp/dev\n",
                 "dev:\n  project_dir: ~/.claude/projects/dev\n  run_as_user: agent-dev\n"):
        bad.write_text(text)
        with pytest.raises(RosterError):
            dispatcher(tmp_path, roster_file=bad).tick()
    bad.write_text(yaml.safe_dump({"dev": {
        "project_dir": "~/.claude/projects/dev", "run_as_user": "agent-dev",
        "launcher": "/usr/local/sbin/forge/run-dev.sh"}}))
    dispatcher(tmp_path, roster_file=bad).tick()


def test_archive_moves_old_terminal_tasks(tmp_path: Path, queue: Path,
                                          tools: TaskTools) -> None:
    old = datetime.now(UTC) - timedelta(days=8)
    done_id, done = record_file(queue, status="completed", created=old, ttl_days=7)
    _, quoted = record_file(queue, status="cancelled", created="2020-01-01T00:00:00Z")
    _, young = record_file(queue, status="failed", created=old, ttl_days=9)
    _, open_ = record_file(queue, status="pending-approval", created=old, ttl_days=7)
    dispatcher(tmp_path).tick()
    assert sorted(p.name for p in (queue / "archive").iterdir()) == sorted(
        [done.name, quoted.name])
    assert young.exists()
    assert open_.exists()
    assert tools.get_task(done_id)["task"]["queue_location"] == "archive"


# --- validate_task -----------------------------------------------------------------------
def test_validate_task_names_every_problem(queue: Path) -> None:
    _, path = record_file(queue)
    assert validate_task(load_yaml(path), path.name) == []
    worker_like = load_yaml(path) | {
        "id": str(uuid.uuid4()).upper(), "created": "2026-11-22T07:48:09Z",
        "task_type": "security_audit", "status": "expired", "ttl_days": 0,
        "payload": {"instruction": "x", "context_refs": ["rel"]},
        "history": [{"status": "expired"}],
        "retry_policy": {"next_retry_at": datetime.now(UTC), "retry_count": "1"}}
    problems = validate_task(worker_like, "task.yml")
    for fragment in ("lowercase UUID4", "created must load", "task_type 'security_audit'",
                     "status 'expired'", "ttl_days", "payload.description",
                     "payload.priority", "context_refs", "history[0]", "next_retry_at",
                     "retry_count", "file name 'task.yml'"):
        assert any(fragment in problem for problem in problems), (fragment, problems)
    workflow = load_yaml(path) | {"task_type": "workflow", "target_agent": "auto",
                                  "payload": {"description": "d", "priority": "normal",
                                              "plan_name": "Web", "when": datetime.now(UTC)}}
    del workflow["requires_approval"]
    assert len(validate_task(workflow)) == 4
    naive = load_yaml(path) | {"created": datetime(2026, 1, 1)}
    assert [p for p in validate_task(naive) if "created" in p]
    assert validate_task([1]) == ["a task file must be a mapping, got list"]


def test_td_write_is_private_even_under_a_loose_umask(tmp_path: Path) -> None:
    path = tmp_path / "t.yml"
    old = os.umask(0)
    try:
        write_td(path, {"a": 1})
    finally:
        os.umask(old)
    assert mode_of(path) == 0o600
    assert not (tmp_path / "t.tmp").exists()


def test_default_start_timeout_is_thirty_seconds(tmp_path: Path) -> None:
    assert Dispatcher(tmp_path, start_script=tmp_path / "s", log_dir=tmp_path).start_timeout \
        == 30.0


def test_mode_and_auto_target_checks(tmp_path: Path, queue: Path) -> None:
    _, manual = record_file(queue, workflow_mode="manual")
    _, unrouted = record_file(queue, target_agent="auto", task_type="research")
    dispatcher(tmp_path).tick()
    assert load_yaml(manual)["history"][-1]["note"] == (
        "Unknown workflow_mode 'manual' — not in task-queue-mcp's vocabulary (['auto', "
        "'manual-then-auto', 'semi-auto']). Refusing to guess: …")
    assert load_yaml(unrouted)["history"][-1]["note"] == "No agent found for task_type=research"


def test_manifests_route_auto_and_decide_approval(tmp_path: Path, queue: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for name, hosts in (("elsewhere", ["other"]), ("research", ["forge"])):
        (manifests / f"{name}.yml").write_text(yaml.safe_dump({
            "name": name, "capabilities": ["research"], "scope": {"hosts": hosts},
            "max_auto_risk": "medium",
            "interaction_permissions": {"auto_approved": ["writer"], "needs_approval": []}}))
    (manifests / "example-manifest.yml").write_text(yaml.safe_dump({
        "name": "example", "capabilities": ["research"], "scope": {"hosts": ["all"]}}))
    _, routed = record_file(queue, target_agent="auto", task_type="research")
    _, risky = record_file(queue, target_agent="research", task_type="research",
                           risk_level="high")
    _, trusted = record_file(queue, target_agent="research", task_type="research",
                             risk_level="high", source_agent="writer")
    for path in (routed, risky, trusted):  # no requires_approval: the manifest decides
        record = load_yaml(path)
        del record["requires_approval"]
        path.write_text(dump_yaml(record))
    dispatcher(tmp_path, manifests_dir=manifests).tick()
    assert (load_yaml(routed)["target_agent"], load_yaml(routed)["status"]) == ("research",
                                                                                "approved")
    assert load_yaml(risky)["status"] == "pending-approval"
    assert load_yaml(trusted)["status"] == "approved"


def test_anchors_survive_a_dispatcher_rewrite(tmp_path: Path, tools: TaskTools) -> None:
    _, path = submit(tools, requires_approval=True)
    dispatcher(tmp_path).tick()
    text = path.read_text()
    assert "created: &id001 " in text
    assert "- timestamp: *id001\n" in text
    assert load_yaml(path)["status"] == "pending-approval"


def test_a_start_that_cannot_run_aborts_the_tick_with_the_task_approved(
        tmp_path: Path, queue: Path) -> None:
    _, dated = workflow_task(queue, when=datetime.now(UTC))  # JSON cannot encode it
    with pytest.raises(TypeError, match="not JSON serializable"):
        dispatcher(tmp_path).tick()
    assert load_yaml(dated)["status"] == "approved"
    dated.unlink()
    _, path = workflow_task(queue)
    with pytest.raises(FileNotFoundError):
        dispatcher(tmp_path, start_script=tmp_path / "missing.sh").tick()
    assert load_yaml(path)["status"] == "approved"
    dispatcher(tmp_path).tick()  # never retried: approved is not routed again
    assert load_yaml(path)["status"] == "approved"
