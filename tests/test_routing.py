"""One pipeline, agents on several hosts (docs/deployment.md): a workflow worker
on the main queue and two agent-host workers (WORKER_ROLE=agent-host), each a real
worker.py process with its own task, audit and summary folders. AGENT_TASK_QUEUES puts
the builder and the prefab agent on host A and the security agent on host B.

The originating task is filed on the main worker's host (its TASK_QUEUE_DIR): stage 6
marks it there, and the block is decided there."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from config import load_config
from models import BuildPipelineInput, BuildPipelineResult, PipelineStatus
from standins.agents import (
    complete_task,
    load_yaml,
    play_stage,
    poll,
    readable_tasks,
    wait_for_status,
    wait_for_task,
    write_origin_task,
    write_triage,
)
from standins.task_tools import TaskTools
from tests.conftest import make_env, serving
from tests.test_operator_controls import current_details
from tests.worker_process import REPO, WorkerProcess
from vocabulary import (
    APPLY_FLAG_FIXES,
    AUDIT_REQUESTS_DIR,
    BUILD_PIPELINE_WORKFLOW,
    CLOSE_BUILD,
    DIALECT_PLATFORM,
    IMPLEMENT_BUILD,
    PREFAB_SCAFFOLDING,
    PROCESS_TRIAGE_OUTPUT,
    REQUEST_SECURITY_AUDIT,
    ROLE_AGENT_HOST,
    STATUS_QUERY,
    SUBMITTED,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
)

BUILDER, PREFAB, SECURITY = "builder", "prefab-bot", "sec-bot"
FLAG_AND_BLOCK = "flags:\n- pin versions\nblocks:\n- description: credentials in the image\n"
WAIT = 90.0


@dataclass
class Host:
    name: str
    env: dict[str, str]
    worker: WorkerProcess

    @property
    def queue_dir(self) -> Path:
        return Path(self.env["TASK_QUEUE_DIR"])

    @property
    def audit_dir(self) -> Path:
        return Path(self.env["TEMPORAL_AUDIT_DIR"])

    @property
    def task_queue(self) -> str:
        return self.env["TASK_QUEUE"]

    def stages(self, workflow_id: str) -> Counter[str]:
        """Stage -> number of task files of that workflow in this host's folder."""
        return Counter(str(payload.get("stage") or payload.get("activity_type"))
                       for _, _, payload in readable_tasks(self.queue_dir)
                       if payload.get("workflow_id") == workflow_id)

    def dispatched(self) -> list[str]:
        return [r["task_file"] for r in self.worker.log_records()
                if r.get("event") == "task_dispatched"]


def routed_hosts(root: Path, address: str, **extra: str) -> dict[str, Host]:
    """The main worker and hosts A and B, not started: separate folders, one queue each."""
    main_queue = f"test-{uuid.uuid4().hex[:12]}"
    queues = {"a": f"{main_queue}.host-a", "b": f"{main_queue}.host-b"}
    routes = f"{BUILDER}={queues['a']},{PREFAB}={queues['a']},{SECURITY}={queues['b']}"
    envs = {"main": make_env(root / "main", address, TASK_QUEUE=main_queue,
                             AGENT_TASK_QUEUES=routes, PREFAB_AGENT=PREFAB,
                             SECURITY_AGENT=SECURITY, **extra)}
    for name, queue in queues.items():
        envs[name] = make_env(root / f"host-{name}", address, TASK_QUEUE=queue,
                              WORKER_ROLE=ROLE_AGENT_HOST, WORKFLOW_TASK_QUEUE=main_queue,
                              **extra)
    return {name: Host(name, env, WorkerProcess(env, root / f"worker-{name}.log"))
            for name, env in envs.items()}


@pytest.fixture
def hosts_factory(tmp_path: Path, temporal_address: str) -> Iterator[Any]:
    started: list[Host] = []

    def start(**extra: str) -> dict[str, Host]:
        hosts = routed_hosts(tmp_path, temporal_address, **extra)
        for host in hosts.values():
            host.worker.start()
            started.append(host)
        for host in hosts.values():
            host.worker.wait_ready()
        return hosts

    try:
        yield start
    finally:
        for host in started:
            host.worker.stop()


