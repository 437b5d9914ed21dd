"""Operator tools: the Temporal dev server, the worker processes and workflow executions.

Every executable in tools/ (ensure-server, ensure-worker, kill-worker, ...) is a thin
wrapper running `python -m tools.ops <tool> [options]`; this module is their one
implementation. start-build, approve-build and reject-build live in tools/start_build.py
and tools/decide.py and share the connection and exit-code helpers defined here.

Processes are only ever stopped through the PID files these tools wrote: each file
records the PID *and* the kernel start time of the process, so a PID reused by an
unrelated process is never signalled. Nothing is looked up or killed by name.

Environment (defaults in brackets):
  CLAUDE_TEMPORAL_LOG_DIR [/tmp/claude-temporal-logs]   log files
  CLAUDE_TEMPORAL_PID_DIR [/tmp/claude-temporal-pids]   PID files
  CLAUDE_TEMPORAL_PROJECT_DIR [this repository]         where the worker runs
  CLAUDE_TEMPORAL_PROJECT_NAME [basename of project dir] names logs and PID files
  CLAUDE_TEMPORAL_NAMESPACE [TEMPORAL_NAMESPACE or default]
  TEMPORAL_ADDRESS [localhost:7233]                     server gRPC address
  TEMPORAL_CLI [the venv's temporal]                    binary for `server start-dev`
  TEMPORAL_WORKER_CMD [<this python> worker.py]         command that runs the worker
  TASK_QUEUE [helm-build]                               queue checked by monitor-worker-health

Exit codes shared by every tool (each tool's --help says which apply):
  0 done / healthy · 1 needs attention (failed, unhealthy, stalled, refused) · 2 usage
  or configuration error · 3 workflow not found · 4 cannot connect to Temporal · 5 timed out
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from models import COMPLETED_OUTCOMES

EXIT_OK, EXIT_ATTENTION, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CONNECT, EXIT_TIMEOUT = range(6)
EXIT_CODES_HELP = ("exit codes: 0 done/healthy, 1 needs attention, 2 usage or configuration "
                   "error, 3 workflow not found, 4 cannot connect to Temporal, 5 timed out")

REPO = Path(__file__).resolve().parent.parent
READY_LINE = "Worker started, listening on task queue"
CONNECT_TIMEOUT_SECONDS = 10.0
# Activity failures that are the stage-7 poll loop working as designed, not a problem.
BENIGN_FAILURE_TYPES = frozenset({"BlocksPendingError"})
STATUSES = ("RUNNING", "COMPLETED", "FAILED", "CANCELED", "TERMINATED", "CONTINUED_AS_NEW",
            "TIMED_OUT")


class ToolError(Exception):
    """A tool cannot go on; carries the exit code and the one line to print."""

    def __init__(self, message: str, exit_code: int = EXIT_ATTENTION) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---- settings --------------------------------------------------------------------------


@dataclass(frozen=True)
class OpsSettings:
    log_dir: Path
    pid_dir: Path
    project_dir: Path
    project_name: str
    namespace: str
    address: str
    temporal_cli: str | None
    worker_cmd: list[str]
    task_queue: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OpsSettings:
        env = os.environ if env is None else env
        project_dir = Path(env.get("CLAUDE_TEMPORAL_PROJECT_DIR") or REPO).resolve()
        worker_cmd = env.get("TEMPORAL_WORKER_CMD")
        return cls(
            log_dir=Path(env.get("CLAUDE_TEMPORAL_LOG_DIR") or "/tmp/claude-temporal-logs"),
            pid_dir=Path(env.get("CLAUDE_TEMPORAL_PID_DIR") or "/tmp/claude-temporal-pids"),
            project_dir=project_dir,
            project_name=env.get("CLAUDE_TEMPORAL_PROJECT_NAME") or project_dir.name,
            namespace=(env.get("CLAUDE_TEMPORAL_NAMESPACE") or env.get("TEMPORAL_NAMESPACE")
                       or "default"),
            address=env.get("TEMPORAL_ADDRESS") or "localhost:7233",
            temporal_cli=env.get("TEMPORAL_CLI") or None,
            worker_cmd=(shlex.split(worker_cmd) if worker_cmd
                        else [sys.executable, str(project_dir / "worker.py")]),
            task_queue=env.get("TASK_QUEUE") or "helm-build",
        )

    def pid_file(self, role: str, project: str | None = None) -> Path:
        return self.pid_dir / f"{role}-{project or self.project_name}.pid"

    def log_file(self, role: str, project: str | None = None) -> Path:
        return self.log_dir / f"{role}-{project or self.project_name}.log"

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit():
            raise ToolError(f"TEMPORAL_ADDRESS {self.address!r} must be host:port", EXIT_USAGE)
        return ("127.0.0.1" if host == "localhost" else host), int(port)


# ---- processes we started (PID files) ---------------------------------------------------


def proc_start_ticks(pid: int) -> int | None:
    """Kernel start time of `pid` (clock ticks since boot); None if gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rpartition(")")[2].split()
    if not fields or fields[0] == "Z":
        return None
    return int(fields[19])


