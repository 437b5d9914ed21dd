"""Task files in the platform dialect, used the platform's way: the dispatcher stand-in
routes our tasks, agents claim and close them through the task tools stand-in only (no
CLI, no token), operators approve or cancel with the tools' own moves. A real dev server
and a real worker.py process."""

from __future__ import annotations

import asyncio
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from models import BuildPipelineInput, BuildPipelineResult, PipelineStatus
from standins.agents import poll, poll_async, run_cli
from standins.platform_play import CLOSEOUT_DOCUMENT, PlatformAgents
from standins.task_tools import Dispatcher, TaskTools, validate_task
from taskfiles.documents import read_task
from tests.agents import assert_schema_valid
from tests.conftest import make_env
from tests.worker_process import WorkerProcess
from vocabulary import (
    APPLY_FLAG_FIXES,
    BUILD_PIPELINE_WORKFLOW,
    CLOSE_BUILD,
    DIALECT_PLATFORM,
    IMPLEMENT_BUILD,
    PENDING_APPROVAL,
    PREFAB_SCAFFOLDING,
    REQUEST_SECURITY_AUDIT,
    STATUS_QUERY,
)

pytestmark = pytest.mark.slow

FLAG_AND_BLOCK = ("blocks:\n- description: admin port open to the world\n"
                  "flags:\n- description: pin the base image\ninfo: []\n")


@dataclass
class Board:
    """The shared task folder, the platform's tools on it, and our worker beside them."""

    env: dict[str, str]
    queue_dir: Path
    tools: TaskTools
    dispatcher: Dispatcher
    worker: WorkerProcess

    def origin(self, summary: str = "build web") -> str:
        """An originating task as a planning agent files it (submit_task), routed once."""
        submitted = self.tools.submit_task("planner", "temporal-worker", "build", summary,
                                           "Build the web portal", context_refs=["/srv/p.md"])
        assert submitted["ok"], submitted
        self.dispatcher.tick()
        return str(submitted["task_id"])

    def task(self, task_id: str) -> dict[str, Any]:
        found = self.tools.get_task(task_id)
        assert found["ok"], found
        return found["task"]


@pytest.fixture
def board(tmp_path: Path, temporal_address: str, request: pytest.FixtureRequest
          ) -> Iterator[Board]:
    """Settings of the `worker_env` marker, if any, go to the worker; `plant_root_link`
    puts a link to / in the folder before the worker starts."""
    marker = request.node.get_closest_marker("worker_env")
    env = make_env(tmp_path, temporal_address, TASK_FILE_DIALECT=DIALECT_PLATFORM,
                   **(marker.kwargs if marker else {}))
    queue_dir = Path(env["TASK_QUEUE_DIR"])
    queue_dir.mkdir(mode=0o700)
    if request.node.get_closest_marker("plant_root_link"):
        (queue_dir / "everything").symlink_to("/")
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        yield Board(env=env, queue_dir=queue_dir, tools=TaskTools(queue_dir, umask=0o022),
                    dispatcher=Dispatcher(queue_dir, start_script=tmp_path / "no-script",
                                          log_dir=tmp_path / "logs"),
                    worker=worker)
    finally:
        worker.stop()


async def start(client: Client, board: Board, origin: str, build: str = "web"
                ) -> WorkflowHandle[Any, BuildPipelineResult]:
    return await client.start_workflow(
        BUILD_PIPELINE_WORKFLOW,
        BuildPipelineInput(build_name=build, plan_path="/srv/plans/web.md", task_id=origin,
                           target_agent="builder"),
        id=f"platform-{uuid.uuid4()}", task_queue=board.env["TASK_QUEUE"],
        result_type=BuildPipelineResult)


async def at_prefab(board: Board, client: Client
                    ) -> tuple[str, WorkflowHandle[Any, BuildPipelineResult], dict[str, Any]]:
    """A pipeline started for a fresh originating task, once its prefab task is written:
    (originating task id, handle, the prefab task as the tools list it)."""
    origin = board.origin()
    handle = await start(client, board, origin)
    prefab = await poll(lambda: _task_of(board, handle.id, PREFAB_SCAFFOLDING), 20,
                        what="the prefab task")
    return origin, handle, prefab


async def status_of(handle: WorkflowHandle[Any, Any]) -> PipelineStatus:
    return await handle.query(STATUS_QUERY, result_type=PipelineStatus)


async def _waiting(handle: WorkflowHandle[Any, Any]) -> PipelineStatus | None:
    status = await status_of(handle)
    return status if status.waiting_on is not None else None


