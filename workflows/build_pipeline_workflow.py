"""BuildPipelineWorkflow: the nine-stage build, deterministic decisions only.

1 prefab_scaffolding  2 implement_build  3 request_security_audit  4 process_triage_output
5 apply_flag_fixes (flags)  6 notify_blocks (blocks)  7 wait_for_block_resolution (blocks)
8 close_build  9 summarize_workflow (on every ending)

Stage 7 parks without holding worker resources: an activity whose retry policy is the
poll loop looks at the originating task file, racing an approve/reject Update or Signal
and the deadline timer.
"""

from __future__ import annotations

import asyncio
import builtins
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    import policies
    from exceptions import INVALID_INPUT, PHASE_FAILED, TRIAGE_INVALID
    from models import (
        AgentTaskRequest,
        AuditRequest,
        BlockCheckInput,
        BlockDecision,
        BlockResolution,
        BuildPhaseResult,
        BuildPipelineInput,
        BuildPipelineResult,
        Decision,
        Finding,
        NotifyBlocksInput,
        NotifyBlocksResult,
        Outcome,
        PipelineStatus,
        RecordDecisionInput,
        StageEvent,
        SummaryInput,
        TriageResult,
        WaitingOn,
    )
    from workflows import instructions

STAGE_NUMBERS = {
    "prefab_scaffolding": 1,
    "implement_build": 2,
    "request_security_audit": 3,
    "process_triage_output": 4,
    "apply_flag_fixes": 5,
    "notify_blocks": 6,
    "wait_for_block_resolution": 7,
    "close_build": 8,
    "summarize_workflow": 9,
}
TOTAL_STAGES = len(STAGE_NUMBERS)