@dataclass
class ProcessRecord:
    """What a PID file holds: enough to recognise the exact process we started."""

    pid: int
    start_ticks: int
    role: str
    project: str
    cmd: list[str]
    log: str
    started_at: str
    path: Path

    def alive(self) -> bool:
        return proc_start_ticks(self.pid) == self.start_ticks

    def uptime(self) -> str:
        started = datetime.fromisoformat(self.started_at)
        return str(timedelta(seconds=int((datetime.now(UTC) - started).total_seconds())))


def read_record(path: Path) -> ProcessRecord | None:
    try:
        data = json.loads(path.read_text())
        return ProcessRecord(pid=int(data["pid"]), start_ticks=int(data["start_ticks"]),
                             role=str(data["role"]), project=str(data["project"]),
                             cmd=list(data["cmd"]), log=str(data["log"]),
                             started_at=str(data["started_at"]), path=path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def records(settings: OpsSettings, role: str) -> list[ProcessRecord]:
    found = []
    for path in sorted(settings.pid_dir.glob(f"{role}-*.pid")):
        record = read_record(path)
        if record is not None and record.role == role:
            found.append(record)
    return found


def spawn(settings: OpsSettings, role: str, cmd: list[str], *, cwd: Path,
          env: Mapping[str, str] | None = None) -> ProcessRecord:
    """Start `cmd` detached (own session), log to the role's log file, write its PID file."""
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    settings.pid_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.log_file(role)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, cwd=cwd, env=dict(env or os.environ),
                                   stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    ticks = proc_start_ticks(process.pid)
    if ticks is None:
        process.wait()
        raise ToolError(f"{role} exited at once with code {process.returncode}; "
                        f"see {log_path}")
    record = ProcessRecord(pid=process.pid, start_ticks=ticks, role=role,
                           project=settings.project_name, cmd=cmd, log=str(log_path),
                           started_at=datetime.now(UTC).isoformat(timespec="seconds"),
                           path=settings.pid_file(role))
    data = {k: v for k, v in vars(record).items() if k != "path"}
    temp = record.path.with_suffix(".tmp")
    temp.write_text(json.dumps(data, indent=1) + "\n")
    temp.replace(record.path)
    # The child outlives this process; forget it so no ResourceWarning is raised.
    process.returncode = 0
    return record


def stop(record: ProcessRecord, timeout: float = 45.0) -> str:
    """Stop the process a PID file describes (its whole process group); remove the file.

    A PID that now belongs to another process is left alone: only the file goes.
    """
    if not record.alive():
        record.path.unlink(missing_ok=True)
        return f"{record.role} {record.project}: pid {record.pid} was not running " \
               f"(stale PID file removed)"
    # spawn() made the process a session leader, so its group id is its pid.
    group = os.getpgid(record.pid) == record.pid

    def send(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record.pid, signum) if group else os.kill(record.pid, signum)

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while record.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    how = "stopped"
    if record.alive():
        send(signal.SIGKILL)
        how = f"killed (did not stop within {timeout:.0f}s of SIGTERM)"
        while record.alive() and time.monotonic() < deadline + 10:
            time.sleep(0.1)
    if record.alive():
        raise ToolError(f"{record.role} pid {record.pid} did not exit")
    record.path.unlink(missing_ok=True)
    return f"{record.role} {record.project}: pid {record.pid} {how}"


# ---- Temporal connection ------------------------------------------------------------------


async def connect_client(env: Mapping[str, str] | None = None) -> Any:
    """A client with the worker's settings (address, namespace, TLS, pydantic converter).

    Raises ToolError(EXIT_USAGE) for bad configuration, ToolError(EXIT_CONNECT) when the
    server cannot be reached within CONNECT_TIMEOUT_SECONDS.
    """
    from config import load_config
    from exceptions import ConfigError, CredentialError
    from temporal_client import connect

    values = dict(os.environ if env is None else env)
    if values.get("CLAUDE_TEMPORAL_NAMESPACE"):
        values["TEMPORAL_NAMESPACE"] = values["CLAUDE_TEMPORAL_NAMESPACE"]
    try:
        config = load_config(values)
    except ConfigError as err:
        raise ToolError(f"configuration error: {err}", EXIT_USAGE) from None
    try:
        return await asyncio.wait_for(connect(config), CONNECT_TIMEOUT_SECONDS)
    except CredentialError as err:
        raise ToolError(f"credentials: {err}", EXIT_CONNECT) from None
    except (TimeoutError, RuntimeError) as err:
        detail = str(err).splitlines()[0][:200] if str(err) else "timed out"
        raise ToolError(f"cannot connect to Temporal at {config.temporal_address}: {detail}",
                        EXIT_CONNECT) from None


def not_found(err: BaseException) -> bool:
    from temporalio.service import RPCError, RPCStatusCode

    return isinstance(err, RPCError) and err.status == RPCStatusCode.NOT_FOUND


def status_name(status: Any) -> str:
    return status.name if status is not None else "UNKNOWN"


async def describe(client: Any, workflow_id: str, run_id: str | None = None) -> Any:
    from temporalio.service import RPCError

    try:
        return await client.get_workflow_handle(workflow_id, run_id=run_id).describe()
    except RPCError as err:
        if not_found(err):
            raise ToolError(f"workflow {workflow_id!r} not found", EXIT_NOT_FOUND) from None
        raise


async def history_events(client: Any, workflow_id: str, run_id: str | None = None) -> list[Any]:
    from temporalio.service import RPCError

    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    try:
        return [event async for event in handle.fetch_history_events()]
    except RPCError as err:
        if not_found(err):
            raise ToolError(f"workflow {workflow_id!r} not found", EXIT_NOT_FOUND) from None
        raise


def payload_json(payloads: Any) -> Any:
    """Decode the first payload of a Payloads message as JSON (our converter's format)."""
    if not payloads.payloads:
        return None
    data = payloads.payloads[0].data
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")


def failure_text(failure: Any) -> str:
    """`Type: message` of a Failure proto, following its cause chain."""
    parts = []
    while failure is not None and failure.message:
        kind = failure.application_failure_info.type if failure.HasField(
            "application_failure_info") else ""
        parts.append(f"{kind}: {failure.message}" if kind else failure.message)
        failure = failure.cause if failure.HasField("cause") else None
    return " <- ".join(parts) or "(no message)"


def stack_tail(failure: Any, lines: int = 3) -> list[str]:
    return [line for line in (failure.stack_trace or "").strip().splitlines() if line][-lines:]


# ---- lifecycle tools ----------------------------------------------------------------------


def ensure_server(settings: OpsSettings, args: argparse.Namespace) -> int:
    from tools.devserver import is_listening, temporal_binary

    host, port = settings.host_port()
    mine = read_record(settings.pid_file("server"))
    if is_listening(host, port):
        owner = (f"started by these tools, pid {mine.pid}" if mine and mine.alive()
                 else "not started by these tools")
        print(f"ensure-server: Temporal already listening on {host}:{port} ({owner})")
        return EXIT_OK
    if mine is not None and not mine.alive():
        mine.path.unlink(missing_ok=True)
    ui_port = args.ui_port if args.ui_port is not None else port + 1000
    cmd = [settings.temporal_cli or temporal_binary(), "server", "start-dev", "--ip", host,
           "--port", str(port), "--ui-port", str(ui_port), "--log-level", "warn",
           "--namespace", settings.namespace,
           "--dynamic-config-value", "frontend.enableUpdateWorkflowExecution=true"]
    if args.db_filename:
        cmd += ["--db-filename", str(args.db_filename)]
    record = spawn(settings, "server", cmd, cwd=settings.project_dir)
    asyncio.run(wait_healthy(record, args.timeout))
    print(f"ensure-server: started Temporal dev server pid {record.pid} on {host}:{port}, "
          f"Web UI http://{host}:{ui_port}, log {record.log}")
    return EXIT_OK


async def wait_healthy(record: ProcessRecord, timeout: float,
                       env: Mapping[str, str] | None = None) -> None:
    """Until a client can connect (the port opens before the frontend is healthy)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not record.alive():
            record.path.unlink(missing_ok=True)
            raise ToolError(f"dev server exited during startup; see {record.log}")
        try:
            await connect_client(env)
            return
        except ToolError as err:
            if err.exit_code != EXIT_CONNECT:
                raise
            last = str(err)
        await asyncio.sleep(0.3)
    raise ToolError(f"dev server not healthy after {timeout:.0f}s ({last}); see {record.log}",
                    EXIT_TIMEOUT)


def ensure_worker(settings: OpsSettings, args: argparse.Namespace) -> int:
    old = read_record(settings.pid_file("worker"))
    if old is not None:
        print(f"ensure-worker: {stop(old, args.stop_timeout)}")
    log_path = settings.log_file("worker")
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    record = spawn(settings, "worker", settings.worker_cmd, cwd=settings.project_dir)
    wait_ready(record, offset, args.timeout)
    print(f"ensure-worker: worker pid {record.pid} ready (project {settings.project_name}, "
          f"log {log_path})")
    return EXIT_OK


def wait_ready(record: ProcessRecord, offset: int, timeout: float) -> None:
    """Until the worker logs its ready line (after byte `offset` of its log)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(record.log, "rb") as log:
            log.seek(offset)
            fresh = log.read().decode("utf-8", "replace")
        if READY_LINE in fresh:
            return
        if not record.alive():
            record.path.unlink(missing_ok=True)
            last = (fresh.strip().splitlines() or ["(no output)"])[-1][:300]
            raise ToolError(f"worker process died during startup: {last} (log {record.log})")
        if time.monotonic() > deadline:
            raise ToolError(f"worker pid {record.pid} not ready after {timeout:.0f}s; "
                            f"still running; see {record.log}", EXIT_TIMEOUT)
        time.sleep(0.1)


def kill_worker(settings: OpsSettings, args: argparse.Namespace) -> int:
    record = read_record(settings.pid_file("worker"))
    if record is None:
        print(f"kill-worker: no worker started by these tools for project "
              f"{settings.project_name}")
        return EXIT_OK
    print(f"kill-worker: {stop(record, args.timeout)}")
    return EXIT_OK


def kill_all_workers(settings: OpsSettings, args: argparse.Namespace) -> int:
    roles = ["worker", "server"] if args.include_server else ["worker"]
    found = [record for role in roles for record in records(settings, role)]
    if not found:
        print("kill-all-workers: nothing started by these tools is running")
    for record in found:
        print(f"kill-all-workers: {stop(record, args.timeout)}")
    return EXIT_OK


def list_workers(settings: OpsSettings, args: argparse.Namespace) -> int:
    found = records(settings, "worker")
    running = 0
    print(f"{'PROJECT':<24} {'PID':>8} {'STATE':<8} {'UPTIME':>10}  LOG")
    for record in found:
        alive = record.alive()
        running += alive
        print(f"{record.project:<24} {record.pid:>8} {'running' if alive else 'stale':<8} "
              f"{record.uptime() if alive else '-':>10}  {record.log}")
    if not found:
        print("(no workers started by these tools)")
    return EXIT_OK if running else EXIT_ATTENTION


async def _task_queue_pollers(client: Any, queue: str) -> list[str]:
    from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    identities = []
    for kind in (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY):
        reply = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(
                name=queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL), task_queue_type=kind))
        label = TaskQueueType.Name(kind).removeprefix("TASK_QUEUE_TYPE_").lower()
        # The server remembers pollers for minutes after they are gone; a local one whose
        # process no longer exists is dropped here.
        identities += [f"{label}:{poller.identity}" for poller in reply.pollers
                       if not _local_and_gone(poller.identity)]
    return identities


