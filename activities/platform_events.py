"""What the platform's event log hears about a build (event_log.py writes it).

With AGENT_BUS_COMMS_DIR set, the activity where each moment happens calls one function
here: build started (prepare_pipeline), an agent's task written (`handoff.created`; the
audit's is `audit.requested`), the triage read (`audit.completed`, then one
`security.finding` per block and per flag), the block decision recorded
(`handoff.completed`: the blocks handed to the operators came back decided), and the
summary written (`build.completed`, with the outcome).

An event never holds up or fails its stage: a log that cannot be written costs a WARNING
and one count of build_platform_event_failures, and the stage goes on. Events say what
happened and where to look, never what an agent was told: no instruction, no task token,
no finding text (an audit may quote a secret), no operator's note.

At least once, as the platform's own federation: an activity run again (its worker died
after writing the event) writes its event again. `metadata.event_key` is the same for
both copies, so a reader can drop the second.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from temporalio import activity

from config import WorkerConfig
from exceptions import EventLogError, FileIoStalledError
from models import (
    AgentTaskRequest,
    Finding,
    PipelineSetup,
    PrepareInput,
    RecordDecisionInput,
    SummaryInput,
    TriageResult,
)
from observability import PLATFORM_EVENT_FAILURES, PLATFORM_EVENTS_WRITTEN, count
from policies import EVENT_IO_TIMEOUT
from taskfiles.documents import SOURCE_AGENT
from taskfiles.io_pool import run_file_io
from taskfiles.visible_text import visible_line
from telemetry import event_log
from vocabulary import (
    EVENT_AUDIT_COMPLETED,
    EVENT_AUDIT_REQUESTED,
    EVENT_BUILD_COMPLETED,
    EVENT_BUILD_STARTED,
    EVENT_HANDOFF_COMPLETED,
    EVENT_HANDOFF_CREATED,
    EVENT_SECURITY_FINDING,
    PREPARE_PIPELINE,
    PROCESS_TRIAGE_OUTPUT,
    RECORD_DECISION,
    REQUEST_SECURITY_AUDIT,
    SUMMARIZE_WORKFLOW,
)

log = logging.getLogger(__name__)

SUMMARY_CHARS = 200
NAME_CHARS = 100  # who decided: an operator's name or a Matrix user id


def _event(event: str, summary: str, key: str, *, target: str | None = None,
           artifact_path: str | Path | None = None, **metadata: Any) -> dict[str, Any]:
    """A record of the running activity's pipeline; empty metadata values left out."""
    info = activity.info()
    fields = {"workflow_id": info.workflow_id, "run_id": info.workflow_run_id, **metadata,
              "event_key": f"{info.workflow_run_id}/{event}/{key}"}
    return event_log.new_record(
        event, SOURCE_AGENT, visible_line(summary, SUMMARY_CHARS), target=target or None,
        artifact_path=str(artifact_path) if artifact_path else None,
        metadata={name: value for name, value in fields.items()
                  if value is not None and value != ""})


async def _write(config: WorkerConfig, records: list[dict[str, Any]]) -> None:
    folder = config.agent_bus_comms_dir
    if folder is None or not records:
        return
    try:
        await run_file_io(event_log.append, folder, records,
                          timeout=EVENT_IO_TIMEOUT.total_seconds())
    except (EventLogError, FileIoStalledError, OSError, ValueError) as err:
        # ValueError: text JSON cannot carry as UTF-8 (a lone surrogate in a name).
        for record in records:
            count(PLATFORM_EVENT_FAILURES, event=record["event"])
        log.warning("platform_event_not_written", extra={
            "platform_events": [record["event"] for record in records], "error": str(err)})
        return
    for record in records:
        count(PLATFORM_EVENTS_WRITTEN, event=record["event"])


async def build_started(config: WorkerConfig, request: PrepareInput,
                        setup: PipelineSetup) -> None:
    if config.agent_bus_comms_dir is None or request.build_name is None:
        return  # a run begun before the event existed does not say which build it is
    await _write(config, [_event(
        EVENT_BUILD_STARTED, f"Build {request.build_name} started", "start",
        target=request.target_agent, artifact_path=setup.originating_task_path,
        build_name=request.build_name, stage=PREPARE_PIPELINE, task_id=request.task_id)])


