"""Typed payloads that cross the Temporal boundary (workflow/activity inputs and results).

Every model is plain pydantic so `pydantic_data_converter` serialises it as JSON that
operators' scripts can read and write by hand.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    computed_field,
    field_validator,
)

# Validation context key: the input belongs to a run an earlier worker started.
STARTED_BY_EARLIER_WORKER = "started_by_earlier_worker"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
NAME_MAX = 63
# Originating task ids: uuid4 and similar. Letters, digits and `.`, `_`, `:`, `-`, not
# starting with punctuation: no path separator, whitespace, control, format or markup
# character can reach a file name, a notice or a log line through it.
TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SEVEN_DAYS_SECONDS = 7 * 24 * 3600
DEFAULT_BLOCK_POLL_SECONDS = 30.0
# Re-audits after fixes a pipeline may run (BuildPipelineInput.reaudit_rounds,
# REAUDIT_ROUNDS): each one is an agent's audit and an agent's fix, hours each.
MAX_REAUDIT_ROUNDS = 5
# Blocks a decision can name one by one (triage holds at most 200 findings).
MAX_VERDICTS = 200

# "partial": the build closed out after blocks were approved (v0.5.0's word for it).
Outcome = Literal["success", "partial", "rejected", "timed_out", "failed", "cancelled"]
# changes_requested: the blocks go back to the target agent with a note, then through
# audit and triage again (only while a re-audit round is left).
Decision = Literal["approved", "rejected", "changes_requested"]
# One block's verdict: accept the risk, reject the build over it, or have it changed.
Verdict = Literal["accept", "reject", "change"]
# Where a block decision came from: an operator's Update (tools, CLI), the originating
# task file (anyone who can write the task folder), or an allowed approver in Matrix.
DecisionSource = Literal["update", "task_file", "matrix"]
# How a plan's run of phases ended.
PlanOutcome = Literal["success", "failed", "cancelled"]
# The worker setting that names an agent stage's agent when the input names none.
AgentSetting = Literal["prefab_agent", "security_agent"]
# Outcomes of a pipeline whose close-out ran (v0.5.0's result status "complete").
COMPLETED_OUTCOMES: tuple[Outcome, ...] = ("success", "partial")


def shown(value: object, limit: int = 80) -> str:
    """repr() of a rejected value, cut short: an error must not echo 100 kB of input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def check_name(value: object, what: str = "name") -> str:
    """Names that become path components and YAML scalars: ^[a-z0-9][a-z0-9-]*$, max 63."""
    if not isinstance(value, str) or not NAME_RE.match(value) or len(value) > NAME_MAX:
        raise ValueError(f"{what} {shown(value)} must match ^[a-z0-9][a-z0-9-]*$ "
                         f"(1-{NAME_MAX} chars)")
    return value


def _no_control_chars(value: str, what: str) -> str:
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"{what} must not contain control characters (newline, NUL, ...)")
    return value