def _local_and_gone(identity: str) -> bool:
    """True for `host:pid` (worker.py) or `pid@host` (SDK default) naming a dead local pid."""
    import socket

    host, _, pid = identity.rpartition(":")
    if not pid.isdigit():
        pid, _, host = identity.partition("@")
    return host == socket.gethostname() and pid.isdigit() and proc_start_ticks(int(pid)) is None


def monitor_worker_health(settings: OpsSettings, args: argparse.Namespace) -> int:
    queue = args.task_queue or settings.task_queue
    problems: list[str] = []
    record = read_record(settings.pid_file("worker"))
    if record is None:
        print(f"process: no worker started by these tools for project {settings.project_name}")
    elif record.alive():
        rss = _rss(record.pid)
        print(f"process: pid {record.pid} running for {record.uptime()}, RSS {rss}")
    else:
        print(f"process: pid {record.pid} is NOT running (stale PID file {record.path})")
        problems.append("worker process is not running")
    if record is not None:
        log = Path(record.log)
        tail = log.read_text(errors="replace").splitlines()[-500:] if log.exists() else []
        errors = [line for line in tail if '"level": "ERROR"' in line or "Traceback" in line]
        print(f"log: {log} ({len(errors)} error line(s) in the last {len(tail)} lines)")
        if errors:
            print(f"  last error: {errors[-1][:300]}")
    pollers = asyncio.run(_pollers(queue))
    print(f"task queue {queue!r}: {len(pollers)} poller(s)")
    for identity in pollers:
        print(f"  {identity}")
    if not pollers:
        problems.append(f"no worker polls task queue {queue!r}")
    elif record is not None and record.alive() and not any(
            identity.endswith(f":{record.pid}") for identity in pollers):
        problems.append(f"worker pid {record.pid} is running but not polling {queue!r}")
    for problem in problems:
        print(f"UNHEALTHY: {problem}")
    if not problems:
        print("HEALTHY")
    return EXIT_ATTENTION if problems else EXIT_OK


