"""Pickup and work limits, and where a build's time went: the folder watch tells a run
when an agent claims its task (both dialects), a claimed task silent past its work limit
fails its stage, and the summary, the status and the Prometheus histograms carry each
stage's written -> picked up -> done. A real dev server and real workers (the reminders
themselves, on a real Synapse: tests/test_notify.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from config import load_config
from decisions.closed_tasks import closed_task, may_claim
from models import BuildPipelineInput, BuildPipelineResult, PipelineStatus
from observability import setup_telemetry
from standins.agents import (
    complete_with_token,
    load_yaml,
    poll,
    poll_async,
    wait_for_task,
    write_origin_task,
    write_triage,
)
from taskfiles.documents import add_history
from taskfiles.lookup import update_task
from temporal_client import connect
from tests.conftest import make_env, serving
from tests.test_observability import samples, value
from tests.test_platform_dialect import Board, board, status_of  # noqa: F401 (fixture)
from tools.devserver import free_port
from vocabulary import (
    BUILD_PIPELINE_WORKFLOW,
    CANCELLED,
    CLOSE_BUILD,
    IMPLEMENT_BUILD,
    IN_PROGRESS,
    PREFAB_SCAFFOLDING,
    REQUEST_SECURITY_AUDIT,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
)

CLAIM_AFTER = 1.0
CLOSE_AFTER = 2.0


# ---- the claim, as the folder watch reads it ----------------------------------------------

def our_task(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": "6bfe375e-ba0c-4c6c-bdf6-da49ab79ce0f", "source_agent": "temporal-worker",
            "status": status,
            "payload": {"workflow_id": "w", "run_id": "r", "activity_id": "1"},
            "history": [{"timestamp": "2026-12-07T09:00:00Z", "status": status,
                         "actor": "builder\u202e", "note": "on it"}], **extra}


def test_a_claim_of_ours_is_read_and_anyone_elses_is_not() -> None:
    assert may_claim(b"id: x\nsource_agent: temporal-worker\nstatus: in-progress\n")
    assert not may_claim(b"id: x\nsource_agent: planner\nstatus: in-progress\n")
    assert not may_claim(b"id: x\nsource_agent: temporal-worker\nstatus: submitted\n")
    # An in-progress entry in the history of a closed task is no claim (not top level).
    assert not may_claim(b"id: x\nsource_agent: temporal-worker\nstatus: completed\n"
                         b"history:\n- status: in-progress\n")
    claim = closed_task(our_task(IN_PROGRESS), dead_lettered=False)
    assert claim is not None
    assert (claim.status, claim.workflow_id, claim.activity_id) == (IN_PROGRESS, "w", "1")
    assert claim.reason == "builder"  # who the history says claimed it, visible text only
    assert closed_task(our_task(IN_PROGRESS, source_agent="planner"),
                       dead_lettered=False) is None


# ---- a claimed task that goes silent -------------------------------------------------------

@pytest.mark.slow
async def test_a_claimed_task_silent_past_its_work_limit_fails_its_stage(
        board: Board, client: Client) -> None:  # noqa: F811 (the fixture)
    """Platform dialect: routed, claimed with update_task, then nothing: the stage fails
    at the work limit, counted from the claim, with a reason that says so."""
    handle = await client.start_workflow(
        BUILD_PIPELINE_WORKFLOW,
        BuildPipelineInput(build_name="silent", plan_path="/srv/plans/web.md",
                           task_id=board.origin(), target_agent="builder",
                           work_timeout_seconds=2),
        id=f"silent-{uuid.uuid4()}", task_queue=board.env["TASK_QUEUE"],
        result_type=BuildPipelineResult)

    def claim() -> dict[str, Any] | None:
        board.dispatcher.tick()
        for task in board.tools.list_tasks(status="approved", limit=200):
            if task["payload"].get("workflow_id") == handle.id:
                done = board.tools.update_task(task["id"], "in-progress",
                                               task["target_agent"], note="on it")
                assert done["ok"], done
                return task
        return None

    task = await poll(claim, timeout=30, interval=0.2, what="our prefab task, routed")

    async def claimed() -> PipelineStatus | None:
        status = await status_of(handle)
        return status if status.waiting_on and status.waiting_on.claimed_at else None

    seen = await poll_async(claimed, timeout=20, what="the claim in the status")
    claimed_at = time.monotonic()
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert time.monotonic() - claimed_at >= 1.5  # from the claim, not from the write
    status = await status_of(handle)
    assert status.failed_stage == PREFAB_SCAFFOLDING
    assert status.error == (
        f"claudebox claimed task {task['id']} at "
        f"{seen.waiting_on.claimed_at:%Y-%m-%d %H:%M:%S}Z and has not reported within the "
        f"work limit of 2s: the agent went silent")
    assert status.error in str(failure.value.cause)
    assert status.time is not None
    [prefab] = status.time.stages
    assert (prefab.outcome, prefab.agent) == ("work_limit_passed", "claudebox")
    assert prefab.picked_up_at == seen.waiting_on.claimed_at
    # The task the agent holds is closed for it, saying why.
    left = board.task(task["id"])
    assert left["status"] == CANCELLED
    assert left["history"][-1]["note"] == f"{PREFAB_SCAFFOLDING}: work limit passed"


# ---- where the time went ---------------------------------------------------------------------

async def slow_agent(client: Client, queue_dir: Path, audit_dir: Path, handle: WorkflowHandle,
                     task_type: str) -> None:
    """An agent that takes CLAIM_AFTER seconds to pick its task up (v0.5.0 dialect: it
    sets the file's status) and CLOSE_AFTER more to report."""
    path = await wait_for_task(queue_dir, handle.id, task_type)
    await asyncio.sleep(CLAIM_AFTER)  # the agent's own pace: what the figures measure
    update_task(path, lambda t: add_history(t, status=IN_PROGRESS, actor="slow-agent",
                                            note="on it"))
    await asyncio.sleep(CLOSE_AFTER)
    if task_type == TASK_SECURITY_AUDIT:
        write_triage(audit_dir, "timed", "info:\n- fine\n")
    await complete_with_token(client, load_yaml(path))


@pytest.mark.slow
async def test_summary_status_and_histograms_say_where_the_time_went(
        tmp_path: Path, temporal_address: str) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    config = load_config(make_env(tmp_path, temporal_address, PROMETHEUS_BIND_ADDRESS=metrics))
    telemetry = setup_telemetry(config)
    client = await connect(config, runtime=telemetry.runtime)
    async with serving(client, config):
        handle = await client.start_workflow(
            BUILD_PIPELINE_WORKFLOW,
            BuildPipelineInput(build_name="timed", plan_path="/plans/t.md",
                               task_id=write_origin_task(config.task_queue_dir, "timed"),
                               target_agent="builder"),
            id=f"timed-{uuid.uuid4()}", task_queue=config.task_queue,
            result_type=BuildPipelineResult)
        for task_type in (TASK_BUILD_PREFAB, TASK_BUILD_PLAN, TASK_SECURITY_AUDIT):
            await slow_agent(client, config.task_queue_dir, config.audit_dir, handle,
                             task_type)
        # While it runs, the status has the figures of the stages done so far.
        running = await status_of(handle)
        assert running.time is not None
        assert [t.stage for t in running.time.stages if t.outcome == "completed"] == \
            [PREFAB_SCAFFOLDING, IMPLEMENT_BUILD, REQUEST_SECURITY_AUDIT]
        await slow_agent(client, config.task_queue_dir, config.audit_dir, handle,
                         TASK_BUILD_CLOSEOUT)
        result = await handle.result()

    assert result.outcome == "success"
    report = load_yaml(Path(str(result.summary_path)))["time"]
    stages = [PREFAB_SCAFFOLDING, IMPLEMENT_BUILD, REQUEST_SECURITY_AUDIT, CLOSE_BUILD]
    assert [row["stage"] for row in report["stages"]] == stages
    for row in report["stages"]:
        print(f"{row['stage']}: pickup {row['pickup_seconds']}s, work {row['work_seconds']}s")
        assert row["outcome"] == "completed"
        assert row["attempt"] == 1
        assert CLAIM_AFTER <= row["pickup_seconds"] <= CLAIM_AFTER + 1.5, row
        assert CLOSE_AFTER - 0.5 <= row["work_seconds"] <= CLOSE_AFTER + 1.5, row
    agents = {row["stage"]: row["agent"] for row in report["stages"]}
    assert agents == {PREFAB_SCAFFOLDING: "claudebox", IMPLEMENT_BUILD: "builder",
                      REQUEST_SECURITY_AUDIT: "security-agent", CLOSE_BUILD: "builder"}
    totals = report["totals"]
    assert totals["agent_tasks"] == 4
    assert totals["pickup_seconds"] == pytest.approx(
        sum(row["pickup_seconds"] for row in report["stages"]), abs=0.01)
    assert totals["build_seconds"] >= 4 * (CLAIM_AFTER + CLOSE_AFTER)
    assert report["decision_waits"] == []

    def scraped() -> list[tuple[str, dict[str, str], float]] | None:
        found = samples(httpx.get(f"http://{metrics}/metrics", timeout=5).text)
        return found if value(found, "build_stage_work_seconds_count") >= 4 else None

    found = await poll(scraped, timeout=30, interval=0.5, what="the histograms on /metrics")
    queue = {"task_queue": config.task_queue}
    for row in report["stages"]:
        stage = {"stage": row["stage"], **queue}
        assert value(found, "build_stage_pickup_wait_seconds_count", **stage) == 1
        assert value(found, "build_stage_work_seconds_count", **stage) == 1
        assert value(found, "build_stage_pickup_wait_seconds_sum", **stage) == \
            pytest.approx(row["pickup_seconds"], abs=0.01)
        assert value(found, "build_stage_work_seconds_sum", **stage) == \
            pytest.approx(row["work_seconds"], abs=0.01)
    # Three seconds of work fall in the 5 s bucket, not the 1 s one.
    assert value(found, "build_stage_work_seconds_bucket", le="5", **queue) == 4
    assert value(found, "build_stage_work_seconds_bucket", le="1", **queue) == 0
