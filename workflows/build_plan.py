"""BuildPlanWorkflow: run each phase of a plan as a build_phase task, in order."""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, CancelledError

from vocabulary import (
    BUILD_PHASE,
    BUILD_PLAN_WORKFLOW,
    STATUS_QUERY,
    TASK_BUILD_PHASE,
)

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    import policies
    from exceptions import InvalidInputError, PhaseFailedError
    from models import (
        AgentTaskRequest,
        BuildPlanInput,
        BuildPlanResult,
        CloseOriginInput,
        PlanOutcome,
        PlanStatus,
        WaitingOn,
    )
    from workflows import instructions
    from workflows.contracts import BuildPlanActivities
    from workflows.failures import describe_activity_failure, validation_message
    from workflows.patches import CLOSE_FILING_TASK_PATCH


@workflow.defn(name=BUILD_PLAN_WORKFLOW)
class BuildPlanWorkflow:
    def __init__(self) -> None:
        self._plan: BuildPlanInput | None = None
        self._done: list[int] = []
        self._current: int | None = None
        self._current_agent: str | None = None
        self._waiting: WaitingOn | None = None
        self._outcome: PlanOutcome | None = None
        self._error: str | None = None

    @workflow.run
    async def run(self, raw_input: Any) -> BuildPlanResult:
        try:
            plan = BuildPlanInput.model_validate(raw_input)
        except ValidationError as err:
            raise InvalidInputError.failure(
                f"invalid BuildPlanInput: {validation_message(err)}") from None
        self._plan = plan
        try:
            result = await self._run_phases(plan)
        except BaseException:
            # A failed phase or a cancel: the filing task is closed all the same.
            await self._close_filing_task(plan)
            raise
        await self._close_filing_task(plan)
        return result

    async def _close_filing_task(self, plan: BuildPlanInput) -> None:
        """Close the task the plan was filed as (platform dialect; the activity decides),
        with how the plan ended. Only runs that have one, started since this step."""
        if plan.task_id is None or not workflow.patched(CLOSE_FILING_TASK_PATCH):
            return
        outcome = self._outcome or "failed"
        done = f"{len(self._done)} of {len(plan.phases)} phases done"
        await workflow.execute_local_activity_method(
            BuildPlanActivities.close_originating_task,
            CloseOriginInput(task_id=plan.task_id, outcome=outcome,
                             output=f"plan {outcome}; {done}"
                             + (f": {self._error}" if self._error else "")),
            start_to_close_timeout=policies.PREPARE.start_to_close,
            retry_policy=policies.PREPARE.retry, summary="close the filing task")

    async def _run_phases(self, plan: BuildPlanInput) -> BuildPlanResult:
        total = len(plan.phases)
        for phase in plan.phases:
            self._current, self._current_agent = phase.number, phase.agent_type
            request = AgentTaskRequest(
                task_id=str(workflow.uuid4()), build_name=plan.plan_name,
                target_agent=phase.agent_type, task_type=TASK_BUILD_PHASE,
                summary=f"{plan.plan_name} phase {phase.number}: "
                        f"{' '.join(phase.description.split())[:120]}",
                instruction=instructions.build_phase(plan.plan_name, phase.number,
                                                     phase.description, phase.context_refs),
                extra_payload={"plan_name": plan.plan_name, "phase": phase.number,
                               "context_refs": list(phase.context_refs)},
                originating_task_id=plan.task_id)
            self._waiting = WaitingOn(kind="agent", stage=BUILD_PHASE, agent=phase.agent_type,
                                      task_type=TASK_BUILD_PHASE, task_id=request.task_id,
                                      since=workflow.now())
            workflow.set_current_details(
                f"**{plan.plan_name}**: phase {phase.number} ({len(self._done) + 1}/{total}) "
                f"→ `{phase.agent_type}`")
            try:
                await workflow.execute_activity_method(
                    BuildPlanActivities.build_phase, request,
                    start_to_close_timeout=policies.BUILD_PHASE.start_to_close,
                    schedule_to_close_timeout=policies.BUILD_PHASE.schedule_to_close,
                    retry_policy=policies.BUILD_PHASE.retry,
                    summary=f"phase {phase.number} ({len(self._done) + 1}/{total}) → "
                            f"{phase.agent_type}")
            except ActivityError as err:
                if isinstance(err.cause, CancelledError):
                    # A cancel of the plan itself: end as cancelled, not as a failed phase.
                    self._outcome, self._waiting = "cancelled", None
                    raise asyncio.CancelledError() from None
                message, _ = describe_activity_failure(err)
                self._outcome = "failed"
                self._error = f"phase {phase.number} ({phase.agent_type}) failed: {message}"
                self._waiting = None
                workflow.set_current_details(f"**{plan.plan_name}**: {self._error}")
                raise PhaseFailedError.failure(
                    f"{self._error} ({len(self._done)} of {total} phases done)") from None
            self._done.append(phase.number)
            self._waiting = None
        self._outcome, self._current, self._current_agent = "success", None, None
        workflow.set_current_details(f"**{plan.plan_name}**: all {total} phases done")
        return BuildPlanResult(status="success", phases_run=len(self._done))

    @workflow.query(name=STATUS_QUERY)
    def get_status(self) -> PlanStatus:
        plan = self._plan
        return PlanStatus(
            plan_name=plan.plan_name if plan else "",
            phases_total=len(plan.phases) if plan else 0, phases_done=list(self._done),
            current_phase=self._current, current_agent=self._current_agent,
            waiting_on=self._waiting, outcome=self._outcome, error=self._error)
