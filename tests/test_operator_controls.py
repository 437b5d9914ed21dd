"""Operators watch and steer pipelines: queries, approve/reject Updates, pause/resume
Signals and the Web UI story (activity summaries, current details), on a real dev server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError

from exceptions import DecisionRefusedError, InvalidInputError
from models import (
    BlockDecision,
    BuildPipelineInput,
    BuildPipelineResult,
    BuildPlanInput,
    BuildPlanResult,
    PhaseSpec,
    PipelineStatus,
    PlanStatus,
    StageEvent,
)
from standins.agents import (
    complete_task,
    load_yaml,
    play_stage,
    poll,
    tasks_for,
    wait_for_status,
    wait_for_task,
    wait_until_parked,
    write_origin_task,
)
from taskfiles.lookup import find_task
from tests.conftest import PipelineEnv
from vocabulary import (
    APPLY_FLAG_FIXES,
    APPROVE_BLOCKS_UPDATE,
    BUILD_PIPELINE_WORKFLOW,
    BUILD_PLAN_WORKFLOW,
    CLOSE_BUILD,
    EVENTS_QUERY,
    IMPLEMENT_BUILD,
    PAUSE_SIGNAL,
    PREFAB_SCAFFOLDING,
    PROCESS_TRIAGE_OUTPUT,
    REJECT_BLOCKS_UPDATE,
    REQUEST_SECURITY_AUDIT,
    RESUME_SIGNAL,
    STATUS_QUERY,
    SUBMITTED,
    SUMMARIZE_WORKFLOW,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PHASE,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
    TASK_SECURITY_FIX,
)

BLOCK = "Session token written to the build log"


async def start_pipeline(pipeline: PipelineEnv, build: str) -> tuple[WorkflowHandle, str]:
    task_id = write_origin_task(pipeline.queue_dir)
    inp = BuildPipelineInput(build_name=build, plan_path="/plans/ops.md", task_id=task_id,
                             target_agent="builder", block_poll_interval_seconds=30)
    handle = await pipeline.start(BUILD_PIPELINE_WORKFLOW, inp, result_type=BuildPipelineResult)
    return handle, task_id


async def status_of(handle: WorkflowHandle) -> PipelineStatus:
    return await handle.query(STATUS_QUERY, result_type=PipelineStatus)


async def events_of(handle: WorkflowHandle) -> list[StageEvent]:
    return await handle.query(EVENTS_QUERY, result_type=list[StageEvent])


async def current_details(handle: WorkflowHandle) -> str:
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return metadata.current_details


async def park_at_blocks(pipeline: PipelineEnv, build: str) -> tuple[WorkflowHandle, str]:
    handle, task_id = await start_pipeline(pipeline, build)
    await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_PREFAB, pipeline.env)
    await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_PLAN, pipeline.env)
    audit = await wait_for_task(pipeline.queue_dir, handle.id, TASK_SECURITY_AUDIT)
    pipeline.write_triage(build, f"blocks:\n- description: {BLOCK}\n")
    await complete_task(audit, pipeline.env, "success", "audit written")
    await wait_until_parked(handle)
    return handle, task_id


async def activity_summaries(handle: WorkflowHandle) -> list[str]:
    """Each activity's summary line, as the Web UI's timeline shows it: a local
    activity's is on its marker."""
    summaries = []
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes") or (
                event.HasField("marker_recorded_event_attributes")
                and event.user_metadata.HasField("summary")):
            payload = event.user_metadata.summary
            summaries.append(pydantic_data_converter.payload_converter.from_payload(payload, str))
    return summaries


