"""v0.5.0's positional activity arguments: each translation into our models, and each
activity run with them (ActivityEnvironment, real files), next to our own one-model form.

The v0.5.0 arguments used here are the ones recorded in tests/histories/v050/."""

from __future__ import annotations

import dataclasses
import json
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio import activity
from temporalio.client import WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import legacy_args
from activities.build_pipeline_activities import PipelineActivities
from config import WorkerConfig, load_config
from exceptions import InvalidInputError, LegacyWaitHandedOverError
from models import AgentTaskRequest, BlockCheckInput, SummaryInput
from standins.agents import load_yaml, write_origin_task
from taskfiles.documents import add_history, read_task
from taskfiles.lookup import find_task, update_task
from tests.agents import assert_valid_task_file
from vocabulary import (
    APPLY_FLAG_FIXES,
    AUDIT_REQUESTS_DIR,
    BUILD_PHASE,
    BUILD_PIPELINE_WORKFLOW,
    CLOSE_BUILD,
    DIALECT_V050,
    IMPLEMENT_BUILD,
    INPUT_REQUIRED,
    NOTIFY_BLOCKS,
    PREFAB_SCAFFOLDING,
    PROCESS_TRIAGE_OUTPUT,
    REQUEST_SECURITY_AUDIT,
    SUBMITTED,
    SUMMARIZE_WORKFLOW,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
    TASK_SECURITY_FIX,
    WAIT_FOR_BLOCK_RESOLUTION,
)

V050 = Path(__file__).resolve().parent / "histories" / "v050"
CALL = legacy_args.CallContext("build-v050-blocks-approved", "run-1", "5")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def recorded_args(history_name: str, activity_name: str) -> tuple[Any, ...]:
    """The decoded positional arguments v0.5.0 scheduled `activity_name` with."""
    path = V050 / f"{history_name}.json"
    history = WorkflowHistory.from_json(history_name, json.loads(path.read_text()))
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            attributes = event.activity_task_scheduled_event_attributes
            if attributes.activity_type.name == activity_name:
                return tuple(json.loads(p.data) for p in attributes.input.payloads)
    raise AssertionError(f"{activity_name} not in {history_name}")


def refused(call: Any, *args: Any) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        call(*args)
    assert caught.value.type == InvalidInputError.failure_type
    assert caught.value.non_retryable
    return caught.value


# ---- translations -----------------------------------------------------------------------

def test_only_one_json_object_is_our_own_form() -> None:
    assert not legacy_args.is_legacy(({"task_id": "x"},))
    assert legacy_args.is_legacy(("web",))
    assert legacy_args.is_legacy(("web", "/plans/web.md"))
    assert legacy_args.is_legacy(({"a": 1}, "extra"))
    assert legacy_args.is_legacy(())


def test_task_id_of_a_v050_call_is_stable_per_activity_and_uuid4_shaped() -> None:
    first = legacy_args.task_id_for(CALL)
    assert UUID4.match(first), first
    assert legacy_args.task_id_for(CALL) == first
    assert legacy_args.task_id_for(dataclasses.replace(CALL, activity_id="6")) != first
    assert legacy_args.task_id_for(dataclasses.replace(CALL, run_id="run-2")) != first


def test_prefab_args() -> None:
    args = recorded_args("v050-blocks-approved", PREFAB_SCAFFOLDING)
    request = legacy_args.agent_request(PREFAB_SCAFFOLDING, args, CALL)
    assert args[1] in request.instruction
    assert (request.build_name, request.plan_path) == args
    assert request.task_type == TASK_BUILD_PREFAB
    assert (request.target_agent, request.agent_setting) == ("", "prefab_agent")
    assert request.task_id == legacy_args.task_id_for(CALL)


def recorded_input(history_name: str) -> dict[str, Any]:
    path = V050 / f"{history_name}.json"
    history = WorkflowHistory.from_json(history_name, json.loads(path.read_text()))
    started = history.events[0].workflow_execution_started_event_attributes
    return json.loads(started.input.payloads[0].data)


def test_implement_args_carry_the_originating_task_id() -> None:
    args = recorded_args("v050-blocks-approved", IMPLEMENT_BUILD)
    request = legacy_args.agent_request(IMPLEMENT_BUILD, args, CALL)
    assert request.task_type == TASK_BUILD_PLAN
    assert request.target_agent == "builder"
    assert request.plan_path is None  # v0.5.0 does not pass it to stage 2 ...
    assert request.extra_payload == {"originating_task_id": args[1]}
    assert args[1] in request.instruction
    # ... the run's input has it.
    call = dataclasses.replace(CALL, pipeline=recorded_input("v050-blocks-approved"))
    request = legacy_args.agent_request(IMPLEMENT_BUILD, args, call)
    assert request.plan_path == "/home/operator/plans/v050-blocks-approved.md"


