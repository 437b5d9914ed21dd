"""End-to-end benchmark of the build worker: a real dev server, the real worker process,
and the agents played in-process from the task files the worker writes.

    .venv/bin/python bench/pipeline_bench.py [--parked N] [--concurrent M] [--json-out FILE]
        [--worker-env KEY=VALUE ...] [--watch inotify|poll] [--matrix-decisions K]

Prints one JSON object (see bench/README.md for what each figure means).
Exit codes: 0 the run completed (targets met or not: see "targets") · 1 the run failed
(a pipeline failed or stalled, the worker died, the server did not start) · 2 usage ·
130 interrupted. Everything it starts (dev server, worker, Synapse with
--matrix-decisions) is stopped on every exit path.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script from bench/: make the repository's modules importable.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import ctypes.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import yaml  # noqa: E402
from temporalio.api.enums.v1 import TaskQueueType  # noqa: E402
from temporalio.api.taskqueue.v1 import TaskQueue  # noqa: E402
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest  # noqa: E402
from temporalio.client import Client, WorkflowHandle  # noqa: E402

from activities.matrix import PIPELINE_CONTENT_KEY  # noqa: E402
from config import load_config  # noqa: E402
from models import (  # noqa: E402
    BuildPipelineInput,
    BuildPipelineResult,
    PipelineStatus,
)
from standins.agents import (  # noqa: E402
    approve_origin,
    complete_with_token,
    task_kind,
    write_origin_task,
    write_triage,
)
from taskfiles.lookup import find_task  # noqa: E402
from taskfiles.safe_io import ensure_private_dir  # noqa: E402
from temporal_client import connect  # noqa: E402
from tools import (  # noqa: E402
    devserver,
    synapse,
)
from vocabulary import (  # noqa: E402
    BUILD_PIPELINE_WORKFLOW,
    DIALECT_PLATFORM,
    DIALECTS,
    INPUT_REQUIRED,
    PENDING_APPROVAL,
    STATUS_QUERY,
    SUBMITTED,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Targets on the reference machine (2 cores); reported, never enforced.
TARGET_NEW_PIPELINE_S = 2.0
TARGET_WORKER_RSS_MB = 200.0
TARGET_HANDOFF_P50_MS = 50.0
TARGET_IDLE_CPU_PERCENT = 2.0
TARGET_DECISION_MS = 2000.0
TARGET_MATRIX_DECISION_MS = 3000.0

CLEAN_TRIAGE = "blocks: []\nflags: []\ninfo:\n  - benchmark build, nothing to report\n"
BLOCKED_TRIAGE = "blocks:\n  - description: benchmark block awaiting an operator\n"
AGENT_SEQUENCE = (TASK_BUILD_PREFAB, TASK_BUILD_PLAN, TASK_SECURITY_AUDIT, TASK_BUILD_CLOSEOUT)
PARK_SEQUENCE = (TASK_BUILD_PREFAB, TASK_BUILD_PLAN, TASK_SECURITY_AUDIT)
STAGE_WAIT_SECONDS = 180.0
WORKER_READY_SECONDS = 60.0
WORKER_STOP_SECONDS = 20.0
# How many parked pipelines' histories are sampled for growth over the idle window.
IDLE_SAMPLE = 40
# --matrix-decisions: what the approver answers, and how long the notices may take to show.
APPROVAL_REPLY = "approve bench"
NOTICE_WAIT_SECONDS = 60.0
NOTICE_PAGE = 100


class BenchError(Exception):
    """The run cannot produce valid figures (a pipeline failed, the worker died, ...)."""


# ---- watching the task folder ---------------------------------------------------------

IN_CLOSE_WRITE, IN_MOVED_TO, IN_Q_OVERFLOW = 0x8, 0x80, 0x4000
_EVENT_HEADER = struct.Struct("iIII")


@dataclass
class SeenFile:
    """A task file as it was when it appeared (or was atomically replaced)."""

    path: Path
    task: dict[str, Any]
    seen_at: float  # time.monotonic() in the watcher thread


class FolderWatch:
    """Reports every task file that lands in the queue folder from a dedicated thread, so
    the timestamp is not delayed by the busy event loop. The worker writes files by
    temp-file + rename, so a landing is one IN_MOVED_TO (inotify via ctypes), or a new
    (name, inode, mtime) in the fallback scandir poll every POLL_SECONDS."""

    POLL_SECONDS = 0.002

    def __init__(self, folder: Path, deliver: Callable[[SeenFile], None], mode: str) -> None:
        self.folder = folder
        self.deliver = deliver
        self.mode = mode
        self._stop = threading.Event()
        self._seen: dict[str, tuple[int, int]] = {}
        self._thread = threading.Thread(target=self._run, name="folder-watch", daemon=True)
        self._fd: int | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        if self.mode == "inotify":
            self._fd = self._inotify_open()
        self._scan()  # files already there
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _inotify_open(self) -> int:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fd: int = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        watch = libc.inotify_add_watch(fd, str(self.folder).encode(),
                                       IN_CLOSE_WRITE | IN_MOVED_TO)
        if watch < 0:
            os.close(fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {self.folder} failed")
        return fd

    def _run(self) -> None:
        try:
            if self.mode == "inotify":
                self._run_inotify()
            else:
                while not self._stop.is_set():
                    self._scan()
                    time.sleep(self.POLL_SECONDS)
        except BaseException as err:  # surfaced by the main task, which checks .error
            self.error = err

    def _run_inotify(self) -> None:
        assert self._fd is not None
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            now = time.monotonic()
            offset = 0
            overflow = False
            while offset < len(data):
                _wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
                raw = data[offset + _EVENT_HEADER.size: offset + _EVENT_HEADER.size + length]
                offset += _EVENT_HEADER.size + length
                if mask & IN_Q_OVERFLOW:
                    overflow = True
                    continue
                name = raw.rstrip(b"\0").decode(errors="replace")
                if name.endswith(".yml") and not name.startswith("."):
                    self._report(name, now)
            if overflow:  # events were dropped: find what landed by listing the folder
                self._scan()

    def _scan(self) -> None:
        now = time.monotonic()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                name = entry.name
                if not name.endswith(".yml") or name.startswith("."):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                key = (info.st_ino, info.st_mtime_ns)
                if self._seen.get(name) != key:
                    self._seen[name] = key
                    self._report(name, now, stat_key=key)

    def _report(self, name: str, seen_at: float,
                stat_key: tuple[int, int] | None = None) -> None:
        path = self.folder / name
        try:
            raw = path.read_bytes()
            if stat_key is None:
                info = os.stat(path)
                self._seen[name] = (info.st_ino, info.st_mtime_ns)
        except FileNotFoundError:
            return
        try:
            task = yaml.load(raw, Loader=yaml.CSafeLoader)  # the C safe loader: fast, no tags
        except yaml.YAMLError:
            return
        if isinstance(task, dict):
            self.deliver(SeenFile(path, task, seen_at))


class Agents:
    """Routes each landed task file to the pipeline it belongs to (payload.workflow_id)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queues: dict[str, asyncio.Queue[SeenFile]] = {}

    def register(self, workflow_id: str) -> asyncio.Queue[SeenFile]:
        queue: asyncio.Queue[SeenFile] = asyncio.Queue()
        self.queues[workflow_id] = queue
        return queue

    def forget(self, workflow_id: str) -> None:
        self.queues.pop(workflow_id, None)

    def deliver_threadsafe(self, seen: SeenFile) -> None:
        self.loop.call_soon_threadsafe(self._deliver, seen)

    def _deliver(self, seen: SeenFile) -> None:
        payload = seen.task.get("payload")
        workflow_id = payload.get("workflow_id") if isinstance(payload, dict) else None
        queue = self.queues.get(str(workflow_id))
        if queue is not None:
            queue.put_nowait(seen)


