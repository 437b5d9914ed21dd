"""A task file is all an agent needs: agents that have nothing but the file run the
command it names from `/`, with PATH and HOME as their whole environment, against a
worker process on a non-default port and namespace; v0.5.0-style agents find the payload
fields v0.5.0 wrote; a missing or wrong setting is exit 2 naming the variable."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.client import Client, WorkflowHandle

from activities.triage import (
    MAX_DEPTH,
    MAX_DESCRIPTION_CHARS,
    MAX_FINDINGS,
    MAX_FINDINGS_BYTES,
    MAX_TRIAGE_BYTES,
)
from config import load_config
from exceptions import ConfigError
from models import BuildPipelineInput, BuildPipelineResult, BuildPlanResult
from standins.agents import REPO, load_yaml, tasks_for, wait_for_task, write_origin_task
from taskfiles.bounded_yaml import MAX_YAML_NODES
from temporal_client import connect
from tests import temporal_server
from tests.agents import assert_valid_task_file
from tests.conftest import PipelineEnv, make_env
from tests.worker_process import WorkerProcess
from vocabulary import (
    BUILD_PIPELINE_WORKFLOW,
    BUILD_PLAN_WORKFLOW,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PHASE,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
    TASK_SECURITY_FIX,
)

NAMESPACE = "agents-ns"
AGENT_PATH = "/usr/bin:/bin"
RESULT_TIMEOUT = 60.0
PLACEHOLDERS = ("<this task file>", "<TEMPORAL_AUDIT_DIR>", "$PREFAB_AGENT", "$SECURITY_AGENT")


# --- the agent side: nothing but the task file ---------------------------------------


def agent_env(home: Path, **extra: str) -> dict[str, str]:
    """An agent's whole environment: `env -i PATH=/usr/bin:/bin HOME=...`."""
    return {"PATH": AGENT_PATH, "HOME": str(home), **extra}


def run_as_agent(argv: list[str], home: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd="/", env=agent_env(home, **extra), capture_output=True,
                          text=True, timeout=60)


def read_as_agent(path: Path) -> dict[str, Any]:
    task = yaml.safe_load(path.read_text())
    assert isinstance(task, dict)
    return task


def command_in_instruction(instruction: str, status: str) -> list[str]:
    """The command the instruction tells the agent to run for `status`, as argv with the
    placeholder still last."""
    placeholder = "'<short result>'" if status == "success" else "'<reason>'"
    lines = [line.strip() for line in instruction.splitlines()
             if "--task-file" in line and line.strip().endswith(f"{status} {placeholder}")]
    assert len(lines) == 1, f"no single {status} command in the instruction:\n{instruction}"
    return shlex.split(lines[0])


def agent_argv(path: Path, how: str, message: str) -> list[str]:
    """How an agent builds its command from the task file alone: the payload's argv (a
    program) or the instruction's text (a model reading words)."""
    task = read_as_agent(path)
    if how == "payload":
        return [*task["payload"]["complete_command"], "success", message]
    argv = command_in_instruction(task["payload"]["instruction"], "success")
    return [*argv[:-1], message]


def finish(path: Path, how: str, message: str, home: Path) -> subprocess.CompletedProcess[str]:
    result = run_as_agent(agent_argv(path, how, message), home)
    assert result.returncode == 0, f"agent's command failed: {result.stderr}"
    assert "activity completed" in result.stdout
    return result


# --- a worker process on a non-default port and namespace -------------------------------


@pytest.fixture(scope="module")
def ns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("ns-devserver") / "server.log"
    with temporal_server.running(log_path=log, namespaces=(NAMESPACE,)) as address:
        assert not address.endswith(":7233")
        yield address


@dataclass
class Deployed:
    env: dict[str, str]
    client: Client
    worker: WorkerProcess
    home: Path

    @property
    def queue_dir(self) -> Path:
        return Path(self.env["TASK_QUEUE_DIR"])

    async def start(self, workflow: str, arg: object, **kwargs: Any) -> WorkflowHandle:
        return await self.client.start_workflow(
            workflow, arg, id=f"agent-{uuid.uuid4().hex[:10]}", task_queue=self.env["TASK_QUEUE"],
            **kwargs)


@pytest.fixture
async def deployed(ns_server: str, tmp_path: Path) -> AsyncIterator[Deployed]:
    env = make_env(tmp_path, ns_server, TEMPORAL_NAMESPACE=NAMESPACE)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        await asyncio.to_thread(worker.wait_ready, 60)
        client = await connect(load_config(env))
        home = tmp_path / "agent-home"
        home.mkdir()
        yield Deployed(env=env, client=client, worker=worker, home=home)
    finally:
        worker.stop()


