"""Faults against a real dev server with a persistent database and the real worker.py
process: SIGKILL at every kind of stage, a Temporal server restart mid-pipeline, and
50 pipelines through repeated kills at random moments. Nothing may be lost and no
stage's task file may be written twice."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from complete_activity import mark_task_file
from config import load_config
from models import BuildPipelineInput, BuildPipelineResult
from standins.agents import (
    StandIn,
    complete_task,
    complete_with_token,
    load_yaml,
    play_stage,
    task_files,
    wait_for_task,
    wait_until_parked,
    write_origin_task,
    write_triage,
)
from taskfiles.documents import add_history
from taskfiles.lookup import find_task, update_task
from temporal_client import connect
from tests.conftest import make_env
from tests.worker_process import WorkerProcess
from tools import devserver
from vocabulary import (
    APPROVE_BLOCKS_UPDATE,
    BUILD_PIPELINE_WORKFLOW,
    IMPLEMENT_BUILD,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
    TASK_SECURITY_FIX,
)

pytestmark = pytest.mark.slow

MAX_KILLS = 8
BLOCKS = "blocks:\n- description: credentials in the image\n"


# Below the kernel's ephemeral range (32768-60999 here): a port the server gives up while
# stopped is never handed to another process's bind(0) or outgoing connection meanwhile,
# so it can be bound again when the server comes back. Each test process searches its
# own stretch, from its pid, so two processes never race for one port. The dev server's
# HTTP port is the port + 1000, still below the range.
RESTARTABLE_PORTS = range(20000, 31000)
PORTS_PER_PROCESS = 20


def restartable_port() -> int:
    start = RESTARTABLE_PORTS.start + (os.getpid() * PORTS_PER_PROCESS) % len(RESTARTABLE_PORTS)
    for offset in range(len(RESTARTABLE_PORTS)):
        port = RESTARTABLE_PORTS.start + (start - RESTARTABLE_PORTS.start + offset) % len(
            RESTARTABLE_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


class DurableServer:
    """A dev server whose state lives in a SQLite file, so it can be stopped and
    started again on the same port without losing a workflow."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = restartable_port()
        self.db = root / "temporal.db"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = devserver.start(self.port, db_filename=self.db,
                                       log_path=self.root / "server.log")

    def stop(self) -> None:
        assert self.process is not None
        devserver.stop(self.process)


