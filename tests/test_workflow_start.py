"""tools/temporal-workflow-start.sh as the platform's dispatcher runs it (PROTOCOL.md §5.4):
installed by a link at ~/scripts/ and called by the dispatcher's tick (the stand-in in
standins/task_tools.py: `<workflow_type> <workflow_id> <input_json>` built from a
`workflow` task, 30 s limit, output into its log, `in-progress` or a routing failure) in
the dispatcher's environment, not the worker's: the settings come from the worker's env
file. A real dev server and a real worker process; the agents played by standins/agents.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

import policies
from config import ENV_FIELDS, load_config
from dispatcher.start_request import parse_request, pipeline_input, plan_input
from exceptions import StartRefusedError
from models import BuildPipelineResult, BuildPlanResult, PipelineStatus
from standins.agents import StandIn, play_stage
from standins.platform_play import PlatformAgents
from standins.task_tools import Dispatcher, TaskTools
from tests.conftest import make_env
from tests.mtls import (
    CLIENT_NAME,
    make_approle,
    make_pki,
    openbao,
    tls_proxy,
    vault_env,
    worker_secret,
    write_secret_id_file,
)
from tests.worker_process import WorkerProcess
from tools.devserver import free_port
from vocabulary import (
    BUILD_PIPELINE_WORKFLOW,
    BUILD_PLAN_WORKFLOW,
    CLOSE_BUILD,
    DIALECT_PLATFORM,
    RUN_LINK,
    STATUS_QUERY,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PHASE,
    TASK_WORKFLOW,
)

REPO = Path(__file__).resolve().parent.parent
DISPATCHER_TIMEOUT = 30.0
# The roster fixture of the dispatcher (PROTOCOL.md §5.7).
ROSTER = """\
sysadmin:
  project_dir: ~/.claude/projects/sysadmin
developer:
  project_dir: ~/.claude/projects/developer
research:
  project_dir: ~/.claude/projects/research
writer:
  project_dir: ~/.claude/projects/writer
security:
  project_dir: ~/.claude/projects/security
steward:
  project_dir: ~/.claude/projects/steward
  run_as_user: agent-steward
  launcher: /usr/local/sbin/forge/run-steward.sh
"""
NO_BLOCKS = "flags:\n  - Pin the base image to a digest\n"


# ---- the dispatcher: ticks of standins/task_tools.py's stand-in ------------------------

@dataclass
class Launch:
    returncode: int | None  # None: the dispatcher refused the task without calling the script
    output: str  # what the script wrote (stdout and stderr), as the dispatcher logs it
    seconds: float
    workflow_id: str
    status: str  # the task's status after the tick
    reason: str  # the routing failure the dispatcher recorded, if any


def tick(platform: Platform, path: Path, **env: str) -> Launch:
    """One dispatcher tick over the queue in the dispatcher's environment (plus `env`):
    what it did with the `workflow` task at `path`."""
    task_id = yaml.safe_load(path.read_text())["id"]
    log = platform.logs / f"temporal-start-{task_id[:8]}.log"
    offset = log.stat().st_size if log.exists() else 0
    dispatcher = Dispatcher(platform.queue_dir, start_script=platform.script,
                            log_dir=platform.logs)
    with mock.patch.dict(os.environ, env):
        started = time.monotonic()
        dispatcher.tick()
        seconds = time.monotonic() - started
    launch = next((item for item in dispatcher.launches if item["task_id"] == task_id), {})
    record = yaml.safe_load(path.read_text())
    return Launch(launch.get("returncode"),
                  log.read_bytes()[offset:].decode() if log.exists() else "", seconds,
                  launch["argv"][2] if "argv" in launch else "", record["status"],
                  record["retry_policy"].get("last_failure_reason") or "")


def run_script(argv: list[str], **env: str) -> Launch:
    """The script called by hand, in the dispatcher's environment (plus `env`)."""
    started = time.monotonic()
    done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=DISPATCHER_TIMEOUT, stdin=subprocess.DEVNULL, cwd="/")
    return Launch(done.returncode, done.stdout + done.stderr, time.monotonic() - started,
                  argv[2], "", "")