def assert_self_contained(path: Path, deployed: Deployed) -> dict[str, Any]:
    """Schema-valid, and naming everything absolutely: interpreter, script, this file and
    where the worker's server is."""
    task = assert_valid_task_file(path)
    payload = task["payload"]
    command = payload["complete_command"]
    # The worker's interpreter as invoked: a venv python, not the symlink's target.
    assert command == [sys.executable, str(REPO / "complete_activity.py"), "--task-file",
                       str(path)]
    assert payload["temporal"] == {
        "address": deployed.env["TEMPORAL_ADDRESS"], "namespace": NAMESPACE,
        "task_queue": deployed.env["TASK_QUEUE"], "require_tls": False, "tls": False}
    instruction = payload["instruction"]
    for placeholder in PLACEHOLDERS:
        assert placeholder not in instruction, placeholder
    assert command_in_instruction(instruction, "success")[:-2] == command
    assert command_in_instruction(instruction, "failed")[:-2] == command
    return task


# --- the tests ----------------------------------------------------------------------


@pytest.mark.slow
async def test_agents_with_only_the_task_file_complete_a_pipeline(deployed: Deployed) -> None:
    """Every stage finished from `/` with PATH and HOME only, the commands taken from the
    payload, the instruction and request.md in turn; the agents read v0.5.0's fields
    (originating_task_id, output_dir, audit_request_path, flags) and the security agent
    writes where the task says."""
    build = f"agent-{uuid.uuid4().hex[:6]}"
    origin = write_origin_task(deployed.queue_dir)
    handle = await deployed.start(BUILD_PIPELINE_WORKFLOW, BuildPipelineInput(
        build_name=build, plan_path="/plans/agent.md", task_id=origin, target_agent="builder"),
        result_type=BuildPipelineResult)
    home = deployed.home

    prefab = await wait_for_task(deployed.queue_dir, handle.id, TASK_BUILD_PREFAB, timeout=60)
    finish(prefab, "payload", "prefab scaffolded", home)
    implement = await wait_for_task(deployed.queue_dir, handle.id, TASK_BUILD_PLAN)
    assert read_as_agent(implement)["payload"]["originating_task_id"] == origin
    finish(implement, "instruction", "implemented", home)

    audit = await wait_for_task(deployed.queue_dir, handle.id, TASK_SECURITY_AUDIT)
    payload = read_as_agent(audit)["payload"]
    output_dir = Path(payload["output_dir"])
    request_md = Path(payload["audit_request_path"])
    assert output_dir.is_absolute()
    assert request_md == output_dir / "request.md"
    assert Path(payload["triage_path"]) == output_dir / "triage-output.yml"
    assert Path(payload["audit_report_path"]) == output_dir / "audit.md"
    assert f"{output_dir}/triage-output.yml" in payload["instruction"]
    assert f"The request is at {request_md}." in payload["instruction"]
    (output_dir / "audit.md").write_text("# Audit\nOne flag.\n")
    (output_dir / "triage-output.yml").write_text("flags:\n- Pin the base image digest\n")
    # request.md says how to complete, with the exact command for this very task file.
    text = request_md.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip().endswith(
        "success 'audit written'")]
    assert len(lines) == 1, text
    assert shlex.split(lines[0])[:-2] == payload["complete_command"]
    assert "python complete_activity.py" not in text
    # ... and the limits the triage is held to (the ones AGENTS.md gives).
    prose = " ".join(text.split())
    for limit in (f"at most {MAX_DESCRIPTION_CHARS:,} characters per description",
                  f"at most {MAX_TRIAGE_BYTES // 2**20} MiB", "one document",
                  f"nesting at most {MAX_DEPTH} levels", "not a link",
                  f"at most {MAX_FINDINGS} findings in all, taking at most "
                  f"{MAX_FINDINGS_BYTES // 1024} KiB", f"at most {MAX_YAML_NODES:,} values"):
        assert limit in prose, limit
    result = run_as_agent(shlex.split(lines[0]), home)
    assert result.returncode == 0, result.stderr

    fix = await wait_for_task(deployed.queue_dir, handle.id, TASK_SECURITY_FIX)
    fix_payload = read_as_agent(fix)["payload"]
    assert fix_payload["flags"] == ["Pin the base image digest"]
    assert "Pin the base image digest" in fix_payload["instruction"]
    finish(fix, "payload", "pinned", home)
    closeout = await wait_for_task(deployed.queue_dir, handle.id, TASK_BUILD_CLOSEOUT)
    closeout_doc = str(home / "closeout.md")
    finish(closeout, "instruction", closeout_doc, home)

    outcome = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT)
    assert (outcome.outcome, outcome.flags, outcome.closeout_path) == ("success", 1,
                                                                      closeout_doc)
    written = tasks_for(deployed.queue_dir, handle.id)
    assert sorted(task["task_type"] for _, task in written) == sorted(
        [TASK_BUILD_PREFAB, TASK_BUILD_PLAN, TASK_SECURITY_AUDIT, TASK_SECURITY_FIX,
         TASK_BUILD_CLOSEOUT])
    for path, _ in written:
        task = assert_self_contained(path, deployed)
        assert task["status"] == "completed"
        assert task["result"]["completed_by"] == task["target_agent"]