class BuildPipelineInput(BaseModel):
    """Input of BuildPipelineWorkflow. Unknown fields are refused so typos surface."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    build_name: str
    plan_path: str
    task_id: str
    target_agent: str
    # Optional knobs for operators and tests; production defaults.
    block_wait_timeout_seconds: float = Field(default=SEVEN_DAYS_SECONDS, gt=0,
                                              le=30 * 24 * 3600)
    block_poll_interval_seconds: float = Field(default=DEFAULT_BLOCK_POLL_SECONDS, ge=0.1,
                                               le=3600)
    # How long each agent has for its stage, from its task's write; unset means the
    # stage's policy (policies.AGENT_LIMITS overall; 2-4 h in runs begun before pickup and
    # work limits).
    agent_timeout_seconds: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    # Each agent stage's pickup limit (written -> claimed: past it, reminders) and work
    # limit (claimed -> done: past it, the stage fails); unset means policies.AGENT_LIMITS.
    pickup_timeout_seconds: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    work_timeout_seconds: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    # Per-build routing of stages 1 and 3; unset means the worker's PREFAB_AGENT /
    # SECURITY_AGENT setting.
    prefab_agent: str | None = None
    security_agent: str | None = None
    # Re-audits after fixes (flags, or changes an operator requested); unset means the
    # worker's REAUDIT_ROUNDS setting (0: audit once, as v0.5.0 did).
    reaudit_rounds: int | None = Field(default=None, ge=0, le=MAX_REAUDIT_ROUNDS)

    @field_validator("build_name")
    @classmethod
    def _build_name(cls, value: str) -> str:
        return check_name(value, "build_name")

    @field_validator("target_agent")
    @classmethod
    def _target_agent(cls, value: str) -> str:
        return check_name(value, "target_agent")

    @field_validator("prefab_agent", "security_agent")
    @classmethod
    def _stage_agent(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "agent")

    @field_validator("task_id")
    @classmethod
    def _task_id(cls, value: str, info: ValidationInfo) -> str:
        if info.context and info.context.get(STARTED_BY_EARLIER_WORKER):
            # A run already going when this rule came: it keeps the rule it started under
            # (non-empty, no path separators or control characters, at most 200), so its
            # history still replays; its notices sanitize the id instead.
            if (not isinstance(value, str) or not value.strip() or "/" in value
                    or "\\" in value or value in (".", "..") or len(value) > 200):
                raise ValueError(f"task_id {shown(value)} is not a usable task id")
            return _no_control_chars(value, "task_id")
        if not isinstance(value, str) or not TASK_ID_RE.fullmatch(value):
            raise ValueError(f"task_id {shown(value)} must match {TASK_ID_RE.pattern} "
                             f"(letters, digits, '.', '_', ':', '-'; at most 128 characters, "
                             f"e.g. a uuid4)")
        return value

    @field_validator("plan_path")
    @classmethod
    def _plan_path(cls, value: str) -> str:
        _no_control_chars(value, "plan_path")
        if not value.startswith("/"):
            raise ValueError(f"plan_path {shown(value)} must be an absolute path")
        if len(value) > 4096:
            raise ValueError("plan_path must be at most 4096 characters")
        return value


class PhaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    number: int = Field(ge=1)
    agent_type: str
    description: str = Field(min_length=1, max_length=20_000)
    context_refs: list[str] = Field(default_factory=list)

    @field_validator("agent_type")
    @classmethod
    def _agent_type(cls, value: str) -> str:
        return check_name(value, "agent_type")


class BuildPlanInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    plan_name: str
    phases: list[PhaseSpec] = Field(min_length=1, max_length=200)
    # The task the plan was filed as (the dispatcher's `workflow` task): linked to the run
    # and closed when it ends, in the platform dialect. None: no such task.
    task_id: str | None = Field(default=None, pattern=TASK_ID_RE.pattern)

    @field_validator("phases")
    @classmethod
    def _unique_numbers(cls, phases: list[PhaseSpec]) -> list[PhaseSpec]:
        numbers = [phase.number for phase in phases]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"phase numbers must be unique, got {numbers}")
        return phases

    @field_validator("plan_name")
    @classmethod
    def _plan_name(cls, value: str) -> str:
        return check_name(value, "plan_name")


class StageEvent(BaseModel):
    at: datetime
    stage: str
    event: str
    detail: str = ""


class WaitingOn(BaseModel):
    kind: Literal["agent", "block_decision", "activity"]
    stage: str
    agent: str | None = None
    task_type: str | None = None
    task_id: str | None = None
    since: datetime
    # The task queue of the host whose worker runs this stage (unset: the main queue).
    task_queue: str | None = None
    # Agent stages of runs with pickup and work limits: when the folder watch saw the
    # task claimed, and a line for humans once its pickup limit passed unclaimed.
    claimed_at: datetime | None = None
    note: str | None = None


class TaskNotice(BaseModel):
    """What the folder watch saw about one of a pipeline's task files: the dispatcher
    failed to route it (and retries), a decision written into it cannot be read, or an
    agent claimed it (`in-progress`; detail: the actor its history names)."""

    task_id: str = Field(max_length=200)
    kind: Literal["routing_failed", "decision_file_unreadable", "claimed"]
    detail: str = Field(max_length=500)


class StageTiming(BaseModel):
    """One agent task of a pipeline and where its time went (the nth of its stage)."""

    stage: str
    agent: str
    task_id: str
    attempt: int = 1
    written_at: datetime
    picked_up_at: datetime | None = None  # None: no claim seen (or not yet)
    done_at: datetime | None = None
    # completed, failed, timed_out, work_limit_passed, cancelled; None while it runs
    outcome: str | None = None
    reminders: int = 0

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented use; mypy refuses it
    @property
    def pickup_seconds(self) -> float | None:
        return _seconds(self.written_at, self.picked_up_at)

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented use; mypy refuses it
    @property
    def work_seconds(self) -> float | None:
        return _seconds(self.picked_up_at, self.done_at)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max((end - start).total_seconds(), 0.0), 3)


class DecisionWait(BaseModel):
    """How long a pipeline waited at stage 7, and who ended the wait."""

    since: datetime
    until: datetime | None = None  # None: still waiting
    ended_by: str | None = None  # the event that ended it (approved_by_update, timed_out...)
    decided_by: str | None = None
    decision_source: DecisionSource | None = None

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented use; mypy refuses it
    @property
    def seconds(self) -> float | None:
        return _seconds(self.since, self.until)


class TimeReport(BaseModel):
    """Where a build's time went: per agent task, per block decision, and totals."""

    stages: list[StageTiming] = Field(default_factory=list)
    decision_waits: list[DecisionWait] = Field(default_factory=list)
    totals: dict[str, float] = Field(default_factory=dict)


