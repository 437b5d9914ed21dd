"""A Temporal server or Vault that is late or away (startup/reachability.py), with real processes:

- the backoff and its deadline, and what exits at once instead of waiting (fast);
- worker.py under the project's pm2 and ecosystem.config.js, started with no server: it
  waits instead of spending pm2's restarts, and polls soon after the server comes up;
- worker.py on the mTLS test bed with OpenBao started late;
- a dev server with a state file stopped for a while under two pipelines waiting on
  agents, an agent completing during the outage (exit 4, "retry later") and again after.

How late and how long are settings (TEST_LATE_SERVER_SECONDS, TEST_LATE_VAULT_SECONDS,
TEST_OUTAGE_SECONDS) so the operator's case — minutes — can be run by hand; the defaults
keep the suite short while staying well past what used to kill the worker.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from config import load_config
from exceptions import (
    ConfigError,
    CredentialError,
    CredentialSettingError,
    DependencyUnavailableError,
    TlsHandshakeError,
    VaultUnavailableError,
)
from models import BuildPipelineInput, BuildPipelineResult
from standins.agents import (
    StandIn,
    load_yaml,
    play_stage,
    poll,
    poll_async,
    run_cli,
    wait_for_task,
    write_origin_task,
)
from standins.task_tools import TaskTools
from startup.reachability import connect_when_reachable, retry_delays
from temporal_client import connect
from tests import temporal_server
from tests.conftest import make_env
from tests.mtls import (
    AppRole,
    make_approle,
    make_pki,
    openbao,
    tls_proxy,
    vault_env,
    worker_secret,
    write_secret_id_file,
)
from tests.test_faults import DurableServer
from tests.test_pm2 import ECOSYSTEM, Pm2, private_pm2, status
from tests.worker_process import WorkerProcess
from tools.devserver import free_port
from vocabulary import (
    BUILD_PIPELINE_WORKFLOW,
    DIALECT_PLATFORM,
    SUBMITTED,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    WORKER_READY,
    WORKER_STOPPED,
    WORKER_WAITING,
)

# How late the server comes under pm2. The worker used to exit 4 within ~3.5 s, which
# pm2 counts as a restart (the test asserts none; after 10 it marked the app errored, at
# about 45 s). By 30 s the worker's retries have reached their 15 s cap
# (policies.STARTUP_RETRY_CAP: 1+2+4+8+15), so the server comes up during the longest
# wait there is. The operator's case is minutes: TEST_LATE_SERVER_SECONDS=600.
LATE_SERVER_SECONDS = float(os.environ.get("TEST_LATE_SERVER_SECONDS", "30"))
# pm2's restart count only grows: a look every few seconds misses no restart (each look
# is a `pm2 jlist`, a Node process).
PM2_LOOK_SECONDS = 5.0
LATE_VAULT_SECONDS = float(os.environ.get("TEST_LATE_VAULT_SECONDS", "10"))
OUTAGE_SECONDS = float(os.environ.get("TEST_OUTAGE_SECONDS", "30"))
POLLING_WITHIN_SECONDS = 30.0
NO_ISSUES = "info: []\n"


# --- helpers ----------------------------------------------------------------------------


def events(worker: WorkerProcess, name: str) -> list[dict[str, Any]]:
    return [r for r in worker.log_records() if r.get("event") == name]


async def has_pollers(client: Client, queue: str) -> bool:
    """A worker polls `queue` for workflow tasks (the server's view)."""
    response = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
        namespace=client.namespace, task_queue=TaskQueue(name=queue),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW))
    return len(response.pollers) > 0


async def start_pipeline(client: Client, env: dict[str, str], build: str) -> WorkflowHandle:
    origin = write_origin_task(Path(env["TASK_QUEUE_DIR"]), build)
    return await client.start_workflow(
        BUILD_PIPELINE_WORKFLOW,
        BuildPipelineInput(build_name=build, plan_path="/plans/p.md", task_id=origin,
                           target_agent="builder"),
        id=f"reach-{build}-{uuid.uuid4().hex[:8]}", task_queue=env["TASK_QUEUE"],
        result_type=BuildPipelineResult)


