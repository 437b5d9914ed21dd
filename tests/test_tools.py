"""The operator tools in tools/, run as operators run them (tools/ops and the links named
after its commands, as separate processes) against a real dev server: process lifecycle by
PID file, workers seen whoever started them, workflow monitoring and troubleshooting, the
`temporal` pass-through (plain and with Vault mTLS), start-build / approve-build /
reject-build round trips."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.worker import Worker

from exceptions import InvalidInputError
from models import BuildPlanInput, PhaseSpec, StageEvent, StageTiming
from standins.agents import (
    complete_task,
    complete_with_token,
    load_yaml,
    play_stage,
    poll,
    tasks_for,
    wait_for_task,
    wait_until_parked,
    write_origin_task,
)
from taskfiles.documents import add_history
from taskfiles.lookup import find_task, update_task
from tests.agents import SCHEMA_PATH
from tests.conftest import PipelineEnv, make_env
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
from tools import devserver
from tools.common import proc_start_ticks
from vocabulary import (
    BUILD_PIPELINE_WORKFLOW,
    BUILD_PLAN_WORKFLOW,
    INPUT_REQUIRED,
    SUBMITTED,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PHASE,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
    WAIT_FOR_BLOCK_RESOLUTION,
)
from workflows.timings import time_report

REPO = Path(__file__).resolve().parent.parent
TOOLS = ["ensure-server", "ensure-worker", "kill-worker", "kill-all-workers", "list-workers",
         "monitor-worker-health", "list-recent-workflows", "find-stalled-workflows",
         "wait-for-workflow-status", "get-workflow-result", "analyze-workflow-error",
         "bulk-cancel-workflows", "start-build", "approve-build", "reject-build",
         "request-changes", "time-report", "ops"]
ALIASES = [name for name in TOOLS if name != "ops"] + ["temporal"]


def tool(name: str, *args: str, env: dict[str, str],
         timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "tools" / name), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


async def atool(name: str, *args: str, env: dict[str, str],
                timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run a tool without blocking the event loop (the in-process worker lives on it)."""
    return await asyncio.to_thread(tool, name, *args, env=env, timeout=timeout)


