"""The I/O of BuildPipelineWorkflow's nine stages.

Agent stages (1, 2, 3, 5, 8) write a task file and suspend; the inline stages read
triage output, notify, poll the originating task and write the summary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.dispatch import agent_stage, dispatch_agent_task
from activities.notify import notify_all
from activities.triage import read_triage
from config import WorkerConfig
from exceptions import (
    BLOCKS_PENDING,
    TASK_FILE_ERROR,
    TRIAGE_INVALID,
    TRIAGE_MISSING,
    TaskFileError,
    TaskNotFoundError,
    TriageInvalidError,
    TriageMissingError,
)
from models import (
    AuditRequest,
    BlockCheckInput,
    BlockResolution,
    BuildPhaseResult,
    Finding,
    MatrixNoticeRef,
    NotifyBlocksInput,
    NotifyBlocksResult,
    RecordDecisionInput,
    SummaryInput,
    TriageResult,
    check_name,
)
from observability import BLOCKS_NOTIFIED, PIPELINES_COMPLETED, bind_build_name, count
from task_files import (
    APPROVED,
    REJECTING_STATUSES,
    SOURCE_AGENT,
    add_history,
    dump_yaml,
    find_task,
    read_task,
    update_task,
    write_private_atomic,
)

log = logging.getLogger(__name__)

AGENT_STAGES = ("prefab_scaffolding", "implement_build", "apply_flag_fixes", "close_build")
TRIAGE_FILE = "triage-output.yml"
AUDIT_FILE = "audit.md"
REQUEST_FILE = "request.md"


def audit_folder(config: WorkerConfig, build_name: str) -> Path:
    """`<audit dir>/audit-requests/<build>`; the name is re-checked so it cannot escape."""
    check_name(build_name, "build_name")
    folder = config.audit_dir / "audit-requests" / build_name
    # Agents can write below the audit root: a planted link must not redirect our writes.
    for part in (folder.parent, folder):
        if part.is_symlink():
            raise TaskFileError(f"{part}: is a symlink; refusing to follow it")
    return folder


def audit_request_markdown(request: AuditRequest, folder: Path) -> str:
    return f"""# Security audit request: {request.build_name}

## Scope
- Build: `{request.build_name}`
- Plan: `{request.plan_path}`
- Implemented by: `{request.target_agent}`
- Task id: `{request.task.task_id}` (task file `*-{request.task.task_id[:8]}.yml` in the task queue)

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
Each list is optional. Items are `{{description: ...}}` mappings (other keys are kept) or
plain strings. The file must be UTF-8, at most 1 MiB, plain YAML (no tags, anchors or
aliases); anything else fails the pipeline with an error naming the problem.

## How to complete
Write both files first, then:

    python complete_activity.py --task-file <your task file> success "audit written"

