"""`tools/ops COMMAND [options]`: the one operator entry point (docs/operators.md).

Every other executable in tools/ is a link to the shim tools/ops and runs the command of
its own name (`tools/list-workers` is `tools/ops list-workers`). What the `temporal` CLI
does is done by running it with the worker's connection settings (common.cli_env), and
`tools/temporal ...` runs any `temporal` command that way; the Python here is what this
project adds: worker lifecycle by PID file, which workers serve, stall and error
analysis, waiting, starting and deciding builds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from tools import start_build
from tools.common import (
    EXIT_ATTENTION,
    EXIT_CODES_HELP,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    OpsSettings,
    ProcessRecord,
    ToolError,
    cli_env,
    cli_json,
    connect_client,
    exit_process,
    proc_start_ticks,
    records,
    result_problem,
    run_tool,
    spawn,
    stop,
    temporal_binary,
    uptime,
    wait_ready,
    worker_config,
)
from vocabulary import BLOCKS_PENDING, INVALID_INPUT, PHASE_FAILED, TRIAGE_INVALID

# Activity failures that are the stage-7 poll loop working as designed, not a problem.
BENIGN_FAILURE_TYPES = frozenset({BLOCKS_PENDING})
MAX_STATUS_FILE_BYTES = 4096
UPDATES = {"approve-build": "approve_blocks", "reject-build": "reject_blocks"}


# ---- lifecycle: processes these tools start ------------------------------------------------


def ensure_server(settings: OpsSettings, args: argparse.Namespace) -> int:
    from tools import devserver

    host, _, port_text = settings.address.rpartition(":")
    if not host or not port_text.isdigit():
        raise ToolError(f"TEMPORAL_ADDRESS {settings.address!r} must be host:port", EXIT_USAGE)
    host, port = ("127.0.0.1" if host == "localhost" else host), int(port_text)
    path = settings.pid_file("server")
    mine = ProcessRecord.read(path)
    if devserver.is_listening(host, port):
        owner = (f"started by these tools, pid {mine.pid}" if mine and mine.alive()
                 else "not started by these tools")
        print(f"ensure-server: Temporal already listening on {host}:{port} ({owner})")
        return EXIT_OK
    ui_port = args.ui_port if args.ui_port is not None else port + 1000
    namespace = worker_config().temporal_namespace
    command = devserver.command(port, ui_port=ui_port, db_filename=args.db_filename, host=host,
                                namespaces=tuple({namespace} - {"default"}), log_level="warn")
    record = spawn(settings, "server", [temporal_binary(), *command[1:]], cwd=settings.project_dir)
    problem = devserver.wait_healthy(host, port, record.alive, args.timeout)
    if problem:
        if not record.alive():
            path.unlink(missing_ok=True)
        raise ToolError(f"dev server {problem}; see {record.log}",
                        EXIT_TIMEOUT if record.alive() else EXIT_ATTENTION)
    print(f"ensure-server: started Temporal dev server pid {record.pid} on {host}:{port}, "
          f"Web UI http://{host}:{ui_port}, log {record.log}")
    return EXIT_OK


def ensure_worker(settings: OpsSettings, args: argparse.Namespace) -> int:
    path, log = settings.pid_file("worker"), settings.log_file("worker")
    old = ProcessRecord.read(path)
    if old is not None:
        print(f"ensure-worker: {stop(old, path, args.stop_timeout)}")
    offset = log.stat().st_size if log.exists() else 0
    record = spawn(settings, "worker", settings.worker_cmd, cwd=settings.project_dir)
    try:
        wait_ready(record, offset, args.timeout)
    except ToolError:
        if not record.alive():
            path.unlink(missing_ok=True)
        raise
    print(f"ensure-worker: worker pid {record.pid} ready (project {settings.project_name}, "
          f"log {log})")
    return EXIT_OK


def kill_worker(settings: OpsSettings, args: argparse.Namespace) -> int:
    path = settings.pid_file("worker")
    record = ProcessRecord.read(path)
    print(f"kill-worker: {stop(record, path, args.timeout)}" if record else
          f"kill-worker: no worker started by these tools for project {settings.project_name}")
    return EXIT_OK


def kill_all_workers(settings: OpsSettings, args: argparse.Namespace) -> int:
    roles = ["worker", "server"] if args.include_server else ["worker"]
    found = [entry for role in roles for entry in records(settings, role)]
    if not found:
        print("kill-all-workers: nothing started by these tools is running")
    for path, record in found:
        print(f"kill-all-workers: {stop(record, path, args.timeout)}")
    return EXIT_OK


# ---- which workers serve: PID files, WORKER_STATUS_FILE, pollers ---------------------------


def local_pid(identity: str) -> int | None:
    """The pid in a poller identity of this host: `host:pid` (worker.py), `pid@host` (SDK)."""
    host, _, pid = identity.rpartition(":")
    if not pid.isdigit():
        pid, _, host = identity.partition("@")
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


def pollers(queue: str) -> dict[str, list[str]]:
    """identity -> the task queue types it polls (`temporal task-queue describe`). The
    server remembers pollers for minutes: a local one whose process is gone is dropped."""
    found: dict[str, list[str]] = {}
    for poller in (cli_json(cli_env(), "task-queue", "describe", "--task-queue", queue)
                   or {}).get("pollers") or []:
        identity = str(poller.get("identity", ""))
        pid = local_pid(identity)
        if pid is None or proc_start_ticks(pid) is not None:
            found.setdefault(identity, []).append(str(poller.get("taskQueueType", "?")))
    return found


def worker_status(path: Path | None) -> dict[str, Any] | None:
    """WORKER_STATUS_FILE as worker.py writes it ({state, pid, task_queue, since}),
    read without blocking (a FIFO) and bounded; `alive` added from /proc."""
    if path is None:
        return None
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            status = json.loads(handle.read(MAX_STATUS_FILE_BYTES))
    except (OSError, ValueError):
        status = None
    if not isinstance(status, dict):
        return {"state": "unreadable", "pid": None, "alive": False}
    pid = status.get("pid")
    status["alive"] = isinstance(pid, int) and pid > 0 and proc_start_ticks(pid) is not None
    return status


def rss(pid: int) -> str:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def list_workers(settings: OpsSettings, args: argparse.Namespace) -> int:
    config = worker_config()
    queue = args.task_queue or config.task_queue
    rows, serving = [], False
    for _, record in records(settings, "worker"):
        alive = record.alive()
        serving |= alive
        rows.append(("pid file", record.pid, "running" if alive else "stale",
                     uptime(record.started_at) if alive else "-",
                     f"project {record.project}, log {record.log}"))
    status = worker_status(config.status_file)
    if status is not None:
        state = str(status.get("state"))
        serving |= status["alive"] and state == "ready"
        rows.append(("status file", status.get("pid"), state if status["alive"] else
                     f"{state}, gone", uptime(status.get("since")) if status["alive"] else "-",
                     f"queue {status.get('task_queue')}, {config.status_file}"))
    try:
        polling = pollers(queue)
    except ToolError as err:
        polling = {}
        print(f"(pollers unknown: {err})")
    serving |= bool(polling)
    for identity, kinds in polling.items():
        rows.append(("poller", local_pid(identity) or "-", "polling", "-",
                     f"{identity} on {queue!r} ({', '.join(kinds)})"))
    print(f"{'SOURCE':<12} {'PID':>8} {'STATE':<14} {'UPTIME':>10}  DETAIL")
    for row in rows:
        print("{:<12} {:>8} {:<14} {:>10}  {}".format(*row))
    if not rows:
        print(f"(no worker: no PID file, no WORKER_STATUS_FILE, no poller on {queue!r})")
    return EXIT_OK if serving else EXIT_ATTENTION


def monitor_worker_health(settings: OpsSettings, args: argparse.Namespace) -> int:
    config = worker_config()
    queue = args.task_queue or config.task_queue
    problems: list[str] = []
    path = settings.pid_file("worker")
    record = ProcessRecord.read(path)
    if record is not None and record.alive():
        print(f"process: pid {record.pid} (started by these tools) running for "
              f"{uptime(record.started_at)}, RSS {rss(record.pid)}")
    elif record is not None:
        print(f"process: pid {record.pid} is NOT running (stale PID file {path})")
        problems.append("the worker these tools started is not running")
    status = worker_status(config.status_file)
    if status is not None:
        state, pid = status.get("state"), status.get("pid")
        print(f"status file {config.status_file}: state {state}, pid {pid} "
              f"({'running' if status['alive'] else 'not running'}), queue "
              f"{status.get('task_queue')}, since {status.get('since')}")
        if state != "ready" or not status["alive"]:
            problems.append(f"WORKER_STATUS_FILE says {state!r}" +
                            ("" if status["alive"] else f" and pid {pid} is not running"))
    if record is None and status is None:
        print("process: no PID file of these tools and no WORKER_STATUS_FILE; judged by "
              "the pollers")
    if record is not None:
        log = Path(record.log)
        tail = log.read_text(errors="replace").splitlines()[-500:] if log.exists() else []
        errors = [line for line in tail if '"level": "ERROR"' in line or "Traceback" in line]
        print(f"log: {log} ({len(errors)} error line(s) in the last {len(tail)} lines)")
        if errors:
            print(f"  last error: {errors[-1][:300]}")
    polling = pollers(queue)
    print(f"task queue {queue!r}: {len(polling)} poller(s)")
    for identity, kinds in polling.items():
        pid = local_pid(identity)
        print(f"  {identity} ({', '.join(kinds)})" + (f", RSS {rss(pid)}" if pid else ""))
    if not polling:
        problems.append(f"no worker polls task queue {queue!r}")
    elif record is not None and record.alive() and record.pid not in map(local_pid, polling):
        problems.append(f"worker pid {record.pid} is running but not polling {queue!r}")
    for problem in problems:
        print(f"UNHEALTHY: {problem}")
    if not problems:
        print("HEALTHY")
    return EXIT_ATTENTION if problems else EXIT_OK


# ---- workflows: through the `temporal` CLI ---------------------------------------------------


def temporal_passthrough(argv: list[str]) -> NoReturn:
    """exec `temporal ARGV` with the worker's address, namespace and credentials."""
    binary, env = temporal_binary(), cli_env()
    try:
        os.execve(binary, [binary, *argv], env)  # noqa: S606 (argv as given, no shell)
    except OSError as err:
        raise ToolError(f"cannot run {binary}: {err.strerror}", EXIT_USAGE) from None