def ops_env(base: dict[str, str], root: Path, **extra: str) -> dict[str, str]:
    env = dict(base)
    env.update({"CLAUDE_TEMPORAL_PID_DIR": str(root / "pids"),
                "CLAUDE_TEMPORAL_LOG_DIR": str(root / "logs"),
                "CLAUDE_TEMPORAL_PROJECT_NAME": "toolstest"}, **extra)
    return env


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process these tools did not start; nothing may ever signal it."""
    process = subprocess.Popen(["sleep", "300"])
    yield process
    process.kill()
    process.wait()


def test_every_tool_has_help_with_exit_codes() -> None:
    env = dict(os.environ)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda name: (name, tool(name, "--help", env=env)), TOOLS))
    schemes = set()
    for name, result in results:
        assert result.returncode == 0, (name, result.stderr)
        assert f"tools/{name}" in result.stdout, name
        assert "exit codes" in result.stdout, name
        schemes.add(" ".join(result.stdout.partition("exit codes")[2].split()))
    assert len(schemes) == 1, schemes  # one exit-code scheme, the same text everywhere
    assert tool("ops", "no-such-command", env=env).returncode == 2
    # A usage error is one line on stderr, named like the command that was run.
    for args, line in [
        (["wait-for-workflow-status"], "wait-for-workflow-status: the following arguments "
                                       "are required: --workflow-id, --status"),
        (["start-build", "--nope"], "start-build: unrecognized arguments: --nope"),
        (["start-build", "--build-name", "b", "--plan-path", "/p.md", "--task-id", "T-1",
          "--target-agent", "builder", "--wait", "--timeout", "-1"],
         "start-build: --timeout -1: must be more than 0 seconds"),
    ]:
        refused = tool(*args, env={**env, "TEMPORAL_ADDRESS": "127.0.0.1:1"})
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.splitlines() == [line]
        assert not refused.stdout  # nothing was started
    # Every name is a link to the one shim, which dispatches on the name it was run by.
    for name in ALIASES:
        assert os.readlink(REPO / "tools" / name) == "ops", name


def test_server_lifecycle_by_pid_file(tmp_path: Path, temporal_address: str,
                                      bystander: subprocess.Popen[bytes]) -> None:
    shared = ops_env(dict(os.environ), tmp_path, TEMPORAL_ADDRESS=temporal_address)
    result = tool("ops", "ensure-server", env=shared)
    assert result.returncode == 0
    assert "not started by these tools" in result.stdout
    assert not (tmp_path / "pids" / "server-toolstest.pid").exists()

    port = devserver.free_port()
    env = ops_env(dict(os.environ), tmp_path, TEMPORAL_ADDRESS=f"127.0.0.1:{port}")
    result = tool("ensure-server", "--ui-port", str(devserver.free_port()), env=env)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "pids" / "server-toolstest.pid").read_text())
    assert f"pid {record['pid']}" in result.stdout
    assert proc_start_ticks(record["pid"]) == record["start_ticks"]
    again = tool("ensure-server", env=env)
    assert again.returncode == 0
    assert f"started by these tools, pid {record['pid']}" in again.stdout

    result = tool("kill-all-workers", "--include-server", env=env)
    assert result.returncode == 0
    assert f"pid {record['pid']} stopped" in result.stdout
    assert proc_start_ticks(record["pid"]) is None
    assert not devserver.is_listening("127.0.0.1", port)
    assert not (tmp_path / "pids" / "server-toolstest.pid").exists()
    assert bystander.poll() is None


def test_worker_lifecycle_and_health(tmp_path: Path, pipeline_env_vars: dict[str, str],
                                     bystander: subprocess.Popen[bytes]) -> None:
    env = ops_env(pipeline_env_vars, tmp_path)
    assert tool("list-workers", env=env).returncode == 1  # none yet
    started = tool("ensure-worker", env=env)
    assert started.returncode == 0, started.stderr
    first = json.loads((tmp_path / "pids" / "worker-toolstest.pid").read_text())
    assert proc_start_ticks(first["pid"]) == first["start_ticks"]
    listing = tool("list-workers", env=env)
    assert listing.returncode == 0
    assert str(first["pid"]) in listing.stdout
    assert "running" in listing.stdout
    assert "Worker started, listening on task queue" in \
        (tmp_path / "logs" / "worker-toolstest.log").read_text()

    def healthy() -> subprocess.CompletedProcess[str] | None:
        result = tool("monitor-worker-health", env=env)
        return result if result.returncode == 0 else None

    health = asyncio.run(poll(healthy, timeout=30, interval=0.5, what="healthy worker"))
    assert "HEALTHY" in health.stdout
    assert f":{first['pid']}" in health.stdout

    replaced = tool("ensure-worker", env=env)
    assert replaced.returncode == 0, replaced.stderr
    assert f"pid {first['pid']} stopped" in replaced.stdout
    second = json.loads((tmp_path / "pids" / "worker-toolstest.pid").read_text())
    assert second["pid"] != first["pid"]
    assert proc_start_ticks(first["pid"]) is None

    # A PID file whose PID now names another process (here: the bystander): only the file
    # goes, the process is left alone.
    foreign = tmp_path / "pids" / "worker-other.pid"
    foreign.write_text(json.dumps({**second, "pid": bystander.pid, "project": "other",
                                   "start_ticks": 1}))
    result = tool("kill-worker", env=env)
    assert result.returncode == 0
    assert f"pid {second['pid']} stopped" in result.stdout
    assert proc_start_ticks(second["pid"]) is None
    result = tool("kill-all-workers", env=env)
    assert result.returncode == 0
    assert "stale PID file removed" in result.stdout
    assert not foreign.exists()
    assert bystander.poll() is None
    assert tool("list-workers", env=env).returncode == 1
    unhealthy = tool("monitor-worker-health", env=env)
    assert unhealthy.returncode == 1
    assert "UNHEALTHY" in unhealthy.stdout


def test_worker_tools_when_temporal_cannot_be_reached(tmp_path: Path,
                                                     pipeline_env_vars: dict[str, str]) -> None:
    """The pollers are then unknown: said once, not taken for "no worker polls"."""
    env = ops_env({**pipeline_env_vars,
                   "TEMPORAL_ADDRESS": f"127.0.0.1:{devserver.free_port()}"}, tmp_path)
    health = tool("monitor-worker-health", env=env)
    assert health.returncode == 1, health.stderr
    verdicts = [line for line in health.stdout.splitlines() if line.startswith("UNHEALTHY")]
    assert len(verdicts) == 1, health.stdout
    assert verdicts[0].startswith("UNHEALTHY: pollers unknown: cannot connect to Temporal")
    listing = tool("list-workers", env=env)
    assert listing.returncode == 1
    assert any(row.startswith("poller") and " unknown " in row
               for row in listing.stdout.splitlines()), listing.stdout


@pytest.mark.slow
async def test_monitoring_tools_on_completed_and_failed_workflows(
        pipeline: PipelineEnv) -> None:
    env = ops_env(pipeline.env, pipeline.root)
    started = await atool("start-build", "--plan-name", "tool-plan", "--phase",
                          "1:builder:Scaffold the service", env=env)
    assert started.returncode == 0, started.stderr
    plan_id = started.stdout.strip()
    assert plan_id.startswith("plan-tool-plan-")
    handle = pipeline.client.get_workflow_handle(plan_id)
    assert await (await handle.describe()).static_summary() == "plan tool-plan: 1 phase(s)"
    details = await (await handle.describe()).static_details()
    assert details is not None
    assert "tools/start-build" in details
    assert "`builder`" in details

    waited = await atool("wait-for-workflow-status", "--workflow-id", plan_id, "--status",
                         "COMPLETED", "--timeout", "1", env=env)
    assert waited.returncode == 5
    assert "still RUNNING" in waited.stderr
    pending = await atool("get-workflow-result", "--workflow-id", plan_id, env=env)
    assert pending.returncode == 1
    assert "still RUNNING" in pending.stderr
    await play_stage(pipeline.queue_dir, plan_id, TASK_BUILD_PHASE, pipeline.env)
    waited = await atool("wait-for-workflow-status", "--workflow-id", plan_id, "--status",
                         "COMPLETED", "--timeout", "30", env=env)
    assert waited.returncode == 0, waited.stderr
    result = await atool("get-workflow-result", "--workflow-id", plan_id, env=env)
    assert result.returncode == 0
    assert "COMPLETED" in result.stdout
    raw = await atool("get-workflow-result", "--workflow-id", plan_id, "--raw", env=env)
    assert raw.returncode == 0
    assert json.loads(raw.stdout) == {"status": "success",
                                                              "phases_run": 1}
    clean = await atool("analyze-workflow-error", "--workflow-id", plan_id, env=env)
    assert clean.returncode == 0
    assert "no errors found" in clean.stdout

    failed = await pipeline.start(BUILD_PIPELINE_WORKFLOW, {
        "build_name": "Bad Name", "plan_path": "/p.md", "task_id": "t", "target_agent": "b"},
        workflow_id=f"bad-input-{uuid.uuid4().hex[:6]}")
    waited = await atool("wait-for-workflow-status", "--workflow-id", failed.id, "--status",
                         "COMPLETED", "--timeout", "30", env=env)
    assert waited.returncode == 1
    assert "closed as FAILED" in waited.stderr
    result = await atool("get-workflow-result", "--workflow-id", failed.id, env=env)
    assert result.returncode == 1
    assert "FAILED" in result.stderr
    assert InvalidInputError.failure_type in result.stderr
    analysis = await atool("analyze-workflow-error", "--workflow-id", failed.id, env=env)
    assert analysis.returncode == 1
    assert "WorkflowExecutionFailed: InvalidInputError: invalid BuildPipelineInput: " \
           "build_name" in analysis.stdout
    assert "fix the input" in analysis.stdout

    recent = await atool("list-recent-workflows", "--minutes", "5", env=env)
    assert recent.returncode == 0
    lines = recent.stdout.splitlines()
    assert any(plan_id in line and "COMPLETED" in line for line in lines)
    assert any(failed.id in line and "FAILED" in line for line in lines)
    missing = await atool("get-workflow-result", "--workflow-id", "no-such-workflow", env=env)
    assert missing.returncode == 3
    assert "not found" in missing.stderr
    unreachable = {**env, "TEMPORAL_ADDRESS": f"127.0.0.1:{devserver.free_port()}"}
    down = await atool("list-recent-workflows", env=unreachable)
    assert down.returncode == 4
    assert "cannot connect" in down.stderr


@workflow.defn(name=BUILD_PIPELINE_WORKFLOW, sandboxed=False)
class FakeBrokenPipelineWorkflow:
    """A fake, registered under the real name on its own queue: its code raises a plain
    exception, which fails every workflow task (the real workflow has no such bug)."""

    @workflow.run
    async def run(self, _raw_input: Any) -> None:
        raise RuntimeError("simulated bug in workflow code")


async def test_analysis_shows_an_agent_message_never_as_terminal_codes(
        pipeline: PipelineEnv) -> None:
    """An agent fails its stage with a message built to erase the real status line on
    the operator's terminal and print a reassuring one instead."""
    env = ops_env(pipeline.env, pipeline.root)
    handle = await pipeline.start(BUILD_PIPELINE_WORKFLOW, {
        "build_name": "forged", "plan_path": "/p.md",
        "task_id": write_origin_task(pipeline.queue_dir), "target_agent": "builder"},
        workflow_id=f"forged-{uuid.uuid4().hex[:6]}")
    prefab = await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PREFAB)
    forged = "\x1b[2K\r\x1b[1Aforged: COMPLETED\nno errors found in the history\u202e\x1b[8m"
    await complete_with_token(pipeline.client, load_yaml(prefab), "failed", forged)
    waited = await atool("wait-for-workflow-status", "--workflow-id", handle.id, "--status",
                         "FAILED", "--timeout", "30", env=env)
    assert waited.returncode == 0, waited.stderr

    analysis = await atool("analyze-workflow-error", "--workflow-id", handle.id, env=env)
    assert analysis.returncode == 1
    assert not set("\x1b\r\u202e") & set(analysis.stdout), analysis.stdout
    assert "no errors found in the history" not in analysis.stdout.splitlines()
    shown = "\\x1b[2K\\r\\x1b[1Aforged: COMPLETED\\nno errors found in the history\\u202e"
    assert shown in analysis.stdout
    assert "status FAILED" in analysis.stdout.splitlines()[0]


