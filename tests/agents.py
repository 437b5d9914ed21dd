"""A stand-in for the coding agents: find the task file a stage wrote, then finish it
through the real complete_activity.py code path. Polls with deadlines, never sleeps
blindly."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from vocabulary import SUBMITTED, TASK_BUILD_PLAN

REPO = Path(__file__).resolve().parent.parent


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def task_files(queue_dir: Path) -> list[Path]:
    return sorted(p for p in queue_dir.glob("*.yml") if p.is_file())


def readable_tasks(queue_dir: Path) -> Iterator[tuple[Path, dict[str, Any], dict[str, Any]]]:
    """(path, task, payload) of every task file that parses and has a payload mapping."""
    for path in task_files(queue_dir):
        try:
            task = load_yaml(path)
        except (OSError, yaml.YAMLError):
            continue
        payload = task.get("payload") if isinstance(task, dict) else None
        if isinstance(payload, dict):
            yield path, task, payload


def tasks_for(queue_dir: Path, workflow_id: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, task) for path, task, payload in readable_tasks(queue_dir)
            if payload.get("workflow_id") == workflow_id]


async def poll(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def poll_async(condition: Callable[[], Awaitable[Any]], timeout: float = 20.0,
                     what: str = "condition", interval: float = 0.05) -> Any:
    """`poll` for a condition that has to await (a query, a describe)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_for_task(queue_dir: Path, workflow_id: str, task_type: str,
                        timeout: float = 20.0) -> Path:
    def find() -> Path | None:
        for path, task in tasks_for(queue_dir, workflow_id):
            if task.get("task_type") == task_type and task.get("status") == SUBMITTED:
                return path
        return None

    return await poll(find, timeout, what=f"{task_type} task of {workflow_id}")


def run_cli(args: list[str], env: dict[str, str], stdin: str | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run complete_activity.py as the agents do: a separate process."""
    return subprocess.run([sys.executable, str(REPO / "complete_activity.py"), *args],
                          env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


async def complete_task(path: Path, env: dict[str, str], status: str = "success",
                        message: str = "done") -> subprocess.CompletedProcess[str]:
    result = await asyncio.to_thread(run_cli, ["--task-file", str(path), status, message], env)
    assert result.returncode == 0, f"complete_activity failed: {result.stderr}"
    return result


async def play_stage(queue_dir: Path, workflow_id: str, task_type: str, env: dict[str, str],
                     status: str = "success", message: str = "done") -> Path:
    path = await wait_for_task(queue_dir, workflow_id, task_type)
    await complete_task(path, env, status, message)
    return path


SCHEMA_PATH = REPO / "schemas" / "task-file.schema.json"


def assert_valid_task_file(path: Path) -> dict[str, Any]:
    """The file matches the published schema and is private (0600)."""
    import json
    import stat

    import jsonschema

    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, f"{path} has mode {oct(mode)}, expected 0o600"
    task = load_yaml(path)
    jsonschema.validate(task, json.loads(SCHEMA_PATH.read_text()))
    assert path.name.endswith(f"-{task['id'][:8]}.yml"), path.name
    return task


def write_origin_task(queue_dir: Path) -> str:
    """The task that asked for a build (stages 6 and 7 act on it); returns its id."""
    import uuid

    from task_files import new_task, write_task

    task_id = str(uuid.uuid4())
    write_task(queue_dir, new_task(
        task_id=task_id, target_agent="temporal-worker", task_type=TASK_BUILD_PLAN,
        summary="originating build request", payload={"build_name": "x"}))
    return task_id


async def wait_for_build_task(queue_dir: Path, build_name: str, task_type: str,
                              timeout: float = 30.0) -> Path:
    """A submitted task of `build_name` by payload.build_name: v0.5.0's task files carry no
    workflow_id."""
    def find() -> Path | None:
        for path, task, payload in readable_tasks(queue_dir):
            if (payload.get("build_name") == build_name and task.get("task_type") == task_type
                    and task.get("status") == SUBMITTED):
                return path
        return None

    return await poll(find, timeout, what=f"{task_type} task of build {build_name}")