class _StageFailed(Exception):
    """A stage ended the pipeline; carries the failure type for the workflow's error."""

    def __init__(self, stage: str, message: str, failure_type: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.failure_type = failure_type


def describe_activity_failure(err: ActivityError) -> tuple[str, str]:
    """(message, failure type) of a failed activity, for humans and for matching."""
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.message, cause.type or "ApplicationError"
    if isinstance(cause, TimeoutError):
        return f"timed out ({cause.type.name if cause.type else 'timeout'})", "TimeoutError"
    if isinstance(cause, CancelledError):
        return "cancelled", "CancelledError"
    return str(cause or err), type(cause or err).__name__


def validation_message(err: ValidationError) -> str:
    parts = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "input"
        parts.append(f"{where}: {problem['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def coerce_decision(raw: Any) -> BlockDecision:
    """approve_blocks/reject_blocks accept a note string, a BlockDecision, or nothing."""
    if raw is None:
        return BlockDecision()
    if isinstance(raw, BlockDecision):
        return raw
    if isinstance(raw, str):
        return BlockDecision(note=raw)
    return BlockDecision.model_validate(raw)


@workflow.defn(name="BuildPipelineWorkflow")
class BuildPipelineWorkflow:
    def __init__(self) -> None:
        self._input: BuildPipelineInput | None = None
        self._stage = "starting"
        self._stages_done: list[str] = []
        self._events: list[StageEvent] = []
        self._triage = TriageResult()
        self._waiting: WaitingOn | None = None
        self._paused = False
        self._pause_reason = ""
        self._awaiting_decision = False
        self._decision: Decision | None = None
        self._decided_by: str | None = None
        self._decision_note = ""
        self._decided_via_update = False
        self._notification_failures: list[str] = []
        self._origin_task_path: str | None = None
        self._outcome: Outcome | None = None
        self._failed_stage: str | None = None
        self._error: str | None = None
        self._closeout_path: str | None = None

    # ---- entry point -------------------------------------------------------------------

    @workflow.run
    async def run(self, raw_input: Any) -> BuildPipelineResult:
        try:
            pipeline = BuildPipelineInput.model_validate(raw_input)
        except ValidationError as err:
            raise ApplicationError(f"invalid BuildPipelineInput: {validation_message(err)}",
                                   type=INVALID_INPUT, non_retryable=True) from None
        self._input = pipeline
        self._event("pipeline", "started", f"build {pipeline.build_name} → "
                                            f"{pipeline.target_agent}")
        failure: _StageFailed | None = None
        try:
            self._outcome = await self._run_stages(pipeline)
        except _StageFailed as err:
            failure = err
            self._outcome, self._failed_stage, self._error = "failed", err.stage, str(err)
        except asyncio.CancelledError:
            # The cancel request is delivered once; the summary activity still runs.
            self._outcome, self._failed_stage = "cancelled", self._stage
            self._error = "pipeline cancelled"
            await self._summarize(pipeline)
            raise
        summary_path = await self._summarize(pipeline)
        if failure is not None:
            raise ApplicationError(f"{failure.stage} failed: {failure}",
                                   type=failure.failure_type, non_retryable=True)
        return self._result(pipeline, summary_path)

    async def _run_stages(self, pipeline: BuildPipelineInput) -> Outcome:
        await self._agent_stage(
            "prefab_scaffolding", policies.PREFAB, self._task(
                pipeline, agent=pipeline.prefab_agent, agent_setting="prefab_agent",
                task_type="build_prefab",
                summary=f"Prefab scaffolding for {pipeline.build_name}",
                instruction=instructions.prefab(pipeline.build_name, pipeline.plan_path)))
        await self._agent_stage(
            "implement_build", policies.IMPLEMENT, self._task(
                pipeline, agent=pipeline.target_agent, task_type="build_plan",
                summary=f"Implement {pipeline.build_name}",
                instruction=instructions.implement(pipeline.build_name, pipeline.plan_path)))
        await self._security_audit(pipeline)
        self._triage = await self._run_activity(
            "process_triage_output", policies.TRIAGE, pipeline.build_name,
            result_type=TriageResult, waiting=None)
        triage = self._triage
        self._event("process_triage_output", "triaged", f"{len(triage.blocks)} blocks, "
                    f"{len(triage.flags)} flags, {len(triage.info)} info")
        if triage.flags:
            await self._agent_stage(
                "apply_flag_fixes", policies.FLAG_FIXES, self._task(
                    pipeline, agent=pipeline.target_agent, task_type="security_fix",
                    summary=f"Fix {len(triage.flags)} security flag(s) on {pipeline.build_name}",
                    instruction=instructions.flag_fixes(pipeline.build_name, triage.flags),
                    extra={"flag_count": len(triage.flags)}))
        if triage.blocks:
            outcome = await self._handle_blocks(pipeline, triage.blocks)
            if outcome != "success":
                return outcome
        closeout = await self._agent_stage(
            "close_build", policies.CLOSE_BUILD, self._task(
                pipeline, agent=pipeline.target_agent, task_type="build_closeout",
                summary=f"Close out {pipeline.build_name}",
                instruction=instructions.closeout(pipeline.build_name, pipeline.plan_path)))
        self._closeout_path = closeout.output or None
        return "success"

    # ---- stages ------------------------------------------------------------------------

    def _task(self, pipeline: BuildPipelineInput, *, agent: str | None, task_type: str,
              summary: str, instruction: str, extra: dict[str, Any] | None = None,
              agent_setting: str | None = None) -> AgentTaskRequest:
        """`agent=None` leaves the choice to the worker's setting named `agent_setting`."""
        return AgentTaskRequest(
            task_id=str(workflow.uuid4()), build_name=pipeline.build_name,
            target_agent=agent or "", agent_setting=agent_setting, task_type=task_type,
            summary=summary, instruction=instruction, plan_path=pipeline.plan_path,
            extra_payload=extra or {})

    async def _agent_stage(self, stage: str, policy: policies.StagePolicy,
                           request: AgentTaskRequest) -> BuildPhaseResult:
        return await self._run_activity(stage, policy, request, result_type=BuildPhaseResult,
                                        waiting=request)

    async def _security_audit(self, pipeline: BuildPipelineInput) -> None:
        folder = "audit-requests/" + pipeline.build_name
        request = self._task(
            pipeline, agent=pipeline.security_agent, agent_setting="security_agent",
            task_type="security_audit",
            summary=f"Security audit of {pipeline.build_name}",
            instruction=instructions.security_audit(
                pipeline.build_name, f"<TEMPORAL_AUDIT_DIR>/{folder}/request.md",
                f"<TEMPORAL_AUDIT_DIR>/{folder}/triage-output.yml"),
            extra={"audit_folder": folder})
        await self._run_activity(
            "request_security_audit", policies.SECURITY_AUDIT,
            AuditRequest(build_name=pipeline.build_name, plan_path=pipeline.plan_path,
                         target_agent=pipeline.target_agent, task=request),
            result_type=BuildPhaseResult, waiting=request)

    async def _handle_blocks(self, pipeline: BuildPipelineInput,
                             blocks: list[Finding]) -> Outcome:
        notified = await self._run_activity(
            "notify_blocks", policies.NOTIFY_BLOCKS,
            NotifyBlocksInput(build_name=pipeline.build_name, task_id=pipeline.task_id,
                              workflow_id=workflow.info().workflow_id, blocks=blocks),
            result_type=NotifyBlocksResult, waiting=None)
        self._notification_failures = notified.failures
        self._origin_task_path = notified.originating_task_path
        for failure in notified.failures:
            self._event("notify_blocks", "notification_failed", failure)
        decision = await self._wait_for_decision(pipeline)
        if decision is None:
            self._event("wait_for_block_resolution", "timed_out",
                        f"no decision within {pipeline.block_wait_timeout_seconds:.0f}s")
            return "timed_out"
        if self._decided_via_update:
            await self._run_activity(
                "record_block_decision", policies.RECORD_DECISION,
                RecordDecisionInput(task_id=pipeline.task_id, path_hint=self._origin_task_path,
                                    decision=decision, actor=self._decided_by or "operator",
                                    note=self._decision_note,
                                    workflow_id=workflow.info().workflow_id),
                result_type=str, waiting=None, count_as_stage=False)
        self._event("wait_for_block_resolution", decision, f"by {self._decided_by}")
        return "success" if decision == "approved" else "rejected"

    async def _wait_for_decision(self, pipeline: BuildPipelineInput) -> Decision | None:
        stage = "wait_for_block_resolution"
        await self._enter(stage)
        deadline = timedelta(seconds=pipeline.block_wait_timeout_seconds)
        interval = timedelta(seconds=pipeline.block_poll_interval_seconds)
        self._waiting = WaitingOn(kind="block_decision", stage=stage, task_id=pipeline.task_id,
                                  since=workflow.now())
        self._awaiting_decision = True
        self._details()
        poll = workflow.start_activity(
            stage, BlockCheckInput(task_id=pipeline.task_id, path_hint=self._origin_task_path),
            result_type=BlockResolution,
            start_to_close_timeout=policies.BLOCK_CHECK_ATTEMPT,
            schedule_to_close_timeout=deadline + policies.BLOCK_CHECK_HEADROOM,
            retry_policy=policies.block_poll_retry(interval),
            cancellation_type=workflow.ActivityCancellationType.TRY_CANCEL,
            summary=self._summary_line(stage, "task file or approve_blocks update"))
        started = workflow.now()
        try:
            await workflow.wait_condition(
                lambda: self._decision is not None or poll.done(), timeout=deadline,
                timeout_summary="block decision deadline")
            if self._decision is None:
                self._take_file_decision(poll)
            if self._decision is None:
                # The poller stopped early (it should not); an update can still decide.
                remaining = deadline - (workflow.now() - started)
                if remaining <= timedelta(0):
                    return None
                await workflow.wait_condition(lambda: self._decision is not None,
                                              timeout=remaining,
                                              timeout_summary="block decision deadline")
        except builtins.TimeoutError:
            return None
        finally:
            self._awaiting_decision = False
            self._waiting = None
            if not poll.done():
                poll.cancel()
        self._finish(stage)
        return self._decision

    def _take_file_decision(self, poll: workflow.ActivityHandle[BlockResolution]) -> None:
        try:
            resolution = poll.result()
        except ActivityError as err:
            message, _ = describe_activity_failure(err)
            self._event("wait_for_block_resolution", "poll_failed", message)
            return
        self._decision = resolution.decision
        self._decided_by = resolution.actor or "task file"
        self._decision_note = resolution.note
        self._event("wait_for_block_resolution", "task_status", resolution.task_status)

    # ---- shared stage machinery ---------------------------------------------------------

    async def _run_activity(self, stage: str, policy: policies.StagePolicy, arg: Any, *,
                            result_type: type, waiting: AgentTaskRequest | None,
                            count_as_stage: bool = True) -> Any:
        if count_as_stage:
            await self._enter(stage)
        if waiting is not None:
            self._waiting = WaitingOn(kind="agent", stage=stage, agent=_agent_label(waiting),
                                      task_type=waiting.task_type, task_id=waiting.task_id,
                                      since=workflow.now())
            self._details()
        target = _agent_label(waiting) if waiting is not None else None
        try:
            result = await workflow.execute_activity(
                stage, arg, result_type=result_type,
                start_to_close_timeout=policy.start_to_close,
                schedule_to_close_timeout=policy.schedule_to_close,
                retry_policy=policy.retry,
                summary=self._summary_line(stage, target))
        except ActivityError as err:
            if isinstance(err.cause, CancelledError):
                # Only a cancel of the pipeline itself cancels a stage: end as cancelled.
                raise asyncio.CancelledError() from None
            message, failure_type = describe_activity_failure(err)
            self._event(stage, "failed", message)
            kind = TRIAGE_INVALID if failure_type == TRIAGE_INVALID else PHASE_FAILED
            raise _StageFailed(stage, message, kind) from None
        finally:
            self._waiting = None
        if count_as_stage:
            self._finish(stage)
        return result

    async def _enter(self, stage: str) -> None:
        if self._paused:
            self._event(stage, "held", f"paused: {self._pause_reason}")
            self._details()
            await workflow.wait_condition(lambda: not self._paused)
        self._stage = stage
        self._event(stage, "started")
        self._details()

    def _finish(self, stage: str) -> None:
        self._stages_done.append(stage)
        self._event(stage, "completed")

    async def _summarize(self, pipeline: BuildPipelineInput) -> str:
        self._stage = "summarize_workflow"
        self._event("summarize_workflow", "started", f"outcome {self._outcome}")
        self._details()
        info = workflow.info()
        path = await workflow.execute_activity(
            "summarize_workflow",
            SummaryInput(
                workflow_id=info.workflow_id, run_id=info.run_id,
                build_name=pipeline.build_name, target_agent=pipeline.target_agent,
                plan_path=pipeline.plan_path, task_id=pipeline.task_id,
                outcome=self._outcome or "failed", failed_stage=self._failed_stage,
                error=self._error, stages_completed=[*self._stages_done, "summarize_workflow"],
                started_at=info.start_time, ended_at=workflow.now(),
                blocks=self._triage.blocks, flags=self._triage.flags, info=self._triage.info,
                decision=self._decision, decided_by=self._decided_by,
                closeout_path=self._closeout_path,
                notification_failures=self._notification_failures, events=self._events),
            result_type=str,
            start_to_close_timeout=policies.SUMMARY.start_to_close,
            retry_policy=policies.SUMMARY.retry,
            summary=self._summary_line("summarize_workflow", None))
        self._finish("summarize_workflow")
        self._details()
        return path

    def _result(self, pipeline: BuildPipelineInput, summary_path: str) -> BuildPipelineResult:
        return BuildPipelineResult(
            outcome=self._outcome or "failed", build_name=pipeline.build_name,
            stages_completed=list(self._stages_done), failed_stage=self._failed_stage,
            error=self._error, blocks=len(self._triage.blocks), flags=len(self._triage.flags),
            info=len(self._triage.info), decision=self._decision,
            closeout_path=self._closeout_path, summary_path=summary_path)

    # ---- Web UI story -------------------------------------------------------------------

    def _summary_line(self, stage: str, target: str | None) -> str:
        # Helper activities (record_block_decision) carry the number of the stage they serve.
        number = STAGE_NUMBERS.get(stage) or STAGE_NUMBERS.get(self._stage, 0)
        line = f"{number}/{TOTAL_STAGES} {stage}"
        return f"{line} → {target}" if target else line

    def _event(self, stage: str, event: str, detail: str = "") -> None:
        self._events.append(StageEvent(at=workflow.now(), stage=stage, event=event,
                                       detail=detail))

    def _details(self) -> None:
        pipeline = self._input
        if pipeline is None:
            return
        number = STAGE_NUMBERS.get(self._stage, 0)
        lines = [f"**{pipeline.build_name}** → `{pipeline.target_agent}`",
                 f"Stage {number}/{TOTAL_STAGES}: `{self._stage}`"]
        if self._paused:
            lines.append(f"**Paused**: {self._pause_reason or 'no reason given'}")
        if self._waiting is not None:
            who = self._waiting.agent or "an approval"
            lines.append(f"Waiting on {who} since {self._waiting.since:%Y-%m-%d %H:%M:%S}Z"
                         + (f" (task `{self._waiting.task_id}`)" if self._waiting.task_id else ""))
        if self._triage.blocks or self._triage.flags or self._triage.info:
            lines.append(f"Triage: {len(self._triage.blocks)} blocks, "
                         f"{len(self._triage.flags)} flags, {len(self._triage.info)} info")
        if self._notification_failures:
            lines.append("Notification failures: " + "; ".join(self._notification_failures))
        if self._outcome is not None:
            lines.append(f"Outcome: **{self._outcome}**"
                         + (f" at `{self._failed_stage}`" if self._failed_stage else ""))
        lines.append("Done: " + (", ".join(self._stages_done) or "nothing yet"))
        workflow.set_current_details("\n\n".join(lines))

    # ---- queries, updates, signals ------------------------------------------------------

    @workflow.query
    def get_status(self) -> PipelineStatus:
        pipeline = self._input
        return PipelineStatus(
            build_name=pipeline.build_name if pipeline else "",
            stage=self._stage, stage_number=STAGE_NUMBERS.get(self._stage, 0),
            stages_done=list(self._stages_done), blocks=len(self._triage.blocks),
            flags=len(self._triage.flags), info=len(self._triage.info),
            waiting_on=self._waiting, paused=self._paused, pause_reason=self._pause_reason,
            outcome=self._outcome, failed_stage=self._failed_stage, error=self._error,
            decision=self._decision, decided_by=self._decided_by,
            notification_failures=list(self._notification_failures))

    @workflow.query
    def get_events(self) -> list[StageEvent]:
        return list(self._events)

    def _validate_decision(self, raw: Any) -> None:
        if not self._awaiting_decision or self._decision is not None:
            raise ValueError(f"pipeline is not waiting on blocks (stage: {self._stage}, "
                             f"outcome: {self._outcome})")
        coerce_decision(raw)

    def _decide(self, decision: Decision, raw: Any) -> str:
        choice = coerce_decision(raw)
        self._decision, self._decided_by = decision, choice.decided_by
        self._decision_note, self._decided_via_update = choice.note, True
        self._event("wait_for_block_resolution", f"{decision}_by_update",
                    f"{choice.decided_by}: {choice.note}".rstrip(": "))
        return decision

    @workflow.update
    def approve_blocks(self, decision: Any = None) -> str:
        return self._decide("approved", decision)

    @approve_blocks.validator
    def _check_approve(self, decision: Any = None) -> None:
        self._validate_decision(decision)

    @workflow.update
    def reject_blocks(self, decision: Any = None) -> str:
        return self._decide("rejected", decision)

    @reject_blocks.validator
    def _check_reject(self, decision: Any = None) -> None:
        self._validate_decision(decision)

    @workflow.signal
    def pause(self, reason: str = "") -> None:
        self._paused, self._pause_reason = True, reason
        self._event(self._stage, "paused", reason)
        self._details()

    @workflow.signal
    def resume(self, reason: str = "") -> None:
        self._paused, self._pause_reason = False, ""
        self._event(self._stage, "resumed", reason)
        self._details()


def _agent_label(request: AgentTaskRequest) -> str:
    return request.target_agent or f"${(request.agent_setting or 'agent').upper()}"
