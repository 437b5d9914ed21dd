"""Block decisions written into the originating task reach the parked pipeline through
the folder watcher (block_watcher.py) within seconds: by inotify or by polling, after a
worker restart, and exactly once with two workers on one folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from config import load_config
from decisions import deliver_decision
from models import BlockDecision, BuildPipelineResult, PipelineStatus, StageEvent
from task_files import AWAITING_DECISION, add_history, find_task, update_task
from temporal_client import connect
from tests.conftest import PipelineEnv, serving
from tests.standin import load_yaml, play_stage, poll, poll_async, tasks_for
from tests.test_build_pipeline_workflow import BLOCK, block_pipeline, run_to_triage
from vocabulary import TASK_BUILD_CLOSEOUT, WAIT_FOR_BLOCK_RESOLUTION
from workflows.build_pipeline_workflow import BuildPipelineWorkflow

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


# --- a decision while stage 6 is still running -------------------------------------------

HELD_SCRIPT = """#!/bin/sh
# Holds the block notice until the test releases it (bounded, so a failed test ends).
for _ in $(seq 250); do [ -e "{release}" ] && exit 0; sleep 0.1; done
exit 1
"""


def held_notifier(client: Client, tmp_path: Path, pipeline_env_vars: dict[str, str],
                  **extra: str) -> tuple[PipelineEnv, Path]:
    """A pipeline environment whose block notice waits until `release` exists."""
    release = tmp_path / "release"
    script = tmp_path / "held-notice"
    script.write_text(HELD_SCRIPT.format(release=release))
    script.chmod(0o700)
    env = {**pipeline_env_vars, "SEND_MATRIX_SCRIPT": str(script), "MATRIX_ROOM": "ops",
           **extra}
    config = load_config(env)
    return PipelineEnv(config=config, client=client, env=env, root=tmp_path), release


async def at_stage(handle: Any, stage: str) -> None:
    async def there() -> bool:
        status = await handle.query("get_status", result_type=PipelineStatus)
        return status.stage == stage

    await poll_async(there, what=f"pipeline at {stage}")


async def test_decision_while_blocks_are_notified_is_taken(
        pipeline_env_vars: dict[str, str], client: Client, tmp_path: Path) -> None:
    pipeline, release = held_notifier(client, tmp_path, pipeline_env_vars)
    async with serving(client, pipeline.config):
        handle, _ = await run_to_triage(pipeline, "early-decision",
                                        f"blocks:\n- description: {BLOCK}\n")
        await at_stage(handle, "notify_blocks")
        delivery = await deliver_decision(
            client, workflow_id=handle.id, run_id=handle.result_run_id, decision="approved",
            choice=BlockDecision(decided_by="ted", note="known risk"))
        release.touch()
        await play_stage(pipeline.queue_dir, handle.id, "build_closeout", pipeline.env)
        result: BuildPipelineResult = await handle.result()
        events = await decision_events(handle)
        history = await handle.fetch_history()

    # This shape (the Update accepted during stage 6) replays against today's code.
    await Replayer(workflows=[BuildPipelineWorkflow],
                   data_converter=pydantic_data_converter).replay_workflow(history)
    assert delivery == "applied"
    assert (result.outcome, result.decision) == ("partial", "approved")
    [event] = events
    assert (event.event, event.detail) == ("approved_by_update", "ted: known risk")


async def test_retried_notice_keeps_a_decision_already_in_the_file(
        pipeline_env_vars: dict[str, str], client: Client, tmp_path: Path) -> None:
    # The watcher is off, so only notify_blocks itself touches the decision in the file:
    # as when an earlier attempt marked the file, someone approved, and its worker died.
    pipeline, release = held_notifier(client, tmp_path, pipeline_env_vars,
                                      BLOCK_FILE_DECISIONS="false")
    async with serving(client, pipeline.config):
        handle, inp = await run_to_triage(pipeline, "kept-decision",
                                          f"blocks:\n- description: {BLOCK}\n")
        await at_stage(handle, "notify_blocks")
        origin = find_task(pipeline.queue_dir, inp.task_id)

        def approved_after_earlier_mark(task: dict[str, Any]) -> None:
            task[AWAITING_DECISION] = {"workflow_id": handle.id,
                                       "run_id": handle.result_run_id, "since": "earlier"}
            add_history(task, status="approved", actor="ted", note="risk accepted")

        update_task(origin, approved_after_earlier_mark)
        release.touch()
        await at_stage(handle, "wait_for_block_resolution")
        task = load_yaml(origin)
        await handle.terminate("test done")

    assert task["status"] == "approved"
    assert task["history"][-1]["status"] == "approved"
    assert task[AWAITING_DECISION]["since"] == "earlier"