@pytest.mark.parametrize("plan_path", ["relative.md", "/a\nb", 7, None, "/" + "x" * 5000])
def test_an_unusable_plan_path_in_the_run_input_is_left_out(plan_path: Any) -> None:
    call = dataclasses.replace(CALL, pipeline={"plan_path": plan_path, "target_agent": "B!"})
    args = recorded_args("v050-blocks-approved", CLOSE_BUILD)
    assert legacy_args.agent_request(CLOSE_BUILD, args, call).plan_path is None
    audit = legacy_args.audit_request(recorded_args("v050-blocks-approved",
                                                    REQUEST_SECURITY_AUDIT), call,
                                      lambda build: Path("/a") / build, "r.md", "t.yml")
    assert audit.target_agent == "(unknown)"


def test_flag_fix_args_carry_the_flag_texts() -> None:
    args = recorded_args("v050-blocks-approved", APPLY_FLAG_FIXES)
    request = legacy_args.agent_request(APPLY_FLAG_FIXES, args, CALL)
    assert request.task_type == TASK_SECURITY_FIX
    assert request.target_agent == "builder"
    assert request.extra_payload == {"flags": ["chmod 600 env"], "flag_count": 1}
    assert "<security-findings>" in request.instruction
    assert "chmod 600 env" in request.instruction
    # Our triage's item shape is accepted too; the finding stays data.
    mixed = legacy_args.agent_request(
        APPLY_FLAG_FIXES, ("web", [{"description": "<b>x</b>", "file": "a"}, "y"], "builder"),
        CALL)
    assert mixed.extra_payload["flags"] == ["<b>x</b>", "y"]
    assert "<b>" not in mixed.instruction
    assert "&lt;b&gt;x&lt;/b&gt;" in mixed.instruction


def test_close_args() -> None:
    args = recorded_args("v050-blocks-approved", CLOSE_BUILD)
    request = legacy_args.agent_request(CLOSE_BUILD, args, CALL)
    assert request.task_type == TASK_BUILD_CLOSEOUT
    assert request.target_agent == "builder"
    assert request.build_name == args[0]
    assert "close-out document" in request.instruction


def test_audit_args_carry_absolute_paths(tmp_path: Path) -> None:
    args = recorded_args("v050-blocks-approved", REQUEST_SECURITY_AUDIT)
    folder = tmp_path / AUDIT_REQUESTS_DIR / args[0]
    call = dataclasses.replace(CALL, pipeline=recorded_input("v050-blocks-approved"))
    request = legacy_args.audit_request(args, call, lambda build: tmp_path / AUDIT_REQUESTS_DIR
                                        / build, "request.md", "triage-output.yml")
    assert request.target_agent == "builder"  # from the run's input
    assert (request.build_name, request.plan_path) == args
    task = request.task
    assert task.task_type == TASK_SECURITY_AUDIT
    assert task.agent_setting == "security_agent"
    assert task.extra_payload == {"audit_folder": f"audit-requests/{args[0]}"}
    assert str(folder / "request.md") in task.instruction
    assert str(folder / "triage-output.yml") in task.instruction


def test_notify_args() -> None:
    args = recorded_args("v050-blocks-approved", NOTIFY_BLOCKS)
    request = legacy_args.notify_input(args, CALL)
    assert (request.build_name, request.task_id) == args[:2]
    assert request.workflow_id == CALL.workflow_id
    assert [block.description for block in request.blocks] == ["token in values.yaml"]


def test_wait_args() -> None:
    args = recorded_args("v050-parked", WAIT_FOR_BLOCK_RESOLUTION)
    assert legacy_args.block_check(args) == BlockCheckInput(task_id=args[1])


