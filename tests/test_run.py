"""tools/run.py (`make run`): embedded dev server when none listens, the worker, and a
clean stop that takes down only the dev server it started. Real processes throughout."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from config import WorkerConfig, load_config
from standins.agents import REPO, poll, run_cli, wait_for_task
from temporal_client import connect
from tests.agents import assert_valid_task_file
from tests.conftest import make_env
from tools import devserver
from tools.run import DEV_SERVER_WARNING, is_local_host, wants_dev_server
from vocabulary import BUILD_PIPELINE_WORKFLOW, TASK_BUILD_PLAN, TASK_BUILD_PREFAB

READY = "Worker started, listening on task queue"
EMBEDDED = "an embedded Temporal dev server is running there"
OPERATOR_WARNING = DEV_SERVER_WARNING.split("{address}")[0]
STARTUP_SECONDS = 90.0
STOP_SECONDS = 60.0


def start_run(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tools.run"], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def interrupt(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


async def wait_for_line(log: Path, text: str, occurrence: int = 1) -> None:
    await poll(lambda: log.read_text(errors="replace").count(text) >= occurrence,
               STARTUP_SECONDS, 0.2, f"{text!r} in {log}")


def ui_answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run_env(root: Path, address: str, **extra: str) -> dict[str, str]:
    settings = {"DEV_SERVER_UI_PORT": str(devserver.free_port()),
                "DEV_SERVER_DIR": str(root / "state"), **extra}
    return make_env(root, address, **settings)


@pytest.mark.slow
async def test_starts_dev_server_worker_and_stops_both(tmp_path: Path) -> None:
    port = devserver.free_port()
    env = run_env(tmp_path, f"127.0.0.1:{port}")
    ui_port, state = int(env["DEV_SERVER_UI_PORT"]), Path(env["DEV_SERVER_DIR"])
    log = tmp_path / "run.log"
    process = start_run(env, log)
    try:
        await wait_for_line(log, READY)
        assert EMBEDDED in log.read_text()
        assert log.read_text().count(OPERATOR_WARNING) == 1  # every local user is an operator
        assert f"Web UI http://localhost:{ui_port}" in log.read_text()
        await poll(lambda: ui_answers(ui_port), STARTUP_SECONDS, 0.2, "the Web UI")
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert (state / "temporal.db").is_file()

        client = await connect(load_config(env))
        workflow_id = f"run-{uuid.uuid4().hex[:8]}"
        await client.start_workflow(
            BUILD_PIPELINE_WORKFLOW,
            {"build_name": "run-check", "plan_path": "/plans/run-check.md",
             "task_id": "origin-1", "target_agent": "builder"},
            id=workflow_id, task_queue=env["TASK_QUEUE"])
        prefab = await wait_for_task(Path(env["TASK_QUEUE_DIR"]), workflow_id,
                                     TASK_BUILD_PREFAB, timeout=STARTUP_SECONDS)
        assert_valid_task_file(prefab)
    finally:
        code = interrupt(process)
    assert code == 0, log.read_text()[-2000:]
    assert not devserver.is_listening("127.0.0.1", port)
    assert not devserver.is_listening("127.0.0.1", ui_port)

    # The state file keeps the pipeline: after a restart the parked stage still completes
    # and the next one is dispatched.
    process = start_run(env, log)
    try:
        await wait_for_line(log, READY, occurrence=2)
        completed = run_cli(["--task-file", str(prefab), "success", "scaffolded"], env)
        assert completed.returncode == 0, completed.stderr
        await wait_for_task(Path(env["TASK_QUEUE_DIR"]), workflow_id, TASK_BUILD_PLAN,
                            timeout=STARTUP_SECONDS)
    finally:
        code = interrupt(process)
    assert code == 0, log.read_text()[-3000:]
    assert not devserver.is_listening("127.0.0.1", port)


@pytest.mark.slow
async def test_uses_a_listening_server_and_leaves_it_running(
        tmp_path: Path, temporal_address: str) -> None:
    env = run_env(tmp_path, temporal_address)
    log = tmp_path / "run.log"
    process = start_run(env, log)
    try:
        await wait_for_line(log, READY)
    finally:
        code = interrupt(process)
    assert code == 0, log.read_text()[-3000:]
    assert EMBEDDED not in log.read_text()
    assert OPERATOR_WARNING not in log.read_text()
    assert not (tmp_path / "state").exists()
    host, port = temporal_address.rsplit(":", 1)
    assert devserver.is_listening(host, int(port))


def test_busy_ui_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    port = devserver.free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = run_env(tmp_path, f"127.0.0.1:{port}",
                      DEV_SERVER_UI_PORT=str(busy.getsockname()[1]))
        result = subprocess.run([sys.executable, "-m", "tools.run"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "DEV_SERVER_UI_PORT" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert READY not in result.stdout
    assert not devserver.is_listening("127.0.0.1", port)


def test_bad_configuration_exits_2_without_a_server(tmp_path: Path) -> None:
    port = devserver.free_port()
    env = run_env(tmp_path, f"127.0.0.1:{port}", TASK_QUEUE="two words")
    result = subprocess.run([sys.executable, "-m", "tools.run"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "TASK_QUEUE" in result.stderr
    assert not (tmp_path / "state").exists()
    assert not devserver.is_listening("127.0.0.1", port)


@pytest.mark.parametrize(("host", "local"), [
    ("localhost", True), ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
    ("temporal.example.com", False), ("203.0.113.7", False), ("localhost.example", False),
])
def test_only_loopback_addresses_count_as_local(host: str, local: bool) -> None:
    assert is_local_host(host) is local


def test_remote_or_tls_addresses_never_get_a_dev_server(tmp_path: Path) -> None:
    secret_id = tmp_path / "secret-id"
    secret_id.write_text("x")
    free = devserver.free_port()
    assert wants_dev_server(WorkerConfig(temporal_address=f"127.0.0.1:{free}"))
    assert not wants_dev_server(WorkerConfig(temporal_address="temporal.example.com:7233"))
    assert not wants_dev_server(WorkerConfig(
        temporal_address=f"127.0.0.1:{free}", vault_addr="http://127.0.0.1:8200",
        vault_role_id=SecretStr("role"), vault_secret_id_file=secret_id))

