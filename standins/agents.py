"""AGENT STAND-IN: plays the coding agents' side of pipelines, for `make demo`, the tests,
the benchmark and the history recorder. This is the only one.

This is not a coding agent. It finds the task files the stages write and finishes each
of them the way a real agent must, after writing what that stage is supposed to leave
behind:

  build_prefab, build_plan, security_fix, build_phase  -> success
  security_audit   -> audit.md + triage-output.yml (DEMO_TRIAGE: one flag, one block)
  build_closeout   -> a closeout note; its path is the stage output

By default through `complete_activity.py --task-file` (a separate process, as agents
do); `complete_with_token` makes the same call in-process where a test or the bench
needs thousands of completions. Besides the `StandIn` loop it holds the pieces every
driver of pipelines shares: finding a stage's task file, writing the originating task
and the triage, waiting until a pipeline is parked at stage 7, polling with a deadline
(nothing here sleeps as synchronisation). It does not depend on pytest.

    python -m standins.agents --workflow-id ID [--timeout 90]

uses TASK_QUEUE_DIR / TEMPORAL_AUDIT_DIR / TEMPORAL_ADDRESS like the worker, and stops
when the closeout task is done. Exit codes: 0 closeout done · 1 a completion failed
· 2 usage · 5 timed out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from temporalio.client import Client, WorkflowHandle

from exceptions import PhaseFailedError
from models import BuildPhaseResult, PipelineStatus
from taskfiles.documents import AWAITING_DECISION, SOURCE_AGENT, add_history, new_task
from taskfiles.lookup import update_task, write_task
from vocabulary import (
    AGENT_TASK_TYPES,
    APPROVED,
    AUDIT_REQUESTS_DIR,
    BUILD_PHASE,
    INPUT_REQUIRED,
    PENDING_APPROVAL,
    STAGE_TASK_TYPES,
    STATUS_QUERY,
    SUBMITTED,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PHASE,
    TASK_BUILD_REQUEST,
    TASK_SECURITY_AUDIT,
    WAIT_FOR_BLOCK_RESOLUTION,
)

NAME = "demo-agent"
REPO = Path(__file__).resolve().parent.parent
TRIAGE_FILE = "triage-output.yml"
DEMO_TRIAGE = """\
# Written by the agent stand-in (standins/agents.py), not by a security review.
flags:
  - description: "Pin the base image to a digest"
blocks:
  - description: "Demo block: an operator must approve before close-out"
info:
  - "No secrets found in the demo build"
"""
POLL_SECONDS = 0.05


class StandInError(Exception):
    """complete_activity.py refused a completion, or a wait ran out of time."""



# ---- reading the task folder ----------------------------------------------------------

def task_kind(task: dict[str, Any]) -> str:
    """A task's v0.5.0 task type, in either dialect: the platform dialect writes the
    platform's word (`build`, `audit`, ...) and says the stage in payload.activity_type."""
    kind = task.get("task_type")
    if kind in AGENT_TASK_TYPES:
        return str(kind)
    payload = task.get("payload")
    stage = payload.get("activity_type") if isinstance(payload, dict) else None
    if not isinstance(stage, str):
        return str(kind)
    return {**STAGE_TASK_TYPES, BUILD_PHASE: TASK_BUILD_PHASE}.get(stage, str(kind))


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
            continue  # replaced between glob and read, or written by hand: skip
        payload = task.get("payload") if isinstance(task, dict) else None
        if isinstance(payload, dict):
            yield path, task, payload


def tasks_for(queue_dir: Path, workflow_id: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, task) for path, task, payload in readable_tasks(queue_dir)
            if payload.get("workflow_id") == workflow_id]


# ---- waiting with a deadline ----------------------------------------------------------