def agents(env: dict[str, str], workflow_id: str) -> StandIn:
    """Agents for one pipeline, through complete_activity.py; the audit finds nothing."""
    audit = Path(env["TEMPORAL_AUDIT_DIR"])
    return StandIn(queue_dir=Path(env["TASK_QUEUE_DIR"]), audit_dir=audit, env=env,
                   work_dir=audit / "closeouts", workflow_id=workflow_id,
                   triage=lambda _build: NO_ISSUES)


async def stays_up_for(worker: WorkerProcess, seconds: float) -> None:
    """The scenario's duration (a server still down, a Vault not yet up), watching that
    the worker does not exit meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert worker.process is not None
        assert worker.process.poll() is None, f"worker exited:\n{worker.tail()}"
        await asyncio.sleep(0.5)


# --- the backoff and its deadline (no server needed) ------------------------------------


class FakeClock:
    """A FAKE clock and sleep: the backoff's arithmetic without waiting for it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def failing(errors: list[BaseException], result: str = "client") -> Callable[[], Any]:
    """An attempt that raises each of `errors` in turn, then returns `result`."""
    remaining = list(errors)

    async def attempt() -> str:
        if remaining:
            raise remaining.pop(0)
        return result

    return attempt


def test_retry_delays_double_up_to_the_cap() -> None:
    assert list(itertools.islice(retry_delays(1, 30), 8)) == [1, 2, 4, 8, 16, 30, 30, 30]


async def test_transient_failures_are_retried_with_backoff_until_reachable() -> None:
    config = load_config({"TEMPORAL_ADDRESS": "127.0.0.1:7999"})
    clock, reports = FakeClock(), []
    down = RuntimeError("Failed client connect: tcp connect error (ConnectionRefused)")
    starting = RPCError("namespace registry not ready", RPCStatusCode.UNAVAILABLE, b"")
    sealed = VaultUnavailableError("Vault at http://127.0.0.1:1 is sealed or not ready")
    result = await connect_when_reachable(
        failing([down, starting, sealed]), config, lambda *report: reports.append(report),
        sleep=clock.sleep, clock=clock)
    assert result == "client"
    assert clock.pauses == [1, 2, 4]
    assert [attempt for _, attempt, _ in reports] == [1, 2, 3]
    assert reports[0][0].startswith("cannot connect to Temporal at 127.0.0.1:7999: ")
    assert reports[1][0] == ("Temporal at 127.0.0.1:7999 answered UNAVAILABLE: "
                             "namespace registry not ready")
    assert reports[2][0] == str(sealed)


async def test_still_unreachable_at_the_deadline_gives_up() -> None:
    config = load_config({"WORKER_STARTUP_WAIT_SECONDS": "20"})
    clock = FakeClock()
    with pytest.raises(DependencyUnavailableError) as caught:
        await connect_when_reachable(failing([RuntimeError("refused")] * 100), config,
                                     lambda *_: None, sleep=clock.sleep, clock=clock)
    # 1 + 2 + 4 + 8, then only the 5 s left of the 20: never past the deadline.
    assert clock.pauses == [1, 2, 4, 8, 5]
    assert caught.value.attempts == 6
    assert caught.value.waited_seconds == 20
    assert "refused" in caught.value.cause


@pytest.mark.parametrize("error", [
    ConfigError("TEMPORAL_NAMESPACE: the server has no namespace 'x'"),
    CredentialSettingError("Vault refused the AppRole login"),
    CredentialError("Vault secret secret/data/temporal/worker does not exist"),
    TlsHandshakeError("TLS handshake failed: the server certificate is not trusted"),
], ids=lambda error: type(error).__name__)
async def test_what_no_wait_cures_is_raised_at_once(error: Exception) -> None:
    clock = FakeClock()
    with pytest.raises(type(error)):
        await connect_when_reachable(failing([error]), load_config({}), lambda *_: None,
                                     sleep=clock.sleep, clock=clock)
    assert clock.pauses == []


