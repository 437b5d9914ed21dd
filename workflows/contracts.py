"""The activities the workflows call: each one's registered name, input and result.

Declared here, in the workflows' layer, because a workflow may not import activities/
(it does I/O); activities/ implements each method under the same name
(`activities.build_pipeline_activities.PipelineActivities` subclasses both classes, and
tests/test_contracts.py checks every method is implemented, named and typed alike).
A workflow calls an activity by reference, `workflow.execute_activity_method(
BuildPipelineActivities.implement_build, request, ...)`: the name scheduled in history
is the `@activity.defn` name (a vocabulary constant, the names every recorded history
and v0.5.0 use) and the result is decoded as the return type declared here.

Every method name equals its activity name, so `stage_name(method)` is the stage's name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from temporalio import activity

from models import (
    AgentTaskRequest,
    AuditRequest,
    BlockCheckInput,
    BlockResolution,
    BuildPhaseResult,
    CloseOriginInput,
    NotifyBlocksInput,
    NotifyBlocksResult,
    OpenTask,
    PickupReminder,
    PipelineSetup,
    PrepareInput,
    RecordDecisionInput,
    StageRoute,
    SummaryInput,
    TriageResult,
)
from vocabulary import (
    APPLY_FLAG_FIXES,
    BUILD_PHASE,
    CLOSE_BUILD,
    CLOSE_OPEN_TASKS,
    CLOSE_ORIGINATING_TASK,
    IMPLEMENT_BUILD,
    NOTIFY_BLOCKS,
    PREFAB_SCAFFOLDING,
    PREPARE_PIPELINE,
    PROCESS_TRIAGE_OUTPUT,
    RECORD_DECISION,
    REMIND_PICKUP,
    REQUEST_SECURITY_AUDIT,
    ROUTE_STAGE,
    SUMMARIZE_WORKFLOW,
    WAIT_FOR_BLOCK_RESOLUTION,
)


def stage_name(method: Callable[..., Any]) -> str:
    """The activity (and stage) name of a method declared below."""
    return method.__name__


class BuildPipelineActivities(Protocol):
    """BuildPipelineWorkflow's activities, in the order a run meets them."""

    @activity.defn(name=PREPARE_PIPELINE)
    async def prepare_pipeline(self, request: PrepareInput) -> PipelineSetup:
        """Before stage 1 (local): the agents the worker's settings name, and the
        originating task's file."""
        ...

    @activity.defn(name=ROUTE_STAGE)
    async def route_stage(self, agent: str) -> StageRoute:
        """At an agent stage's start (local): the task queue of the host `agent` runs on."""
        ...

    @activity.defn(name=PREFAB_SCAFFOLDING)
    async def prefab_scaffolding(self, request: AgentTaskRequest) -> BuildPhaseResult:
        """Stage 1: the prefab agent's task file; completed by the agent."""
        ...

    @activity.defn(name=IMPLEMENT_BUILD)
    async def implement_build(self, request: AgentTaskRequest) -> BuildPhaseResult:
        """Stage 2: the target agent implements the plan."""
        ...

    @activity.defn(name=REQUEST_SECURITY_AUDIT)
    async def request_security_audit(self, request: AuditRequest) -> BuildPhaseResult:
        """Stage 3: request.md in the round's audit folder, then the security agent's task."""
        ...

    @activity.defn(name=PROCESS_TRIAGE_OUTPUT)
    async def process_triage_output(self, build_name: str, round_no: int = 1
                                    ) -> TriageResult:
        """Stage 4: the audit round's triage file, read and checked (runs begun before
        audit rounds pass only the build name)."""
        ...

    @activity.defn(name=APPLY_FLAG_FIXES)
    async def apply_flag_fixes(self, request: AgentTaskRequest) -> BuildPhaseResult:
        """Stage 5: the flags (or the changes an operator asked for) to the target agent."""
        ...

    @activity.defn(name=NOTIFY_BLOCKS)
    async def notify_blocks(self, request: NotifyBlocksInput) -> NotifyBlocksResult | None:
        """Stage 6: tell the operators, mark the originating task (None: v0.5.0's form)."""
        ...

    @activity.defn(name=WAIT_FOR_BLOCK_RESOLUTION)
    async def wait_for_block_resolution(self, request: BlockCheckInput
                                        ) -> BlockResolution | None:
        """Stage 7 as histories recorded before event-driven decisions hold it: one look
        at the originating task (None: v0.5.0's answer for approved)."""
        ...

    @activity.defn(name=RECORD_DECISION)
    async def record_block_decision(self, request: RecordDecisionInput) -> str | None:
        """After stage 7: the decision into the originating task's history (its path)."""
        ...

    @activity.defn(name=REMIND_PICKUP)
    async def remind_pickup(self, reminder: PickupReminder) -> list[str]:
        """An agent task past its pickup limit: tell the channels again (the failures)."""
        ...

    @activity.defn(name=CLOSE_BUILD)
    async def close_build(self, request: AgentTaskRequest) -> BuildPhaseResult:
        """Stage 8: the target agent closes the build out."""
        ...

    @activity.defn(name=CLOSE_OPEN_TASKS)
    async def close_open_tasks(self, tasks: list[OpenTask]) -> list[OpenTask]:
        """Before stage 9, on an agent host: its open agent tasks closed (those closed)."""
        ...

    @activity.defn(name=SUMMARIZE_WORKFLOW)
    async def summarize_workflow(self, summary: SummaryInput) -> str:
        """Stage 9, on every ending: the summary file (its path)."""
        ...


class BuildPlanActivities(Protocol):
    """BuildPlanWorkflow's activities."""

    @activity.defn(name=BUILD_PHASE)
    async def build_phase(self, request: AgentTaskRequest) -> BuildPhaseResult:
        """One phase of a plan: its agent's task file; completed by the agent."""
        ...

    @activity.defn(name=CLOSE_ORIGINATING_TASK)
    async def close_originating_task(self, request: CloseOriginInput) -> str | None:
        """A plan's end closes the task it was filed as (platform dialect)."""
        ...
