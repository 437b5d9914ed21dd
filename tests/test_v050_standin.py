"""The v0.5.0 stand-in (tests/v050_standin.py) is faithful, and our activities serve
v0.5.0's calls.

1. The stand-in, as its own process on a real dev server, runs the clean, flags and
   blocks-approved paths with the recorded inputs and triage; its histories match the
   recorded v0.5.0 ones (tests/histories/v050/) event by event: event types, activity
   names, arguments, timeouts, retry policies and results (ids, times and paths aside).
2. The stand-in's *workflow* on a queue where only OUR activities run: every activity it
   schedules with v0.5.0's arguments runs on our worker; agents finish the task files our
   worker writes; the v0.5.0 workflow completes (flags path) and our worker's stage 7
   hands a pending decision back (blocks path).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker

from activities.build_pipeline_activities import PipelineActivities
from config import load_config
from exceptions import LegacyWaitHandedOverError
from standins.agents import (
    complete_task,
    poll,
    wait_for_build_task,
    write_origin_task,
    write_triage,
)
from taskfiles.documents import add_history, read_task
from taskfiles.lookup import find_task, update_task
from tests.agents import assert_valid_task_file
from tests.v050_standin import WORKFLOW_TYPE, StandinProcess

pytestmark = pytest.mark.slow

RECORDED = Path(__file__).resolve().parent / "histories" / "v050"
# What the recording's agents and security agent did, per path.
PATHS: dict[str, dict[str, Any]] = {
    "v050-clean": {"triage": {"blocks": [], "flags": [], "info": ["fyi"]}},
    "v050-flags-done": {"triage": {"blocks": [], "flags": ["pin the base image digest"],
                                   "info": []}},
    "v050-blocks-approved": {"triage": {"blocks": ["token in values.yaml"],
                                        "flags": ["chmod 600 env"], "info": []}},
}
STANDIN_ENV = {"V050_BLOCK_POLL_SECONDS": "0.2"}


def recorded(name: str) -> WorkflowHistory:
    document = json.loads((RECORDED / f"{name}.json").read_text())
    started = document["events"][0]["workflowExecutionStartedEventAttributes"]
    return WorkflowHistory.from_json(started["workflowId"], document)


def decode(payloads: Any) -> list[Any]:
    return [json.loads(p.data) if p.data else None for p in payloads]


def recorded_input(history: WorkflowHistory) -> dict[str, Any]:
    started = history.events[0].workflow_execution_started_event_attributes
    return decode(started.input.payloads)[0]


def outline(history: WorkflowHistory) -> list[list[Any]]:
    """What must match a recording: one row per event, with ids, times and paths left
    out (the workflow id is normalised by the caller)."""
    rows: list[list[Any]] = []
    for event in history.events:
        row: list[Any] = [EventType.Name(event.event_type)]
        if event.HasField("activity_task_scheduled_event_attributes"):
            a = event.activity_task_scheduled_event_attributes
            args = decode(a.input.payloads)
            if a.activity_type.name == "summarize_workflow":
                args[2] = args[3] = "<time>"
            retry = a.retry_policy
            row += [a.activity_type.name, args,
                    {"schedule_to_close": a.schedule_to_close_timeout.ToSeconds(),
                     "schedule_to_start": a.schedule_to_start_timeout.ToSeconds(),
                     "start_to_close": a.start_to_close_timeout.ToSeconds(),
                     "heartbeat": a.heartbeat_timeout.ToSeconds()},
                    {"initial": retry.initial_interval.ToSeconds(),
                     "backoff": retry.backoff_coefficient,
                     "maximum_interval": retry.maximum_interval.ToSeconds(),
                     "maximum_attempts": retry.maximum_attempts,
                     "non_retryable": list(retry.non_retryable_error_types)}]
        elif event.HasField("activity_task_completed_event_attributes"):
            row.append(decode(event.activity_task_completed_event_attributes.result.payloads))
        elif event.HasField("workflow_execution_completed_event_attributes"):
            row.append(decode(
                event.workflow_execution_completed_event_attributes.result.payloads))
        rows.append(row)
    # The summary's path is the one path an activity returns.
    for row in rows:
        for value in row[1:]:
            for item in value if isinstance(value, list) else []:
                if isinstance(item, str) and item.endswith(".yml"):
                    value[value.index(item)] = "<summary path>"
                if isinstance(item, dict) and "summary_path" in item:
                    item["summary_path"] = "<summary path>"
    return rows


def origin_task(queue_dir: Path, task_id: str) -> Path:
    write_origin_task(queue_dir, "origin", task_id=task_id)
    return find_task(queue_dir, task_id)


async def approve_when_asked(queue_dir: Path, task_id: str) -> None:
    """The operator: once stage 6 marked the originating task, approve it in the file."""
    path = find_task(queue_dir, task_id)
    await poll(lambda: read_task(path).get("status") == "input-required", 60,
               what="originating task marked input-required")
    update_task(path, lambda task: add_history(task, status="approved", actor="alice",
                                                note="accepted risk"))


async def play_agents(queue_dir: Path, env: dict[str, str], build: str,
                      triage: dict[str, list[str]], *, audit_dir: Path) -> list[Path]:
    """The agents of one v0.5.0 pipeline, with the recording's outputs."""
    played = []
    stages = ["build_prefab", "build_plan", "security_audit"]
    if triage["flags"]:
        stages.append("security_fix")
    stages.append("build_closeout")
    for task_type in stages:
        path = await wait_for_build_task(queue_dir, build, task_type, timeout=60)
        if task_type == "security_audit":
            write_triage(audit_dir, build, yaml.safe_dump(triage))
        output = (f"/home/operator/closeout/{build}" if task_type == "build_closeout"
                  else f"{task_type}-done")
        await complete_task(path, env, "success", output)
        played.append(path)
    return played


