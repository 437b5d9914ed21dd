"""Replay safety: every recorded history must replay against today's workflow code, so a
change that would break pipelines already running fails here.

tests/histories/ holds one folder per shape of history:
- `v050/`: recorded from v0.5.0, the system this service replaces in flight (complete
  runs, and runs waiting on an agent or parked at stage 7 when recorded);
- `polled-stage7/`: this service before block decisions became event-driven (stage 7
  polled the originating task with a retried activity);
- `event-driven/`: stage 7 parked on its deadline timer alone, every stage an activity;
- `local-inline/`: stages 4 and 9 as local activities;
- `pickup-limits/`: the current shape, agent stages watched by the workflow (pickup
  timers and reminders, the work limit from the claim), every path plus those two (record
  anew: python -m tests.record_histories);
- `filed-plan/`: a plan filed as a task, whose end closes that task (the
  `plan-closes-filing-task` local activity), recorded with
  `python -m tests.record_histories --out tests/histories/filed-plan --only plan_filed`;
- `rounds/`: the paths with audit rounds (a re-audit whose flag found again becomes a
  block; changes requested for one of two blocks, then a clean re-audit), recorded with
  `python -m tests.record_histories --out tests/histories/rounds --only pipeline_reaudit
  pipeline_changes_requested`.

Replays run in the SDK's workflow sandbox (the Replayer's default), which worker.py skips
for speed: a non-deterministic call on any recorded path fails here.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from vocabulary import PREFAB_SCAFFOLDING, REMIND_PICKUP, WAIT_FOR_BLOCK_RESOLUTION
from workflows.build_pipeline_workflow import BuildPipelineWorkflow
from workflows.build_plan import BuildPlanWorkflow

HISTORIES = Path(__file__).resolve().parent / "histories"
OURS = ("pipeline_clean", "pipeline_flags", "pipeline_approved_task_file",
        "pipeline_approved_update", "pipeline_rejected", "pipeline_timed_out",
        "pipeline_agent_failure", "pipeline_bad_triage", "plan_success", "plan_failure")
# Every path each generation must keep replaying; a missing file is a failure.
REQUIRED = {
    "v050": ("v050-clean", "v050-flags-done", "v050-blocks-approved", "v050-parked",
             "v050-at-implement", "v050-at-fixes", "v050-at-closeout"),
    "polled-stage7": OURS,
    "event-driven": OURS,
    "local-inline": OURS,
    "stage-routing": (*OURS, "pipeline_reaudit", "pipeline_changes_requested"),
    "rounds": ("pipeline_reaudit", "pipeline_changes_requested"),
    "filed-plan": ("plan_filed",),
    "pickup-limits": (*OURS, "pipeline_pickup_reminded", "pipeline_work_limit"),
}
FAILING = ("pipeline_agent_failure", "pipeline_bad_triage", "plan_failure",
           "pipeline_work_limit")
STILL_RUNNING = ("v050-parked", "v050-at-implement", "v050-at-fixes", "v050-at-closeout")


def recorded() -> list[str]:
    return sorted(f"{path.parent.name}/{path.stem}" for path in HISTORIES.glob("*/*.json"))


def test_every_path_of_every_generation_is_recorded() -> None:
    found = set(recorded())
    wanted = {f"{folder}/{name}" for folder, names in REQUIRED.items() for name in names}
    assert wanted <= found, f"missing: {sorted(wanted - found)}"


@pytest.mark.parametrize("name", recorded())
async def test_history_replays_against_current_code(name: str) -> None:
    path = HISTORIES / f"{name}.json"
    history = WorkflowHistory.from_json(f"replay-{path.stem}", json.loads(path.read_text()))
    replayer = Replayer(workflows=[BuildPipelineWorkflow, BuildPlanWorkflow],
                        data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{name}: {result.replay_failure}"
    # The recording really is the path it is named for (a truncated file replays too).
    last = history.events[-1]
    stem = path.stem
    if stem in FAILING:
        assert last.HasField("workflow_execution_failed_event_attributes"), name
    elif stem in STILL_RUNNING:
        assert not any(e.HasField("workflow_execution_completed_event_attributes")
                       or e.HasField("workflow_execution_failed_event_attributes")
                       for e in history.events), name
    else:
        assert last.HasField("workflow_execution_completed_event_attributes"), name


def test_the_filed_plan_history_closes_its_task_behind_its_patch() -> None:
    events = json.loads((HISTORIES / "filed-plan" / "plan_filed.json").read_text())["events"]
    markers = [e["markerRecordedEventAttributes"] for e in events
               if "markerRecordedEventAttributes" in e]
    data = [json.loads(base64.b64decode(payload["data"])) for marker in markers
            for detail in marker["details"].values() for payload in detail["payloads"]
            if payload.get("data")]
    assert {"id": "plan-closes-filing-task", "deprecated": False} in data
    assert [item["activity_type"] for item in data if "activity_type" in item] == [
        "close_originating_task"]


def test_event_driven_histories_park_without_an_activity() -> None:
    """The current shape of stage 7: no check activity at all, the deadline timer only."""
    for folder, stem in [(folder, stem) for folder in ("event-driven", "local-inline",
                                                       "pickup-limits")
                         for stem in ("pipeline_approved_task_file", "pipeline_rejected",
                                      "pipeline_timed_out")]:
        events = json.loads((HISTORIES / folder / f"{stem}.json").read_text())["events"]
        scheduled = [e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
                     for e in events if "activityTaskScheduledEventAttributes" in e]
        assert WAIT_FOR_BLOCK_RESOLUTION not in scheduled, stem
        assert any("timerStartedEventAttributes" in e for e in events), stem


def test_current_histories_run_stages_4_and_9_locally() -> None:
    """The current shape: triage and summary leave a marker, not a scheduled activity (no
    round trip through the server); the runs recorded before keep their activities."""
    def shape(folder: str, stem: str) -> tuple[list[str], list[str]]:
        events = json.loads((HISTORIES / folder / f"{stem}.json").read_text())["events"]
        scheduled = [e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
                     for e in events if "activityTaskScheduledEventAttributes" in e]
        local = [json.loads(base64.b64decode(
                     e["markerRecordedEventAttributes"]["details"]["data"]["payloads"][0]["data"]
                 ))["activity_type"] for e in events
                 if e.get("markerRecordedEventAttributes", {}).get("markerName")
                 == "core_local_activity"]
        return scheduled, local

    for stem in ("pipeline_clean", "pipeline_flags", "pipeline_approved_update",
                 "pipeline_bad_triage"):
        scheduled, local = shape("local-inline", stem)
        assert "process_triage_output" not in scheduled, stem
        assert "summarize_workflow" not in scheduled, stem
        assert local == ["prepare_pipeline", "process_triage_output", "summarize_workflow"], \
            stem
        old, _ = shape("event-driven", stem)
        assert {"process_triage_output", "summarize_workflow"} <= set(old), stem


def test_routed_histories_run_each_agent_stage_on_its_host() -> None:
    """Recorded with AGENT_TASK_QUEUES (tests/record_histories.py --routed): each agent
    stage asks for its route first (a local activity) and runs on its host's queue; stage
    4 reads the triage on the security agent's host; the rest stays on the main queue."""
    events = json.loads((HISTORIES / "stage-routing" / "pipeline_flags.json").read_text())
    scheduled = [(e["activityTaskScheduledEventAttributes"]["activityType"]["name"],
                  e["activityTaskScheduledEventAttributes"]["taskQueue"]["name"])
                 for e in events["events"] if "activityTaskScheduledEventAttributes" in e]
    assert scheduled == [("prefab_scaffolding", "record-histories.build-host"),
                         ("implement_build", "record-histories.build-host"),
                         ("request_security_audit", "record-histories.sec-host"),
                         ("process_triage_output", "record-histories.sec-host"),
                         ("apply_flag_fixes", "record-histories.build-host"),
                         ("close_build", "record-histories.build-host")]
    markers = [json.loads(base64.b64decode(
                   e["markerRecordedEventAttributes"]["details"]["data"]["payloads"][0]["data"]
               ))["activity_type"] for e in events["events"]
               if e.get("markerRecordedEventAttributes", {}).get("markerName")
               == "core_local_activity"]
    assert markers == ["prepare_pipeline", *["route_stage"] * 5, "summarize_workflow"]
    # A re-audit's triage is read on the host its audit ran on, each round.
    for stem in ("pipeline_reaudit", "pipeline_changes_requested"):
        events = json.loads((HISTORIES / "stage-routing" / f"{stem}.json").read_text())
        queues = {(e["activityTaskScheduledEventAttributes"]["activityType"]["name"],
                   e["activityTaskScheduledEventAttributes"]["taskQueue"]["name"])
                  for e in events["events"] if "activityTaskScheduledEventAttributes" in e}
        assert {queue for name, queue in queues if name in (
            "request_security_audit", "process_triage_output")} == {"record-histories.sec-host"}