async def test_stalled_workflow_found_explained_and_terminated(pipeline: PipelineEnv,
                                                               client: Client) -> None:
    env = ops_env(pipeline.env, pipeline.root)
    broken_queue = f"broken-{uuid.uuid4().hex[:8]}"
    stalled_id = f"stalled-{uuid.uuid4().hex[:8]}"
    healthy = await pipeline.start(BUILD_PLAN_WORKFLOW, BuildPlanInput(
        plan_name="healthy", phases=[PhaseSpec(number=1, agent_type="builder",
                                               description="wait for me")]))
    await wait_for_task(pipeline.queue_dir, healthy.id, TASK_BUILD_PHASE)
    query = f"WorkflowId = '{stalled_id}' OR WorkflowId = '{healthy.id}'"
    async with Worker(client, task_queue=broken_queue, workflows=[FakeBrokenPipelineWorkflow]):
        await client.start_workflow(BUILD_PIPELINE_WORKFLOW, {"build_name": "x"},
                                    id=stalled_id, task_queue=broken_queue)

        async def listed() -> subprocess.CompletedProcess[str] | None:
            result = await atool("find-stalled-workflows", "--query", query, env=env)
            return result if result.returncode == 1 else None

        deadline = asyncio.get_running_loop().time() + 30
        found = None
        while found is None:
            found = await listed()
            assert asyncio.get_running_loop().time() < deadline, "stall never reported"
        assert f"STALLED {stalled_id} (BuildPipelineWorkflow): WorkflowTaskFailed" in found.stdout
        assert "simulated bug in workflow code" in found.stdout
        assert healthy.id not in found.stdout  # waiting on an agent is not a stall
        assert "1 stalled of 2" in found.stdout

        analysis = await atool("analyze-workflow-error", "--workflow-id", stalled_id, env=env)
        assert analysis.returncode == 1
        assert "WorkflowTaskFailed (workflow stalled): RuntimeError: simulated bug in " \
            "workflow code" in analysis.stdout
        assert "no need to terminate" in analysis.stdout

        dry = await atool("bulk-cancel-workflows", "--pattern", "stalled-*", "--query", query,
                          "--terminate", "--dry-run", env=env)
        assert dry.returncode == 0
        assert f"would terminate {stalled_id}" in dry.stdout
        assert healthy.id not in dry.stdout
        done = await atool("bulk-cancel-workflows", "--pattern", "stalled-*", "--query", query,
                           "--terminate", env=env)
        assert done.returncode == 0, done.stderr
        assert f"terminate {stalled_id}" in done.stdout
        assert healthy.id not in done.stdout
        assert "COMPLETED, 1 of 1 done" in done.stdout  # the batch job finished
    status = (await client.get_workflow_handle(stalled_id).describe()).status
    assert status == WorkflowExecutionStatus.TERMINATED
    assert (await healthy.describe()).status == WorkflowExecutionStatus.RUNNING
    cancelled = await atool("bulk-cancel-workflows", "--pattern", healthy.id, env=env)
    assert cancelled.returncode == 0
    assert f"cancel {healthy.id}" in cancelled.stdout
    assert "COMPLETED, 1 of 1 done" in cancelled.stdout
    glob = await atool("bulk-cancel-workflows", "--pattern", "a?c*", env=env)
    assert glob.returncode == 2
    assert "--query" in glob.stderr
    none_left = await atool("find-stalled-workflows", "--query", query, env=env)
    assert none_left.returncode == 0
    assert "0 stalled" in none_left.stdout


