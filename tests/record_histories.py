"""Record one workflow history per path through both workflows, for replay tests.

    python -m tests.record_histories [--out tests/histories/pickup-limits] [--only NAME ...]
                                     [--routed]

Starts its own dev server and an in-process worker on private folders, plays the agents
through the real complete_activity.py CLI, and writes `<out>/<name>.json` (the same JSON
as `temporal workflow show --output json`). `--routed`: every agent stage routed to an
agent host (AGENT_TASK_QUEUES), with two in-process agent-host workers beside the main
one (on the same folders: a history records queues, not folders). Re-record after an
intended workflow change that running pipelines need not survive; keep old files that
still must replay.

Exit codes: 0 all recorded · 1 a path did not end as expected (message on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from standins.agents import play_stage, wait_until_parked, write_origin_task, write_triage
from vocabulary import (
    APPROVE_BLOCKS_UPDATE,
    APPROVED,
    BUILD_PIPELINE_WORKFLOW,
    BUILD_PLAN_WORKFLOW,
    DIALECT_V050,
    EVENTS_QUERY,
    REJECTED,
    REQUEST_CHANGES_UPDATE,
    STATUS_QUERY,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PHASE,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
    TASK_SECURITY_FIX,
)

REPO = Path(__file__).resolve().parent.parent
# One folder per shape of history; older folders keep what must still replay.
DEFAULT_OUT = REPO / "tests" / "histories" / "pickup-limits"
WAIT_SECONDS = 120.0
# A few paths at a time: every first workflow task builds a sandbox, which is slow on
# a busy machine.
CONCURRENCY = 4
FAILING_PATHS = frozenset({"pipeline_agent_failure", "pipeline_bad_triage", "plan_failure",
                           "pipeline_work_limit"})


class Recorder:
    """Drives one workflow per path against a worker with private folders; the agents
    are the shared stand-in's (standins/agents.py)."""

    def __init__(self, client: Client, env: dict[str, str], root: Path) -> None:
        self.client, self.env, self.root = client, env, root
        self.queue = root / "task-queue"

    async def play(self, handle: WorkflowHandle, task_type: str, status: str = "success",
                   message: str = "done") -> None:
        await play_stage(self.queue, handle.id, task_type, self.env, status, message,
                         timeout=WAIT_SECONDS)

    async def start(self, name: str, **extra: Any) -> WorkflowHandle:
        from models import BuildPipelineInput

        return await self.client.start_workflow(
            BUILD_PIPELINE_WORKFLOW,
            BuildPipelineInput(build_name=name, plan_path="/plans/recorded.md",
                               task_id=write_origin_task(self.queue, name),
                               target_agent="builder", **extra),
            id=f"record-{name}", task_queue=self.env["TASK_QUEUE"])

    async def pipeline(self, name: str, triage: str | None, **extra: Any) -> WorkflowHandle:
        """Start a pipeline and play it up to and including the security audit."""
        handle = await self.start(name, **extra)
        await self.play(handle, TASK_BUILD_PREFAB)
        if triage is None:
            return handle
        await self.play(handle, TASK_BUILD_PLAN)
        write_triage(self.root / "artifacts", name, triage)
        await self.play(handle, TASK_SECURITY_AUDIT)
        return handle

    async def parked(self, handle: WorkflowHandle) -> Path:
        from taskfiles.lookup import find_task

        await wait_until_parked(handle, WAIT_SECONDS)
        return find_task(self.queue, (await self._input(handle))["task_id"])

    async def _input(self, handle: WorkflowHandle) -> dict[str, Any]:
        import json

        history = await handle.fetch_history()
        payload = history.events[0].workflow_execution_started_event_attributes.input.payloads[0]
        return json.loads(payload.data)

    async def claim(self, handle: WorkflowHandle, task_type: str) -> Path:
        """An agent claims its task (`in-progress`); returns once the run knows."""
        from models import PipelineStatus
        from standins.agents import poll_async, wait_for_task
        from taskfiles.documents import add_history
        from taskfiles.lookup import update_task
        from vocabulary import IN_PROGRESS

        path = await wait_for_task(self.queue, handle.id, task_type, WAIT_SECONDS)
        update_task(path, lambda t: add_history(t, status=IN_PROGRESS, actor="builder",
                                                note="on it"))

        async def claimed() -> bool:
            status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
            return bool(status.waiting_on and status.waiting_on.claimed_at)

        await poll_async(claimed, WAIT_SECONDS, "the claim")
        return path

    async def set_origin_status(self, handle: WorkflowHandle, status: str) -> None:
        from taskfiles.documents import add_history
        from taskfiles.lookup import update_task

        path = await self.parked(handle)
        update_task(path, lambda t: add_history(t, status=status, actor="operator",
                                                note="recorded"))


    async def reaudit(self, handle: WorkflowHandle, triage: str) -> None:
        """Play a security re-audit: its triage goes where its own payload says."""
        from standins.agents import complete_task, load_yaml, wait_for_task

        path = await wait_for_task(self.queue, handle.id, TASK_SECURITY_AUDIT, WAIT_SECONDS)
        Path(load_yaml(path)["payload"]["triage_path"]).write_text(triage)
        await complete_task(path, self.env)