def our_files(queue_dir: Path) -> list[tuple[Path, str, dict[str, Any]]]:
    found = []
    for path in sorted(queue_dir.rglob("*.yml")):
        text = path.read_text()
        found.append((path, text, yaml.safe_load(text)))
    return found


async def test_tools_route_claim_close_and_approve_a_pipeline(board: Board,
                                                             client: Client) -> None:
    origin = board.origin()
    assert board.task(origin)["status"] == "approved"  # routed: operator pickup
    handle = await start(client, board, origin)
    agents = PlatformAgents(board.tools, board.dispatcher, handle.id, triage=FLAG_AND_BLOCK)
    # Until the pipeline parks: every agent stage routed, claimed and closed by the tools.
    await agents.run(lambda: board.task(origin)["status"] == PENDING_APPROVAL)
    assert agents.closed == [PREFAB_SCAFFOLDING, IMPLEMENT_BUILD, REQUEST_SECURITY_AUDIT,
                             APPLY_FLAG_FIXES]
    # The task parks in stage 6; the run shows its wait once it enters stage 7.
    parked = await poll_async(lambda: _waiting(handle), timeout=20, what="stage 7's wait")
    assert parked.waiting_on.kind == "block_decision"
    # The operators' standard Approve (pending-approval -> approved) resumes it.
    approved = board.tools.approve(origin, note="accepted for now")
    assert approved["ok"], approved
    decided_at = time.monotonic()
    await poll_async(lambda: _decided(handle), timeout=10, what="the decision taken")
    assert time.monotonic() - decided_at < 2.0
    await agents.run(lambda: CLOSE_BUILD in agents.closed)
    result = await handle.result()
    assert (result.status, result.outcome) == ("complete", "partial")
    assert result.closeout_path == CLOSEOUT_DOCUMENT  # the close's output, as given

    closed = board.task(origin)
    assert closed["status"] == "completed"
    assert closed["result"]["output"] == f"pipeline partial; summary {result.summary_path}"
    assert closed["history"][-1]["note"].startswith("build pipeline partial")
    # Every file in the folder passes the tools' checks, and none carries a token.
    files = our_files(board.queue_dir)
    assert len(files) == 6  # five agent tasks and the originating task
    for path, text, record in files:
        assert validate_task(record, path.name) == [], path.name
        assert "task_token" not in text, path.name
        if record["source_agent"] == "temporal-worker":
            assert_schema_valid(record)
    modes = {stat.S_IMODE(path.stat().st_mode) for path, _, _ in files}
    assert modes <= {0o600, 0o644}  # ours 0600; the tools' rewrites take their umask


async def _decided(handle: WorkflowHandle[Any, Any]) -> bool:
    return (await status_of(handle)).decision == "approved"


async def test_cancel_rejects_and_the_originating_task_stays_cancelled(
        board: Board, client: Client) -> None:
    origin = board.origin()
    handle = await start(client, board, origin)
    agents = PlatformAgents(board.tools, board.dispatcher, handle.id, triage=FLAG_AND_BLOCK)
    await agents.run(lambda: board.task(origin)["status"] == PENDING_APPROVAL)
    cancelled = board.tools.cancel(origin, note="not shipping this")
    assert cancelled["ok"], cancelled
    result = await handle.result()
    assert (result.outcome, result.decision) == ("rejected", "rejected")
    left = board.task(origin)
    assert left["status"] == "cancelled"
    assert left["result"]["completed_by"] == "operator"  # the tools' close, not ours


async def test_a_dead_lettered_task_fails_its_stage_at_once(board: Board,
                                                          client: Client) -> None:
    origin = board.origin()
    handle = await start(client, board, origin)
    # The prefab task, written: the dispatcher cannot route it and gives up at once.
    giving_up = Dispatcher(board.queue_dir, start_script=board.queue_dir / "none",
                           log_dir=board.queue_dir.parent / "logs", max_retries=0)
    prefab = await poll(lambda: _task_of(board, handle.id, PREFAB_SCAFFOLDING), 20,
                        what="the prefab task")
    reason = "No agent found for task_type=build"
    warned_at = time.monotonic()
    giving_up.fail_routing(prefab["id"], reason)
    with pytest.raises(WorkflowFailureError) as failed:
        await asyncio.wait_for(handle.result(), 15)
    assert time.monotonic() - warned_at < 5.0
    assert reason in str(failed.value.cause)
    status = await status_of(handle)
    assert status.failed_stage == PREFAB_SCAFFOLDING
    assert reason in (status.error or "")
    assert board.task(origin)["status"] == "failed"  # closed: the pipeline ended failed


