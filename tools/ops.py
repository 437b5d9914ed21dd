"""`tools/ops COMMAND [options]`, the one operator entry point; the other names in tools/
are links to it (docs/operators.md). What the `temporal` CLI does is done by running it with
the worker's connection (common.cli_env); the Python here is what this project adds."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from exceptions import (
    BlocksPendingError,
    InvalidInputError,
    PhaseFailedError,
    ToolError,
    TriageInvalidError,
)
from taskfiles.visible_text import escaped
from tools import start_build, time_report
from tools.common import (
    EXIT_ATTENTION,
    EXIT_CODES_HELP,
    EXIT_CONNECT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    OpsSettings,
    ProcessRecord,
    cli_env,
    cli_json,
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
from vocabulary import APPROVE_BLOCKS_UPDATE, REJECT_BLOCKS_UPDATE, REQUEST_CHANGES_UPDATE

MAX_STATUS_FILE_BYTES = 4096
UPDATES = {"approve-build": APPROVE_BLOCKS_UPDATE, "reject-build": REJECT_BLOCKS_UPDATE,
           "request-changes": REQUEST_CHANGES_UPDATE}


def ensure_server(settings: OpsSettings, args: argparse.Namespace) -> int:
    from tools import devserver

    config = worker_config(settings.env)
    try:
        host, port = devserver.split_address(config.temporal_address)
    except ValueError as err:
        raise ToolError(f"TEMPORAL_ADDRESS {err}", EXIT_USAGE) from None
    path = settings.pid_file("server")
    mine = ProcessRecord.read(path)
    if devserver.is_listening(host, port):
        owner = (f"started by these tools, pid {mine.pid}" if mine and mine.alive()
                 else "not started by these tools")
        print(f"ensure-server: Temporal already listening on {host}:{port} ({owner})")
        return EXIT_OK
    ui_port = args.ui_port if args.ui_port is not None else port + 1000
    command = devserver.command(port, ui_port=ui_port, db_filename=args.db_filename, host=host,
                                namespaces=tuple({config.temporal_namespace} - {"default"}),
                                log_level="warn")

    def healthy(record: ProcessRecord) -> None:
        problem = devserver.wait_healthy(host, port, record.alive, args.timeout)
        if problem:
            raise ToolError(f"dev server {problem}; see {record.log}",
                            EXIT_TIMEOUT if record.alive() else EXIT_ATTENTION)

    record = spawn(settings, "server", [temporal_binary(), *command[1:]],
                   cwd=settings.project_dir, ready=healthy)
    print(f"ensure-server: started Temporal dev server pid {record.pid} on {host}:{port}, "
          f"Web UI http://{host}:{ui_port}, log {record.log}")
    return EXIT_OK


def ensure_worker(settings: OpsSettings, args: argparse.Namespace) -> int:
    path, log = settings.pid_file("worker"), settings.log_file("worker")
    old = ProcessRecord.read(path)
    if old is not None:
        print(f"ensure-worker: {stop(old, path, args.stop_timeout)}")
    offset = log.stat().st_size if log.exists() else 0
    record = spawn(settings, "worker", settings.worker_cmd, cwd=settings.project_dir,
                   ready=lambda started: wait_ready(started, offset, args.timeout))
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
    for poller in (cli_json("task-queue", "describe", "--task-queue", queue)
                   or {}).get("pollers") or []:
        identity = str(poller.get("identity", ""))
        pid = local_pid(identity)
        if pid is None or proc_start_ticks(pid) is not None:
            found.setdefault(identity, []).append(str(poller.get("taskQueueType", "?")))
    return found


def worker_status(path: Path | None) -> dict[str, Any] | None:
    """WORKER_STATUS_FILE as worker.py writes it ({state, pid, task_queue, since}), read as
    any file others can write (taskfiles.safe_io.read_agent_file); `alive` added from /proc."""
    from exceptions import TaskFileError
    from taskfiles.safe_io import read_agent_file

    if path is None:
        return None
    try:
        status = json.loads(read_agent_file(path, MAX_STATUS_FILE_BYTES))
    except (OSError, ValueError, TaskFileError):
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


Row = tuple[str, object, str, str, str]  # source, pid, state, uptime, detail
SERVING = ("running", "ready", "polling")


def show_workers(settings: OpsSettings, args: argparse.Namespace
                 ) -> tuple[str, list[Row], list[str]]:
    """Print every worker in sight, whoever started it: the PID files of these tools,
    WORKER_STATUS_FILE, the queue's pollers. Returns the queue, the rows and the problems
    a health check counts."""
    config = worker_config()
    queue = args.task_queue or config.task_queue
    rows: list[Row] = []
    problems: list[str] = []
    for _, record in records(settings, "worker"):
        alive = record.alive()
        rows.append(("pid file", record.pid, "running" if alive else "stale",
                     uptime(record.started_at) if alive else "-",
                     f"project {record.project}, log {record.log}"
                     + (f", RSS {rss(record.pid)}" if alive else "")))
        if not alive and record.project == settings.project_name:
            problems.append("the worker these tools started is not running")
    status = worker_status(config.status_file)
    if status is not None:
        state, pid, alive = str(status.get("state")), status.get("pid"), status["alive"]
        rows.append(("status file", pid, state if alive else f"{state}, gone",
                     uptime(status.get("since")) if alive else "-",
                     f"queue {status.get('task_queue')}, {config.status_file}"))
        if state != "ready" or not alive:
            problems.append(f"WORKER_STATUS_FILE says {state!r}" +
                            ("" if alive else f" and pid {pid} is not running"))
    try:
        polling: dict[str, list[str]] | None = pollers(queue)
    except ToolError as err:
        if err.exit_code != EXIT_CONNECT:
            raise
        polling = None
        rows.append(("poller", "-", "unknown", "-", str(err)))
        problems.append(f"pollers unknown: {err}")
    for identity, kinds in (polling or {}).items():
        pid = local_pid(identity)
        rows.append(("poller", pid or "-", "polling", "-", f"{identity} on {queue!r} "
                     f"({', '.join(kinds)})" + (f", RSS {rss(pid)}" if pid else "")))
    if polling == {}:
        problems.append(f"no worker polls task queue {queue!r}")
    print(f"{'SOURCE':<12} {'PID':>8} {'STATE':<14} {'UPTIME':>10}  DETAIL")
    for row in rows:
        print("{:<12} {:>8} {:<14} {:>10}  {}".format(*row))
    if not rows:
        print(f"(no worker: no PID file, no WORKER_STATUS_FILE, no poller on {queue!r})")
    return queue, rows, problems


def list_workers(settings: OpsSettings, args: argparse.Namespace) -> int:
    _, rows, _ = show_workers(settings, args)
    return EXIT_OK if any(state in SERVING for _, _, state, _, _ in rows) else EXIT_ATTENTION


def monitor_worker_health(settings: OpsSettings, args: argparse.Namespace) -> int:
    """list-workers' table, the errors in the log of the worker these tools started, and
    the verdict."""
    queue, rows, problems = show_workers(settings, args)
    record = ProcessRecord.read(settings.pid_file("worker"))
    if record is not None:
        log = Path(record.log)
        tail = log.read_text(errors="replace").splitlines()[-500:] if log.exists() else []
        errors = [line for line in tail if '"level": "ERROR"' in line or "Traceback" in line]
        print(f"log: {log} ({len(errors)} error line(s) in the last {len(tail)} lines)")
        if errors:
            print(f"  last error: {errors[-1][:300]}")
        polling = [pid for _, pid, state, _, _ in rows if state == "polling"]
        if record.alive() and polling and record.pid not in polling:
            problems.append(f"worker pid {record.pid} is running but not polling {queue!r}")
    for problem in problems:
        print(f"UNHEALTHY: {problem}")
    if not problems:
        print("HEALTHY")
    return EXIT_ATTENTION if problems else EXIT_OK


def temporal_passthrough(argv: list[str]) -> NoReturn:
    """exec `temporal ARGV` with the worker's address, namespace and credentials."""
    binary, env = temporal_binary(), cli_env()
    try:
        os.execve(binary, [binary, *argv], env)  # noqa: S606 (argv as given, no shell)
    except OSError as err:
        raise ToolError(f"cannot run {binary}: {err.strerror}", EXIT_USAGE) from None