def list_recent_workflows(settings: OpsSettings, args: argparse.Namespace) -> int:
    since = datetime.now(UTC) - timedelta(minutes=args.minutes)
    query = f'StartTime > "{since.isoformat(timespec="seconds").replace("+00:00", "Z")}"'
    found = cli_json(cli_env(), "workflow", "list", "--query", query, "--limit",
                     str(args.limit)) or []
    print(f"{'WORKFLOW ID':<48} {'TYPE':<22} {'STATUS':<11} {'STARTED (UTC)':<20} CLOSED")
    for wf in found:
        status = wf["status"].removeprefix("WORKFLOW_EXECUTION_STATUS_")
        print(f"{wf['execution']['workflowId']:<48} {wf['type']['name']:<22} {status:<11} "
              f"{wf['startTime'][:19].replace('T', ' ')}  "
              f"{(wf.get('closeTime') or '-')[:19].replace('T', ' ')}")
    print(f"({len(found)} workflow(s) started in the last {args.minutes:g} minute(s))")
    return EXIT_OK


def id_clause(pattern: str) -> str:
    """A visibility clause for an id glob: `*`, an exact id, or a prefix ending in `*`."""
    stem = pattern.removesuffix("*")
    if any(char in stem for char in '*?["\\'):
        raise ToolError(f"--pattern {pattern!r}: only an exact id, a prefix ending in '*', "
                        f"or '*' (use --query for more)", EXIT_USAGE)
    return ("" if not stem else f'WorkflowId STARTS_WITH "{stem}"' if pattern.endswith("*")
            else f'WorkflowId = "{stem}"')