async def start_build_waiting(args: list[str], env: dict[str, str]
                              ) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        str(REPO / "tools" / "start-build"), *args, "--wait", "--timeout", "120", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    if not line:
        _, err = await process.communicate()
        raise AssertionError(f"start-build printed no id: {err.decode()}")
    return process, line.decode().strip()


async def park(pipeline: PipelineEnv, workflow_id: str, build: str) -> None:
    await play_stage(pipeline.queue_dir, workflow_id, TASK_BUILD_PREFAB, pipeline.env)
    await play_stage(pipeline.queue_dir, workflow_id, TASK_BUILD_PLAN, pipeline.env)
    audit = await wait_for_task(pipeline.queue_dir, workflow_id, TASK_SECURITY_AUDIT)
    pipeline.write_triage(build, "blocks:\n- description: Secrets in the image\n")
    await complete_task(audit, pipeline.env)
    await wait_until_parked(pipeline.client.get_workflow_handle(workflow_id))


async def test_start_build_from_file_then_approve(pipeline: PipelineEnv) -> None:
    env = ops_env(pipeline.env, pipeline.root)
    task_id = write_origin_task(pipeline.queue_dir)
    build_file = pipeline.root / "build.yml"
    build_file.write_text(f"build_name: approved-tool\nplan_path: /plans/tool.md\n"
                          f"task_id: {task_id}\ntarget_agent: builder\n"
                          f"workflow_id: tool-approve-{uuid.uuid4().hex[:6]}\n")
    process, workflow_id = await start_build_waiting(["--file", str(build_file)], env)
    assert workflow_id.startswith("tool-approve-")
    early = await atool("approve-build", "--workflow-id", workflow_id, env=env)
    assert early.returncode == 1
    assert "not waiting on blocks" in early.stderr
    await park(pipeline, workflow_id, "approved-tool")

    approved = await atool("approve-build", "--workflow-id", workflow_id, "--note",
                           "accepted for now", "--by", "ted", env=env)
    assert approved.returncode == 0, approved.stderr
    assert f"{workflow_id} approved by ted" in approved.stdout
    await play_stage(pipeline.queue_dir, workflow_id, TASK_BUILD_CLOSEOUT, pipeline.env)
    entry = load_yaml(find_task(pipeline.queue_dir, task_id))["history"][-1]
    assert (entry["status"], entry["actor"]) == ("approved", "ted")
    assert "accepted for now" in entry["note"]
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result = json.loads(out.decode())
    assert result["outcome"] == "partial"
    assert result["decision"] == "approved"
    again = await atool("approve-build", "--workflow-id", workflow_id, env=env)
    assert again.returncode == 3
    assert "not found or already closed" in again.stderr


