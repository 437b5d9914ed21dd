"""Runs started by an earlier worker are taken over: the start sweep signals `adopt`
(an event, the Web UI details, `get_status().adopted`) and names a parked run in its
originating task, so this worker's file decisions reach it.

The earlier worker here is this workflow code with every `workflow.patched` switched
off (the SDK's patch-activation callback): exactly the command sequence this service
wrote before the prepare step and event-driven stage 7. v0.5.0 itself is covered by
tests/test_upgrade.py."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import Client
from temporalio.worker import PatchActivationInput

from config import load_config
from models import BuildPipelineResult, PipelineStatus, StageEvent
from standins.agents import load_yaml, play_stage, wait_for_task
from startup.adoption import started_by_this_worker
from startup.recovery import recover_lost_activities
from taskfiles.lookup import find_task
from tests.conftest import PipelineEnv, serving
from tests.test_block_watcher import decide
from tests.test_build_pipeline_workflow import block_pipeline, pipeline_input
from vocabulary import (
    BUILD_PIPELINE_WORKFLOW,
    EVENTS_QUERY,
    STATUS_QUERY,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
    WAIT_FOR_BLOCK_RESOLUTION,
)
from worker import build_worker


def no_new_patches(_: PatchActivationInput) -> bool:
    return False


async def test_runs_of_an_earlier_worker_are_adopted(pipeline_env_vars: dict[str, str],
                                                     client: Client, tmp_path: Path) -> None:
    config = load_config(pipeline_env_vars)
    pipeline = PipelineEnv(config=config, client=client, env=pipeline_env_vars, root=tmp_path)
    async with build_worker(client, config, patch_activation_callback=no_new_patches):
        parked, inp, origin = await block_pipeline(pipeline, "old-parked")
        agent = await pipeline.start(BUILD_PIPELINE_WORKFLOW,
                                     pipeline_input(pipeline, "old-at-implement"),
                                     result_type=BuildPipelineResult)
        await play_stage(pipeline.queue_dir, agent.id, TASK_BUILD_PREFAB, pipeline.env)
        implement = await wait_for_task(pipeline.queue_dir, agent.id, TASK_BUILD_PLAN)
        old_parked = await parked.describe()
        assert [p.activity_type.name for p in old_parked.raw_description.pending_activities] \
            == [WAIT_FOR_BLOCK_RESOLUTION]  # the polling stage 7 of that generation
    assert not await started_by_this_worker(parked)

    async with serving(client, config):
        assert await recover_lost_activities(client, config) == 0
        for handle in (parked, agent):
            status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
            events = await handle.query(EVENTS_QUERY, result_type=list[StageEvent])
            assert status.adopted, handle.id
            assert [e.event for e in events].count("adopted") == 1, events
        waiter = load_yaml(find_task(pipeline.queue_dir, inp.task_id))["awaiting_decision"]
        assert waiter["workflow_id"] == parked.id
        assert waiter["run_id"] == (await parked.describe()).run_id

        # A second sweep (another worker start) adopts nothing twice.
        await recover_lost_activities(client, config)
        events = await parked.query(EVENTS_QUERY, result_type=list[StageEvent])
        assert [e.event for e in events].count("adopted") == 1

        decide(origin, "approved")
        await play_stage(pipeline.queue_dir, parked.id, TASK_BUILD_CLOSEOUT, pipeline.env)
        result: BuildPipelineResult = await parked.result()
        assert (result.outcome, result.status, result.decision) == ("partial", "complete",
                                                                    "approved")

        from standins.agents import complete_task
        await complete_task(implement, pipeline.env)
        audit = await wait_for_task(pipeline.queue_dir, agent.id, TASK_SECURITY_AUDIT)
        pipeline.write_triage("old-at-implement", "info: []\n")
        await complete_task(audit, pipeline.env)
        await play_stage(pipeline.queue_dir, agent.id, TASK_BUILD_CLOSEOUT, pipeline.env)
        assert (await agent.result()).outcome == "success"

        fresh = await pipeline.start(BUILD_PIPELINE_WORKFLOW, pipeline_input(pipeline, "fresh"),
                                     result_type=BuildPipelineResult)
        await wait_for_task(pipeline.queue_dir, fresh.id, TASK_BUILD_PREFAB)
        assert await started_by_this_worker(fresh)
        status = await fresh.query(STATUS_QUERY, result_type=PipelineStatus)
        assert not status.adopted
        await fresh.cancel()
