"""Agent tasks closed with the platform's task tools finish their stage.

On the platform an agent never runs our CLI: it claims its task and closes it through
task-queue-mcp (`update_task … completed` with its result as output, or `failed`), and
the dispatcher may give up routing a task (`failed`, moved to `dead-letters/`) or report
that it could not route it yet (`routing-failed`). The folder watcher hands every such
file here, and this module completes or fails the stage's activity by its workflow id,
run id and activity id (no task token needed), or tells the run about the routing
failure. A task of ours an agent claimed (`in-progress`, in either dialect) is told to its
run the same way: the run's pickup and work limits count from it.

A close acts only on the stage it was written for: the activity the file names must be
pending on this worker's queue (the workflow's own, or this agent host's when the stage
was routed here), and the run's history must show that activity scheduled for this very
task id. A file of an earlier attempt, of another run or of an ended run completes
nothing. When `complete_activity.py` was first, the activity is no longer pending and the
file is a harmless no-op.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio.api.common.v1 import Payload
from temporalio.api.workflow.v1 import PendingActivityInfo
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from activities import legacy_args
from exceptions import PhaseFailedError
from models import BuildPhaseResult, TaskNotice
from policies import TASK_CLOSE_RPC_TIMEOUT, TASK_NOTICE_INTERVAL
from taskfiles.documents import SOURCE_AGENT, claimed_actor
from taskfiles.visible_text import visible_line
from vocabulary import (
    BUILD_PIPELINE_WORKFLOW,
    BUILD_PLAN_WORKFLOW,
    CANCELLED,
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    ROUTING_FAILED,
    TASK_NOTICE_SIGNAL,
)

log = logging.getLogger(__name__)

# Top-level lines a file must hold before it is parsed at all: nearly every write in the
# folder is a fresh task (`status: submitted`) or someone else's.
CLOSING_STATUSES = (COMPLETED, FAILED, CANCELLED, ROUTING_FAILED)
CLOSING_LINES = tuple(f"\nstatus: {status}".encode() for status in CLOSING_STATUSES)
OWN_TASK_LINE = f"\nsource_agent: {SOURCE_AGENT}".encode()
CLAIMED_LINE = f"\nstatus: {IN_PROGRESS}".encode()
MAX_OUTPUT_CHARS = 100_000  # as complete_activity.py takes
MAX_REASON_CHARS = 400
MAX_REMEMBERED = 2000  # runs and tasks a notice was sent about lately


def activity_queue(pending: PendingActivityInfo, workflow_queue: str) -> str:
    """The task queue a pending activity was scheduled on (an agent host's, for a routed
    stage); servers that do not say are taken to mean the workflow's own."""
    if pending.HasField("activity_options") and pending.activity_options.task_queue.name:
        return pending.activity_options.task_queue.name
    return workflow_queue


def may_close(raw: bytes) -> bool:
    """Whether a file's bytes can be a closed (or unroutable) task of ours."""
    return OWN_TASK_LINE in raw and any(line in raw for line in CLOSING_LINES)


def may_claim(raw: bytes) -> bool:
    """Whether a file's bytes can be a task of ours an agent claimed (top-level status)."""
    return OWN_TASK_LINE in raw and CLAIMED_LINE in raw


@dataclass(frozen=True)
class ClosedTask:
    task_id: str
    status: str
    workflow_id: str
    run_id: str
    activity_id: str
    output: str
    reason: str
    dead_lettered: bool
    closed_by: str = ""


def _text(value: Any, limit: int) -> str:
    return visible_line(value, limit) if isinstance(value, str) else ""


def _reason(task: dict[str, Any], *, dead_lettered: bool) -> str:
    """Why the task failed, was cancelled or could not be routed, as whoever did it
    recorded it: the dispatcher in failed_reason / retry_policy, else the newest note."""
    sources = [("failed_reason", "reason")] if dead_lettered else []
    if task.get("status") == ROUTING_FAILED:
        sources.append(("retry_policy", "last_failure_reason"))
    for key, field in sources:
        source = task.get(key)
        if isinstance(source, dict) and _text(source.get(field), MAX_REASON_CHARS):
            return _text(source.get(field), MAX_REASON_CHARS)
    history = task.get("history")
    for entry in reversed(history if isinstance(history, list) else []):
        if isinstance(entry, dict) and _text(entry.get("note"), MAX_REASON_CHARS):
            return _text(entry.get("note"), MAX_REASON_CHARS)
    return ""