or `failed "<reason>"` if the audit could not be done.
"""


def _summary_filename(workflow_id: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in workflow_id)
    return f"{safe.lstrip('.') or 'workflow'}.yml"


def _finding_dicts(findings: list[Finding]) -> list[dict[str, Any]]:
    return [item.model_dump(mode="json") for item in findings]


def _who_set_status(task: dict[str, Any], status: str) -> tuple[str, str]:
    """(actor, note) of the newest history entry that set `status`, if any."""
    history = task.get("history")
    for entry in reversed(history if isinstance(history, list) else []):
        if isinstance(entry, dict) and entry.get("status") == status:
            return str(entry.get("actor") or "task file"), str(entry.get("note") or "")
    return "task file", ""


class PipelineActivities:
    """Activities bound to one WorkerConfig (built by the worker, never at import)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config

    def all(self) -> list[Callable[..., Any]]:
        return [*(agent_stage(self.config, name) for name in AGENT_STAGES),
                self.request_security_audit, self.process_triage_output, self.notify_blocks,
                self.wait_for_block_resolution, self.record_block_decision,
                self.summarize_workflow]

    @activity.defn(name="request_security_audit")
    async def request_security_audit(self, request: AuditRequest) -> BuildPhaseResult:
        folder = audit_folder(self.config, request.build_name)
        text = audit_request_markdown(request, folder)
        await asyncio.to_thread(write_private_atomic, folder / REQUEST_FILE, text.encode())
        await dispatch_agent_task(self.config, request.task)

    @activity.defn(name="process_triage_output")
    async def process_triage_output(self, build_name: str) -> TriageResult:
        bind_build_name(build_name)
        path = audit_folder(self.config, build_name) / TRIAGE_FILE
        try:
            return await asyncio.to_thread(read_triage, path)
        except TriageMissingError as err:
            raise ApplicationError(str(err), type=TRIAGE_MISSING) from None
        except TriageInvalidError as err:
            raise ApplicationError(str(err), type=TRIAGE_INVALID, non_retryable=True) from None

    @activity.defn(name="notify_blocks")
    async def notify_blocks(self, request: NotifyBlocksInput) -> NotifyBlocksResult:
        bind_build_name(request.build_name)
        blocks = len(request.blocks)
        count(BLOCKS_NOTIFIED, blocks)
        title = f"Build {request.build_name}: {blocks} security block(s) need a decision"
        lines = "\n".join(f"- {' '.join(item.description.split())[:300]}"
                          for item in request.blocks)
        message = (f"{title}\n{lines}\nWorkflow: {request.workflow_id}\n"
                   f"Approve: set task {request.task_id} to status 'approved' "
                   f"(or use the approve_blocks update); reject with status 'rejected'.")
        pipeline = MatrixNoticeRef(workflow_id=request.workflow_id,
                                   run_id=activity.info().workflow_run_id,
                                   task_id=request.task_id)
        delivered, failures = await notify_all(self.config, title, message,
                                               f"{request.workflow_id}/{pipeline.run_id}/blocks",
                                               pipeline)
        note = f"{blocks} security block(s) await approval (workflow {request.workflow_id})"
        if failures:
            note += "; notification failed: " + "; ".join(failures)
        try:
            path = await asyncio.to_thread(find_task, self.config.task_queue_dir,
                                           request.task_id)
            await asyncio.to_thread(update_task, path, lambda task: add_history(
                task, status="input-required", actor=SOURCE_AGENT, note=note))
        except TaskNotFoundError:
            failures.append(f"originating task {request.task_id!r} not found; approve with "
                            f"the approve_blocks update")
            path = None
        except TaskFileError as err:
            raise ApplicationError(str(err), type=TASK_FILE_ERROR, non_retryable=True) from None
        log.info("blocks_notified", extra={"build_name": request.build_name,
                                           "delivered": delivered, "failures": failures})
        return NotifyBlocksResult(delivered=delivered, failures=failures,
                                  originating_task_path=str(path) if path else None)

    @activity.defn(name="wait_for_block_resolution")
    async def wait_for_block_resolution(self, request: BlockCheckInput) -> BlockResolution:
        """One look at the originating task. Still pending -> a benign retryable error:
        the retry policy schedules the next look, holding nothing in between."""
        hint = Path(request.path_hint) if request.path_hint else None
        try:
            path = await asyncio.to_thread(find_task, self.config.task_queue_dir,
                                           request.task_id, hint=hint)
            task = await asyncio.to_thread(read_task, path)
        except TaskNotFoundError:
            raise ApplicationError(f"originating task {request.task_id!r} not found yet",
                                   type=BLOCKS_PENDING,
                                   category=ApplicationErrorCategory.BENIGN) from None
        except TaskFileError as err:
            raise ApplicationError(str(err), type=BLOCKS_PENDING,
                                   category=ApplicationErrorCategory.BENIGN) from None
        status = str(task.get("status", ""))
        actor, note = _who_set_status(task, status)
        if status == APPROVED:
            return BlockResolution(decision="approved", task_status=status, actor=actor,
                                   note=note)
        if status in REJECTING_STATUSES:
            return BlockResolution(decision="rejected", task_status=status, actor=actor,
                                   note=note)
        raise ApplicationError(f"blocks pending (originating task status {status!r})",
                               type=BLOCKS_PENDING, category=ApplicationErrorCategory.BENIGN)

    @activity.defn(name="record_block_decision")
    async def record_block_decision(self, request: RecordDecisionInput) -> str | None:
        """Write an operator's Update decision into the originating task's history."""
        hint = Path(request.path_hint) if request.path_hint else None
        note = f"{request.decision} via workflow update by {request.actor}"
        if request.note:
            note += f": {request.note}"
        try:
            path = await asyncio.to_thread(find_task, self.config.task_queue_dir,
                                           request.task_id, hint=hint)
        except TaskNotFoundError:
            log.warning("decision_not_recorded", extra={"task_id": request.task_id})
            return None
        await asyncio.to_thread(update_task, path, lambda task: add_history(
            task, status=request.decision, actor=request.actor, note=note))
        return str(path)

    @activity.defn(name="summarize_workflow")
    async def summarize_workflow(self, summary: SummaryInput) -> str:
        bind_build_name(summary.build_name)
        month = summary.started_at.strftime("%Y-%m")
        path = self.config.summary_dir / month / _summary_filename(summary.workflow_id)
        document = {
            "workflow_id": summary.workflow_id,
            "run_id": summary.run_id,
            "workflow_type": "BuildPipelineWorkflow",
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
            "closeout_path": summary.closeout_path,
            "notification_failures": summary.notification_failures,
            "events": [event.model_dump(mode="json") for event in summary.events],
        }
        await asyncio.to_thread(write_private_atomic, path, dump_yaml(document))
        count(PIPELINES_COMPLETED, outcome=summary.outcome)
        log.info("summary_written", extra={"summary_path": str(path),
                                           "build_name": summary.build_name,
                                           "outcome": summary.outcome})
        return str(path)