def test_summary_args_with_blocks_are_partial() -> None:
    args = recorded_args("v050-blocks-approved", SUMMARIZE_WORKFLOW)
    call = dataclasses.replace(CALL, pipeline=recorded_input("v050-blocks-approved"))
    summary = legacy_args.summary_input(args, call)
    assert summary.workflow_id == args[0]
    assert summary.build_name == args[1]
    assert summary.target_agent == "builder"
    assert summary.task_id == "842daac3-5dce-436d-b4df-3197d43c0100"
    assert summary.run_id == CALL.run_id
    assert summary.started_at.isoformat() == args[2]
    assert summary.ended_at.isoformat() == args[3]
    assert summary.outcome == "partial"
    assert summary.decision == "approved"
    assert summary.stages_completed == [
        PREFAB_SCAFFOLDING, IMPLEMENT_BUILD, REQUEST_SECURITY_AUDIT,
        PROCESS_TRIAGE_OUTPUT, APPLY_FLAG_FIXES, NOTIFY_BLOCKS,
        WAIT_FOR_BLOCK_RESOLUTION, CLOSE_BUILD, SUMMARIZE_WORKFLOW]
    assert (len(summary.blocks), len(summary.flags), len(summary.info)) == (1, 1, 0)
    assert summary.plan_path == args[7]
    assert summary.closeout_path == args[8]
    assert [event.event for event in summary.events] == ["v050_arguments"]
    assert summary.adopted


def test_summary_args_without_blocks_are_success() -> None:
    args = recorded_args("v050-clean", SUMMARIZE_WORKFLOW)
    summary = legacy_args.summary_input(
        args, dataclasses.replace(CALL, workflow_id="build-v050-clean"))
    assert summary.outcome == "success"
    assert summary.decision is None
    assert APPLY_FLAG_FIXES not in summary.stages_completed
    assert NOTIFY_BLOCKS not in summary.stages_completed
    assert (len(summary.blocks), len(summary.flags)) == (0, 0)


def test_bad_v050_arguments_fail_at_once_naming_the_problem() -> None:
    agent = legacy_args.agent_request
    assert "2 positional" in refused(agent, PREFAB_SCAFFOLDING, ("web",), CALL).message
    assert "build_name" in refused(agent, PREFAB_SCAFFOLDING, ("Web!", "/p.md"), CALL).message
    assert "absolute" in refused(agent, PREFAB_SCAFFOLDING, ("web", "p.md"), CALL).message
    assert "separators" in refused(agent, IMPLEMENT_BUILD, ("web", "../x", "b"), CALL).message
    assert "target_agent" in refused(agent, CLOSE_BUILD, ("web", "B B"), CALL).message
    assert "flags" in refused(agent, APPLY_FLAG_FIXES, ("web", "x", "b"), CALL).message
    assert "flags" in refused(agent, APPLY_FLAG_FIXES, ("web", [""], "b"), CALL).message
    assert "no v0.5.0 form" in refused(agent, BUILD_PHASE, ("x",), CALL).message
    assert "control" in refused(legacy_args.notify_input, ("web", "a\nb", ["x"]), CALL).message
    args = list(recorded_args("v050-clean", SUMMARIZE_WORKFLOW))
    call = dataclasses.replace(CALL, workflow_id=args[0])
    assert "not the workflow" in refused(legacy_args.summary_input, tuple(args), CALL).message
    assert "phases" in refused(legacy_args.summary_input,
                               tuple([*args[:4], ["deploy"], *args[5:]]), call).message
    assert "count" in refused(legacy_args.summary_input,
                              tuple([*args[:5], -1, *args[6:]]), call).message
    assert "ISO" in refused(legacy_args.summary_input,
                            tuple([*args[:2], "yesterday", *args[3:]]), call).message


def test_own_model_errors_name_the_field() -> None:
    error = refused(legacy_args.own_input, SummaryInput, ({"workflow_id": "x"},),
                    SUMMARIZE_WORKFLOW)
    assert error.message.startswith("summarize_workflow: ")


# ---- the activities, run with v0.5.0 arguments -------------------------------------------

@pytest.fixture
def run_input(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The run's input as the history read returns it (here: the recorded one)."""
    pipeline = recorded_input("v050-blocks-approved")

    async def start_input(call: legacy_args.CallContext) -> dict[str, Any]:
        assert (call.workflow_id, call.run_id) == (CALL.workflow_id, CALL.run_id)
        return pipeline

    monkeypatch.setattr(legacy_args, "_start_input", start_input)
    return pipeline


@pytest.fixture
def config(tmp_path: Path) -> WorkerConfig:
    """v0.5.0's calls, checked against v0.5.0's file contract (TASK_FILE_DIALECT=v050)."""
    return load_config({"HOME": str(tmp_path), "TASK_QUEUE_DIR": str(tmp_path / "queue"),
                        "TEMPORAL_AUDIT_DIR": str(tmp_path / "artifacts"),
                        "SUMMARY_DIR": str(tmp_path / "summaries"),
                        "TASK_FILE_DIALECT": DIALECT_V050})


def environment(activity_type: str, call: legacy_args.CallContext = CALL) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        ActivityEnvironment.default_info(), activity_type=activity_type,
        activity_id=call.activity_id, workflow_id=call.workflow_id,
        workflow_run_id=call.run_id, workflow_type=BUILD_PIPELINE_WORKFLOW,
        task_token=b"token-of-" + activity_type.encode())
    return env