async def next_file(queue: asyncio.Queue[SeenFile], match: Callable[[dict[str, Any]], bool],
                    what: str, timeout: float = STAGE_WAIT_SECONDS) -> SeenFile:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"no {what} within {timeout:.0f}s")
        try:
            seen = await asyncio.wait_for(queue.get(), remaining)
        except TimeoutError:
            raise BenchError(f"no {what} within {timeout:.0f}s") from None
        if match(seen.task):
            return seen


def agent_task(task_type: str) -> Callable[[dict[str, Any]], bool]:
    def match(task: dict[str, Any]) -> bool:
        payload = task.get("payload") or {}
        return (task_kind(task) == task_type and task.get("status") == SUBMITTED
                and "task_token" in payload)
    return match


# ---- the worker process ---------------------------------------------------------------

class ProcessStats:
    """Samples a process's RSS (VmRSS) from /proc every `interval` seconds, keeps the peak,
    and reads its CPU time, so figures cover the whole process (Python + SDK core)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _field_kb(self, name: str) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as handle:
                for line in handle:
                    if line.startswith(name + ":"):
                        return int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            return None
        return None

    def rss_mb(self) -> float | None:
        kb = self._field_kb("VmRSS")
        if kb is not None:
            self.peak_rss_kb = max(self.peak_rss_kb, kb)
        return None if kb is None else round(kb / 1024, 1)

    def hwm_mb(self) -> float | None:
        kb = self._field_kb("VmHWM")
        return None if kb is None else round(kb / 1024, 1)

    def cpu_seconds(self) -> float | None:
        try:
            with open(f"/proc/{self.pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            return None
        # fields[0] is state (field 3): utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.rss_mb()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def load_average() -> float:
    with open("/proc/loadavg") as handle:
        return float(handle.read().split()[0])


def worker_environment(address: str, task_queue: str, root: Path,
                       overrides: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "VAULT_"))}
    env.update({
        "TEMPORAL_ADDRESS": address,
        "TASK_QUEUE": task_queue,
        "TASK_QUEUE_DIR": str(root / "task-queue"),
        "TEMPORAL_AUDIT_DIR": str(root / "artifacts"),
        "SUMMARY_DIR": str(root / "summaries"),
        "LOG_LEVEL": "WARNING",
        # Short grace so teardown is quick; nothing is in flight by then.
        "WORKER_SHUTDOWN_GRACE_SECONDS": "5",
    })
    env.update(overrides)
    return env


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, str(REPO / "worker.py")], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def wait_for_pollers(client: Client, task_queue: str,
                           worker: subprocess.Popen[bytes], log_path: Path) -> float:
    """Seconds until the worker polls both the workflow and the activity task queue."""
    started = time.monotonic()
    while True:
        if worker.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise BenchError(f"worker exited with {worker.returncode}: {' | '.join(tail)}")
        ready = True
        for kind in (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                     TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY):
            response = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(namespace=client.namespace,
                                         task_queue=TaskQueue(name=task_queue),
                                         task_queue_type=kind))
            ready = ready and bool(response.pollers)
        if ready:
            return time.monotonic() - started
        if time.monotonic() - started > WORKER_READY_SECONDS:
            raise BenchError(f"worker not polling {task_queue} after {WORKER_READY_SECONDS}s")
        await asyncio.sleep(0.1)


# ---- playing pipelines ----------------------------------------------------------------

@dataclass
class Bench:
    client: Client
    agents: Agents
    task_queue: str
    queue_dir: Path
    audit_dir: Path
    handoffs: list[tuple[str, float]] = field(default_factory=list)  # (transition, seconds)
    record_handoffs: bool = False
    origin_tasks: bool = False  # every pipeline gets its originating task file


@dataclass
class PipelineRun:
    workflow_id: str
    wall_s: float
    handle: WorkflowHandle[Any, Any]
    task_id: str = ""


async def play_pipeline(bench: Bench, kind: str, index: int, *, park: bool = False) -> PipelineRun:
    """Start one pipeline and answer each agent stage the moment its task file lands.
    park=True: triage with one block; return once the pipeline has marked the originating
    task input-required (stage 6 done, stage 7 polling)."""
    build = f"bench-{kind}-{index}"
    workflow_id = f"{build}-{uuid.uuid4().hex[:8]}"
    task_id = str(uuid.uuid4())
    queue = bench.agents.register(workflow_id)
    try:
        if park or bench.origin_tasks:
            # payload.workflow_id: the folder watch routes its input-required change here.
            await asyncio.to_thread(write_origin_task, bench.queue_dir, build, task_id=task_id,
                                    workflow_id=workflow_id)
        started = time.monotonic()
        handle = await bench.client.start_workflow(
            BUILD_PIPELINE_WORKFLOW,
            BuildPipelineInput(build_name=build, plan_path=f"/plans/{build}.md",
                               task_id=task_id, target_agent="builder"),
            id=workflow_id, task_queue=bench.task_queue, result_type=BuildPipelineResult)
        completed_at: float | None = None
        previous = "start"
        for task_type in PARK_SEQUENCE if park else AGENT_SEQUENCE:
            seen = await next_file(queue, agent_task(task_type),
                                   f"{task_type} task for {workflow_id}")
            if completed_at is not None and bench.record_handoffs:
                bench.handoffs.append((f"{previous}->{task_type}", seen.seen_at - completed_at))
            if task_type == TASK_SECURITY_AUDIT:
                await asyncio.to_thread(write_triage, bench.audit_dir, build,
                                        BLOCKED_TRIAGE if park else CLEAN_TRIAGE)
            output = f"/closeout/{build}.md" if task_type == TASK_BUILD_CLOSEOUT else "done"
            await complete_with_token(bench.client, seen.task, "success", output)
            completed_at = time.monotonic()
            previous = task_type
        if park:
            await next_file(queue, lambda task: task.get("id") == task_id
                            and task.get("status") in (INPUT_REQUIRED, PENDING_APPROVAL),
                            f"originating task of {workflow_id} marked input-required")
            return PipelineRun(workflow_id, time.monotonic() - started, handle, task_id)
        try:
            result = await asyncio.wait_for(handle.result(), STAGE_WAIT_SECONDS)
        except TimeoutError:
            raise BenchError(f"{workflow_id} did not finish within {STAGE_WAIT_SECONDS:.0f}s")
        if result.outcome != "success":
            raise BenchError(f"{workflow_id} ended {result.outcome}: {result.error}")
        return PipelineRun(workflow_id, time.monotonic() - started, handle)
    finally:
        bench.agents.forget(workflow_id)


async def time_breakdown(handle: WorkflowHandle[Any, Any]) -> dict[str, float]:
    """Where a pipeline's wall time went, from its history (server timestamps, ms):
    workflow tasks waiting for the worker, the worker processing them, activities
    waiting for a worker slot, and activities running (agent stages: until completed)."""
    totals = {"workflow_task_queued": 0.0, "workflow_task_processing": 0.0,
              "activity_queued": 0.0, "activity_running": 0.0}
    marks: dict[str, float] = {}
    history = await handle.fetch_history()
    for event in history.events:
        at = event.event_time.ToMilliseconds()
        kind = str(event.WhichOneof("attributes")).removesuffix("_event_attributes")
        if kind == "workflow_task_started":
            totals["workflow_task_queued"] += at - marks.get("workflow_task_scheduled", at)
        elif kind == "workflow_task_completed":
            totals["workflow_task_processing"] += at - marks.get("workflow_task_started", at)
        elif kind == "activity_task_started":
            totals["activity_queued"] += at - marks.get("activity_task_scheduled", at)
        elif kind == "activity_task_completed":
            totals["activity_running"] += at - marks.get("activity_task_started", at)
        marks[kind] = at
    return {key: round(value, 1) for key, value in totals.items()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms_stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"p50": round(percentile(values, 0.50) * 1000, 1),
            "p95": round(percentile(values, 0.95) * 1000, 1),
            "max": round(max(values) * 1000, 1), "n": len(values)}


async def gather_bounded(count: int, limit: int,
                         make: Callable[[int], Awaitable[PipelineRun]]) -> list[PipelineRun]:
    gate = asyncio.Semaphore(limit)

    async def one(index: int) -> PipelineRun:
        async with gate:
            return await make(index)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def parked_snapshot(handles: list[WorkflowHandle[Any, Any]]) -> dict[str, Any]:
    """History length of each handle parked at stage 7: running, nothing pending but its
    deadline timer (server-side describe: no workflow task, no load on the worker)."""
    gate = asyncio.Semaphore(25)

    async def one(handle: WorkflowHandle[Any, Any]) -> int | None:
        async with gate:
            description = await handle.describe()
        if description.raw_description.pending_activities or description.close_time:
            return None
        return description.history_length

    # gather keeps the order of `handles`, so two snapshots compare pipeline by pipeline.
    found = await asyncio.gather(*(one(handle) for handle in handles))
    not_parked = [handle for handle, item in zip(handles, found, strict=True) if item is None]
    return {"history": [history for history in found if history is not None],
            "not_parked": len(not_parked), "not_parked_handles": not_parked}


def approve_by_file(queue_dir: Path, task_id: str) -> float:
    """An operator approves by editing the originating task; returns when it was written."""
    approve_origin(find_task(queue_dir, task_id), "bench-operator")
    return time.monotonic()


# ---- deciding from the Matrix room (--matrix-decisions) --------------------------------

@dataclass
class BenchChat:
    """A real Synapse holding the worker's Matrix user, one approver and the notice room."""

    server: synapse.Homeserver
    bot_id: str
    approver_id: str
    approver_token: str
    room_alias: str  # short name, as MATRIX_ROOM
    room_id: str
    token_file: Path

    def worker_env(self) -> dict[str, str]:
        return {"MATRIX_HOMESERVER": self.server.url, "MATRIX_ROOM": self.room_alias,
                "MATRIX_ACCESS_TOKEN_FILE": str(self.token_file),
                "MATRIX_APPROVERS": self.approver_id}

    def notices(self, workflow_ids: set[str]) -> dict[str, str]:
        """Workflow id -> event id of the worker's block notice naming it, for those of
        `workflow_ids` in the room, read newest first as a chat client scrolls back."""
        found: dict[str, str] = {}
        params = {"dir": "b", "limit": str(NOTICE_PAGE),
                  "filter": json.dumps({"types": ["m.room.message"], "senders": [self.bot_id]})}
        while len(found) < len(workflow_ids):
            body = self.server.call(self.approver_token, "GET",
                                    f"/_matrix/client/v3/rooms/{self.room_id}/messages",
                                    params=params)
            chunk = body.get("chunk") or []
            for event in chunk:
                ref = event.get("content", {}).get(PIPELINE_CONTENT_KEY)
                if isinstance(ref, dict) and ref.get("workflow_id") in workflow_ids:
                    found.setdefault(ref["workflow_id"], event["event_id"])
            if not chunk or not body.get("end"):
                break
            params["from"] = body["end"]
        return found

    def reply(self, notice_id: str, text: str) -> float:
        """The approver replies to a notice as chat clients write replies (quoted fallback,
        blank line, text); returns when the homeserver accepted it."""
        self.server.send(self.approver_token, self.room_id, {
            "msgtype": "m.text", "body": f"> <{self.bot_id}> block notice\n\n{text}",
            "m.relates_to": {"m.in_reply_to": {"event_id": notice_id}}})
        return time.monotonic()


