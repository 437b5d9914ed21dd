"""Re-audits after fixes, per-block verdicts and "changes requested", end to end on a real
dev server with the real worker; agents played through the CLI (v050 dialect) or the
platform's task tools (platform dialect)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from config import load_config
from exceptions import DecisionRefusedError, InvalidInputError
from models import BuildPipelineResult, PipelineStatus, StageEvent
from standins.agents import (
    complete_task,
    load_yaml,
    play_stage,
    tasks_for,
    wait_for_status,
    wait_for_task,
    wait_until_parked,
)
from standins.task_tools import TaskTools
from taskfiles.lookup import find_task, update_task
from tests.agents import assert_valid_task_file
from tests.conftest import PipelineEnv, make_env, serving
from tests.test_build_pipeline_workflow import pipeline_input, run_to_triage, summary_of
from tests.test_operator_controls import current_details
from vocabulary import (
    APPROVE_BLOCKS_UPDATE,
    AUDIT_REQUESTS_DIR,
    BUILD_PIPELINE_WORKFLOW,
    DIALECT_PLATFORM,
    EVENTS_QUERY,
    IN_PROGRESS,
    PLATFORM_TASK_AUDIT,
    PLATFORM_TASK_BUILD,
    PLATFORM_TASK_DOCS,
    PLATFORM_TASK_FIX,
    REQUEST_CHANGES_UPDATE,
    TASK_BUILD_CLOSEOUT,
    TASK_SECURITY_AUDIT,
    TASK_SECURITY_FIX,
)
from workflows.rounds import tally

PINNED = "Pin the base image digest"
HEADERS = "Add security headers"
TOKEN = "Token is logged in plain text"
PORT = "Admin port open to all"


def task_types(pipeline: PipelineEnv, workflow_id: str) -> list[str]:
    return sorted(task["task_type"] for path, task in tasks_for(pipeline.queue_dir, workflow_id)
                  if assert_valid_task_file(path))


async def reaudit(pipeline: PipelineEnv, handle: WorkflowHandle, triage: str) -> dict[str, Any]:
    """Play the next security re-audit: its triage where its payload says; its task."""
    path = await wait_for_task(pipeline.queue_dir, handle.id, TASK_SECURITY_AUDIT)
    task = load_yaml(path)
    Path(task["payload"]["triage_path"]).write_text(triage)
    await complete_task(path, pipeline.env, "success", "re-audit written")
    return task


async def refused(update: Any, failure_type: str) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as caught:
        await update
    cause = caught.value.cause
    assert isinstance(cause, ApplicationError), cause
    assert cause.type == failure_type, cause
    return cause.message


async def test_a_flag_the_one_reaudit_still_finds_becomes_a_block(
        pipeline: PipelineEnv) -> None:
    handle, _ = await run_to_triage(
        pipeline, "reaudit-one", f"flags:\n- {PINNED}\n- description: {HEADERS}\n  id: hdr\n",
        reaudit_rounds=1)
    fix = load_yaml(await play_stage(pipeline.queue_dir, handle.id, TASK_SECURITY_FIX,
                                     pipeline.env, message="pinned and headers added"))
    assert fix["payload"]["flags"] == [PINNED, HEADERS]
    second = await reaudit(pipeline, handle, f"flags:\n- description: {HEADERS}\n  id: hdr\n")

    folder = pipeline.audit_dir / AUDIT_REQUESTS_DIR / "reaudit-one" / "round-2"
    assert second["payload"]["audit_folder"] == f"{AUDIT_REQUESTS_DIR}/reaudit-one/round-2"
    assert second["payload"]["audit_round"] == 2
    assert second["payload"]["triage_path"] == str(folder / "triage-output.yml")
    assert str(folder / "request.md") in second["payload"]["instruction"]
    request = (folder / "request.md").read_text()
    assert "round 2" in request
    assert PINNED in request
    assert HEADERS in request
    assert "pinned and headers added" in request  # what the builder said it did

    status = await wait_until_parked(handle)
    assert (status.audit_round, status.reaudit_rounds) == (2, 1)
    assert [b.description for b in status.rounds[1].escalated_to_blocks] == [HEADERS]
    details = await current_details(handle)
    assert "Audit round 2 of at most 2" in details
    assert f"1. {HEADERS}" in details
    # No re-audit left: changes cannot be asked for; a block that is not there is no block.
    message = await refused(handle.execute_update(REQUEST_CHANGES_UPDATE, {"note": "again"}),
                            DecisionRefusedError.failure_type)
    assert "no re-audit round left" in message
    await refused(handle.execute_update(APPROVE_BLOCKS_UPDATE, {"verdicts": {"7": "accept"}}),
                  InvalidInputError.failure_type)
    answer = await handle.execute_update(APPROVE_BLOCKS_UPDATE,
                                         {"note": "tracked", "verdicts": {"hdr": "accept"}},
                                         result_type=str)
    assert answer == "approved"
    await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_CLOSEOUT, pipeline.env)
    result: BuildPipelineResult = await handle.result()

    assert (result.status, result.outcome) == ("complete", "partial")
    assert task_types(pipeline, handle.id).count(TASK_SECURITY_AUDIT) == 2
    assert task_types(pipeline, handle.id).count(TASK_SECURITY_FIX) == 1
    assert result.tally.model_dump() == {
        "blocks_accepted": 1, "blocks_rejected": 0, "blocks_changed": 0, "reaudits_run": 1,
        "flags_verified_fixed": 1, "flags_unverified": 1, "all_flags_verified_fixed": False}
    summary = summary_of(result)
    first, last = summary["audit_rounds"]
    assert [f["description"] for f in first["verified_fixed"]] == [PINNED]
    assert [f["description"] for f in first["still_present"]] == [HEADERS]
    assert last["round"] == 2
    assert last["escalated_to_blocks"][0]["unverified_flag"] is True
    verdict = summary["block_verdicts"][0]
    assert (verdict["round"], verdict["block_id"], verdict["verdict"], verdict["source"],
            verdict["decided_by"], verdict["note"]) == (2, "hdr", "accept", "update",
                                                         "operator", "tracked")
    assert summary["reaudits_run"] == 1
    assert summary["flags_applied"] == 2
    assert summary["all_flags_verified_fixed"] is False
    events = await handle.query(EVENTS_QUERY, result_type=list[StageEvent])
    assert any(e.event == "flags_escalated" for e in events)


async def test_a_clean_reaudit_ends_the_rounds(pipeline: PipelineEnv) -> None:
    handle, _ = await run_to_triage(pipeline, "reaudit-clean", f"flags:\n- {PINNED}\n",
                                    reaudit_rounds=2)
    await play_stage(pipeline.queue_dir, handle.id, TASK_SECURITY_FIX, pipeline.env)
    await reaudit(pipeline, handle, "info:\n- all fixed\n")
    await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_CLOSEOUT, pipeline.env)
    result: BuildPipelineResult = await handle.result()

    assert (result.status, result.outcome) == ("complete", "success")
    assert task_types(pipeline, handle.id).count(TASK_SECURITY_AUDIT) == 2
    assert result.tally.reaudits_run == 1
    assert result.tally.all_flags_verified_fixed is True
    assert summary_of(result)["flags_verified_fixed"] == 1
    assert not (pipeline.audit_dir / AUDIT_REQUESTS_DIR / "reaudit-clean" / "round-3").exists()


async def test_changes_requested_for_one_block_by_update(pipeline: PipelineEnv) -> None:
    handle, _ = await run_to_triage(
        pipeline, "changes-update", f"blocks:\n- {TOKEN}\n- {PORT}\n", reaudit_rounds=1)
    await wait_until_parked(handle)
    answer = await handle.execute_update(
        APPROVE_BLOCKS_UPDATE, {"note": "close the port to the VPN", "decided_by": "alice",
                           "verdicts": {"1": "accept", "2": "change"}}, result_type=str)
    assert answer == "changes_requested"
    fix = load_yaml(await play_stage(pipeline.queue_dir, handle.id, TASK_SECURITY_FIX,
                                     pipeline.env))
    assert fix["payload"]["changes_requested"] == "close the port to the VPN"
    assert fix["payload"]["flags"] == [PORT]
    assert "close the port to the VPN" in fix["payload"]["instruction"]
    await reaudit(pipeline, handle, "info: []\n")
    await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_CLOSEOUT, pipeline.env)
    result: BuildPipelineResult = await handle.result()

    assert (result.status, result.outcome) == ("complete", "partial")
    assert (result.tally.blocks_accepted, result.tally.blocks_changed) == (1, 1)
    summary = summary_of(result)
    assert [(v["index"], v["verdict"], v["decided_by"], v["source"], v["note"])
            for v in summary["block_verdicts"]] == [
        (1, "accept", "alice", "update", "close the port to the VPN"),
        (2, "change", "alice", "update", "close the port to the VPN")]
    assert summary["audit_rounds"][0]["changes_note"] == "close the port to the VPN"
    assert [f["description"] for f in summary["audit_rounds"][0]["verified_fixed"]] == [PORT]


@pytest.fixture
async def platform_pipeline(tmp_path: Path, temporal_address: str,
                            client: Client) -> AsyncIterator[PipelineEnv]:
    env = make_env(tmp_path, temporal_address, TASK_FILE_DIALECT=DIALECT_PLATFORM,
                   REAUDIT_ROUNDS="1")
    config = load_config(env)
    async with serving(client, config):
        yield PipelineEnv(config=config, client=client, env=env, root=tmp_path)


async def close_as_agent(tools: TaskTools, pipeline: PipelineEnv, handle: WorkflowHandle,
                         task_type: str, output: str = "done") -> dict[str, Any]:
    """Hand the run's submitted task of `task_type` to its agent, which claims and closes
    it with the platform's tools."""
    task = load_yaml(await wait_for_task(pipeline.queue_dir, handle.id, task_type))
    assert tools.approve(task["id"]).get("ok"), task  # handed to the agent (semi-auto)
    assert tools.update_task(task["id"], IN_PROGRESS, task["target_agent"]).get("ok"), task
    closed = tools.update_task(task["id"], "completed", task["target_agent"], output=output)
    assert closed.get("ok"), closed
    return task


