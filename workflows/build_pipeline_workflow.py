"""BuildPipelineWorkflow: the nine-stage build, deterministic decisions only.

1 prefab_scaffolding  2 implement_build  3 request_security_audit  4 process_triage_output
5 apply_flag_fixes (flags)  6 notify_blocks (blocks)  7 wait_for_block_resolution (blocks)
8 close_build  9 summarize_workflow (on every ending)

Stage 7 parks on nothing but its deadline timer: every decision (an operator's Update,
the originating task file through the worker's folder watcher, an approver in Matrix)
arrives as the approve_blocks / reject_blocks Update. Runs recorded before that design
(this project's own, and v0.5.0's, whose runs a worker adopts in flight) replay their
stage 7 as recorded: workflows/legacy_stage7.py.

Stages 4 and 9 run as local activities (in the worker running the workflow task, no
round trip through the server); stage 6 stays an ordinary activity: its calls to
ntfy, Matrix or a script may take minutes and are best seen pending in the Web UI.

Every change to the command sequence sits behind a `workflow.patched` id
(workflows/patches.py), so each history recorded before it still replays. What a run
knows is one PipelineState (workflows/pipeline_state.py); every activity is called by
reference to its contract (workflows/contracts.py).
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
    CancelledError,
    TimeoutError,
)

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    import policies
    from exceptions import (
        DecisionRefusedError,
        InvalidInputError,
        PhaseFailedError,
        TriageInvalidError,
    )
    from models import (
        STARTED_BY_EARLIER_WORKER,
        AgentSetting,
        AgentTaskRequest,
        AuditRequest,
        AuditRound,
        BlockVerdict,
        BuildPhaseResult,
        BuildPipelineInput,
        BuildPipelineResult,
        Decision,
        Finding,
        NotifyBlocksInput,
        NotifyBlocksResult,
        OpenTask,
        Outcome,
        PickupReminder,
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
        ADOPT_SIGNAL,
        APPROVE_BLOCKS_UPDATE,
        AUDIT_REQUESTS_DIR,
        AUDIT_ROUND_DIR_PREFIX,
        BUILD_PIPELINE_WORKFLOW,
        CANCELLED,
        CLOSE_BUILD,
        EVENTS_QUERY,
        EXPIRED,
        NOTIFY_BLOCKS,
        PAUSE_SIGNAL,
        PROCESS_TRIAGE_OUTPUT,
        REJECT_BLOCKS_UPDATE,
        REMIND_PICKUP,
        REQUEST_CHANGES_UPDATE,
        REQUEST_SECURITY_AUDIT,
        RESUME_SIGNAL,
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
        WAIT_FOR_BLOCK_RESOLUTION,
    )
    from workflows import instructions, legacy_stage7, rounds, timings
    from workflows.contracts import BuildPipelineActivities, stage_name
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
        REAUDIT_PATCH,
        SUMMARY_FAILURE_PATCH,
    )
    from workflows.pipeline_state import PipelineState, RunShape

# Worker settings that pick the agents of stages 1 and 3 when the input names none.
AGENT_SETTINGS = {"prefab_agent": "PREFAB_AGENT", "security_agent": "SECURITY_AGENT"}


@workflow.defn(name=BUILD_PIPELINE_WORKFLOW)
class BuildPipelineWorkflow:
    """`run` reads as the stages in order; queries, Updates and signals read and change
    `self.state`."""

    def __init__(self) -> None:
        self.state = PipelineState()

    # ---- entry point: the run, before stage 1 --------------------------------------------

    @workflow.run
    async def run(self, raw_input: Any) -> BuildPipelineResult:
        """The run's shape and input, stages 1-8 (`_run_stages`), then stage 9, the
        summary, on every ending."""
        pipeline = await self._start(raw_input)
        failure: StageFailed | None = None
        try:
            self.state.outcome = await self._run_stages(pipeline)
        except StageFailed as err:
            failure = err
            self.state.outcome, self.state.failed_stage = "failed", err.stage
            self.state.error = str(err)
        except asyncio.CancelledError:
            # The cancel request is delivered once; the summary activity still runs.
            self.state.outcome, self.state.failed_stage = "cancelled", self.state.stage
            self.state.error = "pipeline cancelled"
            await self._summarize(pipeline)
            raise
        summary_path = await self._summarize(pipeline)
        if failure is not None:
            # A run's failure is final whatever the stage's kind of failure was.
            raise failure.kind.failure(f"{failure.stage} failed: {failure}", non_retryable=True)
        return self._result(pipeline, summary_path)

    async def _start(self, raw_input: Any) -> BuildPipelineInput:
        """Before stage 1: the run's shape, its input checked (by the rules it started
        under), the agents and originating task (runs this worker started)."""
        state = self.state
        state.shape = RunShape.of_this_run()
        try:
            pipeline = BuildPipelineInput.model_validate(
                raw_input, context={STARTED_BY_EARLIER_WORKER: state.shape.adopted})
        except ValidationError as err:
            raise InvalidInputError.failure(
                f"invalid BuildPipelineInput: {validation_message(err)}") from None
        state.input = pipeline
        self._event("pipeline", "started", f"build {pipeline.build_name} → "
                                            f"{pipeline.target_agent}")
        if not state.shape.adopted:
            await self._prepare(pipeline)
        state.reaudit_limit = self._reaudit_setting(pipeline)
        return pipeline

    async def _prepare(self, pipeline: BuildPipelineInput) -> None:
        state = self.state
        state.setup = setup = await workflow.execute_local_activity_method(
            BuildPipelineActivities.prepare_pipeline,
            PrepareInput(task_id=pipeline.task_id, build_name=pipeline.build_name,
                         target_agent=pipeline.target_agent),
            start_to_close_timeout=policies.PREPARE.start_to_close,
            retry_policy=policies.PREPARE.retry, summary="resolve agents, find originating task")
        state.origin_task_path = setup.originating_task_path
        state.shape.routing = state.shape.routing and setup.routed
        if setup.warning:
            state.warnings.append(setup.warning)
            self._event("pipeline", "warning", setup.warning)

    # ---- the nine stages, in order -------------------------------------------------------

    async def _run_stages(self, pipeline: BuildPipelineInput) -> Outcome:
        """Stages 1 to 8 in order (audit rounds repeat 3 to 7); stage 9 follows in `run`."""
        await self._prefab(pipeline)
        await self._implement(pipeline)
        await self._security_audit(pipeline)
        triage = await self._process_triage(pipeline)
        if self.state.reaudit_limit > 0 and workflow.patched(REAUDIT_PATCH):
            return await self._audit_rounds(pipeline)
        if triage.flags:
            await self._fix_flags(pipeline, self.state.rounds[-1])
        if triage.blocks:
            self.state.parked_blocks = list(triage.blocks)
            outcome = await self._handle_blocks(pipeline, triage.blocks)
            if outcome != "partial":
                return outcome
        return await self._close_out(pipeline)

    async def _prefab(self, pipeline: BuildPipelineInput) -> None:
        """Stage 1: the prefab agent scaffolds the build."""
        await self._agent_stage(
            BuildPipelineActivities.prefab_scaffolding, policies.PREFAB, self._task(
                pipeline, agent=self._stage_agent(pipeline, "prefab_agent"),
                agent_setting="prefab_agent", task_type=TASK_BUILD_PREFAB,
                summary=f"Prefab scaffolding for {pipeline.build_name}",
                instruction=instructions.prefab(pipeline.build_name, pipeline.plan_path)))

    async def _implement(self, pipeline: BuildPipelineInput) -> None:
        """Stage 2: the target agent implements the plan."""
        await self._agent_stage(
            BuildPipelineActivities.implement_build, policies.IMPLEMENT, self._task(
                pipeline, agent=pipeline.target_agent, task_type=TASK_BUILD_PLAN,
                summary=f"Implement {pipeline.build_name}",
                instruction=instructions.implement(pipeline.build_name, pipeline.plan_path),
                extra={"originating_task_id": pipeline.task_id}))

    async def _security_audit(self, pipeline: BuildPipelineInput) -> None:
        """Stage 3: request.md and the security agent's task (the first audit round)."""
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
            BuildPipelineActivities.request_security_audit,
            policies.with_agent_limit(policies.SECURITY_AUDIT, pipeline.agent_timeout_seconds),
            AuditRequest(build_name=pipeline.build_name, plan_path=pipeline.plan_path,
                         target_agent=pipeline.target_agent, task=request),
            waiting=request)

    async def _process_triage(self, pipeline: BuildPipelineInput) -> TriageResult:
        """Stage 4: the first audit's triage, read where the audit was written (on stage
        3's host), as audit round 1."""
        state = self.state
        triage: TriageResult = await self._run_activity(
            BuildPipelineActivities.process_triage_output, policies.TRIAGE,
            pipeline.build_name, waiting=None, local=state.shape.local_inline,
            task_queue=state.task_queues.get(REQUEST_SECURITY_AUDIT))
        state.triage = triage
        self._event(PROCESS_TRIAGE_OUTPUT, "triaged", f"{len(triage.blocks)} blocks, "
                    f"{len(triage.flags)} flags, {len(triage.info)} info")
        state.rounds.append(AuditRound(round=1, blocks=triage.blocks, flags=triage.flags,
                                       info=triage.info))
        return triage

    async def _fix_flags(self, pipeline: BuildPipelineInput, current: AuditRound) -> None:
        """Stage 5: the round's flags to the target agent."""
        flags = current.flags
        extra: dict[str, Any] = {"flag_count": len(flags),
                                 "flags": instructions.finding_texts(flags)}
        if current.round > 1 or self.state.reaudit_limit > 0:
            extra["audit_round"] = current.round
        done = await self._agent_stage(
            BuildPipelineActivities.apply_flag_fixes, policies.FLAG_FIXES, self._task(
                pipeline, agent=pipeline.target_agent, task_type=TASK_SECURITY_FIX,
                summary=f"Fix {len(flags)} security flag(s) on {pipeline.build_name}",
                instruction=instructions.flag_fixes(pipeline.build_name, flags),
                extra=extra))
        current.sent_to_fix, current.fix_output = list(flags), done.output

    async def _handle_blocks(self, pipeline: BuildPipelineInput,
                             blocks: list[Finding]) -> Outcome:
        """Stages 6 and 7: tell the operators, then park until a decision."""
        await self._notify_blocks(pipeline, blocks)
        decision = await self._wait_for_decision(pipeline)
        if decision is None:
            self._event(WAIT_FOR_BLOCK_RESOLUTION, "timed_out",
                        f"no decision within {pipeline.block_wait_timeout_seconds:.0f}s")
            return "timed_out"
        if self.state.decision.via_update:
            await self._record_decision(pipeline, decision)
        self._event(WAIT_FOR_BLOCK_RESOLUTION, decision, f"by {self.state.decision.decided_by}")
        return "partial" if decision == "approved" else "rejected"

    async def _notify_blocks(self, pipeline: BuildPipelineInput, blocks: list[Finding]) -> None:
        """Stage 6. A decision may land as soon as notify_blocks has marked the originating
        task, before that activity reports back (or while it is retried after a worker
        died): taken then, rather than refused and left to the watcher's next rescan."""
        state = self.state
        state.decision.awaiting = True
        try:
            notified = await self._run_activity(
                BuildPipelineActivities.notify_blocks, policies.NOTIFY_BLOCKS,
                NotifyBlocksInput(build_name=pipeline.build_name, task_id=pipeline.task_id,
                                  workflow_id=workflow.info().workflow_id, blocks=blocks,
                                  **self._notice_round()),
                waiting=None)
        except BaseException:
            state.decision.awaiting = False
            raise
        # v0.5.0's notify_blocks returned nothing.
        notified = notified or NotifyBlocksResult()
        state.notification_failures = notified.failures
        state.decision.paths = notified.decision_paths
        state.origin_task_path = notified.originating_task_path or state.origin_task_path
        for failure in notified.failures:
            self._event(NOTIFY_BLOCKS, "notification_failed", failure)

    async def _wait_for_decision(self, pipeline: BuildPipelineInput) -> Decision | None:
        """Stage 7: park on the deadline timer alone until a decision (an Update: from an
        operator, the originating task file through the folder watcher, or chat) or the
        deadline. Runs parked in an older shape of stage 7 wait as their history
        recorded it (workflows/legacy_stage7.py)."""
        stage = WAIT_FOR_BLOCK_RESOLUTION
        await self._enter(stage)
        state = self.state
        deadline = timedelta(seconds=pipeline.block_wait_timeout_seconds)
        state.waiting = WaitingOn(kind="block_decision", stage=stage, task_id=pipeline.task_id,
                                  since=workflow.now())
        state.decision.awaiting = True
        self._details()
        started = workflow.now()
        try:
            if workflow.patched(EVENT_DRIVEN_WAIT_PATCH):
                await state.decision.until_taken(deadline)
            else:
                await legacy_stage7.wait(state, pipeline, deadline, started)
        except builtins.TimeoutError:
            return None
        finally:
            state.decision.awaiting = False
            state.waiting = None
            if state.decision.taken is not None:
                self._finish(stage)
        return state.decision.taken

    async def _record_decision(self, pipeline: BuildPipelineInput, decision: Decision) -> None:
        """After stage 7: the decision into the originating task's history."""
        taken = self.state.decision
        await self._run_activity(
            BuildPipelineActivities.record_block_decision, policies.RECORD_DECISION,
            RecordDecisionInput(task_id=pipeline.task_id, path_hint=self.state.origin_task_path,
                                decision=decision, actor=taken.decided_by or "operator",
                                note=taken.note, workflow_id=workflow.info().workflow_id,
                                source=taken.source or "update", claimed_by=taken.claimed_by,
                                build_name=pipeline.build_name,
                                verdicts=self._round_verdicts()),
            waiting=None, count_as_stage=False)

    async def _close_out(self, pipeline: BuildPipelineInput) -> Outcome:
        """Stage 8: the target agent closes the build out."""
        state = self.state
        closeout = await self._agent_stage(
            BuildPipelineActivities.close_build, policies.CLOSE_BUILD, self._task(
                pipeline, agent=pipeline.target_agent, task_type=TASK_BUILD_CLOSEOUT,
                summary=f"Close out {pipeline.build_name}",
                instruction=instructions.closeout(pipeline.build_name, pipeline.plan_path)))
        state.closeout_path = closeout.output or None
        accepted = any(v.verdict == "accept" for v in state.verdicts)
        return "partial" if state.decision.taken == "approved" or accepted else "success"

    async def _summarize(self, pipeline: BuildPipelineInput) -> str | None:
        """Stage 9, on every ending: open agent tasks closed (on their hosts first), then
        the summary file; its path, or None when it could not be written."""
        state = self.state
        state.stage = SUMMARIZE_WORKFLOW
        self._event(SUMMARIZE_WORKFLOW, "started", f"outcome {state.outcome}")
        self._details()
        execute = (workflow.execute_local_activity_method if state.shape.local_inline
                   else workflow.execute_activity_method)
        if state.task_routes:
            await self._close_on_hosts()
        try:
            path = await self._write_summary(execute, pipeline)
        except (ActivityError, *LOCAL_ACTIVITY_FAILURES) as err:
            if not workflow.patched(SUMMARY_FAILURE_PATCH):
                raise
            message, _ = describe_activity_failure(err)
            state.warnings.append(f"summary not written: {message}")
            self._event(SUMMARIZE_WORKFLOW, "failed", message)
            self._details()
            return None
        state.open_tasks.clear()
        self._finish(SUMMARIZE_WORKFLOW)
        self._details()
        return path

    async def _close_on_hosts(self) -> None:
        """Agent tasks left open on agent hosts: closed by each host's worker, since only
        it sees its folder. A host away past the limit leaves them open, said in events."""
        state = self.state
        by_queue: dict[str, list[OpenTask]] = {}
        for task in self._open_task_list():
            if task.task_queue:
                by_queue.setdefault(task.task_queue, []).append(task)
        for queue, tasks in by_queue.items():
            try:
                closed = await workflow.execute_activity_method(
                    BuildPipelineActivities.close_open_tasks, tasks, task_queue=queue,
                    start_to_close_timeout=policies.CLOSE_ON_HOST.start_to_close,
                    schedule_to_close_timeout=policies.CLOSE_ON_HOST.schedule_to_close,
                    retry_policy=policies.CLOSE_ON_HOST.retry,
                    summary=self._summary_line(SUMMARIZE_WORKFLOW, queue))
            except ActivityError as err:
                message, _ = describe_activity_failure(err)
                self._event(SUMMARIZE_WORKFLOW, "warning",
                            f"open tasks on task queue {queue} not closed: {message}")
                continue
            state.closed_elsewhere += closed
            for task in tasks:
                state.open_tasks.pop(task.task_id, None)

    def _open_task_list(self) -> list[OpenTask]:
        """Agent tasks no agent can finish any more, and why."""
        state = self.state
        reason = {"cancelled": "pipeline cancelled", "rejected": "blocks rejected",
                  "timed_out": "block decision deadline passed"}.get(
            state.outcome or "", f"pipeline ended ({state.outcome})")
        tasks = []
        for task_id, stage in state.open_tasks.items():
            expired = state.expired_tasks.get(task_id)
            tasks.append(OpenTask(task_id=task_id, stage=stage,
                                  status=EXPIRED if expired else CANCELLED,
                                  reason=expired or reason,
                                  task_queue=state.task_routes.get(task_id)))
        return tasks

    async def _write_summary(self, execute: Callable[..., Any],
                             pipeline: BuildPipelineInput) -> str:
        state = self.state
        info = workflow.info()
        path: str = await execute(
            BuildPipelineActivities.summarize_workflow,
            SummaryInput(
                workflow_id=info.workflow_id, run_id=info.run_id,
                build_name=pipeline.build_name, target_agent=pipeline.target_agent,
                plan_path=pipeline.plan_path, task_id=pipeline.task_id,
                outcome=state.outcome or "failed", failed_stage=state.failed_stage,
                error=state.error, stages_completed=[*state.stages_done, SUMMARIZE_WORKFLOW],
                started_at=info.start_time, ended_at=workflow.now(),
                blocks=state.triage.blocks, flags=state.triage.flags, info=state.triage.info,
                decision=state.decision.taken, decided_by=state.decision.decided_by,
                decision_source=state.decision.source, claimed_by=state.decision.claimed_by,
                closeout_path=state.closeout_path,
                notification_failures=state.notification_failures, events=state.events,
                open_tasks=[task for task in self._open_task_list() if not task.task_queue],
                adopted=state.shape.adopted, closed_elsewhere=state.closed_elsewhere,
                task_queues=dict(state.task_queues),
                rounds=state.rounds, block_verdicts=state.verdicts,
                tally=rounds.tally(state.rounds, state.verdicts),
                stage_times=list(state.stage_times.values())),
            start_to_close_timeout=policies.SUMMARY.start_to_close,
            retry_policy=policies.SUMMARY.retry,
            summary=self._summary_line(SUMMARIZE_WORKFLOW, None))
        return path

    def _result(self, pipeline: BuildPipelineInput, summary_path: str | None
                ) -> BuildPipelineResult:
        state = self.state
        return BuildPipelineResult(
            status="complete" if CLOSE_BUILD in state.stages_done else "failed",
            workflow_id=workflow.info().workflow_id,
            outcome=state.outcome or "failed", build_name=pipeline.build_name,
            stages_completed=list(state.stages_done), failed_stage=state.failed_stage,
            error=state.error, blocks=len(state.triage.blocks), flags=len(state.triage.flags),
            info=len(state.triage.info), decision=state.decision.taken,
            closeout_path=state.closeout_path, summary_path=summary_path,
            tally=rounds.tally(state.rounds, state.verdicts))

    # ---- audit rounds (reaudit_rounds > 0): stages 3 to 7 again --------------------------

    def _reaudit_setting(self, pipeline: BuildPipelineInput) -> int:
        """The input's reaudit_rounds, else the worker's REAUDIT_ROUNDS as learned before
        stage 1 (0 for runs begun before either existed)."""
        if pipeline.reaudit_rounds is not None:
            return pipeline.reaudit_rounds
        return self.state.setup.reaudit_rounds if self.state.setup is not None else 0

    def _reaudits_left(self) -> int:
        return self.state.reaudit_limit - (len(self.state.rounds) - 1)

    async def _audit_rounds(self, pipeline: BuildPipelineInput) -> Outcome:
        """Fix what an audit found and audit again, at most `reaudit_rounds` times; flags
        the last allowed audit still finds become blocks (a person decides, rather than
        another fix nobody checks). An operator's "changes requested" takes the blocks
        back to the target agent for another round, within the same limit."""
        state = self.state
        while True:
            current = state.rounds[-1]
            triage = state.triage
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
        self.state.decision.reset()
        self.state.parked_blocks = blocks
        outcome = await self._handle_blocks(pipeline, blocks)
        if (self.state.decision.taken == "changes_requested"
                and workflow.patched(CHANGES_REQUESTED_PATCH)):
            return None
        return outcome

    def _notice_round(self) -> dict[str, Any]:
        """What a block notice says about rounds (nothing for runs without them)."""
        if len(self.state.rounds) <= 1 and self.state.reaudit_limit == 0:
            return {}
        return {"round": len(self.state.rounds), "changes_allowed": self._reaudits_left() > 0}

    def _round_verdicts(self) -> list[BlockVerdict]:
        current = len(self.state.rounds) or 1
        return [v for v in self.state.verdicts if v.round == current]

    async def _fix_changes(self, pipeline: BuildPipelineInput, current: AuditRound) -> None:
        """The blocks an operator asked to have changed, with the note, to the target agent."""
        state = self.state
        changed = [state.parked_blocks[v.index - 1] for v in state.verdicts
                   if v.round == current.round and v.verdict == "change"]
        note = state.decision.note
        current.sent_to_fix, current.changes_note = changed, note
        done = await self._agent_stage(
            BuildPipelineActivities.apply_flag_fixes, policies.FLAG_FIXES, self._task(
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
                                                       f"{self.state.reaudit_limit + 1}")
        await self._run_activity(
            BuildPipelineActivities.request_security_audit,
            policies.with_agent_limit(policies.SECURITY_AUDIT, pipeline.agent_timeout_seconds),
            AuditRequest(build_name=pipeline.build_name, plan_path=pipeline.plan_path,
                         target_agent=pipeline.target_agent, task=request, round=number,
                         previous=previous),
            waiting=request)
        self.state.triage = triage = await self._run_activity(
            BuildPipelineActivities.process_triage_output, policies.TRIAGE,
            (pipeline.build_name, number), waiting=None, local=self.state.shape.local_inline,
            task_queue=self.state.task_queues.get(REQUEST_SECURITY_AUDIT))
        rounds.match_round(previous, [*triage.blocks, *triage.flags])
        self.state.rounds.append(AuditRound(round=number, blocks=triage.blocks,
                                            flags=triage.flags, info=triage.info))
        self._event(PROCESS_TRIAGE_OUTPUT, "triaged",
                    f"round {number}: {len(triage.blocks)} blocks, {len(triage.flags)} flags, "
                    f"{len(triage.info)} info; of round {previous.round}'s "
                    f"{len(previous.sent_to_fix)} sent to fix, "
                    f"{len(previous.verified_fixed)} verified fixed, "
                    f"{len(previous.still_present)} still found")
        self._details()

    # ---- agent tasks: what they carry, how a stage runs one ------------------------------

    def _stage_agent(self, pipeline: BuildPipelineInput, setting: str) -> str | None:
        """The agent of stage 1 or 3: the input's choice, else the worker's setting as
        learned before stage 1 (None only for runs started before that step existed)."""
        chosen: str | None = getattr(pipeline, setting)
        if chosen:
            return chosen
        return getattr(self.state.setup, setting) if self.state.setup is not None else None

    def _task(self, pipeline: BuildPipelineInput, *, agent: str | None, task_type: str,
              summary: str, instruction: str, extra: dict[str, Any] | None = None,
              agent_setting: AgentSetting | None = None) -> AgentTaskRequest:
        """`agent=None` leaves the choice to the worker's setting named `agent_setting`."""
        return AgentTaskRequest(
            task_id=str(workflow.uuid4()), build_name=pipeline.build_name,
            target_agent=agent or "", agent_setting=agent_setting, task_type=task_type,
            summary=summary, instruction=instruction, plan_path=pipeline.plan_path,
            extra_payload=extra or {}, originating_task_id=pipeline.task_id)

    async def _agent_stage(self, activity: Callable[..., Any], policy: policies.StagePolicy,
                           request: AgentTaskRequest) -> BuildPhaseResult:
        assert self.state.input is not None
        policy = policies.with_agent_limit(policy, self.state.input.agent_timeout_seconds)
        result: BuildPhaseResult = await self._run_activity(activity, policy, request,
                                                            waiting=request)
        return result

    # ---- agent stages: pickup and work limits, where the time went -----------------------

    def _agent_limits(self, stage: str) -> policies.AgentLimits:
        state = self.state
        pipeline = state.input
        assert pipeline is not None
        return policies.agent_limits(stage, pickup_seconds=pipeline.pickup_timeout_seconds,
                                     work_seconds=pipeline.work_timeout_seconds,
                                     overall_seconds=pipeline.agent_timeout_seconds)

    async def _await_agent(self, activity: Callable[..., Any], policy: policies.StagePolicy,
                           arg: Any, waiting: AgentTaskRequest,
                           task_queue: str | None = None) -> Any:
        """An agent stage whose activity holds the overall limit, watched from here:
        reminders while nobody claims the task past its pickup limit, and a failure when
        a claimed task stays silent past its work limit (the activity is cancelled)."""
        stage = stage_name(activity)
        limits = self._agent_limits(stage)
        handle = workflow.start_activity_method(
            activity, args=list(arg) if isinstance(arg, tuple) else [arg],
            start_to_close_timeout=limits.overall,
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
        timing = self.state.stage_times[waiting.task_id]

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
        state = self.state
        timing.reminders += 1
        note = (f"waiting for pickup by {timing.agent} since "
                f"{timing.written_at:%Y-%m-%d %H:%M:%S}Z (pickup limit {span(limits.pickup)} "
                f"passed; reminder {timing.reminders} of {policies.PICKUP_REMINDERS})")
        if state.waiting is not None and state.waiting.task_id == timing.task_id:
            state.waiting = state.waiting.model_copy(update={"note": note})
        self._event(stage, "pickup_overdue", note)
        self._details()
        assert state.input is not None
        reminder = PickupReminder(
            build_name=state.input.build_name, workflow_id=workflow.info().workflow_id,
            stage=stage, agent=timing.agent, task_id=timing.task_id, since=timing.written_at,
            reminder=timing.reminders, of=policies.PICKUP_REMINDERS)
        try:
            failures = await workflow.execute_activity_method(
                BuildPipelineActivities.remind_pickup, reminder,
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
        state = self.state
        timing = state.stage_times[waiting.task_id]
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
        state.expired_tasks[timing.task_id] = f"{stage}: work limit passed"
        self._timing_ended(waiting, "work_limit_passed")
        self._event(stage, "failed", reason)
        raise StageFailed(stage, reason, PhaseFailedError)

    def _overall_limit_passed(self, stage: str, waiting: AgentTaskRequest,
                              limits: policies.AgentLimits) -> StageFailed:
        state = self.state
        timing = state.stage_times[waiting.task_id]
        if timing.picked_up_at is None:
            reason = (f"nobody claimed task {timing.task_id} ({timing.agent}) within the "
                      f"stage's overall limit of {span(limits.overall)}")
        else:
            reason = (f"{timing.agent} claimed task {timing.task_id} but did not report "
                      f"within the stage's overall limit of {span(limits.overall)}")
        state.expired_tasks[timing.task_id] = f"{stage} timed out"
        self._timing_ended(waiting, "timed_out")
        self._event(stage, "failed", reason)
        return StageFailed(stage, reason, PhaseFailedError)

    def _note_claim(self, notice: TaskNotice, waiting: WaitingOn) -> None:
        """The folder watch saw the task `in-progress`: the work limit counts from now."""
        state = self.state
        timing = state.stage_times.get(notice.task_id)
        if timing is None or timing.picked_up_at is not None:
            return
        timing.picked_up_at = workflow.now()
        state.waiting = waiting.model_copy(update={"claimed_at": timing.picked_up_at,
                                                   "note": None})
        claimed = f" (its history names {notice.detail})" if notice.detail else ""
        self._event(waiting.stage, "claimed", f"task {notice.task_id}{claimed}")
        self._details()

    def _timing_started(self, stage: str, waiting: AgentTaskRequest) -> None:
        state = self.state
        attempt = 1 + sum(1 for timing in state.stage_times.values() if timing.stage == stage)
        state.stage_times[waiting.task_id] = StageTiming(
            stage=stage, agent=self._agent_label(waiting), task_id=waiting.task_id,
            attempt=attempt, written_at=workflow.now())

    def _timing_ended(self, waiting: AgentTaskRequest | None, outcome: str) -> None:
        """The first ending of an agent task counts; later calls find it ended."""
        timing = self.state.stage_times.get(waiting.task_id) if waiting is not None else None
        if timing is not None and timing.outcome is None:
            timing.done_at, timing.outcome = workflow.now(), outcome

    def _pickup_lines(self, waiting: WaitingOn) -> list[str]:
        if waiting.note:
            return [f"**{waiting.note[:1].upper()}{waiting.note[1:]}**"]
        if waiting.claimed_at is not None:
            return [f"Claimed at {waiting.claimed_at:%Y-%m-%d %H:%M:%S}Z"]
        return []

    def _time_report(self) -> TimeReport:
        state = self.state
        return timings.time_report(list(state.stage_times.values()), state.events,
                                   started=workflow.info().start_time,
                                   decided_by=state.decision.decided_by,
                                   decision_source=state.decision.source)

    # ---- shared stage machinery ----------------------------------------------------------

    async def _run_activity(self, activity: Callable[..., Any], policy: policies.StagePolicy,
                            arg: Any, *, waiting: AgentTaskRequest | None,
                            count_as_stage: bool = True, local: bool = False,
                            task_queue: str | None = None) -> Any:
        """`activity`: a method of workflows/contracts.py; `task_queue`: an agent host's
        queue to run on (None: the workflow's own)."""
        state = self.state
        stage = stage_name(activity)
        if count_as_stage:
            await self._enter(stage)
        try:
            if waiting is not None and state.shape.routing:
                task_queue = await self._route(stage, waiting)
            if waiting is not None:
                self._timing_started(stage, waiting)
            self._begin_wait(stage, waiting, task_queue)
            target = self._agent_label(waiting) if waiting is not None else None
            routed = {"task_queue": task_queue} if task_queue else {}
            if waiting is not None and state.shape.pickup_limits:
                result = await self._await_agent(activity, policy, arg, waiting, task_queue)
            else:
                execute: Callable[..., Awaitable[Any]] = (
                    workflow.execute_local_activity_method if local and not routed
                    else workflow.execute_activity_method)
                result = await execute(
                    activity, args=list(arg) if isinstance(arg, tuple) else [arg],
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
            message, _ = describe_activity_failure(err)
            self._timing_ended(waiting, "timed_out" if isinstance(cause, TimeoutError)
                               else "failed")
            if waiting is not None:
                if isinstance(cause, TimeoutError):
                    state.expired_tasks[waiting.task_id] = f"{stage} timed out"
                else:
                    # The agent reported the failure itself; its file already says so.
                    state.open_tasks.pop(waiting.task_id, None)
            self._event(stage, "failed", message)
            kind = TriageInvalidError if TriageInvalidError.matches(cause) else PhaseFailedError
            raise StageFailed(stage, message, kind) from None
        finally:
            state.waiting = None
            self._timing_ended(waiting, "cancelled")
            if waiting is not None:
                state.task_notices.pop(waiting.task_id, None)
        if waiting is not None:
            state.open_tasks.pop(waiting.task_id, None)
        if count_as_stage:
            self._finish(stage)
        return result

    def _begin_wait(self, stage: str, waiting: AgentTaskRequest | None,
                    task_queue: str | None) -> None:
        state = self.state
        if waiting is not None:
            state.waiting = WaitingOn(kind="agent", stage=stage, agent=self._agent_label(waiting),
                                      task_type=waiting.task_type, task_id=waiting.task_id,
                                      since=workflow.now(), task_queue=task_queue)
            state.open_tasks[waiting.task_id] = stage
            if task_queue:
                state.task_routes[waiting.task_id] = task_queue
        elif task_queue:
            # Shown so an operator sees which host's worker the stage waits for.
            state.waiting = WaitingOn(kind="activity", stage=stage, since=workflow.now(),
                                      task_queue=task_queue)
        else:
            return
        self._details()

    async def _route(self, stage: str, request: AgentTaskRequest) -> str | None:
        """The task queue of the host `request`'s agent runs on, read from the worker's
        AGENT_TASK_QUEUES when the stage starts: a changed map applies to every stage
        that starts after the change, never to one already under way."""
        state = self.state
        route: StageRoute = await workflow.execute_local_activity_method(
            BuildPipelineActivities.route_stage, request.target_agent,
            start_to_close_timeout=policies.ROUTE.start_to_close,
            retry_policy=policies.ROUTE.retry, summary=f"route {stage}")
        if route.task_queue:
            state.task_queues[stage] = route.task_queue
            self._event(stage, "routed", f"{route.agent} on task queue {route.task_queue}")
        else:  # a re-run of the stage (a re-audit) after the map lost its agent
            state.task_queues.pop(stage, None)
        return route.task_queue

    async def _enter(self, stage: str) -> None:
        state = self.state
        if state.paused:
            self._event(stage, "held", f"paused: {state.pause_reason}")
            self._details()
            await workflow.wait_condition(lambda: not state.paused)
        if state.shape.adopted and not state.adoption_noted and workflow.patched(
                ADOPTED_PATCH_PREFIX + stage):
            # The first stage this run enters under this worker: say so, once.
            self._note_adoption(f"carried on from {stage}")
        state.stage = stage
        self._event(stage, "started")
        self._details()

    def _note_adoption(self, detail: str) -> None:
        self.state.adoption_noted = True
        self._event("pipeline", "adopted", "started by an earlier worker (v0.5.0-compatible "
                                           f"history); {detail}")

    def _finish(self, stage: str) -> None:
        self.state.stages_done.append(stage)
        self._event(stage, "completed")

    # ---- Web UI story --------------------------------------------------------------------

    def _agent_label(self, request: AgentTaskRequest) -> str:
        if request.target_agent:
            return request.target_agent
        # Runs started before agents were resolved up front: the worker's setting decides.
        setting = request.agent_setting or "agent"
        return f"agent from {AGENT_SETTINGS.get(setting, setting)}"

    def _agents(self) -> dict[str, str]:
        pipeline = self.state.input
        if pipeline is None:
            return {}
        agents = {"target": pipeline.target_agent}
        for setting, stage in (("prefab_agent", "prefab"), ("security_agent", "security")):
            agents[stage] = (self._stage_agent(pipeline, setting)
                             or f"agent from {AGENT_SETTINGS[setting]}")
        return agents

    def _summary_line(self, stage: str, target: str | None) -> str:
        return self.state.summary_line(stage, target)

    def _event(self, stage: str, event: str, detail: str = "") -> None:
        self.state.event(stage, event, detail)

    def _details(self) -> None:
        state = self.state
        pipeline = state.input
        if pipeline is None:
            return
        number = STAGE_NUMBERS.get(state.stage, 0)
        lines = [f"**{pipeline.build_name}** → `{pipeline.target_agent}`",
                 f"Stage {number}/{TOTAL_STAGES}: `{state.stage}`"]
        if state.shape.adopted:
            lines.append("Adopted: started by an earlier worker (v0.5.0-compatible history)")
        for warning in self._all_warnings():
            lines.append(f"**Warning**: {warning}")
        if state.paused:
            lines.append(f"**Paused**: {state.pause_reason or 'no reason given'}")
        if state.waiting is not None and state.waiting.kind == "block_decision":
            lines.append(f"Waiting for a block decision since "
                         f"{state.waiting.since:%Y-%m-%d %H:%M:%S}Z "
                         f"(originating task `{state.waiting.task_id}`). Decide by:")
            lines.extend(f"- {path}" for path in state.decision.paths
                         or ["the approve_blocks / reject_blocks update"])
        elif state.waiting is not None:
            lines.append(self._waiting_line(state.waiting))
            lines.extend(self._pickup_lines(state.waiting))
        if state.triage.blocks or state.triage.flags or state.triage.info:
            lines.append(f"Triage: {len(state.triage.blocks)} blocks, "
                         f"{len(state.triage.flags)} flags, {len(state.triage.info)} info")
        lines.extend(self._round_lines())
        if state.notification_failures:
            lines.append("Notification failures: " + "; ".join(state.notification_failures))
        decision = state.decision
        if decision.taken is not None:
            claimed = f" (claims to be {decision.claimed_by})" if decision.claimed_by else ""
            lines.append(f"Decision: **{decision.taken}** by {decision.decided_by}{claimed}")
        if state.outcome is not None:
            lines.append(f"Outcome: **{state.outcome}**"
                         + (f" at `{state.failed_stage}`" if state.failed_stage else ""))
        lines.append("Done: " + (", ".join(state.stages_done) or "nothing yet"))
        if state.task_queues:
            lines.append("Agent hosts: " + ", ".join(
                f"`{stage}` on `{queue}`" for stage, queue in state.task_queues.items()))
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
        state = self.state
        if state.reaudit_limit == 0 and len(state.rounds) <= 1 and not state.verdicts:
            return []
        lines = [f"Audit round {len(state.rounds)} of at most {state.reaudit_limit + 1}"]
        for done in state.rounds:
            line = (f"- round {done.round}: {len(done.blocks)} blocks, {len(done.flags)} flags"
                    f"; {len(done.sent_to_fix)} sent to fix")
            if done.verified_fixed or done.still_present:
                line += (f", {len(done.verified_fixed)} verified fixed, "
                         f"{len(done.still_present)} still found")
            if done.escalated_to_blocks:
                line += f"; {len(done.escalated_to_blocks)} flag(s) made blocks"
            lines.append(line)
        if state.decision.awaiting and state.parked_blocks:
            lines.append("Blocks to decide (by number):")
            lines.extend(f"{n}. {instructions.sanitize_finding(b.description)[:200]}"
                         for n, b in enumerate(state.parked_blocks, start=1))
            lines.append("Per block: verdicts accept / reject / change by number or id "
                         "(`--verdict N=…`, `block_verdicts` in the originating task)"
                         + ("; request changes: `tools/request-changes`" if
                            self._reaudits_left() > 0 else "; no re-audit left for changes"))
        lines.extend(f"- verdict round {v.round} block {v.index}: **{v.verdict}** by "
                     f"{v.decided_by} ({v.source})" for v in state.verdicts)
        return lines

    # ---- queries, updates, signals -------------------------------------------------------

    @workflow.query(name=STATUS_QUERY)
    def get_status(self) -> PipelineStatus:
        state = self.state
        pipeline = state.input
        return PipelineStatus(
            build_name=pipeline.build_name if pipeline else "",
            stage=state.stage, stage_number=STAGE_NUMBERS.get(state.stage, 0),
            stages_done=list(state.stages_done), blocks=len(state.triage.blocks),
            flags=len(state.triage.flags), info=len(state.triage.info),
            waiting_on=state.waiting, paused=state.paused, pause_reason=state.pause_reason,
            outcome=state.outcome, failed_stage=state.failed_stage, error=state.error,
            decision=state.decision.taken, decided_by=state.decision.decided_by,
            decision_source=state.decision.source, claimed_by=state.decision.claimed_by,
            decision_paths=list(state.decision.paths),
            notification_failures=list(state.notification_failures),
            agents=self._agents(), warnings=self._all_warnings(), adopted=state.shape.adopted,
            task_queues=dict(state.task_queues),
            audit_round=len(state.rounds), reaudit_rounds=state.reaudit_limit,
            rounds=list(state.rounds), block_verdicts=list(state.verdicts),
            time=self._time_report())

    def _all_warnings(self) -> list[str]:
        return [*self.state.warnings, *self.state.task_notices.values()]

    @workflow.query(name=EVENTS_QUERY)
    def get_events(self) -> list[StageEvent]:
        return list(self.state.events)

    def _validate_decision(self, raw: Any) -> None:
        state = self.state
        # Non-retryable: the CLI shows a plain ValueError as "retryable: true", and no
        # retry of the same Update can succeed.
        if not state.decision.awaiting or state.decision.taken is not None:
            raise DecisionRefusedError.failure(
                f"pipeline is not waiting on blocks (stage: {state.stage}, "
                f"outcome: {state.outcome}, decision: {state.decision.taken})")
        try:
            choice = coerce_decision(raw)
        except ValidationError as err:
            raise InvalidInputError.failure(
                f"invalid decision: {validation_message(err)}") from None
        if (choice.source == "task_file" and choice.task_id is not None
                and state.input is not None and choice.task_id != state.input.task_id):
            raise DecisionRefusedError.failure(f"the deciding file carries task id "
                                               f"{choice.task_id!r}, not this pipeline's "
                                               f"originating task")

    def _check_verdicts(self, asked: Decision, raw: Any) -> None:
        """Per-block verdicts must name blocks that wait; a decision for another round's
        blocks, or changes requested with no re-audit left, is refused."""
        state = self.state
        choice = coerce_decision(raw)
        current = len(state.rounds) or 1
        if choice.round is not None and choice.round != current:
            raise DecisionRefusedError.failure(f"the decision is for audit round "
                                               f"{choice.round}; the blocks of round "
                                               f"{current} wait")
        unknown = rounds.unknown_keys(state.parked_blocks, choice.verdicts)
        if unknown:
            raise InvalidInputError.failure(
                f"invalid decision: no block {', '.join(map(repr, unknown[:5]))} (blocks are "
                f"numbered 1-{len(state.parked_blocks)}, or named by their id)")
        verdicts = [v.verdict for v in rounds.block_verdicts(
            state.parked_blocks, asked, choice, round_no=current, decided_by="")]
        if rounds.overall(verdicts, asked) == "changes_requested" and (
                len(state.rounds) == 0 or self._reaudits_left() <= 0):
            raise DecisionRefusedError.failure(
                f"changes cannot be requested: no re-audit round left (reaudit_rounds "
                f"{state.reaudit_limit}); accept or reject each block")

    def _decide(self, asked: Decision, raw: Any) -> str:
        state = self.state
        choice = coerce_decision(raw)
        current = len(state.rounds) or 1
        given = rounds.block_verdicts(state.parked_blocks, asked, choice, round_no=current,
                                      decided_by=decider_label(choice))
        decision = rounds.overall((v.verdict for v in given), asked)
        state.verdicts.extend(given)
        state.decision.taken, state.decision.decided_by = decision, decider_label(choice)
        state.decision.source, state.decision.claimed_by = choice.source, choice.claimed_by
        state.decision.note, state.decision.via_update = choice.note, True
        via = {"update": "by_update", "task_file": "by_task_file", "matrix": "by_matrix"}
        claimed = f" (claims to be {choice.claimed_by})" if choice.claimed_by else ""
        self._event(WAIT_FOR_BLOCK_RESOLUTION, f"{decision}_{via[choice.source]}",
                    f"{state.decision.decided_by}{claimed}: {choice.note}".rstrip(": "))
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
        state = self.state
        try:
            notice = TaskNotice.model_validate(raw)
        except ValidationError:
            return
        waiting = state.waiting
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
        if state.task_notices.get(notice.task_id) == text:
            return
        if notice.task_id not in state.task_notices:  # one event per task, not per rewrite
            self._event(waiting.stage, "warning", text)
        state.task_notices[notice.task_id] = text
        self._details()

    @workflow.signal(name=PAUSE_SIGNAL)
    def pause(self, reason: str = "") -> None:
        self.state.paused, self.state.pause_reason = True, reason
        self._event(self.state.stage, "paused", reason)
        self._details()

    @workflow.signal(name=RESUME_SIGNAL)
    def resume(self, reason: str = "") -> None:
        self.state.paused, self.state.pause_reason = False, ""
        self._event(self.state.stage, "resumed", reason)
        self._details()

    @workflow.signal(name=ADOPT_SIGNAL)
    def adopt(self, note: str = "") -> None:
        """Sent by a worker that takes over runs an earlier worker started: records the
        adoption at once, so a run parked for days shows it before anything else moves."""
        if self.state.shape.adopted and not self.state.adoption_noted:
            self._note_adoption(note or f"taken over at {self.state.stage}")
        self._details()
