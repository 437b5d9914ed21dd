"""Block decisions written into the originating task reach the parked pipeline through
the folder watcher (file_watcher.py) within seconds: by inotify or by polling, after a
worker restart, and exactly once with two workers on one folder."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer

from config import load_config
from decisions import delivery, file_watcher
from decisions.delivery import deliver_decision
from decisions.file_watcher import BlockDecisionWatcher, pending_decision
from exceptions import DecisionRefusedError
from models import (
    MAX_DECISION_NOTE_CHARS,
    BlockDecision,
    BuildPipelineResult,
    PipelineStatus,
    StageEvent,
)
from standins.agents import load_yaml, play_stage, poll, poll_async, tasks_for
from taskfiles.documents import AWAITING_DECISION, add_history
from taskfiles.lookup import find_task, update_task
from temporal_client import connect
from tests.conftest import PipelineEnv, serving
from tests.test_build_pipeline_workflow import BLOCK, block_pipeline, run_to_triage
from vocabulary import (
    APPROVE_BLOCKS_UPDATE,
    EVENTS_QUERY,
    REJECT_BLOCKS_UPDATE,
    STATUS_QUERY,
    TASK_BUILD_CLOSEOUT,
    WAIT_FOR_BLOCK_RESOLUTION,
)
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
    events = await handle.query(EVENTS_QUERY, result_type=list[StageEvent])
    return [e for e in events if e.stage == WAIT_FOR_BLOCK_RESOLUTION
            and e.event.startswith(("approved_", "rejected_"))]


@pytest.mark.slow
async def test_file_approval_acts_within_two_seconds(pipeline: PipelineEnv) -> None:
    handle, _, origin = await block_pipeline(pipeline, "fast-approve")
    latency = await closeout_started(pipeline, handle.id, decide(origin, "approved"))
    print(f"file approval -> close-out task: {latency * 1000:.0f} ms")
    assert latency <= DECISION_LATENCY_LIMIT_SECONDS
    await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_CLOSEOUT, pipeline.env)
    result: BuildPipelineResult = await handle.result()
    assert (result.outcome, result.decision) == ("partial", "approved")
    assert [e.event for e in await decision_events(handle)] == ["approved_by_task_file"]


@pytest.mark.slow
async def test_file_rejection_acts_within_two_seconds(pipeline: PipelineEnv) -> None:
    handle, _, origin = await block_pipeline(pipeline, "fast-reject")
    since = decide(origin, "rejected")
    result: BuildPipelineResult = await handle.result()
    latency = time.monotonic() - since
    print(f"file rejection -> pipeline ended: {latency * 1000:.0f} ms")
    assert latency <= DECISION_LATENCY_LIMIT_SECONDS
    assert (result.outcome, result.decision) == ("rejected", "rejected")


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
async def test_file_decisions_can_be_turned_off(pipeline_env_vars: dict[str, str],
                                                client: Client, tmp_path: Path) -> None:
    config = load_config({**pipeline_env_vars, "BLOCK_FILE_DECISIONS": "false"})
    pipeline = PipelineEnv(config=config, client=client, env=pipeline_env_vars, root=tmp_path)
    async with serving(client, config):
        handle, _, origin = await block_pipeline(pipeline, "no-file-decisions")
        decide(origin, "approved", actor="alice (security lead)")
        # The file says approved, but nobody acts on it: an operator's Update decides.
        await handle.execute_update(REJECT_BLOCKS_UPDATE, {"decided_by": "bob", "note": "no"})
        result = await handle.result()
        assert (result.outcome, result.decision) == ("rejected", "rejected")
        assert [e.event for e in await decision_events(handle)] == ["rejected_by_update"]


@pytest.mark.slow
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
        # The pipelines run side by side, as they would on two workers: each waits only on
        # its own agents.
        parked = await asyncio.gather(*(block_pipeline(pipeline, f"twice-{n}")
                                        for n in range(pipelines)))
        for _, _, origin in parked:
            decide(origin, "approved")

        async def closed_out(handle: Any) -> None:
            # Five side by side through CLI processes: a deadline for a loaded machine.
            await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_CLOSEOUT, pipeline.env,
                             timeout=60)
            result = await handle.result()
            assert result.decision == "approved"
            assert [e.event for e in await decision_events(handle)] == \
                ["approved_by_task_file"], handle.id

        await asyncio.gather(*(closed_out(handle) for handle, _, _ in parked))


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
        status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
        return status.stage == stage

    await poll_async(there, what=f"pipeline at {stage}")


@pytest.mark.slow
async def test_decision_while_blocks_are_notified_is_taken(
        pipeline_env_vars: dict[str, str], client: Client, tmp_path: Path) -> None:
    pipeline, release = held_notifier(client, tmp_path, pipeline_env_vars)
    async with serving(client, pipeline.config):
        handle, _ = await run_to_triage(pipeline, "early-decision",
                                        f"blocks:\n- description: {BLOCK}\n")
        await at_stage(handle, "notify_blocks")
        delivery = await deliver_decision(
            client, workflow_id=handle.id, run_id=handle.result_run_id, decision="approved",
            choice=BlockDecision(decided_by="ted", note="known risk"),
            task_queue=pipeline.config.task_queue)
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


@pytest.mark.slow
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


def watcher_said(caplog: pytest.LogCaptureFixture, event: str, needle: str) -> bool:
    return any(record.getMessage() == event and needle in str(record.__dict__)
               for record in caplog.records)


def planted(folder: Path, name: str, task_id: str, waiter: dict[str, Any]) -> Path:
    """A file that says `approved` and names the waiting run, as stage 6 writes it."""
    path = folder / name
    path.write_text(yaml.safe_dump({
        "id": task_id, "status": "approved", AWAITING_DECISION: waiter,
        "history": [{"status": "approved", "actor": "security-lead (alice)",
                     "note": "reviewed with the CISO"}]}))
    return path


@pytest.mark.slow
async def test_only_the_originating_task_decides(pipeline: PipelineEnv,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A file with another id naming the waiting run is refused by the pipeline; a second
    file with the task's own id makes the watcher refuse both (it cannot tell which is
    the task); the operator's Update still decides."""
    caplog.set_level(logging.INFO)
    handle, inp, origin = await block_pipeline(pipeline, "planted-decision")
    waiter = load_yaml(origin)[AWAITING_DECISION]
    other = planted(pipeline.queue_dir, "20200101-000000-0unrelat.yml",
                    "0unrelat-ed00-4000-8000-000000000000", waiter)
    await poll(lambda: watcher_said(caplog, "decision_refused", "not this pipeline's "
                                    "originating task"), timeout=10, what="other id refused")
    shadow = planted(pipeline.queue_dir, f"20200101-000000-{inp.task_id[:8]}.yml",
                     inp.task_id, waiter)
    await poll(lambda: watcher_said(caplog, "decision_not_delivered", "2 files carry this id"),
               timeout=10, what="shadow copy refused")
    decide(origin, "approved")  # with a shadow beside it, not even the real file decides
    await poll(lambda: any(record.getMessage() == "decision_not_delivered"
                           and getattr(record, "task_file", None) == str(origin)
                           for record in caplog.records),
               timeout=10, what="real file refused too")

    assert (await handle.query(STATUS_QUERY, result_type=PipelineStatus)).decision is None
    await handle.execute_update(REJECT_BLOCKS_UPDATE, {"decided_by": "bob", "note": "no"})
    result: BuildPipelineResult = await handle.result()
    assert (result.outcome, result.decision) == ("rejected", "rejected")
    assert [e.event for e in await decision_events(handle)] == ["rejected_by_update"]
    assert load_yaml(other)["status"] == load_yaml(shadow)["status"] == "approved"


