"""Deliver block decisions written into originating task files, the moment they land.

Stage 6 writes `awaiting_decision: {workflow_id, run_id}` into the originating task; when
that file's status becomes a decision (approved, or rejected/cancelled/failed), this
watcher sends it to that run through the same Update an operator would use
(decisions/delivery.py). It needs no state of its own: one scan at start applies decisions made
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
import contextlib
import logging
import os
import re
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any

import watchfiles
from pydantic import ValidationError
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from config import WorkerConfig
from decisions.closed_tasks import ClosedTask, ClosedTaskApplier, closed_task, may_claim, may_close
from decisions.delivery import deliver_decision
from exceptions import (
    AmbiguousTaskError,
    DiskWriteError,
    FileIoStalledError,
    TaskFileError,
    TaskNotFoundError,
)
from models import MAX_DECISION_NOTE_CHARS, BlockDecision, Decision, TaskNotice
from policies import (
    TASK_CLOSE_RETRY_FIRST,
    TASK_CLOSE_RETRY_MAX,
    WATCH_RESTART_FIRST,
    WATCH_RESTART_MAX,
)
from taskfiles.documents import (
    AWAITING_DECISION,
    MAX_TASK_FILE_BYTES,
    TASK_SUFFIX,
    claimed_actor,
    parse_task,
)
from taskfiles.io_pool import run_file_io
from taskfiles.lookup import find_task
from taskfiles.safe_io import ensure_private_dir, read_agent_file, shown_path
from taskfiles.visible_text import visible_line
from vocabulary import (
    APPROVED,
    BLOCK_VERDICTS_FIELD,
    CHANGES_REQUESTED,
    DEAD_LETTERS_DIR,
    DECIDING_STATUSES,
)
from workflows.failures import validation_message
from workflows.rounds import file_decision

log = logging.getLogger(__name__)

RESCAN_INTERVAL_SECONDS = 600.0
# Pause between coalesced batches of file events (watchfiles' debounce), in ms.
DEBOUNCE_MS = 50
POLL_DELAY_MS = 300
MAX_DELIVERIES_IN_FLIGHT = 64
MAX_DEFERRED = 1000
MAX_NOTICE_CHARS = 300
MAX_SETTLED = 10_000
UNREACHABLE = frozenset({RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED,
                         RPCStatusCode.CANCELLED})


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
    if status != decision:
        note = f"task status {status}" + (f": {note}" if note else "")
    changes = task.get(CHANGES_REQUESTED)
    if isinstance(changes, str) and changes.strip():
        note = changes  # the note the build agent gets with the blocks to change
    note = visible_line(note, MAX_DECISION_NOTE_CHARS)
    verdicts = task.get(BLOCK_VERDICTS_FIELD)
    round_no = waiter.get("round")
    choice = BlockDecision(decided_by="task file", source="task_file", note=note,
                           claimed_by=actor or None, task_id=task_id,
                           verdicts=verdicts if verdicts is not None else {},
                           round=round_no if isinstance(round_no, int) else None)
    decision = file_decision(decision, choice.verdicts,
                             changes if isinstance(changes, str) and changes.strip() else None)
    return workflow_id, run_id if isinstance(run_id, str) and run_id else None, decision, choice


class BlockDecisionWatcher:
    """Watches one task folder; `run` returns when `stop` is set."""

    def __init__(self, client: Client, config: WorkerConfig) -> None:
        self.client = client
        self.config = config
        self.folder = config.task_queue_dir
        self._watched = frozenset(os.path.abspath(folder) for folder in (
            self.folder, self.folder / DEAD_LETTERS_DIR))
        self.delivered = 0
        # One delivery in flight per waiting run, off the watch loop: a run no worker
        # answers for holds up only its own decision (decisions/delivery.py bounds the wait).
        self._deliveries: dict[tuple[str, str | None], asyncio.Task[None]] = {}
        self._again: dict[tuple[str, str | None], Path] = {}
        self._deferred: OrderedDict[Path, None] = OrderedDict()
        self.closes = ClosedTaskApplier(client, config.task_queue, config.pipeline_queue)
        self._closing: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        # Closed files already dealt with, by path and content: a rescan skips them.
        self._settled: OrderedDict[tuple[str, int], None] = OrderedDict()

    async def consider(self, path: Path) -> None:
        """Read one file; if it decides a waiting run, deliver the decision; if it is one
        of our agent tasks closed with the platform's tools, finish its stage; if an agent
        claimed one (`in-progress`), tell its run."""
        try:
            raw = await run_file_io(read_agent_file, path, MAX_TASK_FILE_BYTES)
        except FileNotFoundError:
            return
        except (TaskFileError, FileIoStalledError) as err:
            log.debug("task_file_skipped", extra={"task_file": str(path), "error": str(err)})
            return
        closing = self.config.platform_dialect and may_close(raw)
        deciding = self.config.file_decisions and AWAITING_DECISION.encode() in raw
        # Claims in both dialects: v0.5.0's agents set the status themselves.
        closing = closing or may_claim(raw)
        if not (closing or deciding):
            return  # agent task files (nearly every write) are not parsed at all
        seen = (str(path), hash(raw))
        if seen in self._settled:
            return  # a close already applied or found stale, unchanged since
        try:
            # Parsed off the event loop: a file built to be slow to parse delays only this.
            task = await run_file_io(parse_task, shown_path(path), raw)
        except (TaskFileError, FileIoStalledError) as err:
            if deciding:
                await self._unreadable_decision(path, raw, str(err))
            else:
                log.warning("task_file_skipped", extra={"task_file": str(path),
                                                        "error": str(err)[:300]})
            return
        closed = closed_task(task, dead_lettered=path.parent.name == DEAD_LETTERS_DIR)
        if closed is not None:
            await self._consider_close(path, closed, seen)
        elif deciding:
            await self._consider_decision(path, task)

    async def _consider_decision(self, path: Path, task: dict[str, Any]) -> None:
        try:
            found = pending_decision(task)
        except ValidationError as err:  # e.g. an id longer than any task's: not a decision
            log.warning("task_file_skipped", extra={"task_file": str(path),
                                                    "error": validation_message(err)})
            return
        if found is None:
            return
        workflow_id, run_id, decision, choice = found
        target = (workflow_id, run_id)
        if self._in_flight(target, path):
            return
        if len(self._deliveries) >= MAX_DELIVERIES_IN_FLIGHT:
            log.warning("decision_deferred", extra={
                "workflow_id": workflow_id, "task_file": str(path),
                "error": f"{MAX_DELIVERIES_IN_FLIGHT} decisions in flight; looked at again "
                         f"when one ends"})
            self._deferred[path] = None
            self._deferred.move_to_end(path)
            if len(self._deferred) > MAX_DEFERRED:
                self._deferred.popitem(last=False)  # the rescan still finds it
            return
        problem = await self._not_the_task(path, choice.task_id or "")
        if problem:
            log.warning("decision_not_delivered", extra={
                "workflow_id": workflow_id, "task_file": str(path), "error": problem})
            return
        if not self._in_flight(target, path):  # checked again: the lookup awaited
            self._deliveries[target] = asyncio.create_task(
                self._deliver(target, path, decision, choice))

    async def _unreadable_decision(self, path: Path, raw: bytes, error: str) -> None:
        """A file that names a waiting run but cannot be read decides nothing: say so,
        in the log and, when the run can be told from its bytes, in its status."""
        log.warning("decision_file_unreadable", extra={"task_file": str(path),
                                                       "error": error[:300]})
        named = waiting_run(raw)
        seen = (str(path), hash(raw))
        if named is None or seen in self._settled:
            return
        self._settle(seen)
        workflow_id, task_id = named
        notice = TaskNotice(task_id=task_id, kind="decision_file_unreadable",
                            detail=error[:MAX_NOTICE_CHARS])
        try:
            await self.closes.notify(workflow_id, None, notice)
        except Exception as err:  # a notice is best effort; the WARNING above stands
            log.debug("task_notice_not_sent", extra={"workflow_id": workflow_id,
                                                     "error": f"{type(err).__name__}"})

    async def _consider_close(self, path: Path, closed: ClosedTask,
                              seen: tuple[str, int]) -> None:
        key = (closed.workflow_id, closed.activity_id, closed.status)
        if key in self._closing:
            return
        # The dispatcher writes a refused launch's record to `<full id>.yml` (beside the
        # task's own file, which stays `approved`), and dead-letters that record too.
        own_record = path.name == f"{closed.task_id}{TASK_SUFFIX}"
        problem = "" if own_record else await self._not_the_task(path, closed.task_id)
        if problem:
            log.warning("task_close_refused", extra={"task_file": str(path), "error": problem})
            return
        while len(self._closing) >= MAX_DELIVERIES_IN_FLIGHT:
            await asyncio.wait(list(self._closing.values()),
                               return_when=asyncio.FIRST_COMPLETED)
        if key not in self._closing:  # checked again: the lookup awaited
            self._closing[key] = asyncio.create_task(self._close(key, closed, seen))

    async def _close(self, key: tuple[str, str, str], closed: ClosedTask,
                     seen: tuple[str, int]) -> None:
        try:
            outcome = await self._apply_when_reachable(closed)
        except Exception as err:  # one close must never end the watcher; the rescan retries
            log.warning("task_close_not_applied", extra={
                "workflow_id": closed.workflow_id, "task_id": closed.task_id,
                "error": f"{type(err).__name__}: {str(err)[:200]}"})
        else:
            if outcome != "noticed":
                self._settle(seen)
        finally:
            del self._closing[key]

    def _settle(self, seen: tuple[str, int]) -> None:
        self._settled[seen] = None
        if len(self._settled) > MAX_SETTLED:
            self._settled.popitem(last=False)

    async def _apply_when_reachable(self, closed: ClosedTask) -> str:
        """Apply a close; while the server cannot be reached (a restart, an upgrade) try
        again with capped backoff, so a task closed during an outage finishes its stage
        as soon as the server is back."""
        delay = TASK_CLOSE_RETRY_FIRST.total_seconds()
        while True:
            try:
                return await self.closes.apply(closed)
            except (RPCError, RuntimeError) as err:
                if isinstance(err, RPCError) and err.status not in UNREACHABLE:
                    raise
                log.info("task_close_waits_for_server", extra={
                    "workflow_id": closed.workflow_id, "task_id": closed.task_id,
                    "error": f"{type(err).__name__}: {str(err)[:200]}"})
            await asyncio.sleep(delay)
            delay = min(delay * 2, TASK_CLOSE_RETRY_MAX.total_seconds())

    def _in_flight(self, target: tuple[str, str | None], path: Path) -> bool:
        """Whether a decision for this run is on its way; if so, `path` is looked at
        again once it ends, unless it was applied (a run takes its first decision only)."""
        if target in self._deliveries:
            self._again[target] = path
            return True
        return False

    async def _not_the_task(self, path: Path, task_id: str) -> str:
        """Why the file at `path` is not the task its id names ('' when it is): a copy
        of an originating task, or two files with its id, decide nothing.

        Only files named with the id's prefix are looked at (no full scan: a folder of
        planted files would otherwise cost a read of every file per file). A file
        named otherwise decides only when no file is named for its id, and the pipeline
        still refuses any id but its originating task's."""
        try:
            found = await run_file_io(partial(find_task, self.folder, task_id,
                                              full_scan=False))
        except TaskNotFoundError:
            return ""
        except AmbiguousTaskError as err:
            return (f"{str(err)[:300]}; once the stray files are gone, save the originating "
                    f"task again (or wait for the rescan)")
        except (TaskFileError, FileIoStalledError) as err:
            return str(err)[:300]
        if os.path.abspath(found) != os.path.abspath(path):
            return f"the task with id {task_id!r} is {shown_path(found)}, not this file"
        return ""

    async def _deliver(self, target: tuple[str, str | None], path: Path, decision: Decision,
                       choice: BlockDecision) -> None:
        workflow_id, run_id = target
        outcome = "failed"
        try:
            outcome = await deliver_decision(self.client, workflow_id=workflow_id,
                                             run_id=run_id, decision=decision, choice=choice,
                                             task_queue=self.config.pipeline_queue)
        except Exception as err:  # one delivery must never end the watcher
            log.warning("decision_not_delivered", extra={
                "workflow_id": workflow_id, "task_file": str(path),
                "error": f"{type(err).__name__}: {str(err)[:200]}"})
        finally:
            del self._deliveries[target]
            later = self._again.pop(target, None)
        if outcome == "applied":
            self.delivered += 1
        elif later is not None:
            await self.consider(later)
            return
        if self._deferred:
            await self.consider(self._deferred.popitem(last=False)[0])

    async def scan(self) -> None:
        if not self.folder.is_dir():
            return

        def listing() -> list[Path]:
            found = []
            for folder in (self.folder, self.folder / DEAD_LETTERS_DIR):
                if folder.is_dir() and not folder.is_symlink():
                    found += sorted(p for p in folder.glob(f"*{TASK_SUFFIX}")
                                    if not p.name.startswith("."))
            return found

        for path in await asyncio.to_thread(listing):
            await self.consider(path)

    async def run(self, stop: asyncio.Event) -> None:
        if not self.config.file_decisions:
            log.info("file_decisions_off", extra={"task_queue_dir": str(self.folder)})
            if not self.config.platform_dialect:
                return  # nothing else to watch for: v050 agents report with the CLI
        try:
            await asyncio.to_thread(ensure_private_dir, self.folder)
        except DiskWriteError as err:
            # Watching only reads: a full or read-only folder is watched as it is.
            log.warning("decision_watch_folder_unwritable", extra={"error": str(err)})
        folders = [self.folder]
        if self.config.platform_dialect:
            folders += await asyncio.to_thread(self._dead_letters_folder)
        rescans = asyncio.create_task(self._rescan_forever(stop))
        log.info("decision_watch_started", extra={"task_queue_dir": str(self.folder),
                                                  "polling": self.config.watch_polling})
        try:
            await self.scan()
            # Not recursive: a link planted in the folder must not walk the watch over
            # the whole filesystem; dead-letters/ (the dispatcher's) is watched itself.
            async for changes in watchfiles.awatch(
                    *folders, stop_event=stop, recursive=False, debounce=DEBOUNCE_MS,
                    step=DEBOUNCE_MS, force_polling=self.config.watch_polling,
                    poll_delay_ms=POLL_DELAY_MS, ignore_permission_denied=True,
                    watch_filter=partial(_task_file_written, self._watched)):
                for path in sorted({Path(raw) for _, raw in changes}):
                    await self.consider(path)
        finally:
            rescans.cancel()
            for delivery in [*self._deliveries.values(), *self._closing.values()]:
                delivery.cancel()

    def _dead_letters_folder(self) -> list[Path]:
        """dead-letters/, made (0700) if the dispatcher has not made it yet, so it can be
        watched from the start; a link or a file in its place is not watched."""
        folder = self.folder / DEAD_LETTERS_DIR
        try:
            ensure_private_dir(folder, base=self.folder)
        except TaskFileError as err:
            log.warning("dead_letters_not_watched", extra={"error": str(err)[:300]})
            return []
        return [folder]

    async def _rescan_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), RESCAN_INTERVAL_SECONDS)
            except TimeoutError:
                await self.scan()


