"""Deliver block decisions written into originating task files, the moment they land.

Stage 6 writes `awaiting_decision: {workflow_id, run_id}` into the originating task; when
that file's status becomes a decision (approved, or rejected/cancelled/failed), this
watcher sends it to that run through the same Update an operator would use
(decisions.py). It needs no state of its own: one scan at start applies decisions made
while no worker ran, inotify (or polling, TASK_WATCH_POLLING=true, for network
filesystems) reports every later write, and a slow rescan of the folder catches anything
a watch could miss. With several workers on one folder each sends the decision; the
Update id per run makes Temporal apply it once.

Nothing per parked pipeline: no activity, timer or poll; a parked pipeline costs the
worker nothing until its file changes.

The file is an agent's: whoever can write the folder can write it, so the decision is
recorded as coming from the task file and the actor its history names is kept only as
claimed. BLOCK_FILE_DECISIONS=false turns this path off.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import watchfiles
from temporalio.client import Client
from temporalio.service import RPCError

from config import WorkerConfig
from decisions import deliver_decision
from exceptions import FileIoStalledError, TaskFileError
from file_io import run_file_io
from models import BlockDecision, Decision
from task_files import (
    AWAITING_DECISION,
    MAX_TASK_FILE_BYTES,
    TASK_SUFFIX,
    claimed_actor,
    ensure_private_dir,
    find_task,
    parse_task,
    read_agent_file,
    shown_path,
)
from vocabulary import APPROVED, DECIDING_STATUSES

log = logging.getLogger(__name__)

RESCAN_INTERVAL_SECONDS = 600.0
# Pause between coalesced batches of file events (watchfiles' debounce), in ms.
DEBOUNCE_MS = 50
POLL_DELAY_MS = 300
MAX_NOTE_CHARS = 2000
MAX_DELIVERIES_IN_FLIGHT = 64


def pending_decision(task: dict[str, Any]) -> tuple[str, str | None, Decision,
                                                   BlockDecision] | None:
    """(workflow_id, run_id, decision, choice) when the task decides a waiting run."""
    waiter = task.get(AWAITING_DECISION)
    status = task.get("status")
    task_id = task.get("id")
    if not isinstance(waiter, dict) or status not in DECIDING_STATUSES or not isinstance(
            task_id, str) or not task_id:
        return None
    workflow_id, run_id = waiter.get("workflow_id"), waiter.get("run_id")
    if not isinstance(workflow_id, str) or not workflow_id:
        return None
    actor, note = claimed_actor(task, status)
    decision: Decision = "approved" if status == APPROVED else "rejected"
    note = note[:MAX_NOTE_CHARS]
    if status != decision:
        note = f"task status {status}" + (f": {note}" if note else "")
    choice = BlockDecision(decided_by="task file", source="task_file", note=note,
                           claimed_by=actor or None, task_id=task_id)
    return workflow_id, run_id if isinstance(run_id, str) and run_id else None, decision, choice


class BlockDecisionWatcher:
    """Watches one task folder; `run` returns when `stop` is set."""

    def __init__(self, client: Client, config: WorkerConfig) -> None:
        self.client = client
        self.config = config
        self.folder = config.task_queue_dir
        self.delivered = 0
        # One delivery in flight per waiting run, off the watch loop: a run no worker
        # answers for holds up only its own decision (decisions.py bounds the wait).
        self._deliveries: dict[tuple[str, str | None], asyncio.Task[None]] = {}

    async def consider(self, path: Path) -> None:
        """Read one file; if it decides a waiting run, deliver the decision."""
        try:
            raw = await run_file_io(read_agent_file, path, MAX_TASK_FILE_BYTES)
            if AWAITING_DECISION.encode() not in raw:
                return  # agent task files (nearly every write) are not parsed at all
            # Parsed off the event loop: a file built to be slow to parse delays only this.
            task = await run_file_io(parse_task, shown_path(path), raw)
        except FileNotFoundError:
            return
        except (TaskFileError, FileIoStalledError) as err:
            log.debug("task_file_skipped", extra={"task_file": str(path), "error": str(err)})
            return
        found = pending_decision(task)
        if found is None:
            return
        workflow_id, run_id, decision, choice = found
        problem = await self._not_the_task(path, choice.task_id or "")
        if problem:
            log.warning("decision_not_delivered", extra={
                "workflow_id": workflow_id, "task_file": str(path), "error": problem})
            return
        target = (workflow_id, run_id)
        if target in self._deliveries or len(self._deliveries) >= MAX_DELIVERIES_IN_FLIGHT:
            # The one in flight carries the run's first decision, which is the one applied;
            # past the cap, the next rescan tries again.
            return
        delivery = asyncio.create_task(self._deliver(path, workflow_id, run_id, decision,
                                                     choice))
        self._deliveries[target] = delivery
        delivery.add_done_callback(lambda _: self._deliveries.pop(target, None))

    async def _not_the_task(self, path: Path, task_id: str) -> str:
        """Why the file at `path` is not the task its id names ('' when it is): a copy
        of an originating task, or two files with its id, decide nothing."""
        try:
            found = await run_file_io(find_task, self.folder, task_id)
        except (TaskFileError, FileIoStalledError) as err:
            return str(err)[:300]
        if os.path.abspath(found) != os.path.abspath(path):
            return f"the task with id {task_id!r} is {shown_path(found)}, not this file"
        return ""

    async def _deliver(self, path: Path, workflow_id: str, run_id: str | None,
                       decision: Decision, choice: BlockDecision) -> None:
        try:
            outcome = await deliver_decision(self.client, workflow_id=workflow_id,
                                             run_id=run_id, decision=decision, choice=choice)
        except RPCError as err:
            log.warning("decision_not_delivered", extra={
                "workflow_id": workflow_id, "task_file": str(path), "error": str(err)[:200]})
            return
        if outcome == "applied":
            self.delivered += 1

    async def settle(self) -> None:
        """Wait for the deliveries in flight (tests, and a scan that must be complete)."""
        while self._deliveries:
            await asyncio.gather(*self._deliveries.values(), return_exceptions=True)

    async def scan(self) -> None:
        if not self.folder.is_dir():
            return
        paths = await asyncio.to_thread(
            lambda: sorted(p for p in self.folder.glob(f"*{TASK_SUFFIX}")
                           if not p.name.startswith(".")))
        for path in paths:
            await self.consider(path)

    async def run(self, stop: asyncio.Event) -> None:
        if not self.config.file_decisions:
            log.info("file_decisions_off", extra={"task_queue_dir": str(self.folder)})
            return
        await asyncio.to_thread(ensure_private_dir, self.folder)
        rescans = asyncio.create_task(self._rescan_forever(stop))
        log.info("decision_watch_started", extra={"task_queue_dir": str(self.folder),
                                                  "polling": self.config.watch_polling})
        try:
            await self.scan()
            async for changes in watchfiles.awatch(
                    self.folder, stop_event=stop, recursive=False, debounce=DEBOUNCE_MS,
                    step=DEBOUNCE_MS, force_polling=self.config.watch_polling,
                    poll_delay_ms=POLL_DELAY_MS, ignore_permission_denied=True,
                    watch_filter=_task_file_written):
                for path in sorted({Path(raw) for _, raw in changes}):
                    await self.consider(path)
        finally:
            rescans.cancel()
            for delivery in list(self._deliveries.values()):
                delivery.cancel()

    async def _rescan_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), RESCAN_INTERVAL_SECONDS)
            except TimeoutError:
                await self.scan()


def _task_file_written(change: watchfiles.Change, raw: str) -> bool:
    name = Path(raw).name
    return (change != watchfiles.Change.deleted and name.endswith(TASK_SUFFIX)
            and not name.startswith("."))


async def watch_block_decisions(client: Client, config: WorkerConfig,
                                stop: asyncio.Event) -> None:
    """Run the watcher until `stop`; a failure is logged, never raised (the worker goes
    on serving; Updates still decide)."""
    try:
        await BlockDecisionWatcher(client, config).run(stop)
    except asyncio.CancelledError:
        raise
    except Exception as err:  # a broken watch must not stop the worker
        log.error("decision_watch_failed", extra={"error": f"{type(err).__name__}: {err}"})