class PickupReminder(BaseModel):
    """Input of remind_pickup: an agent task nobody has claimed past its pickup limit."""

    build_name: str
    workflow_id: str
    stage: str
    agent: str
    task_id: str
    since: datetime
    reminder: int
    of: int


class PlanStatus(BaseModel):
    plan_name: str
    phases_total: int
    phases_done: list[int]
    current_phase: int | None = None
    current_agent: str | None = None
    waiting_on: WaitingOn | None = None
    outcome: PlanOutcome | None = None
    error: str | None = None


class BuildPlanResult(BaseModel):
    status: Literal["success", "failed"]
    phases_run: int


class BuildPhaseResult(BaseModel):
    """What an agent reports through complete_activity.py: JSON {"status", "output"}."""

    status: str = "success"
    output: str = ""


class AgentTaskRequest(BaseModel):
    """Input of every agent-dispatching activity: the task file to write."""

    task_id: str
    build_name: str
    target_agent: str
    task_type: str
    # When target_agent is empty, the worker setting of this name picks the agent.
    agent_setting: AgentSetting | None = None
    summary: str
    instruction: str
    plan_path: str | None = None
    extra_payload: dict[str, Any] = Field(default_factory=dict)
    # The pipeline's originating task (platform-dialect payload.originating_task_id);
    # None in requests recorded before it was passed.
    originating_task_id: str | None = None


class Finding(BaseModel):
    """One triage item; keys other than description are kept as given."""

    model_config = ConfigDict(extra="allow")

    description: str


def _findings(raw: Any) -> Any:
    """v0.5.0 recorded findings as plain strings; ours are {description: ...} mappings."""
    if isinstance(raw, list):
        return [{"description": item} if isinstance(item, str) else item for item in raw]
    return raw


class TriageResult(BaseModel):
    blocks: list[Finding] = Field(default_factory=list)
    flags: list[Finding] = Field(default_factory=list)
    info: list[Finding] = Field(default_factory=list)
    # Always set by this worker; empty in a result recorded by v0.5.0.
    triage_path: str = ""

    @field_validator("blocks", "flags", "info", mode="before")
    @classmethod
    def _as_findings(cls, raw: Any) -> Any:
        return _findings(raw)

    @property
    def recorded_by_v050(self) -> bool:
        return not self.triage_path


class AuditRound(BaseModel):
    """One audit of a pipeline and what became of its findings."""

    round: int = Field(ge=1)
    blocks: list[Finding] = Field(default_factory=list)
    flags: list[Finding] = Field(default_factory=list)
    info: list[Finding] = Field(default_factory=list)
    # Sent to the target agent after this audit: its flags, or the blocks an operator
    # asked to have changed (with the operator's note).
    sent_to_fix: list[Finding] = Field(default_factory=list)
    changes_note: str | None = None
    fix_output: str | None = None
    # Filled in by the next audit: what it no longer found, and what it found again.
    verified_fixed: list[Finding] = Field(default_factory=list)
    still_present: list[Finding] = Field(default_factory=list)
    # Flags of the last allowed audit: not sent for another unverified fix, decided as blocks.
    escalated_to_blocks: list[Finding] = Field(default_factory=list)


class AuditRequest(BaseModel):
    build_name: str
    plan_path: str
    target_agent: str
    task: AgentTaskRequest
    # Round 1 is the first audit (request.md in the build's audit folder); later rounds
    # are re-audits, each in a folder of its own, listing the previous round.
    round: int = Field(default=1, ge=1)
    previous: AuditRound | None = None