def test_round_histories_take_their_paths_behind_their_patches() -> None:
    """Each new path leaves its patch marker, and audits as often as it is named for."""
    def shape(stem: str) -> tuple[list[str], list[str]]:
        events = json.loads((HISTORIES / "rounds" / f"{stem}.json").read_text())["events"]
        scheduled = [e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
                     for e in events if "activityTaskScheduledEventAttributes" in e]
        patches = [json.loads(base64.b64decode(
                       e["markerRecordedEventAttributes"]["details"]["patch-data"]["payloads"][0]
                       ["data"]))["id"] for e in events
                   if e.get("markerRecordedEventAttributes", {}).get("markerName") == "core_patch"]
        return scheduled, patches

    scheduled, patches = shape("pipeline_reaudit")
    assert "reaudit-rounds" in patches
    assert "changes-requested" not in patches
    assert (scheduled.count("request_security_audit"), scheduled.count("apply_flag_fixes")) \
        == (2, 1)
    scheduled, patches = shape("pipeline_changes_requested")
    assert {"reaudit-rounds", "changes-requested"} <= set(patches)
    assert (scheduled.count("request_security_audit"), scheduled.count("apply_flag_fixes")) \
        == (2, 1)


def scheduled_and_timers(folder: str, stem: str) -> tuple[list[str], list[str], list[dict]]:
    events = json.loads((HISTORIES / folder / f"{stem}.json").read_text())["events"]
    scheduled = [e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
                 for e in events if "activityTaskScheduledEventAttributes" in e]
    timers = [json.loads(base64.b64decode(e["userMetadata"]["summary"]["data"]))
              for e in events if "timerStartedEventAttributes" in e]
    return scheduled, timers, events


def test_pickup_limit_histories_watch_their_agents() -> None:
    """The current shape: each agent stage beside a pickup-limit timer; a reminder once
    it passes; a claimed task's work limit, which cancels the stage when it passes."""
    scheduled, timers, _ = scheduled_and_timers("pickup-limits", "pipeline_pickup_reminded")
    assert REMIND_PICKUP in scheduled
    assert f"pickup limit of {PREFAB_SCAFFOLDING}" in timers
    assert f"work limit of {PREFAB_SCAFFOLDING}" in timers
    scheduled, timers, events = scheduled_and_timers("pickup-limits", "pipeline_work_limit")
    assert timers[-1] == f"work limit of {PREFAB_SCAFFOLDING}"
    assert any("activityTaskCancelRequestedEventAttributes" in e for e in events)
    _, old_timers, _ = scheduled_and_timers("local-inline", "pipeline_clean")
    assert not [t for t in old_timers if "limit of" in t]