def bulk_cancel_workflows(settings: OpsSettings, args: argparse.Namespace) -> int:
    env = cli_env()
    query = " AND ".join(f"({part})" for part in ('ExecutionStatus = "Running"',
                                                  id_clause(args.pattern), args.query) if part)
    verb = "terminate" if args.terminate else "cancel"
    matched = cli_json(env, "workflow", "list", "--query", query, "--limit",
                       str(args.limit)) or []
    for wf in matched:
        print(f"{'would ' if args.dry_run else ''}{verb} {wf['execution']['workflowId']} "
              f"({wf['type']['name']})")
    if not matched:
        print(f"no running workflow matches {query}")
    if not matched or args.dry_run:
        return EXIT_OK
    job = cli_json(env, "workflow", verb, "--query", query, "--reason", args.reason,
                   "--yes")["batchJobId"]
    deadline = time.monotonic() + args.timeout
    while (batch := cli_json(env, "batch", "describe", "--job-id", job))["state"].endswith(
            "RUNNING") and time.monotonic() < deadline:
        time.sleep(0.3)
    state = batch["state"].removeprefix("BATCH_OPERATION_STATE_")
    print(f"batch {job}: {state}, {batch.get('completeOperationCount', 0)} of "
          f"{batch.get('totalOperationCount', '?')} done, "
          f"{batch.get('failureOperationCount', 0)} failed")
    if verb == "cancel":
        print("note: a cancel request is handled by the workflow code; a stalled workflow "
              "(failing workflow task) only stops with --terminate")
    if state == "RUNNING":
        raise ToolError(f"batch {job} still running after {args.timeout:g}s", EXIT_TIMEOUT)
    return EXIT_OK if state == "COMPLETED" and not batch.get("failureOperationCount") \
        else EXIT_ATTENTION