@pytest.mark.slow
async def test_symlinked_cli_and_v050_phase_fields(deployed: Deployed) -> None:
    """v0.3.0's ~/scripts/temporal-complete symlink works in place of the script, and a
    v0.5.0 agent finds phase_number, description, plan_name, context_refs, workflow_id."""
    scripts = deployed.home / "scripts"
    scripts.mkdir()
    link = scripts / "temporal-complete"
    link.symlink_to(REPO / "complete_activity.py")
    description = "Write the tests\nContext: not a context line, part of the description"
    handle = await deployed.start(BUILD_PLAN_WORKFLOW, {
        "plan_name": "linked", "phases": [
            {"number": 3, "agent_type": "builder", "description": description,
             "context_refs": ["docs/a.md", "docs/b.md"]},
            {"number": 7, "agent_type": "tester", "description": "Run them"}]},
        result_type=BuildPlanResult)

    for number, how in ((3, "payload"), (7, "instruction")):
        path = await wait_for_task(deployed.queue_dir, handle.id, TASK_BUILD_PHASE, timeout=60)
        task = assert_self_contained(path, deployed)
        payload = task["payload"]
        assert payload["phase_number"] == payload["phase"] == number
        assert payload["plan_name"] == "linked"
        assert payload["workflow_id"] == handle.id
        if number == 3:
            assert payload["description"] == description
            assert payload["context_refs"] == ["docs/a.md", "docs/b.md"]
        else:
            assert (payload["description"], payload["context_refs"]) == ("Run them", [])
        argv = agent_argv(path, how, f"phase {number} done")
        assert argv[1] == str(REPO / "complete_activity.py")
        argv[1] = str(link)
        # Hardened shells set PYTHONSAFEPATH: Python then adds no script folder to the path.
        extra = {"PYTHONSAFEPATH": "1"} if number == 7 else {}
        result = run_as_agent(argv, deployed.home, **extra)
        assert result.returncode == 0, result.stderr
        assert read_as_agent(path)["status"] == "completed"

    assert await asyncio.wait_for(handle.result(), RESULT_TIMEOUT) == BuildPlanResult(
        status="success", phases_run=2)


# --- a missing or wrong setting: exit 2, naming the variable -----------------------------


async def parked_phase(pipeline: PipelineEnv) -> tuple[WorkflowHandle, Path]:
    handle = await pipeline.start(BUILD_PLAN_WORKFLOW, {
        "plan_name": "settings", "phases": [{"number": 1, "agent_type": "builder",
                                             "description": "wait"}]},
        result_type=BuildPlanResult)
    return handle, await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PHASE)


def edited_copy(path: Path, folder: Path, **temporal: Any) -> Path:
    """The task file with payload.temporal changed, as a careless or hostile hand might."""
    task = load_yaml(path)
    task["payload"]["temporal"].update(temporal)
    copy = folder / path.name
    copy.write_text(yaml.safe_dump(task))
    copy.chmod(0o600)
    return copy


SETTING_CASES = ["namespace-env", "address-env", "address-task", "tls-without-vault",
                 "env-file-line", "env-file-fifo", "env-file-partial", "secret-id-file"]