def list_recent_workflows(_settings: OpsSettings, args: argparse.Namespace) -> int:
    since = datetime.now(UTC) - timedelta(minutes=args.minutes)
    query = f'StartTime > "{since.isoformat(timespec="seconds").replace("+00:00", "Z")}"'
    found = cli_json("workflow", "list", "--query", query, "--limit", str(args.limit)) or []
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


def bulk_cancel_workflows(_settings: OpsSettings, args: argparse.Namespace) -> int:
    query = " AND ".join(f"({part})" for part in ('ExecutionStatus = "Running"',
                                                  id_clause(args.pattern), args.query) if part)
    verb = "terminate" if args.terminate else "cancel"
    matched = cli_json("workflow", "list", "--query", query, "--limit", str(args.limit)) or []
    for wf in matched:
        print(f"{'would ' if args.dry_run else ''}{verb} {wf['execution']['workflowId']} "
              f"({wf['type']['name']})")
    if not matched:
        print(f"no running workflow matches {query}")
    if not matched or args.dry_run:
        return EXIT_OK
    job = cli_json("workflow", verb, "--query", query, "--reason", args.reason,
                   "--yes")["batchJobId"]
    deadline = time.monotonic() + args.timeout
    while (batch := cli_json("batch", "describe", "--job-id", job))["state"].endswith(
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


def workflow_json(verb: str, workflow_id: str, run_id: str | None = None) -> Any:
    """`temporal workflow describe|show` of a workflow's latest run (or `run_id`); a missing
    workflow is EXIT_NOT_FOUND."""
    run = ["--run-id", run_id] if run_id else []
    return cli_json("workflow", verb, "--workflow-id", workflow_id, *run)


def status_of(described: dict[str, Any]) -> str:
    return str(described["workflowExecutionInfo"]["status"]).removeprefix(
        "WORKFLOW_EXECUTION_STATUS_")


def get_workflow_result(_settings: OpsSettings, args: argparse.Namespace) -> int:
    return show_result(args.workflow_id, args.run_id, header=not args.raw,
                       indent=None if args.raw else 2)


def show_result(wid: str, run_id: str | None, *, header: bool, indent: int | None) -> int:
    """Print a closed workflow's result (after a `header` line); ToolError if it has none
    or the result reports a problem."""
    described = workflow_json("describe", wid, run_id)
    info, status = described["workflowExecutionInfo"], status_of(described)
    if status == "RUNNING":
        raise ToolError(f"{wid} is still RUNNING; no result yet (tools/wait-for-workflow-status"
                        f" --workflow-id {wid} --status COMPLETED)")
    if status != "COMPLETED":
        attrs = event_attributes(described.get("closeEvent") or {})
        reason = (failure_text(attrs["failure"]) if attrs.get("failure")
                  else escaped(attrs.get("reason") or ""))
        raise ToolError(f"{wid} is {status}, no result" + (f": {reason}" if reason else "") +
                        f" (tools/analyze-workflow-error --workflow-id {wid})")
    result = described.get("result")
    if header:
        print(f"{wid} ({info['type']['name']}) COMPLETED at {info.get('closeTime')}")
    print(json.dumps(result, indent=indent), flush=True)
    problem = result_problem(result)
    if problem:
        raise ToolError(f"workflow COMPLETED but its result reports a problem: {problem}")
    return EXIT_OK


def event_attributes(event: dict[str, Any]) -> dict[str, Any]:
    return next((value for key, value in event.items() if key.endswith("EventAttributes")), {})


def failure_text(failure: dict[str, Any] | None) -> str:
    """`Type: message` of a Failure, following its cause chain."""
    parts = []
    while failure and failure.get("message"):
        # Type and message are written by whoever failed the activity (any token holder).
        kind, message = escaped(failure_type(failure, follow=False)), escaped(failure["message"])
        parts.append(f"{kind}: {message}" if kind else message)
        failure = failure.get("cause")
    return " <- ".join(parts) or "(no message)"


def failure_type(failure: dict[str, Any] | None, follow: bool = True) -> str:
    """The ApplicationError type of a Failure (of its first cause that has one)."""
    while failure:
        kind = (failure.get("applicationFailureInfo") or {}).get("type")
        if kind:
            return str(kind)
        failure = failure.get("cause") if follow else None
    return ""


def first_line(failure: dict[str, Any] | None) -> str:
    return failure_text(failure).splitlines()[0][:200] if failure else "no failure"


def pending_failures(described: dict[str, Any]) -> list[dict[str, Any]]:
    """Pending activities that have failed before, but not the benign stage-7 poll."""
    return [pending for pending in described.get("pendingActivities") or []
            if pending.get("lastFailure") and pending.get("attempt", 1) > 1
            and failure_type(pending["lastFailure"]) != BlocksPendingError.failure_type]


def stall_of(workflow_id: str, run_id: str) -> str | None:
    """Why a running workflow makes no progress, or None if it is healthy."""
    described = workflow_json("describe", workflow_id, run_id)
    task = described.get("pendingWorkflowTask")
    attempt = task.get("attempt", 1) if task else 0
    if task:  # a failed workflow task is always followed by a pending retry
        events = workflow_json("show", workflow_id, run_id)["events"]
        last_task = [event for event in events if event["eventType"] in (
            "EVENT_TYPE_WORKFLOW_TASK_COMPLETED", "EVENT_TYPE_WORKFLOW_TASK_FAILED",
            "EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT")][-1:]
        if last_task and last_task[0]["eventType"] == "EVENT_TYPE_WORKFLOW_TASK_FAILED":
            failure = event_attributes(last_task[0]).get("failure")
            return f"WorkflowTaskFailed (attempt {max(attempt, 1)}): {first_line(failure)}"
    if attempt > 2:
        return f"workflow task retrying (attempt {attempt})"
    for pending in pending_failures(described):
        if pending["attempt"] > 2:
            return (f"ActivityTaskFailed x{pending['attempt'] - 1} "
                    f"({pending['activityType']['name']}): {first_line(pending['lastFailure'])}")
    return missing_worker(described)


NO_POLLER = "which none polls"


def missing_worker(described: dict[str, Any], polled: dict[str, bool] | None = None
                   ) -> str | None:
    """A pending activity on a task queue no worker polls for activities: the stage waits
    for the host whose worker serves that queue (an agent host, AGENT_TASK_QUEUES), and
    goes on by itself when it returns. `polled` caches the answer per queue."""
    polled = {} if polled is None else polled
    own = described["executionConfig"]["taskQueue"]["name"]
    for pending in described.get("pendingActivities") or []:
        queue = ((pending.get("activityOptions") or {}).get("taskQueue") or {}).get("name") or own
        if queue not in polled:
            polled[queue] = any(
                "activity" in kinds or "TASK_QUEUE_TYPE_ACTIVITY" in kinds
                for kinds in pollers(queue).values())
        if not polled[queue]:
            return (f"{pending['activityType']['name']} waits for a worker on task queue "
                    f"{queue}, {NO_POLLER}: is that host's worker running?")
    return None


def find_stalled_workflows(_settings: OpsSettings, args: argparse.Namespace) -> int:
    query = 'ExecutionStatus = "Running"' + (f" AND ({args.query})" if args.query else "")
    running = cli_json("workflow", "list", "--query", query, "--limit", str(args.limit)) or []
    stalls = []
    for wf in running:
        wid = wf["execution"]["workflowId"]
        reason = stall_of(wid, wf["execution"]["runId"])
        if reason is not None:
            stalls.append(wid)
            print(f"STALLED {wid} ({wf['type']['name']}): {reason}")
            print("  next: start that host's worker (docs/deployment.md); the "
                  "stage goes on by itself" if NO_POLLER in reason else
                  f"  next: tools/analyze-workflow-error --workflow-id {wid}")
    print(f"({len(stalls)} stalled of {len(running)} running workflow(s) checked)")
    return EXIT_ATTENTION if stalls else EXIT_OK


ADVICE = {
    "nondeterminism": "history mismatch: terminate this workflow, fix the code, "
                      "tools/ensure-worker, then start a NEW workflow",
    "workflow_task": "bug in workflow code (or a missing registration): fix it and run "
                     "tools/ensure-worker; no need to terminate, the workflow resumes by itself",
    "activity_retrying": "the activity keeps failing and retrying: fix the activity (or what "
                         "it reads), tools/ensure-worker; it retries with the new code",
    "activity_failed": "an activity failed for good: fix the cause, then start a NEW workflow",
    PhaseFailedError.failure_type: "an agent reported failure (or a stage failed): read the "
                                   "task file and the summary, then start a NEW build",
    TriageInvalidError.failure_type: "the security agent's triage-output.yml is unusable: fix "
                                     "the file (the error names the problem), then start a "
                                     "NEW build",
    InvalidInputError.failure_type: "the workflow input was refused: fix the input and start "
                                    "again",
    "workflow_failed": "fix the cause, tools/ensure-worker, then start a NEW workflow",
    "timed_out": "raise the timeout (policies.py) if the work legitimately takes longer, "
                 "then start a NEW workflow",
    "terminated": "terminated by an operator or tool; start a NEW workflow if still needed",
    "canceled": "cancelled on request; start a NEW workflow if still needed",
}


def finding(event: dict[str, Any], scheduled: dict[str, str]) -> tuple[str, str, str] | None:
    """(what, detail, what to do) for one history event that records a problem."""
    kind = event["eventType"].removeprefix("EVENT_TYPE_")
    what = "".join(word.capitalize() for word in kind.split("_"))
    attrs = event_attributes(event)
    failure = attrs.get("failure")
    if kind == "WORKFLOW_TASK_FAILED":
        cause = str(attrs.get("cause", "")).removeprefix("WORKFLOW_TASK_FAILED_CAUSE_")
        message = failure_text(failure)
        tail = [escaped(line) for line in
                (failure or {}).get("stackTrace", "").strip().splitlines() if line][-3:]
        nondeterministic = "NON_DETERMINISTIC" in cause or any(word in message.lower() for word
                                                               in ("nondetermin", "non-determin",
                                                                   "history mismatch"))
        return (f"{what} (workflow stalled)",
                "\n      ".join([f"{message} [cause {cause}]", *tail]),
                ADVICE["nondeterminism" if nondeterministic else "workflow_task"])
    if kind in ("ACTIVITY_TASK_FAILED", "ACTIVITY_TASK_TIMED_OUT"):
        name = scheduled.get(attrs.get("scheduledEventId", ""), "activity")
        advice = ADVICE["timed_out"] if kind.endswith("TIMED_OUT") else ADVICE.get(
            failure_type(failure), ADVICE["activity_failed"])
        return f"{what} ({name})", failure_text(failure), advice
    if kind == "WORKFLOW_EXECUTION_FAILED":
        return what, failure_text(failure), ADVICE.get(failure_type(failure),
                                                       ADVICE["workflow_failed"])
    if kind == "WORKFLOW_EXECUTION_TIMED_OUT":
        return what, "execution timeout reached", ADVICE["timed_out"]
    if kind == "WORKFLOW_EXECUTION_TERMINATED":
        return (what, escaped(f"{attrs.get('reason') or 'no reason'} "
                              f"(by {attrs.get('identity') or '?'})"),
                ADVICE["terminated"])
    if kind == "WORKFLOW_EXECUTION_CANCELED":
        return what, "cancel request honoured", ADVICE["canceled"]
    return None


def analyze_workflow_error(settings: OpsSettings, args: argparse.Namespace) -> int:
    described = workflow_json("describe", args.workflow_id, args.run_id)
    events = workflow_json("show", args.workflow_id, args.run_id)["events"]
    scheduled = {event["eventId"]: event_attributes(event)["activityType"]["name"]
                 for event in events if event["eventType"] == "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED"}
    findings = [found for event in events if (found := finding(event, scheduled))]
    findings += [(f"Activity retrying ({pending['activityType']['name']}, attempt "
                  f"{pending['attempt']})", failure_text(pending["lastFailure"]),
                  ADVICE["activity_retrying"]) for pending in pending_failures(described)]
    info = described["workflowExecutionInfo"]
    print(f"{args.workflow_id} ({info['type']['name']}) status {status_of(described)}, "
          f"{len(events)} history events")
    for pending in described.get("pendingActivities") or []:
        if failure_type(pending.get("lastFailure")) == BlocksPendingError.failure_type:
            print(f"note: {pending['activityType']['name']} is polling (attempt "
                  f"{pending['attempt']}): {failure_text(pending['lastFailure'])} — normal "
                  f"while blocks await a decision; tools/approve-build or tools/reject-build "
                  f"decides")
    task_attempt = (described.get("pendingWorkflowTask") or {}).get("attempt", 1)
    if task_attempt > 1:
        print(f"note: workflow task attempt {task_attempt}: the worker keeps failing it (see "
              f"the worker log {settings.log_file('worker')})")
    if not findings:
        print("no errors found in the history")
        return EXIT_OK
    for number, (kind, text, advice) in enumerate(findings, 1):
        print(f"{number}. {kind}: {text}\n   what to do: {advice}")
    return EXIT_ATTENTION


def wait_for_workflow_status(_settings: OpsSettings, args: argparse.Namespace) -> int:
    from temporalio.client import WorkflowExecutionStatus

    statuses = [status.name for status in WorkflowExecutionStatus]
    wanted = args.status.upper().replace("CANCELLED", "CANCELED")
    if wanted not in statuses:
        raise ToolError(f"unknown status {args.status!r}; one of {', '.join(statuses)}",
                        EXIT_USAGE)
    deadline = time.monotonic() + args.timeout
    while (current := status_of(workflow_json("describe", args.workflow_id,
                                              args.run_id))) != wanted:
        if current != "RUNNING":
            raise ToolError(f"{args.workflow_id} closed as {current}; it will never be {wanted}")
        if time.monotonic() > deadline:
            raise ToolError(f"{args.workflow_id} still {current} after {args.timeout:g}s "
                            f"(wanted {wanted})", EXIT_TIMEOUT)
        time.sleep(args.interval)
    print(f"wait-for-workflow-status: {args.workflow_id} is {current}")
    return EXIT_OK


def parse_verdicts(given: list[str]) -> dict[str, str]:
    """`--verdict N=accept` (or ID=change, …) → {"N": "accept"}."""
    verdicts = {}
    for item in given:
        block, _, verdict = item.partition("=")
        if not block.strip() or not verdict.strip():
            raise ToolError(f"--verdict {item!r}: expected BLOCK=accept|reject|change (BLOCK: "
                            f"its number in the notice, or its id)", EXIT_USAGE)
        verdicts[block.strip()] = verdict.strip()
    return verdicts


def decide(env: Mapping[str, str] | None, command: str, workflow_id: str, note: str,
           by: str, verdicts: list[str] | None = None) -> str:
    """approve_blocks / reject_blocks / request_changes (temporal workflow update
    execute); the answer: the decision taken."""
    from models import BlockDecision

    try:
        # Validated: a verdict is any word the operator typed.
        decision = BlockDecision.model_validate({
            "note": note, "decided_by": by, "verdicts": parse_verdicts(verdicts or [])})
    except ValueError as err:
        raise ToolError(f"invalid decision: {str(err).splitlines()[0]}", EXIT_USAGE) from None
    try:
        return str(cli_json("workflow", "update", "execute", "--workflow-id", workflow_id,
                            "--name", UPDATES[command], "--input",
                            decision.model_dump_json(), env=env)["result"])
    except ToolError as err:
        if "handler for" in str(err):  # a workflow without the Update: not a pipeline
            raise ToolError(f"refused by {workflow_id}: it takes no block decisions") from None
        if err.exit_code == EXIT_NOT_FOUND or "already completed" in str(err):
            raise ToolError(f"workflow {workflow_id!r} not found or already closed",
                            EXIT_NOT_FOUND) from None
        if err.exit_code != EXIT_ATTENTION:
            raise
        reason = (str(err).partition("unable to update workflow: ")[2] or str(err)).rsplit(
            " (type: ", 1)[0]
        raise ToolError(f"refused by {workflow_id}: {reason}") from None


def decide_build(_settings: OpsSettings, args: argparse.Namespace) -> int:
    by = args.by or getpass.getuser()
    answer = decide(None, args.command, args.workflow_id,
                    args.reason if args.command == "reject-build" else args.note, by,
                    args.verdict)
    print(f"{args.command}: {args.workflow_id} {answer} by {by}")
    return EXIT_OK


def start_build_command(_settings: OpsSettings, args: argparse.Namespace) -> int:
    kind, inp, options = start_build.build_request(args)
    if args.timeout is not None and args.timeout <= 0:
        raise ToolError(f"--timeout {args.timeout:g}: must be more than 0 seconds", EXIT_USAGE)
    workflow_id = start_build.start(kind, inp, {"check_task": True, **options})
    if not args.wait:
        return EXIT_OK
    try:  # one long poll of the server until the workflow closes, however it ends
        cli_json("workflow", "result", "--workflow-id", workflow_id, timeout=args.timeout)
    except ToolError as err:
        if err.exit_code == EXIT_TIMEOUT:
            raise ToolError(f"{workflow_id} still running after {args.timeout:g}s",
                            EXIT_TIMEOUT) from None
        if err.exit_code != EXIT_ATTENTION:
            raise  # a closed workflow that failed is explained by show_result
    return show_result(workflow_id, None, header=False, indent=2)


Handler = Callable[[OpsSettings, argparse.Namespace], int]
WORKFLOW_ID = (("--workflow-id",), {"required": True})
RUN_ID = (("--run-id",), {"help": "a specific run (default: the latest)"})
QUEUE = (("--task-queue",), {"help": "default: TASK_QUEUE or the worker's default"})
VERDICT = (("--verdict",), {"action": "append", "default": [], "metavar": "BLOCK=VERDICT",
                            "help": "one block's verdict: accept, reject or change; BLOCK is "
                                    "its number in the notice or its id (repeatable; blocks "
                                    "not named take the command's own verdict)"})


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
     "progress: failing workflow tasks or activities retrying again and again (a pipeline "
     "parked at stage 7 is not counted, whether on a timer or an older run's block poll).", [
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
    ("time-report", time_report.time_report, "Where recent builds' time went, from their "
     "summaries: slowest agent stages, pickup waits by agent, block decision waits "
     "(--json for scripts).", time_report.OPTIONS),
    ("start-build", start_build_command, "Start a BuildPipelineWorkflow or a "
     "BuildPlanWorkflow; prints its id first. 3: the id is already running.",
     start_build.OPTIONS),
    ("approve-build", decide_build, "Approve the security blocks of a pipeline parked at "
     "stage 7 (approve_blocks Update); 1: refused, 3: not found or closed.", [
         WORKFLOW_ID, (("--note",), {"default": "", "help": "why (in the task history)"}),
         (("--by",), {"help": "who decides (default: your user name)"}), VERDICT]),
    ("reject-build", decide_build, "Reject the security blocks of a pipeline parked at "
     "stage 7 (reject_blocks Update); 1: refused, 3: not found or closed.", [
         WORKFLOW_ID, (("--reason",), {"required": True, "help": "why (in the task history)"}),
         (("--by",), {"help": "who decides (default: your user name)"}), VERDICT]),
    ("request-changes", decide_build, "Send the security blocks of a parked pipeline back to "
     "the build agent with a note, then re-audit (request_changes Update; only while a "
     "re-audit round is left); 1: refused, 3: not found or closed.", [
         WORKFLOW_ID, (("--note",), {"required": True, "help": "what to change (the build "
                                     "agent's fix task carries it)"}),
         (("--by",), {"help": "who decides (default: your user name)"}), VERDICT]),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog.removeprefix('tools/')}: {message}\n")


def build_parser(name: str = "ops") -> argparse.ArgumentParser:
    # `name`: the command an unknown option is reported for (the top level finds it).
    parser = _Parser(
        prog=f"tools/{name}", epilog=EXIT_CODES_HELP,
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
        named = argv[0] if argv and argv[0] in {name for name, *_ in COMMANDS} else "ops"
        args = build_parser(named).parse_args(argv)
    except SystemExit as exit_request:
        return EXIT_USAGE if exit_request.code not in (0, None) else EXIT_OK

    return run_tool(args.command, lambda: args.handler(OpsSettings.from_env(), args))


if __name__ == "__main__":
    exit_process(main())