def get_workflow_result(settings: OpsSettings, args: argparse.Namespace) -> int:
    wid = args.workflow_id
    run = ["--run-id", args.run_id] if args.run_id else []
    described = cli_json(cli_env(), "workflow", "describe", "--workflow-id", wid, *run)
    info = described["workflowExecutionInfo"]
    status = info["status"].removeprefix("WORKFLOW_EXECUTION_STATUS_")
    if status == "RUNNING":
        raise ToolError(f"{wid} is still RUNNING; no result yet (tools/wait-for-workflow-status"
                        f" --workflow-id {wid} --status COMPLETED)")
    if status != "COMPLETED":
        close = described.get("closeEvent") or {}
        attrs = next((v for k, v in close.items() if k.endswith("Attributes")), {})
        failure = attrs.get("failure") or {}
        kind = (failure.get("applicationFailureInfo") or {}).get("type")
        reason = f"{kind}: {failure.get('message')}" if kind else failure.get(
            "message") or attrs.get("reason")
        raise ToolError(f"{wid} is {status}, no result" + (f": {reason}" if reason else "") +
                        f" (tools/analyze-workflow-error --workflow-id {wid})")
    result = described.get("result")
    if not args.raw:
        print(f"{wid} ({info['type']['name']}) COMPLETED at {info.get('closeTime')}")
    print(json.dumps(result, indent=None if args.raw else 2))
    problem = result_problem(result)
    if problem:
        raise ToolError(f"workflow COMPLETED but its result reports a problem: {problem}")
    return EXIT_OK


# ---- workflows: what this project adds (SDK client) -------------------------------------------


async def describe(client: Any, workflow_id: str, run_id: str | None = None,
                   history: bool = False) -> tuple[Any, list[Any]]:
    """(description, history events if asked); a missing workflow is EXIT_NOT_FOUND."""
    from temporalio.service import RPCError, RPCStatusCode

    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    try:
        return await handle.describe(), ([event async for event in
                                          handle.fetch_history_events()] if history else [])
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise ToolError(f"workflow {workflow_id!r} not found", EXIT_NOT_FOUND) from None
        raise


def failure_text(failure: Any) -> str:
    """`Type: message` of a Failure proto, following its cause chain."""
    parts = []
    while failure is not None and failure.message:
        kind = failure_type(failure, follow=False)
        parts.append(f"{kind}: {failure.message}" if kind else failure.message)
        failure = failure.cause if failure.HasField("cause") else None
    return " <- ".join(parts) or "(no message)"


def failure_type(failure: Any, follow: bool = True) -> str:
    """The ApplicationError type of a Failure proto (of its first cause that has one)."""
    while failure is not None:
        if failure.HasField("application_failure_info") and failure.application_failure_info.type:
            return failure.application_failure_info.type
        failure = failure.cause if follow and failure.HasField("cause") else None
    return ""