BLOCKS = "blocks:\n- description: secret in log\n"


async def _clean(recorder: Recorder) -> WorkflowHandle:
    handle = await recorder.pipeline("clean", "info:\n- fine\n")
    await recorder.play(handle, TASK_BUILD_CLOSEOUT, message="/docs/closeout.md")
    return handle


async def _flags(recorder: Recorder) -> WorkflowHandle:
    handle = await recorder.pipeline("flags", "flags:\n- description: pin versions\n")
    await recorder.play(handle, TASK_SECURITY_FIX)
    await recorder.play(handle, TASK_BUILD_CLOSEOUT)
    return handle


async def _approved_by_file(recorder: Recorder) -> WorkflowHandle:
    handle = await recorder.pipeline("approved", BLOCKS, block_poll_interval_seconds=0.2)
    await recorder.set_origin_status(handle, APPROVED)
    await recorder.play(handle, TASK_BUILD_CLOSEOUT)
    return handle


async def _approved_by_update(recorder: Recorder) -> WorkflowHandle:
    handle = await recorder.pipeline("approved-update", BLOCKS, block_poll_interval_seconds=0.2)
    await recorder.parked(handle)
    await handle.execute_update(APPROVE_BLOCKS_UPDATE, "looks fine")
    await recorder.play(handle, TASK_BUILD_CLOSEOUT)
    return handle


async def _rejected(recorder: Recorder) -> WorkflowHandle:
    handle = await recorder.pipeline("rejected", BLOCKS, block_poll_interval_seconds=0.2)
    await recorder.set_origin_status(handle, REJECTED)
    return handle


async def _timed_out(recorder: Recorder) -> WorkflowHandle:
    handle = await recorder.pipeline("timed-out", BLOCKS, block_poll_interval_seconds=0.2,
                                     block_wait_timeout_seconds=2)
    await recorder.parked(handle)
    return handle


async def _reaudit(recorder: Recorder) -> WorkflowHandle:
    """One re-audit finds one of two fixed flags again: it becomes a block, approved."""
    handle = await recorder.pipeline("reaudit", "flags:\n- pin versions\n- add headers\n",
                                     reaudit_rounds=1)
    await recorder.play(handle, TASK_SECURITY_FIX)
    await recorder.reaudit(handle, "flags:\n- add headers\n")
    await recorder.parked(handle)
    await handle.execute_update(APPROVE_BLOCKS_UPDATE, {"verdicts": {"1": "accept"}})
    await recorder.play(handle, TASK_BUILD_CLOSEOUT)
    return handle


async def _changes_requested(recorder: Recorder) -> WorkflowHandle:
    """Two blocks: one accepted, one sent back with a note; the re-audit is clean."""
    handle = await recorder.pipeline("changes", "blocks:\n- secret in log\n- open port\n",
                                     reaudit_rounds=1)
    await recorder.parked(handle)
    await handle.execute_update(REQUEST_CHANGES_UPDATE, {"note": "close the port",
                                                    "verdicts": {"1": "accept"}})
    await recorder.play(handle, TASK_SECURITY_FIX)
    await recorder.reaudit(handle, "info: []\n")
    await recorder.play(handle, TASK_BUILD_CLOSEOUT)
    return handle