async def test_start_build_from_flags_then_reject(pipeline: PipelineEnv) -> None:
    env = ops_env(pipeline.env, pipeline.root)
    task_id = write_origin_task(pipeline.queue_dir)
    bad = await atool("start-build", "--build-name", "Bad_Name", "--plan-path", "/p.md",
                      "--task-id", task_id, "--target-agent", "builder", env=env)
    assert bad.returncode == 2
    assert "build_name" in bad.stderr
    assert not bad.stdout
    process, workflow_id = await start_build_waiting(
        ["--build-name", "rejected-tool", "--plan-path", "/plans/tool.md", "--task-id",
         task_id, "--target-agent", "builder"], env)
    assert workflow_id.startswith("build-rejected-tool-")
    summary = await (await pipeline.client.get_workflow_handle(workflow_id).describe()
                     ).static_summary()
    assert summary == "build rejected-tool → builder (9 stages)"
    await park(pipeline, workflow_id, "rejected-tool")
    rejected = await atool("reject-build", "--workflow-id", workflow_id, "--reason",
                           "secrets must go", "--by", "ann", env=env)
    assert rejected.returncode == 0, rejected.stderr
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert "outcome is 'rejected'" in err.decode()
    assert json.loads(out.decode())["outcome"] == "rejected"  # ended after the decision
    entry = load_yaml(find_task(pipeline.queue_dir, task_id))["history"][-1]
    assert (entry["status"], entry["actor"]) == ("rejected", "ann")
    assert "secrets must go" in entry["note"]
    result = await atool("get-workflow-result", "--workflow-id", workflow_id, env=env)
    assert result.returncode == 1
    assert "COMPLETED but its result reports a problem" in \
        result.stderr
    assert TASK_BUILD_CLOSEOUT not in [t["task_type"]
                                    for _, t in tasks_for(pipeline.queue_dir, workflow_id)]


async def started_input(client: Client, workflow_id: str) -> dict[str, Any]:
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        attributes = event.workflow_execution_started_event_attributes
        return json.loads(attributes.input.payloads[0].data)
    raise AssertionError("no history")


