"""At worker start: hand back work a SIGKILLed worker on this host left half done, and
adopt runs an earlier worker started (startup/adoption.py).

Temporal only notices a dead worker through an activity's timeouts. For an agent stage
that is hours: if the worker died after the server handed it the activity but before
the task file was written, no agent ever sees the task and the pipeline would sit until
the start-to-close timeout. Inline activities (triage, notify, summary) would wait out
theirs too (1 to 30 minutes) before their retry.

At start the worker looks at the open workflows it serves (those on its task queue; for
an agent host's worker, those on WORKFLOW_TASK_QUEUE). A pending activity scheduled on
this worker's own task queue (so an agent host judges only the stages routed to it, and
the main queue's workers never judge an agent host's) whose last worker was a process on
this host that no longer exists is failed by id with a retryable WorkerLostError, so
Temporal runs it again at once:

- agent stages only when the task file of that attempt does not exist: the agent never
  got the work, so dispatching again does not repeat any agent work (the retry writes
  the same task id, hence the same file name). If the file exists the agent holds a
  valid token and nothing is touched.
- inline stages always (they are idempotent: reads, a summary rewrite, a notification
  that may then be sent twice rather than never).

Workers on other hosts, and live processes on this one, are never judged: only a pid
that is provably gone is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from datetime import timedelta
from typing import Any

from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

import policies
from config import WorkerConfig
from decisions.closed_tasks import activity_queue
from exceptions import TaskFileError, TaskNotFoundError, WorkerLostError
from startup.adoption import adopt
from taskfiles.documents import read_task
from taskfiles.lookup import find_task
from vocabulary import AGENT_ACTIVITIES, INLINE_ACTIVITIES, SUMMARIZE_WORKFLOW

log = logging.getLogger(__name__)

DESCRIBE_CONCURRENCY = 8


def process_gone(identity: str, host: str, own_pid: int) -> bool:
    """True only for `<this host>:<pid>` identities whose process no longer exists."""
    name, sep, pid_text = identity.rpartition(":")
    if not sep or name != host or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == own_pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # someone else's live process
    return False


def task_id_of(history_input: Any) -> str | None:
    """The agent task id inside an agent stage's input (AgentTaskRequest or AuditRequest)."""
    if not isinstance(history_input, dict):
        return None
    task = history_input.get("task", history_input)
    task_id = task.get("task_id") if isinstance(task, dict) else None
    return task_id if isinstance(task_id, str) else None


async def scheduled_input(handle: WorkflowHandle[Any, Any], activity_id: str) -> Any:
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            attributes = event.activity_task_scheduled_event_attributes
            if attributes.activity_id == activity_id and attributes.input.payloads:
                return json.loads(attributes.input.payloads[0].data)
    return None


def dispatched(config: WorkerConfig, task_id: str, activity_id: str, attempt: int) -> bool:
    """Does a task file carry the token of this very attempt?"""
    try:
        task = read_task(find_task(config.task_queue_dir, task_id), base=config.task_queue_dir)
    except TaskNotFoundError:
        return False
    except TaskFileError:
        return True  # unreadable is not proof of absence: leave it to the agent
    payload = task.get("payload") if isinstance(task, dict) else None
    if not isinstance(payload, dict):
        return True
    return payload.get("activity_id") == activity_id and payload.get("attempt") == attempt


def crash_limit_reached(name: str, attempt: int, maximum_attempts: int) -> bool:
    """Agent dispatch and the summary retry without an attempt limit, for a full disk's
    sake (policies.py); a worker lost during them still gets the attempts their other
    failures get, no more. Policies with a limit of their own (older runs) keep it."""
    if maximum_attempts != 0:
        return False
    if name in AGENT_ACTIVITIES:
        return attempt >= policies.DISPATCH_ATTEMPTS
    return name == SUMMARIZE_WORKFLOW and attempt >= policies.SUMMARY_ATTEMPTS


async def recover_workflow(client: Client, config: WorkerConfig, workflow_id: str,
                           run_id: str, host: str, own_pid: int) -> list[str]:
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    description = await handle.describe()
    released = []
    for pending in description.raw_description.pending_activities:
        name = pending.activity_type.name
        if pending.state != PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
            continue
        if name not in AGENT_ACTIVITIES and name not in INLINE_ACTIVITIES:
            continue
        if activity_queue(pending, description.task_queue) != config.task_queue:
            continue  # another host's stage: its task file is in that host's folder
        if not process_gone(pending.last_worker_identity, host, own_pid):
            continue
        if name in AGENT_ACTIVITIES:
            task_id = task_id_of(await scheduled_input(handle, pending.activity_id))
            if task_id is None or await asyncio.to_thread(
                    dispatched, config, task_id, pending.activity_id, pending.attempt):
                continue
        final = crash_limit_reached(name, pending.attempt, pending.maximum_attempts)
        await client.get_async_activity_handle(
            workflow_id=workflow_id, run_id=run_id, activity_id=pending.activity_id,
        ).fail(WorkerLostError.failure(
            f"worker {pending.last_worker_identity} died during {name} (attempt "
            f"{pending.attempt}); " + ("no attempt left" if final else "run again"),
            non_retryable=final, next_retry_delay=timedelta(seconds=1)))
        released.append(name)
        log.warning("activity_recovered", extra={
            "workflow_id": workflow_id, "activity": name, "attempt": pending.attempt,
            "dead_worker": pending.last_worker_identity})
    return released


async def recover_lost_activities(client: Client, config: WorkerConfig) -> int:
    """One sweep over the open workflows of this task queue; returns how many
    activities were handed back. Errors are logged, never raised: this is a repair,
    the worker serves either way."""
    host, own_pid = socket.gethostname(), os.getpid()
    query = f'TaskQueue="{config.pipeline_queue}" AND ExecutionStatus="Running"'
    gate = asyncio.Semaphore(DESCRIBE_CONCURRENCY)

    async def one(workflow_id: str, run_id: str, workflow_type: str) -> int:
        async with gate:
            try:
                released = await recover_workflow(client, config, workflow_id, run_id, host,
                                                  own_pid)
                if not config.agent_host:  # adoption acts on the originating task
                    await adopt(client, config, workflow_id, run_id, workflow_type,
                                f"{host}:{own_pid}")
                return len(released)
            except RPCError as err:
                log.warning("recovery_skipped", extra={"workflow_id": workflow_id,
                                                       "error": str(err)})
                return 0

    try:
        jobs = [one(execution.id, execution.run_id, execution.workflow_type)
                async for execution in client.list_workflows(query)]
        total = sum(await asyncio.gather(*jobs))
    except RPCError as err:
        log.warning("recovery_failed", extra={"error": str(err)})
        return 0
    log.info("recovery_sweep_done", extra={"workflows": len(jobs), "recovered": total})
    return total