def file_workflow_task(queue_dir: Path, **payload: Any) -> tuple[Path, str]:
    """A planning agent's `workflow` task, as the platform writes it; (path, id)."""
    task_id = str(uuid.uuid4())
    created = datetime.now(UTC)
    task = {"id": task_id, "created": created, "source_agent": "planner",
            "target_agent": "temporal", "task_type": TASK_WORKFLOW, "risk_level": "low",
            "requires_approval": False, "workflow_mode": "auto", "status": "submitted",
            "summary": f"Build {payload.get('plan_name')}", "ttl_days": 30,
            "payload": {"description": "", "context_refs": [], "priority": "normal",
                        **payload},
            "result": {"output": None, "completed_by": None, "completed_at": None},
            "history": [{"timestamp": datetime.now(UTC), "status": "submitted",
                         "actor": "planner", "note": "Task submitted via task-queue-mcp"}],
            "retry_policy": {"next_retry_at": None, "retry_count": 0}}
    queue_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = queue_dir / f"{created:%Y%m%d-%H%M%S}-{task_id[:8]}.yml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    path.chmod(0o600)
    return path, task_id


# ---- the setting: worker settings in its env file, the script linked into ~/scripts ----

@dataclass
class Platform:
    root: Path
    worker_env: dict[str, str]  # the worker's (pm2's) environment
    env_file: Path  # the worker's env file: the script's only source of settings
    script: Path  # ~/scripts/temporal-workflow-start.sh, a link
    logs: Path  # the dispatcher's ~/.pm2/logs

    @property
    def queue_dir(self) -> Path:
        return Path(self.worker_env["TASK_QUEUE_DIR"])


WORKER_SETTINGS = ("TEMPORAL_ADDRESS", "TASK_QUEUE", "TASK_QUEUE_DIR", "TEMPORAL_AUDIT_DIR",
                   "SUMMARY_DIR", "PREFAB_AGENT", "SECURITY_AGENT", "DEFAULT_TARGET_AGENT",
                   "PLAN_DIR", "AGENT_ROSTER_FILE", "TASK_FILE_DIALECT")