@pytest.mark.slow
async def test_status_events_and_web_ui_story(pipeline: PipelineEnv) -> None:
    handle, _ = await start_pipeline(pipeline, "watched-build")
    prefab = await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PREFAB)
    prefab_id = load_yaml(prefab)["id"]
    status = await wait_for_status(handle, lambda s: s.waiting_on is not None, "stage 1 waiting")
    assert (status.stage, status.stage_number, status.stages_done) == (
        PREFAB_SCAFFOLDING, 1, [])
    assert status.waiting_on is not None
    assert (status.waiting_on.kind, status.waiting_on.agent, status.waiting_on.task_type,
            status.waiting_on.task_id) == ("agent", "claudebox", TASK_BUILD_PREFAB, prefab_id)
    assert status.waiting_on.since is not None
    assert not status.paused
    assert status.outcome is None
    details_1 = await current_details(handle)
    assert "Stage 1/9: `prefab_scaffolding`" in details_1
    assert "Waiting on claudebox since" in details_1

    await complete_task(prefab, pipeline.env)
    await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PLAN)
    status = await wait_for_status(handle, lambda s: s.stage_number == 2, "stage 2")
    assert status.stages_done == [PREFAB_SCAFFOLDING]
    assert status.waiting_on is not None
    assert status.waiting_on.agent == "builder"
    details_2 = await current_details(handle)
    assert details_2 != details_1
    assert "Stage 2/9: `implement_build`" in details_2
    assert "Done: prefab_scaffolding" in details_2

    await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_PLAN, pipeline.env)
    audit = await wait_for_task(pipeline.queue_dir, handle.id, TASK_SECURITY_AUDIT)
    pipeline.write_triage("watched-build", "flags:\n- Pin versions\ninfo:\n- fine\n")
    await complete_task(audit, pipeline.env)
    await play_stage(pipeline.queue_dir, handle.id, TASK_SECURITY_FIX, pipeline.env)
    await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_CLOSEOUT, pipeline.env,
                     message="/docs/closeout.md")
    result: BuildPipelineResult = await handle.result()
    assert result.outcome == "success"

    final = await status_of(handle)  # queries still answer on a closed workflow
    assert final.outcome == "success"
    assert (final.flags, final.info) == (1, 1)
    assert final.stages_done[-1] == SUMMARIZE_WORKFLOW
    assert final.waiting_on is None
    assert "Outcome: **success**" in await current_details(handle)
    assert await activity_summaries(handle) == [
        "resolve agents, find originating task", "1/9 prefab_scaffolding → claudebox",
        "2/9 implement_build → builder",
        "3/9 request_security_audit → security-agent", "4/9 process_triage_output",
        "5/9 apply_flag_fixes → builder", "8/9 close_build → builder",
        "9/9 summarize_workflow"]
    events = await events_of(handle)
    started = [e.stage for e in events if e.event == "started"]
    assert started == ["pipeline", PREFAB_SCAFFOLDING, IMPLEMENT_BUILD,
                       REQUEST_SECURITY_AUDIT, PROCESS_TRIAGE_OUTPUT, APPLY_FLAG_FIXES,
                       CLOSE_BUILD, SUMMARIZE_WORKFLOW]
    assert [e.at for e in events] == sorted(e.at for e in events)


async def test_pause_holds_the_next_stage_until_resume(pipeline: PipelineEnv) -> None:
    handle, _ = await start_pipeline(pipeline, "paused-build")
    prefab = await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PREFAB)
    await handle.signal(PAUSE_SIGNAL, "database migration window")
    status = await wait_for_status(handle, lambda s: s.paused, "paused")
    assert status.pause_reason == "database migration window"
    assert "**Paused**: database migration window" in await current_details(handle)

    await complete_task(prefab, pipeline.env)  # the running stage may still finish
    deadline = time.monotonic() + 20
    while not any(e.event == "held" and e.stage == IMPLEMENT_BUILD
                  for e in await events_of(handle)):
        assert time.monotonic() < deadline, "pipeline never reached the pause gate"
        await asyncio.sleep(0.05)
    # The workflow is parked at the gate: nothing for stage 2 was dispatched.
    assert [t["task_type"] for _, t in tasks_for(pipeline.queue_dir, handle.id)] == [
        TASK_BUILD_PREFAB]
    status = await status_of(handle)
    assert status.paused
    assert status.stages_done == [PREFAB_SCAFFOLDING]
    assert status.waiting_on is None

    await handle.signal(RESUME_SIGNAL, "window closed")
    await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PLAN)
    status = await wait_for_status(handle, lambda s: s.stage == IMPLEMENT_BUILD, "stage 2")
    assert not status.paused
    assert status.pause_reason == ""
    assert "Paused" not in await current_details(handle)
    kinds = [(e.event, e.detail) for e in await events_of(handle)
             if e.event in ("paused", "held", "resumed")]
    assert kinds == [("paused", "database migration window"),
                     ("held", "paused: database migration window"),
                     ("resumed", "window closed")]
    await handle.terminate("test done")


