"""Take over pipelines an earlier worker started (v0.5.0, or this service before it
resolved agents up front), so an upgrade loses none and operators can see which.

Such a run carries no `prepare-pipeline` marker at its start. The workflow code replays
its history as recorded and carries it on (workflows/build_pipeline_workflow.py); this
module, run once per worker start beside the recovery sweep, makes that visible at once
and wires a parked one to this worker's decision paths:

- it signals `adopt`, so the run records an `adopted` event and its Web UI details now,
  not only when its next stage begins (a run parked for days would otherwise show
  nothing until decided);
- a run parked at stage 7 gets `awaiting_decision` in its originating task, so the
  folder watcher can deliver a file decision to it (v0.5.0's stage 6 did not write it).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

from config import WorkerConfig
from exceptions import FileIoStalledError, TaskFileError
from models import PipelineStatus, StageEvent
from taskfiles.documents import AWAITING_DECISION, timestamp
from taskfiles.io_pool import run_file_io
from taskfiles.lookup import find_task, update_task
from vocabulary import ADOPT_SIGNAL, BUILD_PIPELINE_WORKFLOW, EVENTS_QUERY, STATUS_QUERY
from workflows.patches import PREPARE_PATCH

log = logging.getLogger(__name__)

PATCH_MARKER, PATCH_DETAILS = "core_patch", "patch-data"
# The start marker is recorded by the first workflow task: within the first few events.
MARKER_SEARCH_EVENTS = 12


async def started_by_this_worker(handle: WorkflowHandle[Any, Any]) -> bool:
    seen = 0
    async for event in handle.fetch_history_events(page_size=MARKER_SEARCH_EVENTS):
        seen += 1
        if event.HasField("marker_recorded_event_attributes"):
            marker = event.marker_recorded_event_attributes
            details = marker.details.get(PATCH_DETAILS)
            if (marker.marker_name == PATCH_MARKER and details is not None and details.payloads
                    and json.loads(details.payloads[0].data).get("id") == PREPARE_PATCH):
                return True
        if seen >= MARKER_SEARCH_EVENTS:
            break
    return False


def mark_waiting(config: WorkerConfig, task_id: str, workflow_id: str, run_id: str) -> bool:
    """Name the waiting run in the originating task, unless it is named already."""
    path = find_task(config.task_queue_dir, task_id)
    changed = False

    def mark(task: dict[str, Any]) -> None:
        nonlocal changed
        waiter = task.get(AWAITING_DECISION)
        if isinstance(waiter, dict) and waiter.get("run_id") == run_id:
            return
        task[AWAITING_DECISION] = {"workflow_id": workflow_id, "run_id": run_id,
                                   "since": timestamp()}
        changed = True

    update_task(path, mark, base=config.task_queue_dir)
    return changed


async def adopt(client: Client, config: WorkerConfig, workflow_id: str, run_id: str,
                workflow_type: str, identity: str) -> bool:
    """Adopt one running pipeline if an earlier worker started it; True if it was."""
    if workflow_type != BUILD_PIPELINE_WORKFLOW:
        return False
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    if await started_by_this_worker(handle):
        return False
    try:
        status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
        events = await handle.query(EVENTS_QUERY, result_type=list[StageEvent])
    except RPCError as err:
        # Most likely its history does not replay on this code: say so, loudly.
        log.error("adoption_failed", extra={"workflow_id": workflow_id,
                                            "error": str(err).splitlines()[0][:300]})
        return False
    if not any(event.event == "adopted" for event in events):
        await handle.signal(ADOPT_SIGNAL, f"taken over by worker {identity} at {status.stage}")
    waiting = status.waiting_on
    if waiting is not None and waiting.kind == "block_decision" and waiting.task_id:
        try:
            await run_file_io(mark_waiting, config, waiting.task_id, workflow_id, run_id)
        except (TaskFileError, FileIoStalledError) as err:
            log.warning("adopted_task_not_marked", extra={"workflow_id": workflow_id,
                                                          "error": str(err)})
    log.info("pipeline_adopted", extra={"workflow_id": workflow_id, "stage": status.stage})
    return True
