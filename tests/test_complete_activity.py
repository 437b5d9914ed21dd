"""complete_activity.py as the agents run it: a separate process against a real dev server.

Every run's stdout and stderr is checked for the token: it must never be echoed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHandle

from exceptions import PhaseFailedError
from models import BuildPlanResult
from standins.agents import load_yaml, run_cli, wait_for_task
from tests.agents import application_failure, assert_valid_task_file
from tests.conftest import PipelineEnv, make_env
from tools.devserver import free_port
from vocabulary import BUILD_PLAN_WORKFLOW, TASK_BUILD_PHASE

# Valid base64 that no Temporal server ever issued.
GARBAGE_TOKEN = base64.b64encode(b"this is not a temporal task token" * 3).decode()


RESULT_TIMEOUT = 60.0


async def outcome(handle: WorkflowHandle) -> Any:
    """The workflow's result, bounded: a broken workflow fails the test instead of hanging."""
    return await asyncio.wait_for(handle.result(), RESULT_TIMEOUT)


def cli_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    """The CLI's environment without any token or agent name leaking in from the caller."""
    clean = {k: v for k, v in env.items() if k not in ("TASK_TOKEN", "AGENT_NAME")}
    clean.update(extra)
    return clean


def run(args: list[str], env: dict[str, str], token: str | None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """One CLI run; fails the test if the token shows up in anything it printed."""
    result = run_cli(args, env, stdin=stdin)
    if token:
        for stream, text in (("stdout", result.stdout), ("stderr", result.stderr)):
            assert token not in text, f"token printed on {stream}"
            # A prefix is as bad as the whole token (e.g. echoed in an error message).
            assert token[:24] not in text, f"part of the token printed on {stream}"
    return result


async def one_phase_plan(pipeline: PipelineEnv) -> tuple[WorkflowHandle, Path, str]:
    """A one-phase BuildPlanWorkflow parked on its agent: (handle, task file, token)."""
    handle = await pipeline.start(BUILD_PLAN_WORKFLOW, {
        "plan_name": "cli-plan",
        "phases": [{"number": 1, "agent_type": "builder", "description": "do the thing"}],
    }, result_type=BuildPlanResult)
    path = await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_PHASE)
    token = load_yaml(path)["payload"]["task_token"]
    assert isinstance(token, str)
    assert len(token) > 24
    return handle, path, token


async def completed_results(handle: WorkflowHandle) -> list[Any]:
    """The JSON payloads of every completed activity, as the workflow received them."""
    results = []
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_completed_event_attributes"):
            payload = event.activity_task_completed_event_attributes.result.payloads[0]
            results.append(json.loads(payload.data))
    return results


def token_source(form: str, token: str, tmp_path: Path, env: dict[str, str],
                 task: Path) -> tuple[list[str], dict[str, str], str | None]:
    """(args before STATUS, env, stdin) for each way the CLI accepts a token."""
    if form == "positional":
        return [token], cli_env(env), None
    if form == "token-file":
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        return ["--token-file", str(token_file)], cli_env(env), None
    if form == "stdin":
        return ["-"], cli_env(env), token + "\n"
    if form == "env":
        return [], cli_env(env, TASK_TOKEN=token), None
    assert form == "task-file"
    return ["--task-file", str(task)], cli_env(env), None


@pytest.mark.parametrize("form", ["positional", "task-file", "token-file", "stdin", "env"])
async def test_success_completes_the_phase(pipeline: PipelineEnv, tmp_path: Path,
                                           form: str) -> None:
    handle, task, token = await one_phase_plan(pipeline)
    before = load_yaml(task)
    prefix, env, stdin = token_source(form, token, tmp_path, pipeline.env, task)

    result = run([*prefix, "success", "built", "it"], env, token, stdin=stdin)

    assert result.returncode == 0, result.stderr
    assert "completed" in result.stdout
    assert await outcome(handle) == BuildPlanResult(status="success", phases_run=1)
    assert await completed_results(handle) == [{"status": "success", "output": "built it"}]
    written = load_yaml(task)
    if form == "task-file":
        assert written["status"] == "completed"
        assert written["result"]["output"] == "built it"
        assert written["result"]["completed_by"] == "builder"  # the task's target_agent
        assert written["result"]["completed_at"]
        assert written["history"][:-1] == before["history"]
        assert written["history"][-1]["status"] == "completed"
        assert written["history"][-1]["actor"] == "builder"
        assert stat.S_IMODE(task.stat().st_mode) == 0o600
        assert_valid_task_file(task)
    else:
        # Only --task-file knows which file to mark; the others leave it alone.
        assert written == before


async def test_task_file_completed_by_agent_name(pipeline: PipelineEnv) -> None:
    handle, task, token = await one_phase_plan(pipeline)
    result = run(["--task-file", str(task), "success"], cli_env(pipeline.env,
                                                                AGENT_NAME="night-shift"), token)
    assert result.returncode == 0, result.stderr
    assert (await outcome(handle)).phases_run == 1
    written = assert_valid_task_file(task)
    assert written["result"]["completed_by"] == "night-shift"
    assert written["result"]["output"] == ""
    assert written["history"][-1]["actor"] == "night-shift"