async def test_a_routing_failure_is_a_warning_while_the_dispatcher_retries(
        board: Board, client: Client) -> None:
    _origin, handle, prefab = await at_prefab(board, client)
    board.dispatcher.fail_routing(prefab["id"], "no run slot for claudebox")

    async def warned() -> list[str]:
        return [w for w in (await status_of(handle)).warnings if "no run slot" in w]

    warnings = await poll_async(warned, timeout=5, what="the routing warning")
    assert prefab["id"] in warnings[0]
    assert "retries" in warnings[0]
    await handle.cancel()


async def test_cli_and_tools_close_once_whichever_is_first(board: Board,
                                                           client: Client) -> None:
    origin = board.origin()
    handle = await start(client, board, origin)
    agents = PlatformAgents(board.tools, board.dispatcher, handle.id)
    # prefab: closed with the tools, then the agent also runs the task's own command.
    await agents.run(lambda: PREFAB_SCAFFOLDING in agents.closed)
    path = Path(read_path(board, handle.id, PREFAB_SCAFFOLDING))
    command = read_task(path)["payload"]["complete_command"]
    cli_env = {"PATH": "/usr/bin:/bin", "HOME": board.env["HOME"]}
    repeat = await asyncio.to_thread(run_cli, [*command[2:], "success", "again"], cli_env)
    assert repeat.returncode == 0, repeat.stderr
    assert "nothing to do" in repeat.stdout
    # implement: completed with the CLI alone (no token in the file), after the file was
    # moved to archive/ by the tools: its command still finds it.
    implement = await poll(lambda: _task_of(board, handle.id, IMPLEMENT_BUILD), 20,
                           what="the implement task")
    moved = Path(read_path(board, handle.id, IMPLEMENT_BUILD))
    (board.queue_dir / "archive").mkdir(exist_ok=True)
    moved.rename(board.queue_dir / "archive" / moved.name)
    command = implement["payload"]["complete_command"]
    done = await asyncio.to_thread(run_cli, [*command[2:], "success", "built"], cli_env)
    assert done.returncode == 0, done.stderr
    await poll_async(lambda: _stage_done(handle, IMPLEMENT_BUILD), 10, what="implement done")
    # The prefab file again: its stage is over, so it completes nothing (exit 3).
    stale = await asyncio.to_thread(run_cli, [*command[2:3], str(path), "failed", "x"],
                                    cli_env)
    assert stale.returncode == 3, stale.stderr
    assert "not waiting on task" in stale.stderr
    await handle.cancel()


def _task_of(board: Board, workflow_id: str, stage: str) -> dict[str, Any] | None:
    for task in board.tools.list_tasks(limit=200):
        payload = task.get("payload") or {}
        if payload.get("workflow_id") == workflow_id and payload.get("stage") == stage:
            return task
    return None


def read_path(board: Board, workflow_id: str, stage: str) -> str:
    for path, _, record in our_files(board.queue_dir):
        payload = record.get("payload") or {}
        if payload.get("workflow_id") == workflow_id and payload.get("stage") == stage:
            return str(path)
    raise AssertionError(f"no {stage} task file of {workflow_id}")


async def _stage_done(handle: WorkflowHandle[Any, Any], stage: str) -> bool:
    return stage in (await status_of(handle)).stages_done


async def test_park_and_unpark_change_nothing_and_an_unreadable_decision_is_shown(
        board: Board, client: Client) -> None:
    origin = board.origin()
    handle = await start(client, board, origin)
    agents = PlatformAgents(board.tools, board.dispatcher, handle.id, triage=FLAG_AND_BLOCK)
    await agents.run(lambda: board.task(origin)["status"] == PENDING_APPROVAL)
    assert board.tools.park(origin, note="lunch")["ok"]
    assert board.tools.unpark(origin)["ok"]
    assert board.task(origin)["status"] == PENDING_APPROVAL
    assert (await status_of(handle)).decision is None
    # A decision the watcher cannot read: said at WARNING and in the run's status.
    path = Path(read_origin_path(board, origin))
    text = path.read_text().replace("status: pending-approval",
                                    "status: !!python/name:os.system approved", 1)
    path.write_text(text)

    async def shown() -> list[str]:
        return [w for w in (await status_of(handle)).warnings if "cannot be read" in w]

    warning = (await poll_async(shown, timeout=5, what="the unreadable decision"))[0]
    assert "is not allowed" in warning
    assert any(r.get("event") == "decision_file_unreadable" and r.get("level") == "WARNING"
               for r in board.worker.log_records())
    await handle.cancel()


