"""Block decisions written into the originating task reach the parked pipeline through
the folder watcher (block_watcher.py) within seconds: by inotify or by polling, after a
worker restart, and exactly once with two workers on one folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from config import load_config
from models import BuildPipelineResult, StageEvent
from task_files import add_history, update_task
from temporal_client import connect
from tests.conftest import PipelineEnv, serving
from tests.test_build_pipeline_workflow import block_pipeline
from tools.demo_agent import play_stage, poll, tasks_for
from vocabulary import TASK_BUILD_CLOSEOUT, WAIT_FOR_BLOCK_RESOLUTION

DECISION_LATENCY_LIMIT_SECONDS = 2.0


def decide(origin: Path, status: str, actor: str = "ted") -> float:
    update_task(origin, lambda t: add_history(t, status=status, actor=actor, note="by file"))
    return time.monotonic()


async def closeout_started(pipeline: PipelineEnv, workflow_id: str, since: float) -> float:
    def found() -> bool:
        return any(task.get("task_type") == TASK_BUILD_CLOSEOUT
                   for _, task in tasks_for(pipeline.queue_dir, workflow_id))

    await poll(found, timeout=10, interval=0.02, what="close-out task after the decision")
    return time.monotonic() - since


async def decision_events(handle: Any) -> list[StageEvent]:
    events = await handle.query("get_events", result_type=list[StageEvent])
    return [e for e in events if e.stage == WAIT_FOR_BLOCK_RESOLUTION
            and e.event.startswith(("approved_", "rejected_"))]


async def test_file_approval_acts_within_two_seconds(pipeline: PipelineEnv) -> None:
    handle, _, origin = await block_pipeline(pipeline, "fast-approve")
    latency = await closeout_started(pipeline, handle.id, decide(origin, "approved"))
    print(f"file approval -> close-out task: {latency * 1000:.0f} ms")
    assert latency <= DECISION_LATENCY_LIMIT_SECONDS
    await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_CLOSEOUT, pipeline.env)
    result: BuildPipelineResult = await handle.result()
    assert (result.outcome, result.decision) == ("partial", "approved")
    assert [e.event for e in await decision_events(handle)] == ["approved_by_task_file"]


async def test_file_rejection_acts_within_two_seconds(pipeline: PipelineEnv) -> None:
    handle, _, origin = await block_pipeline(pipeline, "fast-reject")
    since = decide(origin, "rejected")
    result: BuildPipelineResult = await handle.result()
    latency = time.monotonic() - since
    print(f"file rejection -> pipeline ended: {latency * 1000:.0f} ms")
    assert latency <= DECISION_LATENCY_LIMIT_SECONDS
    assert (result.outcome, result.decision) == ("rejected", "rejected")


async def test_polling_watcher_delivers_too(pipeline_env_vars: dict[str, str], client: Client,
                                            tmp_path: Path) -> None:
    config = load_config({**pipeline_env_vars, "TASK_WATCH_POLLING": "true"})
    pipeline = PipelineEnv(config=config, client=client, env=pipeline_env_vars, root=tmp_path)
    async with serving(client, config):
        handle, _, origin = await block_pipeline(pipeline, "polled-approve")
        latency = await closeout_started(pipeline, handle.id, decide(origin, "approved"))
        print(f"polling watcher: file approval -> close-out task: {latency * 1000:.0f} ms")
        assert latency <= DECISION_LATENCY_LIMIT_SECONDS
        await handle.cancel()


async def test_decision_made_while_no_worker_runs(pipeline_env_vars: dict[str, str],
                                                  client: Client, tmp_path: Path) -> None:
    config = load_config(pipeline_env_vars)
    pipeline = PipelineEnv(config=config, client=client, env=pipeline_env_vars, root=tmp_path)
    async with serving(client, config):
        handle, _, origin = await block_pipeline(pipeline, "offline-decision")
    since = decide(origin, "approved")  # no worker, no watcher
    async with serving(client, config):
        await closeout_started(pipeline, handle.id, since)
        await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_CLOSEOUT, pipeline.env)
        result = await handle.result()
        assert result.decision == "approved"
        assert [e.event for e in await decision_events(handle)] == ["approved_by_task_file"]


async def test_file_decisions_can_be_turned_off(pipeline_env_vars: dict[str, str],
                                                client: Client, tmp_path: Path) -> None:
    config = load_config({**pipeline_env_vars, "BLOCK_FILE_DECISIONS": "false"})
    pipeline = PipelineEnv(config=config, client=client, env=pipeline_env_vars, root=tmp_path)
    async with serving(client, config):
        handle, _, origin = await block_pipeline(pipeline, "no-file-decisions")
        decide(origin, "approved", actor="alice (security lead)")
        # The file says approved, but nobody acts on it: an operator's Update decides.
        await handle.execute_update("reject_blocks", {"decided_by": "bob", "note": "no"})
        result = await handle.result()
        assert (result.outcome, result.decision) == ("rejected", "rejected")
        assert [e.event for e in await decision_events(handle)] == ["rejected_by_update"]


@pytest.mark.parametrize("pipelines", [5])
async def test_two_workers_one_folder_decide_once(pipeline_env_vars: dict[str, str],
                                                  client: Client, tmp_path: Path,
                                                  pipelines: int) -> None:
    config = load_config(pipeline_env_vars)
    pipeline = PipelineEnv(config=config, client=client, env=pipeline_env_vars, root=tmp_path)
    # A second connection stands for the second worker process (one client may not
    # register two workers on one queue).
    other = await connect(config)
    async with serving(client, config), serving(other, config):
        parked = [await block_pipeline(pipeline, f"twice-{n}") for n in range(pipelines)]
        for _, _, origin in parked:
            decide(origin, "approved")
        for handle, _, _ in parked:
            await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_CLOSEOUT, pipeline.env)
            result = await handle.result()
            assert result.decision == "approved"
            assert [e.event for e in await decision_events(handle)] == \
                ["approved_by_task_file"], handle.id