@pytest.mark.slow
@pytest.mark.parametrize("case", SETTING_CASES)
async def test_wrong_setting_is_exit_2_naming_it(pipeline: PipelineEnv, tmp_path: Path,
                                                  case: str) -> None:
    handle, path = await parked_phase(pipeline)
    before = path.read_bytes()
    home = tmp_path / "home"
    home.mkdir()
    target, extra, named = path, {}, ""
    env_file = tmp_path / "worker.env"
    if case == "namespace-env":
        extra, named = {"TEMPORAL_NAMESPACE": "no-such-namespace"}, "TEMPORAL_NAMESPACE"
    elif case == "address-env":
        extra, named = {"TEMPORAL_ADDRESS": "no-port"}, "TEMPORAL_ADDRESS"
    elif case == "address-task":
        target, named = edited_copy(path, tmp_path, address="no-port"), "TEMPORAL_ADDRESS"
    elif case == "tls-without-vault":
        target, named = edited_copy(path, tmp_path, tls=True), "VAULT_ADDR"
    elif case.startswith("env-file"):
        if case == "env-file-line":
            env_file.write_text("VAULT_ADDR=http://127.0.0.1:1\nthis line is wrong\n")
        elif case == "env-file-fifo":
            os.mkfifo(env_file)
        else:
            env_file.write_text("export VAULT_ADDR='http://127.0.0.1:1'\n")
        named = "VAULT_ROLE_ID" if case == "env-file-partial" else "WORKER_ENV_FILE"
        target = edited_copy(path, tmp_path, env_file=str(env_file), tls=True)
    elif case == "secret-id-file":
        extra, named = {"VAULT_ADDR": "http://127.0.0.1:1", "VAULT_ROLE_ID": "role",
                        "VAULT_SECRET_ID_FILE": str(tmp_path / "no-such-file")}, \
            "VAULT_SECRET_ID_FILE"
    command = [*load_yaml(target)["payload"]["complete_command"][:3], str(target)]

    started = time.monotonic()
    result = run_as_agent([*command, "success", "done"], home, **extra)

    assert result.returncode == 2, (case, result.stderr)
    assert time.monotonic() - started < 15
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert named in line, line
    assert path.read_bytes() == before  # nothing was reported
    # With the setting right, the very same task completes.
    finish(path, "payload", "done after all", home)
    assert (await asyncio.wait_for(handle.result(), RESULT_TIMEOUT)).phases_run == 1


def test_foreign_interpreter_is_exit_2(tmp_path: Path) -> None:
    """A python without the worker's packages says which interpreter to use."""
    system = shutil.which("python3", path=AGENT_PATH)
    if system is None or subprocess.run([system, "-c", "import temporalio"],
                                        capture_output=True).returncode == 0:
        pytest.skip("no python3 without temporalio on /usr/bin:/bin")
    result = run_as_agent([system, str(REPO / "complete_activity.py"), "--task-file",
                           str(tmp_path / "t.yml"), "success"], tmp_path)
    assert result.returncode == 2
    assert "payload.complete_command" in result.stderr
    assert system in result.stderr


# --- the env file: read exactly as pm2's ecosystem.config.js reads it --------------------


def ecosystem_env(env_file: Path) -> subprocess.CompletedProcess[str]:
    script = ("const app = require(process.argv[1]).apps[0];"
              "console.log(JSON.stringify(app.env));")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "TEMPORAL_"))}
    return subprocess.run(["node", "-e", script, str(REPO / "ecosystem.config.js")],
                          env={**env, "WORKER_ENV_FILE": str(env_file)}, capture_output=True,
                          text=True, timeout=30)


ENV_FILE_TEXT = ("\ufeff# settings\r\n"
                 "export VAULT_ADDR='http://vault.internal:8200'\r\n"
                 "  VAULT_ROLE_ID = \"role id with spaces\"  \n"
                 "VAULT_SECRET_ID_FILE=~/secret-id\n"
                 "\n"
                 "TEMPORAL_ADDRESS=temporal.internal:7233 # not a comment\n"
                 "QUOTED_ONCE=\"left\n"
                 "MIXED='a\"\n"
                 "EMPTY=\n"
                 "EQUALS=a=b=c\n"
                 "NOT_EXPANDED=$HOME/x\n")


def test_env_file_is_read_as_pm2_reads_it(tmp_path: Path) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is needed to run ecosystem.config.js")
    from config import read_env_file

    env_file = tmp_path / "worker.env"
    env_file.write_text(ENV_FILE_TEXT, newline="")
    pm2 = ecosystem_env(env_file)
    assert pm2.returncode == 0, pm2.stderr
    pm2_env = json.loads(pm2.stdout)
    # pm2 hands the worker its env file's name, so tasks can name it for the CLI.
    assert pm2_env.pop("WORKER_ENV_FILE") == str(env_file)
    pm2_env.pop("PYTHONUNBUFFERED")
    ours = read_env_file(env_file)
    assert ours == pm2_env
    assert ours["VAULT_ROLE_ID"] == "role id with spaces"
    assert ours["VAULT_SECRET_ID_FILE"] == "~/secret-id"  # ~ is expanded later, in paths

    missing = tmp_path / "none.env"
    assert read_env_file(missing) == {}
    pm2 = ecosystem_env(missing)
    assert pm2.returncode == 0
    assert "WORKER_ENV_FILE" not in json.loads(pm2.stdout)

    env_file.write_text("VAULT_ROLE_ID=s3cr3t-role\nnot a setting s3cr3t\n")
    assert ecosystem_env(env_file).returncode != 0  # pm2 refuses it too
    with pytest.raises(ConfigError) as caught:
        read_env_file(env_file)
    assert str(caught.value) == f"WORKER_ENV_FILE {env_file}: line 2 is not KEY=VALUE"
