"""Entry point: connect to Temporal and run both build workflows and their activities
(WORKER_ROLE=agent-host: only the activities bound to this host's folders).

Exit codes: 0 clean shutdown · 2 bad configuration (an unknown namespace too) · 3
credentials (Vault/TLS), both at once · 4 Temporal or Vault still unreachable after
WORKER_STARTUP_WAIT_SECONDS · 1 anything else. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvloop
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.build_pipeline_activities import PipelineActivities
from config import WorkerConfig, load_config
from decisions.chat_listener import listen_for_decisions
from decisions.file_watcher import watch_block_decisions
from dispatcher.roster import warn_missing
from exceptions import ConfigError, CredentialError, DependencyUnavailableError
from observability import Telemetry, configure_logging, setup_telemetry
from startup.reachability import check_namespace, connect_when_reachable, watch_server
from startup.recovery import recover_lost_activities
from temporal_client import connect
from vocabulary import WORKER_READY, WORKER_STOPPED, WORKER_STOPPING, WORKER_WAITING
from workflows.build_pipeline_workflow import BuildPipelineWorkflow
from workflows.build_plan import BuildPlanWorkflow

log = logging.getLogger("worker")

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_CREDENTIALS, EXIT_CONNECT = 0, 1, 2, 3, 4


def worker_activities(config: WorkerConfig) -> list[Callable[..., Any]]:
    """Every activity the worker registers, as bound methods implementing
    workflows/contracts.py (startup/recovery.py must know what to do with each)."""
    activities = PipelineActivities(config)
    return activities.host_bound() if config.agent_host else activities.all()


def build_worker(client: Client, config: WorkerConfig, **overrides: Any) -> Worker:
    """The worker with every workflow and activity of this service registered.

    Workflows run without the SDK's sandbox. The sandbox re-executes the workflow module
    for every workflow instance and runs each activation and payload conversion through
    compiled-on-the-fly code: about 15 ms of CPU per pipeline, a fifth of the worker's
    whole cost. What it guards against (a non-deterministic call such as `datetime.now()`
    or file I/O in workflow code, state shared between runs through a module) is checked
    where it is cheap instead: `make lint` refuses such calls in workflows/
    (tools/check_workflows.py), every recorded history and every workflow test replays
    under the sandbox (tests/test_replay.py), and workflows/ keeps no module state.
    `workflow_runner=` overrides this (tests run the sandbox)."""
    tuning: dict[str, Any] = {"workflow_runner": UnsandboxedWorkflowRunner()}
    if config.max_concurrent_activities is not None:
        tuning["max_concurrent_activities"] = config.max_concurrent_activities
    if config.max_concurrent_workflow_tasks is not None:
        tuning["max_concurrent_workflow_tasks"] = config.max_concurrent_workflow_tasks
    if config.max_cached_workflows is not None:
        tuning["max_cached_workflows"] = config.max_cached_workflows
    tuning.update(overrides)
    # An agent host runs no workflow code: its queue only ever gets activity tasks.
    workflows = [] if config.agent_host else [BuildPipelineWorkflow, BuildPlanWorkflow]
    return Worker(
        client,
        task_queue=config.task_queue,
        workflows=workflows,
        activities=worker_activities(config),
        graceful_shutdown_timeout=timedelta(seconds=config.shutdown_grace_seconds),
        **tuning,
    )


def write_status(path: Path | None, state: str, config: WorkerConfig,
                 reason: str | None = None) -> None:
    """Readiness for monitors: WORKER_STATUS_FILE gets {state, pid, task_queue, since}
    (and `reason` while waiting), replaced atomically so a reader never sees half a
    document. Failures only log: a monitor file must never stop the worker."""
    if path is None:
        return
    document = {"state": state, "pid": os.getpid(), "task_queue": config.task_queue,
                "namespace": config.temporal_namespace,
                "since": datetime.now(UTC).isoformat(timespec="seconds")}
    if reason is not None:
        document["reason"] = reason
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(document) + "\n")
        os.replace(temp, path)
    except OSError as err:
        # A full disk leaves the temp file cut short: removed (that needs no space).
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        code = errno.errorcode.get(err.errno or 0, str(err.errno))
        log.warning("status_file_not_written", extra={
            "status_file": str(path), "state": state,
            "error": f"{path.parent}: {err.strerror} ({code})"})


async def reach_temporal(config: WorkerConfig, worker_id: str, telemetry: Telemetry) -> Client:
    """A client on a server that knows our namespace, waiting as long as
    WORKER_STARTUP_WAIT_SECONDS allows for a server or Vault that is not up yet."""
    last_reason: str | None = None

    async def attempt() -> Client:
        client = await connect(config, identity=worker_id,
                               interceptors=telemetry.interceptors, runtime=telemetry.runtime)
        await check_namespace(client, config)
        return client

    def on_wait(cause: str, attempts: int, pause: float) -> None:
        nonlocal last_reason
        log.warning("waiting_for_dependency", extra={
            "cause": cause, "attempt": attempts, "retry_in_seconds": round(pause, 1),
            "wait_limit_seconds": config.startup_wait_seconds})
        if cause != last_reason:  # `since` stays when the wait began, for this reason
            last_reason = cause
            write_status(config.status_file, WORKER_WAITING, config, reason=cause)

    return await connect_when_reachable(attempt, config, on_wait)


async def until_stopped(work: Awaitable[Client], stop: asyncio.Event) -> Client | None:
    """`work`'s result, or None if `stop` is set first (`work` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def install_signal_handlers(config: WorkerConfig, stop: asyncio.Event) -> None:
    """First SIGINT/SIGTERM: stop polling and let running activities finish. Second:
    exit at once."""
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("shutdown_forced", extra={"signal": signal.Signals(signum).name})
            os._exit(EXIT_ERROR)
        log.info("shutdown_requested", extra={"signal": signal.Signals(signum).name,
                                              "grace_seconds": config.shutdown_grace_seconds})
        write_status(config.status_file, WORKER_STOPPING, config)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