def write_env_file(path: Path, values: Mapping[str, str]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    path.chmod(0o600)
    return path


@pytest.fixture
def platform(tmp_path: Path, temporal_address: str, monkeypatch: pytest.MonkeyPatch,
             request: pytest.FixtureRequest) -> Platform:
    """The worker's settings in its env file, the script linked into ~/scripts as
    docs/operations.md says, and this process's environment made the dispatcher's: its
    HOME, WORKER_ENV_FILE, none of the worker's variables."""
    home = tmp_path / "home"
    (home / "scripts").mkdir(parents=True)
    script = home / "scripts" / "temporal-workflow-start.sh"
    script.symlink_to(REPO / "tools" / "temporal-workflow-start.sh")
    roster = home / "scripts" / "agent-launch.yml"
    roster.write_text(ROSTER)
    dialect = request.node.get_closest_marker("dialect")
    env = make_env(tmp_path, temporal_address, PREFAB_AGENT="developer",
                   SECURITY_AGENT="security", DEFAULT_TARGET_AGENT="developer",
                   PLAN_DIR=str(tmp_path / "plans"), AGENT_ROSTER_FILE=str(roster),
                   **({"TASK_FILE_DIALECT": dialect.args[0]} if dialect else {}))
    env_file = write_env_file(tmp_path / "worker.env",
                              {name: env[name] for name in WORKER_SETTINGS})
    for name in ENV_FIELDS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WORKER_ENV_FILE", str(env_file))
    logs = home / ".pm2" / "logs"
    logs.mkdir(parents=True)
    return Platform(tmp_path, env, env_file, script, logs)


@pytest.fixture
def worker(platform: Platform) -> Iterator[WorkerProcess]:
    process = WorkerProcess(platform.worker_env, platform.root / "worker.log").start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


async def assert_not_started(client: Client, workflow_id: str) -> None:
    with pytest.raises(RPCError) as caught:
        await client.get_workflow_handle(workflow_id).describe()
    assert caught.value.status == RPCStatusCode.NOT_FOUND


def refused(launch: Launch, code: int, *words: str, by_hand: bool = False) -> None:
    """Non-zero within the limit, one line naming the problem; a routing failure."""
    assert launch.returncode == code, (launch.returncode, launch.output)
    assert launch.seconds < DISPATCHER_TIMEOUT
    lines = launch.output.splitlines()
    assert len(lines) == 1, launch.output
    assert lines[0].startswith("temporal-workflow-start: "), lines
    for word in words:
        assert word in lines[0], lines[0]
    if not by_hand:
        assert (launch.status, launch.reason) == (
            "routing-failed", f"temporal-workflow-start.sh exited {code}")


# ---- runs started the dispatcher's way ---------------------------------------------------

@pytest.mark.usefixtures("worker")
async def test_a_workflow_task_runs_a_pipeline_to_complete(platform: Platform,
                                                           client: Client) -> None:
    path, task_id = file_workflow_task(
        platform.queue_dir, workflow_type=BUILD_PIPELINE_WORKFLOW, plan_name="web-portal",
        description="Build the web portal\nwith SSO", context_refs=["/srv/plans/sso.md"],
        originating_task_id=str(uuid.uuid4()))
    launch = await asyncio.to_thread(tick, platform, path)
    assert launch.returncode == 0, launch.output
    assert launch.seconds < DISPATCHER_TIMEOUT
    assert launch.workflow_id == f"web-portal-{task_id[:8]}"
    assert launch.output.startswith(
        f"temporal-workflow-start: started {BUILD_PIPELINE_WORKFLOW} {launch.workflow_id}")
    assert launch.status == "in-progress"

    handle = client.get_workflow_handle(launch.workflow_id, result_type=BuildPipelineResult)
    description = await handle.describe()
    assert await description.static_summary() == "Build the web portal with SSO"
    started = await first_input(client, launch.workflow_id)
    assert started == {**started, "build_name": "web-portal", "task_id": task_id,
                       "plan_path": str(platform.root / "plans" / "web-portal.md"),
                       "target_agent": "developer"}
    agents = StandIn(queue_dir=platform.queue_dir,
                     audit_dir=Path(platform.worker_env["TEMPORAL_AUDIT_DIR"]),
                     env=platform.worker_env, work_dir=platform.root / "closeouts",
                     workflow_id=launch.workflow_id, triage=lambda _build: NO_BLOCKS)
    done = await agents.run(until=TASK_BUILD_CLOSEOUT, timeout=120)
    assert done[:2] == ["build_prefab", "build_plan"]
    result = await handle.result()
    assert (result.status, result.outcome) == ("complete", "success")
    status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
    assert status.warnings == []  # the filing task was found as the originating task
    assert status.agents == {"target": "developer", "prefab": "developer",
                             "security": "security"}


@pytest.mark.dialect(DIALECT_PLATFORM)
@pytest.mark.usefixtures("worker")
async def test_the_filing_task_follows_its_run(platform: Platform, client: Client) -> None:
    """The dispatcher rewrites the filing task from its own copy after the start; the
    worker's link to the run lands after that, and the run's end closes the task."""
    path, task_id = file_workflow_task(
        platform.queue_dir, workflow_type=BUILD_PIPELINE_WORKFLOW, plan_name="linked",
        description="Build linked")
    launch = await asyncio.to_thread(tick, platform, path)
    assert (launch.returncode, launch.status) == (0, "in-progress"), launch.output
    handle = client.get_workflow_handle(launch.workflow_id, result_type=BuildPipelineResult)
    run_id = (await handle.describe()).run_id
    tools = TaskTools(platform.queue_dir)
    agents = PlatformAgents(tools, Dispatcher(platform.queue_dir, start_script=platform.script,
                                              log_dir=platform.logs), launch.workflow_id)
    links: list[dict[str, Any]] = []

    def linked() -> bool:
        filing = tools.get_task(task_id)["task"]
        if filing["status"] == "in-progress" and filing.get(RUN_LINK):
            links.append(filing[RUN_LINK])
        return bool(links)

    await agents.run(linked, timeout=90)
    assert links[0]["workflow_id"] == launch.workflow_id
    assert links[0]["run_id"] == run_id
    await agents.run(lambda: CLOSE_BUILD in agents.closed, timeout=90)
    result = await handle.result()
    assert (result.status, result.outcome) == ("complete", "success")
    closed = tools.get_task(task_id)["task"]
    assert closed["status"] == "completed"
    assert closed["result"]["output"] == f"pipeline success; summary {result.summary_path}"
    assert closed[RUN_LINK]["run_id"] == run_id


@pytest.mark.usefixtures("worker")
async def test_a_workflow_task_runs_a_two_phase_plan(platform: Platform, client: Client) -> None:
    phases = [{"number": 1, "agent_type": "developer", "description": "Write the chart"},
              {"number": 2, "agent_type": "writer", "description": "Document it",
               "context_refs": ["/srv/docs/style.md"]}]
    path, task_id = file_workflow_task(
        platform.queue_dir, workflow_type=BUILD_PLAN_WORKFLOW, plan_name="helm-chart",
        description="Chart and docs", context_refs=["/srv/plans/helm-chart.md"],
        phases=phases)
    launch = await asyncio.to_thread(tick, platform, path)
    assert launch.returncode == 0, launch.output
    assert (launch.workflow_id, launch.status) == (f"helm-chart-{task_id[:8]}", "in-progress")
    first = await play_stage(platform.queue_dir, launch.workflow_id, TASK_BUILD_PHASE,
                             platform.worker_env)
    task = yaml.safe_load(first.read_text())
    assert (task["target_agent"], task["payload"]["context_refs"]) == (
        "developer", ["/srv/plans/helm-chart.md"])
    second = await play_stage(platform.queue_dir, launch.workflow_id, TASK_BUILD_PHASE,
                              platform.worker_env)
    task = yaml.safe_load(second.read_text())
    assert (task["target_agent"], task["payload"]["context_refs"]) == (
        "writer", ["/srv/docs/style.md"])
    result = await client.get_workflow_handle(launch.workflow_id,
                                              result_type=BuildPlanResult).result()
    assert (result.status, result.phases_run) == ("success", 2)


@pytest.mark.dialect(DIALECT_PLATFORM)
@pytest.mark.usefixtures("worker")
async def test_a_plan_filed_as_a_task_is_linked_and_closed(platform: Platform,
                                                          client: Client) -> None:
    phases = [{"number": 1, "agent_type": "developer", "description": "Write the chart"},
              {"number": 2, "agent_type": "writer", "description": "Document it"}]
    path, task_id = file_workflow_task(
        platform.queue_dir, workflow_type=BUILD_PLAN_WORKFLOW, plan_name="closed-plan",
        description="Chart and docs", phases=phases)
    launch = await asyncio.to_thread(tick, platform, path)
    assert launch.returncode == 0, launch.output
    handle = client.get_workflow_handle(launch.workflow_id, result_type=BuildPlanResult)
    assert (await first_input(client, launch.workflow_id))["task_id"] == task_id
    for _phase in phases:
        await play_stage(platform.queue_dir, launch.workflow_id, TASK_BUILD_PHASE,
                         platform.worker_env)
    assert (await handle.result()).phases_run == 2
    closed = TaskTools(platform.queue_dir).get_task(task_id)["task"]
    assert closed["status"] == "completed"
    assert closed["result"]["output"] == "plan success; 2 of 2 phases done"
    assert closed[RUN_LINK]["workflow_id"] == launch.workflow_id


# ---- refusals: non-zero within the limit, one line, nothing started ---------------------

async def test_unknown_workflow_type_is_refused(platform: Platform, client: Client) -> None:
    path, task_id = file_workflow_task(platform.queue_dir, workflow_type="DeployWorkflow",
                                       plan_name="web")
    launch = await asyncio.to_thread(tick, platform, path)
    assert launch.returncode is None  # the dispatcher refuses it itself
    assert launch.reason.startswith("Unknown workflow_type: 'DeployWorkflow'")
    # Called by hand, the script refuses it too.
    launch = await asyncio.to_thread(run_script, [
        str(platform.script), "DeployWorkflow", f"web-{task_id[:8]}",
        json.dumps({"plan_name": "web"})])
    refused(launch, 2, "unknown workflow type 'DeployWorkflow'", by_hand=True)
    await assert_not_started(client, launch.workflow_id)


async def test_bad_plan_name_is_refused(platform: Platform, client: Client) -> None:
    path, task_id = file_workflow_task(platform.queue_dir, plan_name="Web_Portal")
    launch = await asyncio.to_thread(tick, platform, path)
    assert launch.returncode is None  # the dispatcher refuses it itself
    assert launch.reason == "Invalid plan_name for workflow submission: 'Web_Portal'"
    launch = await asyncio.to_thread(run_script, [
        str(platform.script), BUILD_PIPELINE_WORKFLOW, f"Web_Portal-{task_id[:8]}",
        json.dumps({"plan_name": "Web_Portal"})])
    refused(launch, 2, "invalid plan_name 'Web_Portal'", by_hand=True)
    await assert_not_started(client, launch.workflow_id)
    too_long = "a" * 64  # the dispatcher passes it; a build name is at most 63
    path, task_id = file_workflow_task(platform.queue_dir, plan_name=too_long)
    launch = await asyncio.to_thread(tick, platform, path)
    refused(launch, 2, "plan_name", "1-63 chars")
    await assert_not_started(client, launch.workflow_id)


async def test_input_missing_a_required_key_is_refused(platform: Platform,
                                                        client: Client) -> None:
    path, _ = file_workflow_task(platform.queue_dir, plan_name="web")
    # DEFAULT_TARGET_AGENT unset: an empty variable in the environment wins over the file.
    launch = await asyncio.to_thread(tick, platform, path, DEFAULT_TARGET_AGENT="")
    refused(launch, 2, "no target_agent", "DEFAULT_TARGET_AGENT")
    await assert_not_started(client, launch.workflow_id)
    path, _ = file_workflow_task(platform.queue_dir, plan_name="docs",
                                 workflow_type=BUILD_PLAN_WORKFLOW)
    launch = await asyncio.to_thread(tick, platform, path)
    refused(launch, 2, "no phases")
    await assert_not_started(client, launch.workflow_id)
    # No filing task behind the id the workflow id ends with.
    launch = await asyncio.to_thread(run_script, [
        str(platform.script), BUILD_PIPELINE_WORKFLOW, "web-0badc0de",
        json.dumps({"plan_name": "web"})])
    refused(launch, 2, "no readable `workflow` task for plan 'web'", "0badc0de", by_hand=True)
    await assert_not_started(client, launch.workflow_id)


async def test_an_agent_not_on_the_roster_is_refused(platform: Platform,
                                                      client: Client) -> None:
    path, _ = file_workflow_task(platform.queue_dir, plan_name="web",
                                 target_agent="claudebox")
    launch = await asyncio.to_thread(tick, platform, path)
    refused(launch, 2, "target agent 'claudebox' is not on the dispatcher's roster")
    await assert_not_started(client, launch.workflow_id)
    # The worker's own setting for stage 3, and a plan's phase agent.
    path, _ = file_workflow_task(platform.queue_dir, plan_name="api")
    launch = await asyncio.to_thread(tick, platform, path, SECURITY_AGENT="security-agent")
    refused(launch, 2, "security agent 'security-agent'")
    await assert_not_started(client, launch.workflow_id)
    path, _ = file_workflow_task(
        platform.queue_dir, plan_name="guide", workflow_type=BUILD_PLAN_WORKFLOW,
        phases=[{"number": 1, "agent_type": "writer", "description": "a"},
                {"number": 2, "agent_type": "reviewer", "description": "b"}])
    launch = await asyncio.to_thread(tick, platform, path)
    refused(launch, 2, "phase 2 'reviewer'")
    await assert_not_started(client, launch.workflow_id)


async def test_an_id_already_running_is_refused(platform: Platform, client: Client) -> None:
    path, _ = file_workflow_task(platform.queue_dir, plan_name="web")
    first = await asyncio.to_thread(tick, platform, path)
    assert first.returncode == 0, first.output  # no worker: it stays running
    handle = client.get_workflow_handle(first.workflow_id)
    try:
        run_id = (await handle.describe()).run_id
        # The dispatcher's retry of a start it gave up on (PROTOCOL §5.5) that did start.
        task = yaml.safe_load(path.read_text())
        task["status"] = "routing-failed"
        task["retry_policy"].update(retry_count=1, next_retry_at="2026-01-01T00:00:00+00:00")
        path.write_text(yaml.safe_dump(task, sort_keys=False))
        again = await asyncio.to_thread(tick, platform, path)
        refused(again, 3, f"{first.workflow_id!r} is already running")
        description = await handle.describe()
        assert (description.run_id, description.status) == (
            run_id, WorkflowExecutionStatus.RUNNING)
    finally:
        await handle.terminate("test over")


async def test_an_unreachable_server_is_refused(platform: Platform, client: Client) -> None:
    path, _ = file_workflow_task(platform.queue_dir, plan_name="web")
    # The environment wins over the env file, as under pm2.
    launch = await asyncio.to_thread(tick, platform, path,
                                     TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}")
    refused(launch, 4, "cannot connect to Temporal at 127.0.0.1:")
    await assert_not_started(client, launch.workflow_id)


async def test_the_start_connects_with_the_workers_vault_mtls(platform: Platform,
                                                              client: Client) -> None:
    """Only the worker's env file names Vault; the dispatcher's environment has nothing."""
    pki = make_pki()
    with openbao(platform.root / "bao.log") as bao, \
            tls_proxy(platform.worker_env["TEMPORAL_ADDRESS"], pki, platform.root) as proxy:
        role = make_approle(bao)
        bao.write_worker_secret(worker_secret(pki))
        secret_id_file = write_secret_id_file(platform.root, role.secret_id)
        settings = {name: platform.worker_env[name] for name in WORKER_SETTINGS}
        write_env_file(platform.env_file, {
            **settings, **vault_env(bao, role, secret_id_file, proxy.address)})
        path, _ = file_workflow_task(platform.queue_dir, plan_name="web")
        launch = await asyncio.to_thread(tick, platform, path)
        assert launch.returncode == 0, launch.output
        assert CLIENT_NAME in proxy.log.accepted
        for secret in (role.role_id, role.secret_id, bao.root_token,
                       pki.client.key_pem.splitlines()[1]):
            assert secret not in launch.output
    handle = client.get_workflow_handle(launch.workflow_id)
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    await handle.terminate("test over")


@pytest.fixture
def silent_port() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


async def test_a_server_that_never_answers_is_given_up_within_the_limit(
        platform: Platform, client: Client, silent_port: str) -> None:
    """Temporal, then Vault (its request hangs in a thread), accepting and then silent."""
    secret_id_file = write_secret_id_file(platform.root, "s-1")
    silent_vault = {"VAULT_ADDR": f"http://{silent_port}", "VAULT_ROLE_ID": "r-1",
                    "VAULT_SECRET_ID_FILE": str(secret_id_file)}
    for extra in ({"TEMPORAL_ADDRESS": silent_port}, silent_vault):
        path, _ = file_workflow_task(platform.queue_dir, plan_name="web")
        launch = await asyncio.to_thread(tick, platform, path, **extra)
        refused(launch, 4, "cannot connect to Temporal at", "no answer within 8s",
                *(["Vault at http://"] if "VAULT_ADDR" in extra else []))
        assert launch.seconds < policies.DISPATCHER_START_DEADLINE.total_seconds()
        await assert_not_started(client, launch.workflow_id)


def test_help_and_usage() -> None:
    script = str(REPO / "tools" / "temporal-workflow-start.sh")
    shown = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0
    assert "Exit codes: 0 the run has started" in shown.stdout
    wrong = subprocess.run([script, BUILD_PIPELINE_WORKFLOW, "web-0123abcd"],
                           capture_output=True, text=True, timeout=30)
    assert (wrong.returncode, wrong.stdout) == (2, "")
    assert wrong.stderr.splitlines() == [
        "temporal-workflow-start: expected 3 arguments, got 2; usage: "
        "temporal-workflow-start.sh <workflow_type> <workflow_id> <input_json>"]


def test_start_build_refuses_an_agent_not_on_the_roster(platform: Platform) -> None:
    env = {**platform.worker_env, "PATH": os.environ["PATH"]}
    done = subprocess.run([str(REPO / "tools" / "start-build"), "--build-name", "web",
                           "--plan-path", "/srv/plans/web.md", "--task-id", "t-1",
                           "--target-agent", "claudebox"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"start-build: refused: target agent 'claudebox' is not on the dispatcher's roster "
        f"(AGENT_ROSTER_FILE {platform.worker_env['AGENT_ROSTER_FILE']}: developer, "
        f"research, security, steward, sysadmin, writer)"]


def test_worker_warns_about_each_stage_agent_not_on_the_roster(platform: Platform) -> None:
    env = {**platform.worker_env, "PREFAB_AGENT": "claudebox",
           "DEFAULT_TARGET_AGENT": "builder"}
    done = subprocess.run([sys.executable, str(REPO / "worker.py"), "--check-config"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    warned = [(r["level"], r.get("setting"), r.get("agent")) for r in records
              if r.get("event") == "stage_agent_not_on_roster"]
    assert warned == [("WARNING", "PREFAB_AGENT", "claudebox"),
                      ("WARNING", "DEFAULT_TARGET_AGENT", "builder")]


# ---- the mapping itself ------------------------------------------------------------------

def test_the_mapping_defaults_overrides_and_ignored_keys(tmp_path: Path) -> None:
    config = load_config({"HOME": str(tmp_path), "PLAN_DIR": "~/plans",
                          "DEFAULT_TARGET_AGENT": "developer"})
    wid = "web-0123abcd"
    fields = parse_request(BUILD_PIPELINE_WORKFLOW, wid, json.dumps(
        {"plan_name": "web", "description": "d", "priority": "urgent", "amendments": [],
         "originating_task_id": str(uuid.uuid4()), "context_refs": ["/x"]}))
    inp = pipeline_input(fields, "tid-1", config)
    assert (inp.build_name, inp.plan_path, inp.target_agent, inp.task_id) == (
        "web", str(tmp_path / "plans" / "web.md"), "developer", "tid-1")
    fields.update(plan_path="/srv/web.md", target_agent="builder", prefab_agent="sysadmin",
                  agent_timeout_seconds=60)
    inp = pipeline_input(fields, "tid-1", config)
    assert (inp.plan_path, inp.target_agent, inp.prefab_agent, inp.agent_timeout_seconds) == (
        "/srv/web.md", "builder", "sysadmin", 60)
    absolute = re.escape("plan_path 'relative.md' must be an absolute")
    with pytest.raises(StartRefusedError, match=absolute):
        pipeline_input({**fields, "plan_path": "relative.md"}, "tid-1", config)
    with pytest.raises(StartRefusedError, match=r"^input is not JSON"):
        parse_request(BUILD_PIPELINE_WORKFLOW, wid, "{")
    with pytest.raises(StartRefusedError, match="not <plan_name>-<id8>"):
        parse_request(BUILD_PIPELINE_WORKFLOW, "api-0123abcd", '{"plan_name": "web"}')
    plan = plan_input({"plan_name": "p", "context_refs": ["/c"], "phases": [
        {"number": 1, "agent_type": "writer", "description": "x"}]})
    assert plan.phases[0].context_refs == ["/c"]
    with pytest.raises(StartRefusedError, match=re.escape("phases.0.agent_type")):
        plan_input({"plan_name": "p", "phases": [{"number": 1, "agent_type": "Bad",
                                                  "description": "x"}]})


# ---- helpers -------------------------------------------------------------------------------

async def first_input(client: Client, workflow_id: str) -> dict[str, Any]:
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        attributes = event.workflow_execution_started_event_attributes
        return json.loads(attributes.input.payloads[0].data)
    raise AssertionError("no history")