@pytest.mark.parametrize("update", [APPROVE_BLOCKS_UPDATE, REJECT_BLOCKS_UPDATE])
async def test_decision_refused_when_not_waiting_on_blocks(pipeline: PipelineEnv,
                                                           update: str) -> None:
    handle, task_id = await start_pipeline(pipeline, f"early-{update.split('_')[0]}")
    await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PREFAB)
    with pytest.raises(WorkflowUpdateFailedError) as caught:
        await handle.execute_update(update, "looks fine")
    refusal = caught.value.cause
    assert isinstance(refusal, ApplicationError)
    assert (refusal.type, refusal.non_retryable) == (DecisionRefusedError.failure_type, True)
    assert "not waiting on blocks" in str(refusal)
    assert PREFAB_SCAFFOLDING in str(refusal)
    status = await status_of(handle)
    assert status.decision is None
    assert status.stage == PREFAB_SCAFFOLDING
    # A refused update leaves no trace in history and does not touch the task file.
    history = [e async for e in handle.fetch_history_events()]
    assert not any(e.HasField("workflow_execution_update_accepted_event_attributes")
                   for e in history)
    assert load_yaml(find_task(pipeline.queue_dir, task_id))["status"] == SUBMITTED
    await handle.terminate("test done")


@pytest.mark.slow
async def test_approve_update_resumes_and_records_who(pipeline: PipelineEnv) -> None:
    handle, task_id = await park_at_blocks(pipeline, "approved-build")
    sent = time.monotonic()
    answer = await handle.execute_update(
        APPROVE_BLOCKS_UPDATE,
        BlockDecision(note="risk accepted for the demo", decided_by="ops-ted"), result_type=str)
    assert answer == "approved"
    closeout = await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_CLOSEOUT)
    wall = time.monotonic() - sent
    events = await events_of(handle)
    decided = next(e for e in events if e.event == "approved_by_update")
    resumed = next(e for e in events if e.stage == CLOSE_BUILD and e.event == "started")
    assert (resumed.at - decided.at).total_seconds() < 1.0, (decided, resumed)
    assert wall < 10, f"close_build took {wall:.1f}s to be dispatched"
    origin = load_yaml(find_task(pipeline.queue_dir, task_id))
    entry = origin["history"][-1]
    assert (origin["status"], entry["status"], entry["actor"]) == ("approved", "approved",
                                                                   "ops-ted")
    assert "risk accepted for the demo" in entry["note"]
    assert "update" in entry["note"]
    with pytest.raises(WorkflowUpdateFailedError) as caught:  # decided already: refused
        await handle.execute_update(REJECT_BLOCKS_UPDATE, "too late")
    assert isinstance(caught.value.cause, ApplicationError)
    assert caught.value.cause.type == DecisionRefusedError.failure_type
    assert "decision: approved" in str(caught.value.cause)

    await complete_task(closeout, pipeline.env)
    result: BuildPipelineResult = await handle.result()
    assert result.outcome == "partial"
    assert result.decision == "approved"
    summary = load_yaml(Path(result.summary_path or ""))
    assert (summary["decided_by"], summary["decision_source"]) == ("ops-ted", "update")
    assert any(s.startswith("7/9 record_block_decision") for s in
               await activity_summaries(handle))