async def handed_off(config: WorkerConfig, request: AgentTaskRequest, task_path: Path) -> None:
    """An agent's task file is written: its target agent now has the stage."""
    if config.agent_bus_comms_dir is None:
        return
    target = request.target_agent or getattr(config, request.agent_setting or "", None)
    info = activity.info()
    stage = info.activity_type
    event = EVENT_AUDIT_REQUESTED if stage == REQUEST_SECURITY_AUDIT else EVENT_HANDOFF_CREATED
    await _write(config, [_event(
        event, f"{stage} of {request.build_name} handed to {target}", request.task_id,
        target=target, artifact_path=task_path, build_name=request.build_name, stage=stage,
        task_id=request.task_id, task_type=request.task_type, attempt=info.attempt)])


def _findings(kind: str, findings: list[Finding], build_name: str,
              triage_path: Path) -> list[dict[str, Any]]:
    return [_event(EVENT_SECURITY_FINDING,
                   f"Security {kind} {number}/{len(findings)} in build {build_name}",
                   f"{kind}-{number}", artifact_path=triage_path, build_name=build_name,
                   stage=PROCESS_TRIAGE_OUTPUT, severity=kind, index=number,
                   total=len(findings))
            for number, _ in enumerate(findings, start=1)]


async def audit_completed(config: WorkerConfig, build_name: str, triage: TriageResult,
                          triage_path: Path) -> None:
    """The triage is read: the audit's outcome, then each block and each flag."""
    if config.agent_bus_comms_dir is None:
        return
    counts: dict[str, Any] = {"blocks": len(triage.blocks), "flags": len(triage.flags),
              "info": len(triage.info)}
    records = [_event(
        EVENT_AUDIT_COMPLETED, f"Audit of {build_name}: " + ", ".join(
            f"{number} {name}" for name, number in counts.items()), "triage",
        artifact_path=triage_path, build_name=build_name, stage=PROCESS_TRIAGE_OUTPUT,
        **counts)]
    records += _findings("block", triage.blocks, build_name, triage_path)
    records += _findings("flag", triage.flags, build_name, triage_path)
    await _write(config, records)


async def decision_recorded(config: WorkerConfig, request: RecordDecisionInput,
                            task_path: str | None) -> None:
    """The operators' decision on the blocks, by whom and by which path."""
    if config.agent_bus_comms_dir is None:
        return
    who = visible_line(request.actor, NAME_CHARS)
    claimed = visible_line(request.claimed_by, NAME_CHARS) if request.claimed_by else None
    build = f" of {request.build_name}" if request.build_name else ""
    await _write(config, [_event(
        EVENT_HANDOFF_COMPLETED, f"Blocks{build} {request.decision} via {request.source} "
                                 f"by {who}", "decision",
        artifact_path=task_path, build_name=request.build_name, stage=RECORD_DECISION,
        task_id=request.task_id, decision=request.decision, decided_by=who,
        decision_source=request.source, claimed_by=claimed)])


async def build_completed(config: WorkerConfig, summary: SummaryInput,
                          summary_path: Path) -> None:
    if config.agent_bus_comms_dir is None:
        return
    failed = f" at {summary.failed_stage}" if summary.failed_stage else ""
    await _write(config, [_event(
        EVENT_BUILD_COMPLETED, f"Build {summary.build_name} {summary.outcome}{failed}", "end",
        target=summary.target_agent, artifact_path=summary_path,
        build_name=summary.build_name, stage=SUMMARIZE_WORKFLOW, task_id=summary.task_id,
        outcome=summary.outcome, failed_stage=summary.failed_stage,
        stages_completed=len(summary.stages_completed), blocks=len(summary.blocks),
        flags=len(summary.flags), info=len(summary.info), decision=summary.decision,
        duration_seconds=round((summary.ended_at - summary.started_at).total_seconds(), 3))])