class NotifyBlocksInput(BaseModel):
    build_name: str
    task_id: str
    workflow_id: str
    blocks: list[Finding]
    # The audit round whose blocks wait (None: a run without audit rounds); decisions
    # name it, so one for an earlier round never decides a later one.
    round: int | None = None
    # Whether the operators may request changes (a re-audit round is left).
    changes_allowed: bool = False


class NotifyBlocksResult(BaseModel):
    delivered: list[str] = Field(default_factory=list)
    failures: list[str] = Field(default_factory=list)
    originating_task_path: str | None = None
    # How an operator can decide, as this worker is configured (shown in status and UI).
    decision_paths: list[str] = Field(default_factory=list)


class CloseOriginInput(BaseModel):
    """The end of a plan: its filing task, how the plan ended, what to say in it."""

    task_id: str
    outcome: str
    output: str


class PrepareInput(BaseModel):
    task_id: str
    # For the platform's build.started event; None from runs begun before it was sent.
    build_name: str | None = None
    target_agent: str | None = None


class PipelineSetup(BaseModel):
    """What a new pipeline learns from its worker before stage 1: the agents the worker's
    settings name for stages 1 and 3, and whether the originating task exists."""

    prefab_agent: str
    security_agent: str
    originating_task_path: str | None = None
    warning: str | None = None
    # The worker routes agent stages to their hosts' queues (AGENT_TASK_QUEUES is set).
    routed: bool = False
    # REAUDIT_ROUNDS; 0 in setups recorded before the setting existed.
    reaudit_rounds: int = 0


class OpenTask(BaseModel):
    """An agent task file left open when its pipeline ended: marked so no agent works on it."""

    task_id: str
    stage: str
    status: Literal["cancelled", "expired"]
    reason: str
    # The agent host's queue whose folder holds the file (unset: the main queue's).
    task_queue: str | None = None


class StageRoute(BaseModel):
    """Where an agent's stage runs: the task queue of its host, None for the main queue."""

    agent: str
    task_queue: str | None = None


class BlockCheckInput(BaseModel):
    task_id: str
    path_hint: str | None = None


class BlockResolution(BaseModel):
    decision: Decision
    task_status: str
    actor: str = ""
    note: str = ""


MAX_DECISION_NOTE_CHARS = 2000


class BlockDecision(BaseModel):
    """Argument of the approve_blocks / reject_blocks updates (a plain string also works)."""

    model_config = ConfigDict(extra="forbid")

    note: str = Field(default="", max_length=MAX_DECISION_NOTE_CHARS)
    decided_by: str = Field(default="operator", min_length=1, max_length=100)
    source: DecisionSource = "update"
    # For file decisions: the actor the file's own history names. Anyone who can write
    # the folder can write that name, so it is shown as claimed, never as decided_by.
    claimed_by: str | None = Field(default=None, max_length=100)
    # For file decisions: the id the deciding file carries. The pipeline refuses a file
    # decision whose file is not its originating task (None: sent by an earlier worker).
    task_id: str | None = Field(default=None, max_length=200)
    # Per block, by its number in the decision (1-based) or its `id`: accept, reject or
    # change. Blocks not named take the Update's own verdict (approve_blocks: accept,
    # reject_blocks: reject, request_changes: change).
    verdicts: dict[str, Verdict] = Field(default_factory=dict, max_length=MAX_VERDICTS)
    # The audit round the decision is for (None: whichever waits now).
    round: int | None = Field(default=None, ge=1)

    @field_validator("verdicts", mode="before")
    @classmethod
    def _verdict_keys(cls, raw: Any) -> Any:
        # YAML and Python callers write block numbers as integers.
        if isinstance(raw, dict):
            return {str(key).strip()[:200]: value for key, value in raw.items()}
        return raw


class BlockVerdict(BaseModel):
    """One block's verdict as recorded: by whom, through which path, with which note."""

    round: int
    index: int
    block_id: str | None = None
    description: str
    verdict: Verdict
    decided_by: str
    source: DecisionSource
    claimed_by: str | None = None
    note: str = ""


