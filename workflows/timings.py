"""Where a build's time went, from what its workflow recorded: each agent task's written
-> picked up -> done (StageTiming), each wait for a block decision (from the stage events),
and totals. Pure functions of their arguments: the workflow's status query and the
summary activity compute the same figures from the same records."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from models import DecisionSource, DecisionWait, StageEvent, StageTiming, TimeReport
from vocabulary import WAIT_FOR_BLOCK_RESOLUTION

# Stage-7 events that do not end the wait: entering it, pause and resume, warnings, a
# failed look at the file by runs that still poll it.
_NOT_AN_ENDING = frozenset({"started", "held", "paused", "resumed", "warning", "poll_failed"})


def decision_waits(events: Sequence[StageEvent], decided_by: str | None = None,
                   decision_source: DecisionSource | None = None) -> list[DecisionWait]:
    """Every stretch at stage 7: from its start to the first event that ended it (a
    decision, the deadline, the stage's end); the last one open while the run waits."""
    waits: list[DecisionWait] = []
    for event in events:
        if event.stage != WAIT_FOR_BLOCK_RESOLUTION:
            continue
        if event.event == "started":
            waits.append(DecisionWait(since=event.at))
        elif waits and waits[-1].until is None and event.event not in _NOT_AN_ENDING:
            wait = waits[-1]
            wait.until, wait.ended_by = event.at, event.event
            if event.event != "timed_out":
                wait.decided_by, wait.decision_source = decided_by, decision_source
    return waits


def _total(values: Sequence[float | None]) -> float:
    return round(sum(value for value in values if value is not None), 3)


def time_report(stage_times: Sequence[StageTiming], events: Sequence[StageEvent], *,
                started: datetime, ended: datetime | None = None,
                decided_by: str | None = None,
                decision_source: DecisionSource | None = None) -> TimeReport:
    waits = decision_waits(events, decided_by, decision_source)
    totals = {
        "agent_tasks": float(len(stage_times)),
        "pickup_seconds": _total([timing.pickup_seconds for timing in stage_times]),
        "work_seconds": _total([timing.work_seconds for timing in stage_times]),
        "decision_seconds": _total([wait.seconds for wait in waits]),
        "reminders": float(sum(timing.reminders for timing in stage_times)),
    }
    if ended is not None:
        totals["build_seconds"] = round(max((ended - started).total_seconds(), 0.0), 3)
    return TimeReport(stages=list(stage_times), decision_waits=waits, totals=totals)