async def start_pipeline(client: Client, main: Host, build: str) -> WorkflowHandle:
    origin = write_origin_task(main.queue_dir, build)
    return await client.start_workflow(
        BUILD_PIPELINE_WORKFLOW,
        BuildPipelineInput(build_name=build, plan_path="/plans/p.md", task_id=origin,
                           target_agent=BUILDER),
        id=f"routed-{build}-{uuid.uuid4().hex[:8]}", task_queue=main.task_queue,
        result_type=BuildPipelineResult)


def close_like_an_agent(host: Host, workflow_id: str, triage: str) -> list[str]:
    """Every submitted task of the run in the host's folder, taken and closed with the
    platform's task tools (approve, in-progress, completed), as the platform's agents
    do; an audit leaves its triage first. The stages closed."""
    tools, closed = TaskTools(host.queue_dir), []
    for _, task, payload in readable_tasks(host.queue_dir):
        if payload.get("workflow_id") != workflow_id or task.get("status") != SUBMITTED:
            continue
        stage, agent = str(payload["stage"]), str(task["target_agent"])
        if stage == REQUEST_SECURITY_AUDIT:
            write_triage(host.audit_dir, str(payload["build_name"]), triage)
        for status in ("approved", "in-progress", "completed"):
            answer = (tools.approve(task["id"]) if status == "approved"
                      else tools.update_task(task["id"], status, agent, output=f"{stage} done"))
            assert answer.get("ok"), answer
        closed.append(stage)
    return closed


async def test_each_stage_runs_on_its_agents_host(client: Client, hosts_factory: Any) -> None:
    hosts = hosts_factory(TASK_FILE_DIALECT=DIALECT_PLATFORM)
    main, host_a, host_b = hosts["main"], hosts["a"], hosts["b"]
    handle = await start_pipeline(client, main, "routed")
    result_task = asyncio.ensure_future(handle.result())
    origin: str | None = None
    deadline = time.monotonic() + WAIT
    approved, status = False, None
    while not result_task.done():
        assert time.monotonic() < deadline, f"pipeline unfinished: {status}"
        for host in (host_a, host_b):
            await asyncio.to_thread(close_like_an_agent, host, handle.id, FLAG_AND_BLOCK)
        status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
        if not approved and status.waiting_on and status.waiting_on.kind == "block_decision":
            origin = str(status.waiting_on.task_id)
            # The operator approves in the originating task, on the main worker's host.
            assert TaskTools(main.queue_dir).approve(origin).get("ok")
            approved = True
        await asyncio.wait([result_task], timeout=0.2)
    result: BuildPipelineResult = result_task.result()
    assert (result.status, result.outcome, result.decision) == ("complete", "partial", "approved")

    # Each stage's task file only where its agent lives, written once.
    assert host_a.stages(handle.id) == Counter({PREFAB_SCAFFOLDING: 1, IMPLEMENT_BUILD: 1,
                                                APPLY_FLAG_FIXES: 1, CLOSE_BUILD: 1})
    assert host_b.stages(handle.id) == Counter({REQUEST_SECURITY_AUDIT: 1})
    assert main.stages(handle.id) == Counter()
    assert (len(host_a.dispatched()), len(host_b.dispatched()), len(main.dispatched())) == (4, 1, 0)
    # The audit request, and the triage stage 4 read, only on host B.
    request = Path(AUDIT_REQUESTS_DIR) / "routed" / "request.md"
    assert (host_b.audit_dir / request).is_file()
    assert not (host_a.audit_dir / request).exists()
    assert not (main.audit_dir / request).exists()
    history = await handle.fetch_history()
    scheduled = {e.activity_task_scheduled_event_attributes.activity_type.name:
                 e.activity_task_scheduled_event_attributes.task_queue.name
                 for e in history.events if e.HasField("activity_task_scheduled_event_attributes")}
    assert scheduled[PROCESS_TRIAGE_OUTPUT] == host_b.task_queue
    assert scheduled[IMPLEMENT_BUILD] == host_a.task_queue
    # Decided in the originating task, on the main host; recorded in the summary.
    final = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
    assert final.decision_source == "task_file"
    assert final.task_queues == {PREFAB_SCAFFOLDING: host_a.task_queue,
                                 IMPLEMENT_BUILD: host_a.task_queue,
                                 REQUEST_SECURITY_AUDIT: host_b.task_queue,
                                 APPLY_FLAG_FIXES: host_a.task_queue,
                                 CLOSE_BUILD: host_a.task_queue}
    summary = load_yaml(Path(str(result.summary_path)))
    assert summary["task_queues"] == final.task_queues
    assert Path(str(result.summary_path)).is_relative_to(Path(main.env["SUMMARY_DIR"]))
    assert origin is not None

    # A pipeline cancelled while host A's agent holds its task: closed on host A.
    cancelled = await start_pipeline(client, main, "routed-cancel")
    await poll(lambda: host_a.stages(cancelled.id)[PREFAB_SCAFFOLDING], WAIT, what="prefab")
    await cancelled.cancel()
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(cancelled.result(), WAIT)
    [(_, prefab, _)] = [t for t in readable_tasks(host_a.queue_dir)
                        if t[2].get("workflow_id") == cancelled.id]
    assert prefab["status"] == "cancelled"
    [summary_path] = Path(main.env["SUMMARY_DIR"]).rglob(f"{cancelled.id}.yml")
    [closed] = load_yaml(summary_path)["tasks_closed"]
    assert (closed["task_id"], closed["task_queue"]) == (prefab["id"], host_a.task_queue)


