"""`make demo`: one whole pipeline end to end on this machine (docs/operators.md, "The
demo"): a private dev server and worker, the agent stand-in of standins/agents.py, one block
approved through the Update, the result checked. Exit codes: 0 passed · 1 a check failed or
a step broke (one line on stderr) · 2 usage."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from exceptions import ToolError
from tools.common import CONNECT_TIMEOUT_SECONDS, OpsSettings, worker_config
from vocabulary import BUILD_PIPELINE_WORKFLOW, EVENTS_QUERY, STAGE_NUMBERS, TOTAL_STAGES

BUILD = "demo-service"
AGENT = "builder"
OPERATOR = "demo-operator"
DEADLINE_SECONDS = 100.0


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ToolError(message)


def timeline(events: list[Any]) -> list[str]:
    start = events[0].at if events else None
    lines = []
    for event in events:
        number = STAGE_NUMBERS.get(event.stage)
        stage = f"{number}/{TOTAL_STAGES} {event.stage}" if number else event.stage
        offset = (event.at - start).total_seconds() if start else 0.0
        detail = f"  {event.detail}" if event.detail else ""
        lines.append(f"  +{offset:6.2f}s  {stage:<32} {event.event}{detail}")
    return lines


async def run_pipeline(env: dict[str, str], root: Path) -> None:
    import yaml

    from models import BuildPipelineInput, BuildPipelineResult, PipelineStatus, StageEvent
    from standins.agents import StandIn, is_parked, wait_for_status, write_origin_task
    from taskfiles.documents import read_task
    from taskfiles.lookup import find_task
    from temporal_client import connect
    from tools.ops import decide
    from tools.start_build import start

    queue_dir = Path(env["TASK_QUEUE_DIR"])
    origin_id = write_origin_task(queue_dir, BUILD)
    say(f"originating task {origin_id} written to {queue_dir}")

    config = worker_config(env)
    client = await asyncio.wait_for(connect(config), CONNECT_TIMEOUT_SECONDS)
    workflow_id = f"build-{BUILD}-{uuid.uuid4().hex[:8]}"
    inp = BuildPipelineInput(build_name=BUILD, plan_path=str(root / "plans" / f"{BUILD}.md"),
                             task_id=origin_id, target_agent=AGENT)
    print("[demo] started workflow ", end="", flush=True)
    await asyncio.to_thread(start, BUILD_PIPELINE_WORKFLOW, inp, {"workflow_id": workflow_id},
                            env)
    handle = client.get_workflow_handle(workflow_id, result_type=BuildPipelineResult)

    agent = StandIn(workflow_id=workflow_id, queue_dir=queue_dir,
                    audit_dir=Path(env["TEMPORAL_AUDIT_DIR"]), env=env,
                    work_dir=root / "closeouts")
    agent_task = asyncio.create_task(agent.run(timeout=DEADLINE_SECONDS))
    try:
        def parked(status: PipelineStatus) -> bool:
            if agent_task.done():
                agent_task.result()  # surfaces the agent's error
            return is_parked(status)

        status = await wait_for_status(handle, parked, "the pipeline to park on its block", 60)
        say(f"parked at {status.stage_number}/{TOTAL_STAGES} {status.stage}: {status.blocks} "
            f"block, {status.flags} flag; stages done: {', '.join(status.stages_done)}")
        answer = await asyncio.to_thread(decide, env, "approve-build", workflow_id,
                                         "demo: risk accepted", OPERATOR)
        say(f"approve_blocks Update answered {answer!r} (by {OPERATOR})")
        result: BuildPipelineResult = await asyncio.wait_for(handle.result(), 60)
        await agent_task
    finally:
        agent_task.cancel()

    description = await handle.describe()  # result() returned: it COMPLETED
    # Blocks approved: the build closed out, "partial" in v0.5.0's words.
    check(result.outcome == "partial" and result.status == "complete",
          f"outcome {result.outcome!r} / status {result.status!r}, expected partial/complete")
    check(result.decision == "approved", f"decision {result.decision!r}")
    check(len(result.stages_completed) == 9,
          f"{len(result.stages_completed)} stages completed, expected 9: "
          f"{result.stages_completed}")
    summary_path = Path(result.summary_path or "")
    check(summary_path.is_file(), f"summary file {summary_path} missing")
    summary = yaml.safe_load(summary_path.read_text())
    check(summary["outcome"] == "partial" and summary["decided_by"] == OPERATOR,
          f"summary says outcome {summary['outcome']!r}, decided by {summary['decided_by']!r}")
    origin = read_task(find_task(queue_dir, origin_id))
    # The decision is in its history; in the platform dialect the run's end then closes it.
    decided = [entry for entry in origin["history"] if entry.get("status") == "approved"]
    check(bool(decided) and decided[-1]["actor"] == OPERATOR,
          f"originating task history has no approval by {OPERATOR}")
    closed = origin["status"] == "completed" if config.platform_dialect else True
    check(closed, f"originating task is {origin['status']!r}, expected completed")
    check(await description.static_summary() == f"build {BUILD} → {AGENT} ({TOTAL_STAGES} stages)",
          "static summary missing")
    say(f"COMPLETED: outcome {result.outcome}, {len(result.stages_completed)} stages, "
        f"closeout {result.closeout_path}")
    say(f"summary: {summary_path}")
    say(f"agent stand-in finished: {', '.join(agent.done)}")
    events = await handle.query(EVENTS_QUERY, result_type=list[StageEvent])
    say("stage timeline:")
    for line in timeline(events):
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ui-port", type=int, help="Web UI port (default: a free one)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return 2 if exit_request.code not in (0, None) else 0
    from tools import devserver, ops

    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="build-worker-demo-"))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("TEMPORAL_", "VAULT_", "MATRIX_", "NTFY_", "SEND_MATRIX",
                                  "CLAUDE_TEMPORAL_", "WORKER_STATUS_FILE"))}
    # The operator commands' own code starts and stops the server and the worker, with
    # their PID and log files in the temp folder.
    env.update({"CLAUDE_TEMPORAL_LOG_DIR": str(root / "logs"),
                "CLAUDE_TEMPORAL_PID_DIR": str(root / "pids"),
                "CLAUDE_TEMPORAL_PROJECT_NAME": "demo",
                "TEMPORAL_ADDRESS": f"127.0.0.1:{devserver.free_port()}",
                "TASK_QUEUE": f"demo-{uuid.uuid4().hex[:8]}",
                "TASK_QUEUE_DIR": str(root / "task-queue"),
                "TEMPORAL_AUDIT_DIR": str(root / "artifacts"),
                "SUMMARY_DIR": str(root / "summaries"), "LOG_LEVEL": "INFO"})
    settings = OpsSettings.from_env(env)
    code = 0
    try:
        ops.ensure_server(settings, argparse.Namespace(
            ui_port=args.ui_port or devserver.free_port(), db_filename=None, timeout=60))
        ops.ensure_worker(settings, argparse.Namespace(timeout=60, stop_timeout=20))
        asyncio.run(run_pipeline(env, root))
    except (ToolError, TimeoutError, AssertionError, OSError) as err:
        print(f"demo: FAILED: {err}", file=sys.stderr)
        code = 1
    except Exception as err:  # any other break still stops what we started
        print(f"demo: FAILED: {type(err).__name__}: {str(err).splitlines()[0][:300]}",
              file=sys.stderr)
        code = 1
    finally:
        worker_log = settings.log_file("worker")
        if code and worker_log.exists():
            for line in worker_log.read_text(errors="replace").splitlines()[-5:]:
                print(f"demo: worker log: {line[:300]}", file=sys.stderr)
        try:
            ops.kill_all_workers(settings, argparse.Namespace(include_server=True, timeout=20))
        except ToolError as err:
            print(f"demo: {err}", file=sys.stderr)
            code = 1
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if code == 0:
        say(f"PASSED in {time.monotonic() - began:.1f}s")
    return code


if __name__ == "__main__":
    from tools.common import exit_process

    exit_process(main())