async def test_start_build_creates_the_originating_task(pipeline: PipelineEnv) -> None:
    env = ops_env(pipeline.env, pipeline.root)
    both = await atool("start-build", "--build-name", "x", "--plan-path", "/p.md", "--task-id",
                       "T-1", "--create-task", "--target-agent", "builder", env=env)
    assert both.returncode == 2
    assert "not both" in both.stderr
    assert not both.stdout
    plan = await atool("start-build", "--plan-name", "p", "--phase", "1:builder:x",
                       "--create-task", env=env)
    assert plan.returncode == 2
    assert "--create-task" in plan.stderr
    assert not pipeline.queue_dir.exists() or not list(pipeline.queue_dir.glob("*.yml"))

    started = await atool("start-build", "--build-name", "created-tool", "--plan-path",
                          "/plans/tool.md", "--create-task", "--target-agent", "builder",
                          "--block-poll-interval-seconds", "0.2", env=env)
    assert started.returncode == 0, started.stderr
    workflow_id = started.stdout.strip()
    task_id = (await started_input(pipeline.client, workflow_id))["task_id"]
    again = await atool("start-build", "--build-name", "created-tool", "--plan-path",
                        "/plans/tool.md", "--create-task", "--target-agent", "builder",
                        "--workflow-id", workflow_id, env=env)
    assert again.returncode == 3, again.stderr
    assert f"{workflow_id!r} is already running" in again.stderr
    assert not again.stdout
    # The second start's originating task went again with its failed start.
    assert [load_yaml(path)["id"] for path in pipeline.queue_dir.glob("*.yml")
            if load_yaml(path)["source_agent"] == "start-build"] == [task_id]
    origin = find_task(pipeline.queue_dir, task_id)
    assert origin.name.endswith(f"-{task_id[:8]}.yml")  # found by name, not by a scan
    assert f"originating task {task_id} written to {origin}" in started.stderr
    assert "warning" not in started.stderr
    document = load_yaml(origin)
    schema = json.loads(SCHEMA_PATH.read_text())
    schema.pop("oneOf")  # the root: either dialect's agent task
    jsonschema.validate(document, {**schema, "$ref": "#/$defs/originatingTask"})
    assert (document["status"], document["target_agent"]) == (SUBMITTED, "temporal-worker")
    assert workflow_id in document["history"][0]["note"]

    # Stages 6 and 7 use it: it is marked input-required, and approving it decides.
    await park(pipeline, workflow_id, "created-tool")
    assert load_yaml(origin)["status"] == INPUT_REQUIRED
    update_task(origin, lambda task: add_history(task, status="approved", actor="ted",
                                                 note="fine"))
    await play_stage(pipeline.queue_dir, workflow_id, TASK_BUILD_CLOSEOUT, pipeline.env)
    result = await asyncio.wait_for(
        pipeline.client.get_workflow_handle(workflow_id).result(), 60)
    assert (result["decision"], result["closeout_path"]) == ("approved", "done")


async def test_start_build_input_larger_than_one_argument(pipeline: PipelineEnv) -> None:
    """An argument may hold 128 KiB; this plan's input is larger (the CLI gets a file)."""
    env = ops_env(pipeline.env, pipeline.root)
    phases = [f"{number}:builder:" + "x" * 19_000 for number in range(1, 8)]
    started = await atool("start-build", "--plan-name", "big-plan",
                          *[arg for phase in phases for arg in ("--phase", phase)], env=env)
    assert started.returncode == 0, started.stderr
    workflow_id = started.stdout.strip()
    try:
        recorded = (await started_input(pipeline.client, workflow_id))["phases"]
        assert [len(phase["description"]) for phase in recorded] == [19_000] * 7
        refused = await atool("reject-build", "--workflow-id", workflow_id, "--reason", "x",
                              env=env)
        assert refused.returncode == 1  # running, but a plan takes no block decisions
        assert "it takes no block decisions" in refused.stderr
    finally:
        await pipeline.client.get_workflow_handle(workflow_id).terminate()


async def test_start_build_warns_when_the_task_id_has_no_file(pipeline: PipelineEnv) -> None:
    env = ops_env(pipeline.env, pipeline.root)
    args = ["--build-name", "warned-tool", "--plan-path", "/plans/tool.md",
            "--target-agent", "builder", "--task-id"]
    missing = await atool("start-build", *args, "no-such-task", env=env)
    known = await atool("start-build", *args, write_origin_task(pipeline.queue_dir), env=env)
    try:
        assert missing.returncode == 0, missing.stderr
        assert missing.stderr.startswith("start-build: warning: no task file with id "
                                         "'no-such-task' in ")
        assert str(pipeline.queue_dir) in missing.stderr
        assert "--create-task" in missing.stderr
        assert known.returncode == 0
        assert known.stderr == ""
    finally:
        for result in (missing, known):
            if result.returncode == 0:
                await pipeline.client.get_workflow_handle(result.stdout.strip()).terminate()


def test_tools_see_a_worker_they_did_not_start(tmp_path: Path,
                                               pipeline_env_vars: dict[str, str]) -> None:
    """A worker started as `make run` or pm2 start it: no PID file of these tools, only its
    WORKER_STATUS_FILE and its pollers on the queue."""
    status_file = tmp_path / "worker-status.json"
    env = ops_env({**pipeline_env_vars, "WORKER_STATUS_FILE": str(status_file)}, tmp_path)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        poller = f"{socket.gethostname()}:{worker.pid}"

        def listed() -> subprocess.CompletedProcess[str] | None:
            result = tool("list-workers", env=env)
            return result if result.returncode == 0 and poller in result.stdout else None

        listing = asyncio.run(poll(listed, timeout=30, interval=0.5, what="worker listed"))
        rows = listing.stdout.splitlines()
        assert any(row.startswith("status file") and f" {worker.pid} ready" in row
                   for row in rows), listing.stdout
        assert any(row.startswith("poller") and str(worker.pid) in row for row in rows)
        assert not any(row.startswith("pid file") for row in rows)
        health = tool("monitor-worker-health", env=env)
        assert health.returncode == 0, health.stdout
        assert health.stdout.rstrip().endswith("HEALTHY"), health.stdout
        assert any(row.startswith("status file") and f" {worker.pid} ready" in row
                   for row in health.stdout.splitlines()), health.stdout
        assert poller in health.stdout
        assert "no worker started" not in health.stdout
        # Without a status file the pollers alone show it serving.
        bare = {key: value for key, value in env.items() if key != "WORKER_STATUS_FILE"}
        assert tool("list-workers", env=bare).returncode == 0
        assert tool("monitor-worker-health", env=bare).returncode == 0
        # Seen, but never stopped: it is not ours.
        kill = tool("kill-all-workers", env=env)
        assert kill.returncode == 0
        assert "nothing started by these tools" in kill.stdout
        assert worker.process is not None
        assert worker.process.poll() is None
    finally:
        worker.stop()
    assert tool("list-workers", env=env).returncode == 1
    stopped = tool("monitor-worker-health", env=env)
    assert stopped.returncode == 1
    assert "UNHEALTHY: WORKER_STATUS_FILE says 'stopped'" in \
        stopped.stdout


