"""v0.5.0's positional activity arguments, translated into this service's models.

When this worker takes over a task queue from a v0.5.0 worker, an activity that v0.5.0
scheduled (and that was retried, or not yet started) runs here with v0.5.0's arguments:

    prefab_scaffolding(build_name, plan_path)
    implement_build(build_name, task_id, target_agent)
    request_security_audit(build_name, plan_path)
    process_triage_output(build_name)                 (same as ours)
    apply_flag_fixes(build_name, flags, target_agent)
    notify_blocks(build_name, task_id, blocks)
    wait_for_block_resolution(build_name, task_id)
    close_build(build_name, target_agent)
    summarize_workflow(workflow_id, build_name, started, completed, phases_completed,
                       blocks_hit, flags_applied, plan_path, closeout_path)

Our own calls pass exactly one argument, a model (a JSON object). Each such activity is
written typed, `async def implement_build(self, request: AgentTaskRequest) ->
BuildPhaseResult`, and decorated with `accepts_v050`, the one place that takes raw
arguments: what the worker registers takes `*args` (so the SDK decodes without type
hints: plain dicts, lists and strings), validates our one object as the method's model,
and hands anything else to the activity's v0.5.0 handler, which translates it with this
module's functions. v0.5.0 does not pass every stage the facts our task files carry (the
plan path to stages 2, 5 and 8, the build agent to stage 3): those come from the run's
own input (`CallContext.with_pipeline_input`, one history read). The translations
themselves do no I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import json
import logging
import typing
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from exceptions import InvalidInputError
from models import (
    AgentTaskRequest,
    AuditRequest,
    BlockCheckInput,
    Finding,
    NotifyBlocksInput,
    StageEvent,
    SummaryInput,
    check_name,
)
from vocabulary import (
    APPLY_FLAG_FIXES,
    CLOSE_BUILD,
    IMPLEMENT_BUILD,
    NOTIFY_BLOCKS,
    PREFAB_SCAFFOLDING,
    PROCESS_TRIAGE_OUTPUT,
    REQUEST_SECURITY_AUDIT,
    SUMMARIZE_WORKFLOW,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
    TASK_SECURITY_FIX,
    WAIT_FOR_BLOCK_RESOLUTION,
)
from workflows import instructions

log = logging.getLogger(__name__)

Model = TypeVar("Model", bound=BaseModel)
Typed = TypeVar("Typed", bound=Callable[..., Awaitable[Any]])
# An activity's handling of a v0.5.0 call: (the activities object, the positional args).
V050Handler = Callable[[Any, tuple[Any, ...]], Awaitable[Any]]
INPUT_READ_TIMEOUT_SECONDS = 10.0

# How many positional arguments v0.5.0 passed to each activity.
LEGACY_ARITY = {
    PREFAB_SCAFFOLDING: 2,
    IMPLEMENT_BUILD: 3,
    REQUEST_SECURITY_AUDIT: 2,
    PROCESS_TRIAGE_OUTPUT: 1,
    APPLY_FLAG_FIXES: 3,
    NOTIFY_BLOCKS: 3,
    WAIT_FOR_BLOCK_RESOLUTION: 2,
    CLOSE_BUILD: 2,
    SUMMARIZE_WORKFLOW: 9,
}
# v0.5.0's phases_completed names, in pipeline order, and the stage each one is.
LEGACY_PHASES = {
    "prefab": PREFAB_SCAFFOLDING,
    "implement": IMPLEMENT_BUILD,
    "audit": REQUEST_SECURITY_AUDIT,
    "triage": PROCESS_TRIAGE_OUTPUT,
    "fixes": APPLY_FLAG_FIXES,
    "close": CLOSE_BUILD,
}
BLOCK_STAGES = (NOTIFY_BLOCKS, WAIT_FOR_BLOCK_RESOLUTION)
# v0.5.0 passes summarize_workflow only how many findings there were, not their text.
UNKNOWN_FINDING = "(finding recorded by v0.5.0; its text was not passed to this stage)"
# Only a fixed namespace for the task ids of v0.5.0 calls (see task_id_for).
_TASK_ID_SALT = b"temporal-build-worker/v0.5.0-call/"


@dataclass(frozen=True)
class CallContext:
    """Which activity execution a v0.5.0 call is: ids come from it, not from arguments;
    `pipeline` is the run's input when it was read (empty otherwise)."""

    workflow_id: str
    run_id: str
    activity_id: str
    pipeline: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def current(cls) -> CallContext:
        info = activity.info()
        # A workflow's activity always has both ids (only a standalone one has neither).
        return cls(info.workflow_id or "", info.workflow_run_id or "", info.activity_id)

    @classmethod
    async def with_pipeline_input(cls) -> CallContext:
        """`current()` plus the run's input, read from its first history event. Missing
        facts only leave fields out of the task file: a failed read is logged, never
        fatal (v0.5.0's agent stages have a single attempt)."""
        call = cls.current()
        try:
            pipeline = await asyncio.wait_for(_start_input(call), INPUT_READ_TIMEOUT_SECONDS)
        except (RPCError, RuntimeError, TimeoutError, ValueError) as err:
            log.warning("v050_input_not_read", extra={"workflow_id": call.workflow_id,
                                                      "error": str(err)[:200]})
            pipeline = {}
        return dataclasses.replace(call, pipeline=pipeline)


