"""Agent dispatch, written once: write the task file, then suspend the activity.

The activity's task token goes into the file (base64); Temporal keeps the activity open
until an agent calls complete_activity.py. The worker holds no slot while it waits.

A task file is all an agent gets: it may run in any directory, without the worker's
environment. So the file carries the exact command that completes it (this worker's
interpreter, the absolute script and task-file paths) and the non-secret facts of how
the worker reaches Temporal; the workflow cannot know those, the activity fills them in.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import shlex
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from temporalio import activity

from activities import platform_events
from activities.run_link import ensure_run_link
from config import WorkerConfig, connection_facts
from models import AgentTaskRequest
from observability import TASKS_DISPATCHED, count
from taskfiles.documents import new_platform_task, new_task
from taskfiles.io_pool import run_file_io
from taskfiles.lookup import task_file_path, write_task
from telemetry.context import bind_build_name
from vocabulary import PLATFORM_TASK_TYPES
from workflows.instructions import COMPLETE_HINT

log = logging.getLogger(__name__)

CLI_SCRIPT = "complete_activity.py"
RESULT_PLACEHOLDER = "<short result>"
REASON_PLACEHOLDER = "<reason>"

def completion_command(task_path: Path) -> list[str]:
    """argv that completes the task stored at `task_path`, runnable from anywhere.

    The interpreter is this worker's own, as invoked and never resolved: a venv's python
    is a symlink, and its target does not see the venv's packages."""
    interpreter = os.path.abspath(sys.executable or "python3")
    return [interpreter, _cli_script(), "--task-file", str(task_path)]


@functools.cache
def _cli_script() -> str:
    """Resolved once (a realpath walk per task file otherwise): a running worker's own
    checkout does not move under it."""
    return str(Path(__file__).resolve().parent.parent / CLI_SCRIPT)


def completion_text(command: list[str]) -> str:
    """What replaces COMPLETE_HINT: both commands, shell-quoted, each on its own line."""
    success = shlex.join([*command, "success", RESULT_PLACEHOLDER])
    failed = shlex.join([*command, "failed", REASON_PLACEHOLDER])
    return (f"When done, run this command (from any directory; put your one-line result in "
            f"place of {RESULT_PLACEHOLDER}):\n    {success}\n"
            f"If it could not be done, run instead:\n    {failed}")


def platform_completion_text(task_id: str, command: list[str]) -> str:
    """What replaces COMPLETE_HINT in the platform dialect: the task tools' way first
    (claim, then close with the result as output), the CLI as the other way."""
    return (f"Claim this task with the task tools (update_task {task_id} in-progress); when "
            f"done, close it (update_task {task_id} completed, your one-line result as the "
            f"output), or failed with the reason if it could not be done. The pipeline "
            f"goes on as soon as the task is closed.\n"
            + completion_text(command).replace("When done, run", "Or, instead of closing "
                                               "it with the task tools, run", 1))


def resolve_instruction(instruction: str, command: list[str], text: str | None = None) -> str:
    text = text or completion_text(command)
    if COMPLETE_HINT in instruction:
        return instruction.replace(COMPLETE_HINT, text)
    # An instruction built without the hint (an older workflow's) still says how to finish.
    return f"{instruction.rstrip()}\n{text}"


@dataclass(frozen=True)
class PreparedTask:
    """A task document and the file it goes to, before anything is written."""

    path: Path
    task: dict[str, Any]
    command: list[str]


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def platform_fields(request: AgentTaskRequest, payload: dict[str, Any],
                    instruction: str) -> dict[str, Any]:
    """The payload keys every task the platform's tools submit has (PROTOCOL.md §1.2), in
    their order: what their UIs show (`description`), `context_refs` (absolute paths
    only), `priority`, and the pipeline's originating task when its id is a UUID (the
    dispatcher copies that task's workflow_mode to this one); then our stage's name."""
    description = payload.get("description")
    refs = [ref for ref in (request.plan_path, payload.get("audit_request_path"),
                            *(payload.get("context_refs") or []))
            if isinstance(ref, str) and ref.startswith("/")]
    fields: dict[str, Any] = {
        "description": description if isinstance(description, str) else instruction,
        "context_refs": list(dict.fromkeys(refs)),
        "priority": "normal",
    }
    origin = request.originating_task_id or payload.get("originating_task_id")
    if isinstance(origin, str) and _is_uuid(origin):
        fields["originating_task_id"] = origin
    fields["stage"] = activity.info().activity_type
    return fields