@pytest.mark.parametrize("value", ["-1", "86401", "soon"])
def test_startup_wait_setting_is_validated(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^WORKER_STARTUP_WAIT_SECONDS: "):
        load_config({"WORKER_STARTUP_WAIT_SECONDS": value})


@pytest.mark.slow
async def test_worker_waits_then_exits_4(tmp_path: Path) -> None:
    """worker.py with nothing listening: WARNINGs with the cause, status `waiting` with
    the reason, exit 4 once WORKER_STARTUP_WAIT_SECONDS have passed, not before."""
    address = f"127.0.0.1:{free_port()}"
    status_file = tmp_path / "status.json"
    worker = WorkerProcess(make_env(tmp_path, address, WORKER_STARTUP_WAIT_SECONDS="4",
                                    WORKER_STATUS_FILE=str(status_file)),
                           tmp_path / "worker.log")
    begun = time.monotonic()
    worker.start()
    try:
        waiting = await poll(lambda: status(status_file).get("state") == WORKER_WAITING
                             and status(status_file), timeout=30, what="status waiting")
        assert waiting["reason"].startswith(f"cannot connect to Temporal at {address}")
        code = await asyncio.to_thread(worker.wait, 60)
    finally:
        worker.stop()
    assert code == 4, worker.tail()
    assert time.monotonic() - begun >= 4
    warnings = events(worker, "waiting_for_dependency")
    assert len(warnings) >= 2
    assert all(w["level"] == "WARNING" and address in w["cause"] for w in warnings)
    assert [w["attempt"] for w in warnings] == list(range(1, len(warnings) + 1))
    assert status(status_file)["state"] == WORKER_STOPPED
    assert f"worker: cannot connect to Temporal at {address}" in worker.tail()
    assert "WORKER_STARTUP_WAIT_SECONDS=4" in worker.tail()


async def test_sigterm_while_waiting_stops_at_once(tmp_path: Path) -> None:
    """pm2 stop (or a reboot) during the wait: a clean exit 0, status `stopped`."""
    status_file = tmp_path / "status.json"
    worker = WorkerProcess(make_env(tmp_path, f"127.0.0.1:{free_port()}",
                                    WORKER_STATUS_FILE=str(status_file)),
                           tmp_path / "worker.log").start()
    try:
        await poll(lambda: len(events(worker, "waiting_for_dependency")) >= 2, timeout=30,
                   what="two attempts")
        worker.signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.wait, 10)
    finally:
        worker.stop()
    assert code == 0, worker.tail()
    assert status(status_file)["state"] == WORKER_STOPPED
    assert events(worker, "shutdown_requested")


async def test_unknown_namespace_exits_2_at_once(temporal_address: str, tmp_path: Path) -> None:
    """A namespace the server lacks is a setting to fix, not something to wait for (it
    was an uncaught traceback and exit 1)."""
    worker = WorkerProcess(make_env(tmp_path, temporal_address,
                                    TEMPORAL_NAMESPACE="no-such-namespace"),
                           tmp_path / "worker.log")
    worker.start()
    try:
        code = await asyncio.to_thread(worker.wait, 60)
    finally:
        worker.stop()
    assert code == 2, worker.tail()
    assert ("worker: configuration error: TEMPORAL_NAMESPACE: the server at "
            f"{temporal_address} has no namespace 'no-such-namespace'") in worker.tail()
    assert events(worker, "waiting_for_dependency") == []
    assert "Traceback" not in worker.tail(50)


# --- the server late, under pm2 ---------------------------------------------------------


