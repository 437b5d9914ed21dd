"""pm2 for real (npm `pm2`, pinned in package.json and package-lock.json, installed by
`npm ci` into node_modules: `make node`, or here when missing) running
ecosystem.config.js with a private PM2_HOME: online and polling, restarted after a
SIGKILL with the pipeline in flight completing, and a graceful `pm2 stop`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from models import BuildPipelineInput, BuildPipelineResult
from standins.agents import complete_task, play_stage, poll, wait_for_task, write_origin_task
from tests.conftest import make_env
from tests.worker_process import READY_LINE, REPO
from vocabulary import (
    AUDIT_REQUESTS_DIR,
    BUILD_PIPELINE_WORKFLOW,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
)

NODE_MODULES = REPO / "node_modules"
PM2_BIN = NODE_MODULES / ".bin" / "pm2"
ECOSYSTEM = REPO / "ecosystem.config.js"


def pinned_pm2() -> str:
    return json.loads((REPO / "package.json").read_text())["dependencies"]["pm2"]


def ensure_pm2() -> Path:
    """The pm2 of package-lock.json; `npm ci` (as `make node` runs it) when node_modules
    lacks it or holds another version."""
    installed = NODE_MODULES / "pm2" / "package.json"
    if installed.exists() and json.loads(installed.read_text())["version"] == pinned_pm2():
        return PM2_BIN
    npm = shutil.which("npm")
    assert npm, "npm is needed for the pm2 tests (Node 20 from Debian: apt-get install npm)"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    return PM2_BIN


def test_pm2_pinned_exactly() -> None:
    """package.json pins one pm2 version and the lockfile resolves exactly that one."""
    version = pinned_pm2()
    assert all(part.isdigit() for part in version.split(".")), version
    lock = json.loads((REPO / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/pm2"]["version"] == version
    assert lock["packages"]["node_modules/pm2"]["integrity"].startswith("sha512-")


class Pm2:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.bin = str(ensure_pm2())
        self.env = {**env, "PM2_HOME": str(home)}

    def run(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.bin, *args], env=self.env, cwd=REPO, capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, f"pm2 {' '.join(args)}: {result.stderr[-2000:]}"
        return result

    def app(self, name: str) -> dict[str, Any]:
        for proc in json.loads(self.run("jlist").stdout):
            if proc["name"] == name:
                return proc
        raise AssertionError(f"{name} not in pm2 jlist")


def ecosystem_settings(env: dict[str, str] | None = None, app: int = 0) -> dict[str, Any]:
    script = (f"console.log(JSON.stringify(require({json.dumps(str(ECOSYSTEM))})"
              f".apps[{app}]))")
    result = subprocess.run(["node", "-e", script], env=env or dict(os.environ),
                            capture_output=True, text=True, timeout=30, check=True)
    return json.loads(result.stdout)


def test_ecosystem_file_settings(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "TEMPORAL_"))}
    base["WORKER_ENV_FILE"] = str(tmp_path / "none.env")
    app = ecosystem_settings(base)
    assert app["interpreter"] == str(REPO / ".venv" / "bin" / "python")
    assert app["cwd"] == str(REPO)
    assert app["script"] == str(REPO / "worker.py")
    assert app["autorestart"] is True
    assert app["max_restarts"] == 10
    assert app["exp_backoff_restart_delay"] > 0
    assert app["kill_timeout"] == 45000  # > the worker's default 30 s graceful shutdown
    assert app["stop_exit_codes"] == [2, 3]

    env_file = tmp_path / "worker.env"
    env_file.write_text("# comment\nexport TASK_QUEUE='from-file'\n"
                        "WORKER_SHUTDOWN_GRACE_SECONDS=60\nTEMPORAL_NAMESPACE=\"ns\"\n")
    app = ecosystem_settings({**base, "WORKER_ENV_FILE": str(env_file),
                              "TEMPORAL_NAMESPACE": "from-shell"})
    assert app["env"]["TASK_QUEUE"] == "from-file"
    assert app["kill_timeout"] == 75000  # follows the configured grace
    # The file never contains a secret or a personal path: everything is relative.
    text = ECOSYSTEM.read_text()
    for forbidden in ("/home/", "/root", "/Users/", "/work/", "~/", "VAULT_ROLE_ID:",
                      "VAULT_ROLE_ID="):
        assert forbidden not in text, forbidden


def test_agent_host_app_is_off_until_its_env_file_exists(tmp_path: Path) -> None:
    """The second app runs worker.py as an agent host, from its own env file only; without
    that file pm2 registers it stopped (autostart false)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "TEMPORAL_"))}
    base.update(WORKER_ENV_FILE=str(tmp_path / "worker.env"),
                AGENT_HOST_ENV_FILE=str(tmp_path / "agent-host.env"))
    (tmp_path / "worker.env").write_text("TASK_QUEUE=helm-build\n")
    main, agent = ecosystem_settings(base), ecosystem_settings(base, app=1)
    assert agent["name"] == "temporal-build-agent-host"
    assert agent["autostart"] is False
    assert "autostart" not in main
    assert agent["script"] == main["script"]
    assert agent["interpreter"] == main["interpreter"]
    assert agent["env"]["WORKER_ROLE"] == "agent-host"

    (tmp_path / "agent-host.env").write_text(
        "TASK_QUEUE=helm-build.sec-host\nWORKFLOW_TASK_QUEUE=helm-build\n"
        "WORKER_SHUTDOWN_GRACE_SECONDS=10\n")
    agent = ecosystem_settings(base, app=1)
    assert agent["autostart"] is True
    assert agent["env"]["TASK_QUEUE"] == "helm-build.sec-host"
    assert agent["env"]["WORKER_ENV_FILE"] == str(tmp_path / "agent-host.env")
    assert agent["kill_timeout"] == 25000
    assert ecosystem_settings(base)["env"]["TASK_QUEUE"] == "helm-build"  # main: its own