async def _agent_failure(recorder: Recorder) -> WorkflowHandle:
    handle = await recorder.pipeline("agent-failure", None)
    await recorder.play(handle, TASK_BUILD_PLAN, status="failed", message="compiler broke")
    return handle


async def _bad_triage(recorder: Recorder) -> WorkflowHandle:
    return await recorder.pipeline("bad-triage", "- not a mapping\n")


async def _pickup_reminded(recorder: Recorder) -> WorkflowHandle:
    """Nobody claims stage 1 within its pickup limit: one reminder (no channel here: its
    failure is recorded), then the claim, then the rest as usual."""
    from models import StageEvent
    from standins.agents import complete_task, poll_async

    # Pickup limit 2 s: the later stages are played well within it.
    handle = await recorder.start("reminded", pickup_timeout_seconds=2)

    async def reminded() -> bool:
        events = await handle.query(EVENTS_QUERY, result_type=list[StageEvent])
        return any(event.event == "reminder_failed" for event in events)

    await poll_async(reminded, WAIT_SECONDS, "the first reminder")
    await complete_task(await recorder.claim(handle, TASK_BUILD_PREFAB), recorder.env)
    await recorder.play(handle, TASK_BUILD_PLAN)
    write_triage(recorder.root / "artifacts", "reminded", "info:\n- fine\n")
    await recorder.play(handle, TASK_SECURITY_AUDIT)
    await recorder.play(handle, TASK_BUILD_CLOSEOUT)
    return handle


async def _work_limit(recorder: Recorder) -> WorkflowHandle:
    """Stage 1 claimed, then silence past its work limit: the stage fails."""
    handle = await recorder.start("silent", work_timeout_seconds=1)
    await recorder.claim(handle, TASK_BUILD_PREFAB)
    return handle


async def _plan(client: Client, recorder: Recorder, name: str, fail: bool,
                filed: bool = False) -> WorkflowHandle:
    """A two-phase plan; `filed`: filed as a task (its end closes it)."""
    from models import BuildPlanInput, PhaseSpec

    phases = [PhaseSpec(number=n, agent_type="builder", description=f"phase {n}",
                        context_refs=["/plans/recorded.md"]) for n in (1, 2)]
    task_id = write_origin_task(recorder.queue, name) if filed else None
    handle = await client.start_workflow(
        BUILD_PLAN_WORKFLOW, BuildPlanInput(plan_name=name, phases=phases, task_id=task_id),
        id=f"record-{name}", task_queue=recorder.env["TASK_QUEUE"])
    await recorder.play(handle, TASK_BUILD_PHASE)
    await recorder.play(handle, TASK_BUILD_PHASE, status="failed" if fail else "success",
                        message="phase broke" if fail else "done")
    return handle


async def record_all(client: Client, recorder: Recorder,
                     only: frozenset[str] = frozenset()) -> dict[str, WorkflowHandle]:
    paths: dict[str, Callable[[], Awaitable[WorkflowHandle]]] = {
        "pipeline_clean": lambda: _clean(recorder),
        "pipeline_flags": lambda: _flags(recorder),
        "pipeline_approved_task_file": lambda: _approved_by_file(recorder),
        "pipeline_approved_update": lambda: _approved_by_update(recorder),
        "pipeline_rejected": lambda: _rejected(recorder),
        "pipeline_timed_out": lambda: _timed_out(recorder),
        "pipeline_agent_failure": lambda: _agent_failure(recorder),
        "pipeline_bad_triage": lambda: _bad_triage(recorder),
        "plan_success": lambda: _plan(client, recorder, "plan-success", False),
        "plan_failure": lambda: _plan(client, recorder, "plan-failure", True),
        "pipeline_reaudit": lambda: _reaudit(recorder),
        "pipeline_changes_requested": lambda: _changes_requested(recorder),
        "plan_filed": lambda: _plan(client, recorder, "plan-filed", False, filed=True),
        "pipeline_pickup_reminded": lambda: _pickup_reminded(recorder),
        "pipeline_work_limit": lambda: _work_limit(recorder),
    }
    unknown = only - set(paths)
    if unknown:
        raise RuntimeError(f"no such path: {', '.join(sorted(unknown))}")
    paths = {name: run for name, run in paths.items() if not only or name in only}
    gate = asyncio.Semaphore(CONCURRENCY)

    async def limited(run: Callable[[], Awaitable[WorkflowHandle]]) -> WorkflowHandle:
        async with gate:
            return await run()

    handles = dict(zip(paths, await asyncio.gather(*(limited(run) for run in paths.values())),
                       strict=True))
    for name, handle in handles.items():
        try:
            await asyncio.wait_for(handle.result(), WAIT_SECONDS)
            ended = "completed"
        except WorkflowFailureError:
            ended = "failed"  # the failure paths end failed on purpose
        expected = "failed" if name in FAILING_PATHS else "completed"
        if ended != expected:
            raise RuntimeError(f"{name}: workflow {handle.id} {ended}, expected {expected}")
    return handles