@pytest.fixture
def late_pm2(tmp_path: Path) -> Iterator[tuple[Pm2, dict[str, str], str]]:
    """pm2 with a private home, its worker pointed at a port where no server runs yet."""
    with private_pm2(tmp_path, f"127.0.0.1:{free_port()}") as managed:
        yield managed


@pytest.mark.slow
async def test_pm2_worker_waits_for_a_late_server(late_pm2: tuple[Pm2, dict[str, str], str],
                                                  tmp_path: Path) -> None:
    manager, settings, name = late_pm2
    status_file = Path(settings["WORKER_STATUS_FILE"])
    manager.run("start", str(ECOSYSTEM))
    waiting = await poll(lambda: status(status_file).get("state") == WORKER_WAITING
                         and status(status_file), timeout=60, what="worker waiting under pm2")
    assert "cannot connect to Temporal" in waiting["reason"]
    started = time.monotonic()
    while time.monotonic() - started < LATE_SERVER_SECONDS:  # the server is still down
        app = manager.app(name)
        assert app["pm2_env"]["status"] == "online", app["pm2_env"]["status"]
        assert app["pm2_env"]["restart_time"] == 0
        await asyncio.sleep(PM2_LOOK_SECONDS)
    assert status(status_file)["pid"] == waiting["pid"]

    port = int(settings["TEMPORAL_ADDRESS"].rsplit(":", 1)[1])
    with temporal_server.running(port=port, log_path=tmp_path / "server.log") as address:
        up_at = time.monotonic()
        client = await connect(load_config({"TEMPORAL_ADDRESS": address}))
        await poll_async(lambda: has_pollers(client, settings["TASK_QUEUE"]),
                         timeout=POLLING_WITHIN_SECONDS, interval=0.5,
                         what="the waiting worker polling")
        print(f"polling {time.monotonic() - up_at:.1f}s after the server came up")
        assert status(status_file)["state"] == WORKER_READY
        handle = await start_pipeline(client, settings, "late-server")
        await agents(settings, handle.id).run(timeout=90)
        result = await handle.result()
    assert result.outcome == "success"
    app = manager.app(name)
    assert app["pm2_env"]["status"] == "online"
    assert app["pm2_env"]["restart_time"] == 0
    assert app["pid"] == waiting["pid"]


# --- Vault late, on the mTLS test bed ---------------------------------------------------


@pytest.mark.slow
async def test_worker_waits_for_a_late_vault(temporal_address: str, tmp_path: Path) -> None:
    pki = make_pki()
    role = AppRole(role_id=str(uuid.uuid4()), secret_id=str(uuid.uuid4()))
    secret_id_file = write_secret_id_file(tmp_path, role.secret_id)
    vault_port = free_port()
    with tls_proxy(temporal_address, pki, tmp_path) as proxy:
        env = make_env(tmp_path, proxy.address, WORKER_STATUS_FILE=str(tmp_path / "status.json"),
                       **vault_env(f"http://127.0.0.1:{vault_port}", role, secret_id_file,
                                   proxy.address))
        status_file = Path(env["WORKER_STATUS_FILE"])
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            waiting = await poll(lambda: status(status_file).get("state") == WORKER_WAITING
                                 and status(status_file), timeout=30, what="waiting for Vault")
            assert waiting["reason"].startswith(f"Vault at http://127.0.0.1:{vault_port} "
                                                f"unreachable")
            await stays_up_for(worker, LATE_VAULT_SECONDS)
            with openbao(tmp_path / "bao.log", port=vault_port) as bao:
                make_approle(bao, fixed=role)
                bao.write_worker_secret(worker_secret(pki))
                await asyncio.to_thread(worker.wait_ready, 60)
                assert status(status_file)["state"] == WORKER_READY
                client = await connect(load_config(env))
                handle = await start_pipeline(client, env, "late-vault")
                await agents(env, handle.id).run(timeout=90)
                result = await handle.result()
                secrets = [role.role_id, role.secret_id, bao.root_token,
                           pki.client.key_pem.splitlines()[1]]
        finally:
            worker.stop()
    assert result.outcome == "success"
    assert worker.starts == 1
    assert len(events(worker, "waiting_for_dependency")) >= 2
    log_text = worker.log_path.read_text()
    for secret in secrets:
        assert secret not in log_text