@pytest.fixture
def pm2(tmp_path: Path, temporal_address: str) -> Iterator[tuple[Pm2, dict[str, str], str]]:
    with private_pm2(tmp_path, temporal_address) as managed:
        yield managed


@contextlib.contextmanager
def private_pm2(tmp_path: Path, address: str) -> Iterator[tuple[Pm2, dict[str, str], str]]:
    """pm2 with a private home, for a worker on `address`; the worker's settings come
    from an env file. Yields pm2, the settings and the app's name; kills pm2 after."""
    settings = make_env(tmp_path, address, WORKER_STATUS_FILE=str(tmp_path / "status.json"))
    env_file = tmp_path / "worker.env"
    keys = ("TEMPORAL_ADDRESS", "TASK_QUEUE", "TASK_QUEUE_DIR", "TEMPORAL_AUDIT_DIR",
            "SUMMARY_DIR", "WORKER_STATUS_FILE")
    env_file.write_text("".join(f"{key}={settings[key]}\n" for key in keys))
    name = f"tbw-test-{uuid.uuid4().hex[:8]}"
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "VAULT_"))}
    cli_env.update({"WORKER_ENV_FILE": str(env_file), "PM2_APP_NAME": name})
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"pm2-{uuid.uuid4().hex[:8]}"
    # A short PM2_HOME: its unix sockets must fit in 107 bytes.
    manager = Pm2(home, cli_env)
    try:
        yield manager, settings, name
    finally:
        subprocess.run([manager.bin, "kill"], env=manager.env, capture_output=True, timeout=90)
        shutil.rmtree(home, ignore_errors=True)


def status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def out_log(pm2: Pm2, name: str) -> list[dict[str, Any]]:
    path = Path(pm2.app(name)["pm2_env"]["pm_out_log_path"])
    records = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line[line.index("{"):]))
        except ValueError:
            continue
    return records