async def run_recorded_path(client: Client, env: dict[str, str], name: str
                            ) -> tuple[WorkflowHistory, dict[str, Any], list[Path]]:
    history = recorded(name)
    pipeline = recorded_input(history)
    queue_dir, audit_dir = Path(env["TASK_QUEUE_DIR"]), Path(env["TEMPORAL_AUDIT_DIR"])
    origin_task(queue_dir, pipeline["task_id"])
    workflow_id = f"{history.workflow_id}-{uuid.uuid4().hex[:8]}"
    handle = await client.start_workflow(WORKFLOW_TYPE, pipeline, id=workflow_id,
                                         task_queue=env["TASK_QUEUE"])
    jobs: list[Coroutine[Any, Any, Any]] = [
        play_agents(queue_dir, env, pipeline["build_name"], PATHS[name]["triage"],
                    audit_dir=audit_dir)]
    if PATHS[name]["triage"]["blocks"]:
        jobs.append(approve_when_asked(queue_dir, pipeline["task_id"]))
    played, *_ = await asyncio.gather(*jobs)
    result = await asyncio.wait_for(handle.result(), 60)
    return await handle.fetch_history(), result, played


async def test_standin_writes_the_recorded_v050_histories(
        client: Client, pipeline_env_vars: dict[str, str], tmp_path: Path) -> None:
    env = {**pipeline_env_vars, **STANDIN_ENV}
    standin = StandinProcess(env, tmp_path / "standin.log").start()
    try:
        runs = await asyncio.gather(*(run_recorded_path(client, env, name) for name in PATHS))
    finally:
        standin.stop()
    for name, (history, result, played) in zip(PATHS, runs, strict=True):
        want = outline(recorded(name))
        got = json.loads(json.dumps(outline(history)).replace(
            history.workflow_id, recorded(name).workflow_id))
        assert [row[0] for row in got] == [row[0] for row in want], name
        for index, (mine, theirs) in enumerate(zip(got, want, strict=True)):
            assert mine == theirs, f"{name} event {index + 1}: {mine} != {theirs}"
        assert result["status"] == "complete"
        assert result["workflow_id"] == history.workflow_id
        summary = yaml.safe_load(Path(result["summary_path"]).read_text())
        assert summary["outcome"] == ("partial" if "blocks" in name else "success")
        # v0.5.0 task files: v0.5.0's payload fields, the token, no workflow ids.
        payloads = {yaml.safe_load(p.read_text())["task_type"]:
                    yaml.safe_load(p.read_text())["payload"] for p in played}
        assert set(payloads["build_plan"]) == {"build_name", "originating_task_id",
                                               "instruction", "task_token"}
        assert set(payloads["security_audit"]) == {"build_name", "plan_path",
                                                   "audit_request_path", "output_dir",
                                                   "instruction", "task_token"}
        assert Path(payloads["security_audit"]["audit_request_path"]).is_file()
        if "security_fix" in payloads:
            assert payloads["security_fix"]["flags"] == PATHS[name]["triage"]["flags"]


@pytest.fixture
async def v050_workflow_with_our_activities(
        client: Client, pipeline_env_vars: dict[str, str], tmp_path: Path):
    """The stand-in serving only its workflow, our worker serving only our activities,
    on one task queue."""
    env = {**pipeline_env_vars, **STANDIN_ENV, "V050_ROLE": "workflow"}
    config = load_config(pipeline_env_vars)
    standin = StandinProcess(env, tmp_path / "standin.log").start()
    ours = Worker(client, task_queue=config.task_queue,
                  activities=PipelineActivities(config).all())
    try:
        async with ours:
            yield env
    finally:
        standin.stop()


async def play_our_tasks(env: dict[str, str], build: str, triage: dict[str, list[str]],
                         task_types: list[str]) -> dict[str, dict[str, Any]]:
    queue_dir = Path(env["TASK_QUEUE_DIR"])
    tasks = {}
    for task_type in task_types:
        path = await wait_for_build_task(queue_dir, build, task_type, timeout=60)
        tasks[task_type] = assert_valid_task_file(path)  # our worker wrote it
        if task_type == "security_audit":
            Path(tasks[task_type]["payload"]["output_dir"], "triage-output.yml").write_text(
                yaml.safe_dump(triage))
        output = f"/srv/closeout/{build}" if task_type == "build_closeout" else "done"
        await complete_task(path, env, "success", output)
    return tasks