def _task_file_written(folders: frozenset[str], change: watchfiles.Change, raw: str) -> bool:
    name = os.path.basename(raw)
    return (change != watchfiles.Change.deleted and name.endswith(TASK_SUFFIX)
            and not name.startswith(".") and os.path.dirname(raw) in folders)


# `awaiting_decision:` and the `workflow_id:` below it, as the worker writes them (a file
# that cannot be parsed can still name the run it was meant to decide).
_WAITER_RE = re.compile(
    rb"^awaiting_decision:\s*\n\s+workflow_id:\s*['\"]?([A-Za-z0-9._:/-]{1,200})", re.MULTILINE)
_ID_RE = re.compile(rb"^id:\s*['\"]?([A-Za-z0-9._:-]{1,128})", re.MULTILINE)


def waiting_run(raw: bytes) -> tuple[str, str] | None:
    """(workflow id, task id) an unparseable decision file names, if it names both."""
    run, task = _WAITER_RE.search(raw), _ID_RE.search(raw)
    if run is None or task is None:
        return None
    return run.group(1).decode(), task.group(1).decode()


async def watch_block_decisions(client: Client, config: WorkerConfig,
                                stop: asyncio.Event) -> None:
    """Run the watcher until `stop`; a failure is logged, never raised (the worker goes
    on serving; Updates still decide)."""
    pause = WATCH_RESTART_FIRST.total_seconds()
    while not stop.is_set():
        try:
            await BlockDecisionWatcher(client, config).run(stop)
            return
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a broken watch must not stop the worker: started again
            log.error("decision_watch_failed", extra={
                "error": f"{type(err).__name__}: {str(err)[:300]}", "restart_in_seconds": pause})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
        pause = min(pause * 2, WATCH_RESTART_MAX.total_seconds())