@pytest.mark.slow
async def test_pm2_restarts_killed_worker_and_stops_gracefully(
        pm2: tuple[Pm2, dict[str, str], str], client: Client) -> None:
    manager, settings, name = pm2
    status_file = Path(settings["WORKER_STATUS_FILE"])
    manager.run("start", str(ECOSYSTEM))
    first = await poll(lambda: status(status_file).get("state") == "ready"
                       and status(status_file), timeout=90, what="worker ready under pm2")
    app = manager.app(name)
    assert app["pm2_env"]["status"] == "online"
    assert app["pid"] == first["pid"]
    assert any(str(r.get("event", "")).startswith(READY_LINE) for r in out_log(manager, name))

    queue = Path(settings["TASK_QUEUE_DIR"])
    origin = write_origin_task(queue, "pm2-build")
    handle = await client.start_workflow(
        BUILD_PIPELINE_WORKFLOW,
        BuildPipelineInput(build_name="pm2-build", plan_path="/plans/p.md", task_id=origin,
                           target_agent="builder"),
        id=f"pm2-{uuid.uuid4()}", task_queue=settings["TASK_QUEUE"],
        result_type=BuildPipelineResult)
    await play_stage(queue, handle.id, TASK_BUILD_PREFAB, settings)
    implement = await wait_for_task(queue, handle.id, TASK_BUILD_PLAN, timeout=60)

    os.kill(first["pid"], signal.SIGKILL)
    second = await poll(lambda: status(status_file).get("state") == "ready"
                        and status(status_file)["pid"] != first["pid"]
                        and status(status_file), timeout=90, what="pm2 restart")
    app = manager.app(name)
    assert app["pm2_env"]["restart_time"] >= 1
    assert app["pid"] == second["pid"]
    await complete_task(implement, settings)
    audit_dir = Path(settings["TEMPORAL_AUDIT_DIR"]) / AUDIT_REQUESTS_DIR / "pm2-build"
    audit_dir.mkdir(parents=True, exist_ok=True)
    (audit_dir / "triage-output.yml").write_text("info: []\n")
    await play_stage(queue, handle.id, TASK_SECURITY_AUDIT, settings)
    await play_stage(queue, handle.id, TASK_BUILD_CLOSEOUT, settings)
    result: BuildPipelineResult = await handle.result()
    assert result.outcome == "success"

    kill_timeout = app["pm2_env"]["kill_timeout"] / 1000
    begun = time.monotonic()
    manager.run("stop", name)
    took = time.monotonic() - begun
    assert took < kill_timeout
    assert status(status_file)["state"] == "stopped"
    events = [r.get("event") for r in out_log(manager, name)]
    assert "shutdown_requested" in events
    assert "worker_stopped" in events
    assert manager.app(name)["pm2_env"]["status"] == "stopped"


@pytest.mark.slow
async def test_pm2_runs_the_agent_host_app_alone(pm2: tuple[Pm2, dict[str, str], str],
                                                 tmp_path: Path) -> None:
    """On an agent-only host: `--only` the agent-host app, from its own env file; it
    serves its host's queue as an agent host, and the main app is not started."""
    manager, settings, main_name = pm2
    agent_env = tmp_path / "agent-host.env"
    status_file = tmp_path / "agent-status.json"
    agent_env.write_text(
        f"TEMPORAL_ADDRESS={settings['TEMPORAL_ADDRESS']}\n"
        f"TASK_QUEUE={settings['TASK_QUEUE']}.host\n"
        f"WORKFLOW_TASK_QUEUE={settings['TASK_QUEUE']}\n"
        f"TASK_QUEUE_DIR={tmp_path / 'host-queue'}\nTEMPORAL_AUDIT_DIR={tmp_path / 'host-audit'}\n"
        f"WORKER_STATUS_FILE={status_file}\n")
    name = f"{main_name}-host"
    manager.env.update(AGENT_HOST_ENV_FILE=str(agent_env), PM2_AGENT_HOST_APP_NAME=name)
    manager.run("start", str(ECOSYSTEM), "--only", name)
    ready = await poll(lambda: status(status_file).get("state") == "ready"
                       and status(status_file), timeout=90, what="agent host ready under pm2")
    assert ready["task_queue"] == f"{settings['TASK_QUEUE']}.host"
    assert manager.app(name)["pm2_env"]["status"] == "online"
    started = [r for r in out_log(manager, name)
               if str(r.get("event", "")).startswith(READY_LINE)]
    assert started[-1]["role"] == "agent-host"
    names = [proc["name"] for proc in json.loads(manager.run("jlist").stdout)]
    assert main_name not in names