async def _start_input(call: CallContext) -> dict[str, Any]:
    handle = activity.client().get_workflow_handle(call.workflow_id, run_id=call.run_id)
    async for event in handle.fetch_history_events(page_size=1):
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        value = json.loads(payloads[0].data) if payloads else None
        return value if isinstance(value, dict) else {}
    return {}


def _known_plan_path(call: CallContext) -> str | None:
    """The run's plan path, if its input had a usable one."""
    value = call.pipeline.get("plan_path")
    if isinstance(value, str) and value.startswith("/") and len(value) <= 4096 \
            and not any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return value
    return None


def _known_task_id(call: CallContext) -> str:
    value = call.pipeline.get("task_id")
    try:
        return _task_id(SUMMARIZE_WORKFLOW, value)
    except ApplicationError:
        return ""


def _known_name(call: CallContext, key: str) -> str | None:
    try:
        return check_name(call.pipeline.get(key), key)
    except ValueError:
        return None


def is_legacy(args: tuple[Any, ...]) -> bool:
    """Our calls carry one JSON object; v0.5.0's carry positional scalars and lists."""
    return not (len(args) == 1 and isinstance(args[0], dict))


def accepts_v050(v050: V050Handler | None) -> Callable[[Typed], Typed]:
    """Decorate an activity method typed `(self, request: <Model>) -> <Result>` (under its
    `@activity.defn`) so it takes either form of call: our one JSON object, validated as
    <Model> (one that does not fit fails the activity at once: InvalidInputError, not the
    SDK's retryable decoding error), or v0.5.0's positional arguments, handed to
    `v050(self, args)` (None: there is no v0.5.0 form, and such a call is refused). The
    typed method stays reachable as `typed_form` (the contract test reads its hints)."""

    def decorate(method: Typed) -> Typed:
        model = _request_model(method)

        async def decode(self: Any, *args: Any) -> Any:
            name = activity.info().activity_type
            if not is_legacy(args):
                return await method(self, own_input(model, args, name))
            if v050 is None:
                raise invalid(name, "expected one model argument (no v0.5.0 form is known)")
            return await v050(self, args)

        # Not functools.wraps: `__wrapped__` would show the SDK the typed signature, and
        # it would decode our calls itself (and v0.5.0's would not fit).
        decode.__name__, decode.__qualname__ = method.__name__, method.__qualname__
        decode.__doc__, decode.__module__ = method.__doc__, method.__module__
        vars(decode)["typed_form"] = method
        return cast(Typed, decode)

    return decorate


def _request_model(method: Callable[..., Any]) -> type[BaseModel]:
    """The model a typed activity method takes: its one parameter after `self`."""
    parameters = list(inspect.signature(method).parameters)
    hints = typing.get_type_hints(method)
    model = hints.get(parameters[1]) if len(parameters) == 2 else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{method.__qualname__}: accepts_v050 needs (self, request: <Model>)")
    return model


def invalid(activity_name: str, problem: str) -> ApplicationError:
    """Arguments no retry can fix: fail the activity at once, naming the problem."""
    return InvalidInputError.failure(f"{activity_name}: {problem}")


def own_input(model: type[Model], args: tuple[Any, ...], activity_name: str) -> Model:
    """The model of one of our own calls."""
    try:
        return model.model_validate(args[0])
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "input"
        raise invalid(activity_name, f"{where}: {first['msg']}") from None