async def test_v050_calls_run_on_our_activities(
        client: Client, v050_workflow_with_our_activities: dict[str, str]) -> None:
    env = v050_workflow_with_our_activities
    queue_dir, summary_dir = Path(env["TASK_QUEUE_DIR"]), Path(env["SUMMARY_DIR"])
    build, task_id = "legacy-flags", str(uuid.uuid4())
    origin_task(queue_dir, task_id)
    triage = {"flags": ["pin the base image digest"], "info": ["fyi"]}
    handle = await client.start_workflow(
        WORKFLOW_TYPE, {"build_name": build, "plan_path": f"/srv/plans/{build}.md",
                        "task_id": task_id, "target_agent": "builder"},
        id=f"build-{build}-{uuid.uuid4().hex[:8]}", task_queue=env["TASK_QUEUE"])
    tasks = await play_our_tasks(env, build, triage, ["build_prefab", "build_plan",
                                                      "security_audit", "security_fix",
                                                      "build_closeout"])
    result = await asyncio.wait_for(handle.result(), 60)
    # The v0.5.0 workflow finished on our activities, reading results of its own shapes.
    assert result["status"] == "complete"
    assert result["workflow_id"] == handle.id
    summary_path = Path(result["summary_path"])
    assert summary_path.parent.parent == summary_dir
    summary = yaml.safe_load(summary_path.read_text())
    assert summary["outcome"] == "success"
    assert summary["counts"]["flags"] == 1
    assert summary["closeout_path"] == f"/srv/closeout/{build}"
    assert summary["stages_completed"][-2:] == ["close_build", "summarize_workflow"]
    # Our task files, with v0.5.0's payload fields for v0.5.0's calls.
    assert tasks["build_plan"]["payload"]["originating_task_id"] == task_id
    # v0.5.0 passes no plan path to stages 2, 5 and 8: it is read from the run's input.
    for task_type in ("build_plan", "security_fix", "build_closeout"):
        assert tasks[task_type]["payload"]["plan_path"] == f"/srv/plans/{build}.md"
    assert tasks["security_fix"]["payload"]["flags"] == triage["flags"]
    audit = tasks["security_audit"]["payload"]
    assert Path(audit["audit_request_path"]).is_file()
    assert audit["output_dir"] == str(Path(env["TEMPORAL_AUDIT_DIR"], "audit-requests", build))
    assert tasks["build_prefab"]["target_agent"] == "claudebox"
    assert tasks["security_audit"]["target_agent"] == "security-agent"
    # Every activity ran on our worker: the stand-in registered none.
    history = await handle.fetch_history()
    scheduled = [e.activity_task_scheduled_event_attributes.activity_type.name
                 for e in history.events if e.HasField("activity_task_scheduled_event_attributes")]
    assert scheduled == ["prefab_scaffolding", "implement_build", "request_security_audit",
                         "process_triage_output", "apply_flag_fixes", "close_build",
                         "summarize_workflow"]


async def test_v050_stage_7_is_handed_over_by_our_activities(
        client: Client, v050_workflow_with_our_activities: dict[str, str]) -> None:
    env = v050_workflow_with_our_activities
    queue_dir = Path(env["TASK_QUEUE_DIR"])
    build, task_id = "legacy-blocks", str(uuid.uuid4())
    origin = origin_task(queue_dir, task_id)
    handle = await client.start_workflow(
        WORKFLOW_TYPE, {"build_name": build, "plan_path": f"/srv/plans/{build}.md",
                        "task_id": task_id, "target_agent": "builder"},
        id=f"build-{build}-{uuid.uuid4().hex[:8]}", task_queue=env["TASK_QUEUE"])
    await play_our_tasks(env, build, {"blocks": ["token in values.yaml"]},
                         ["build_prefab", "build_plan", "security_audit"])
    with pytest.raises(WorkflowFailureError) as caught:
        await asyncio.wait_for(handle.result(), 60)
    # notify_blocks ran here with v0.5.0's arguments and marked the originating task ...
    task = read_task(origin)
    assert task["status"] == "input-required"
    assert handle.id in task["history"][-1]["note"]
    # ... and our stage 7 does not hold v0.5.0's 7-day activity open: it hands it back.
    cause = caught.value.cause
    assert isinstance(cause, ActivityError)
    assert cause.activity_type == "wait_for_block_resolution"
    assert isinstance(cause.cause, ApplicationError)
    assert cause.cause.type == LegacyWaitHandedOverError.failure_type
    history = await handle.fetch_history()
    completed = [e for e in history.events
                 if e.HasField("activity_task_completed_event_attributes")]
    # notify_blocks returned nothing, as v0.5.0's does.
    assert decode(completed[-1].activity_task_completed_event_attributes.result.payloads) \
        == [None]