class MatrixNoticeRef(BaseModel):
    """Which pipeline a Matrix block notice is about; carried in the notice's content, and
    read back (as hostile input: anyone can post content) when someone replies to it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    workflow_id: str = Field(min_length=1, max_length=1000)
    run_id: str = Field(min_length=1, max_length=100)
    task_id: str = Field(min_length=1, max_length=200)
    # The audit round whose blocks the notice is about (1 in notices sent before rounds).
    round: int = Field(default=1, ge=1, le=100)

    @field_validator("workflow_id", "run_id", "task_id")
    @classmethod
    def _printable(cls, value: str, info: ValidationInfo) -> str:
        return _no_control_chars(value, str(info.field_name))


class RecordDecisionInput(BaseModel):
    task_id: str
    path_hint: str | None = None
    decision: Decision
    actor: str
    note: str = ""
    workflow_id: str
    source: DecisionSource = "update"
    claimed_by: str | None = None
    build_name: str | None = None  # for the platform's event; None from earlier runs
    verdicts: list[BlockVerdict] = Field(default_factory=list)


class PipelineStatus(BaseModel):
    build_name: str
    stage: str
    stage_number: int
    stages_done: list[str]
    blocks: int = 0
    flags: int = 0
    info: int = 0
    waiting_on: WaitingOn | None = None
    paused: bool = False
    pause_reason: str = ""
    outcome: Outcome | None = None
    failed_stage: str | None = None
    error: str | None = None
    decision: Decision | None = None
    decided_by: str | None = None
    decision_source: DecisionSource | None = None
    claimed_by: str | None = None
    decision_paths: list[str] = Field(default_factory=list)
    notification_failures: list[str] = Field(default_factory=list)
    agents: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    # Started by an earlier worker (v0.5.0 or before) and carried on by this one.
    adopted: bool = False
    # Where the time went so far (None from runs begun before pickup and work limits).
    time: TimeReport | None = None
    # Audits so far (round 1 the first), the re-audits allowed, and every block verdict.
    audit_round: int = 0
    reaudit_rounds: int = 0
    rounds: list[AuditRound] = Field(default_factory=list)
    block_verdicts: list[BlockVerdict] = Field(default_factory=list)
    # Stage -> the agent host's task queue it ran (or runs) on; main-queue stages absent.
    task_queues: dict[str, str] = Field(default_factory=dict)


class Tally(BaseModel):
    """What happened to the findings: the outcome's words beside `partial`."""

    blocks_accepted: int = 0
    blocks_rejected: int = 0
    blocks_changed: int = 0
    reaudits_run: int = 0
    flags_verified_fixed: int = 0
    # Flags whose fix no later audit checked (no re-audit allowed), or that a re-audit
    # found again; every flag is verified fixed when this is 0.
    flags_unverified: int = 0
    all_flags_verified_fixed: bool = True


class SummaryInput(BaseModel):
    workflow_id: str
    run_id: str
    build_name: str
    target_agent: str
    plan_path: str
    task_id: str
    outcome: Outcome
    failed_stage: str | None = None
    error: str | None = None
    stages_completed: list[str]
    started_at: datetime
    ended_at: datetime
    blocks: list[Finding] = Field(default_factory=list)
    flags: list[Finding] = Field(default_factory=list)
    info: list[Finding] = Field(default_factory=list)
    decision: Decision | None = None
    decided_by: str | None = None
    decision_source: DecisionSource | None = None
    claimed_by: str | None = None
    closeout_path: str | None = None
    notification_failures: list[str] = Field(default_factory=list)
    events: list[StageEvent] = Field(default_factory=list)
    open_tasks: list[OpenTask] = Field(default_factory=list)
    adopted: bool = False
    # Each agent task's written -> picked up -> done (empty from earlier runs).
    stage_times: list[StageTiming] = Field(default_factory=list)
    rounds: list[AuditRound] = Field(default_factory=list)
    block_verdicts: list[BlockVerdict] = Field(default_factory=list)
    tally: Tally | None = None  # None from runs begun before it was counted
    # Open tasks on agent hosts, closed there before the summary (close_open_tasks).
    closed_elsewhere: list[OpenTask] = Field(default_factory=list)
    task_queues: dict[str, str] = Field(default_factory=dict)


class BuildPipelineResult(BaseModel):
    # v0.5.0's fields: "complete" when the close-out ran, else "failed".
    status: Literal["complete", "failed"] = "failed"
    workflow_id: str = ""
    outcome: Outcome
    build_name: str
    stages_completed: list[str]
    failed_stage: str | None = None
    error: str | None = None
    blocks: int = 0
    flags: int = 0
    info: int = 0
    decision: Decision | None = None
    closeout_path: str | None = None
    summary_path: str | None = None
    tally: Tally = Field(default_factory=Tally)