def closed_task(task: dict[str, Any], *, dead_lettered: bool) -> ClosedTask | None:
    """The close a parsed task file stands for, or None when it is not one of ours."""
    payload, result = task.get("payload"), task.get("result")
    status, task_id = task.get("status"), task.get("id")
    if (task.get("source_agent") != SOURCE_AGENT or not isinstance(payload, dict)
            or status not in (*CLOSING_STATUSES, IN_PROGRESS)
            or not isinstance(task_id, str) or not task_id):
        return None
    ids = [value for key in ("workflow_id", "run_id", "activity_id")
           if isinstance(value := payload.get(key), str) and value]
    if len(ids) != 3:
        return None
    output = result.get("output") if isinstance(result, dict) else None
    by = result.get("completed_by") if isinstance(result, dict) else None
    # A claim's reason is who claimed it, as the file's history says (anyone can write it).
    reason = (_text(claimed_actor(task, IN_PROGRESS)[0], MAX_REASON_CHARS)
              if status == IN_PROGRESS else _reason(task, dead_lettered=dead_lettered))
    return ClosedTask(task_id=task_id, status=str(status), workflow_id=ids[0],
                      run_id=ids[1], activity_id=ids[2],
                      output=output[:MAX_OUTPUT_CHARS] if isinstance(output, str) else "",
                      reason=reason, dead_lettered=dead_lettered, closed_by=_text(by, 100))


def scheduled_task_id(payloads: list[Payload], workflow_id: str, run_id: str,
                      activity_id: str) -> str | None:
    """The task id an agent stage's activity was scheduled with: our input names it
    (`task_id`, or `task.task_id` for the audit); a v0.5.0 call's is derived from the
    activity's own ids, as the worker derives it."""
    try:
        arguments = [json.loads(payload.data) for payload in payloads]
    except ValueError:
        return None
    if len(arguments) == 1 and isinstance(arguments[0], dict):
        request = arguments[0]
        task = request.get("task")
        found = task.get("task_id") if isinstance(task, dict) else request.get("task_id")
        return found if isinstance(found, str) else None
    return legacy_args.task_id_for(legacy_args.CallContext(workflow_id, run_id, activity_id))


async def waited_task_id(handle: WorkflowHandle[Any, Any], workflow_id: str, run_id: str,
                         activity_id: str, rpc_timeout: timedelta) -> str | None:
    """The task a pending activity waits on, as the run's history records it (read from
    the server alone: no worker need be up). The newest scheduling of that activity id."""
    scheduled: list[Payload] | None = None
    async for event in handle.fetch_history_events(rpc_timeout=rpc_timeout):
        if event.HasField("activity_task_scheduled_event_attributes"):
            attributes = event.activity_task_scheduled_event_attributes
            if attributes.activity_id == activity_id:
                scheduled = list(attributes.input.payloads)
    if scheduled is None:
        return None
    return scheduled_task_id(scheduled, workflow_id, run_id, activity_id)