def first_line(failure: Any) -> str:
    return failure_text(failure).splitlines()[0][:200] if failure is not None else "no failure"


def pending_failures(raw: Any) -> list[tuple[Any, Any]]:
    """(pending activity, its last failure) for activities that are not the benign stage-7
    poll and have failed before."""
    return [(pending, pending.last_failure) for pending in raw.pending_activities
            if pending.HasField("last_failure") and pending.attempt > 1
            and failure_type(pending.last_failure) not in BENIGN_FAILURE_TYPES]


async def stall_of(client: Any, workflow_id: str, run_id: str) -> str | None:
    """Why a running workflow makes no progress, or None if it is healthy."""
    description, events = await describe(client, workflow_id, run_id, history=True)
    raw = description.raw_description
    attempt = raw.pending_workflow_task.attempt if raw.HasField("pending_workflow_task") else 0
    last_task = [event for event in events if event.HasField(
        "workflow_task_completed_event_attributes") or event.HasField(
        "workflow_task_failed_event_attributes") or event.HasField(
        "workflow_task_timed_out_event_attributes")][-1:]
    if last_task and last_task[0].HasField("workflow_task_failed_event_attributes"):
        failure = last_task[0].workflow_task_failed_event_attributes.failure
        return f"WorkflowTaskFailed (attempt {max(attempt, 1)}): {first_line(failure)}"
    if attempt > 2:
        return f"workflow task retrying (attempt {attempt})"
    for pending, failure in pending_failures(raw):
        if pending.attempt > 2:
            return (f"ActivityTaskFailed x{pending.attempt - 1} "
                    f"({pending.activity_type.name}): {first_line(failure)}")
    return None


async def find_stalled_workflows(settings: OpsSettings, args: argparse.Namespace) -> int:
    client = await connect_client()
    query = 'ExecutionStatus = "Running"' + (f" AND ({args.query})" if args.query else "")
    checked = 0
    stalls = []
    async for wf in client.list_workflows(query, limit=args.limit):
        checked += 1
        reason = await stall_of(client, wf.id, wf.run_id)
        if reason is not None:
            stalls.append(wf.id)
            print(f"STALLED {wf.id} ({wf.workflow_type}): {reason}")
            print(f"  next: tools/analyze-workflow-error --workflow-id {wf.id}")
    print(f"({len(stalls)} stalled of {checked} running workflow(s) checked)")
    return EXIT_ATTENTION if stalls else EXIT_OK


ADVICE = {
    "nondeterminism": "history mismatch: terminate this workflow, fix the code, "
                      "tools/ensure-worker, then start a NEW workflow",
    "workflow_task": "bug in workflow code (or a missing registration): fix it and run "
                     "tools/ensure-worker; no need to terminate, the workflow resumes by itself",
    "activity_retrying": "the activity keeps failing and retrying: fix the activity (or what "
                         "it reads), tools/ensure-worker; it retries with the new code",
    "activity_failed": "an activity failed for good: fix the cause, then start a NEW workflow",
    PHASE_FAILED: "an agent reported failure (or a stage failed): read the task file and the "
                  "summary, then start a NEW build",
    TRIAGE_INVALID: "the security agent's triage-output.yml is unusable: fix the file (the "
                    "error names the problem), then start a NEW build",
    INVALID_INPUT: "the workflow input was refused: fix the input and start again",
    "workflow_failed": "fix the cause, tools/ensure-worker, then start a NEW workflow",
    "timed_out": "raise the timeout (policies.py) if the work legitimately takes longer, "
                 "then start a NEW workflow",
    "terminated": "terminated by an operator or tool; start a NEW workflow if still needed",
    "canceled": "cancelled on request; start a NEW workflow if still needed",
}