async def _pollers(queue: str) -> list[str]:
    return await _task_queue_pollers(await connect_client(), queue)


def _rss(pid: int) -> str:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


# ---- workflow tools -----------------------------------------------------------------------


async def list_recent_workflows(settings: OpsSettings, args: argparse.Namespace) -> int:
    client = await connect_client()
    since = datetime.now(UTC) - timedelta(minutes=args.minutes)
    query = f'StartTime > "{since.isoformat(timespec="seconds").replace("+00:00", "Z")}"'
    print(f"{'WORKFLOW ID':<48} {'TYPE':<22} {'STATUS':<11} {'STARTED (UTC)':<20} CLOSED")
    count = 0
    async for wf in client.list_workflows(query, limit=args.limit):
        count += 1
        closed = f"{wf.close_time:%Y-%m-%d %H:%M:%S}" if wf.close_time else "-"
        print(f"{wf.id:<48} {wf.workflow_type:<22} {status_name(wf.status):<11} "
              f"{wf.start_time:%Y-%m-%d %H:%M:%S}  {closed}")
    print(f"({count} workflow(s) started in the last {args.minutes:g} minute(s))")
    return EXIT_OK


@dataclass
class Stall:
    workflow_id: str
    workflow_type: str
    reason: str


async def stall_of(client: Any, workflow_id: str, run_id: str, wf_type: str) -> Stall | None:
    """Why a running workflow makes no progress, or None if it is healthy."""
    description = await describe(client, workflow_id, run_id)
    raw = description.raw_description
    events = await history_events(client, workflow_id, run_id)
    last_wft = None
    for event in events:
        for attr in ("workflow_task_completed_event_attributes",
                     "workflow_task_failed_event_attributes",
                     "workflow_task_timed_out_event_attributes"):
            if event.HasField(attr):
                last_wft = (attr, event)
    pending_wft = raw.pending_workflow_task if raw.HasField("pending_workflow_task") else None
    attempt = pending_wft.attempt if pending_wft is not None else 0
    if last_wft is not None and last_wft[0] == "workflow_task_failed_event_attributes":
        failed = last_wft[1].workflow_task_failed_event_attributes
        message = failure_text(failed.failure).splitlines()[0][:200]
        return Stall(workflow_id, wf_type, f"WorkflowTaskFailed (attempt {max(attempt, 1)}): "
                                           f"{message}")
    if attempt > 2:
        return Stall(workflow_id, wf_type, f"workflow task retrying (attempt {attempt})")
    for pending in raw.pending_activities:
        failure = pending.last_failure if pending.HasField("last_failure") else None
        kind = failure.application_failure_info.type if failure is not None and \
            failure.HasField("application_failure_info") else ""
        if pending.attempt > 2 and kind not in BENIGN_FAILURE_TYPES:
            text = failure_text(failure).splitlines()[0][:200] if failure else "no failure"
            return Stall(workflow_id, wf_type, f"ActivityTaskFailed x{pending.attempt - 1} "
                                               f"({pending.activity_type.name}): {text}")
    return None