async def suspended(env: ActivityEnvironment, fn: Any, *args: Any) -> None:
    """An agent stage ends by suspending (async completion), never by returning."""
    with pytest.raises(activity._CompleteAsyncError):  # the SDK's private suspend signal
        await env.run(fn, *args)


def only_task_path(config: WorkerConfig) -> Path:
    files = sorted(config.task_queue_dir.glob("*.yml"))
    assert len(files) == 1, files
    return files[0]


def only_task(config: WorkerConfig) -> tuple[Path, dict[str, Any]]:
    path = only_task_path(config)
    return path, assert_valid_task_file(path)


def origin_task(config: WorkerConfig, task_id: str, status: str = SUBMITTED) -> Path:
    write_origin_task(config.task_queue_dir, "web", task_id=task_id)
    path = find_task(config.task_queue_dir, task_id)
    if status != SUBMITTED:
        update_task(path, lambda task: add_history(task, status=status, actor="alice",
                                                    note="decided"))
    return path


@pytest.mark.parametrize(("stage", "history_name", "fields"), [
    (PREFAB_SCAFFOLDING, "v050-blocks-approved", {"plan_path"}),
    (IMPLEMENT_BUILD, "v050-blocks-approved", {"originating_task_id"}),
    (APPLY_FLAG_FIXES, "v050-blocks-approved", {"flags"}),
    (CLOSE_BUILD, "v050-blocks-approved", set()),
])
async def test_agent_stage_with_v050_args_writes_a_task_with_v050_fields(
        config: WorkerConfig, run_input: dict[str, Any], stage: str, history_name: str,
        fields: set[str]) -> None:
    args = recorded_args(history_name, stage)
    await suspended(environment(stage), getattr(PipelineActivities(config), stage), *args)
    _, task = only_task(config)
    assert task["id"] == legacy_args.task_id_for(CALL)
    payload = task["payload"]
    # v0.5.0's fields for this task type, beside ours.
    assert {"build_name", "instruction", "task_token"} | fields <= set(payload)
    assert payload["build_name"] == args[0]
    assert payload["activity_type"] == stage
    assert payload["workflow_id"] == CALL.workflow_id
    if stage == IMPLEMENT_BUILD:
        assert payload["originating_task_id"] == args[1]
    if stage == APPLY_FLAG_FIXES:
        assert payload["flags"] == args[1]
    assert payload["plan_path"] == run_input["plan_path"]
    if stage == PREFAB_SCAFFOLDING:
        assert task["target_agent"] == config.prefab_agent
    else:
        assert task["target_agent"] == args[-1]


async def test_agent_stage_with_v050_args_when_the_run_input_cannot_be_read(
        config: WorkerConfig) -> None:
    """No client here: the history read fails; the task is still handed to the agent."""
    args = recorded_args("v050-blocks-approved", CLOSE_BUILD)
    await suspended(environment(CLOSE_BUILD), PipelineActivities(config).close_build, *args)
    path = only_task_path(config)
    payload = load_yaml(path)["payload"]
    assert "plan_path" not in payload
    assert payload["build_name"] == args[0]


async def test_agent_stage_keeps_our_own_form(config: WorkerConfig) -> None:
    request = AgentTaskRequest(task_id="2b1e0f3a-7c51-4d2e-9f6a-0123456789ab", build_name="web",
                               target_agent="builder", task_type=TASK_BUILD_PLAN, summary="s",
                               instruction="do it", plan_path="/plans/web.md",
                               extra_payload={"originating_task_id": "T-1"})
    await suspended(environment(IMPLEMENT_BUILD), PipelineActivities(config).implement_build,
                    request.model_dump(mode="json"))
    _, task = only_task(config)
    assert task["id"] == request.task_id
    assert task["payload"]["originating_task_id"] == "T-1"


