"""Replacing a running v0.5.0 worker by ours on the same task queue loses no pipeline.

The v0.5.0 stand-in (tests/v050_standin.py, proven faithful by test_v050_standin.py)
runs pipelines on a real dev server, its workflow half and its activity half as two
processes on one queue:

- `up-implement` waits on its stage-2 agent, `up-fixes` on its stage-5 (flag fix) agent;
- `up-parked` is parked at stage 7 with v0.5.0's heartbeating activity running;
- `up-notify` and `up-summary`: their agents finish stage 5 and stage 8 while v0.5.0's
  activity half is already gone, so v0.5.0 schedules `notify_blocks` and
  `summarize_workflow` with its own arguments and nothing starts them.

Both halves are then stopped the way v0.5.0 stops (SIGTERM, nothing reported) and our real
worker process starts on the same queue. Then:

- the stage-2 and stage-5 agents finish with the v0.5.0 task files and tokens they have
  (the task-file form, and v0.5.0's positional-token form);
- v0.5.0's scheduled `notify_blocks` and `summarize_workflow` run on our worker, with
  v0.5.0's arguments;
- the parked pipeline outlives its old activity's heartbeat timeout (HEARTBEAT_SECONDS
  here, 10 min in v0.5.0), still waiting; an operator approves the originating task in
  the file; `up-notify` is approved the same way;
- every later stage is ours (our task files, found by workflow id), and all five end
  with our result and summary, marked as adopted.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from standins.agents import (
    complete_task,
    load_yaml,
    poll_async,
    run_cli,
    wait_for_build_task,
    wait_for_task,
    write_origin_task,
    write_triage,
)
from taskfiles.documents import add_history, read_task
from taskfiles.lookup import find_task, update_task
from tests.agents import assert_valid_task_file
from tests.v050_standin import WORKFLOW_TYPE, StandinProcess
from tests.worker_process import WorkerProcess
from vocabulary import (
    APPLY_FLAG_FIXES,
    CLOSE_BUILD,
    IMPLEMENT_BUILD,
    INPUT_REQUIRED,
    NOTIFY_BLOCKS,
    PREFAB_SCAFFOLDING,
    PROCESS_TRIAGE_OUTPUT,
    REQUEST_SECURITY_AUDIT,
    STATUS_QUERY,
    SUMMARIZE_WORKFLOW,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
    TASK_SECURITY_FIX,
    WAIT_FOR_BLOCK_RESOLUTION,
)

# Long enough for v0.5.0's workflow half to be stopped after its activity half before the
# parked pipeline's old activity times out (v0.5.0 would then fail that pipeline).
HEARTBEAT_SECONDS = 15.0
STANDIN_ENV = {"V050_BLOCK_POLL_SECONDS": "0.5",
               "V050_BLOCK_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS)}
ADOPTED_EVENT = "adopted"
COMMON = [PREFAB_SCAFFOLDING, IMPLEMENT_BUILD, REQUEST_SECURITY_AUDIT,
          PROCESS_TRIAGE_OUTPUT]
BLOCK_STAGES = [NOTIFY_BLOCKS, WAIT_FOR_BLOCK_RESOLUTION]
EXPECTED = {  # build: (outcome, stages completed, close-out path)
    "up-implement": ("success", [*COMMON, CLOSE_BUILD, SUMMARIZE_WORKFLOW], "/srv/out/impl"),
    "up-fixes": ("success", [*COMMON, APPLY_FLAG_FIXES, CLOSE_BUILD, SUMMARIZE_WORKFLOW],
                 "/srv/out/fixes"),
    "up-parked": ("partial", [*COMMON, *BLOCK_STAGES, CLOSE_BUILD, SUMMARIZE_WORKFLOW],
                  "/srv/out/parked"),
    "up-notify": ("partial", [*COMMON, APPLY_FLAG_FIXES, *BLOCK_STAGES, CLOSE_BUILD,
                              SUMMARIZE_WORKFLOW], "/srv/out/notify"),
    "up-summary": ("success", [*COMMON, CLOSE_BUILD, SUMMARIZE_WORKFLOW],
                   "build_closeout-done"),
}


def approve(queue_dir: Path, task_id: str) -> None:
    """The operator approves the blocks in the originating task file."""
    update_task(find_task(queue_dir, task_id), lambda task: add_history(
        task, status="approved", actor="alice", note="accepted risk"))


async def start_v050(client: Client, env: dict[str, str], build: str) -> tuple[WorkflowHandle,
                                                                                 str]:
    task_id = write_origin_task(Path(env["TASK_QUEUE_DIR"]))
    handle = await client.start_workflow(
        WORKFLOW_TYPE, {"build_name": build, "plan_path": f"/srv/plans/{build}.md",
                        "task_id": task_id, "target_agent": "builder"},
        id=f"build-{build}-{uuid.uuid4().hex[:8]}", task_queue=env["TASK_QUEUE"])
    return handle, task_id


async def v050_agent(env: dict[str, str], build: str, task_type: str,
                     triage: dict[str, list[str]] | None = None) -> Path:
    """A v0.5.0 agent finishing a v0.5.0 task file."""
    path = await wait_for_build_task(Path(env["TASK_QUEUE_DIR"]), build, task_type, 60)
    if triage is not None:
        write_triage(Path(env["TEMPORAL_AUDIT_DIR"]), build, yaml.safe_dump(triage))
    await complete_task(path, env, "success", f"{task_type}-done")
    return path


async def our_agent(env: dict[str, str], workflow_id: str, task_type: str, message: str,
                    before: Callable[[], object] | None = None) -> Path:
    """An agent finishing a task file our worker wrote for an adopted pipeline."""
    path = await wait_for_task(Path(env["TASK_QUEUE_DIR"]), workflow_id, task_type, 60)
    assert_valid_task_file(path)
    if before is not None:
        before()
    await complete_task(path, env, "success", message)
    return path


async def stage_7_activity_running(handle: WorkflowHandle) -> bool:
    description = await handle.describe()
    return any(p.activity_type.name == WAIT_FOR_BLOCK_RESOLUTION
               and p.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
               for p in description.raw_description.pending_activities)


async def scheduled_unstarted(handle: WorkflowHandle, activity_type: str) -> bool:
    description = await handle.describe()
    return any(p.activity_type.name == activity_type
               and p.state == PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED
               for p in description.raw_description.pending_activities)


async def old_stage_7_timed_out(handle: WorkflowHandle) -> bool:
    history = await handle.fetch_history()
    scheduled = {e.event_id for e in history.events
                 if e.HasField("activity_task_scheduled_event_attributes")
                 and e.activity_task_scheduled_event_attributes.activity_type.name
                 == WAIT_FOR_BLOCK_RESOLUTION}
    return any(e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT
               and e.activity_task_timed_out_event_attributes.scheduled_event_id in scheduled
               for e in history.events)


async def parked_status(handle: WorkflowHandle) -> dict[str, Any] | None:
    status = await handle.query(STATUS_QUERY)
    return status if status.get("waiting_on") else None


async def started_by(handle: WorkflowHandle, activity_type: str) -> tuple[list[Any], str]:
    """(v0.5.0-era scheduled arguments, identity of the worker that started it)."""
    history = await handle.fetch_history()
    scheduled = {}
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            sched = event.activity_task_scheduled_event_attributes
            if sched.activity_type.name == activity_type:
                scheduled[event.event_id] = [json.loads(p.data) for p in sched.input.payloads]
        if event.HasField("activity_task_started_event_attributes"):
            started = event.activity_task_started_event_attributes
            if started.scheduled_event_id in scheduled:
                return scheduled[started.scheduled_event_id], started.identity
    raise AssertionError(f"{activity_type} never started in {handle.id}")


@pytest.mark.slow
async def test_v050_pipelines_finish_under_our_worker(
        client: Client, pipeline_env_vars: dict[str, str], tmp_path: Path) -> None:
    env = {**pipeline_env_vars, **STANDIN_ENV}
    queue_dir, audit_dir = Path(env["TASK_QUEUE_DIR"]), Path(env["TEMPORAL_AUDIT_DIR"])
    v050_workflows = StandinProcess({**env, "V050_ROLE": "workflow"},
                                    tmp_path / "standin-workflows.log").start()
    v050_activities = StandinProcess({**env, "V050_ROLE": "activities"},
                                     tmp_path / "standin-activities.log").start()
    ours = WorkerProcess(pipeline_env_vars, tmp_path / "worker.log")
    try:
        # ---- v0.5.0 runs five pipelines ----
        runs = {build: await start_v050(client, env, build) for build in EXPECTED}
        handles = {build: handle for build, (handle, _) in runs.items()}
        origins = {build: task_id for build, (_, task_id) in runs.items()}
        await asyncio.gather(*(v050_agent(env, build, TASK_BUILD_PREFAB) for build in EXPECTED))
        await asyncio.gather(*(v050_agent(env, build, TASK_BUILD_PLAN) for build in EXPECTED
                               if build != "up-implement"))
        await asyncio.gather(
            v050_agent(env, "up-fixes", TASK_SECURITY_AUDIT, {"flags": ["pin the digest"]}),
            v050_agent(env, "up-parked", TASK_SECURITY_AUDIT,
                       {"blocks": ["token in values.yaml"], "info": ["fyi"]}),
            v050_agent(env, "up-notify", TASK_SECURITY_AUDIT,
                       {"blocks": ["world-readable key"], "flags": ["chmod 600 env"]}),
            v050_agent(env, "up-summary", TASK_SECURITY_AUDIT, {}))
        implement_task = await wait_for_build_task(queue_dir, "up-implement", TASK_BUILD_PLAN, 60)
        fix_task = await wait_for_build_task(queue_dir, "up-fixes", TASK_SECURITY_FIX, 60)
        await poll_async(lambda: stage_7_activity_running(handles["up-parked"]), 60,
                    "v0.5.0's stage 7 running")
        assert read_task(find_task(queue_dir, origins["up-parked"]))["status"] \
            == INPUT_REQUIRED
        await wait_for_build_task(queue_dir, "up-notify", TASK_SECURITY_FIX, 60)
        await wait_for_build_task(queue_dir, "up-summary", TASK_BUILD_CLOSEOUT, 60)

        # ---- v0.5.0 stops: its activity half first, so the workflow half schedules
        # the next activities of two pipelines that nothing then starts ----
        v050_activities.stop()
        await asyncio.gather(v050_agent(env, "up-notify", TASK_SECURITY_FIX),
                             v050_agent(env, "up-summary", TASK_BUILD_CLOSEOUT))
        await poll_async(lambda: scheduled_unstarted(handles["up-notify"], NOTIFY_BLOCKS), 30,
                    "v0.5.0's notify_blocks scheduled")
        await poll_async(lambda: scheduled_unstarted(handles["up-summary"], SUMMARIZE_WORKFLOW),
                    30, "v0.5.0's summarize_workflow scheduled")
        v050_workflows.stop()

        # ---- our worker starts on the same queue ----
        ours.start()
        await asyncio.to_thread(ours.wait_ready)
        identity = f"{socket.gethostname()}:{ours.pid}"

        # Stage 2: the agent finishes with the v0.5.0 task file it has.
        await complete_task(implement_task, env, "success", "build_plan-done")
        # Stage 5: v0.5.0's agents pass the token on the command line.
        token = load_yaml(fix_task)["payload"]["task_token"]
        fixed = await asyncio.to_thread(run_cli, [token, "success", "security_fix-done"], env)
        assert fixed.returncode == 0, fixed.stderr

        # From here on every stage is ours: our task files, found by workflow id.
        await our_agent(env, handles["up-implement"].id, TASK_SECURITY_AUDIT, "audited",
                        lambda: write_triage(audit_dir, "up-implement", "info:\n- fyi\n"))
        await our_agent(env, handles["up-implement"].id, TASK_BUILD_CLOSEOUT, "/srv/out/impl")
        await our_agent(env, handles["up-fixes"].id, TASK_BUILD_CLOSEOUT, "/srv/out/fixes")

        # v0.5.0's notify_blocks ran here; the pipeline then waits in our stage 7.
        status = await poll_async(lambda: parked_status(handles["up-notify"]), 60,
                             "up-notify waiting for a block decision")
        assert status["waiting_on"]["kind"] == "block_decision"
        approve(queue_dir, origins["up-notify"])
        await our_agent(env, handles["up-notify"].id, TASK_BUILD_CLOSEOUT, "/srv/out/notify")

        # Stage 7: the old activity's heartbeat times out; the pipeline keeps waiting.
        parked = handles["up-parked"]
        await poll_async(lambda: old_stage_7_timed_out(parked), HEARTBEAT_SECONDS + 60,
                    "v0.5.0's stage-7 activity to time out")
        status = await poll_async(lambda: parked_status(parked), 30, "parked pipeline waiting")
        assert status["waiting_on"]["kind"] == "block_decision"
        assert status["adopted"] is True, status
        assert (await parked.describe()).status == WorkflowExecutionStatus.RUNNING
        approve(queue_dir, origins["up-parked"])
        await our_agent(env, parked.id, TASK_BUILD_CLOSEOUT, "/srv/out/parked")

        results = {build: await asyncio.wait_for(handle.result(), 120)
                   for build, handle in handles.items()}
        # v0.5.0's scheduled activities ran on our worker, with v0.5.0's arguments.
        notify_args, notify_worker = await started_by(handles["up-notify"], NOTIFY_BLOCKS)
        assert notify_args == ["up-notify", origins["up-notify"], ["world-readable key"]]
        summary_args, summary_worker = await started_by(handles["up-summary"],
                                                        SUMMARIZE_WORKFLOW)
        assert len(summary_args) == 9
        assert summary_args[1] == "up-summary"
        assert notify_worker == summary_worker == identity
    finally:
        v050_activities.stop()
        v050_workflows.stop()
        ours.stop()

    for build, (outcome, stages, closeout) in EXPECTED.items():
        result = results[build]
        assert result["outcome"] == outcome, result
        assert result["status"] == "complete"
        assert result["workflow_id"] == handles[build].id
        assert result["build_name"] == build
        assert result["stages_completed"] == stages
        assert result["closeout_path"] == closeout
        summary_path = Path(result["summary_path"])
        assert summary_path.is_relative_to(Path(env["SUMMARY_DIR"]))
        summary = yaml.safe_load(summary_path.read_text())
        assert summary["adopted"] is True, summary
        assert summary["outcome"] == outcome, summary
        assert summary["stages_completed"] == stages
        assert summary["build_report_path"] == closeout
        events = [e["event"] for e in summary["events"]]
        # up-summary's summary was written from v0.5.0's arguments, before this worker
        # replayed the run; every other summary tells of the adoption.
        assert ("v050_arguments" if build == "up-summary" else ADOPTED_EVENT) in events, events
    assert (results["up-fixes"]["flags"], results["up-fixes"]["blocks"]) == (1, 0)
    parked_result = results["up-parked"]
    assert (parked_result["blocks"], parked_result["info"]) == (1, 1)
    for build in ("up-parked", "up-notify"):
        assert results[build]["decision"] == "approved"
        summary = yaml.safe_load(Path(results[build]["summary_path"]).read_text())
        assert summary["decision"] == "approved"
        assert summary["decision_source"] == "task_file"
    parked_summary = yaml.safe_load(Path(parked_result["summary_path"]).read_text())
    assert parked_summary["blocks"][0]["description"] == "token in values.yaml"
    notify_origin = read_task(find_task(queue_dir, origins["up-notify"]))
    assert any(handles["up-notify"].id in str(entry.get("note"))
               for entry in notify_origin["history"])
    # Our worker carried them without one failed workflow task.
    failures = [r for r in ours.log_records() if "Failed activation" in str(r.get("event"))
                or "nondetermin" in str(r).lower()]
    assert not failures, failures[:3]