async def find_stalled_workflows(settings: OpsSettings, args: argparse.Namespace) -> int:
    client = await connect_client()
    query = 'ExecutionStatus = "Running"' + (f" AND ({args.query})" if args.query else "")
    stalls, checked = [], 0
    async for wf in client.list_workflows(query, limit=args.limit):
        checked += 1
        stall = await stall_of(client, wf.id, wf.run_id, wf.workflow_type)
        if stall is not None:
            stalls.append(stall)
    for stall in stalls:
        print(f"STALLED {stall.workflow_id} ({stall.workflow_type}): {stall.reason}")
        print(f"  next: tools/analyze-workflow-error --workflow-id {stall.workflow_id}")
    print(f"({len(stalls)} stalled of {checked} running workflow(s) checked)")
    return EXIT_ATTENTION if stalls else EXIT_OK


async def wait_for_workflow_status(settings: OpsSettings, args: argparse.Namespace) -> int:
    wanted = args.status.upper().replace("CANCELLED", "CANCELED")
    if wanted not in STATUSES:
        raise ToolError(f"unknown status {args.status!r}; one of {', '.join(STATUSES)}",
                        EXIT_USAGE)
    client = await connect_client()
    deadline = time.monotonic() + args.timeout
    while True:
        current = status_name((await describe(client, args.workflow_id, args.run_id)).status)
        if current == wanted:
            print(f"wait-for-workflow-status: {args.workflow_id} is {current}")
            return EXIT_OK
        if current != "RUNNING":
            raise ToolError(f"{args.workflow_id} closed as {current}; it will never be "
                            f"{wanted}")
        if time.monotonic() > deadline:
            raise ToolError(f"{args.workflow_id} still {current} after {args.timeout:g}s "
                            f"(wanted {wanted})", EXIT_TIMEOUT)
        await asyncio.sleep(args.interval)


def result_problem(result: Any) -> str | None:
    """A COMPLETED workflow whose result still says something went wrong."""
    if isinstance(result, dict):
        outcome = result.get("outcome")
        if outcome not in (None, *COMPLETED_OUTCOMES):
            return f"outcome is {outcome!r}" + (f" (failed stage {result['failed_stage']})"
                                                if result.get("failed_stage") else "")
        status = result.get("status")
        if isinstance(status, str) and status.lower() in ("error", "failed", "failure"):
            return f"status is {status!r}: {result.get('message') or result.get('error')}"
    return None