async def handed_to(handle: WorkflowHandle, stage: str, pid: int) -> bool:
    description = await handle.describe()
    return any(p.activity_type.name == stage
               and p.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
               and p.last_worker_identity.endswith(f":{pid}")
               for p in description.raw_description.pending_activities)


def stalled_report(env: dict[str, str], workflow_id: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "tools" / "ops"), "find-stalled-workflows", "--query",
                           f"WorkflowId = '{workflow_id}'"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=REPO)


@pytest.mark.slow
async def test_a_host_away_or_killed_loses_nothing(client: Client, hosts_factory: Any) -> None:
    hosts = hosts_factory()
    main, host_a, host_b = hosts["main"], hosts["a"], hosts["b"]
    handle = await start_pipeline(client, main, "away")
    prefab = await wait_for_task(host_a.queue_dir, handle.id, TASK_BUILD_PREFAB, WAIT)

    # Host A's worker dies after the server handed it implement_build, before the task
    # file: frozen with its poll open, so the stage goes to it, then SIGKILLed.
    host_a.worker.signal(signal.SIGSTOP)
    await complete_task(prefab, host_a.env)
    deadline = time.monotonic() + WAIT
    while not await handed_to(handle, IMPLEMENT_BUILD, host_a.worker.pid):
        assert time.monotonic() < deadline, "implement_build never reached host A's worker"
        await asyncio.sleep(0.1)
    host_a.worker.kill()
    assert host_a.stages(handle.id)[IMPLEMENT_BUILD] == 0
    await asyncio.to_thread(host_a.worker.start().wait_ready)
    # Host A's own recovery (the main worker's is not asked) dispatches it again.
    implement = await wait_for_task(host_a.queue_dir, handle.id, TASK_BUILD_PLAN, WAIT)
    assert load_yaml(implement)["payload"]["attempt"] == 2
    assert [r["activity"] for r in host_a.worker.log_records()
            if r.get("event") == "activity_recovered"] == [IMPLEMENT_BUILD]
    await complete_task(implement, host_a.env)

    # Host B's worker away while its agent finishes the audit: stage 4 (reading the
    # triage on host B) waits for it, and says for which host.
    audit = await wait_for_task(host_b.queue_dir, handle.id, TASK_SECURITY_AUDIT, WAIT)
    host_b.worker.stop()
    write_triage(host_b.audit_dir, "away", "info: []\n")
    await complete_task(audit, host_b.env)
    status = await wait_for_status(
        handle, lambda s: s.stage == PROCESS_TRIAGE_OUTPUT and s.waiting_on is not None,
        "stage 4 waiting for host B", WAIT)
    assert status.waiting_on is not None
    assert (status.waiting_on.kind, status.waiting_on.task_queue) == ("activity",
                                                                       host_b.task_queue)
    details = await current_details(handle)
    assert (f"for a worker on task queue `{host_b.task_queue}` to run "
            f"`{PROCESS_TRIAGE_OUTPUT}`") in details, details
    assert f"`{REQUEST_SECURITY_AUDIT}` on `{host_b.task_queue}`" in details, details
    report = await asyncio.to_thread(stalled_report, {**main.env, **ops_dirs(main)}, handle.id)
    assert report.returncode == 1, report.stdout + report.stderr
    assert (f"{PROCESS_TRIAGE_OUTPUT} waits for a worker on task queue {host_b.task_queue}"
            in report.stdout), report.stdout

    await asyncio.to_thread(host_b.worker.start().wait_ready)
    await play_stage(host_a.queue_dir, handle.id, TASK_BUILD_CLOSEOUT, host_a.env, timeout=WAIT)
    result: BuildPipelineResult = await asyncio.wait_for(handle.result(), WAIT)
    assert (result.status, result.outcome) == ("complete", "success")
    # No task file written twice: one per stage, each written by one dispatch.
    assert host_a.stages(handle.id) == Counter({PREFAB_SCAFFOLDING: 1, IMPLEMENT_BUILD: 1,
                                                CLOSE_BUILD: 1})
    assert host_b.stages(handle.id) == Counter({REQUEST_SECURITY_AUDIT: 1})
    for host in (host_a, host_b):
        assert [p for p, n in Counter(host.dispatched()).items() if n > 1] == []


