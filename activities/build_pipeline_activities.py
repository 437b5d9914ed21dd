"""The I/O of BuildPipelineWorkflow's nine stages.

Agent stages (1, 2, 3, 5, 8) write a task file and suspend; the inline stages read
triage output, notify, poll the originating task and write the summary.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from temporalio import activity
from temporalio.exceptions import ApplicationError

import policies
from activities import legacy_args, platform_events
from activities.build_phase import phase_fields
from activities.dispatch import (
    REASON_PLACEHOLDER,
    PreparedTask,
    dispatch_agent_task,
)
from activities.failures import write_attempt
from activities.notify import compose_block_notice, compose_pickup_reminder, notify_all
from activities.run_link import ensure_run_link
from activities.triage import limits_text, read_triage
from config import WorkerConfig
from exceptions import (
    BlocksPendingError,
    DiskWriteError,
    FileIoStalledError,
    LegacyWaitHandedOverError,
    TaskFileError,
    TaskNotFoundError,
    TriageInvalidError,
    TriageMissingError,
)
from models import (
    AgentTaskRequest,
    AuditRequest,
    AuditRound,
    BlockCheckInput,
    BlockResolution,
    BuildPhaseResult,
    CloseOriginInput,
    Finding,
    MatrixNoticeRef,
    NotifyBlocksInput,
    NotifyBlocksResult,
    OpenTask,
    PickupReminder,
    PipelineSetup,
    PrepareInput,
    RecordDecisionInput,
    StageRoute,
    SummaryInput,
    TimeReport,
    TriageResult,
    check_name,
)
from observability import (
    BLOCKS_NOTIFIED,
    DECISION_WAIT,
    PICKUP_WAIT,
    PIPELINES_COMPLETED,
    WORK_TIME,
    count,
    observe,
)
from taskfiles.bounded_yaml import dump_yaml
from taskfiles.documents import (
    AWAITING_DECISION,
    SOURCE_AGENT,
    add_history,
    claimed_actor,
    read_task,
    task_time,
    timestamp,
)
from taskfiles.io_pool import run_file_io
from taskfiles.lookup import find_task, update_task
from taskfiles.safe_io import write_private_atomic
from telemetry.context import bind_build_name
from vocabulary import (
    APPLY_FLAG_FIXES,
    APPROVED,
    AUDIT_REQUESTS_DIR,
    AUDIT_ROUND_DIR_PREFIX,
    BLOCK_VERDICTS_FIELD,
    BUILD_PHASE,
    BUILD_PIPELINE_WORKFLOW,
    CANCELLED,
    CHANGES_REQUESTED,
    CLOSE_BUILD,
    CLOSE_OPEN_TASKS,
    CLOSE_ORIGINATING_TASK,
    COMPLETED,
    DECIDING_STATUSES,
    FAILED,
    IMPLEMENT_BUILD,
    IN_PROGRESS,
    INPUT_REQUIRED,
    NOTIFY_BLOCKS,
    OPEN_STATUSES,
    PENDING_APPROVAL,
    PLATFORM_OPEN_STATUSES,
    PREFAB_SCAFFOLDING,
    PREPARE_PIPELINE,
    PROCESS_TRIAGE_OUTPUT,
    RECORD_DECISION,
    REJECTING_STATUSES,
    REMIND_PICKUP,
    REQUEST_SECURITY_AUDIT,
    ROUTE_STAGE,
    SUMMARIZE_WORKFLOW,
    TERMINAL_STATUSES,
    WAIT_FOR_BLOCK_RESOLUTION,
)
from workflows.contracts import BuildPipelineActivities, BuildPlanActivities
from workflows.instructions import AUDIT_DIR_PLACEHOLDER, DATA_NOTICE, sanitize_finding
from workflows.timings import time_report

log = logging.getLogger(__name__)

# An agent task nobody has finished, in either dialect.
UNFINISHED_STATUSES = OPEN_STATUSES | PLATFORM_OPEN_STATUSES


def platform_decision_status(current: Any, decision: str) -> str:
    """The originating task's status once a decision is recorded, in the platform's
    words (it has no `rejected`): approved, or the status it has (an operator's Cancel
    stays; a rejection by Update closes the task `failed` when the pipeline ends)."""
    if decision == APPROVED and current not in TERMINAL_STATUSES:
        return APPROVED
    if decision == CHANGES_REQUESTED and current not in TERMINAL_STATUSES:
        return IN_PROGRESS  # the build goes on: a fix, then another audit
    return str(current) if isinstance(current, str) and current else PENDING_APPROVAL


# v0.5.0's summary names its phases with these words (`phases_completed`).
V050_PHASES = {PREFAB_SCAFFOLDING: "prefab", IMPLEMENT_BUILD: "implement",
               REQUEST_SECURITY_AUDIT: "audit", PROCESS_TRIAGE_OUTPUT: "triage",
               APPLY_FLAG_FIXES: "fixes", CLOSE_BUILD: "close"}
TRIAGE_FILE = "triage-output.yml"
AUDIT_FILE = "audit.md"
REQUEST_FILE = "request.md"


def audit_root(config: WorkerConfig) -> Path:
    """TEMPORAL_AUDIT_DIR as an absolute path: agents work in folders of their own."""
    return Path(os.path.abspath(config.audit_dir))


def audit_folder(config: WorkerConfig, build_name: str) -> Path:
    """`<audit dir>/audit-requests/<build>`; the name is re-checked so it cannot escape.

    Agents can write below the audit root, so a link there is refused where the file is
    written or read (taskfiles.safe_io: every folder below the audit root opened without
    following links, on the file I/O pool), not by a check here on the event loop."""
    check_name(build_name, "build_name")
    return audit_root(config) / AUDIT_REQUESTS_DIR / build_name


def round_folder(config: WorkerConfig, build_name: str, round_no: int) -> Path:
    """Where audit round `round_no` is requested and answered: the build's folder for the
    first audit, `round-N/` inside it for each re-audit (earlier rounds' triage is never
    read as a later one's)."""
    folder = audit_folder(config, build_name)
    if round_no <= 1:
        return folder
    return folder / f"{AUDIT_ROUND_DIR_PREFIX}{int(round_no)}"


def previous_round_markdown(previous: AuditRound) -> str:
    """request.md's account of the previous round, every finding as data."""
    def listed(title: str, findings: list[Finding]) -> list[str]:
        if not findings:
            return []
        lines = [f"{title}:"]
        for item in findings:
            ident = (item.model_extra or {}).get("id")
            shown = f" (id `{sanitize_finding(str(ident))}`)" if ident is not None else ""
            lines.append(f"- {sanitize_finding(item.description)}{shown}")
        return [*lines, ""]

    fixed = ("sent to the build agent with the operator's note: "
             f"{sanitize_finding(previous.changes_note)}" if previous.changes_note is not None
             else "its flags sent to the build agent to fix")
    if previous.fix_output is not None:
        fixed += f"; the agent reported: {sanitize_finding(previous.fix_output)}"
    return "\n".join([
        f"## Previous round ({previous.round})",
        f"{DATA_NOTICE.replace('between the security-findings tags', 'in this section')}",
        "", *listed("Blocks", previous.blocks), *listed("Flags", previous.flags),
        *listed("Sent to fix", previous.sent_to_fix), f"What was done: {fixed}.", "",
        "Check each finding sent to fix: report it again (same `id`, or the same "
        "description) if it is still there; leave it out if it is fixed. Report blocks "
        "still present again, and anything new.", ""])


def audit_paths(folder: Path) -> dict[str, str]:
    """The audit payload fields: v0.5.0's `audit_request_path` and `output_dir`, and the
    two files the security agent writes there."""
    return {"audit_request_path": str(folder / REQUEST_FILE), "output_dir": str(folder),
            "audit_report_path": str(folder / AUDIT_FILE),
            "triage_path": str(folder / TRIAGE_FILE)}


def audit_request_markdown(request: AuditRequest, folder: Path, command: list[str]) -> str:
    """request.md; `command` completes the audit task (its last item is the task file)."""
    success = shlex.join([*command, "success", "audit written"])
    failed = shlex.join([*command, "failed", REASON_PLACEHOLDER])
    title = ("Security audit request" if request.round <= 1
             else f"Security re-audit request, round {request.round}")
    previous = ("\n" + previous_round_markdown(request.previous)
                if request.previous is not None else "")
    return f"""# {title}: {request.build_name}

## Scope
- Build: `{request.build_name}`
- Plan: `{request.plan_path}`
- Implemented by: `{request.target_agent}`
- Task id: `{request.task.task_id}` (task file `{command[-1]}`)

{previous}
## Expected outputs (in this folder: `{folder}`)
1. `{AUDIT_FILE}`: the audit report.
2. `{TRIAGE_FILE}`: the triage, machine-read by the pipeline.

## Triage schema
```yaml
blocks:            # need an operator's decision before close-out (the pipeline parks)
  - description: "..."
flags:             # auto-fixable; sent to the build agent as a security_fix task
  - description: "..."
info:              # informational, no action
  - "a plain string is accepted too"
```
{limits_text()}

## How to complete
Write both files first, then run (from any directory):

    {success}

or, if the audit could not be done:

    {failed}
"""


def _summary_filename(workflow_id: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in workflow_id)
    return f"{safe.lstrip('.') or 'workflow'}.yml"


def _finding_dicts(findings: list[Finding]) -> list[dict[str, Any]]:
    return [item.model_dump(mode="json") for item in findings]


def record_time(report: TimeReport) -> None:
    """The build's figures into the histograms, once: after its summary is written (an
    attempt that failed before that recorded nothing)."""
    for timing in report.stages:
        if timing.pickup_seconds is not None:
            observe(PICKUP_WAIT, timing.pickup_seconds, stage=timing.stage)
        if timing.work_seconds is not None:
            observe(WORK_TIME, timing.work_seconds, stage=timing.stage)
    for wait in report.decision_waits:
        if wait.seconds is not None:
            observe(DECISION_WAIT, wait.seconds, decided_by=wait.decision_source or "nobody")


def _flags_applied(summary: SummaryInput) -> int:
    """v0.5.0's count of flags sent to the fix agent; with audit rounds, every round's."""
    if summary.rounds:
        return sum(len(r.sent_to_fix) for r in summary.rounds if r.changes_note is None)
    return len(summary.flags) if APPLY_FLAG_FIXES in summary.stages_completed else 0


class PipelineActivities(BuildPipelineActivities, BuildPlanActivities):
    """Activities bound to one WorkerConfig (built by the worker, never at import); each
    implements its contract in workflows/contracts.py under the same name."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config

    def all(self) -> list[Callable[..., Any]]:
        """Every activity of a worker on the workflows' own task queue."""
        return [*self.host_bound(), self.prepare_pipeline, self.route_stage,
                self.notify_blocks, self.wait_for_block_resolution,
                self.record_block_decision, self.remind_pickup, self.summarize_workflow,
                self.build_phase, self.close_originating_task]

    def host_bound(self) -> list[Callable[..., Any]]:
        """What an agent host's worker runs (WORKER_ROLE=agent-host): the activities that
        touch the folders its agents work in. The originating task's (stages 6 and 7, the
        summary) stay with the workflow's own queue, where the build was filed."""
        return [self.prefab_scaffolding, self.implement_build, self.request_security_audit,
                self.process_triage_output, self.apply_flag_fixes, self.close_build,
                self.close_open_tasks]

    # ---- agent stages: a task file, then the activity waits for the agent -------------

    async def _hand_to_agent(self, request: AgentTaskRequest,
                             extra_payload: dict[str, Any] | None = None) -> NoReturn:
        with write_attempt(policies.DISPATCH_ATTEMPTS):
            await dispatch_agent_task(self.config, request, extra_payload=extra_payload)

    async def _v050_agent_stage(self, args: tuple[Any, ...]) -> BuildPhaseResult:
        """v0.5.0's positional form of stages 1, 2, 5 and 8."""
        with write_attempt(policies.DISPATCH_ATTEMPTS):
            request = legacy_args.agent_request(
                activity.info().activity_type, args,
                await legacy_args.CallContext.with_pipeline_input())
            await dispatch_agent_task(self.config, request)

    @activity.defn(name=PREFAB_SCAFFOLDING)
    @legacy_args.accepts_v050(_v050_agent_stage)
    async def prefab_scaffolding(self, request: AgentTaskRequest) -> BuildPhaseResult:
        await self._hand_to_agent(request)

    @activity.defn(name=IMPLEMENT_BUILD)
    @legacy_args.accepts_v050(_v050_agent_stage)
    async def implement_build(self, request: AgentTaskRequest) -> BuildPhaseResult:
        await self._hand_to_agent(request)

    @activity.defn(name=APPLY_FLAG_FIXES)
    @legacy_args.accepts_v050(_v050_agent_stage)
    async def apply_flag_fixes(self, request: AgentTaskRequest) -> BuildPhaseResult:
        await self._hand_to_agent(request)

    @activity.defn(name=CLOSE_BUILD)
    @legacy_args.accepts_v050(_v050_agent_stage)
    async def close_build(self, request: AgentTaskRequest) -> BuildPhaseResult:
        await self._hand_to_agent(request)

    @activity.defn(name=BUILD_PHASE)
    @legacy_args.accepts_v050(None)
    async def build_phase(self, request: AgentTaskRequest) -> BuildPhaseResult:
        """Besides our own fields the payload carries v0.5.0's `phase_number` and
        `description` (activities/build_phase.py)."""
        await self._hand_to_agent(request, phase_fields(request))

    @activity.defn(name=ROUTE_STAGE)
    async def route_stage(self, agent: str) -> StageRoute:
        """At an agent stage's start (a local activity): the task queue of the host that
        agent runs on (AGENT_TASK_QUEUES), None for the main queue."""
        return StageRoute(agent=agent, task_queue=self.config.agent_task_queues.get(agent))

    @activity.defn(name=CLOSE_OPEN_TASKS)
    async def close_open_tasks(self, tasks: list[OpenTask]) -> list[OpenTask]:
        """The summary's closing of open agent tasks, for those in this host's folder."""
        with write_attempt(policies.SUMMARY_ATTEMPTS):
            closed = []
            for task in tasks:
                status = CANCELLED if self.config.platform_dialect else task.status
                if await run_file_io(self._close_open_task, task.task_id, status, task.reason):
                    closed.append(task.model_copy(update={"status": status}))
            return closed

    def decision_paths(self, task_path: str | None) -> list[str]:
        """How a parked pipeline can be decided with this worker's settings. The task file
        only when stage 6 found it (and so marked it): a missing or doubled originating task
        decides nothing."""
        paths = ["`tools/approve-build` / `tools/reject-build` (approve_blocks / "
                 "reject_blocks update)"]
        if self.config.file_decisions and task_path and self.config.platform_dialect:
            paths.append(f"Approve or Cancel the originating task `{task_path}` with the "
                         f"task tools (status `approved` or `cancelled`)")
        elif self.config.file_decisions and task_path:
            paths.append(f"set status `approved` or `rejected` in the originating task "
                         f"`{task_path}`")
        if self.config.matrix_approvers and self.config.matrix_homeserver:
            paths.append(f"reply `approve` / `reject` (or react ✅ / ❌) to the notice in "
                         f"{self.config.matrix_room}: {', '.join(self.config.matrix_approvers)}")
        return paths

    @activity.defn(name=PREPARE_PIPELINE)
    async def prepare_pipeline(self, request: PrepareInput) -> PipelineSetup:
        """Before stage 1: the agents this worker's settings name, and the originating
        task (a missing one is a warning now, not a surprise at stage 6)."""
        setup = PipelineSetup(prefab_agent=self.config.prefab_agent,
                              security_agent=self.config.security_agent,
                              routed=bool(self.config.agent_task_queues),
                              reaudit_rounds=self.config.reaudit_rounds)
        try:
            path = await run_file_io(find_task, self.config.task_queue_dir, request.task_id)
        except TaskNotFoundError:
            setup.warning = (f"originating task {request.task_id!r} not found in "
                             f"{self.config.task_queue_dir}: if blocks are found, decide with "
                             f"the approve_blocks / reject_blocks update")
        except (TaskFileError, FileIoStalledError) as err:
            setup.warning = f"originating task {request.task_id!r} unusable: {err}"
        else:
            setup.originating_task_path = str(path)
            await ensure_run_link(self.config, request.task_id)
        await platform_events.build_started(self.config, request, setup)
        return setup

    async def _v050_security_audit(self, args: tuple[Any, ...]) -> BuildPhaseResult:
        """v0.5.0's positional form of stage 3."""
        with write_attempt(policies.DISPATCH_ATTEMPTS):
            request = legacy_args.audit_request(
                args, await legacy_args.CallContext.with_pipeline_input(),
                lambda build: audit_folder(self.config, build), REQUEST_FILE, TRIAGE_FILE)
            await self._request_security_audit(request)

    @activity.defn(name=REQUEST_SECURITY_AUDIT)
    @legacy_args.accepts_v050(_v050_security_audit)
    async def request_security_audit(self, request: AuditRequest) -> BuildPhaseResult:
        with write_attempt(policies.DISPATCH_ATTEMPTS):
            await self._request_security_audit(request)

    async def _request_security_audit(self, request: AuditRequest) -> NoReturn:
        """request.md, then the audit task: a full or read-only audit folder fails the
        attempt before any agent can see the task (write_agent_task's before_write)."""
        folder = round_folder(self.config, request.build_name, request.round)
        # The workflow cannot know TEMPORAL_AUDIT_DIR; the agent gets absolute paths.
        task = request.task.model_copy(update={"instruction": request.task.instruction.replace(
            AUDIT_DIR_PLACEHOLDER, str(audit_root(self.config)))})

        def write_request(prepared: PreparedTask) -> None:
            text = audit_request_markdown(request, folder, prepared.command)
            write_private_atomic(folder / REQUEST_FILE, text.encode(), base=self.config.audit_dir)

        await dispatch_agent_task(self.config, task, extra_payload=audit_paths(folder),
                                  before_write=write_request)

    @activity.defn(name=PROCESS_TRIAGE_OUTPUT)
    async def process_triage_output(self, build_name: str, round_no: int = 1) -> TriageResult:
        """The triage of audit round `round_no` (runs begun before rounds pass none)."""
        bind_build_name(build_name)
        path = round_folder(self.config, build_name, round_no) / TRIAGE_FILE
        try:
            triage = await run_file_io(partial(read_triage, path, base=self.config.audit_dir))
        except TriageMissingError as err:
            raise TriageMissingError.failure(str(err)) from None
        except TriageInvalidError as err:
            raise TriageInvalidError.failure(str(err)) from None
        except FileIoStalledError as err:
            raise FileIoStalledError.failure(str(err)) from None
        await platform_events.audit_completed(self.config, build_name, triage, path)
        return triage

    async def _v050_notify_blocks(self, args: tuple[Any, ...]) -> None:
        """v0.5.0's positional form of stage 6, which returns nothing (as its callers
        expect)."""
        await self._notify_blocks(legacy_args.notify_input(
            args, legacy_args.CallContext.current()))

    @activity.defn(name=NOTIFY_BLOCKS)
    @legacy_args.accepts_v050(_v050_notify_blocks)
    async def notify_blocks(self, request: NotifyBlocksInput) -> NotifyBlocksResult | None:
        return await self._notify_blocks(request)

    async def _notify_blocks(self, request: NotifyBlocksInput) -> NotifyBlocksResult:
        """Tell the operators, and mark the originating task input-required. A task that
        cannot be used (missing, two files with its id, unreadable, stuck) does not fail
        the pipeline: the block parks either way, and the problem is recorded as a
        notification failure and stated in the notice, which then offers only the
        Updates as a way to decide."""
        bind_build_name(request.build_name)
        blocks = len(request.blocks)
        count(BLOCKS_NOTIFIED, blocks)
        queue_dir = self.config.task_queue_dir
        problems: list[str] = []
        path: Path | None = None
        try:
            path = await run_file_io(find_task, queue_dir, request.task_id)
        except TaskNotFoundError as err:
            problems.append(f"originating task not found ({err}); approve with the "
                            f"approve_blocks update")
        except (TaskFileError, FileIoStalledError) as err:
            problems.append(f"originating task unusable: {err}; approve with the "
                            f"approve_blocks update")
        round_no = request.round or 1
        title, message = compose_block_notice(
            request.build_name, request.task_id, request.workflow_id, request.blocks,
            problems, file_decisions=self.config.file_decisions,
            platform=self.config.platform_dialect, round_no=request.round,
            changes_allowed=request.changes_allowed)
        pipeline = MatrixNoticeRef(workflow_id=request.workflow_id,
                                   run_id=activity.info().workflow_run_id or "",
                                   task_id=request.task_id, round=round_no)
        # One notice per round: a later round's is not taken for a resend of the first.
        txn = f"{request.workflow_id}/{pipeline.run_id}/blocks"
        if round_no > 1:
            txn += f"/round-{round_no}"
        delivered, failures = await notify_all(self.config, title, message, txn, pipeline)
        note = f"{blocks} security block(s) await approval (workflow {request.workflow_id})"
        if failures:
            note += "; notification failed: " + "; ".join(failures)
        # pending-approval: the status the platform's Approve accepts and its dispatcher
        # leaves alone (PROTOCOL.md §9 row 3); v0.5.0 wrote input-required.
        parked_status = PENDING_APPROVAL if self.config.platform_dialect else INPUT_REQUIRED
        if path is not None:
            waiter: dict[str, Any] = {"workflow_id": request.workflow_id,
                                      "run_id": activity.info().workflow_run_id,
                                      "since": timestamp()}
            if request.round is not None:
                waiter["round"] = request.round

            def mark_waiting(task: dict[str, Any]) -> None:
                earlier = task.get(AWAITING_DECISION)
                if (isinstance(earlier, dict) and earlier.get("run_id") == waiter["run_id"]
                        and task.get("status") in DECIDING_STATUSES):
                    # A retry of this stage (its worker died after marking the file) must
                    # not bury a decision made since; the watcher delivers it.
                    return
                # The folder watcher routes a decision in this file to this run; an
                # earlier round's verdicts must not decide this one.
                task[AWAITING_DECISION] = waiter
                task.pop(BLOCK_VERDICTS_FIELD, None)
                task.pop(CHANGES_REQUESTED, None)
                if self.config.platform_dialect and task.get("status") in TERMINAL_STATUSES:
                    # Ended already (an operator's Cancel, a dead letter): the tools keep
                    # it so, and the watcher hands that ending to the run as its decision.
                    return
                add_history(task, status=parked_status, actor=SOURCE_AGENT, note=note)

            try:
                await run_file_io(partial(update_task, path, mark_waiting, base=queue_dir))
            except (TaskFileError, FileIoStalledError) as err:
                problems.append(f"originating task not updated: {err}")
                path = None
        failures += problems
        log.info("blocks_notified", extra={"build_name": request.build_name,
                                           "delivered": delivered, "failures": failures})
        return NotifyBlocksResult(
            delivered=delivered, failures=failures,
            originating_task_path=str(path) if path else None,
            decision_paths=self.decision_paths(str(path) if path else None))

    @activity.defn(name=REMIND_PICKUP)
    async def remind_pickup(self, reminder: PickupReminder) -> list[str]:
        """Tell the channels again that an agent task waits for pickup; the failures, as
        lines (a reminder that cannot be sent never fails the stage)."""
        bind_build_name(reminder.build_name)
        title, message = compose_pickup_reminder(reminder)
        info = activity.info()
        # Per reminder: a retried attempt is sent once, the next reminder again.
        seed = f"{info.workflow_id}/{info.workflow_run_id}/pickup/{reminder.task_id}/" \
               f"{reminder.reminder}"
        delivered, failures = await notify_all(self.config, title, message, seed)
        log.info("pickup_reminded", extra={"task_id": reminder.task_id,
                                           "stage": reminder.stage, "agent": reminder.agent,
                                           "delivered": delivered, "failures": failures})
        return failures

    async def _v050_block_look(self, args: tuple[Any, ...]) -> None:
        """v0.5.0's stage 7 held this activity (and a worker slot) until a decision, for up
        to 7 days. Here it takes one look: approved already -> None, v0.5.0's result for
        approval; anything else hands the wait to the pipeline's own stage 7 (task file,
        Updates, chat), which holds nothing while it waits."""
        request = legacy_args.block_check(args)
        if self.config.file_decisions:
            try:
                resolution = await self._look_at_origin(request)
            except ApplicationError:
                resolution = None
            if resolution is not None and resolution.decision == "approved":
                return None
        raise LegacyWaitHandedOverError.failure(
            f"v0.5.0's wait for a block decision on task {request.task_id!r} is not run by "
            f"this worker: the pipeline's own stage 7 waits for the decision")

    @activity.defn(name=WAIT_FOR_BLOCK_RESOLUTION)
    @legacy_args.accepts_v050(_v050_block_look)
    async def wait_for_block_resolution(self, request: BlockCheckInput
                                        ) -> BlockResolution | None:
        """One look at the originating task. Still pending -> a benign retryable error:
        the retry policy schedules the next look, holding nothing in between."""
        return await self._look_at_origin(request)

    async def _look_at_origin(self, request: BlockCheckInput) -> BlockResolution:
        if not self.config.file_decisions:
            raise BlocksPendingError.failure("file decisions are off (BLOCK_FILE_DECISIONS=false)")
        hint = Path(request.path_hint) if request.path_hint else None
        try:
            path = await run_file_io(partial(find_task, self.config.task_queue_dir,
                                             request.task_id, hint=hint))
            task = await run_file_io(partial(read_task, path, base=self.config.task_queue_dir))
        except TaskNotFoundError:
            raise BlocksPendingError.failure(
                f"originating task {request.task_id!r} not found yet") from None
        except (TaskFileError, FileIoStalledError) as err:
            raise BlocksPendingError.failure(str(err)) from None
        status = str(task.get("status", ""))
        actor, note = claimed_actor(task, status)
        if status == APPROVED:
            return BlockResolution(decision="approved", task_status=status, actor=actor,
                                   note=note)
        if status in REJECTING_STATUSES:
            return BlockResolution(decision="rejected", task_status=status, actor=actor,
                                   note=note)
        raise BlocksPendingError.failure(f"blocks pending (originating task status {status!r})")

    @activity.defn(name=RECORD_DECISION)
    async def record_block_decision(self, request: RecordDecisionInput) -> str | None:
        """Write a decision into the originating task's history; nobody waits any more."""
        await platform_events.decision_recorded(self.config, request, request.path_hint)
        hint = Path(request.path_hint) if request.path_hint else None
        via = {"update": "workflow update", "task_file": "task file",
               "matrix": "Matrix"}[request.source]
        # A file decision has no decider but the file; only its claim is worth naming.
        note = (f"{request.decision} via {via}" if request.source == "task_file"
                else f"{request.decision} via {via} by {request.actor}")
        if request.claimed_by:
            note += f" (claims to be {request.claimed_by})"
        if request.note:
            note += f": {request.note}"
        if any(v.verdict != "accept" for v in request.verdicts):
            note += " [" + ", ".join(f"block {v.index}: {v.verdict}"
                                     for v in request.verdicts) + "]"
        queue_dir = self.config.task_queue_dir
        try:
            path = await run_file_io(partial(find_task, queue_dir, request.task_id, hint=hint))

            def record(task: dict[str, Any]) -> None:
                task.pop(AWAITING_DECISION, None)
                # Taken: into the history note, so a later round is not decided by them.
                task.pop(BLOCK_VERDICTS_FIELD, None)
                task.pop(CHANGES_REQUESTED, None)
                status = (platform_decision_status(task.get("status"), request.decision)
                          if self.config.platform_dialect or request.decision == CHANGES_REQUESTED
                          else request.decision)
                add_history(task, status=status, actor=request.actor, note=note)

            await run_file_io(partial(update_task, path, record, base=queue_dir))
        except (TaskFileError, FileIoStalledError) as err:
            # The Update decided; a task file that is missing, ambiguous or unsafe only
            # means the decision is not mirrored there.
            log.warning("decision_not_recorded", extra={"task_id": request.task_id,
                                                        "error": str(err)})
            return None
        return str(path)

    async def _v050_summary(self, args: tuple[Any, ...]) -> str:
        """v0.5.0's nine positional arguments of the summary."""
        with write_attempt(policies.SUMMARY_ATTEMPTS):
            return await self._summarize_workflow(legacy_args.summary_input(
                args, await legacy_args.CallContext.with_pipeline_input()))

    @activity.defn(name=SUMMARIZE_WORKFLOW)
    @legacy_args.accepts_v050(_v050_summary)
    async def summarize_workflow(self, summary: SummaryInput) -> str:
        with write_attempt(policies.SUMMARY_ATTEMPTS):
            return await self._summarize_workflow(summary)

    async def _summarize_workflow(self, summary: SummaryInput) -> str:
        bind_build_name(summary.build_name)
        month = summary.started_at.strftime("%Y-%m")
        path = self.config.summary_dir / month / _summary_filename(summary.workflow_id)
        document = {
            "workflow_id": summary.workflow_id,
            "run_id": summary.run_id,
            "workflow_type": BUILD_PIPELINE_WORKFLOW,
            "build_name": summary.build_name,
            "target_agent": summary.target_agent,
            "plan_path": summary.plan_path,
            "task_id": summary.task_id,
            "outcome": summary.outcome,
            "failed_stage": summary.failed_stage,
            "error": summary.error,
            "started_at": summary.started_at.isoformat(),
            "ended_at": summary.ended_at.isoformat(),
            "duration_seconds": round((summary.ended_at - summary.started_at).total_seconds(), 3),
            "stages_completed": summary.stages_completed,
            "counts": {"blocks": len(summary.blocks), "flags": len(summary.flags),
                       "info": len(summary.info)},
            "blocks": _finding_dicts(summary.blocks),
            "flags": _finding_dicts(summary.flags),
            "info": _finding_dicts(summary.info),
            "decision": summary.decision,
            "decided_by": summary.decided_by,
            "decision_source": summary.decision_source,
            "claimed_by": summary.claimed_by,
            "closeout_path": summary.closeout_path,
            "notification_failures": summary.notification_failures,
            "adopted": summary.adopted,
            "tasks_closed": [],
            # v0.5.0's keys, same names and meanings, for the readers written for it.
            "started": summary.started_at.isoformat(),
            "completed": summary.ended_at.isoformat(),
            "phases_completed": [V050_PHASES[stage] for stage in summary.stages_completed
                                 if stage in V050_PHASES],
            "blocks_hit": len(summary.blocks),
            "flags_applied": _flags_applied(summary),
            "build_report_path": summary.closeout_path,
            # Audit rounds, block verdicts and what they add up to (the outcome's words).
            "audit_rounds": [item.model_dump(mode="json") for item in summary.rounds],
            "block_verdicts": [item.model_dump(mode="json") for item in summary.block_verdicts],
            **(summary.tally.model_dump() if summary.tally is not None else {}),
            "events": [event.model_dump(mode="json") for event in summary.events],
        }
        report = time_report(summary.stage_times, summary.events, started=summary.started_at,
                             ended=summary.ended_at, decided_by=summary.decided_by,
                             decision_source=summary.decision_source)
        document["time"] = report.model_dump(mode="json")
        # A stall, a full or read-only folder: write_attempt fails this attempt retryably.
        for open_task in summary.open_tasks:
            status = CANCELLED if self.config.platform_dialect else open_task.status
            closed = await run_file_io(self._close_open_task, open_task.task_id,
                                       status, open_task.reason)
            if closed:
                document["tasks_closed"].append({"task_id": open_task.task_id,
                                                 "stage": open_task.stage,
                                                 "status": status,
                                                 "reason": open_task.reason})
        document["tasks_closed"] += [task.model_dump(mode="json")
                                     for task in summary.closed_elsewhere]
        if summary.task_queues:
            document["task_queues"] = summary.task_queues
        if self.config.platform_dialect and not summary.adopted:
            document["originating_task_closed"] = await run_file_io(
                self._close_originating_task, summary.task_id, summary.outcome,
                f"pipeline {summary.outcome}; summary {path}")
        await run_file_io(partial(write_private_atomic, path, dump_yaml(document),
                                  base=self.config.summary_dir))
        count(PIPELINES_COMPLETED, outcome=summary.outcome)
        record_time(report)
        await platform_events.build_completed(self.config, summary, path)
        log.info("summary_written", extra={"summary_path": str(path),
                                           "build_name": summary.build_name,
                                           "outcome": summary.outcome})
        return str(path)

    @activity.defn(name=CLOSE_ORIGINATING_TASK)
    async def close_originating_task(self, request: CloseOriginInput) -> str | None:
        """A plan's end closes its filing task (platform dialect), as a pipeline's summary
        closes its originating task."""
        if not self.config.platform_dialect:
            return None
        return await run_file_io(self._close_originating_task, request.task_id,
                                 request.outcome, request.output)

    def _close_originating_task(self, task_id: str, outcome: str,
                                output: str) -> str | None:
        """Close the originating task the way the platform's tools close one: `completed`
        for success or partial, `failed` for any other ending; a task already ended (an
        operator's Cancel) is left as it is. The status it was left at, None when the task
        could not be found or written."""
        final = COMPLETED if outcome in ("success", "partial") else FAILED
        left: str | None = None

        def close(task: dict[str, Any]) -> None:
            nonlocal left
            task.pop(AWAITING_DECISION, None)
            left = str(task.get("status"))
            if left in TERMINAL_STATUSES:
                return
            task["result"] = {"output": output, "completed_by": SOURCE_AGENT,
                              "completed_at": task_time(task)}
            add_history(task, status=final, actor=SOURCE_AGENT, note=f"build {output}"
                        if output.startswith("pipeline") else output)
            left = final

        if not self._rewrite_task(task_id, close, "originating_task_not_closed"):
            return None
        return left

    def _rewrite_task(self, task_id: str, change: Callable[[dict[str, Any]], None],
                      event: str) -> bool:
        """Apply `change` to the task with `task_id`; False (a WARNING unless the task is
        simply not there) when it cannot be found or written. Looked for by the files named
        for its id only: stage 1 already searched every file for it, and a pipeline with
        no originating task must not read the whole folder again at its end."""
        queue_dir = self.config.task_queue_dir
        try:
            path = find_task(queue_dir, task_id, full_scan=False)
            update_task(path, change, base=queue_dir)
        except TaskNotFoundError:
            return False
        except DiskWriteError:
            raise  # the summary waits for the space: the task is closed when it returns
        except TaskFileError as err:
            log.warning(event, extra={"task_id": task_id, "error": str(err)})
            return False
        return True


    def _close_open_task(self, task_id: str, status: str, reason: str) -> bool:
        """Mark an agent task its pipeline no longer waits for, if an agent has not
        finished it meanwhile; a task that cannot be found or read is left alone."""
        queue_dir = self.config.task_queue_dir
        try:
            path = find_task(queue_dir, task_id)
            # base: a folder swapped for a link after the lookup redirects nothing.
            if read_task(path, base=queue_dir).get("status") not in UNFINISHED_STATUSES:
                return False
        except TaskFileError:
            return False
        changed = False

        def close(task: dict[str, Any]) -> None:
            nonlocal changed
            if task.get("status") in UNFINISHED_STATUSES:
                add_history(task, status=status, actor=SOURCE_AGENT, note=reason)
                changed = True

        try:
            update_task(path, close, base=queue_dir)
        except DiskWriteError:
            raise  # the summary waits for the space: the task is closed when it returns
        except TaskFileError as err:
            log.warning("open_task_not_closed", extra={"task_id": task_id, "error": str(err)})
            return False
        return changed