@pytest.mark.slow
async def test_reject_update_ends_pipeline_rejected(pipeline: PipelineEnv) -> None:
    handle, task_id = await park_at_blocks(pipeline, "rejected-build")
    with pytest.raises(WorkflowUpdateFailedError) as caught:  # a body that is no decision
        await handle.execute_update(REJECT_BLOCKS_UPDATE, {"note": "no", "decided_by": 7})
    refusal = caught.value.cause
    assert isinstance(refusal, ApplicationError)
    assert (refusal.type, refusal.non_retryable) == (InvalidInputError.failure_type, True)
    assert "invalid decision: decided_by" in str(refusal)
    sent = time.monotonic()
    assert await handle.execute_update(REJECT_BLOCKS_UPDATE, "token leak is a blocker",
                                       result_type=str) == "rejected"
    result: BuildPipelineResult = await handle.result()
    assert time.monotonic() - sent < 10
    assert result.outcome == "rejected"
    assert result.decision == "rejected"
    assert CLOSE_BUILD not in result.stages_completed
    events = await events_of(handle)
    decided = next(e for e in events if e.event == "rejected_by_update")
    summarized = next(e for e in events if e.stage == SUMMARIZE_WORKFLOW)
    assert (summarized.at - decided.at).total_seconds() < 1.0
    entry = load_yaml(find_task(pipeline.queue_dir, task_id))["history"][-1]
    assert (entry["status"], entry["actor"]) == ("rejected", "operator")
    assert "token leak is a blocker" in entry["note"]
    assert TASK_BUILD_CLOSEOUT not in [t["task_type"]
                                    for _, t in tasks_for(pipeline.queue_dir, handle.id)]


async def test_cancel_during_agent_stage_ends_cancelled_with_summary(
        pipeline: PipelineEnv) -> None:
    from temporalio.client import WorkflowFailureError
    from temporalio.exceptions import CancelledError

    handle, _ = await start_pipeline(pipeline, "cancelled-build")
    await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PREFAB)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    assert isinstance(caught.value.cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    summary = load_yaml(next(pipeline.summary_dir.rglob("*.yml")))
    assert summary["outcome"] == "cancelled"
    assert summary["failed_stage"] == PREFAB_SCAFFOLDING
    assert (await status_of(handle)).outcome == "cancelled"


@pytest.mark.slow
async def test_plan_status_per_phase(pipeline: PipelineEnv) -> None:
    plan = BuildPlanInput(plan_name="two-phases", phases=[
        PhaseSpec(number=1, agent_type="builder", description="scaffold"),
        PhaseSpec(number=2, agent_type="tester", description="write tests")])
    handle = await pipeline.start(BUILD_PLAN_WORKFLOW, plan, result_type=BuildPlanResult)
    first = await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PHASE)
    status: PlanStatus = await handle.query(STATUS_QUERY, result_type=PlanStatus)
    assert (status.plan_name, status.phases_total, status.phases_done) == ("two-phases", 2, [])
    assert (status.current_phase, status.current_agent) == (1, "builder")
    assert status.waiting_on is not None
    assert status.waiting_on.task_id == load_yaml(first)["id"]
    assert "phase 1 (1/2)" in await current_details(handle)
    await complete_task(first, pipeline.env)

    def second_phase() -> Any:
        return [p for p, t in tasks_for(pipeline.queue_dir, handle.id)
                if t["status"] == SUBMITTED and t["payload"]["phase"] == 2]

    second = (await poll(second_phase, what="phase 2 task"))[0]
    status = await handle.query(STATUS_QUERY, result_type=PlanStatus)
    assert (status.current_phase, status.current_agent, status.phases_done) == (2, "tester", [1])
    await complete_task(second, pipeline.env)
    assert (await handle.result()).phases_run == 2
    status = await handle.query(STATUS_QUERY, result_type=PlanStatus)
    assert status.outcome == "success"
    assert status.phases_done == [1, 2]
