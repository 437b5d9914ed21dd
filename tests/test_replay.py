"""Replay safety: every recorded history (tests/histories/*.json, one per path through
both workflows) must replay against today's workflow code. A change that would break
pipelines already running fails here. Record new ones: python -m tools.record_histories"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.build_pipeline_workflow import BuildPipelineWorkflow
from workflows.build_plan import BuildPlanWorkflow

HISTORIES = Path(__file__).resolve().parent / "histories"
# Every path the issue names; a missing file is a failure, not a silent skip.
REQUIRED = ("pipeline_clean", "pipeline_flags", "pipeline_approved_task_file",
            "pipeline_approved_update", "pipeline_rejected", "pipeline_timed_out",
            "pipeline_agent_failure", "pipeline_bad_triage", "plan_success", "plan_failure")


def load(name: str) -> WorkflowHistory:
    path = HISTORIES / f"{name}.json"
    return WorkflowHistory.from_json(f"record-{name}", path.read_text())


def test_every_path_is_recorded() -> None:
    recorded = {path.stem for path in HISTORIES.glob("*.json")}
    assert set(REQUIRED) <= recorded, f"missing: {sorted(set(REQUIRED) - recorded)}"


@pytest.mark.parametrize("name", sorted({p.stem for p in HISTORIES.glob("*.json")}
                                        | set(REQUIRED)))
async def test_history_replays_against_current_code(name: str) -> None:
    history = load(name)
    replayer = Replayer(workflows=[BuildPipelineWorkflow, BuildPlanWorkflow],
                        data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{name}: {result.replay_failure}"
    # The recording really is the path it is named for (a truncated file replays too).
    last = history.events[-1]
    if name in ("pipeline_agent_failure", "pipeline_bad_triage", "plan_failure"):
        assert last.HasField("workflow_execution_failed_event_attributes"), name
    else:
        assert last.HasField("workflow_execution_completed_event_attributes"), name