def open_chat(stack: contextlib.ExitStack, root: Path) -> BenchChat:
    """Start Synapse (stopped when `stack` closes), register the worker's user and an
    approver, and create the room. Blocking: runs before the worker, nothing else waits."""
    try:
        server = stack.enter_context(synapse.running(root / "synapse"))
        bot_id, bot_token = server.register("build-notifier")
        approver_id, approver_token = server.register("bench-approver")
        alias = f"builds-{uuid.uuid4().hex[:8]}"
        room_id = server.create_room(bot_token, alias)
        server.invite_and_join(bot_token, room_id, approver_id, approver_token)
    except (subprocess.SubprocessError, httpx.HTTPError) as err:
        raise BenchError(f"Synapse could not be set up ({type(err).__name__}: {err}); "
                         "it comes with requirements-dev.txt") from None
    token_file = root / "matrix-token"
    with os.fdopen(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                   "w") as handle:
        handle.write(bot_token + "\n")
    return BenchChat(server, bot_id, approver_id, approver_token, alias, room_id, token_file)


async def decide_from_chat(bench: Bench, chat: BenchChat,
                           runs: list[PipelineRun]) -> dict[str, Any]:
    """The approver replies to each parked pipeline's block notice, one at a time; each is
    timed from the reply's send returning until the pipeline's close-out task lands."""
    wanted = {run.workflow_id for run in runs}
    deadline = time.monotonic() + NOTICE_WAIT_SECONDS
    while len(notices := await asyncio.to_thread(chat.notices, wanted)) < len(wanted):
        if time.monotonic() > deadline:
            raise BenchError(f"{len(wanted) - len(notices)} of {len(wanted)} block notices "
                             f"not in the Matrix room after {NOTICE_WAIT_SECONDS:.0f}s")
        await asyncio.sleep(0.5)
    latencies = []
    for run in runs:
        queue = bench.agents.register(run.workflow_id)
        try:
            sent_at = await asyncio.to_thread(chat.reply, notices[run.workflow_id],
                                              APPROVAL_REPLY)
            seen = await next_file(queue, agent_task(TASK_BUILD_CLOSEOUT),
                                   f"close-out task of {run.workflow_id} after the Matrix "
                                   "reply")
            latencies.append(seen.seen_at - sent_at)
        finally:
            bench.agents.forget(run.workflow_id)
    # Only the reply could have moved them on; the pipeline names who decided.
    for run in runs:
        status = await run.handle.query(STATUS_QUERY, result_type=PipelineStatus)
        if (status.decision, status.decided_by) != ("approved", chat.approver_id):
            raise BenchError(f"{run.workflow_id}: decision {status.decision!r} by "
                             f"{status.decided_by!r}, expected approved by the approver")
    return ms_stats(latencies)