async def poll(condition: Callable[[], Any], timeout: float = 20.0,
               interval: float = POLL_SECONDS, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def poll_async(condition: Callable[[], Awaitable[Any]], timeout: float = 20.0,
                     what: str = "condition", interval: float = POLL_SECONDS) -> Any:
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
    """The submitted `task_type` task file of one workflow (`task_type` in either
    dialect's words: `build_prefab`, or the platform's `build`)."""
    def find() -> Path | None:
        for path, task in tasks_for(queue_dir, workflow_id):
            if (task_type in (task_kind(task), task.get("task_type"))
                    and task.get("status") == SUBMITTED):
                return path
        return None

    path: Path = await poll(find, timeout, what=f"{task_type} task of {workflow_id}")
    return path


async def wait_for_build_task(queue_dir: Path, build_name: str, task_type: str,
                              timeout: float = 30.0) -> Path:
    """A submitted task of `build_name` by payload.build_name: v0.5.0's task files carry no
    workflow_id."""
    def find() -> Path | None:
        for path, task, payload in readable_tasks(queue_dir):
            if (payload.get("build_name") == build_name and task_kind(task) == task_type
                    and task.get("status") == SUBMITTED):
                return path
        return None

    path: Path = await poll(find, timeout, what=f"{task_type} task of build {build_name}")
    return path


async def wait_for_status(handle: WorkflowHandle[Any, Any], condition: Callable[[Any], Any],
                          what: str, timeout: float = 60.0,
                          result_type: type = PipelineStatus) -> Any:
    """Query `get_status` until `condition(status)` holds; that status. A time-out names
    the last status seen."""
    seen: list[Any] = []

    async def check() -> Any:
        seen[:] = [await handle.query(STATUS_QUERY, result_type=result_type)]
        return seen[0] if condition(seen[0]) else None

    try:
        return await poll_async(check, timeout, what)
    except AssertionError as err:
        raise AssertionError(f"{err}; last status {seen[0] if seen else None}") from None


def is_parked(status: PipelineStatus) -> bool:
    waiting = status.waiting_on
    return (status.stage == WAIT_FOR_BLOCK_RESOLUTION and waiting is not None
            and waiting.kind == "block_decision")


async def wait_until_parked(handle: WorkflowHandle[Any, Any],
                            timeout: float = 60.0) -> PipelineStatus:
    """Until the pipeline is parked at stage 7 (waiting on a block decision); its status."""
    status: PipelineStatus = await wait_for_status(handle, is_parked,
                                                   f"{handle.id} parked at stage 7", timeout)
    return status


# ---- what agents and operators write --------------------------------------------------

def write_origin_task(queue_dir: Path, build_name: str = "build", *,
                      task_id: str | None = None, **payload: Any) -> str:
    """The originating task a pipeline is started for (its input `task_id`; stages 6 and
    7 act on it): the task `tools/start-build --create-task` writes, addressed to the
    worker so no agent takes it as work. Returns its id."""
    task_id = task_id or str(uuid.uuid4())
    write_task(queue_dir, new_task(
        task_id=task_id, target_agent=SOURCE_AGENT, task_type=TASK_BUILD_REQUEST,
        summary=f"Build {build_name}", payload={"build_name": build_name, **payload}))
    return task_id


def write_triage(audit_dir: Path, build_name: str, text: str | bytes) -> Path:
    """What the security agent leaves for stage 4: `<audit>/audit-requests/<build>/`."""
    path = audit_dir / AUDIT_REQUESTS_DIR / build_name / TRIAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def approve_origin(path: Path, actor: str = "operator", note: str = "risk accepted") -> None:
    """Decide a parked pipeline's blocks the way an operator edits the originating task."""
    update_task(path, lambda task: add_history(task, status=APPROVED, actor=actor, note=note))


# ---- completing a stage -----------------------------------------------------------------

def run_cli(args: list[str], env: Mapping[str, str], stdin: str | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run complete_activity.py as the agents do: a separate process."""
    return subprocess.run([sys.executable, str(REPO / "complete_activity.py"), *args],
                          env=dict(env), input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


async def complete_task(path: Path, env: Mapping[str, str], status: str = "success",
                        message: str = "done", completed_by: str | None = None
                        ) -> subprocess.CompletedProcess[str]:
    """`complete_activity.py --task-file PATH STATUS MESSAGE`; it must exit 0."""
    who = ["--completed-by", completed_by] if completed_by else []
    result = await asyncio.to_thread(
        run_cli, ["--task-file", str(path), *who, status, message], env, None, 60.0)
    if result.returncode != 0:
        raise StandInError(f"complete_activity.py exit {result.returncode}: "
                           f"{result.stderr.strip()[:300]}")
    return result


async def complete_with_token(client: Client, task: Mapping[str, Any], status: str = "success",
                              message: str = "done") -> None:
    """The call complete_activity.py makes, in-process (no task file update): for many
    completions where a process each would cost more than what is measured."""
    token = base64.b64decode(task["payload"]["task_token"])
    handle = client.get_async_activity_handle(task_token=token)
    if status == "success":
        await handle.complete(BuildPhaseResult(status="success", output=message))
    else:
        await handle.fail(PhaseFailedError.failure(message))


async def play_stage(queue_dir: Path, workflow_id: str, task_type: str, env: Mapping[str, str],
                     status: str = "success", message: str = "done",
                     timeout: float = 20.0) -> Path:
    """Wait for one workflow's `task_type` task, then complete it through the CLI."""
    path = await wait_for_task(queue_dir, workflow_id, task_type, timeout)
    await complete_task(path, env, status, message)
    return path


# ---- the loop ---------------------------------------------------------------------------

Completer = Callable[[Path, dict[str, Any], str], Awaitable[None]]


@dataclass
class StandIn:
    """Finishes every submitted task file in the queue folder (of one workflow, or of all
    when `workflow_id` is None), in the order the stages write them. An audit's triage is
    `triage(build)`; with `approve_origins`, a parked pipeline's originating task gets
    `approved` once, as an operator would. A task dispatched again (a fresh token in the
    same file) is played again; a file is parsed again only when it changed."""

    queue_dir: Path
    audit_dir: Path
    env: Mapping[str, str]
    work_dir: Path
    workflow_id: str | None = None
    triage: Callable[[str], str] = lambda _build: DEMO_TRIAGE
    complete: Completer | None = None  # default: complete_activity.py --task-file
    approve_origins: bool = False
    concurrency: int = 1
    interval: float = 0.1
    done: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _seen: dict[Path, tuple[int, int]] = field(default_factory=dict)
    _handed: set[tuple[str, str]] = field(default_factory=set)  # (file name, token)
    _approved: set[str] = field(default_factory=set)
    _jobs: set[asyncio.Task[None]] = field(default_factory=set)
    _gate: asyncio.Semaphore | None = None

    def _changed(self) -> list[tuple[Path, dict[str, Any]]]:
        changed = []
        for path in task_files(self.queue_dir):
            try:
                info = path.stat()
                signature = (info.st_mtime_ns, info.st_size)
                if self._seen.get(path) == signature:
                    continue
                task = load_yaml(path)
            except (OSError, yaml.YAMLError):
                continue  # replaced between glob and read; the next scan sees it
            self._seen[path] = signature
            if isinstance(task, dict):
                changed.append((path, task))
        return changed

    def prepare(self, task: dict[str, Any]) -> str:
        """Leave behind what the stage asks for; return the completion message."""
        kind = task_kind(task)
        build = task["payload"].get("build_name", "build")
        if kind == TASK_SECURITY_AUDIT:
            write_triage(self.audit_dir, build, self.triage(build))
            folder = self.audit_dir / AUDIT_REQUESTS_DIR / build
            (folder / "audit.md").write_text(f"# Audit of {build}\n\nStand-in report.\n")
            return "audit written (stand-in)"
        if kind == TASK_BUILD_CLOSEOUT:
            note = self.work_dir / f"{build}-closeout.md"
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(f"# {build} closed out by the agent stand-in\n")
            return str(note)
        return f"{kind} done (stand-in)"

    async def _finish(self, path: Path, task: dict[str, Any]) -> None:
        assert self._gate is not None
        message = await asyncio.to_thread(self.prepare, task)
        async with self._gate:
            try:
                if self.complete is None:
                    await complete_task(path, self.env, "success", message, NAME)
                else:
                    await self.complete(path, task, message)
            except Exception as err:  # reported by the caller: a stale token is expected
                self.failures.append(f"{path.name} ({task_kind(task)}): {err}")
                return
        self.done.append(task_kind(task))

    def _act(self, path: Path, task: dict[str, Any]) -> None:
        payload = task.get("payload")
        payload = payload if isinstance(payload, dict) else {}
        # Which hand-off this is: the token, or (platform dialect, no token) the attempt.
        token = payload.get("task_token") or (
            f"{payload.get('activity_id')}/{payload.get('attempt')}"
            if payload.get("activity_id") else None)
        mine = self.workflow_id is None or payload.get("workflow_id") == self.workflow_id
        if mine and task.get("status") == SUBMITTED and token:
            if (path.name, token) not in self._handed:
                self._handed.add((path.name, token))
                self._spawn(self._finish(path, task))
        elif (self.approve_origins and AWAITING_DECISION in task
              and task.get("status") in (INPUT_REQUIRED, PENDING_APPROVAL)
              and task.get("id") not in self._approved):
            self._approved.add(str(task["id"]))
            self._spawn(asyncio.to_thread(approve_origin, path, "ted"))

    def _spawn(self, work: Awaitable[None]) -> None:
        job = asyncio.ensure_future(work)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def step(self) -> None:
        """Hand every task waiting right now to an agent (finished in the background)."""
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.concurrency)
        for path, task in await asyncio.to_thread(self._changed):
            self._act(path, task)

    async def serve(self, stop: asyncio.Event) -> None:
        """Play until `stop` is set, then let the completions under way finish."""
        while not stop.is_set():
            await self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
        await asyncio.gather(*self._jobs)

    async def run(self, until: str = TASK_BUILD_CLOSEOUT, timeout: float = 90.0) -> list[str]:
        """Play until an `until` task is done; StandInError on a failed completion."""
        deadline = time.monotonic() + timeout
        while until not in self.done:
            await self.step()
            if self.failures:
                await asyncio.gather(*self._jobs)
                raise StandInError(self.failures[0])
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {until} task done within {timeout:g}s "
                                   f"(done so far: {', '.join(self.done) or 'nothing'})")
            await asyncio.sleep(self.interval)
        await asyncio.gather(*self._jobs)
        return self.done



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m standins.agents",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow-id", required=True)
    parser.add_argument("--timeout", type=float, default=90.0)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return 2 if exit_request.code not in (0, None) else 0
    from config import load_config
    from exceptions import ConfigError

    try:
        config = load_config()
    except ConfigError as err:
        print(f"standin: configuration error: {err}", file=sys.stderr)
        return 2
    agent = StandIn(workflow_id=args.workflow_id, queue_dir=config.task_queue_dir,
                    audit_dir=config.audit_dir, env=dict(os.environ),
                    work_dir=config.audit_dir / "demo-closeouts")
    try:
        done = asyncio.run(agent.run(timeout=args.timeout))
    except TimeoutError as err:
        print(f"standin: {err}", file=sys.stderr)
        return 5
    except StandInError as err:
        print(f"standin: {err}", file=sys.stderr)
        return 1
    print(f"standin: finished {', '.join(done)}")
    return 0


if __name__ == "__main__":
    from tools.common import exit_process

    exit_process(main())
