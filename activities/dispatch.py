"""Agent dispatch, written once: write the task file, then suspend the activity.

The activity's task token goes into the file (base64); Temporal keeps the activity open
until an agent calls complete_activity.py. The worker holds no slot while it waits.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

from temporalio import activity

from activities import legacy_args
from config import WorkerConfig
from file_io import run_file_io
from models import AgentTaskRequest, BuildPhaseResult
from observability import TASKS_DISPATCHED, bind_build_name, count
from task_files import new_task, write_task

log = logging.getLogger(__name__)


def write_agent_task(config: WorkerConfig, request: AgentTaskRequest) -> Path:
    info = activity.info()
    payload: dict[str, object] = {"build_name": request.build_name}
    if request.plan_path is not None:
        payload["plan_path"] = request.plan_path
    payload.update(request.extra_payload)
    payload.update({
        "instruction": request.instruction,
        "task_token": base64.b64encode(info.task_token).decode("ascii"),
        "workflow_id": info.workflow_id,
        "run_id": info.workflow_run_id,
        "activity_id": info.activity_id,
        "activity_type": info.activity_type,
        "attempt": info.attempt,
    })
    target_agent = request.target_agent
    if not target_agent and request.agent_setting is not None:
        target_agent = getattr(config, request.agent_setting)
    task = new_task(task_id=request.task_id, target_agent=target_agent,
                    task_type=request.task_type, summary=request.summary, payload=payload)
    # Only a re-dispatch (attempt > 1, after a lost worker) can find its file already there.
    return write_task(config.task_queue_dir, task, may_exist=info.attempt > 1)


async def dispatch_agent_task(config: WorkerConfig, request: AgentTaskRequest) -> NoReturn:
    bind_build_name(request.build_name)
    path = await run_file_io(write_agent_task, config, request)
    count(TASKS_DISPATCHED, stage=activity.info().activity_type, task_type=request.task_type)
    log.info("task_dispatched", extra={"task_file": str(path), "task_type": request.task_type,
                                       "target_agent": request.target_agent
                                       or getattr(config, request.agent_setting or "", None),
                                       "build_name": request.build_name})
    activity.raise_complete_async()


def agent_stage(config: WorkerConfig, name: str) -> Callable[..., Awaitable[BuildPhaseResult]]:
    """An activity named `name` that hands its request to an agent as a task file.
    It also accepts v0.5.0's positional arguments for `name` (activities/legacy_args.py)."""

    async def hand_to_agent(*args: Any) -> BuildPhaseResult:
        if legacy_args.is_legacy(args):
            request = legacy_args.agent_request(name, args, legacy_args.CallContext.current())
        else:
            request = legacy_args.own_input(AgentTaskRequest, args, name)
        await dispatch_agent_task(config, request)

    hand_to_agent.__name__ = hand_to_agent.__qualname__ = name
    return activity.defn(name=name)(hand_to_agent)
