"""BuildPipelineWorkflow: the nine-stage build, deterministic decisions only.

1 prefab_scaffolding  2 implement_build  3 request_security_audit  4 process_triage_output
5 apply_flag_fixes (flags)  6 notify_blocks (blocks)  7 wait_for_block_resolution (blocks)
8 close_build  9 summarize_workflow (on every ending)

Stage 7 parks on nothing but its deadline timer: every decision (an operator's Update,
the originating task file through the worker's folder watcher, an approver in Matrix)
arrives as the approve_blocks / reject_blocks Update. Runs recorded before that design
(this project's own, and v0.5.0's, whose runs a worker adopts in flight) replay their
stage 7 as recorded: see `_wait_for_decision`.

Stages 4 and 9 run as local activities (in the worker running the workflow task, no
round trip through the server); stage 6 stays an ordinary activity: its calls to
ntfy, Matrix or a script may take minutes and are best seen pending in the Web UI.

Every change to the command sequence sits behind a `workflow.patched` id below, so each
history recorded before it still replays.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    TimeoutError,
)

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    import policies
    from models import (
        STARTED_BY_EARLIER_WORKER,
        AgentSetting,
        AgentTaskRequest,
        AuditRequest,
        AuditRound,
        BlockCheckInput,
        BlockResolution,
        BlockVerdict,
        BuildPhaseResult,
        BuildPipelineInput,
        BuildPipelineResult,
        Decision,
        DecisionSource,
        Finding,
        NotifyBlocksInput,
        NotifyBlocksResult,
        OpenTask,
        Outcome,
        PickupReminder,
        PipelineSetup,
        PipelineStatus,
        PrepareInput,
        RecordDecisionInput,
        StageEvent,
        StageRoute,
        StageTiming,
        SummaryInput,
        TaskNotice,
        TimeReport,
        TriageResult,
        WaitingOn,
    )
    from vocabulary import (
        APPLY_FLAG_FIXES,
        APPROVE_BLOCKS_UPDATE,
        APPROVED,
        AUDIT_REQUESTS_DIR,
        AUDIT_ROUND_DIR_PREFIX,
        BUILD_PIPELINE_WORKFLOW,
        CANCELLED,
        CLOSE_BUILD,
        CLOSE_OPEN_TASKS,
        DECISION_REFUSED,
        EXPIRED,
        IMPLEMENT_BUILD,
        INVALID_INPUT,
        NOTIFY_BLOCKS,
        PHASE_FAILED,
        PREFAB_SCAFFOLDING,
        PREPARE_PIPELINE,
        PROCESS_TRIAGE_OUTPUT,
        RECORD_DECISION,
        REJECT_BLOCKS_UPDATE,
        REMIND_PICKUP,
        REQUEST_CHANGES_UPDATE,
        REQUEST_SECURITY_AUDIT,
        ROUTE_STAGE,
        STAGE_NUMBERS,
        STATUS_QUERY,
        SUMMARIZE_WORKFLOW,
        TASK_BUILD_CLOSEOUT,
        TASK_BUILD_PLAN,
        TASK_BUILD_PREFAB,
        TASK_NOTICE_SIGNAL,
        TASK_SECURITY_AUDIT,
        TASK_SECURITY_FIX,
        TOTAL_STAGES,
        TRIAGE_INVALID,
        WAIT_FOR_BLOCK_RESOLUTION,
    )
    from workflows import instructions, rounds, timings
    from workflows.failures import (
        LOCAL_ACTIVITY_FAILURES,
        StageFailed,
        coerce_decision,
        decider_label,
        describe_activity_failure,
        span,
        validation_message,
    )
    from workflows.patches import (
        ADOPTED_PATCH_PREFIX,
        CHANGES_REQUESTED_PATCH,
        EVENT_DRIVEN_WAIT_PATCH,
        LOCAL_INLINE_PATCH,
        PICKUP_LIMITS_PATCH,
        PREPARE_PATCH,
        REAUDIT_PATCH,
        STAGE_ROUTING_PATCH,
        SUMMARY_FAILURE_PATCH,
    )

# Worker settings that pick the agents of stages 1 and 3 when the input names none.
AGENT_SETTINGS = {"prefab_agent": "PREFAB_AGENT", "security_agent": "SECURITY_AGENT"}


@workflow.defn(name=BUILD_PIPELINE_WORKFLOW)
class BuildPipelineWorkflow:
    def __init__(self) -> None:
        self._input: BuildPipelineInput | None = None
        self._setup: PipelineSetup | None = None
        self._adopted = False
        self._local_inline = False
        self._adoption_noted = False
        self._stage = "starting"
        self._stages_done: list[str] = []
        self._events: list[StageEvent] = []
        self._warnings: list[str] = []
        # task id -> what the folder watch said about it, while the run waits on it
        self._task_notices: dict[str, str] = {}
        self._triage = TriageResult()
        self._waiting: WaitingOn | None = None
        self._open_tasks: dict[str, str] = {}
        self._expired_tasks: dict[str, str] = {}
        self._paused = False
        self._pause_reason = ""
        self._awaiting_decision = False
        self._decision: Decision | None = None
        self._decided_by: str | None = None
        self._decision_source: DecisionSource | None = None
        self._claimed_by: str | None = None
        self._decision_note = ""
        self._decided_via_update = False
        self._decision_paths: list[str] = []
        self._notification_failures: list[str] = []
        self._origin_task_path: str | None = None
        self._outcome: Outcome | None = None
        self._failed_stage: str | None = None
        self._error: str | None = None
        self._closeout_path: str | None = None
        self._routing = False
        # stage -> the agent host's task queue it runs on; task id -> the host's queue
        self._task_queues: dict[str, str] = {}
        self._task_routes: dict[str, str] = {}
        self._closed_elsewhere: list[OpenTask] = []
        # Audit rounds (round 1 the first audit) and the re-audits this run may make.
        self._reaudit_limit = 0
        self._rounds: list[AuditRound] = []
        # The blocks the current decision is about, and every block's verdict so far.
        self._parked_blocks: list[Finding] = []
        self._verdicts: list[BlockVerdict] = []
        self._pickup_limits = False
        # task id -> where that agent task's time went (every run: state, not commands)
        self._stage_times: dict[str, StageTiming] = {}

    # ---- entry point -------------------------------------------------------------------

    @workflow.run
    async def run(self, raw_input: Any) -> BuildPipelineResult:
        # No marker: the run was started by an earlier worker (v0.5.0, or this service
        # before it resolved agents up front); it goes on under this one, and keeps the
        # input rules it started under.
        self._adopted = not workflow.patched(PREPARE_PATCH)
        # Stages 4 and 9 (reading the triage file, writing the summary) run as local
        # activities: in the worker that runs this workflow task, with no round trip
        # through the server and no extra workflow task. Decided once, at the start, so a
        # run keeps one shape: runs begun before this keep theirs.
        self._local_inline = workflow.patched(LOCAL_INLINE_PATCH)
        self._routing = workflow.patched(STAGE_ROUTING_PATCH)
        # Pickup and work limits per agent stage, decided once like the above.
        self._pickup_limits = workflow.patched(PICKUP_LIMITS_PATCH)
        try:
            pipeline = BuildPipelineInput.model_validate(
                raw_input, context={STARTED_BY_EARLIER_WORKER: self._adopted})
        except ValidationError as err:
            raise ApplicationError(f"invalid BuildPipelineInput: {validation_message(err)}",
                                   type=INVALID_INPUT, non_retryable=True) from None
        self._input = pipeline
        self._event("pipeline", "started", f"build {pipeline.build_name} → "
                                            f"{pipeline.target_agent}")
        if not self._adopted:
            await self._prepare(pipeline)
        self._reaudit_limit = self._reaudit_setting(pipeline)
        failure: StageFailed | None = None
        try:
            self._outcome = await self._run_stages(pipeline)
        except StageFailed as err:
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

    async def _prepare(self, pipeline: BuildPipelineInput) -> None:
        self._setup = await workflow.execute_local_activity(
            PREPARE_PIPELINE, PrepareInput(task_id=pipeline.task_id,
                                           build_name=pipeline.build_name,
                                           target_agent=pipeline.target_agent),
            result_type=PipelineSetup,
            start_to_close_timeout=policies.PREPARE.start_to_close,
            retry_policy=policies.PREPARE.retry, summary="resolve agents, find originating task")
        self._origin_task_path = self._setup.originating_task_path
        self._routing = self._routing and self._setup.routed
        if self._setup.warning:
            self._warnings.append(self._setup.warning)
            self._event("pipeline", "warning", self._setup.warning)

    async def _run_stages(self, pipeline: BuildPipelineInput) -> Outcome:
        await self._agent_stage(
            PREFAB_SCAFFOLDING, policies.PREFAB, self._task(
                pipeline, agent=self._stage_agent(pipeline, "prefab_agent"),
                agent_setting="prefab_agent", task_type=TASK_BUILD_PREFAB,
                summary=f"Prefab scaffolding for {pipeline.build_name}",
                instruction=instructions.prefab(pipeline.build_name, pipeline.plan_path)))
        await self._agent_stage(
            IMPLEMENT_BUILD, policies.IMPLEMENT, self._task(
                pipeline, agent=pipeline.target_agent, task_type=TASK_BUILD_PLAN,
                summary=f"Implement {pipeline.build_name}",
                instruction=instructions.implement(pipeline.build_name, pipeline.plan_path),
                extra={"originating_task_id": pipeline.task_id}))
        await self._security_audit(pipeline)
        # The triage is read where the audit was written: on stage 3's host.
        self._triage = await self._run_activity(
            PROCESS_TRIAGE_OUTPUT, policies.TRIAGE, pipeline.build_name,
            result_type=TriageResult, waiting=None, local=self._local_inline,
            task_queue=self._task_queues.get(REQUEST_SECURITY_AUDIT))
        triage = self._triage
        self._event(PROCESS_TRIAGE_OUTPUT, "triaged", f"{len(triage.blocks)} blocks, "
                    f"{len(triage.flags)} flags, {len(triage.info)} info")
        self._rounds.append(AuditRound(round=1, blocks=triage.blocks, flags=triage.flags,
                                       info=triage.info))
        if self._reaudit_limit > 0 and workflow.patched(REAUDIT_PATCH):
            return await self._audit_rounds(pipeline)
        if triage.flags:
            await self._fix_flags(pipeline, self._rounds[-1])
        if triage.blocks:
            self._parked_blocks = list(triage.blocks)
            outcome = await self._handle_blocks(pipeline, triage.blocks)
            if outcome != "partial":
                return outcome
        return await self._close_out(pipeline)

    async def _close_out(self, pipeline: BuildPipelineInput) -> Outcome:
        closeout = await self._agent_stage(
            CLOSE_BUILD, policies.CLOSE_BUILD, self._task(
                pipeline, agent=pipeline.target_agent, task_type=TASK_BUILD_CLOSEOUT,
                summary=f"Close out {pipeline.build_name}",
                instruction=instructions.closeout(pipeline.build_name, pipeline.plan_path)))
        self._closeout_path = closeout.output or None
        accepted = any(v.verdict == "accept" for v in self._verdicts)
        return "partial" if self._decision == "approved" or accepted else "success"

    async def _fix_flags(self, pipeline: BuildPipelineInput, current: AuditRound) -> None:
        """Stage 5: the round's flags to the target agent."""
        flags = current.flags
        extra: dict[str, Any] = {"flag_count": len(flags),
                                 "flags": instructions.finding_texts(flags)}
        if current.round > 1 or self._reaudit_limit > 0:
            extra["audit_round"] = current.round
        done = await self._agent_stage(
            APPLY_FLAG_FIXES, policies.FLAG_FIXES, self._task(
                pipeline, agent=pipeline.target_agent, task_type=TASK_SECURITY_FIX,
                summary=f"Fix {len(flags)} security flag(s) on {pipeline.build_name}",
                instruction=instructions.flag_fixes(pipeline.build_name, flags),
                extra=extra))
        current.sent_to_fix, current.fix_output = list(flags), done.output

    # ---- audit rounds (reaudit_rounds > 0) ----------------------------------------------

    def _reaudit_setting(self, pipeline: BuildPipelineInput) -> int:
        """The input's reaudit_rounds, else the worker's REAUDIT_ROUNDS as learned before
        stage 1 (0 for runs begun before either existed)."""
        if pipeline.reaudit_rounds is not None:
            return pipeline.reaudit_rounds
        return self._setup.reaudit_rounds if self._setup is not None else 0

    def _reaudits_left(self) -> int:
        return self._reaudit_limit - (len(self._rounds) - 1)

    async def _audit_rounds(self, pipeline: BuildPipelineInput) -> Outcome:
        """Fix what an audit found and audit again, at most `reaudit_rounds` times; flags
        the last allowed audit still finds become blocks (a person decides, rather than
        another fix nobody checks). An operator's "changes requested" takes the blocks
        back to the target agent for another round, within the same limit."""
        while True:
            current = self._rounds[-1]
            triage = self._triage
            if triage.flags and self._reaudits_left() > 0:
                await self._fix_flags(pipeline, current)
                await self._reaudit(pipeline, current)
                continue
            blocks = list(triage.blocks)
            if triage.flags:
                current.escalated_to_blocks = rounds.escalate(triage.flags)
                blocks += current.escalated_to_blocks
                self._event(PROCESS_TRIAGE_OUTPUT, "flags_escalated",
                            f"round {current.round}: {len(triage.flags)} flag(s) found by the "
                            f"last allowed audit become blocks")
            if not blocks:
                return await self._close_out(pipeline)
            outcome = await self._decide_round(pipeline, blocks)
            if outcome is None:
                await self._fix_changes(pipeline, current)
                await self._reaudit(pipeline, current)
                continue
            if outcome != "partial":
                return outcome
            return await self._close_out(pipeline)

    async def _decide_round(self, pipeline: BuildPipelineInput,
                            blocks: list[Finding]) -> Outcome | None:
        """Stages 6 and 7 for this round's blocks; None when changes were requested."""
        self._reset_decision()
        self._parked_blocks = blocks
        outcome = await self._handle_blocks(pipeline, blocks)
        if self._decision == "changes_requested" and workflow.patched(CHANGES_REQUESTED_PATCH):
            return None
        return outcome

    def _notice_round(self) -> dict[str, Any]:
        """What a block notice says about rounds (nothing for runs without them)."""
        if len(self._rounds) <= 1 and self._reaudit_limit == 0:
            return {}
        return {"round": len(self._rounds), "changes_allowed": self._reaudits_left() > 0}

    def _round_verdicts(self) -> list[BlockVerdict]:
        current = len(self._rounds) or 1
        return [v for v in self._verdicts if v.round == current]

    def _reset_decision(self) -> None:
        """A later round's blocks wait on a decision of their own."""
        self._decision = self._decided_by = self._decision_source = self._claimed_by = None
        self._decision_note, self._decided_via_update = "", False

    async def _fix_changes(self, pipeline: BuildPipelineInput, current: AuditRound) -> None:
        """The blocks an operator asked to have changed, with the note, to the target agent."""
        changed = [self._parked_blocks[v.index - 1] for v in self._verdicts
                   if v.round == current.round and v.verdict == "change"]
        note = self._decision_note
        current.sent_to_fix, current.changes_note = changed, note
        done = await self._agent_stage(
            APPLY_FLAG_FIXES, policies.FLAG_FIXES, self._task(
                pipeline, agent=pipeline.target_agent, task_type=TASK_SECURITY_FIX,
                summary=f"Make the changes asked for on {pipeline.build_name} "
                        f"({len(changed)} block(s))",
                instruction=instructions.requested_changes(pipeline.build_name, note, changed),
                extra={"flag_count": len(changed), "flags": instructions.finding_texts(changed),
                       "changes_requested": note, "audit_round": current.round}))
        current.fix_output = done.output

    async def _reaudit(self, pipeline: BuildPipelineInput, previous: AuditRound) -> None:
        """Stages 3 and 4 again, in a folder of the round's own."""
        number = previous.round + 1
        folder = f"{AUDIT_REQUESTS_DIR}/{pipeline.build_name}/{AUDIT_ROUND_DIR_PREFIX}{number}"
        where = f"{instructions.AUDIT_DIR_PLACEHOLDER}/{folder}"
        request = self._task(
            pipeline, agent=self._stage_agent(pipeline, "security_agent"),
            agent_setting="security_agent", task_type=TASK_SECURITY_AUDIT,
            summary=f"Security re-audit of {pipeline.build_name} (round {number})",
            instruction=instructions.security_reaudit(
                pipeline.build_name, number, f"{where}/request.md",
                f"{where}/triage-output.yml"),
            extra={"audit_folder": folder, "audit_round": number})
        self._event(REQUEST_SECURITY_AUDIT, "reaudit", f"round {number} of "
                                                       f"{self._reaudit_limit + 1}")
        await self._run_activity(
            REQUEST_SECURITY_AUDIT,
            policies.with_agent_limit(policies.SECURITY_AUDIT, pipeline.agent_timeout_seconds),
            AuditRequest(build_name=pipeline.build_name, plan_path=pipeline.plan_path,
                         target_agent=pipeline.target_agent, task=request, round=number,
                         previous=previous),
            result_type=BuildPhaseResult, waiting=request)
        self._triage = triage = await self._run_activity(
            PROCESS_TRIAGE_OUTPUT, policies.TRIAGE, (pipeline.build_name, number),
            result_type=TriageResult, waiting=None, local=self._local_inline,
            task_queue=self._task_queues.get(REQUEST_SECURITY_AUDIT))
        rounds.match_round(previous, [*triage.blocks, *triage.flags])
        self._rounds.append(AuditRound(round=number, blocks=triage.blocks, flags=triage.flags,
                                       info=triage.info))
        self._event(PROCESS_TRIAGE_OUTPUT, "triaged",
                    f"round {number}: {len(triage.blocks)} blocks, {len(triage.flags)} flags, "
                    f"{len(triage.info)} info; of round {previous.round}'s "
                    f"{len(previous.sent_to_fix)} sent to fix, "
                    f"{len(previous.verified_fixed)} verified fixed, "
                    f"{len(previous.still_present)} still found")
        self._details()

    # ---- stages ------------------------------------------------------------------------

    def _stage_agent(self, pipeline: BuildPipelineInput, setting: str) -> str | None:
        """The agent of stage 1 or 3: the input's choice, else the worker's setting as
        learned before stage 1 (None only for runs started before that step existed)."""
        chosen: str | None = getattr(pipeline, setting)
        if chosen:
            return chosen
        return getattr(self._setup, setting) if self._setup is not None else None

    def _task(self, pipeline: BuildPipelineInput, *, agent: str | None, task_type: str,
              summary: str, instruction: str, extra: dict[str, Any] | None = None,
              agent_setting: AgentSetting | None = None) -> AgentTaskRequest:
        """`agent=None` leaves the choice to the worker's setting named `agent_setting`."""
        return AgentTaskRequest(
            task_id=str(workflow.uuid4()), build_name=pipeline.build_name,
            target_agent=agent or "", agent_setting=agent_setting, task_type=task_type,
            summary=summary, instruction=instruction, plan_path=pipeline.plan_path,
            extra_payload=extra or {}, originating_task_id=pipeline.task_id)

    async def _agent_stage(self, stage: str, policy: policies.StagePolicy,
                           request: AgentTaskRequest) -> BuildPhaseResult:
        assert self._input is not None
        policy = policies.with_agent_limit(policy, self._input.agent_timeout_seconds)
        result: BuildPhaseResult = await self._run_activity(
            stage, policy, request, result_type=BuildPhaseResult, waiting=request)
        return result

    async def _security_audit(self, pipeline: BuildPipelineInput) -> None:
        folder = "audit-requests/" + pipeline.build_name
        request = self._task(
            pipeline, agent=self._stage_agent(pipeline, "security_agent"),
            agent_setting="security_agent", task_type=TASK_SECURITY_AUDIT,
            summary=f"Security audit of {pipeline.build_name}",
            instruction=instructions.security_audit(
                pipeline.build_name, f"<TEMPORAL_AUDIT_DIR>/{folder}/request.md",
                f"<TEMPORAL_AUDIT_DIR>/{folder}/triage-output.yml"),
            extra={"audit_folder": folder})
        await self._run_activity(
            REQUEST_SECURITY_AUDIT,
            policies.with_agent_limit(policies.SECURITY_AUDIT, pipeline.agent_timeout_seconds),
            AuditRequest(build_name=pipeline.build_name, plan_path=pipeline.plan_path,
                         target_agent=pipeline.target_agent, task=request),
            result_type=BuildPhaseResult, waiting=request)

    async def _handle_blocks(self, pipeline: BuildPipelineInput,
                             blocks: list[Finding]) -> Outcome:
        # A decision may land as soon as notify_blocks has marked the originating task,
        # before that activity reports back (or while it is retried after a worker died):
        # take it then, rather than refuse it and leave it to the watcher's next rescan.
        self._awaiting_decision = True
        try:
            notified = await self._run_activity(
                NOTIFY_BLOCKS, policies.NOTIFY_BLOCKS,
                NotifyBlocksInput(build_name=pipeline.build_name, task_id=pipeline.task_id,
                                  workflow_id=workflow.info().workflow_id, blocks=blocks,
                                  **self._notice_round()),
                result_type=NotifyBlocksResult | None, waiting=None)
        except BaseException:
            self._awaiting_decision = False
            raise
        # v0.5.0's notify_blocks returned nothing.
        notified = notified or NotifyBlocksResult()
        self._notification_failures = notified.failures
        self._decision_paths = notified.decision_paths
        self._origin_task_path = notified.originating_task_path or self._origin_task_path
        for failure in notified.failures:
            self._event(NOTIFY_BLOCKS, "notification_failed", failure)
        decision = await self._wait_for_decision(pipeline)
        if decision is None:
            self._event(WAIT_FOR_BLOCK_RESOLUTION, "timed_out",
                        f"no decision within {pipeline.block_wait_timeout_seconds:.0f}s")
            return "timed_out"
        if self._decided_via_update:
            await self._run_activity(
                RECORD_DECISION, policies.RECORD_DECISION,
                RecordDecisionInput(task_id=pipeline.task_id, path_hint=self._origin_task_path,
                                    decision=decision, actor=self._decided_by or "operator",
                                    note=self._decision_note,
                                    workflow_id=workflow.info().workflow_id,
                                    source=self._decision_source or "update",
                                    claimed_by=self._claimed_by,
                                    build_name=pipeline.build_name,
                                    verdicts=self._round_verdicts()),
                result_type=str, waiting=None, count_as_stage=False)
        self._event(WAIT_FOR_BLOCK_RESOLUTION, decision, f"by {self._decided_by}")
        return "partial" if decision == "approved" else "rejected"

    async def _wait_for_decision(self, pipeline: BuildPipelineInput) -> Decision | None:
        """Park until a decision or the deadline. Three shapes, by what history holds:

        - new runs: the deadline timer alone; decisions arrive as Updates;
        - parked by v0.5.0: its check activity (no timer beside it, as recorded); when
          that activity ends without a decision (its worker is gone), the deadline timer;
        - parked by this service before decisions were event-driven: the polling
          activity beside the deadline timer, as recorded.
        """
        stage = WAIT_FOR_BLOCK_RESOLUTION
        await self._enter(stage)
        deadline = timedelta(seconds=pipeline.block_wait_timeout_seconds)
        self._waiting = WaitingOn(kind="block_decision", stage=stage, task_id=pipeline.task_id,
                                  since=workflow.now())
        self._awaiting_decision = True
        self._details()
        started = workflow.now()
        poll: workflow.ActivityHandle[Any] | None = None
        try:
            if workflow.patched(EVENT_DRIVEN_WAIT_PATCH):
                await self._wait_until_decided(deadline)
                return self._decision
            if self._triage.recorded_by_v050:
                poll = self._start_check(stage, [pipeline.build_name, pipeline.task_id],
                                         v050=True)
                await workflow.wait_condition(self._decided_or(poll))
            else:
                poll = self._start_check(
                    stage, [BlockCheckInput(task_id=pipeline.task_id,
                                            path_hint=self._origin_task_path)],
                    interval=timedelta(seconds=pipeline.block_poll_interval_seconds),
                    deadline=deadline)
                await workflow.wait_condition(self._decided_or(poll), timeout=deadline,
                                              timeout_summary="block decision deadline")
            if self._decision is None:
                self._take_file_decision(poll)
            if self._decision is None:
                # The check ended without a decision; an Update can still decide.
                remaining = deadline - (workflow.now() - started)
                if remaining <= timedelta(0):
                    return None
                await self._wait_until_decided(remaining)
        except builtins.TimeoutError:
            return None
        finally:
            self._awaiting_decision = False
            self._waiting = None
            if poll is not None and not poll.done():
                poll.cancel()
            if self._decision is not None:
                self._finish(stage)
        return self._decision

    def _decided_or(self, check: workflow.ActivityHandle[Any]) -> Callable[[], bool]:
        return lambda: self._decision is not None or check.done()

    async def _wait_until_decided(self, timeout: timedelta) -> None:
        await workflow.wait_condition(lambda: self._decision is not None, timeout=timeout,
                                      timeout_summary="block decision deadline")

    def _start_check(self, stage: str, args: list[Any], *, v050: bool = False,
                     interval: timedelta | None = None,
                     deadline: timedelta | None = None) -> workflow.ActivityHandle[Any]:
        """The stage-7 check activity as histories recorded before event-driven
        decisions hold it (only replays and runs already parked that way get here)."""
        if v050:
            return workflow.start_activity(
                # A union hint, which the converter takes (the SDK annotates a class).
                stage, args=args, result_type=BlockResolution | None,  # type: ignore[arg-type]
                schedule_to_close_timeout=policies.V050_BLOCK_CHECK_LIMIT,
                heartbeat_timeout=policies.V050_BLOCK_CHECK_HEARTBEAT,
                retry_policy=policies.ONCE,
                cancellation_type=workflow.ActivityCancellationType.TRY_CANCEL)
        assert interval is not None
        assert deadline is not None
        return workflow.start_activity(
            stage, args=args, result_type=BlockResolution,
            start_to_close_timeout=policies.BLOCK_CHECK_ATTEMPT,
            schedule_to_close_timeout=deadline + policies.BLOCK_CHECK_HEADROOM,
            retry_policy=policies.block_poll_retry(interval),
            cancellation_type=workflow.ActivityCancellationType.TRY_CANCEL,
            summary=self._summary_line(stage, "task file or approve_blocks update"))

    def _take_file_decision(self, poll: workflow.ActivityHandle[Any] | None) -> None:
        if poll is None:
            return
        try:
            resolution = poll.result()
        except ActivityError as err:
            message, _ = describe_activity_failure(err)
            self._event(WAIT_FOR_BLOCK_RESOLUTION, "poll_failed",
                        f"{message}; waiting for a decision by Update, task file or chat")
            return
        if resolution is None:
            # v0.5.0's check returns nothing once the originating task is approved.
            resolution = BlockResolution(decision="approved", task_status=APPROVED)
        self._decision = resolution.decision
        self._decided_by, self._decision_source = "task file", "task_file"
        self._claimed_by = resolution.actor or None
        if self._claimed_by == "task file":
            self._claimed_by = None
        self._decision_note = resolution.note
        self._event(WAIT_FOR_BLOCK_RESOLUTION, "task_status", resolution.task_status)

    # ---- agent stages: pickup and work limits, where the time went ---------------------

    def _agent_limits(self, stage: str) -> policies.AgentLimits:
        pipeline = self._input
        assert pipeline is not None
        return policies.agent_limits(stage, pickup_seconds=pipeline.pickup_timeout_seconds,
                                     work_seconds=pipeline.work_timeout_seconds,
                                     overall_seconds=pipeline.agent_timeout_seconds)

    async def _await_agent(self, stage: str, policy: policies.StagePolicy, arg: Any,
                           result_type: Any, waiting: AgentTaskRequest,
                           task_queue: str | None = None) -> Any:
        """An agent stage whose activity holds the overall limit, watched from here:
        reminders while nobody claims the task past its pickup limit, and a failure when
        a claimed task stays silent past its work limit (the activity is cancelled)."""
        limits = self._agent_limits(stage)
        handle = workflow.start_activity(
            stage, args=list(arg) if isinstance(arg, tuple) else [arg],
            result_type=result_type, start_to_close_timeout=limits.overall,
            schedule_to_close_timeout=limits.overall, retry_policy=policy.retry,
            summary=self._summary_line(stage, self._agent_label(waiting)),
            task_queue=task_queue or None)
        try:
            await self._await_pickup(stage, waiting, handle, limits)
            await self._await_work(stage, waiting, handle, limits)
            return await handle
        except ActivityError as err:
            if not isinstance(err.cause, TimeoutError):
                raise
            raise self._overall_limit_passed(stage, waiting, limits) from None
        finally:
            if not handle.done():
                handle.cancel()

    async def _await_pickup(self, stage: str, waiting: AgentTaskRequest,
                            handle: workflow.ActivityHandle[Any],
                            limits: policies.AgentLimits) -> None:
        timing = self._stage_times[waiting.task_id]

        def moved() -> bool:
            return handle.done() or timing.picked_up_at is not None

        while not moved():
            if timing.reminders >= policies.PICKUP_REMINDERS:
                await workflow.wait_condition(moved)
                return
            try:
                await workflow.wait_condition(moved, timeout=limits.pickup,
                                              timeout_summary=f"pickup limit of {stage}")
            except builtins.TimeoutError:
                await self._remind(stage, timing, limits)

    async def _remind(self, stage: str, timing: StageTiming,
                      limits: policies.AgentLimits) -> None:
        """The pickup limit passed again: say so in the status, tell the channels."""
        timing.reminders += 1
        note = (f"waiting for pickup by {timing.agent} since "
                f"{timing.written_at:%Y-%m-%d %H:%M:%S}Z (pickup limit {span(limits.pickup)} "
                f"passed; reminder {timing.reminders} of {policies.PICKUP_REMINDERS})")
        if self._waiting is not None and self._waiting.task_id == timing.task_id:
            self._waiting = self._waiting.model_copy(update={"note": note})
        self._event(stage, "pickup_overdue", note)
        self._details()
        assert self._input is not None
        reminder = PickupReminder(
            build_name=self._input.build_name, workflow_id=workflow.info().workflow_id,
            stage=stage, agent=timing.agent, task_id=timing.task_id, since=timing.written_at,
            reminder=timing.reminders, of=policies.PICKUP_REMINDERS)
        try:
            failures = await workflow.execute_activity(
                REMIND_PICKUP, reminder, result_type=list[str],
                start_to_close_timeout=policies.REMIND_PICKUP.start_to_close,
                retry_policy=policies.REMIND_PICKUP.retry,
                summary=self._summary_line(REMIND_PICKUP, timing.agent))
        except ActivityError as err:
            if isinstance(err.cause, CancelledError):
                raise asyncio.CancelledError() from None
            failures = [describe_activity_failure(err)[0]]
        for failure in failures:
            self._event(stage, "reminder_failed", failure)

    async def _await_work(self, stage: str, waiting: AgentTaskRequest,
                          handle: workflow.ActivityHandle[Any],
                          limits: policies.AgentLimits) -> None:
        timing = self._stage_times[waiting.task_id]
        if handle.done() or timing.picked_up_at is None:
            return
        left = timing.picked_up_at + limits.work - workflow.now()
        if left > timedelta(0):
            try:
                await workflow.wait_condition(handle.done, timeout=left,
                                              timeout_summary=f"work limit of {stage}")
                return
            except builtins.TimeoutError:
                if handle.done():
                    return
        reason = (f"{timing.agent} claimed task {timing.task_id} at "
                  f"{timing.picked_up_at:%Y-%m-%d %H:%M:%S}Z and has not reported within the "
                  f"work limit of {span(limits.work)}: the agent went silent")
        self._expired_tasks[timing.task_id] = f"{stage}: work limit passed"
        self._timing_ended(waiting, "work_limit_passed")
        self._event(stage, "failed", reason)
        raise StageFailed(stage, reason, PHASE_FAILED)

    def _overall_limit_passed(self, stage: str, waiting: AgentTaskRequest,
                              limits: policies.AgentLimits) -> StageFailed:
        timing = self._stage_times[waiting.task_id]
        if timing.picked_up_at is None:
            reason = (f"nobody claimed task {timing.task_id} ({timing.agent}) within the "
                      f"stage's overall limit of {span(limits.overall)}")
        else:
            reason = (f"{timing.agent} claimed task {timing.task_id} but did not report "
                      f"within the stage's overall limit of {span(limits.overall)}")
        self._expired_tasks[timing.task_id] = f"{stage} timed out"
        self._timing_ended(waiting, "timed_out")
        self._event(stage, "failed", reason)
        return StageFailed(stage, reason, PHASE_FAILED)

    def _note_claim(self, notice: TaskNotice, waiting: WaitingOn) -> None:
        """The folder watch saw the task `in-progress`: the work limit counts from now."""
        timing = self._stage_times.get(notice.task_id)
        if timing is None or timing.picked_up_at is not None:
            return
        timing.picked_up_at = workflow.now()
        self._waiting = waiting.model_copy(update={"claimed_at": timing.picked_up_at,
                                                   "note": None})
        claimed = f" (its history names {notice.detail})" if notice.detail else ""
        self._event(waiting.stage, "claimed", f"task {notice.task_id}{claimed}")
        self._details()

    def _timing_started(self, stage: str, waiting: AgentTaskRequest) -> None:
        attempt = 1 + sum(1 for timing in self._stage_times.values() if timing.stage == stage)
        self._stage_times[waiting.task_id] = StageTiming(
            stage=stage, agent=self._agent_label(waiting), task_id=waiting.task_id,
            attempt=attempt, written_at=workflow.now())

    def _timing_ended(self, waiting: AgentTaskRequest | None, outcome: str) -> None:
        """The first ending of an agent task counts; later calls find it ended."""
        timing = self._stage_times.get(waiting.task_id) if waiting is not None else None
        if timing is not None and timing.outcome is None:
            timing.done_at, timing.outcome = workflow.now(), outcome

    def _pickup_lines(self, waiting: WaitingOn) -> list[str]:
        if waiting.note:
            return [f"**{waiting.note[:1].upper()}{waiting.note[1:]}**"]
        if waiting.claimed_at is not None:
            return [f"Claimed at {waiting.claimed_at:%Y-%m-%d %H:%M:%S}Z"]
        return []

    def _time_report(self) -> TimeReport:
        return timings.time_report(list(self._stage_times.values()), self._events,
                                   started=workflow.info().start_time,
                                   decided_by=self._decided_by,
                                   decision_source=self._decision_source)

    # ---- shared stage machinery ---------------------------------------------------------

    async def _run_activity(self, stage: str, policy: policies.StagePolicy, arg: Any, *,
                            result_type: Any, waiting: AgentTaskRequest | None,
                            count_as_stage: bool = True, local: bool = False,
                            task_queue: str | None = None) -> Any:
        """`task_queue`: an agent host's queue to run on (None: the workflow's own)."""
        if count_as_stage:
            await self._enter(stage)
        try:
            if waiting is not None and self._routing:
                task_queue = await self._route(stage, waiting)
            if waiting is not None:
                self._timing_started(stage, waiting)
            self._begin_wait(stage, waiting, task_queue)
            target = self._agent_label(waiting) if waiting is not None else None
            routed = {"task_queue": task_queue} if task_queue else {}
            if waiting is not None and self._pickup_limits:
                result = await self._await_agent(stage, policy, arg, result_type, waiting,
                                                 task_queue)
            else:
                execute: Callable[..., Awaitable[Any]] = (
                    workflow.execute_local_activity if local and not routed
                    else workflow.execute_activity)
                result = await execute(
                    stage, args=list(arg) if isinstance(arg, tuple) else [arg],
                    result_type=result_type,
                    start_to_close_timeout=policy.start_to_close,
                    schedule_to_close_timeout=policy.schedule_to_close,
                    retry_policy=policy.retry,
                    summary=self._summary_line(stage, target), **routed)
            self._timing_ended(waiting, "completed")
        except (ActivityError, *LOCAL_ACTIVITY_FAILURES) as err:
            cause = err.cause if isinstance(err, ActivityError) else err
            if isinstance(cause, CancelledError):
                # Only a cancel of the pipeline itself cancels a stage: end as cancelled.
                raise asyncio.CancelledError() from None
            message, failure_type = describe_activity_failure(err)
            self._timing_ended(waiting, "timed_out" if isinstance(cause, TimeoutError)
                               else "failed")
            if waiting is not None:
                if isinstance(cause, TimeoutError):
                    self._expired_tasks[waiting.task_id] = f"{stage} timed out"
                else:
                    # The agent reported the failure itself; its file already says so.
                    self._open_tasks.pop(waiting.task_id, None)
            self._event(stage, "failed", message)
            kind = TRIAGE_INVALID if failure_type == TRIAGE_INVALID else PHASE_FAILED
            raise StageFailed(stage, message, kind) from None
        finally:
            self._waiting = None
            self._timing_ended(waiting, "cancelled")
            if waiting is not None:
                self._task_notices.pop(waiting.task_id, None)
        if waiting is not None:
            self._open_tasks.pop(waiting.task_id, None)
        if count_as_stage:
            self._finish(stage)
        return result

    def _begin_wait(self, stage: str, waiting: AgentTaskRequest | None,
                    task_queue: str | None) -> None:
        if waiting is not None:
            self._waiting = WaitingOn(kind="agent", stage=stage, agent=self._agent_label(waiting),
                                      task_type=waiting.task_type, task_id=waiting.task_id,
                                      since=workflow.now(), task_queue=task_queue)
            self._open_tasks[waiting.task_id] = stage
            if task_queue:
                self._task_routes[waiting.task_id] = task_queue
        elif task_queue:
            # Shown so an operator sees which host's worker the stage waits for.
            self._waiting = WaitingOn(kind="activity", stage=stage, since=workflow.now(),
                                      task_queue=task_queue)
        else:
            return
        self._details()

    async def _route(self, stage: str, request: AgentTaskRequest) -> str | None:
        """The task queue of the host `request`'s agent runs on, read from the worker's
        AGENT_TASK_QUEUES when the stage starts: a changed map applies to every stage
        that starts after the change, never to one already under way."""
        route: StageRoute = await workflow.execute_local_activity(
            ROUTE_STAGE, request.target_agent, result_type=StageRoute,
            start_to_close_timeout=policies.ROUTE.start_to_close,
            retry_policy=policies.ROUTE.retry, summary=f"route {stage}")
        if route.task_queue:
            self._task_queues[stage] = route.task_queue
            self._event(stage, "routed", f"{route.agent} on task queue {route.task_queue}")
        else:  # a re-run of the stage (a re-audit) after the map lost its agent
            self._task_queues.pop(stage, None)
        return route.task_queue

    async def _enter(self, stage: str) -> None:
        if self._paused:
            self._event(stage, "held", f"paused: {self._pause_reason}")
            self._details()
            await workflow.wait_condition(lambda: not self._paused)
        if self._adopted and not self._adoption_noted and workflow.patched(
                ADOPTED_PATCH_PREFIX + stage):
            # The first stage this run enters under this worker: say so, once.
            self._note_adoption(f"carried on from {stage}")
        self._stage = stage
        self._event(stage, "started")
        self._details()

    def _note_adoption(self, detail: str) -> None:
        self._adoption_noted = True
        self._event("pipeline", "adopted", "started by an earlier worker (v0.5.0-compatible "
                                           f"history); {detail}")

    def _finish(self, stage: str) -> None:
        self._stages_done.append(stage)
        self._event(stage, "completed")

    def _open_task_list(self) -> list[OpenTask]:
        """Agent tasks no agent can finish any more, and why."""
        reason = {"cancelled": "pipeline cancelled", "rejected": "blocks rejected",
                  "timed_out": "block decision deadline passed"}.get(
            self._outcome or "", f"pipeline ended ({self._outcome})")
        tasks = []
        for task_id, stage in self._open_tasks.items():
            expired = self._expired_tasks.get(task_id)
            tasks.append(OpenTask(task_id=task_id, stage=stage,
                                  status=EXPIRED if expired else CANCELLED,
                                  reason=expired or reason,
                                  task_queue=self._task_routes.get(task_id)))
        return tasks

    async def _close_on_hosts(self) -> None:
        """Agent tasks left open on agent hosts: closed by each host's worker, since only
        it sees its folder. A host away past the limit leaves them open, said in events."""
        by_queue: dict[str, list[OpenTask]] = {}
        for task in self._open_task_list():
            if task.task_queue:
                by_queue.setdefault(task.task_queue, []).append(task)
        for queue, tasks in by_queue.items():
            try:
                closed = await workflow.execute_activity(
                    CLOSE_OPEN_TASKS, tasks, task_queue=queue, result_type=list[OpenTask],
                    start_to_close_timeout=policies.CLOSE_ON_HOST.start_to_close,
                    schedule_to_close_timeout=policies.CLOSE_ON_HOST.schedule_to_close,
                    retry_policy=policies.CLOSE_ON_HOST.retry,
                    summary=self._summary_line(SUMMARIZE_WORKFLOW, queue))
            except ActivityError as err:
                message, _ = describe_activity_failure(err)
                self._event(SUMMARIZE_WORKFLOW, "warning",
                            f"open tasks on task queue {queue} not closed: {message}")
                continue
            self._closed_elsewhere += closed
            for task in tasks:
                self._open_tasks.pop(task.task_id, None)

    async def _summarize(self, pipeline: BuildPipelineInput) -> str | None:
        self._stage = SUMMARIZE_WORKFLOW
        self._event(SUMMARIZE_WORKFLOW, "started", f"outcome {self._outcome}")
        self._details()
        execute = (workflow.execute_local_activity if self._local_inline
                   else workflow.execute_activity)
        if self._task_routes:
            await self._close_on_hosts()
        try:
            path = await self._write_summary(execute, pipeline)
        except (ActivityError, *LOCAL_ACTIVITY_FAILURES) as err:
            if not workflow.patched(SUMMARY_FAILURE_PATCH):
                raise
            message, _ = describe_activity_failure(err)
            self._warnings.append(f"summary not written: {message}")
            self._event(SUMMARIZE_WORKFLOW, "failed", message)
            self._details()
            return None
        self._open_tasks.clear()
        self._finish(SUMMARIZE_WORKFLOW)
        self._details()
        return path

    async def _write_summary(self, execute: Callable[..., Awaitable[str]],
                             pipeline: BuildPipelineInput) -> str:
        info = workflow.info()
        return await execute(
            SUMMARIZE_WORKFLOW,
            SummaryInput(
                workflow_id=info.workflow_id, run_id=info.run_id,
                build_name=pipeline.build_name, target_agent=pipeline.target_agent,
                plan_path=pipeline.plan_path, task_id=pipeline.task_id,
                outcome=self._outcome or "failed", failed_stage=self._failed_stage,
                error=self._error, stages_completed=[*self._stages_done, SUMMARIZE_WORKFLOW],
                started_at=info.start_time, ended_at=workflow.now(),
                blocks=self._triage.blocks, flags=self._triage.flags, info=self._triage.info,
                decision=self._decision, decided_by=self._decided_by,
                decision_source=self._decision_source, claimed_by=self._claimed_by,
                closeout_path=self._closeout_path,
                notification_failures=self._notification_failures, events=self._events,
                open_tasks=[task for task in self._open_task_list() if not task.task_queue],
                adopted=self._adopted, closed_elsewhere=self._closed_elsewhere,
                task_queues=dict(self._task_queues),
                rounds=self._rounds, block_verdicts=self._verdicts,
                tally=rounds.tally(self._rounds, self._verdicts),
                stage_times=list(self._stage_times.values())),
            result_type=str,
            start_to_close_timeout=policies.SUMMARY.start_to_close,
            retry_policy=policies.SUMMARY.retry,
            summary=self._summary_line(SUMMARIZE_WORKFLOW, None))

    def _result(self, pipeline: BuildPipelineInput, summary_path: str | None
                ) -> BuildPipelineResult:
        return BuildPipelineResult(
            status="complete" if CLOSE_BUILD in self._stages_done else "failed",
            workflow_id=workflow.info().workflow_id,
            outcome=self._outcome or "failed", build_name=pipeline.build_name,
            stages_completed=list(self._stages_done), failed_stage=self._failed_stage,
            error=self._error, blocks=len(self._triage.blocks), flags=len(self._triage.flags),
            info=len(self._triage.info), decision=self._decision,
            closeout_path=self._closeout_path, summary_path=summary_path,
            tally=rounds.tally(self._rounds, self._verdicts))

    # ---- Web UI story -------------------------------------------------------------------

    def _agent_label(self, request: AgentTaskRequest) -> str:
        if request.target_agent:
            return request.target_agent
        # Runs started before agents were resolved up front: the worker's setting decides.
        setting = request.agent_setting or "agent"
        return f"agent from {AGENT_SETTINGS.get(setting, setting)}"

    def _agents(self) -> dict[str, str]:
        pipeline = self._input
        if pipeline is None:
            return {}
        agents = {"target": pipeline.target_agent}
        for setting, stage in (("prefab_agent", "prefab"), ("security_agent", "security")):
            agents[stage] = (self._stage_agent(pipeline, setting)
                             or f"agent from {AGENT_SETTINGS[setting]}")
        return agents

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
        if self._adopted:
            lines.append("Adopted: started by an earlier worker (v0.5.0-compatible history)")
        for warning in self._all_warnings():
            lines.append(f"**Warning**: {warning}")
        if self._paused:
            lines.append(f"**Paused**: {self._pause_reason or 'no reason given'}")
        if self._waiting is not None and self._waiting.kind == "block_decision":
            lines.append(f"Waiting for a block decision since "
                         f"{self._waiting.since:%Y-%m-%d %H:%M:%S}Z "
                         f"(originating task `{self._waiting.task_id}`). Decide by:")
            lines.extend(f"- {path}" for path in self._decision_paths
                         or ["the approve_blocks / reject_blocks update"])
        elif self._waiting is not None:
            lines.append(self._waiting_line(self._waiting))
            lines.extend(self._pickup_lines(self._waiting))
        if self._triage.blocks or self._triage.flags or self._triage.info:
            lines.append(f"Triage: {len(self._triage.blocks)} blocks, "
                         f"{len(self._triage.flags)} flags, {len(self._triage.info)} info")
        lines.extend(self._round_lines())
        if self._notification_failures:
            lines.append("Notification failures: " + "; ".join(self._notification_failures))
        if self._decision is not None:
            claimed = f" (claims to be {self._claimed_by})" if self._claimed_by else ""
            lines.append(f"Decision: **{self._decision}** by {self._decided_by}{claimed}")
        if self._outcome is not None:
            lines.append(f"Outcome: **{self._outcome}**"
                         + (f" at `{self._failed_stage}`" if self._failed_stage else ""))
        lines.append("Done: " + (", ".join(self._stages_done) or "nothing yet"))
        if self._task_queues:
            lines.append("Agent hosts: " + ", ".join(
                f"`{stage}` on `{queue}`" for stage, queue in self._task_queues.items()))
        workflow.set_current_details("\n\n".join(lines))

    @staticmethod
    def _waiting_line(waiting: WaitingOn) -> str:
        since = f"{waiting.since:%Y-%m-%d %H:%M:%S}Z"
        host = f" on task queue `{waiting.task_queue}`" if waiting.task_queue else ""
        if waiting.kind == "activity":
            return f"Waiting since {since} for a worker{host} to run `{waiting.stage}`"
        return (f"Waiting on {waiting.agent}{host} since {since}"
                + (f" (task `{waiting.task_id}`)" if waiting.task_id else ""))

    def _round_lines(self) -> list[str]:
        """The audit rounds and block verdicts, for the Web UI (runs with rounds only)."""
        if self._reaudit_limit == 0 and len(self._rounds) <= 1 and not self._verdicts:
            return []
        lines = [f"Audit round {len(self._rounds)} of at most {self._reaudit_limit + 1}"]
        for done in self._rounds:
            line = (f"- round {done.round}: {len(done.blocks)} blocks, {len(done.flags)} flags"
                    f"; {len(done.sent_to_fix)} sent to fix")
            if done.verified_fixed or done.still_present:
                line += (f", {len(done.verified_fixed)} verified fixed, "
                         f"{len(done.still_present)} still found")
            if done.escalated_to_blocks:
                line += f"; {len(done.escalated_to_blocks)} flag(s) made blocks"
            lines.append(line)
        if self._awaiting_decision and self._parked_blocks:
            lines.append("Blocks to decide (by number):")
            lines.extend(f"{n}. {instructions.sanitize_finding(b.description)[:200]}"
                         for n, b in enumerate(self._parked_blocks, start=1))
            lines.append("Per block: verdicts accept / reject / change by number or id "
                         "(`--verdict N=…`, `block_verdicts` in the originating task)"
                         + ("; request changes: `tools/request-changes`" if
                            self._reaudits_left() > 0 else "; no re-audit left for changes"))
        lines.extend(f"- verdict round {v.round} block {v.index}: **{v.verdict}** by "
                     f"{v.decided_by} ({v.source})" for v in self._verdicts)
        return lines

    # ---- queries, updates, signals ------------------------------------------------------

    @workflow.query(name=STATUS_QUERY)
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
            decision_source=self._decision_source, claimed_by=self._claimed_by,
            decision_paths=list(self._decision_paths),
            notification_failures=list(self._notification_failures),
            agents=self._agents(), warnings=self._all_warnings(), adopted=self._adopted,
            task_queues=dict(self._task_queues),
            audit_round=len(self._rounds), reaudit_rounds=self._reaudit_limit,
            rounds=list(self._rounds), block_verdicts=list(self._verdicts),
            time=self._time_report())

    def _all_warnings(self) -> list[str]:
        return [*self._warnings, *self._task_notices.values()]

    @workflow.query
    def get_events(self) -> list[StageEvent]:
        return list(self._events)

    def _validate_decision(self, raw: Any) -> None:
        # Non-retryable: the CLI shows a plain ValueError as "retryable: true", and no
        # retry of the same Update can succeed.
        if not self._awaiting_decision or self._decision is not None:
            raise ApplicationError(f"pipeline is not waiting on blocks (stage: {self._stage}, "
                                   f"outcome: {self._outcome}, decision: {self._decision})",
                                   type=DECISION_REFUSED, non_retryable=True)
        try:
            choice = coerce_decision(raw)
        except ValidationError as err:
            raise ApplicationError(f"invalid decision: {validation_message(err)}",
                                   type=INVALID_INPUT, non_retryable=True) from None
        if (choice.source == "task_file" and choice.task_id is not None
                and self._input is not None and choice.task_id != self._input.task_id):
            raise ApplicationError(f"the deciding file carries task id {choice.task_id!r}, not "
                                   f"this pipeline's originating task", type=DECISION_REFUSED,
                                   non_retryable=True)

    def _check_verdicts(self, asked: Decision, raw: Any) -> None:
        """Per-block verdicts must name blocks that wait; a decision for another round's
        blocks, or changes requested with no re-audit left, is refused."""
        choice = coerce_decision(raw)
        current = len(self._rounds) or 1
        if choice.round is not None and choice.round != current:
            raise ApplicationError(f"the decision is for audit round {choice.round}; the blocks "
                                   f"of round {current} wait", type=DECISION_REFUSED,
                                   non_retryable=True)
        unknown = rounds.unknown_keys(self._parked_blocks, choice.verdicts)
        if unknown:
            raise ApplicationError(
                f"invalid decision: no block {', '.join(map(repr, unknown[:5]))} (blocks are "
                f"numbered 1-{len(self._parked_blocks)}, or named by their id)",
                type=INVALID_INPUT, non_retryable=True)
        verdicts = [v.verdict for v in rounds.block_verdicts(
            self._parked_blocks, asked, choice, round_no=current, decided_by="")]
        if rounds.overall(verdicts, asked) == "changes_requested" and (
                len(self._rounds) == 0 or self._reaudits_left() <= 0):
            raise ApplicationError(
                f"changes cannot be requested: no re-audit round left (reaudit_rounds "
                f"{self._reaudit_limit}); accept or reject each block", type=DECISION_REFUSED,
                non_retryable=True)

    def _decide(self, asked: Decision, raw: Any) -> str:
        choice = coerce_decision(raw)
        current = len(self._rounds) or 1
        given = rounds.block_verdicts(self._parked_blocks, asked, choice, round_no=current,
                                      decided_by=decider_label(choice))
        decision = rounds.overall((v.verdict for v in given), asked)
        self._verdicts.extend(given)
        self._decision, self._decided_by = decision, decider_label(choice)
        self._decision_source, self._claimed_by = choice.source, choice.claimed_by
        self._decision_note, self._decided_via_update = choice.note, True
        via = {"update": "by_update", "task_file": "by_task_file", "matrix": "by_matrix"}
        claimed = f" (claims to be {choice.claimed_by})" if choice.claimed_by else ""
        self._event(WAIT_FOR_BLOCK_RESOLUTION, f"{decision}_{via[choice.source]}",
                    f"{self._decided_by}{claimed}: {choice.note}".rstrip(": "))
        if choice.verdicts or decision != asked:
            self._event(WAIT_FOR_BLOCK_RESOLUTION, "verdicts", ", ".join(
                f"block {v.index}: {v.verdict}" for v in given))
        self._details()
        return decision

    @workflow.update(name=APPROVE_BLOCKS_UPDATE)
    def approve_blocks(self, decision: Any = None) -> str:
        """Accept the blocks (those not named otherwise in `verdicts`); the answer is the
        decision taken: a block marked reject or change makes it that."""
        return self._decide("approved", decision)

    @approve_blocks.validator
    def _check_approve(self, decision: Any = None) -> None:
        self._validate_decision(decision)
        self._check_verdicts("approved", decision)

    @workflow.update(name=REJECT_BLOCKS_UPDATE)
    def reject_blocks(self, decision: Any = None) -> str:
        return self._decide("rejected", decision)

    @reject_blocks.validator
    def _check_reject(self, decision: Any = None) -> None:
        self._validate_decision(decision)
        self._check_verdicts("rejected", decision)

    @workflow.update(name=REQUEST_CHANGES_UPDATE)
    def request_changes(self, decision: Any = None) -> str:
        """Send the blocks (those not named otherwise in `verdicts`) back to the target
        agent with the note, then audit again; only while a re-audit round is left."""
        return self._decide("changes_requested", decision)

    @request_changes.validator
    def _check_changes(self, decision: Any = None) -> None:
        self._validate_decision(decision)
        self._check_verdicts("changes_requested", decision)

    @workflow.signal(name=TASK_NOTICE_SIGNAL)
    def task_notice(self, raw: Any) -> None:
        """The folder watch's word about a task file of this run; only about the task it
        waits on now (anything else is stale, or not this run's)."""
        try:
            notice = TaskNotice.model_validate(raw)
        except ValidationError:
            return
        waiting = self._waiting
        if waiting is None or waiting.task_id != notice.task_id:
            return
        if notice.kind == "claimed":
            self._note_claim(notice, waiting)
            return
        if notice.kind == "routing_failed":
            text = (f"task {notice.task_id} ({waiting.stage}) could not be routed by the "
                    f"dispatcher, which retries: {notice.detail}")
        else:
            text = f"the decision in task {notice.task_id} cannot be read: {notice.detail}"
        if self._task_notices.get(notice.task_id) == text:
            return
        if notice.task_id not in self._task_notices:  # one event per task, not per rewrite
            self._event(waiting.stage, "warning", text)
        self._task_notices[notice.task_id] = text
        self._details()

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

    @workflow.signal
    def adopt(self, note: str = "") -> None:
        """Sent by a worker that takes over runs an earlier worker started: records the
        adoption at once, so a run parked for days shows it before anything else moves."""
        if self._adopted and not self._adoption_noted:
            self._note_adoption(note or f"taken over at {self._stage}")
        self._details()