async def test_a_planted_close_of_another_id_completes_nothing(board: Board,
                                                               client: Client) -> None:
    _origin, handle, prefab = await at_prefab(board, client)
    real = Path(read_path(board, handle.id, PREFAB_SCAFFOLDING))
    # The same run, stage and activity, another task id, closed: not the task it waits on.
    forged = yaml.safe_load(real.read_text())
    forged["id"] = str(uuid.uuid4())
    forged["status"] = "completed"
    forged["result"]["output"] = "forged"
    planted = real.with_name(real.name[:16] + forged["id"][:8] + ".yml")
    planted.write_text(yaml.safe_dump(forged, sort_keys=False))

    def refused() -> bool:
        return any(r.get("event") == "task_close_refused" for r in board.worker.log_records())

    await poll(refused, 10, what="the forged close refused")
    status = await status_of(handle)
    assert PREFAB_SCAFFOLDING not in status.stages_done
    assert status.waiting_on is not None
    assert status.waiting_on.task_id == prefab["id"]
    await handle.cancel()


async def test_the_token_setting_puts_it_back_for_argv_agents(tmp_path: Path,
                                                              temporal_address: str,
                                                              client: Client) -> None:
    env = make_env(tmp_path, temporal_address, TASK_FILE_DIALECT=DIALECT_PLATFORM,
                   TASK_TOKEN_IN_FILE="true")
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        queue_dir = Path(env["TASK_QUEUE_DIR"])
        handle = await client.start_workflow(
            BUILD_PIPELINE_WORKFLOW,
            BuildPipelineInput(build_name="argv", plan_path="/srv/p.md",
                               task_id=str(uuid.uuid4()), target_agent="builder"),
            id=f"platform-{uuid.uuid4()}", task_queue=env["TASK_QUEUE"])

        def prefab_file() -> dict[str, Any] | None:
            for path in queue_dir.glob("*.yml"):
                task = yaml.safe_load(path.read_text())
                if task["payload"].get("stage") == PREFAB_SCAFFOLDING:
                    return task
            return None

        task = await poll(prefab_file, 20, what="the prefab task")
        assert task["task_type"] == "build"
        token = task["payload"]["task_token"]
        done = await asyncio.to_thread(run_cli, [token, "success", "by argv"], env)
        assert done.returncode == 0, done.stderr
        assert token not in done.stdout + done.stderr
        await poll_async(lambda: _stage_done(handle, PREFAB_SCAFFOLDING), 10,
                         what="prefab done")
        await handle.cancel()
    finally:
        worker.stop()


def read_origin_path(board: Board, task_id: str) -> str:
    for path, _, record in our_files(board.queue_dir):
        if record.get("id") == task_id:
            return str(path)
    raise AssertionError(f"no originating task {task_id}")


async def test_the_cli_completes_without_a_token_while_no_worker_runs(
        board: Board, client: Client) -> None:
    _origin, handle, prefab = await at_prefab(board, client)
    board.worker.stop()  # what the run waits on is read from the server alone
    cli_env = {"PATH": "/usr/bin:/bin", "HOME": board.env["HOME"]}
    command = prefab["payload"]["complete_command"]
    done = await asyncio.to_thread(run_cli, [*command[2:], "success", "scaffolded"], cli_env)
    assert done.returncode == 0, done.stderr
    assert read_task(Path(command[3]))["status"] == "completed"
    board.worker.start()
    board.worker.wait_ready()
    await poll_async(lambda: _stage_done(handle, PREFAB_SCAFFOLDING), 20, what="prefab done")
    await handle.cancel()


@pytest.mark.plant_root_link
@pytest.mark.worker_env(BLOCK_FILE_DECISIONS="false")
async def test_closes_are_applied_with_file_decisions_off_and_a_link_to_root_planted(
        board: Board, client: Client) -> None:
    """The watch is not recursive (a link to / is not walked) and runs for closed tasks
    even when the folder decides no blocks."""
    origin = board.origin()
    handle = await start(client, board, origin)
    agents = PlatformAgents(board.tools, board.dispatcher, handle.id)
    await agents.run(lambda: IMPLEMENT_BUILD in agents.closed)
    await poll_async(lambda: _stage_done(handle, IMPLEMENT_BUILD), 10, what="implement done")
    assert not any(r.get("event") == "decision_watch_failed"
                   for r in board.worker.log_records())
    await handle.cancel()


async def test_an_operator_cancel_of_an_agent_task_fails_its_stage(board: Board,
                                                                   client: Client) -> None:
    _origin, handle, prefab = await at_prefab(board, client)
    assert board.tools.cancel(prefab["id"], note="wrong plan")["ok"]
    with pytest.raises(WorkflowFailureError) as failed:
        await asyncio.wait_for(handle.result(), 15)
    message = str(failed.value.cause)
    assert f"task {prefab['id']} was cancelled by operator" in message
    assert "wrong plan" in message