# ---- the run --------------------------------------------------------------------------

async def run(args: argparse.Namespace, root: Path, report: dict[str, Any]) -> None:
    queue_dir = ensure_private_dir(root / "task-queue")
    audit_dir = root / "artifacts"
    server_log, worker_log = root / "server.log", root / "worker.log"
    task_queue = f"bench-{uuid.uuid4().hex[:10]}"
    port = devserver.free_port()
    server = devserver.start(port, log_path=server_log)
    worker: subprocess.Popen[bytes] | None = None
    watch: FolderWatch | None = None
    stats: ProcessStats | None = None
    matrix = contextlib.ExitStack()
    chat: BenchChat | None = None
    try:
        address = f"127.0.0.1:{port}"
        client = await connect(load_config({"TEMPORAL_ADDRESS": address,
                                            "TASK_QUEUE": task_queue}))
        chat_env: dict[str, str] = {}
        if args.matrix_decisions > 0:
            synapse_started = time.monotonic()
            chat = open_chat(matrix, root)
            report["synapse_ready_s"] = round(time.monotonic() - synapse_started, 1)
            chat_env = chat.worker_env()
        env = worker_environment(address, task_queue, root, {**chat_env, **args.worker_env})
        # Inherited Matrix settings (an operator's token, say) must not mix with the room's.
        for key in [k for k in env if chat is not None and k.startswith("MATRIX_")
                    and k not in chat_env and k not in args.worker_env]:
            del env[key]
        worker = start_worker(env, worker_log)
        stats = ProcessStats(worker.pid)
        stats.start()
        report["worker_ready_s"] = round(
            await wait_for_pollers(client, task_queue, worker, worker_log), 2)
        agents = Agents(asyncio.get_running_loop())
        watch = FolderWatch(queue_dir, agents.deliver_threadsafe, args.watch)
        watch.start()
        bench = Bench(client, agents, task_queue, queue_dir, audit_dir,
                      origin_tasks=args.origin_tasks)

        async def checked(step: Any) -> Any:
            """Await a step, failing fast if the worker or the watcher died meanwhile."""
            task = asyncio.ensure_future(step)
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if watch is not None and watch.error is not None:
                    task.cancel()
                    raise BenchError(f"folder watch failed: {watch.error}")
                if worker is not None and worker.poll() is not None:
                    task.cancel()
                    raise BenchError(f"worker exited with {worker.returncode} "
                                     f"(log: {worker_log})")
            return task.result()

        # 1. One clean pipeline (after one warm-up that pays imports and connections).
        cold = await checked(play_pipeline(bench, "warm", 0))
        bench.record_handoffs = True
        single = await checked(play_pipeline(bench, "single", 0))
        report["single_pipeline_wall_s"] = round(single.wall_s, 3)
        report["single_pipeline_cold_wall_s"] = round(cold.wall_s, 3)
        report["single_pipeline_breakdown_ms"] = await time_breakdown(single.handle)
        # The unloaded hand-off: one pipeline in flight.
        report["single_pipeline_handoff_ms"] = [round(seconds * 1000, 1)
                                                for _, seconds in bench.handoffs]
        bench.handoffs.clear()

        # 2. M pipelines in flight at once.
        bench.record_handoffs = True
        server_stats, own_stats = ProcessStats(server.pid), ProcessStats(os.getpid())
        cpu_before = stats.cpu_seconds() or 0.0
        server_cpu_before = server_stats.cpu_seconds() or 0.0
        own_cpu_before = own_stats.cpu_seconds() or 0.0
        machine_before = machine_cpu_ticks()
        started = time.monotonic()
        await checked(gather_bounded(args.concurrent, args.concurrent,
                                     lambda i: play_pipeline(bench, "c", i)))
        batch_wall = time.monotonic() - started
        bench.record_handoffs = False
        values = [seconds for _, seconds in bench.handoffs]
        handoff = ms_stats(values)
        # A landing seen before the completing coroutine resumed (busy event loop) gives a
        # negative value; counted so a skewed p50 is visible.
        handoff["n_negative"] = sum(1 for value in values if value < 0)
        handoff["watch"] = ("inotify IN_MOVED_TO (ctypes), timestamped in a watcher thread"
                            if args.watch == "inotify" else
                            f"os.scandir poll every {FolderWatch.POLL_SECONDS * 1000:.0f} ms")
        handoff["by_transition"] = {
            name: ms_stats([s for t, s in bench.handoffs if t == name])
            for name in sorted({t for t, _ in bench.handoffs})}
        report["handoff_ms"] = handoff
        report["concurrent"] = args.concurrent
        report["concurrent_batch_wall_s"] = round(batch_wall, 2)
        report["pipelines_per_s"] = round(args.concurrent / batch_wall, 2)
        # Where the cores went during the batch (100 % = one core busy). "others" is what
        # the rest of the machine used: on a shared machine it explains slow runs.
        machine_busy, machine_total = (after - before for after, before in
                                       zip(machine_cpu_ticks(), machine_before, strict=True))
        worker_cpu = (stats.cpu_seconds() or 0.0) - cpu_before
        server_cpu = (server_stats.cpu_seconds() or 0.0) - server_cpu_before
        own_cpu = (own_stats.cpu_seconds() or 0.0) - own_cpu_before
        cores = os.cpu_count() or 1
        machine_cpu = cores * batch_wall * machine_busy / max(1, machine_total)
        report["cpu_percent_during_batch"] = {
            "worker": round(100 * worker_cpu / batch_wall, 1),
            "server": round(100 * server_cpu / batch_wall, 1),
            "bench": round(100 * own_cpu / batch_wall, 1),
            "others": round(100 * max(0.0, machine_cpu - worker_cpu - server_cpu - own_cpu)
                            / batch_wall, 1),
            "machine_capacity": 100 * cores}
        report["cpu_ms_per_pipeline"] = {
            "worker": round(1000 * worker_cpu / args.concurrent, 1),
            "server": round(1000 * server_cpu / args.concurrent, 1)}
        report["worker_rss_mb_after_batch"] = stats.rss_mb()

        # 3. Park N pipelines at stage 7, then time a new clean pipeline.
        if args.parked > 0:
            report["parked"] = await checked(park_and_measure(args, bench, stats, server_stats,
                                                              queue_dir, chat))
        report["worker_peak_rss_mb"] = max(stats.hwm_mb() or 0.0,
                                           round(stats.peak_rss_kb / 1024, 1))
        report["task_files_in_queue"] = sum(1 for p in queue_dir.glob("*.yml"))
    finally:
        if watch is not None:
            watch.stop()
        if stats is not None:
            stats.stop()
        if worker is not None:
            devserver.stop(worker, WORKER_STOP_SECONDS, terminate_group=False)
            report.setdefault("worker_exit_code", worker.returncode)
        try:
            matrix.close()  # Synapse, after the worker that listens to it
        finally:
            devserver.stop(server)