async def test_failed_fails_the_activity_as_phase_failed(pipeline: PipelineEnv) -> None:
    handle, task, token = await one_phase_plan(pipeline)

    result = run(["--task-file", str(task), "failed", "tests", "are", "red"], cli_env(pipeline.env),
                 token)

    assert result.returncode == 0, result.stderr
    cause = await application_failure(outcome(handle), PhaseFailedError)
    assert "tests are red" in cause.message
    failures = [e.activity_task_failed_event_attributes.failure
                async for e in handle.fetch_history_events()
                if e.HasField("activity_task_failed_event_attributes")]
    assert len(failures) == 1
    assert failures[0].application_failure_info.type == PhaseFailedError.failure_type
    assert failures[0].application_failure_info.non_retryable
    assert failures[0].message == "tests are red"
    written = assert_valid_task_file(task)
    assert written["status"] == "failed"
    assert written["result"]["output"] == "tests are red"


async def test_second_completion_is_exit_3(pipeline: PipelineEnv) -> None:
    handle, _, token = await one_phase_plan(pipeline)
    first = run([token, "success", "once"], cli_env(pipeline.env), token)
    assert first.returncode == 0, first.stderr
    await outcome(handle)

    second = run([token, "success", "twice"], cli_env(pipeline.env), token)

    assert second.returncode == 3, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert await completed_results(handle) == [{"status": "success", "output": "once"}]


async def test_garbage_token_returns_quickly(pipeline_env_vars: dict[str, str]) -> None:
    started = time.monotonic()
    result = run([GARBAGE_TOKEN, "success"], cli_env(pipeline_env_vars), GARBAGE_TOKEN)
    elapsed = time.monotonic() - started

    assert result.returncode in (2, 3), result.stderr
    assert elapsed <= 15.0, f"garbage token took {elapsed:.1f}s"
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def offline_env(tmp_path: Path) -> dict[str, str]:
    """Pointed at a closed port: a run that should fail before connecting shows 2, not 4."""
    return cli_env(make_env(tmp_path, f"127.0.0.1:{free_port()}"))


@pytest.mark.parametrize(("args", "stdin", "problem", "secret"), [
    (["not*base64!", "success"], None, "not valid base64", "not*base64!"),
    (["-", "success"], "@@@ not base64 @@@\n", "not valid base64", "@@@ not base64 @@@"),
    (["-", "success"], "", "empty", None),
    ([GARBAGE_TOKEN, "succeeded"], None, "unknown status", GARBAGE_TOKEN),
    ([GARBAGE_TOKEN], None, "missing status", GARBAGE_TOKEN),
    ([], None, "missing task token", None),
    (["success"], None, "missing task token", None),
    (["success", "all", "done"], None, "missing task token", None),
    (["--task-file", "/nonexistent/task.yml", "success"], None, "/nonexistent/task.yml", None),
    (["--token-file", "/nonexistent/token", "success"], None, "/nonexistent/token", None),
    (["--bogus-flag", GARBAGE_TOKEN, "success"], None, "unrecognized", GARBAGE_TOKEN),
])
def test_usage_errors_exit_2(offline_env: dict[str, str], args: list[str], stdin: str | None,
                             problem: str, secret: str | None) -> None:
    result = run(args, offline_env, secret, stdin=stdin)

    assert result.returncode == 2, result.stderr
    assert problem in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 or "usage:" in result.stderr
    assert result.stdout == ""


def test_token_in_status_position_is_not_echoed(offline_env: dict[str, str],
                                                tmp_path: Path) -> None:
    # Mixing the forms puts the token where the status belongs; the error must not quote it.
    task = tmp_path / "task.yml"
    task.write_text(f"id: x\npayload:\n  task_token: {GARBAGE_TOKEN}\n")
    result = run(["--task-file", str(task), GARBAGE_TOKEN, "success"], offline_env,
                 GARBAGE_TOKEN)
    assert result.returncode == 2
    assert "unknown status" in result.stderr


def test_unreachable_server_is_exit_4(offline_env: dict[str, str]) -> None:
    started = time.monotonic()
    result = run([GARBAGE_TOKEN, "success", "done"], offline_env, GARBAGE_TOKEN)
    elapsed = time.monotonic() - started

    assert result.returncode == 4, result.stderr
    assert offline_env["TEMPORAL_ADDRESS"] in result.stderr
    assert result.stderr.strip().endswith("; retry later")  # what AGENTS.md tells agents
    assert len(result.stderr.strip().splitlines()) == 1
    assert elapsed <= 12.0, f"unreachable server took {elapsed:.1f}s"


def test_task_file_untouched_when_server_unreachable(offline_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    from taskfiles.documents import new_task
    from taskfiles.lookup import write_task

    task_id = str(uuid.uuid4())
    path = write_task(tmp_path / "queue", new_task(
        task_id=task_id, target_agent="builder", task_type=TASK_BUILD_PHASE, summary="s",
        payload={"build_name": "b", "instruction": "i", "task_token": GARBAGE_TOKEN}))
    before = path.read_bytes()

    result = run(["--task-file", str(path), "success", "done"], offline_env, GARBAGE_TOKEN)

    assert result.returncode == 4, result.stderr
    assert path.read_bytes() == before  # not marked completed: Temporal never heard of it
