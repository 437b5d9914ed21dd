"""worker.py as a process: readiness (log line + WORKER_STATUS_FILE), graceful shutdown
that lets a running activity finish, a second signal that exits at once, and
configuration errors that exit 2 without leaking secrets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle

from models import BuildPipelineInput
from standins.agents import complete_task, play_stage, poll, wait_for_task, write_origin_task
from tests.conftest import make_env
from tests.worker_process import REPO, WorkerProcess
from vocabulary import (
    AUDIT_REQUESTS_DIR,
    BUILD_PIPELINE_WORKFLOW,
    NOTIFY_BLOCKS,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
)

SECRET = "syt_do-not-print-this-token"


def status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def worker_for(tmp_path: Path, address: str, **extra: str) -> WorkerProcess:
    env = make_env(tmp_path, address, WORKER_STATUS_FILE=str(tmp_path / "run" / "status.json"),
                   **extra)
    return WorkerProcess(env, tmp_path / "worker.log")


def slow_script(tmp_path: Path, seconds: float) -> Path:
    """A notification script that takes `seconds`: a slow chat bridge. It leaves
    markers so the test sees when it started and whether it ran to the end."""
    script = tmp_path / "send-matrix.sh"
    script.write_text(f"#!/bin/sh\ntouch '{tmp_path}/notify-started'\nsleep {seconds}\n"
                      f"touch '{tmp_path}/notify-done'\n")
    script.chmod(0o755)
    return script


async def pipeline_in_notify(client: Client, worker: WorkerProcess,
                             tmp_path: Path) -> WorkflowHandle:
    """Drive a pipeline through the CLI until stage 6 runs the (slow) script."""
    queue = Path(worker.env["TASK_QUEUE_DIR"])
    origin = write_origin_task(queue, "slow-notify")
    handle = await client.start_workflow(
        BUILD_PIPELINE_WORKFLOW,
        BuildPipelineInput(build_name="slow-notify", plan_path="/plans/p.md", task_id=origin,
                           target_agent="builder"),
        id=f"worker-test-{uuid.uuid4()}", task_queue=worker.env["TASK_QUEUE"])
    await play_stage(queue, handle.id, TASK_BUILD_PREFAB, worker.env)
    await play_stage(queue, handle.id, TASK_BUILD_PLAN, worker.env)
    audit = await wait_for_task(queue, handle.id, TASK_SECURITY_AUDIT)
    triage = Path(worker.env["TEMPORAL_AUDIT_DIR"]) / AUDIT_REQUESTS_DIR / "slow-notify"
    triage.mkdir(parents=True, exist_ok=True)
    (triage / "triage-output.yml").write_text("blocks:\n- hardcoded password\n")
    await complete_task(audit, worker.env)
    await poll(lambda: (tmp_path / "notify-started").exists(), timeout=30,
               what="notification script started")
    return handle


async def notify_completed(handle: WorkflowHandle) -> bool:
    """Did the server record notify_blocks as completed (not failed or timed out)?"""
    events = [event async for event in handle.fetch_history_events()]
    notify = {e.event_id for e in events
              if e.HasField("activity_task_scheduled_event_attributes")
              and e.activity_task_scheduled_event_attributes.activity_type.name
              == NOTIFY_BLOCKS}
    return any(e.activity_task_completed_event_attributes.scheduled_event_id in notify
               for e in events if e.HasField("activity_task_completed_event_attributes"))


async def test_ready_status_file_and_clean_sigterm(temporal_address: str,
                                                   tmp_path: Path) -> None:
    worker = worker_for(tmp_path, temporal_address).start()
    status_file = Path(worker.env["WORKER_STATUS_FILE"])
    try:
        worker.wait_ready()
        ready = await poll(lambda: status(status_file), what="status file")
        assert ready["state"] == "ready"
        assert ready["pid"] == worker.pid
        assert ready["task_queue"] == worker.env["TASK_QUEUE"]
        started = [r for r in worker.log_records() if r.get("ready") is True]
        assert len(started) == 1
        assert started[0]["task_queue"] == worker.env["TASK_QUEUE"]

        begun = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        assert time.monotonic() - begun < 30
    finally:
        worker.stop()
    events = [r["event"] for r in worker.log_records()]
    assert "shutdown_requested" in events
    assert events[-1] == "worker_stopped"
    assert (status(status_file) or {}).get("state") == "stopped"


@pytest.mark.slow
async def test_graceful_shutdown_lets_running_activity_finish(
        temporal_address: str, client: Client, tmp_path: Path) -> None:
    script = slow_script(tmp_path, 3)
    worker = worker_for(tmp_path, temporal_address, SEND_MATRIX_SCRIPT=str(script),
                        WORKER_SHUTDOWN_GRACE_SECONDS="20").start()
    status_file = Path(worker.env["WORKER_STATUS_FILE"])
    try:
        worker.wait_ready()
        handle = await pipeline_in_notify(client, worker, tmp_path)
        assert not (tmp_path / "notify-done").exists()
        worker.signal(signal.SIGINT)
        await poll(lambda: (status(status_file) or {}).get("state") == "stopping",
                   what="status stopping")
        assert worker.wait(25) == 0
    finally:
        worker.stop()
    # The activity that was running when the signal came ran to the end and was reported.
    assert (tmp_path / "notify-done").exists()
    assert await notify_completed(handle)
    stopped = [r for r in worker.log_records() if r["event"] == "worker_stopped"]
    assert stopped
    assert 2 <= stopped[0]["shutdown_seconds"] < 20
    assert (status(status_file) or {}).get("state") == "stopped"
    await handle.terminate("test done")


@pytest.mark.slow
async def test_second_signal_exits_at_once(temporal_address: str, client: Client,
                                           tmp_path: Path) -> None:
    script = slow_script(tmp_path, 30)
    worker = worker_for(tmp_path, temporal_address, SEND_MATRIX_SCRIPT=str(script)).start()
    try:
        worker.wait_ready()
        handle = await pipeline_in_notify(client, worker, tmp_path)
        worker.signal(signal.SIGTERM)
        await poll(lambda: any(r["event"] == "shutdown_requested" for r in worker.log_records()),
                   what="first signal handled")
        begun = time.monotonic()
        worker.signal(signal.SIGINT)
        assert worker.wait(10) == 1
        assert time.monotonic() - begun < 5
    finally:
        worker.stop()
    events = [r["event"] for r in worker.log_records()]
    assert "shutdown_forced" in events
    assert "worker_stopped" not in events
    assert not (tmp_path / "notify-done").exists()
    assert not await notify_completed(handle)
    await handle.terminate("test done")


def run_worker(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "worker.py"), *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.slow
def test_configuration_errors_exit_2_naming_the_variable(tmp_path: Path) -> None:
    base = make_env(tmp_path, "127.0.0.1:1", MATRIX_ACCESS_TOKEN=SECRET)
    for name, value in [("TEMPORAL_ADDRESS", "no-port"),
                        ("WORKER_SHUTDOWN_GRACE_SECONDS", "-1"),
                        ("WORKER_STARTUP_WAIT_SECONDS", "forever"),
                        ("TEMPORAL_MAX_CONCURRENT_ACTIVITIES", "zero")]:
        result = run_worker({**base, name: value})
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert name in lines[0], result.stderr
        assert SECRET not in result.stderr + result.stdout


def test_check_config_logs_settings_without_secrets(tmp_path: Path) -> None:
    status_file = tmp_path / "status.json"
    env = make_env(tmp_path, "127.0.0.1:1", MATRIX_ACCESS_TOKEN=SECRET,
                   WORKER_STATUS_FILE=str(status_file))
    result = run_worker(env, "--check-config")
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout.splitlines()[0])["settings"]
    assert settings["WORKER_STATUS_FILE"] == str(status_file)
    assert settings["MATRIX_ACCESS_TOKEN"] == "set"
    assert SECRET not in result.stdout + result.stderr
    assert not status_file.exists()  # only a serving worker reports readiness


def test_unreachable_server_exits_4(tmp_path: Path) -> None:
    from tools.devserver import free_port

    result = run_worker(make_env(tmp_path, f"127.0.0.1:{free_port()}",
                                 WORKER_STARTUP_WAIT_SECONDS="0"))
    assert result.returncode == 4, result.stderr
    assert "cannot connect to Temporal" in result.stderr