async def get_workflow_result(settings: OpsSettings, args: argparse.Namespace) -> int:
    client = await connect_client()
    description = await describe(client, args.workflow_id, args.run_id)
    status = status_name(description.status)
    events = await history_events(client, args.workflow_id, args.run_id)
    last = events[-1] if events else None
    if status == "COMPLETED" and last is not None and last.HasField(
            "workflow_execution_completed_event_attributes"):
        payloads = last.workflow_execution_completed_event_attributes.result
        result = payload_json(payloads)
        if args.raw:
            sys.stdout.write((payloads.payloads[0].data.decode("utf-8", "replace")
                              if payloads.payloads else "null") + "\n")
        else:
            took = (description.close_time - description.start_time).total_seconds() \
                if description.close_time and description.start_time else 0.0
            print(f"{args.workflow_id} ({description.workflow_type}) COMPLETED in {took:.1f}s")
            print(json.dumps(result, indent=2, sort_keys=False))
        problem = result_problem(result)
        if problem:
            raise ToolError(f"workflow COMPLETED but its result reports a problem: {problem}")
        return EXIT_OK
    if status == "RUNNING":
        raise ToolError(f"{args.workflow_id} is still RUNNING; no result yet "
                        f"(tools/wait-for-workflow-status --workflow-id {args.workflow_id} "
                        f"--status COMPLETED)")
    reason = ""
    if last is not None and last.HasField("workflow_execution_failed_event_attributes"):
        reason = failure_text(last.workflow_execution_failed_event_attributes.failure)
    elif last is not None and last.HasField("workflow_execution_terminated_event_attributes"):
        reason = last.workflow_execution_terminated_event_attributes.reason
    raise ToolError(f"{args.workflow_id} is {status}, no result" +
                    (f": {reason}" if reason else "") +
                    f" (tools/analyze-workflow-error --workflow-id {args.workflow_id})")


ADVICE = {
    "nondeterminism": "history mismatch: terminate this workflow, fix the code, "
                      "tools/ensure-worker, then start a NEW workflow",
    "workflow_task": "bug in workflow code (or a missing registration): fix it and run "
                     "tools/ensure-worker; no need to terminate, the workflow resumes by itself",
    "activity_retrying": "the activity keeps failing and retrying: fix the activity (or what "
                         "it reads), tools/ensure-worker; it retries with the new code",
    "activity_failed": "an activity failed for good: fix the cause, then start a NEW workflow",
    "PhaseFailedError": "an agent reported failure (or a stage failed): read the task file "
                        "and the summary, then start a NEW build",
    "TriageInvalidError": "the security agent's triage-output.yml is unusable: fix the file "
                          "(the error names the problem), then start a NEW build",
    "InvalidInputError": "the workflow input was refused: fix the input and start again",
    "workflow_failed": "fix the cause, tools/ensure-worker, then start a NEW workflow",
    "timed_out": "raise the timeout (policies.py) if the work legitimately takes longer, "
                 "then start a NEW workflow",
    "terminated": "terminated by an operator or tool; start a NEW workflow if still needed",
    "canceled": "cancelled on request; start a NEW workflow if still needed",
}


def _failure_type(failure: Any) -> str:
    while failure is not None:
        if failure.HasField("application_failure_info") and failure.application_failure_info.type:
            return failure.application_failure_info.type
        failure = failure.cause if failure.HasField("cause") else None
    return ""


def _workflow_task_finding(attrs: Any) -> tuple[str, str, str]:
    from temporalio.api.enums.v1 import WorkflowTaskFailedCause

    cause = WorkflowTaskFailedCause.Name(attrs.cause).removeprefix(
        "WORKFLOW_TASK_FAILED_CAUSE_")
    message = failure_text(attrs.failure)
    text = f"{message} [cause {cause}]"
    tail = stack_tail(attrs.failure)
    if tail:
        text += "\n      " + "\n      ".join(tail)
    nondeterministic = "NON_DETERMINISTIC" in cause or any(
        word in message.lower() for word in ("nondetermin", "non-determin", "history mismatch"))
    return ("WorkflowTaskFailed (workflow stalled)", text,
            ADVICE["nondeterminism" if nondeterministic else "workflow_task"])


