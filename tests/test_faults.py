"""Faults against a real dev server with a persistent database and the real worker.py
process: SIGKILL at every kind of stage, a Temporal server restart mid-pipeline, and
50 pipelines through repeated kills at random moments. Nothing may be lost and no
stage's task file may be written twice."""

from __future__ import annotations

import asyncio
import base64
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

from complete_activity import mark_task_file
from config import load_config
from models import BuildPhaseResult, BuildPipelineInput, BuildPipelineResult, PipelineStatus
from task_files import add_history, find_task, new_task, update_task, write_task
from temporal_client import connect
from tests.agents import complete_task, load_yaml, task_files, wait_for_task
from tests.conftest import make_env
from tests.worker_process import WorkerProcess
from tools import devserver
from vocabulary import (
    AUDIT_REQUESTS_DIR,
    BUILD_PIPELINE_WORKFLOW,
    IMPLEMENT_BUILD,
    SUBMITTED,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
    TASK_SECURITY_FIX,
    WAIT_FOR_BLOCK_RESOLUTION,
)

MAX_KILLS = 8
BLOCKS = "blocks:\n- description: credentials in the image\n"


class DurableServer:
    """A dev server whose state lives in a SQLite file, so it can be stopped and
    started again on the same port without losing a workflow."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = devserver.free_port()
        self.db = root / "temporal.db"
        self.process = None
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
        origin = str(uuid.uuid4())
        write_task(self.queue, new_task(task_id=origin, target_agent="temporal-worker",
                                        task_type=TASK_BUILD_PLAN, summary="origin", payload={}))
        return await self.client.start_workflow(
            BUILD_PIPELINE_WORKFLOW,
            BuildPipelineInput(build_name=build, plan_path="/plans/p.md", task_id=origin,
                               target_agent="builder", **extra),
            id=f"fault-{build}-{uuid.uuid4().hex[:8]}", task_queue=self.env["TASK_QUEUE"],
            result_type=BuildPipelineResult)

    def triage(self, build: str, text: str) -> None:
        folder = self.audit / AUDIT_REQUESTS_DIR / build
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "triage-output.yml").write_text(text)

    async def play(self, handle: WorkflowHandle, task_type: str) -> Path:
        path = await wait_for_task(self.queue, handle.id, task_type, timeout=90)
        await complete_task(path, self.env)
        return path

    async def parked(self, handle: WorkflowHandle) -> None:
        async def check() -> bool:
            status = await handle.query("get_status", result_type=PipelineStatus)
            return status.stage == WAIT_FOR_BLOCK_RESOLUTION and status.waiting_on is not None

        deadline = time.monotonic() + 90
        while not await check():
            assert time.monotonic() < deadline, f"{handle.id} never parked"
            await asyncio.sleep(0.1)


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
    assert (await closing.describe()).status.name == "RUNNING"

    await asyncio.to_thread(worker.start().wait_ready)
    await lab.parked(triage)   # triage read and blocks notified by the new worker
    worker.kill()              # second kill while parked
    await asyncio.to_thread(worker.start().wait_ready)
    await triage.execute_update("approve_blocks", "approved after restart")
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
        assert result.summary_path and Path(result.summary_path).is_file()
    counts = files_per_stage(lab.queue)
    assert counts and max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
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
    assert worker.process is not None and worker.process.poll() is None
    durable.start()
    # The same worker process reconnects by itself; the agent finishes afterwards.
    await complete_task(implement, worker.env)
    lab.triage("server-restart", "info: []\n")
    await lab.play(handle, TASK_SECURITY_AUDIT)
    await lab.play(handle, TASK_BUILD_CLOSEOUT)
    result: BuildPipelineResult = await asyncio.wait_for(handle.result(), 120)
    assert result.outcome == "success"
    assert worker.process.poll() is None and worker.starts == 1
    assert max(files_per_stage(lab.queue).values()) == 1


class BulkAgents:
    """All agents at once: complete every submitted task file with its token (the same
    calls complete_activity.py makes) and write triage for audits. A token that is no
    longer valid (the stage was dispatched again) is retried when the file changes."""

    def __init__(self, client: Client, queue: Path, audit: Path) -> None:
        self.client, self.queue, self.audit = client, queue, audit
        self.done: set[tuple[str, str]] = set()  # (file name, token) handled
        self.completions = 0
        self.stale_tokens = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for path in task_files(self.queue):
                await self._handle(path)
            await asyncio.sleep(0.2)

    async def _handle(self, path: Path) -> None:
        try:
            task = load_yaml(path)
        except OSError:
            return
        payload = task.get("payload") or {}
        token = payload.get("task_token")
        if task.get("status") != SUBMITTED or not token or (path.name, token) in self.done:
            return
        self.done.add((path.name, token))
        if task["task_type"] == TASK_SECURITY_AUDIT:
            folder = self.audit / AUDIT_REQUESTS_DIR / payload["build_name"]
            folder.mkdir(parents=True, exist_ok=True)
            flags = "flags:\n- pin versions\n" if payload["build_name"].endswith("0") else ""
            (folder / "triage-output.yml").write_text(flags or "info: []\n")
        handle = self.client.get_async_activity_handle(task_token=base64.b64decode(token))
        try:
            await handle.complete(BuildPhaseResult(status="success", output="done"))
        except RPCError:
            self.stale_tokens += 1
            return
        self.completions += 1
        await asyncio.to_thread(mark_task_file, path, task, "success", "done",
                                task["target_agent"])


async def test_fifty_pipelines_survive_random_kills(durable_client: Client,
                                                    worker: WorkerProcess) -> None:
    lab = Pipelines(durable_client, worker)
    agents = BulkAgents(durable_client, lab.queue, lab.audit)
    stop = asyncio.Event()
    player = asyncio.create_task(agents.run(stop))
    handles = [await lab.start(f"bulk-{n:02d}") for n in range(50)]
    rng = random.Random()
    kills = 0
    begun = time.monotonic()
    pending = {asyncio.ensure_future(h.result()): h for h in handles}
    results: dict[str, BuildPipelineResult] = {}
    try:
        while pending:
            # The next kill lands at a random moment, whatever the pipelines are doing.
            done, _ = await asyncio.wait(pending, timeout=rng.uniform(0.3, 2.5))
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
          f"{50 - len(results)} lost, {agents.completions} agent completions, "
          f"{agents.stale_tokens} stale tokens, {elapsed:.1f}s")
    assert kills >= 5, f"only {kills} kills happened before all pipelines finished"
    assert len(results) == 50
    assert all(r.outcome == "success" for r in results.values())
    counts = files_per_stage(lab.queue)
    assert len(counts) >= 50 * 4 and max(counts.values()) == 1


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