async def test_pipeline_refuses_a_file_decision_from_another_task(
        pipeline: PipelineEnv) -> None:
    handle, _, _ = await block_pipeline(pipeline, "wrong-file")
    with pytest.raises(WorkflowUpdateFailedError) as caught:
        await handle.execute_update(APPROVE_BLOCKS_UPDATE, BlockDecision(
            decided_by="task file", source="task_file", task_id="some-other-task"))
    refusal = caught.value.cause
    assert isinstance(refusal, ApplicationError)
    assert (refusal.type, refusal.non_retryable) == (DecisionRefusedError.failure_type, True)
    assert "'some-other-task', not this pipeline's originating task" in str(refusal)
    assert (await handle.query(STATUS_QUERY, result_type=PipelineStatus)).decision is None
    await handle.cancel()


@pytest.mark.slow
async def test_a_run_nobody_serves_holds_up_no_other_decision(
        pipeline: PipelineEnv, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file naming a pipeline on a queue no worker polls: the watcher sends it nothing
    (it is not on this worker's queue), and a real decision lands at once. Sent anyway,
    its Update goes unanswered and is given up at the limit."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(delivery, "DECISION_DELIVERY_TIMEOUT", timedelta(seconds=3))
    nobody_queue = f"nobody-{uuid.uuid4()}"
    nobody = await pipeline.client.start_workflow(
        BuildPipelineWorkflow.run, {"build_name": "nobody"}, id=f"nobody-{uuid.uuid4()}",
        task_queue=nobody_queue)
    try:
        handle, _, origin = await block_pipeline(pipeline, "unstalled")
        task_id = f"{uuid.uuid4()}"
        planted(pipeline.queue_dir, f"20200101-000000-{task_id[:8]}.yml", task_id,
                {"workflow_id": nobody.id})
        await poll(lambda: watcher_said(caplog, "decision_not_delivered",
                                        f"on task queue {pipeline.config.task_queue!r}"),
                   timeout=10, what="the other queue's run refused")
        latency = await closeout_started(pipeline, handle.id, decide(origin, "approved"))
        print(f"file approval beside a planted one -> close-out: {latency * 1000:.0f} ms")
        assert latency <= DECISION_LATENCY_LIMIT_SECONDS
        await handle.cancel()

        sent = time.monotonic()
        assert await deliver_decision(
            pipeline.client, workflow_id=nobody.id, run_id=None, decision="approved",
            choice=BlockDecision(), task_queue=nobody_queue) == "unanswered"
        assert 3 <= time.monotonic() - sent < 10
        assert watcher_said(caplog, "decision_not_delivered", "no answer within 3s")
    finally:
        await nobody.terminate("test done")


def test_a_file_decision_carries_its_task_id_and_only_visible_text() -> None:
    task = {"id": "task-1", "status": "approved", AWAITING_DECISION: {"workflow_id": "w"},
            "history": [{"status": "approved", "actor": "ops-bot\x1b[31m\u202eecnatpecca ksir",
                         "note": "risk\x1b[2K\rfine\u200b"}]}
    found = pending_decision(task)
    assert found is not None
    workflow_id, run_id, decision, choice = found
    assert (workflow_id, run_id, decision) == ("w", None, "approved")
    assert (choice.claimed_by, choice.note, choice.task_id) == (
        "ops-bot [31mecnatpecca ksir", "risk [2K fine", "task-1")
    assert pending_decision({**task, "id": None}) is None  # no id: not an originating task


def test_a_rejecting_status_with_the_longest_note_still_decides() -> None:
    note = "n" * 2000  # as long as a task file's history note may be
    task = {"id": "task-1", "status": "cancelled", AWAITING_DECISION: {"workflow_id": "w"},
            "history": [{"status": "cancelled", "actor": "ann", "note": note}]}
    found = pending_decision(task)
    assert found is not None
    _, _, decision, choice = found
    assert decision == "rejected"
    assert choice.note.startswith("task status cancelled: nnn")
    assert len(choice.note) == MAX_DECISION_NOTE_CHARS


async def test_a_file_that_cannot_be_a_decision_never_stops_the_watcher(
        client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    config = load_config({"HOME": str(tmp_path), "TASK_QUEUE_DIR": str(tmp_path / "queue")})
    config.task_queue_dir.mkdir()
    path = config.task_queue_dir / "odd.yml"
    path.write_text(yaml.safe_dump({"id": "x" * 300, "status": "approved",
                                    AWAITING_DECISION: {"workflow_id": "w"}}))
    watcher = BlockDecisionWatcher(client=client, config=config)
    await watcher.consider(path)  # returns; nothing raised, nothing sent
    assert watcher_said(caplog, "task_file_skipped", "task_id")
    assert watcher.delivered == 0


@pytest.mark.slow
async def test_a_later_opposite_decision_is_reported_refused(
        pipeline: PipelineEnv, caplog: pytest.LogCaptureFixture) -> None:
    """One Update id per run: Temporal answers a second delivery with the first decision,
    without asking the pipeline; that is not a delivery of the second."""
    caplog.set_level(logging.INFO)
    handle, _, _ = await block_pipeline(pipeline, "decided-once")
    first = await deliver_decision(pipeline.client, workflow_id=handle.id, run_id=None,
                                   decision="approved", choice=BlockDecision(decided_by="ann"),
                                   task_queue=pipeline.config.task_queue)
    second = await deliver_decision(pipeline.client, workflow_id=handle.id, run_id=None,
                                    decision="rejected", choice=BlockDecision(decided_by="bob"),
                                    task_queue=pipeline.config.task_queue)
    assert (first, second) == ("applied", "refused")
    assert watcher_said(caplog, "decision_refused", "the run was decided already: approved")
    assert (await handle.query(STATUS_QUERY, result_type=PipelineStatus)).decision == "approved"
    await handle.cancel()


async def test_a_deferred_or_rewritten_decision_is_looked_at_again(
        client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one delivery allowed in flight, a second run's decision waits, and a file
    rewritten while its run's delivery is on its way is looked at again once it ends.
    The deliveries are a fake that holds the first until released: the order of events
    is what is checked, and a real server cannot hold an answer on demand."""

    config = load_config({"HOME": str(tmp_path), "TASK_QUEUE_DIR": str(tmp_path / "queue")})
    config.task_queue_dir.mkdir()
    release = asyncio.Event()
    sent: list[tuple[str, str]] = []

    async def fake_deliver(_client: Any, *, workflow_id: str, decision: str,
                           **_: Any) -> str:
        sent.append((workflow_id, decision))
        if len(sent) == 1:
            await release.wait()
            return "refused"  # not waiting yet: a later write must be looked at
        return "applied"

    monkeypatch.setattr(file_watcher, "deliver_decision", fake_deliver)
    monkeypatch.setattr(file_watcher, "MAX_DELIVERIES_IN_FLIGHT", 1)
    watcher = BlockDecisionWatcher(client=client, config=config)
    first = planted(config.task_queue_dir, "20200101-000000-aaaaaaaa.yml",
                    "aaaaaaaa-1", {"workflow_id": "run-a"})
    second = planted(config.task_queue_dir, "20200101-000000-bbbbbbbb.yml",
                     "bbbbbbbb-1", {"workflow_id": "run-b"})
    await watcher.consider(first)
    await poll(lambda: len(sent) == 1, timeout=5, what="first delivery under way")
    await watcher.consider(second)  # deferred: the one slot is taken
    await watcher.consider(first)  # rewritten while its delivery is on its way
    assert sent == [("run-a", "approved")]
    release.set()
    await poll(lambda: len(sent) >= 3, timeout=5, what="both files sent after the first")
    assert sorted(sent[1:]) == [("run-a", "approved"), ("run-b", "approved")], sent
    await poll(lambda: watcher.delivered == 2, timeout=5, what="both counted")