def gave_up(config: WorkerConfig, code: int, problem: str) -> int:
    """The status file says `stopped` (no longer `waiting`) and why; one line on stderr."""
    write_status(config.status_file, WORKER_STOPPED, config, reason=problem)
    print(f"worker: {problem}", file=sys.stderr)
    return code


async def serve(config: WorkerConfig, worker_id: str) -> int:
    try:
        # Spans still buffered at exit are flushed by the tracer provider's atexit hook.
        telemetry = setup_telemetry(config)
    except RuntimeError as err:  # e.g. PROMETHEUS_BIND_ADDRESS already in use
        print(f"worker: cannot start telemetry: {str(err).splitlines()[0]}", file=sys.stderr)
        return EXIT_CONFIG
    stop = asyncio.Event()
    install_signal_handlers(config, stop)
    try:
        client = await until_stopped(reach_temporal(config, worker_id, telemetry), stop)
    except ConfigError as err:
        return gave_up(config, EXIT_CONFIG, f"configuration error: {err}")
    except CredentialError as err:
        return gave_up(config, EXIT_CREDENTIALS, f"credential error: {err}")
    except DependencyUnavailableError as err:
        return gave_up(config, EXIT_CONNECT, f"{err.cause} (still so after {err.attempts} "
                       f"attempts in {err.waited_seconds:.0f}s; WORKER_STARTUP_WAIT_SECONDS="
                       f"{config.startup_wait_seconds:g})")
    if client is None:  # stopped while waiting
        write_status(config.status_file, WORKER_STOPPED, config)
        return EXIT_OK
    return await run_worker(client, config, stop)


async def run_worker(client: Client, config: WorkerConfig, stop: asyncio.Event) -> int:
    """Poll until `stop`, then shut down gracefully."""
    worker = build_worker(client, config)

    def on_server_change(cause: str | None) -> None:
        if not stop.is_set():
            write_status(config.status_file, WORKER_WAITING if cause else WORKER_READY,
                         config, reason=cause)

    try:
        async with worker:
            log.info("Worker started, listening on task queue: %s", config.task_queue,
                     extra={"ready": True, "task_queue": config.task_queue,
                            "namespace": config.temporal_namespace,
                            "role": config.worker_role})
            write_status(config.status_file, WORKER_READY, config)
            # In the background: hand back what a killed worker on this host left half
            # done (startup/recovery.py), deliver block decisions written into task files
            # (decisions/file_watcher.py), take them from the Matrix room
            # (decisions/chat_listener.py) and say when the server goes away and comes
            # back (startup/reachability.py). Serving
            # waits for none of them; all are cancelled at once on shutdown, so a long
            # poll never delays a SIGTERM.
            background = [asyncio.create_task(recover_lost_activities(client, config)),
                          asyncio.create_task(watch_block_decisions(client, config, stop)),
                          asyncio.create_task(watch_server(client, config, stop,
                                                           on_server_change))]
            if not config.agent_host:  # decisions in the room are the main queue's
                background.append(
                    asyncio.create_task(listen_for_decisions(client, config, stop)))
            await stop.wait()
            stopping_since = time.monotonic()
            for task in background:
                task.cancel()
    finally:
        write_status(config.status_file, WORKER_STOPPED, config)
    log.info("worker_stopped", extra={
        "clean": True, "shutdown_seconds": round(time.monotonic() - stopping_since, 3)})
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="worker.py", description="Run the temporal-build-worker (configured by "
        "environment variables; see README).")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the environment, print the settings, exit")
    args = parser.parse_args(argv)
    try:
        config = load_config()
    except ConfigError as err:
        print(f"worker: configuration error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    configure_logging(config.log_level, config.log_file, worker_id)
    log.info("worker_starting", extra={"settings": config.public_summary()})
    warn_missing(config)  # a stage agent the dispatcher cannot launch: warned, not fatal
    if args.check_config:
        return EXIT_OK
    try:
        # libuv's event loop runs the loop's own machinery (callbacks, futures, wake-ups
        # from the SDK's and the file pool's threads) in C: about 5 % less worker CPU per
        # pipeline than asyncio's, and a shorter hand-off when busy (bench/README.md).
        return uvloop.run(serve(config, worker_id))
    except CredentialError as err:
        print(f"worker: credential error: {err}", file=sys.stderr)
        return EXIT_CREDENTIALS
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    exit_code = main()
    # temporalio's native threads can abort interpreter teardown after a clean stop
    # ("Fatal Python error: PyGILState_Release ... finalizing", SIGABRT, sdk-python#300).
    # Run the exit hooks (log and span flushing) and flush output, then skip the teardown.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
