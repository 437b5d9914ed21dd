"""Stage 7 as runs recorded before decisions were event-driven wait for it.

Today stage 7 parks on its deadline timer alone and every decision arrives as an Update
(BuildPipelineWorkflow._wait_for_decision). Two older shapes still replay, and still
run for pipelines parked in them when a worker takes over:

- parked by v0.5.0: its check activity (no timer beside it, as recorded); when that
  activity ends without a decision (its worker is gone), the deadline timer;
- parked by this service before decisions were event-driven: the polling activity
  (retried by its retry policy) beside the deadline timer, as recorded.

In both, an Update can still decide while the check runs. Only runs whose history lacks
the event-driven-wait patch get here; docs/patch-retirement.md says when this module can
go.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    import policies
    from models import BlockCheckInput, BlockResolution, BuildPipelineInput
    from vocabulary import APPROVED, WAIT_FOR_BLOCK_RESOLUTION
    from workflows.contracts import BuildPipelineActivities
    from workflows.failures import describe_activity_failure
    from workflows.pipeline_state import PipelineState


async def wait(state: PipelineState, pipeline: BuildPipelineInput, deadline: timedelta,
               started: datetime) -> None:
    """Wait as the run's history recorded it, until `state.decision.taken` is set or the
    deadline passes (builtins.TimeoutError, or a return with no decision)."""
    poll: workflow.ActivityHandle[Any] | None = None
    try:
        if state.triage.recorded_by_v050:
            poll = _start_check(state, [pipeline.build_name, pipeline.task_id], v050=True)
            await workflow.wait_condition(_decided_or(state, poll))
        else:
            poll = _start_check(
                state, [BlockCheckInput(task_id=pipeline.task_id,
                                        path_hint=state.origin_task_path)],
                interval=timedelta(seconds=pipeline.block_poll_interval_seconds),
                deadline=deadline)
            await workflow.wait_condition(_decided_or(state, poll), timeout=deadline,
                                          timeout_summary="block decision deadline")
        if state.decision.taken is None:
            _take_file_decision(state, poll)
        if state.decision.taken is None:
            # The check ended without a decision; an Update can still decide.
            remaining = deadline - (workflow.now() - started)
            if remaining <= timedelta(0):
                return
            await state.decision.until_taken(remaining)
    finally:
        if poll is not None and not poll.done():
            poll.cancel()


def _decided_or(state: PipelineState, check: workflow.ActivityHandle[Any]
                ) -> Callable[[], bool]:
    return lambda: state.decision.taken is not None or check.done()


def _start_check(state: PipelineState, args: list[Any], *, v050: bool = False,
                 interval: timedelta | None = None,
                 deadline: timedelta | None = None) -> workflow.ActivityHandle[Any]:
    """The stage-7 check activity, with the options its recorded shape holds."""
    if v050:
        return workflow.start_activity_method(
            BuildPipelineActivities.wait_for_block_resolution, args=args,
            schedule_to_close_timeout=policies.V050_BLOCK_CHECK_LIMIT,
            heartbeat_timeout=policies.V050_BLOCK_CHECK_HEARTBEAT,
            retry_policy=policies.ONCE,
            cancellation_type=workflow.ActivityCancellationType.TRY_CANCEL)
    assert interval is not None
    assert deadline is not None
    return workflow.start_activity_method(
        BuildPipelineActivities.wait_for_block_resolution, args=args,
        start_to_close_timeout=policies.BLOCK_CHECK_ATTEMPT,
        schedule_to_close_timeout=deadline + policies.BLOCK_CHECK_HEADROOM,
        retry_policy=policies.block_poll_retry(interval),
        cancellation_type=workflow.ActivityCancellationType.TRY_CANCEL,
        summary=state.summary_line(WAIT_FOR_BLOCK_RESOLUTION,
                                   "task file or approve_blocks update"))


def _take_file_decision(state: PipelineState, poll: workflow.ActivityHandle[Any]) -> None:
    """The check's answer, read from the originating task file, as the decision."""
    try:
        resolution = poll.result()
    except ActivityError as err:
        message, _ = describe_activity_failure(err)
        state.event(WAIT_FOR_BLOCK_RESOLUTION, "poll_failed",
                    f"{message}; waiting for a decision by Update, task file or chat")
        return
    if resolution is None:
        # v0.5.0's check returns nothing once the originating task is approved.
        resolution = BlockResolution(decision="approved", task_status=APPROVED)
    decision = state.decision
    decision.taken = resolution.decision
    decision.decided_by, decision.source = "task file", "task_file"
    decision.claimed_by = resolution.actor or None
    if decision.claimed_by == "task file":
        decision.claimed_by = None
    decision.note = resolution.note
    state.event(WAIT_FOR_BLOCK_RESOLUTION, "task_status", resolution.task_status)