def finding(event: Any, scheduled: dict[int, str]) -> tuple[str, str, str] | None:
    """(what, detail, what to do) for one history event that records a problem."""
    from temporalio.api.enums.v1 import WorkflowTaskFailedCause

    if event.HasField("workflow_task_failed_event_attributes"):
        attrs = event.workflow_task_failed_event_attributes
        cause = WorkflowTaskFailedCause.Name(attrs.cause).removeprefix(
            "WORKFLOW_TASK_FAILED_CAUSE_")
        message = failure_text(attrs.failure)
        tail = [line for line in attrs.failure.stack_trace.strip().splitlines() if line][-3:]
        nondeterministic = "NON_DETERMINISTIC" in cause or any(word in message.lower() for word
                                                               in ("nondetermin", "non-determin",
                                                                   "history mismatch"))
        return ("WorkflowTaskFailed (workflow stalled)",
                "\n      ".join([f"{message} [cause {cause}]", *tail]),
                ADVICE["nondeterminism" if nondeterministic else "workflow_task"])
    for field, what, default in (
            ("activity_task_failed_event_attributes", "ActivityTaskFailed", "activity_failed"),
            ("activity_task_timed_out_event_attributes", "ActivityTaskTimedOut", "timed_out")):
        if event.HasField(field):
            attrs = getattr(event, field)
            name = scheduled.get(attrs.scheduled_event_id, "activity")
            advice = ADVICE["timed_out"] if default == "timed_out" else ADVICE.get(
                failure_type(attrs.failure), ADVICE[default])
            return f"{what} ({name})", failure_text(attrs.failure), advice
    if event.HasField("workflow_execution_failed_event_attributes"):
        failure = event.workflow_execution_failed_event_attributes.failure
        return ("WorkflowExecutionFailed", failure_text(failure),
                ADVICE.get(failure_type(failure), ADVICE["workflow_failed"]))
    if event.HasField("workflow_execution_timed_out_event_attributes"):
        return "WorkflowExecutionTimedOut", "execution timeout reached", ADVICE["timed_out"]
    if event.HasField("workflow_execution_terminated_event_attributes"):
        attrs = event.workflow_execution_terminated_event_attributes
        return ("WorkflowExecutionTerminated",
                f"{attrs.reason or 'no reason'} (by {attrs.identity or '?'})", ADVICE["terminated"])
    if event.HasField("workflow_execution_canceled_event_attributes"):
        return "WorkflowExecutionCanceled", "cancel request honoured", ADVICE["canceled"]
    return None


async def analyze_workflow_error(settings: OpsSettings, args: argparse.Namespace) -> int:
    client = await connect_client()
    description, events = await describe(client, args.workflow_id, args.run_id, history=True)
    scheduled = {event.event_id: event.activity_task_scheduled_event_attributes.activity_type.name
                 for event in events if event.HasField("activity_task_scheduled_event_attributes")}
    findings = [found for event in events if (found := finding(event, scheduled))]
    raw = description.raw_description
    findings += [(f"Activity retrying ({pending.activity_type.name}, attempt {pending.attempt})",
                  failure_text(failure), ADVICE["activity_retrying"])
                 for pending, failure in pending_failures(raw)]
    status = description.status.name if description.status else "UNKNOWN"
    print(f"{args.workflow_id} ({description.workflow_type}) status {status}, "
          f"{len(events)} history events")
    for pending in raw.pending_activities:
        if failure_type(pending.last_failure) in BENIGN_FAILURE_TYPES:
            print(f"note: {pending.activity_type.name} is polling (attempt {pending.attempt}): "
                  f"{failure_text(pending.last_failure)} — normal while blocks await a "
                  f"decision; tools/approve-build or tools/reject-build decides")
    if raw.HasField("pending_workflow_task") and raw.pending_workflow_task.attempt > 1:
        print(f"note: workflow task attempt {raw.pending_workflow_task.attempt}: the worker "
              f"keeps failing it (see the worker log {settings.log_file('worker')})")
    if not findings:
        print("no errors found in the history")
        return EXIT_OK
    for number, (kind, text, advice) in enumerate(findings, 1):
        print(f"{number}. {kind}: {text}\n   what to do: {advice}")
    return EXIT_ATTENTION