async def analyze_workflow_error(settings: OpsSettings, args: argparse.Namespace) -> int:
    client = await connect_client()
    description = await describe(client, args.workflow_id, args.run_id)
    events = await history_events(client, args.workflow_id, args.run_id)
    status = status_name(description.status)
    findings: list[tuple[str, str, str]] = []
    scheduled: dict[int, str] = {}
    for event in events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            scheduled[event.event_id] = \
                event.activity_task_scheduled_event_attributes.activity_type.name
        elif event.HasField("workflow_task_failed_event_attributes"):
            findings.append(_workflow_task_finding(event.workflow_task_failed_event_attributes))
        elif event.HasField("activity_task_failed_event_attributes"):
            attrs = event.activity_task_failed_event_attributes
            name = scheduled.get(attrs.scheduled_event_id, "activity")
            kind = _failure_type(attrs.failure)
            findings.append((f"ActivityTaskFailed ({name})", failure_text(attrs.failure),
                             ADVICE.get(kind, ADVICE["activity_failed"])))
        elif event.HasField("activity_task_timed_out_event_attributes"):
            attrs = event.activity_task_timed_out_event_attributes
            name = scheduled.get(attrs.scheduled_event_id, "activity")
            findings.append((f"ActivityTaskTimedOut ({name})", failure_text(attrs.failure),
                             ADVICE["timed_out"]))
        elif event.HasField("workflow_execution_failed_event_attributes"):
            failure = event.workflow_execution_failed_event_attributes.failure
            kind = _failure_type(failure)
            findings.append(("WorkflowExecutionFailed", failure_text(failure),
                             ADVICE.get(kind, ADVICE["workflow_failed"])))
        elif event.HasField("workflow_execution_timed_out_event_attributes"):
            findings.append(("WorkflowExecutionTimedOut", "execution timeout reached",
                             ADVICE["timed_out"]))
        elif event.HasField("workflow_execution_terminated_event_attributes"):
            attrs = event.workflow_execution_terminated_event_attributes
            findings.append(("WorkflowExecutionTerminated",
                             f"{attrs.reason or 'no reason'} (by {attrs.identity or '?'})",
                             ADVICE["terminated"]))
        elif event.HasField("workflow_execution_canceled_event_attributes"):
            findings.append(("WorkflowExecutionCanceled", "cancel request honoured",
                             ADVICE["canceled"]))
    raw = description.raw_description
    notes: list[str] = []
    for pending in raw.pending_activities:
        failure = pending.last_failure if pending.HasField("last_failure") else None
        kind = _failure_type(failure) if failure is not None else ""
        if kind in BENIGN_FAILURE_TYPES:
            notes.append(f"{pending.activity_type.name} is polling (attempt {pending.attempt}): "
                         f"{failure_text(failure)} — normal while blocks await a decision; "
                         f"tools/approve-build or tools/reject-build decides")
        elif failure is not None and pending.attempt > 1:
            findings.append((f"Activity retrying ({pending.activity_type.name}, "
                             f"attempt {pending.attempt})", failure_text(failure),
                             ADVICE["activity_retrying"]))
    if raw.HasField("pending_workflow_task") and raw.pending_workflow_task.attempt > 1:
        notes.append(f"workflow task attempt {raw.pending_workflow_task.attempt}: the worker "
                     f"keeps failing it (see the worker log {settings.log_file('worker')})")
    print(f"{args.workflow_id} ({description.workflow_type}) status {status}, "
          f"{len(events)} history events")
    for note in notes:
        print(f"note: {note}")
    if not findings:
        print("no errors found in the history")
        return EXIT_OK
    for number, (kind, text, advice) in enumerate(findings, 1):
        print(f"{number}. {kind}: {text}")
        print(f"   what to do: {advice}")
    return EXIT_ATTENTION


async def bulk_cancel_workflows(settings: OpsSettings, args: argparse.Namespace) -> int:
    client = await connect_client()
    query = 'ExecutionStatus = "Running"' + (f" AND ({args.query})" if args.query else "")
    matched = [wf async for wf in client.list_workflows(query, limit=args.limit)
               if fnmatch.fnmatchcase(wf.id, args.pattern)]
    verb = "terminate" if args.terminate else "cancel"
    failed = 0
    for wf in matched:
        if args.dry_run:
            print(f"would {verb} {wf.id} ({wf.workflow_type})")
            continue
        handle = client.get_workflow_handle(wf.id, run_id=wf.run_id)
        try:
            if args.terminate:
                await handle.terminate(args.reason)
            else:
                await handle.cancel()
            print(f"{verb}{'d' if args.terminate else 'led'} {wf.id} ({wf.workflow_type})")
        except Exception as err:  # report every workflow, then exit 1
            failed += 1
            print(f"could not {verb} {wf.id}: {str(err).splitlines()[0][:200]}",
                  file=sys.stderr)
    if not matched:
        print(f"no running workflow id matches {args.pattern!r}")
    elif not args.terminate and not args.dry_run:
        print("note: a cancel request is handled by the workflow code; a stalled workflow "
              "(failing workflow task) only stops with --terminate")
    return EXIT_ATTENTION if failed else EXIT_OK


# ---- command line -------------------------------------------------------------------------

Handler = Callable[[OpsSettings, argparse.Namespace], int | Awaitable[int]]