# --- the server away for a while, pipelines waiting on agents ---------------------------


def close_with_tools(queue: Path, task: dict[str, Any]) -> None:
    """What the platform's operator and agent do with the task tools: hand it over,
    claim it, close it with its result."""
    tools = TaskTools(queue)
    agent = task["target_agent"]
    for result in (tools.approve(task["id"]),
                   tools.update_task(task["id"], "in-progress", agent),
                   tools.update_task(task["id"], "completed", agent, output="built")):
        assert result["ok"], result


@pytest.mark.slow
async def test_server_outage_while_agents_work(tmp_path: Path) -> None:
    server = DurableServer(tmp_path)
    # The platform dialect: the second agent closes its task with the task tools.
    env = make_env(tmp_path, server.address, WORKER_STATUS_FILE=str(tmp_path / "status.json"),
                   TASK_FILE_DIALECT=DIALECT_PLATFORM)
    status_file = Path(env["WORKER_STATUS_FILE"])
    queue = Path(env["TASK_QUEUE_DIR"])
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        client = await connect(load_config(env))
        first = await start_pipeline(client, env, "outage-a")
        second = await start_pipeline(client, env, "outage-b")
        for handle in (first, second):
            await play_stage(queue, handle.id, TASK_BUILD_PREFAB, env, timeout=60)
        implement = await wait_for_task(queue, first.id, TASK_BUILD_PLAN, timeout=60)
        closed_by_tools = await wait_for_task(queue, second.id, TASK_BUILD_PLAN, timeout=60)

        server.stop()
        down_at = time.monotonic()
        waiting = await poll(lambda: status(status_file).get("state") == WORKER_WAITING
                             and status(status_file), timeout=30, what="status waiting")
        assert server.address in waiting["reason"]
        during = await asyncio.to_thread(
            run_cli, ["--task-file", str(implement), "success", "built"], env)
        assert during.returncode == 4, during.stderr
        assert "retry later" in during.stderr
        assert load_yaml(implement)["status"] == SUBMITTED  # untouched: the retry can work
        close_with_tools(queue, load_yaml(closed_by_tools))  # applied once the server is back
        await stays_up_for(worker, OUTAGE_SECONDS - (time.monotonic() - down_at))
        assert status(status_file)["state"] == WORKER_WAITING
        server.start()

        await poll(lambda: status(status_file).get("state") == WORKER_READY,
                   timeout=POLLING_WITHIN_SECONDS, what="status ready again")
        down_for = time.monotonic() - down_at
        after = await asyncio.to_thread(
            run_cli, ["--task-file", str(implement), "success", "built"], env)
        assert after.returncode == 0, after.stderr
        await asyncio.gather(agents(env, first.id).run(timeout=120),
                             agents(env, second.id).run(timeout=120))
        results = await asyncio.gather(first.result(), second.result())
    finally:
        worker.stop()
        server.stop()
    assert [result.outcome for result in results] == ["success", "success"]
    assert worker.starts == 1
    # Said when it began and then once a minute, not a line per retry (the SDK core's
    # own retry warnings, about one a second, are thinned to one a minute as well).
    minutes = int(down_for // 60)
    outage_reports = events(worker, "temporal_unreachable")
    assert 1 <= len(outage_reports) <= 1 + minutes, outage_reports
    back = events(worker, "temporal_reachable_again")
    assert len(back) == 1
    assert back[0]["down_seconds"] >= OUTAGE_SECONDS - 10
    warnings = [r["event"] for r in worker.log_records() if r.get("level") == "WARNING"]
    print(f"down {down_for:.0f}s; warnings: {warnings}")
    assert len(warnings) <= 3 * (1 + minutes), warnings