ROUTED_QUEUE = "record-histories"
HOST_QUEUES = {"claudebox": f"{ROUTED_QUEUE}.build-host", "builder": f"{ROUTED_QUEUE}.build-host",
               "security-agent": f"{ROUTED_QUEUE}.sec-host"}


def host_envs(env: dict[str, str]) -> list[dict[str, str]]:
    """The agent-host workers' settings: one per distinct host queue."""
    return [{**env, "WORKER_ROLE": "agent-host", "TASK_QUEUE": queue,
             "WORKFLOW_TASK_QUEUE": ROUTED_QUEUE} for queue in sorted(set(HOST_QUEUES.values()))]


async def record(out: Path, only: frozenset[str] = frozenset(),
                 routed: bool = False) -> None:
    from config import load_config
    from decisions.file_watcher import watch_block_decisions
    from temporal_client import connect
    from tests import temporal_server
    from worker import build_worker

    with tempfile.TemporaryDirectory(prefix="record-histories-") as tmp:
        root = Path(tmp)
        with temporal_server.running(log_path=root / "server.log") as address:
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("TEMPORAL_", "VAULT_", "MATRIX_", "NTFY_"))}
            # v0.5.0's task file words: the stand-in plays agents by those task types.
            env.update({"TASK_FILE_DIALECT": DIALECT_V050,
                        "TEMPORAL_ADDRESS": address, "TASK_QUEUE": ROUTED_QUEUE,
                        "TASK_QUEUE_DIR": str(root / "task-queue"),
                        "TEMPORAL_AUDIT_DIR": str(root / "artifacts"),
                        "SUMMARY_DIR": str(root / "summaries")})
            if routed:
                env["AGENT_TASK_QUEUES"] = ",".join(f"{agent}={queue}"
                                                    for agent, queue in HOST_QUEUES.items())
            config = load_config(env)
            # A fixed identity keeps host names and pids out of the committed files.
            client = await connect(config, identity="record-histories")
            stop = asyncio.Event()
            async with contextlib.AsyncExitStack() as workers:
                for settings in [config, *(load_config(host) for host in
                                           (host_envs(env) if routed else []))]:
                    await workers.enter_async_context(build_worker(client, settings))
                watcher = asyncio.create_task(watch_block_decisions(client, config, stop))
                handles = await record_all(client, Recorder(client, env, root), only)
                stop.set()
                await watcher
            out.mkdir(parents=True, exist_ok=True)
            for name, handle in handles.items():
                history = await handle.fetch_history()
                (out / f"{name}.json").write_text(history.to_json() + "\n")
                print(f"record_histories: wrote {out / name}.json "
                      f"({len(history.events)} events)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.record_histories",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for the JSON histories (default: "
                             "tests/histories/pickup-limits)")
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME",
                        help="record only these paths (e.g. pipeline_reaudit)")
    parser.add_argument("--routed", action="store_true",
                        help="route every agent stage to an agent host's queue")
    args = parser.parse_args(argv)
    try:
        asyncio.run(record(args.out, frozenset(args.only), args.routed))
    except (RuntimeError, TimeoutError) as err:
        print(f"record_histories: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