async def test_temporal_passthrough_connects_as_the_worker(pipeline: PipelineEnv,
                                                           tmp_path: Path) -> None:
    env = ops_env(pipeline.env, pipeline.root)
    handle = await pipeline.start("BuildPlanWorkflow", BuildPlanInput(
        plan_name="passthrough", phases=[PhaseSpec(number=1, agent_type="builder",
                                                   description="wait")]))
    # The operator's own CLI settings point elsewhere; the worker's settings win.
    profile = tmp_path / "temporal.toml"
    profile.write_text('[profile.default]\naddress = "127.0.0.1:1"\nnamespace = "elsewhere"\n')
    env.update(TEMPORAL_CONFIG_FILE=str(profile), TEMPORAL_TLS_CLIENT_CERT_PATH="/nonexistent")
    query = f"WorkflowId = '{handle.id}'"
    listed = await atool("temporal", "workflow", "list", "--query", query, "-o", "json",
                         env=env)
    assert listed.returncode == 0, listed.stderr
    assert [run["execution"]["workflowId"] for run in json.loads(listed.stdout)] == [handle.id]
    via_ops = await atool("ops", "temporal", "workflow", "describe", "--workflow-id",
                          handle.id, env=env)
    assert via_ops.returncode == 0
    assert handle.id in via_ops.stdout
    plain = await asyncio.to_thread(subprocess.run, [devserver.temporal_binary(), "workflow",
                                    "list", "--query", query], env=env, capture_output=True)
    assert plain.returncode != 0  # the same environment misleads the CLI run by hand
    missing = await atool("temporal", "workflow", "describe", "--workflow-id", "no-such-wf",
                          env=env)
    assert missing.returncode == 1
    assert "not found" in missing.stderr
    bad = await atool("temporal", "workflow", "list", env={**env, "TASK_QUEUE": "a b"})
    assert bad.returncode == 2
    assert "configuration error: TASK_QUEUE" in bad.stderr
    await handle.terminate()


def test_temporal_passthrough_with_vault_mtls(temporal_address: str, tmp_path: Path) -> None:
    """The CLI gets the worker's Vault-issued certificates inline, in its environment only."""
    pki = make_pki()
    with openbao(tmp_path / "bao.log") as bao, \
            tls_proxy(temporal_address, pki, tmp_path) as proxy:
        role = make_approle(bao)
        bao.write_worker_secret(worker_secret(pki))
        secret_id_file = write_secret_id_file(tmp_path, role.secret_id)
        env = ops_env(make_env(tmp_path, proxy.address, **vault_env(
            bao, role, secret_id_file, proxy.address)), tmp_path)
        key_line = pki.client.key_pem.splitlines()[1]
        # What the CLI is handed: argv as typed, the PEMs only in its environment.
        spy = tmp_path / "spy-temporal"
        spy.write_text('#!/bin/sh\necho "argv: $*"\nenv | grep "^TEMPORAL_" | cut -d= -f1\n'
                       'printf %s "$TEMPORAL_TLS_CLIENT_KEY_DATA" | grep -c "BEGIN.*PRIVATE"\n')
        spy.chmod(0o700)
        seen = tool("temporal", "workflow", "list", env={**env, "TEMPORAL_CLI": str(spy)})
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout.splitlines()[0] == "argv: workflow list"
        for name in ("TEMPORAL_TLS_CLIENT_CERT_DATA", "TEMPORAL_TLS_CLIENT_KEY_DATA",
                     "TEMPORAL_TLS_SERVER_CA_CERT_DATA", "TEMPORAL_TLS_SERVER_NAME"):
            assert name in seen.stdout.splitlines()
        assert seen.stdout.splitlines()[-1] == "1"  # the key, inline
        assert not [path for path in tmp_path.rglob("*") if path.is_file()
                    and key_line in path.read_text(errors="replace")]
        # The real CLI through the TLS endpoint: refused without certificates, served with.
        bare = subprocess.run([devserver.temporal_binary(), "operator", "cluster", "health",
                               "--address", proxy.address, "--tls"], capture_output=True,
                              text=True, timeout=60)
        assert bare.returncode != 0
        health = tool("temporal", "operator", "cluster", "health", env=env)
        assert health.returncode == 0, health.stderr
        assert "SERVING" in health.stdout, health.stderr
        recent = tool("list-recent-workflows", env=env)
        assert recent.returncode == 0, recent.stderr
        assert CLIENT_NAME in proxy.log.accepted
        for text in (seen.stderr, health.stdout, health.stderr, recent.stdout, recent.stderr):
            for secret in (role.role_id, role.secret_id, bao.root_token, key_line):
                assert secret not in text