async def test_verdicts_and_changes_from_the_task_file_in_the_platform_dialect(
        platform_pipeline: PipelineEnv) -> None:
    pipeline, tools = platform_pipeline, TaskTools(platform_pipeline.queue_dir)
    inp = pipeline_input(pipeline, "changes-file")  # reaudit_rounds from REAUDIT_ROUNDS
    handle = await pipeline.start(BUILD_PIPELINE_WORKFLOW, inp, result_type=BuildPipelineResult)
    for _ in range(2):  # prefab, implement
        await close_as_agent(tools, pipeline, handle, PLATFORM_TASK_BUILD)
    pipeline.write_triage("changes-file", f"blocks:\n- {TOKEN}\n- description: {PORT}\n"
                                          f"  id: port\n")
    await close_as_agent(tools, pipeline, handle, PLATFORM_TASK_AUDIT)
    await wait_until_parked(handle)
    origin = find_task(pipeline.queue_dir, inp.task_id)
    assert load_yaml(origin)["awaiting_decision"]["round"] == 1

    def decide(task: dict[str, Any]) -> None:
        task["block_verdicts"] = {1: "accept", "port": "change"}
        task["changes_requested"] = "bind the admin port to localhost"
    update_task(origin, decide)
    assert tools.approve(inp.task_id).get("ok")
    fix = await close_as_agent(tools, pipeline, handle, PLATFORM_TASK_FIX)
    assert fix["payload"]["changes_requested"] == "bind the admin port to localhost"
    status = await wait_for_status(handle, lambda s: s.audit_round == 1 and s.block_verdicts,
                                   "verdicts recorded", result_type=PipelineStatus)
    assert [v.verdict for v in status.block_verdicts] == ["accept", "change"]
    audit = load_yaml(await wait_for_task(pipeline.queue_dir, handle.id, PLATFORM_TASK_AUDIT))
    Path(audit["payload"]["triage_path"]).write_text("info: []\n")
    await close_as_agent(tools, pipeline, handle, PLATFORM_TASK_AUDIT)
    await close_as_agent(tools, pipeline, handle, PLATFORM_TASK_DOCS, "/docs/closeout.md")
    result: BuildPipelineResult = await handle.result()

    assert (result.status, result.outcome) == ("complete", "partial")
    summary = summary_of(result)
    assert [(v["block_id"], v["verdict"], v["decided_by"], v["source"], v["note"])
            for v in summary["block_verdicts"]] == [
        (None, "accept", "task file", "task_file", "bind the admin port to localhost"),
        ("port", "change", "task file", "task_file", "bind the admin port to localhost")]
    task = load_yaml(origin)
    assert "block_verdicts" not in task
    assert "changes_requested" not in task
    assert any("block 2: change" in entry["note"] for entry in task["history"])


def test_tally_counts_a_flag_found_again_once() -> None:
    from models import AuditRound, Finding

    first = AuditRound(round=1, flags=[Finding(description="a"), Finding(description="b")],
                       sent_to_fix=[Finding(description="a"), Finding(description="b")],
                       verified_fixed=[Finding(description="b")],
                       still_present=[Finding(description="a")])
    second = AuditRound(round=2, flags=[Finding(description="a")],
                        escalated_to_blocks=[Finding(description="a")])
    counted = tally([first, second], [])
    assert (counted.flags_verified_fixed, counted.flags_unverified) == (1, 1)
    unchecked = AuditRound(round=1, flags=[Finding(description="a")],
                           sent_to_fix=[Finding(description="a")])
    assert tally([unchecked], []).all_flags_verified_fixed is False
    assert tally([AuditRound(round=1)], []).all_flags_verified_fixed is True