def _add_workflow_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workflow-id", required=True)
    parser.add_argument("--run-id", help="a specific run (default: the latest)")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(prog="python -m tools.ops",
                                     description="Operator tools (see docs/operators.md).")
    sub = parser.add_subparsers(dest="tool", required=True, metavar="TOOL")
    handlers: dict[str, Handler] = {}

    def tool(name: str, handler: Handler, help_text: str, codes: str) -> argparse.ArgumentParser:
        handlers[name] = handler
        return sub.add_parser(name, prog=f"tools/{name}", help=help_text,
                              description=help_text, epilog=f"exit codes: {codes}")

    p = tool("ensure-server", ensure_server, "Start the Temporal dev server at TEMPORAL_ADDRESS "
             "unless something already listens there.",
             "0 running, 1 failed to start, 2 usage, 5 not healthy in time")
    p.add_argument("--ui-port", type=int, help="Web UI port (default: gRPC port + 1000)")
    p.add_argument("--db-filename", type=Path, help="persist state in this SQLite file")
    p.add_argument("--timeout", type=float, default=60.0)
    p = tool("ensure-worker", ensure_worker, "Stop this project's worker (if these tools "
             "started one) and start a fresh one; wait until it is ready.",
             "0 ready, 1 died during startup, 2 usage, 5 not ready in time")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for ready")
    p.add_argument("--stop-timeout", type=float, default=45.0,
                   help="seconds the old worker gets to shut down before SIGKILL")
    p = tool("kill-worker", kill_worker, "Stop this project's worker (only if these tools "
             "started it; found by PID file).", "0 stopped or nothing to stop, 1 could not stop")
    p.add_argument("--timeout", type=float, default=45.0)
    p = tool("kill-all-workers", kill_all_workers, "Stop every worker these tools started "
             "(all projects); with --include-server also the dev server.",
             "0 done, 1 could not stop one")
    p.add_argument("--include-server", action="store_true")
    p.add_argument("--timeout", type=float, default=45.0)
    tool("list-workers", list_workers, "List the workers these tools started.",
         "0 at least one running, 1 none running")
    p = tool("monitor-worker-health", monitor_worker_health, "Check this project's worker: "
             "process, log errors, and pollers on the task queue.",
             "0 healthy, 1 unhealthy, 2 usage, 4 cannot connect")
    p.add_argument("--task-queue", help="default: TASK_QUEUE or helm-build")
    p = tool("list-recent-workflows", list_recent_workflows, "Workflows started recently.",
             "0 listed, 2 usage, 4 cannot connect")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--limit", type=int, default=200)
    p = tool("find-stalled-workflows", find_stalled_workflows, "Running workflows that make "
             "no progress: failing workflow tasks or activities retrying again and again "
             "(the stage-7 block poll is not counted).",
             "0 none stalled, 1 stalled found, 2 usage, 4 cannot connect")
    p.add_argument("--query", help="extra visibility query, e.g. "
                   "\"WorkflowType = 'BuildPipelineWorkflow'\"")
    p.add_argument("--limit", type=int, default=500)
    p = tool("wait-for-workflow-status", wait_for_workflow_status, "Block until a workflow "
             "reaches a status.", "0 reached, 1 closed with another status, 2 usage, "
             "3 not found, 4 cannot connect, 5 timed out")
    _add_workflow_id(p)
    p.add_argument("--status", required=True, help=", ".join(STATUSES))
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--interval", type=float, default=0.5)
    p = tool("get-workflow-result", get_workflow_result, "Print a workflow's result; a "
             "COMPLETED result that reports a failure (outcome not success) exits 1.",
             "0 completed with a good result, 1 not completed or result reports a problem, "
             "3 not found, 4 cannot connect")
    _add_workflow_id(p)
    p.add_argument("--raw", action="store_true", help="only the result JSON as stored")
    p = tool("analyze-workflow-error", analyze_workflow_error, "Explain what went wrong in a "
             "workflow's history and what to do about it.",
             "0 no error found, 1 errors found (explained), 3 not found, 4 cannot connect")
    _add_workflow_id(p)
    p = tool("bulk-cancel-workflows", bulk_cancel_workflows, "Cancel (or terminate) every "
             "running workflow whose id matches a shell-style pattern.",
             "0 done (or nothing matched), 1 some could not be cancelled, 2 usage, "
             "4 cannot connect")
    p.add_argument("--pattern", required=True, help="e.g. 'build-demo-*'; '*' means all")
    p.add_argument("--query", help="extra visibility query")
    p.add_argument("--terminate", action="store_true",
                   help="terminate instead of cancel (needed for stalled workflows)")
    p.add_argument("--reason", default="bulk-cancel-workflows")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--limit", type=int, default=1000)
    return parser, handlers


def run_tool(name: str, call: Callable[[], int]) -> int:
    """Run one tool body: ToolError becomes one stderr line and its exit code."""
    try:
        return call()
    except ToolError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return EXIT_ATTENTION


def exit_process(code: int) -> NoReturn:
    """Exit without interpreter finalization. Temporal's native runtime can still own a
    thread (a connect attempt given up on while the server was starting) that aborts a
    finalizing interpreter with SIGABRT, turning a clean exit code into -6."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return EXIT_USAGE if exit_request.code not in (0, None) else EXIT_OK
    settings = OpsSettings.from_env()
    handler = handlers[args.tool]

    def call() -> int:
        outcome = handler(settings, args)
        return asyncio.run(outcome) if asyncio.iscoroutine(outcome) else outcome  # type: ignore[arg-type]

    return run_tool(args.tool, call)


if __name__ == "__main__":
    exit_process(main())