async def wait_for_workflow_status(settings: OpsSettings, args: argparse.Namespace) -> int:
    from temporalio.client import WorkflowExecutionStatus

    statuses = [status.name for status in WorkflowExecutionStatus]
    wanted = args.status.upper().replace("CANCELLED", "CANCELED")
    if wanted not in statuses:
        raise ToolError(f"unknown status {args.status!r}; one of {', '.join(statuses)}",
                        EXIT_USAGE)
    client = await connect_client()
    deadline = time.monotonic() + args.timeout
    while True:
        status = (await describe(client, args.workflow_id, args.run_id))[0].status
        current = status.name if status else "UNKNOWN"
        if current == wanted:
            print(f"wait-for-workflow-status: {args.workflow_id} is {current}")
            return EXIT_OK
        if current != "RUNNING":
            raise ToolError(f"{args.workflow_id} closed as {current}; it will never be {wanted}")
        if time.monotonic() > deadline:
            raise ToolError(f"{args.workflow_id} still {current} after {args.timeout:g}s "
                            f"(wanted {wanted})", EXIT_TIMEOUT)
        await asyncio.sleep(args.interval)


async def decide(client: Any, command: str, workflow_id: str, note: str, by: str) -> str:
    """Send approve_blocks / reject_blocks; return the workflow's answer."""
    from temporalio.client import WorkflowUpdateFailedError
    from temporalio.service import RPCError, RPCStatusCode

    from models import BlockDecision

    try:
        decision = BlockDecision(note=note, decided_by=by)
    except ValueError as err:
        raise ToolError(f"invalid decision: {str(err).splitlines()[0]}", EXIT_USAGE) from None
    try:
        return await client.get_workflow_handle(workflow_id).execute_update(
            UPDATES[command], decision, result_type=str, rpc_timeout=timedelta(seconds=30))
    except WorkflowUpdateFailedError as err:
        reason = getattr(err.cause, "message", None) or str(err.cause)
        raise ToolError(f"refused by {workflow_id}: {reason}") from None
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise ToolError(f"workflow {workflow_id!r} not found or already closed",
                            EXIT_NOT_FOUND) from None
        raise ToolError(f"Temporal error: {err.message.splitlines()[0][:200]}") from None


async def decide_build(settings: OpsSettings, args: argparse.Namespace) -> int:
    by = args.by or getpass.getuser()
    answer = await decide(await connect_client(), args.command, args.workflow_id,
                          args.note if args.command == "approve-build" else args.reason, by)
    print(f"{args.command}: {args.workflow_id} {answer} by {by}")
    return EXIT_OK


# ---- command line ---------------------------------------------------------------------------

Handler = Callable[[OpsSettings, argparse.Namespace], int | Awaitable[int]]
WORKFLOW_ID = (("--workflow-id",), {"required": True})
RUN_ID = (("--run-id",), {"help": "a specific run (default: the latest)"})
QUEUE = (("--task-queue",), {"help": "default: TASK_QUEUE or the worker's default"})


def timeout(default: float, what: str = "seconds to wait") -> tuple[tuple[str], dict[str, Any]]:
    return ("--timeout",), {"type": float, "default": default, "help": what}