def task_id_for(call: CallContext) -> str:
    """The agent task id of a v0.5.0 call: the same for every attempt of one activity, so
    a re-dispatch rewrites the same file; shaped as a uuid4 like every task id."""
    digest = hashlib.sha256(_TASK_ID_SALT + "/".join(
        (call.workflow_id, call.run_id, call.activity_id)).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def _arity(activity_name: str, args: tuple[Any, ...]) -> None:
    expected = LEGACY_ARITY.get(activity_name)
    if expected is None:
        raise invalid(activity_name, "expected one model argument (no v0.5.0 form is known)")
    if len(args) != expected:
        raise invalid(activity_name, f"expected one model argument or v0.5.0's {expected} "
                                     f"positional arguments, got {len(args)}")


def _name(activity_name: str, value: Any, what: str) -> str:
    try:
        return check_name(value, what)
    except ValueError as err:
        raise invalid(activity_name, str(err)) from None


def _text(activity_name: str, value: Any, what: str, *, limit: int = 4096) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise invalid(activity_name, f"{what} must be a non-empty string of at most {limit} "
                                     f"characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise invalid(activity_name, f"{what} must not contain control characters")
    return value


def _task_id(activity_name: str, value: Any) -> str:
    text = _text(activity_name, value, "task_id", limit=200)
    if "/" in text or "\\" in text or text in (".", ".."):
        raise invalid(activity_name, "task_id must not contain path separators")
    return text


def _plan_path(activity_name: str, value: Any) -> str:
    text = _text(activity_name, value, "plan_path")
    if not text.startswith("/"):
        raise invalid(activity_name, "plan_path must be an absolute path")
    return text


def _findings(activity_name: str, value: Any, what: str) -> list[Finding]:
    """v0.5.0's finding texts; {description: ...} items (our triage's shape) too."""
    if not isinstance(value, list):
        raise invalid(activity_name, f"{what} must be a list")
    found = []
    for item in value:
        raw = item.get("description") if isinstance(item, dict) else item
        if not isinstance(raw, str) or not raw.strip():
            raise invalid(activity_name, f"{what}: every item must be a non-empty string")
        extra = {str(k): v for k, v in item.items() if k != "description"} \
            if isinstance(item, dict) else {}
        found.append(Finding(description=raw, **extra))
    return found


def _count(activity_name: str, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100_000:
        raise invalid(activity_name, f"{what} must be a count (0-100000)")
    return value


def _moment(activity_name: str, value: Any, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(_text(activity_name, value, what, limit=64))
    except ValueError:
        raise invalid(activity_name, f"{what} must be an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise invalid(activity_name, f"{what} must carry a UTC offset")
    return moment


def agent_request(activity_name: str, args: tuple[Any, ...],
                  call: CallContext) -> AgentTaskRequest:
    """The task of a v0.5.0 agent stage (1, 2, 5, 8), with v0.5.0's payload fields."""
    _arity(activity_name, args)
    build = _name(activity_name, args[0], "build_name")
    common: dict[str, Any] = {"task_id": task_id_for(call), "build_name": build}
    if activity_name == PREFAB_SCAFFOLDING:
        plan = _plan_path(activity_name, args[1])
        return AgentTaskRequest(
            **common, target_agent="", agent_setting="prefab_agent", task_type=TASK_BUILD_PREFAB,
            summary=f"Prefab scaffolding for {build}", plan_path=plan,
            instruction=instructions.prefab(build, plan))
    if activity_name == IMPLEMENT_BUILD:
        origin = _task_id(activity_name, args[1])
        return AgentTaskRequest(
            **common, target_agent=_name(activity_name, args[2], "target_agent"),
            task_type=TASK_BUILD_PLAN, summary=f"Implement {build}",
            plan_path=_known_plan_path(call),
            instruction=(f"Implement build '{build}' as its originating task {origin} "
                         f"describes. {instructions.COMPLETE_HINT}"),
            extra_payload={"originating_task_id": origin})
    if activity_name == APPLY_FLAG_FIXES:
        flags = _findings(activity_name, args[1], "flags")
        extra: dict[str, Any] = {"flags": [flag.description for flag in flags]}
        if flags:
            extra["flag_count"] = len(flags)
        return AgentTaskRequest(
            **common, target_agent=_name(activity_name, args[2], "target_agent"),
            task_type=TASK_SECURITY_FIX, summary=f"Fix {len(flags)} security flag(s) on {build}",
            plan_path=_known_plan_path(call),
            instruction=instructions.flag_fixes(build, flags), extra_payload=extra)
    if activity_name == CLOSE_BUILD:
        return AgentTaskRequest(
            **common, target_agent=_name(activity_name, args[1], "target_agent"),
            task_type=TASK_BUILD_CLOSEOUT, summary=f"Close out {build}",
            plan_path=_known_plan_path(call),
            instruction=(f"Close out build '{build}': finish docs and release notes. Report "
                         f"the path of your close-out document as the output. "
                         f"{instructions.COMPLETE_HINT}"))
    raise invalid(activity_name, "not an agent stage of v0.5.0")


def audit_request(args: tuple[Any, ...], call: CallContext, folder_for: Callable[[str], Path],
                  request_file: str, triage_file: str) -> AuditRequest:
    """Stage 3 of v0.5.0: `folder_for(build)` is the build's absolute audit folder (the
    activity adds v0.5.0's audit_request_path and output_dir for every call)."""
    name = REQUEST_SECURITY_AUDIT
    _arity(name, args)
    build = _name(name, args[0], "build_name")
    plan = _plan_path(name, args[1])
    folder = folder_for(build)
    request_path, triage_path = folder / request_file, folder / triage_file
    task = AgentTaskRequest(
        task_id=task_id_for(call), build_name=build, target_agent="",
        agent_setting="security_agent", task_type=TASK_SECURITY_AUDIT,
        summary=f"Security audit of {build}", plan_path=plan,
        instruction=instructions.security_audit(build, str(request_path), str(triage_path)),
        extra_payload={"audit_folder": f"{folder.parent.name}/{folder.name}"})
    # v0.5.0 does not pass the build agent to stage 3.
    return AuditRequest(build_name=build, plan_path=plan,
                        target_agent=_known_name(call, "target_agent") or "(unknown)", task=task)


def notify_input(args: tuple[Any, ...], call: CallContext) -> NotifyBlocksInput:
    name = NOTIFY_BLOCKS
    _arity(name, args)
    return NotifyBlocksInput(build_name=_name(name, args[0], "build_name"),
                             task_id=_task_id(name, args[1]), workflow_id=call.workflow_id,
                             blocks=_findings(name, args[2], "blocks"))


def block_check(args: tuple[Any, ...]) -> BlockCheckInput:
    name = WAIT_FOR_BLOCK_RESOLUTION
    _arity(name, args)
    _name(name, args[0], "build_name")
    return BlockCheckInput(task_id=_task_id(name, args[1]))


def summary_input(args: tuple[Any, ...], call: CallContext) -> SummaryInput:
    """v0.5.0 summarizes only a pipeline that closed out: `success`, or `partial` when
    blocks were hit (and so approved). Finding texts were not passed, only counts."""
    name = SUMMARIZE_WORKFLOW
    _arity(name, args)
    (workflow_id, build, started, completed, phases, blocks_hit, flags_applied, plan,
     closeout) = args
    workflow_id = _text(name, workflow_id, "workflow_id", limit=1000)
    if workflow_id != call.workflow_id:
        raise invalid(name, "workflow_id is not the workflow this activity belongs to")
    if not isinstance(phases, list) or any(p not in LEGACY_PHASES for p in phases):
        raise invalid(name, f"phases_completed must list v0.5.0 phases "
                            f"({', '.join(LEGACY_PHASES)})")
    blocks = _count(name, blocks_hit, "blocks_hit")
    flags = _count(name, flags_applied, "flags_applied")
    stages = [stage for phase, stage in LEGACY_PHASES.items() if phase in phases]
    closed = "close" in phases
    if blocks and closed:
        at = stages.index(CLOSE_BUILD)
        stages[at:at] = list(BLOCK_STAGES)
    ended = _moment(name, completed, "completed")
    return SummaryInput(
        workflow_id=workflow_id, run_id=call.run_id, build_name=_name(name, build, "build_name"),
        target_agent=_known_name(call, "target_agent") or "", plan_path=_plan_path(name, plan),
        task_id=_known_task_id(call),
        outcome="partial" if blocks else "success",
        stages_completed=[*stages, SUMMARIZE_WORKFLOW],
        started_at=_moment(name, started, "started"), ended_at=ended,
        blocks=[Finding(description=UNKNOWN_FINDING)] * blocks,
        flags=[Finding(description=UNKNOWN_FINDING)] * flags,
        decision="approved" if blocks and closed else None,
        closeout_path=closeout if isinstance(closeout, str) and closeout else None,
        adopted=True,
        events=[StageEvent(at=ended, stage=SUMMARIZE_WORKFLOW, event="v050_arguments",
                           detail=f"summary requested by a v0.5.0 pipeline: {blocks} block(s), "
                                  f"{flags} flag(s) fixed")])