@pytest.mark.usefixtures("run_input")
async def test_audit_with_v050_args_writes_request_and_task(config: WorkerConfig) -> None:
    args = recorded_args("v050-blocks-approved", REQUEST_SECURITY_AUDIT)
    activities = PipelineActivities(config)
    await suspended(environment(REQUEST_SECURITY_AUDIT), activities.request_security_audit,
                    *args)
    folder = config.audit_dir / AUDIT_REQUESTS_DIR / args[0]
    request = folder / "request.md"
    assert stat.S_IMODE(request.stat().st_mode) == 0o600
    assert args[1] in request.read_text()
    _, task = only_task(config)
    assert task["target_agent"] == config.security_agent
    assert task["payload"]["audit_request_path"] == str(request)
    assert task["payload"]["output_dir"] == str(folder)
    assert task["payload"]["plan_path"] == args[1]


async def test_notify_with_v050_args_returns_nothing_and_marks_the_origin(
        config: WorkerConfig) -> None:
    args = recorded_args("v050-blocks-approved", NOTIFY_BLOCKS)
    origin_task(config, args[1])
    result = await environment(NOTIFY_BLOCKS).run(
        PipelineActivities(config).notify_blocks, *args)
    assert result is None
    task = read_task(find_task(config.task_queue_dir, args[1]))
    assert task["status"] == INPUT_REQUIRED
    assert CALL.workflow_id in task["history"][-1]["note"]


async def test_wait_with_v050_args_hands_a_pending_decision_over(config: WorkerConfig) -> None:
    args = recorded_args("v050-parked", WAIT_FOR_BLOCK_RESOLUTION)
    origin_task(config, args[1], status=INPUT_REQUIRED)
    with pytest.raises(ApplicationError) as caught:
        await environment(WAIT_FOR_BLOCK_RESOLUTION).run(
            PipelineActivities(config).wait_for_block_resolution, *args)
    assert caught.value.type == LegacyWaitHandedOverError.failure_type
    assert caught.value.non_retryable


async def test_wait_with_v050_args_returns_nothing_when_already_approved(
        config: WorkerConfig) -> None:
    args = recorded_args("v050-parked", WAIT_FOR_BLOCK_RESOLUTION)
    origin_task(config, args[1], status="approved")
    # Called with what arrives on the wire: v0.5.0's arguments, then our own form as JSON.
    look: Callable[..., Any] = PipelineActivities(config).wait_for_block_resolution
    assert await environment(WAIT_FOR_BLOCK_RESOLUTION).run(look, *args) is None
    # Our own form still answers with a resolution.
    resolution = await environment(WAIT_FOR_BLOCK_RESOLUTION).run(look, {"task_id": args[1]})
    assert resolution is not None
    assert (resolution.decision, resolution.actor) == ("approved", "alice")


async def test_wait_with_v050_args_ignores_the_file_when_file_decisions_are_off(
        config: WorkerConfig) -> None:
    args = recorded_args("v050-parked", WAIT_FOR_BLOCK_RESOLUTION)
    origin_task(config, args[1], status="approved")
    strict = config.model_copy(update={"file_decisions": False})
    with pytest.raises(ApplicationError) as caught:
        await environment(WAIT_FOR_BLOCK_RESOLUTION).run(
            PipelineActivities(strict).wait_for_block_resolution, *args)
    assert caught.value.type == LegacyWaitHandedOverError.failure_type


async def test_summary_with_v050_args(config: WorkerConfig, run_input: dict[str, Any]) -> None:
    args = recorded_args("v050-blocks-approved", SUMMARIZE_WORKFLOW)
    path = Path(await environment(SUMMARIZE_WORKFLOW).run(
        PipelineActivities(config).summarize_workflow, *args))
    assert path == config.summary_dir / "2026-11" / f"{args[0]}.yml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    summary = yaml.safe_load(path.read_text())
    assert summary["outcome"] == "partial"
    assert summary["build_name"] == args[1]
    assert summary["counts"] == {"blocks": 1, "flags": 1, "info": 0}
    assert summary["closeout_path"] == args[8]
    assert summary["plan_path"] == args[7]
    assert summary["run_id"] == CALL.run_id
    assert summary["adopted"] is True
    assert (summary["task_id"], summary["target_agent"]) == (run_input["task_id"], "builder")
    # v0.5.0's own keys, from v0.5.0's own arguments.
    assert (summary["blocks_hit"], summary["flags_applied"]) == (args[5], args[6])
    assert summary["phases_completed"] == args[4]
    assert summary["build_report_path"] == args[8]