@pytest.fixture(scope="module")
def durable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DurableServer]:
    server = DurableServer(tmp_path_factory.mktemp("durable"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def durable_client(durable: DurableServer) -> Client:
    return await connect(load_config({"TEMPORAL_ADDRESS": durable.address}))


@pytest.fixture
def worker(durable: DurableServer, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(make_env(tmp_path, durable.address), tmp_path / "worker.log")
    process.start().wait_ready()
    try:
        yield process
    finally:
        process.stop()


class Pipelines:
    """Starts pipelines on the worker's queue and plays their agents."""

    def __init__(self, client: Client, worker: WorkerProcess) -> None:
        self.client, self.worker = client, worker
        self.env = worker.env
        self.queue = Path(self.env["TASK_QUEUE_DIR"])
        self.audit = Path(self.env["TEMPORAL_AUDIT_DIR"])

    async def start(self, build: str, **extra: Any) -> WorkflowHandle:
        origin = write_origin_task(self.queue, build)
        return await self.client.start_workflow(
            BUILD_PIPELINE_WORKFLOW,
            BuildPipelineInput(build_name=build, plan_path="/plans/p.md", task_id=origin,
                               target_agent="builder", **extra),
            id=f"fault-{build}-{uuid.uuid4().hex[:8]}", task_queue=self.env["TASK_QUEUE"],
            result_type=BuildPipelineResult)

    def triage(self, build: str, text: str) -> None:
        write_triage(self.audit, build, text)

    async def play(self, handle: WorkflowHandle, task_type: str) -> Path:
        return await play_stage(self.queue, handle.id, task_type, self.env, timeout=90)

    async def parked(self, handle: WorkflowHandle) -> None:
        await wait_until_parked(handle, 90)


def files_per_stage(queue: Path) -> Counter[tuple[str, str]]:
    """(workflow_id, task_type) -> number of task files: 1 means written once."""
    counts: Counter[tuple[str, str]] = Counter()
    for path in task_files(queue):
        task = load_yaml(path)
        workflow_id = task["payload"].get("workflow_id")
        if workflow_id:
            counts[(workflow_id, task["task_type"])] += 1
    return counts


async def test_sigkill_at_every_kind_of_stage(durable_client: Client,
                                              worker: WorkerProcess) -> None:
    lab = Pipelines(durable_client, worker)
    # Each pipeline is brought to a different kind of stage, then the worker is SIGKILLed.
    agent = await lab.start("kill-agent")                 # waiting on an agent
    triage = await lab.start("kill-triage")               # next: read triage, notify
    parked = await lab.start("kill-parked", block_poll_interval_seconds=0.2)
    closing = await lab.start("kill-summary")             # next: summarize
    dispatch = await lab.start("kill-dispatch")           # next: write an agent task
    # Agents work in parallel, as real ones do.
    await asyncio.gather(*(lab.play(h, TASK_BUILD_PREFAB)
                           for h in (agent, triage, parked, closing, dispatch)))
    implement = await wait_for_task(lab.queue, agent.id, TASK_BUILD_PLAN, timeout=90)
    dispatch_implement = await wait_for_task(lab.queue, dispatch.id, TASK_BUILD_PLAN, timeout=90)
    lab.triage("kill-triage", BLOCKS)
    lab.triage("kill-parked", BLOCKS)
    lab.triage("kill-summary", "info: []\n")
    await asyncio.gather(*(lab.play(h, TASK_BUILD_PLAN) for h in (triage, parked, closing)))
    audit = await wait_for_task(lab.queue, triage.id, TASK_SECURITY_AUDIT, timeout=90)
    await asyncio.gather(lab.play(parked, TASK_SECURITY_AUDIT),
                         lab.play(closing, TASK_SECURITY_AUDIT))
    await lab.parked(parked)
    closeout = await wait_for_task(lab.queue, closing.id, TASK_BUILD_CLOSEOUT, timeout=90)

    worker.kill()
    # While no worker runs, agents and operators carry on: the server keeps it all.
    await complete_task(implement, worker.env)
    await complete_task(dispatch_implement, worker.env)
    await complete_task(audit, worker.env)
    update_task(find_task(lab.queue, (await _input(parked)).task_id),
                lambda t: add_history(t, status="approved", actor="ted", note="ok"))
    await complete_task(closeout, worker.env, message="/docs/closeout.md")
    assert (await closing.describe()).status == WorkflowExecutionStatus.RUNNING

    await asyncio.to_thread(worker.start().wait_ready)
    await lab.parked(triage)   # triage read and blocks notified by the new worker
    worker.kill()              # second kill while parked
    await asyncio.to_thread(worker.start().wait_ready)
    await triage.execute_update(APPROVE_BLOCKS_UPDATE, "approved after restart")
    lab.triage("kill-agent", "info: []\n")
    lab.triage("kill-dispatch", "flags:\n- pin versions\n")
    await asyncio.gather(lab.play(agent, TASK_SECURITY_AUDIT),
                         lab.play(dispatch, TASK_SECURITY_AUDIT))
    await lab.play(dispatch, TASK_SECURITY_FIX)
    await asyncio.gather(*(lab.play(h, TASK_BUILD_CLOSEOUT)
                           for h in (agent, dispatch, triage, parked)))

    for handle in (agent, triage, parked, closing, dispatch):
        result: BuildPipelineResult = await asyncio.wait_for(handle.result(), 90)
        assert result.status == "complete", (handle.id, result)
        # Blocks were found and approved in two of them: their builds closed out "partial".
        blocked = handle in (triage, parked)
        assert result.outcome == ("partial" if blocked else "success"), result
        assert result.summary_path
        assert Path(result.summary_path).is_file()
    counts = files_per_stage(lab.queue)
    assert counts
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
    assert counts[(closing.id, TASK_BUILD_CLOSEOUT)] == 1
    assert worker.starts == 3


async def _input(handle: WorkflowHandle) -> BuildPipelineInput:
    history = await handle.fetch_history()
    import json

    raw = history.events[0].workflow_execution_started_event_attributes.input.payloads[0].data
    return BuildPipelineInput.model_validate(json.loads(raw))


async def test_temporal_server_restart_mid_pipeline(durable: DurableServer,
                                                   durable_client: Client,
                                                   worker: WorkerProcess) -> None:
    lab = Pipelines(durable_client, worker)
    handle = await lab.start("server-restart")
    await lab.play(handle, TASK_BUILD_PREFAB)
    implement = await wait_for_task(lab.queue, handle.id, TASK_BUILD_PLAN, timeout=90)

    durable.stop()
    assert worker.process is not None
    assert worker.process.poll() is None
    durable.start()
    # The same worker process reconnects by itself; the agent finishes afterwards.
    await complete_task(implement, worker.env)
    lab.triage("server-restart", "info: []\n")
    await lab.play(handle, TASK_SECURITY_AUDIT)
    await lab.play(handle, TASK_BUILD_CLOSEOUT)
    result: BuildPipelineResult = await asyncio.wait_for(handle.result(), 120)
    assert result.outcome == "success"
    assert worker.process.poll() is None
    assert worker.starts == 1
    assert max(files_per_stage(lab.queue).values()) == 1


def bulk_agents(client: Client, lab: Pipelines) -> StandIn:
    """All agents at once: complete every submitted task with its token (the same call
    complete_activity.py makes, then its task file update) and write triage for audits;
    every tenth build gets a flag. A token that is no longer valid (the stage was
    dispatched again) shows as a failure; the fresh token in the rewritten file is
    played again."""
    async def complete(path: Path, task: dict[str, Any], message: str) -> None:
        await complete_with_token(client, task, "success", message)
        await asyncio.to_thread(mark_task_file, path, "success", message,
                                task["target_agent"])

    return StandIn(queue_dir=lab.queue, audit_dir=lab.audit, env=lab.env,
                   work_dir=lab.audit / "closeouts", complete=complete,
                   triage=lambda build: ("flags:\n- pin versions\n" if build.endswith("0")
                                         else "info: []\n"),
                   concurrency=8, interval=0.2)


async def test_fifty_pipelines_survive_random_kills(durable_client: Client, worker: WorkerProcess,
                                                    rng: random.Random) -> None:
    lab = Pipelines(durable_client, worker)
    agents = bulk_agents(durable_client, lab)
    stop = asyncio.Event()
    player = asyncio.create_task(agents.serve(stop))
    handles = [await lab.start(f"bulk-{n:02d}") for n in range(50)]
    kills = 0
    begun = time.monotonic()
    pending = {asyncio.ensure_future(h.result()): h for h in handles}
    results: dict[str, BuildPipelineResult] = {}
    try:
        while pending:
            # The next kill lands at a random moment, whatever the pipelines are doing;
            # soon enough that the first lands mid-batch (unkilled, the 50 can finish in
            # about 2.3 s).
            done, _ = await asyncio.wait(pending, timeout=rng.uniform(0.2, 1.2))
            for future in done:
                results[pending.pop(future).id] = future.result()
            if pending and kills < MAX_KILLS:
                worker.kill()
                kills += 1
                await asyncio.to_thread(worker.start().wait_ready)
            assert time.monotonic() - begun < 240, (
                f"{len(pending)} of 50 pipelines still running after 240 s, "
                f"{kills} kills: {[h.id for h in pending.values()][:5]}")
    finally:
        stop.set()
        await player
        for future in pending:
            future.cancel()
    elapsed = time.monotonic() - begun
    print(f"\n50 pipelines, {kills} SIGKILLs, {len(results)} completed, "
          f"{50 - len(results)} lost, {len(agents.done)} agent completions, "
          f"{len(agents.failures)} stale tokens, {elapsed:.1f}s")
    assert kills >= 5, f"only {kills} kills happened before all pipelines finished"
    assert len(results) == 50
    assert all(r.outcome == "success" for r in results.values())
    counts = files_per_stage(lab.queue)
    assert len(counts) >= 50 * 4
    assert max(counts.values()) == 1


async def test_worker_killed_between_start_and_task_file_is_redispatched(
        durable_client: Client, worker: WorkerProcess) -> None:
    """The hardest moment: the server has handed implement_build to the worker, which
    dies before writing the task file. Without recovery no agent would ever see the
    task and the stage would wait out its 4 h timeout."""
    from temporalio.api.enums.v1 import PendingActivityState
    from temporalio.worker import Worker

    from activities.build_pipeline_activities import PipelineActivities
    from config import load_config
    from workflows.build_pipeline_workflow import BuildPipelineWorkflow
    from workflows.build_plan import BuildPlanWorkflow

    lab = Pipelines(durable_client, worker)
    handle = await lab.start("orphan-dispatch")
    prefab = await wait_for_task(lab.queue, handle.id, TASK_BUILD_PREFAB, timeout=90)
    # Freeze worker.py with its activity poll open; a workflow-only worker in this
    # process makes the decisions meanwhile, so the next activity goes to the frozen one.
    # (Local activities run inside the deciding worker: it carries those, no others.)
    deciders = Worker(durable_client, task_queue=worker.env["TASK_QUEUE"],
                      workflows=[BuildPipelineWorkflow, BuildPlanWorkflow],
                      activities=[PipelineActivities(load_config(worker.env)).prepare_pipeline],
                      no_remote_activities=True)
    async with deciders:
        worker.signal(signal.SIGSTOP)
        await complete_task(prefab, worker.env)

        async def handed_to_frozen_worker() -> bool:
            description = await handle.describe()
            return any(p.activity_type.name == IMPLEMENT_BUILD
                       and p.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                       and p.last_worker_identity.endswith(f":{worker.pid}")
                       for p in description.raw_description.pending_activities)

        deadline = time.monotonic() + 90
        while not await handed_to_frozen_worker():
            assert time.monotonic() < deadline, "implement_build never reached worker.py"
            await asyncio.sleep(0.1)
        worker.kill()
    assert (handle.id, TASK_BUILD_PLAN) not in files_per_stage(lab.queue)

    await asyncio.to_thread(worker.start().wait_ready)
    implement = await wait_for_task(lab.queue, handle.id, TASK_BUILD_PLAN, timeout=60)
    assert load_yaml(implement)["payload"]["attempt"] == 2
    recovered = [r for r in worker.log_records() if r.get("event") == "activity_recovered"]
    assert [r["activity"] for r in recovered] == [IMPLEMENT_BUILD]
    await complete_task(implement, worker.env)
    lab.triage("orphan-dispatch", "info: []\n")
    await lab.play(handle, TASK_SECURITY_AUDIT)
    await lab.play(handle, TASK_BUILD_CLOSEOUT)
    result: BuildPipelineResult = await asyncio.wait_for(handle.result(), 90)
    assert result.outcome == "success"
    assert max(files_per_stage(lab.queue).values()) == 1
