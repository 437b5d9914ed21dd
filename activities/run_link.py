"""The originating task names the run that works on it (platform dialect).

A build the platform's dispatcher starts has its filing task as originating task. The
dispatcher marks that task `approved` before it calls the start script and rewrites it
`in-progress` from its own earlier copy once the script exits, so anything written into
it meanwhile is lost. So the link is written when the pipeline starts (unless the start
is still under way) and checked again each time a stage hands work to an agent: missing,
it is written again. A task that has ended (or cannot be read) is left alone; the link
never fails a stage.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from temporalio import activity

from config import WorkerConfig
from exceptions import FileIoStalledError, TaskFileError, TaskNotFoundError
from taskfiles.documents import read_task
from taskfiles.io_pool import run_file_io
from taskfiles.lookup import find_task, update_task
from vocabulary import APPROVED, RUN_LINK, TASK_WORKFLOW, TERMINAL_STATUSES

log = logging.getLogger(__name__)



def run_link(config: WorkerConfig, workflow_id: str, run_id: str) -> dict[str, str]:
    """Where the run is: its ids, namespace, and its page in the Temporal Web UI (a path
    under the operator's Web UI address)."""
    namespace = config.temporal_namespace
    return {"workflow_id": workflow_id, "run_id": run_id, "namespace": namespace,
            "web_ui_path": f"/namespaces/{namespace}/workflows/{workflow_id}/{run_id}/history"}


# Runs whose link was found in place (or whose task is not there): not looked at again
# by this worker. A link the worker has just written is looked at again at the next stage,
# since the dispatcher may write its own copy over it. Another worker simply looks again.
_SETTLED: OrderedDict[tuple[str, str], None] = OrderedDict()
MAX_SETTLED_RUNS = 4096


def _settle(key: tuple[str, str]) -> None:
    _SETTLED[key] = None
    if len(_SETTLED) > MAX_SETTLED_RUNS:
        _SETTLED.popitem(last=False)


def _ensure(config: WorkerConfig, task_id: str, link: dict[str, str]) -> bool:
    key = (task_id, link["run_id"])
    if key in _SETTLED:
        return False
    queue_dir = config.task_queue_dir
    # By its name only: a missing task is not looked for again in every file per stage.
    try:
        path = find_task(queue_dir, task_id, search_archives=False, full_scan=False)
    except TaskNotFoundError:
        _settle(key)
        raise
    task = read_task(path, base=queue_dir)
    status = task.get("status")
    if status in TERMINAL_STATUSES:
        _settle(key)
        return False
    # A `workflow` task at `approved` is the dispatcher's, mid-start: it writes its own
    # copy over it once the start script exits. Not written then (that write could undo
    # the dispatcher's `in-progress`), and looked at again at the next stage.
    starting = status == APPROVED and task.get("task_type") == TASK_WORKFLOW
    if task.get(RUN_LINK) == link or starting:
        if not starting:
            _settle(key)
        return False

    def add(document: dict[str, Any]) -> None:
        if document.get("status") not in TERMINAL_STATUSES:
            document[RUN_LINK] = link

    update_task(path, add, base=queue_dir)
    return True


async def ensure_run_link(config: WorkerConfig, task_id: str | None) -> None:
    """Write the current run into the originating task `task_id` when it is missing."""
    if not config.platform_dialect or not task_id:
        return
    info = activity.info()
    link = run_link(config, info.workflow_id or "", info.workflow_run_id or "")
    try:
        if await run_file_io(_ensure, config, task_id, link):
            log.info("run_link_written", extra={"task_id": task_id,
                                                "workflow_id": info.workflow_id})
    except (TaskFileError, FileIoStalledError) as err:
        log.debug("run_link_not_written", extra={"task_id": task_id, "error": str(err)[:300]})