class ClosedTaskApplier:
    """Applies closes for one worker; stateless but for what is on its way."""

    def __init__(self, client: Client, task_queue: str, workflow_queue: str | None = None
                 ) -> None:
        """`task_queue`: this worker's (a close completes only activities scheduled there);
        `workflow_queue`: where the runs it sends notices to run (an agent host's
        WORKFLOW_TASK_QUEUE; by default the same queue)."""
        self.client = client
        self.task_queue = task_queue
        self.workflow_queue = workflow_queue or task_queue
        self.applied = 0
        # (workflow id, task id) -> when a notice about it was last sent
        self._notified: OrderedDict[tuple[str, str], float] = OrderedDict()

    async def apply(self, closed: ClosedTask) -> str:
        """What became of the close: applied, noticed, stale, refused or gone."""
        handle = self.client.get_workflow_handle(closed.workflow_id, run_id=closed.run_id)
        try:
            described = await handle.describe(rpc_timeout=TASK_CLOSE_RPC_TIMEOUT)
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return "gone"
            raise
        if (described.status != WorkflowExecutionStatus.RUNNING
                or described.workflow_type not in (BUILD_PIPELINE_WORKFLOW, BUILD_PLAN_WORKFLOW)):
            return "gone"
        pending = {activity.activity_id: activity_queue(activity, described.task_queue)
                   for activity in described.raw_description.pending_activities}
        if closed.activity_id not in pending:
            return "stale"  # completed already (the CLI, or another worker), or another run's
        if pending[closed.activity_id] != self.task_queue:
            return "gone"  # another host's stage: its own worker answers for it
        if closed.status in (ROUTING_FAILED, IN_PROGRESS):
            return await self._notice(closed, described.workflow_type)
        waited = await waited_task_id(handle, closed.workflow_id, closed.run_id,
                                      closed.activity_id, TASK_CLOSE_RPC_TIMEOUT)
        if waited != closed.task_id:
            log.warning("task_close_refused", extra={
                "workflow_id": closed.workflow_id, "task_id": closed.task_id,
                "error": f"the run waits on task {str(waited)[:80]!r}, not this one"})
            return "refused"
        return await self._complete(closed)

    async def _complete(self, closed: ClosedTask) -> str:
        activity = self.client.get_async_activity_handle(
            workflow_id=closed.workflow_id, run_id=closed.run_id,
            activity_id=closed.activity_id)
        try:
            if closed.status == COMPLETED:
                await activity.complete(BuildPhaseResult(status="success", output=closed.output),
                                        rpc_timeout=TASK_CLOSE_RPC_TIMEOUT)
            else:
                await activity.fail(PhaseFailedError.failure(self._failure(closed)),
                                    rpc_timeout=TASK_CLOSE_RPC_TIMEOUT)
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return "stale"  # the CLI won the race
            raise
        self.applied += 1
        log.info("task_close_applied", extra={"workflow_id": closed.workflow_id,
                                              "task_id": closed.task_id,
                                              "status": closed.status,
                                              "dead_lettered": closed.dead_lettered})
        return "applied"

    @staticmethod
    def _failure(closed: ClosedTask) -> str:
        if closed.dead_lettered:
            return (f"the dispatcher gave up routing task {closed.task_id} (dead-lettered): "
                    f"{closed.reason or 'no reason given'}")
        if closed.status == CANCELLED:
            by = f" by {closed.closed_by}" if closed.closed_by else ""
            return f"task {closed.task_id} was cancelled{by}: {closed.reason or 'no reason given'}"
        detail = _text(closed.output, MAX_REASON_CHARS) or closed.reason
        return f"task {closed.task_id} closed as failed: {detail or 'no reason given'}"

    async def _notice(self, closed: ClosedTask, workflow_type: str) -> str:
        if workflow_type != BUILD_PIPELINE_WORKFLOW:
            return "stale"
        if closed.status == IN_PROGRESS:
            notice = TaskNotice(task_id=closed.task_id, kind="claimed", detail=closed.reason)
            if not await self.notify(closed.workflow_id, closed.run_id, notice,
                                     described=True):
                return "stale"
            log.info("task_claimed", extra={"workflow_id": closed.workflow_id,
                                            "task_id": closed.task_id})
            return "noticed"
        notice = TaskNotice(task_id=closed.task_id, kind="routing_failed",
                            detail=closed.reason or "no reason given")
        if not await self.notify(closed.workflow_id, closed.run_id, notice, described=True):
            return "stale"
        log.warning("task_routing_failed", extra={"workflow_id": closed.workflow_id,
                                                  "task_id": closed.task_id,
                                                  "error": closed.reason})
        return "noticed"

    async def notify(self, workflow_id: str, run_id: str | None, notice: TaskNotice, *,
                     described: bool = False) -> bool:
        """Send `notice` to a running pipeline on this worker's queue, at most once per
        TASK_NOTICE_INTERVAL for one run and task, whatever the file says meanwhile: a
        file rewritten in a loop must not flood a run's history. Whether it was sent."""
        # Per kind: a routing failure just told must not hold back the claim that follows.
        key = (workflow_id, f"{notice.kind} {notice.task_id}")
        now = time.monotonic()
        last = self._notified.get(key)
        if last is not None and now - last < TASK_NOTICE_INTERVAL.total_seconds():
            return False
        handle = self.client.get_workflow_handle(workflow_id, run_id=run_id)
        if not described:
            info = await handle.describe(rpc_timeout=TASK_CLOSE_RPC_TIMEOUT)
            if (info.status != WorkflowExecutionStatus.RUNNING
                    or info.task_queue != self.workflow_queue
                    or info.workflow_type != BUILD_PIPELINE_WORKFLOW):
                return False
        self._notified[key] = now
        self._notified.move_to_end(key)
        if len(self._notified) > MAX_REMEMBERED:
            self._notified.popitem(last=False)
        await handle.signal(TASK_NOTICE_SIGNAL, notice, rpc_timeout=TASK_CLOSE_RPC_TIMEOUT)
        return True