# ---- where the time went --------------------------------------------------------------------

def write_summary(folder: Path, build: str, ended: datetime, stages: list[tuple[str, str,
                  float | None, float]], decision: float | None = None) -> None:
    """A summary as the summary stage writes it, its `time` section made by the same code."""
    start = ended - timedelta(hours=1)
    timings, at = [], start
    for stage, agent, pickup, work in stages:
        claimed = at + timedelta(seconds=pickup) if pickup is not None else None
        done = (claimed or at) + timedelta(seconds=work)
        timings.append(StageTiming(stage=stage, agent=agent, task_id=str(uuid.uuid4()),
                                   written_at=at, picked_up_at=claimed, done_at=done,
                                   outcome="completed", reminders=1 if (pickup or 0) > 60 else 0))
        at = done
    events = []
    if decision is not None:
        events = [StageEvent(at=at, stage=WAIT_FOR_BLOCK_RESOLUTION, event="started"),
                  StageEvent(at=at + timedelta(seconds=decision),
                             stage=WAIT_FOR_BLOCK_RESOLUTION, event="approved_by_update")]
    report = time_report(timings, events, started=start, ended=ended, decided_by="ops",
                         decision_source="update")
    path = folder / ended.strftime("%Y-%m") / f"build-{build}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"build_name": build, "workflow_id": f"build-{build}",
                                    "ended_at": ended.isoformat(),
                                    "time": report.model_dump(mode="json")}))


def test_time_report_lists_slowest_stages_and_pickup_waits(tmp_path: Path) -> None:
    summaries = tmp_path / "summaries"
    now = datetime.now(UTC)
    write_summary(summaries, "web", now - timedelta(hours=2),
                  [("prefab_scaffolding", "claudebox", 30.0, 600.0),
                   ("implement_build", "builder", 5400.0, 3600.0)], decision=900.0)
    write_summary(summaries, "api", now - timedelta(hours=1),
                  [("prefab_scaffolding", "claudebox", 90.0, 60.0),
                   ("implement_build", "builder", None, 1200.0)])
    write_summary(summaries, "old", now - timedelta(days=30),
                  [("implement_build", "builder", 99999.0, 1.0)])
    (summaries / now.strftime("%Y-%m") / "no-times.yml").write_text(
        f"build_name: before\nended_at: '{now.isoformat()}'\n")
    (summaries / now.strftime("%Y-%m") / "broken.yml").write_text("[unclosed\n")
    env = {**os.environ, "SUMMARY_DIR": str(summaries)}

    done = tool("time-report", "--json", "--days", "7", env=env)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert (found["builds"], found["builds_without_times"], found["unreadable"]) == (3, 1, 1)
    assert found["agent_tasks"] == 4
    slowest = [(r["build_name"], r["stage"], r["total_seconds"])
               for r in found["slowest_stages"]]
    assert slowest == [("web", "implement_build", 9000.0), ("api", "implement_build", 1200.0),
                       ("web", "prefab_scaffolding", 630.0),
                       ("api", "prefab_scaffolding", 150.0)]
    agents = {r["agent"]: r for r in found["pickup_by_agent"]}
    assert agents["builder"] == {"agent": "builder", "tasks": 2, "claims_seen": 1,
                                 "median_pickup_seconds": 5400.0,
                                 "max_pickup_seconds": 5400.0, "reminders": 1}
    assert agents["claudebox"]["median_pickup_seconds"] == 60.0
    assert found["decision_waits"] == {"count": 1, "median_seconds": 900.0,
                                       "max_seconds": 900.0}

    text = tool("time-report", "--top", "1", env=env)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("time-report: 3 build(s) ended in the last 7 day(s), 4 agent "
                               "task(s)")
    assert "1 without times; 1 unreadable" in lines[0]
    slow = lines[lines.index("Slowest stages (task written -> done):") + 2:]
    assert slow[0].split()[:3] == ["web", "implement_build", "builder"]
    assert slow[1] == ""  # --top 1
    assert "Block decisions: 1, median 900.0s, max 900.0s" in lines