async def park_and_measure(args: argparse.Namespace, bench: Bench, stats: ProcessStats,
                           server_stats: ProcessStats, queue_dir: Path,
                           chat: BenchChat | None) -> dict[str, Any]:
    started = time.monotonic()
    runs = await gather_bounded(args.parked, args.park_parallel,
                                lambda i: play_pipeline(bench, "p", i, park=True))
    parking_wall = time.monotonic() - started
    handles = [run.handle for run in runs]
    # The originating task is marked input-required by stage 6 a moment before the
    # workflow enters stage 7: wait (bounded) until every one is parked.
    deadline = time.monotonic() + STAGE_WAIT_SECONDS
    waiting = handles
    while waiting:
        everyone = await parked_snapshot(waiting)
        waiting = everyone["not_parked_handles"]
        if waiting and time.monotonic() > deadline:
            raise BenchError(f"{len(waiting)} of {len(handles)} pipelines are not parked "
                             f"at stage 7 after {STAGE_WAIT_SECONDS:.0f}s")
        if waiting:
            await asyncio.sleep(0.5)
    rss_after_parking = stats.rss_mb()

    # Idle: N parked, nothing else happening. What do the worker and the server burn?
    sample = handles[:: max(1, len(handles) // IDLE_SAMPLE)][:IDLE_SAMPLE]
    before = await parked_snapshot(sample)
    worker_cpu, server_cpu = stats.cpu_seconds() or 0.0, server_stats.cpu_seconds() or 0.0
    window_start = time.monotonic()
    await asyncio.sleep(args.idle_window)  # measuring idleness: nothing to wait for
    window = time.monotonic() - window_start
    idle = {
        "window_s": round(window, 1),
        "worker_cpu_percent": round(100 * ((stats.cpu_seconds() or 0.0) - worker_cpu)
                                    / window, 2),
        "server_cpu_percent": round(100 * ((server_stats.cpu_seconds() or 0.0) - server_cpu)
                                    / window, 2),
    }
    after = await parked_snapshot(sample)
    if before["not_parked"] or after["not_parked"]:
        raise BenchError("a sampled parked pipeline left stage 7 during the idle window")
    idle["sampled"] = len(sample)
    idle["history_events_added_max"] = max(
        b - a for a, b in zip(before["history"], after["history"], strict=True))

    new_runs = [await play_pipeline(bench, "new", i) for i in range(3)]
    rss_after_new = stats.rss_mb()

    # File decisions: approve some parked ones through their originating task, one at a
    # time, and time each until its close-out task lands (the next stage began).
    latencies = []
    for run in runs[:args.decisions]:
        queue = bench.agents.register(run.workflow_id)
        try:
            decided_at = await asyncio.to_thread(approve_by_file, queue_dir, run.task_id)
            seen = await next_file(queue, agent_task(TASK_BUILD_CLOSEOUT),
                                   f"close-out task of {run.workflow_id} after approval")
            latencies.append(seen.seen_at - decided_at)
        finally:
            bench.agents.forget(run.workflow_id)
    # Chat decisions: other parked pipelines, approved by a reply to their block notice.
    matrix: dict[str, Any] = {}
    if chat is not None:
        matrix["matrix_decision_to_next_stage_ms"] = await decide_from_chat(
            bench, chat, runs[args.decisions:args.decisions + args.matrix_decisions])
    return {
        "parked": args.parked,
        "parking_wall_s": round(parking_wall, 1),
        "idle": idle,
        "new_pipeline_wall_s": round(new_runs[0].wall_s, 3),
        "new_pipeline_wall_s_runs": [round(run.wall_s, 3) for run in new_runs],
        "new_pipeline_breakdown_ms": await time_breakdown(new_runs[0].handle),
        "worker_rss_mb_after_parking": rss_after_parking,
        "worker_rss_mb_after_new_pipelines": rss_after_new,
        "file_decision_to_next_stage_ms": ms_stats(latencies),
        **matrix,
    }


def targets(report: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    p50 = report.get("handoff_ms", {}).get("p50")
    if p50 is not None:
        checks["handoff_p50_ms"] = {"value": p50, "target": TARGET_HANDOFF_P50_MS,
                                    "met": p50 <= TARGET_HANDOFF_P50_MS}
    parked = report.get("parked")
    if isinstance(parked, dict):
        for who in ("worker", "server"):
            value = parked["idle"][f"{who}_cpu_percent"]
            checks[f"idle_{who}_cpu_percent_parked"] = {
                "value": value, "target": TARGET_IDLE_CPU_PERCENT,
                "met": value <= TARGET_IDLE_CPU_PERCENT}
        decision_p95 = parked["file_decision_to_next_stage_ms"].get("p95")
        if decision_p95 is not None:
            checks["file_decision_p95_ms"] = {
                "value": decision_p95, "target": TARGET_DECISION_MS,
                "met": decision_p95 <= TARGET_DECISION_MS}
        matrix_p95 = parked.get("matrix_decision_to_next_stage_ms", {}).get("p95")
        if matrix_p95 is not None:
            checks["matrix_decision_p95_ms"] = {
                "value": matrix_p95, "target": TARGET_MATRIX_DECISION_MS,
                "met": matrix_p95 <= TARGET_MATRIX_DECISION_MS}
        checks["new_pipeline_wall_s"] = {
            "value": parked["new_pipeline_wall_s"], "target": TARGET_NEW_PIPELINE_S,
            "met": parked["new_pipeline_wall_s"] <= TARGET_NEW_PIPELINE_S}
        rss = max(parked["worker_rss_mb_after_parking"] or 0,
                  parked["worker_rss_mb_after_new_pipelines"] or 0)
        checks["worker_rss_mb_parked"] = {"value": rss, "target": TARGET_WORKER_RSS_MB,
                                          "met": rss <= TARGET_WORKER_RSS_MB}
        checks["no_history_growth_while_parked"] = {
            "value": parked["idle"]["history_events_added_max"], "target": 0,
            "met": parked["idle"]["history_events_added_max"] == 0}
    return checks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parked", type=int, default=1000,
                        help="pipelines to park at stage 7 (0 skips parking; default 1000)")
    parser.add_argument("--concurrent", type=int, default=100,
                        help="pipelines in flight for the hand-off batch (default 100)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON report here")
    parser.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the worker (tuning), repeatable")
    parser.add_argument("--watch", choices=("inotify", "poll"), default="inotify",
                        help="how the agents notice task files (default inotify)")
    parser.add_argument("--park-parallel", type=int, default=200,
                        help="pipelines being driven to stage 7 at once (default 200)")
    parser.add_argument("--decisions", type=int, default=20,
                        help="parked pipelines approved through their task file, one at a "
                             "time, for the decision latency (default 20)")
    parser.add_argument("--idle-window", type=float, default=30.0,
                        help="seconds the worker's and server's CPU is sampled with the "
                             "pipelines parked and nothing else happening (default 30)")
    parser.add_argument("--matrix-decisions", type=int, default=0, metavar="K",
                        help="parked pipelines (besides the --decisions ones) approved by a "
                             "reply to their block notice in a Matrix room on a Synapse the "
                             "bench starts, one at a time (default 0: skipped)")
    parser.add_argument("--dialect", choices=DIALECTS, default=DIALECT_PLATFORM,
                        help="the worker's TASK_FILE_DIALECT (default: platform, with "
                             "TASK_TOKEN_IN_FILE=true so the stand-in agents complete by "
                             "token, in process)")
    parser.add_argument("--origin-tasks", action="store_true",
                        help="give every pipeline its originating task file, as "
                             "`tools/start-build --create-task` does (default: only parked "
                             "ones; without it, stage 1 looks for the file in vain)")
    args = parser.parse_args(argv)
    if args.parked < 0 or args.concurrent < 1 or args.park_parallel < 1:
        parser.error("--parked must be >= 0, --concurrent and --park-parallel >= 1")
    if args.decisions < 0 or args.matrix_decisions < 0:
        parser.error("--decisions and --matrix-decisions must be >= 0")
    if args.matrix_decisions > 0 and args.parked < args.decisions + args.matrix_decisions:
        parser.error("--matrix-decisions K needs --parked >= --decisions + K (the pipelines "
                     "decided from chat are parked ones not decided through their file)")
    overrides: dict[str, str] = {"TASK_FILE_DIALECT": args.dialect}
    if args.dialect == DIALECT_PLATFORM:
        overrides["TASK_TOKEN_IN_FILE"] = "true"
    for item in args.worker_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--worker-env expects KEY=VALUE, got {item!r}")
        overrides[key] = value
    args.worker_env = overrides
    return args


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return EXIT_OK if exit_.code == 0 else EXIT_USAGE
    # SIGTERM and SIGINT both end the run cleanly, even when SIGINT was inherited as
    # ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    report: dict[str, Any] = {"machine_cores": os.cpu_count(),
                              "load_average_at_start": load_average(),
                              "worker_env": args.worker_env, "watch": args.watch,
                              "origin_tasks": args.origin_tasks}
    started = time.monotonic()
    code = EXIT_OK
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
            asyncio.run(run(args, Path(tmp), report))
    except KeyboardInterrupt:
        print("pipeline_bench: interrupted; everything it started is stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (BenchError, RuntimeError, OSError) as err:
        print(f"pipeline_bench: {err}", file=sys.stderr)
        report["error"] = str(err)
        code = EXIT_FAILED
    report["load_average_at_end"] = load_average()
    report["targets"] = targets(report)
    report["total_wall_s"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