def prepare_agent_task(config: WorkerConfig, request: AgentTaskRequest,
                       extra_payload: dict[str, Any] | None = None) -> PreparedTask:
    info = activity.info()
    target_agent = request.target_agent
    if not target_agent and request.agent_setting is not None:
        target_agent = getattr(config, request.agent_setting)
    platform = config.platform_dialect
    if platform:
        task = new_platform_task(
            task_id=request.task_id, target_agent=target_agent,
            task_type=PLATFORM_TASK_TYPES.get(request.task_type, request.task_type),
            summary=request.summary, payload={}, workflow_mode=config.task_workflow_mode)
    else:
        task = new_task(task_id=request.task_id, target_agent=target_agent,
                        task_type=request.task_type, summary=request.summary, payload={})
    queue_dir = Path(os.path.abspath(config.task_queue_dir))
    # Only a re-dispatch (attempt > 1, after a lost worker) can find its file already there.
    path = task_file_path(queue_dir, task, may_exist=info.attempt > 1)
    command = completion_command(path)
    payload: dict[str, Any] = {"build_name": request.build_name}
    if request.plan_path is not None:
        payload["plan_path"] = request.plan_path
    payload.update(request.extra_payload)
    payload.update(extra_payload or {})
    hint = platform_completion_text(request.task_id, command) if platform else None
    instruction = resolve_instruction(request.instruction, command, hint)
    if platform:
        fields = platform_fields(request, payload, instruction)
        payload = {**fields, **payload, "context_refs": fields["context_refs"]}
    payload.update({
        "instruction": instruction,
        "complete_command": command,
        "temporal": connection_facts(config),
    })
    if config.token_in_task_file:
        payload["task_token"] = base64.b64encode(info.task_token).decode("ascii")
    payload.update({
        "workflow_id": info.workflow_id,
        "run_id": info.workflow_run_id,
        "activity_id": info.activity_id,
        "activity_type": info.activity_type,
        "attempt": info.attempt,
    })
    task["payload"] = payload
    return PreparedTask(path=path, task=task, command=command)


def write_agent_task(config: WorkerConfig, request: AgentTaskRequest,
                     extra_payload: dict[str, Any] | None = None,
                     before_write: Callable[[PreparedTask], None] | None = None) -> Path:
    """Write the task file; `before_write` runs first (e.g. request.md, which names the
    task file's completion command, must exist before an agent can see the task)."""
    prepared = prepare_agent_task(config, request, extra_payload)
    if before_write is not None:
        before_write(prepared)
    return write_task(prepared.path.parent, prepared.task, path=prepared.path)


async def dispatch_agent_task(config: WorkerConfig, request: AgentTaskRequest, *,
                              extra_payload: dict[str, Any] | None = None,
                              before_write: Callable[[PreparedTask], None] | None = None
                              ) -> NoReturn:
    bind_build_name(request.build_name)
    path = await run_file_io(write_agent_task, config, request, extra_payload, before_write)
    count(TASKS_DISPATCHED, stage=activity.info().activity_type, task_type=request.task_type)
    log.info("task_dispatched", extra={"task_file": str(path), "task_type": request.task_type,
                                       "target_agent": request.target_agent
                                       or getattr(config, request.agent_setting or "", None),
                                       "build_name": request.build_name})
    await platform_events.handed_off(config, request, path)
    await ensure_run_link(config, request.originating_task_id)
    activity.raise_complete_async()
