"""BuildPlanWorkflow on a real dev server; the agents finish phases through the real CLI."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle

from exceptions import InvalidInputError, PhaseFailedError
from models import BuildPlanResult, PlanStatus
from standins.agents import complete_task, poll, tasks_for, wait_for_status, wait_for_task
from tests.agents import application_failure, assert_valid_task_file
from tests.conftest import PipelineEnv
from vocabulary import (
    BUILD_PHASE,
    BUILD_PLAN_WORKFLOW,
    STATUS_QUERY,
    TASK_BUILD_PHASE,
)

PHASES: list[dict[str, Any]] = [
    {"number": 1, "agent_type": "builder", "description": "Write the parser",
     "context_refs": ["/plans/demo.md#phase-1", "/docs/format.md"]},
    {"number": 2, "agent_type": "reviewer", "description": "Review the parser\nand its tests"},
]


RESULT_TIMEOUT = 60.0


async def outcome(handle: WorkflowHandle) -> Any:
    """The workflow's result, bounded: a broken workflow fails the test instead of hanging."""
    return await asyncio.wait_for(handle.result(), RESULT_TIMEOUT)


async def status_of(handle: WorkflowHandle) -> PlanStatus:
    return await handle.query(STATUS_QUERY, result_type=PlanStatus)


async def activity_order(handle: WorkflowHandle) -> list[str]:
    """Scheduled/completed activity events in history order."""
    order = []
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            order.append("scheduled")
        elif event.HasField("activity_task_completed_event_attributes"):
            order.append("completed")
    return order


@pytest.mark.slow
async def test_two_phases_run_in_order(pipeline: PipelineEnv) -> None:
    handle = await pipeline.start(BUILD_PLAN_WORKFLOW, {"plan_name": "parser-plan",
                                                        "phases": PHASES},
                                  result_type=BuildPlanResult)
    first = await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PHASE)
    waiting = await wait_for_status(handle, lambda s: s.waiting_on is not None, "phase 1 wait",
                                    result_type=PlanStatus)
    assert waiting.plan_name == "parser-plan"
    assert waiting.phases_total == 2
    assert waiting.phases_done == []
    assert waiting.current_phase == 1
    assert waiting.current_agent == "builder"
    assert waiting.waiting_on.agent == "builder"
    assert waiting.waiting_on.task_id == assert_valid_task_file(first)["id"]
    assert waiting.outcome is None
    # While phase 1 is open only its task exists and only one activity was scheduled.
    assert [p for p, _ in tasks_for(pipeline.queue_dir, handle.id)] == [first]
    assert await activity_order(handle) == ["scheduled"]

    await complete_task(first, pipeline.env, message="parser written")
    second = await poll(lambda: next((p for p, t in tasks_for(pipeline.queue_dir, handle.id)
                                      if t["payload"]["phase"] == 2), None),
                        what="phase 2 task file")
    waiting = await wait_for_status(handle, lambda s: s.current_phase == 2, "phase 2 wait",
                                    result_type=PlanStatus)
    assert waiting.phases_done == [1]
    assert waiting.current_agent == "reviewer"
    assert await activity_order(handle) == ["scheduled", "completed", "scheduled"]

    await complete_task(second, pipeline.env, message="looks good")
    result = await outcome(handle)

    assert result == BuildPlanResult(status="success", phases_run=2)
    final = await status_of(handle)
    assert final.outcome == "success"
    assert final.phases_done == [1, 2]
    assert final.current_phase is None
    assert final.waiting_on is None
    tasks = [assert_valid_task_file(path) for path in (first, second)]
    for task, phase in zip(tasks, PHASES, strict=True):
        assert task["task_type"] == TASK_BUILD_PHASE
        assert task["target_agent"] == phase["agent_type"]
        assert task["status"] == "completed"
        payload = task["payload"]
        assert payload["phase"] == phase["number"]
        assert payload["plan_name"] == "parser-plan"
        assert payload["context_refs"] == phase.get("context_refs", [])
        assert payload["workflow_id"] == handle.id
        assert payload["activity_type"] == BUILD_PHASE
        assert phase["description"] in payload["instruction"]
        for ref in phase.get("context_refs", []):
            assert ref in payload["instruction"]
    assert tasks[0]["result"]["output"] == "parser written"
    assert tasks[1]["created"] >= tasks[0]["result"]["completed_at"]


@pytest.mark.slow
async def test_failed_phase_fails_the_plan(pipeline: PipelineEnv) -> None:
    handle = await pipeline.start(BUILD_PLAN_WORKFLOW, {"plan_name": "failing-plan",
                                                        "phases": PHASES},
                                  result_type=BuildPlanResult)
    first = await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PHASE)
    await complete_task(first, pipeline.env)
    second = await poll(lambda: next((p for p, t in tasks_for(pipeline.queue_dir, handle.id)
                                      if t["payload"]["phase"] == 2), None),
                        what="phase 2 task file")
    await complete_task(second, pipeline.env, status="failed", message="tests do not pass")

    cause = await application_failure(outcome(handle), PhaseFailedError)
    assert "phase 2 (reviewer)" in cause.message
    assert "tests do not pass" in cause.message
    assert "1 of 2 phases done" in cause.message
    status = await status_of(handle)
    assert status.outcome == "failed"
    assert status.phases_done == [1]
    assert status.error
    assert "tests do not pass" in status.error
    assert assert_valid_task_file(second)["status"] == "failed"


@pytest.mark.parametrize(("plan", "field"), [
    ({"plan_name": "Bad Name", "phases": PHASES}, "plan_name"),
    ({"plan_name": "../escape", "phases": PHASES}, "plan_name"),
    ({"plan_name": "empty-plan", "phases": []}, "phases"),
    ({"plan_name": "dup-plan", "phases": [PHASES[0], {**PHASES[1], "number": 1}]}, "phases"),
    ({"plan_name": "agent-plan", "phases": [{**PHASES[0], "agent_type": "Evil\nAgent"}]},
     "agent_type"),
    ({"plan_name": "no-phases"}, "phases"),
])
async def test_invalid_input_writes_nothing(pipeline: PipelineEnv, plan: dict[str, Any],
                                            field: str) -> None:
    handle = await pipeline.start(BUILD_PLAN_WORKFLOW, plan)
    cause = await application_failure(outcome(handle), InvalidInputError)
    assert field in cause.message
    assert cause.non_retryable
    assert await activity_order(handle) == []
    assert not pipeline.queue_dir.exists() or not any(pipeline.queue_dir.rglob("*"))


async def test_cancelled_plan_ends_cancelled_not_failed(pipeline: PipelineEnv) -> None:
    from temporalio.exceptions import CancelledError

    handle = await pipeline.start(BUILD_PLAN_WORKFLOW,
                                  {"plan_name": "cancel-plan", "phases": PHASES})
    await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PHASE)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as caught:
        await outcome(handle)
    assert isinstance(caught.value.cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert (await status_of(handle)).outcome == "cancelled"
