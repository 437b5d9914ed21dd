"""What a BuildPipelineWorkflow run knows, in one typed object: its shape (decided once,
from the patches its history holds), where it is, what was found, and the decision on
its blocks. The workflow's queries, Updates and summary read it; only the workflow
(and workflows/legacy_stage7.py, for runs parked in an older stage 7) changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from models import (
        AuditRound,
        BlockVerdict,
        BuildPipelineInput,
        Decision,
        DecisionSource,
        Finding,
        OpenTask,
        Outcome,
        PipelineSetup,
        StageEvent,
        StageTiming,
        TriageResult,
        WaitingOn,
    )
    from vocabulary import STAGE_NUMBERS, TOTAL_STAGES
    from workflows.patches import (
        LOCAL_INLINE_PATCH,
        PICKUP_LIMITS_PATCH,
        PREPARE_PATCH,
        STAGE_ROUTING_PATCH,
    )


@dataclass
class RunShape:
    """Decided once, at the start, by the patches the run's history holds: a run keeps
    the shape it began with (runs begun before a change keep theirs)."""

    # Started by an earlier worker (v0.5.0, or this service before it resolved agents
    # up front): it goes on under this one, keeping the input rules it started under.
    adopted: bool = False
    # Stages 4 and 9 as local activities (no round trip through the server).
    local_inline: bool = False
    # Agent stages on their agent's host queue (AGENT_TASK_QUEUES).
    routing: bool = False
    # Pickup and work limits per agent stage, watched by the workflow.
    pickup_limits: bool = False

    @classmethod
    def of_this_run(cls) -> RunShape:
        """In this order: each `patched` call is a marker in a new run's history."""
        adopted = not workflow.patched(PREPARE_PATCH)
        local_inline = workflow.patched(LOCAL_INLINE_PATCH)
        routing = workflow.patched(STAGE_ROUTING_PATCH)
        return cls(adopted=adopted, local_inline=local_inline, routing=routing,
                   pickup_limits=workflow.patched(PICKUP_LIMITS_PATCH))


@dataclass
class DecisionState:
    """Stage 7: whether a decision is awaited, and the one taken (by whom, how)."""

    awaiting: bool = False
    taken: Decision | None = None
    decided_by: str | None = None
    source: DecisionSource | None = None
    claimed_by: str | None = None
    note: str = ""
    # Taken by Update (every path today): recorded into the originating task after.
    via_update: bool = False
    # How an operator can decide, as stage 6 found out (shown while parked).
    paths: list[str] = field(default_factory=list)

    def reset(self) -> None:
        """A later round's blocks wait on a decision of their own."""
        self.taken = self.decided_by = self.source = self.claimed_by = None
        self.note, self.via_update = "", False

    async def until_taken(self, timeout: timedelta) -> None:
        """Wait for a decision; builtins.TimeoutError when `timeout` passes first."""
        await workflow.wait_condition(lambda: self.taken is not None, timeout=timeout,
                                      timeout_summary="block decision deadline")


@dataclass
class PipelineState:
    input: BuildPipelineInput | None = None
    setup: PipelineSetup | None = None
    shape: RunShape = field(default_factory=RunShape)
    adoption_noted: bool = False
    stage: str = "starting"
    stages_done: list[str] = field(default_factory=list)
    events: list[StageEvent] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # task id -> what the folder watch said about it, while the run waits on it
    task_notices: dict[str, str] = field(default_factory=dict)
    triage: TriageResult = field(default_factory=TriageResult)
    waiting: WaitingOn | None = None
    # task id -> its stage, for agent tasks not finished; and why some expired
    open_tasks: dict[str, str] = field(default_factory=dict)
    expired_tasks: dict[str, str] = field(default_factory=dict)
    paused: bool = False
    pause_reason: str = ""
    decision: DecisionState = field(default_factory=DecisionState)
    notification_failures: list[str] = field(default_factory=list)
    origin_task_path: str | None = None
    outcome: Outcome | None = None
    failed_stage: str | None = None
    error: str | None = None
    closeout_path: str | None = None
    # stage -> the agent host's task queue it runs on; task id -> the host's queue
    task_queues: dict[str, str] = field(default_factory=dict)
    task_routes: dict[str, str] = field(default_factory=dict)
    closed_elsewhere: list[OpenTask] = field(default_factory=list)
    # Audit rounds (round 1 the first audit) and the re-audits this run may make.
    reaudit_limit: int = 0
    rounds: list[AuditRound] = field(default_factory=list)
    # The blocks the current decision is about, and every block's verdict so far.
    parked_blocks: list[Finding] = field(default_factory=list)
    verdicts: list[BlockVerdict] = field(default_factory=list)
    # task id -> where that agent task's time went (every run: state, not commands)
    stage_times: dict[str, StageTiming] = field(default_factory=dict)

    def event(self, stage: str, event: str, detail: str = "") -> None:
        self.events.append(StageEvent(at=workflow.now(), stage=stage, event=event,
                                      detail=detail))

    def summary_line(self, stage: str, target: str | None) -> str:
        """An activity's one-line summary in the Web UI: `<n>/9 <stage> → <target>`."""
        # Helper activities (record_block_decision) carry the number of the stage they serve.
        number = STAGE_NUMBERS.get(stage) or STAGE_NUMBERS.get(self.stage, 0)
        line = f"{number}/{TOTAL_STAGES} {stage}"
        return f"{line} → {target}" if target else line
