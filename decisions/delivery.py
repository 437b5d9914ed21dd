"""Deliver a block decision to the pipeline that waits on it, through its Update.

Every path that decides blocks outside the workflow (the task-folder watcher, the Matrix
listener, operator tools) ends here, so a decision is applied the same way whoever made
it. The Update id is derived from the workflow run: when several workers see the same
decision, Temporal applies the first and hands the others its result, so each pipeline
gets exactly one decision. A pipeline that is not (or no longer) waiting refuses it in
the Update's validator; that refusal is an expected outcome, not an error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError, RPCStatusCode

from models import BlockDecision, Decision
from policies import DECISION_DELIVERY_TIMEOUT, DECISION_DESCRIBE_TIMEOUT
from vocabulary import (
    APPROVE_BLOCKS_UPDATE,
    BUILD_PIPELINE_WORKFLOW,
    REJECT_BLOCKS_UPDATE,
    REQUEST_CHANGES_UPDATE,
)

log = logging.getLogger(__name__)

UPDATE_NAMES: dict[Decision, str] = {"approved": APPROVE_BLOCKS_UPDATE,
                                     "rejected": REJECT_BLOCKS_UPDATE,
                                     "changes_requested": REQUEST_CHANGES_UPDATE}
Delivery = Literal["applied", "refused", "gone", "unanswered"]


def update_id(workflow_id: str, run_id: str | None, round_no: int | None = None) -> str:
    """One id per waiting run and audit round: duplicates of a decision collapse into the
    first, and a later round's blocks (after a re-audit) wait on a decision of their own."""
    base = f"block-decision/{run_id or workflow_id}"
    return f"{base}/round-{round_no}" if round_no and round_no > 1 else base


async def deliver_decision(client: Client, *, workflow_id: str, run_id: str | None,
                           decision: Decision, choice: BlockDecision,
                           task_queue: str) -> Delivery:
    """Send `decision` to the workflow; `applied`, `refused` (not waiting, or already
    decided otherwise), `gone` (no such running workflow) or `unanswered` (no worker took
    the Update in time, e.g. a workflow on a queue nobody serves: the SDK would wait for
    one without end)."""
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    limit = DECISION_DELIVERY_TIMEOUT.total_seconds()
    # Whoever writes the folder (or posts in the room) names the run: only a running
    # pipeline on the queue this worker serves pipelines for (its own, or for an agent
    # host WORKFLOW_TASK_QUEUE: config.pipeline_queue) gets the Update. Anything else (a workflow no
    # worker serves, say) would hold a delivery until the limit.
    try:
        described = await handle.describe(rpc_timeout=DECISION_DESCRIBE_TIMEOUT)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            log.info("decision_target_gone", extra={"workflow_id": workflow_id,
                                                    "source": choice.source})
            return "gone"
        raise
    if described.status != WorkflowExecutionStatus.RUNNING:
        log.info("decision_target_gone", extra={"workflow_id": workflow_id,
                                                "source": choice.source})
        return "gone"
    if (described.workflow_type, described.task_queue) != (BUILD_PIPELINE_WORKFLOW, task_queue):
        log.warning("decision_not_delivered", extra={
            "workflow_id": workflow_id, "decision": decision, "source": choice.source,
            "error": f"not a {BUILD_PIPELINE_WORKFLOW} on task queue {task_queue!r} "
                     f"({described.workflow_type[:100]!r} on {described.task_queue[:100]!r})"})
        return "refused"
    try:
        applied = await asyncio.wait_for(handle.execute_update(
            UPDATE_NAMES[decision], choice, id=update_id(workflow_id, run_id, choice.round),
            result_type=str),
            limit)
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        # The SDK turns wait_for's cancel into its own error; a cancel of this task (the
        # worker stopping) must still stop it.
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise asyncio.CancelledError from None
        log.warning("decision_not_delivered", extra={
            "workflow_id": workflow_id, "decision": decision, "source": choice.source,
            "error": f"no answer within {limit:.0f}s (is a worker serving that workflow?)"})
        return "unanswered"
    except WorkflowUpdateFailedError as err:
        log.info("decision_refused", extra={"workflow_id": workflow_id, "decision": decision,
                                            "source": choice.source,
                                            "reason": str(err.cause or err)[:200]})
        return "refused"
    except RPCError as err:
        if err.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
            log.info("decision_target_gone", extra={"workflow_id": workflow_id,
                                                    "source": choice.source})
            return "gone"
        raise
    # With verdicts the answer is the decision they add up to (a block to change turns
    # an approval into changes requested); otherwise another answer is an earlier one.
    if applied != decision and not choice.verdicts:
        # One Update id per run: Temporal answered with the decision taken before.
        log.info("decision_refused", extra={"workflow_id": workflow_id, "decision": decision,
                                            "source": choice.source,
                                            "reason": f"the run was decided already: {applied}"})
        return "refused"
    log.info("decision_delivered", extra={"workflow_id": workflow_id, "decision": decision,
                                          "source": choice.source,
                                          "decided_by": choice.decided_by})
    return "applied"