def ops_dirs(host: Host) -> dict[str, str]:
    root = Path(host.env["TASK_QUEUE_DIR"]).parent
    return {"CLAUDE_TEMPORAL_PID_DIR": str(root / "pids"),
            "CLAUDE_TEMPORAL_LOG_DIR": str(root / "logs"),
            "CLAUDE_TEMPORAL_PROJECT_NAME": "routing", "PATH": os.environ["PATH"]}


async def test_a_changed_map_moves_only_stages_not_yet_started(
        client: Client, tmp_path: Path, temporal_address: str) -> None:
    """The map is read at each agent stage's start: the security agent moved to another
    host (the workflow worker restarted with the new map) while stage 2 runs, stage 3
    and the triage read go to the new host; stages already under way stay put. In-process
    workers (workflows in the SDK's sandbox)."""
    hosts = routed_hosts(tmp_path, temporal_address)
    main, host_a, host_b = hosts["main"], hosts["a"], hosts["b"]
    moved = make_env(tmp_path / "host-c", temporal_address, WORKER_ROLE=ROLE_AGENT_HOST,
                     TASK_QUEUE=f"{main.task_queue}.host-c",
                     WORKFLOW_TASK_QUEUE=main.task_queue)
    new_map = main.env["AGENT_TASK_QUEUES"].replace(host_b.task_queue, moved["TASK_QUEUE"])
    agent_hosts = [load_config(env) for env in (host_a.env, host_b.env, moved)]
    async with contextlib.AsyncExitStack() as stack:
        for config in agent_hosts:
            await stack.enter_async_context(serving(client, config))
        async with serving(client, load_config(main.env)):
            handle = await start_pipeline(client, main, "moved")
            await play_stage(host_a.queue_dir, handle.id, TASK_BUILD_PREFAB, host_a.env,
                             timeout=WAIT)
            implement = await wait_for_task(host_a.queue_dir, handle.id, TASK_BUILD_PLAN,
                                            WAIT)
        async with serving(client, load_config({**main.env, "AGENT_TASK_QUEUES": new_map})):
            await complete_task(implement, host_a.env)
            write_triage(Path(moved["TEMPORAL_AUDIT_DIR"]), "moved", "info: []\n")
            await play_stage(Path(moved["TASK_QUEUE_DIR"]), handle.id, TASK_SECURITY_AUDIT,
                             moved, timeout=WAIT)
            await play_stage(host_a.queue_dir, handle.id, TASK_BUILD_CLOSEOUT, host_a.env,
                             timeout=WAIT)
            result: BuildPipelineResult = await asyncio.wait_for(handle.result(), WAIT)
            status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
    assert result.outcome == "success"
    assert status.task_queues[IMPLEMENT_BUILD] == host_a.task_queue
    assert status.task_queues[REQUEST_SECURITY_AUDIT] == moved["TASK_QUEUE"]
    assert host_b.stages(handle.id) == Counter()
    history = await handle.fetch_history()
    [triage_queue] = [e.activity_task_scheduled_event_attributes.task_queue.name
                      for e in history.events
                      if e.HasField("activity_task_scheduled_event_attributes")
                      and e.activity_task_scheduled_event_attributes.activity_type.name
                      == PROCESS_TRIAGE_OUTPUT]
    assert triage_queue == moved["TASK_QUEUE"]