COMMANDS: list[tuple[str, Handler, str, list[tuple[tuple[str, ...], dict[str, Any]]]]] = [
    ("ensure-server", ensure_server, "Start the Temporal dev server at TEMPORAL_ADDRESS "
     "unless something already listens there.", [
         (("--ui-port",), {"type": int, "help": "Web UI port (default: gRPC port + 1000)"}),
         (("--db-filename",), {"type": Path, "help": "persist state in this SQLite file"}),
         timeout(60.0)]),
    ("ensure-worker", ensure_worker, "Stop this project's worker (if these tools started "
     "one) and start a fresh one; wait until it is ready.", [
         timeout(60.0, "seconds to wait for ready"),
         (("--stop-timeout",), {"type": float, "default": 45.0,
                                "help": "seconds the old worker gets before SIGKILL"})]),
    ("kill-worker", kill_worker, "Stop this project's worker, only if these tools started "
     "it (found by PID file).", [timeout(45.0, "seconds before SIGKILL")]),
    ("kill-all-workers", kill_all_workers, "Stop every worker these tools started (all "
     "projects); with --include-server also the dev server.", [
         (("--include-server",), {"action": "store_true"}), timeout(45.0)]),
    ("list-workers", list_workers, "Workers on this host and the queue: PID files of these "
     "tools, WORKER_STATUS_FILE, pollers (temporal task-queue describe). 1: none serves.",
     [QUEUE]),
    ("monitor-worker-health", monitor_worker_health, "Check the worker serving the queue, "
     "whoever started it: process, WORKER_STATUS_FILE, log errors, pollers.", [QUEUE]),
    ("list-recent-workflows", list_recent_workflows, "Workflows started recently "
     "(temporal workflow list --query).", [
         (("--minutes",), {"type": float, "default": 5.0}),
         (("--limit",), {"type": int, "default": 200})]),
    ("find-stalled-workflows", find_stalled_workflows, "Running workflows that make no "
     "progress: failing workflow tasks or activities retrying again and again (the stage-7 "
     "block poll is not counted).", [
         (("--query",), {"help": "extra visibility query, e.g. \"WorkflowType = "
                                 "'BuildPipelineWorkflow'\""}),
         (("--limit",), {"type": int, "default": 500})]),
    ("wait-for-workflow-status", wait_for_workflow_status, "Block until a workflow reaches "
     "a status; 1 if it closed with another.", [
         WORKFLOW_ID, RUN_ID, (("--status",), {"required": True, "help": "e.g. COMPLETED"}),
         timeout(60.0), (("--interval",), {"type": float, "default": 0.5})]),
    ("get-workflow-result", get_workflow_result, "Print a workflow's result (temporal "
     "workflow describe); a COMPLETED result whose outcome is not success exits 1.", [
         WORKFLOW_ID, RUN_ID, (("--raw",), {"action": "store_true",
                                            "help": "only the result JSON"})]),
    ("analyze-workflow-error", analyze_workflow_error, "Explain what went wrong in a "
     "workflow's history and what to do about it.", [WORKFLOW_ID, RUN_ID]),
    ("bulk-cancel-workflows", bulk_cancel_workflows, "Cancel (or terminate) the running "
     "workflows an id pattern and/or a query select (temporal workflow cancel|terminate "
     "--query, a batch job); waits for the batch.", [
         (("--pattern",), {"default": "*", "help": "'*' (all), an id, or 'prefix*'"}),
         (("--query",), {"help": "extra visibility query"}),
         (("--terminate",), {"action": "store_true",
                             "help": "terminate instead of cancel (needed when stalled)"}),
         (("--reason",), {"default": "bulk-cancel-workflows"}),
         (("--dry-run",), {"action": "store_true"}),
         (("--limit",), {"type": int, "default": 1000, "help": "most listed"}),
         timeout(60.0, "seconds to wait for the batch")]),
    ("start-build", start_build.command, "Start a BuildPipelineWorkflow or a "
     "BuildPlanWorkflow; prints its id first. 3: the id is already running.",
     start_build.OPTIONS),
    ("approve-build", decide_build, "Approve the security blocks of a pipeline parked at "
     "stage 7 (approve_blocks Update); 1: refused, 3: not found or closed.", [
         WORKFLOW_ID, (("--note",), {"default": "", "help": "why (in the task history)"}),
         (("--by",), {"help": "who decides (default: your user name)"})]),
    ("reject-build", decide_build, "Reject the security blocks of a pipeline parked at "
     "stage 7 (reject_blocks Update); 1: refused, 3: not found or closed.", [
         WORKFLOW_ID, (("--reason",), {"required": True, "help": "why (in the task history)"}),
         (("--by",), {"help": "who decides (default: your user name)"})]),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/ops", epilog=EXIT_CODES_HELP,
        description="Operator commands (docs/operators.md). `tools/temporal ARGS` (or "
                    "`tools/ops temporal ARGS`) runs the temporal CLI with the worker's "
                    "address, namespace and credentials; it exits with temporal's code.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, handler, text, options in COMMANDS:
        command = sub.add_parser(name, prog=f"tools/{name}", help=text, description=text,
                                 epilog=EXIT_CODES_HELP)
        command.set_defaults(handler=handler)
        for flags, kwargs in options:
            command.add_argument(*flags, **kwargs)
    sub.add_parser("temporal", help="run any temporal CLI command as the worker connects")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["temporal"]:
        return run_tool("temporal", lambda: temporal_passthrough(argv[1:]))
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:
        return EXIT_USAGE if exit_request.code not in (0, None) else EXIT_OK

    def call() -> int:
        outcome = args.handler(OpsSettings.from_env(), args)
        return asyncio.run(outcome) if asyncio.iscoroutine(outcome) else outcome

    return run_tool(args.command, call)


if __name__ == "__main__":
    exit_process(main())
