"""Riding out a late or vanished Temporal server (and a late Vault).

At start (`connect_when_reachable`): what waiting may cure — the server or Vault not up
yet, Vault sealed — is retried with capped exponential backoff until
WORKER_STARTUP_WAIT_SECONDS have passed; what no wait cures (a bad setting, refused
credentials, an unknown namespace, a TLS handshake refused for good) is raised at once.

While serving (`watch_server`): the SDK's pollers retry by themselves while the server
is away and resume when it returns; this says so — a health check every few seconds,
the status file's `waiting` state with the reason, one WARNING when the outage begins
and one per OUTAGE_REPORT_INTERVAL while it lasts, and a line when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

import policies
from config import WorkerConfig
from exceptions import (
    ConfigError,
    CredentialError,
    DependencyUnavailableError,
    TlsHandshakeError,
    VaultUnavailableError,
)

log = logging.getLogger("reachability")

T = TypeVar("T")
MAX_CAUSE_CHARS = 300


def retry_delays(first: float, cap: float) -> Iterator[float]:
    """first, 2×first, 4×first, … never more than `cap`."""
    delay = first
    while True:
        yield min(delay, cap)
        delay = min(delay * 2, cap)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line[:MAX_CAUSE_CHARS]


def transient_cause(err: BaseException, config: WorkerConfig) -> str | None:
    """What to tell the operator while waiting, if `err` is worth waiting for; None if no
    wait can cure it. Messages name addresses and error kinds, never a secret."""
    if isinstance(err, VaultUnavailableError):
        return _first_line(err)
    if isinstance(err, CredentialError | TlsHandshakeError | ConfigError):
        return None
    if isinstance(err, RPCError):
        # The answers that mean "never" (no such namespace, not allowed) are raised as
        # ConfigError / CredentialError by check_namespace; the rest (unavailable, an
        # internal error mid-upgrade) are waited for, each attempt logging the answer.
        return (f"Temporal at {config.temporal_address} answered "
                f"{err.status.name}: {_first_line(err)}")
    if isinstance(err, RuntimeError | OSError | TimeoutError):
        return f"cannot connect to Temporal at {config.temporal_address}: {_first_line(err)}"
    return None


async def check_namespace(client: Client, config: WorkerConfig) -> None:
    """The namespace exists and the server lets us describe it (the worker's pollers need
    both): an unknown namespace is a ConfigError, a refusal a CredentialError."""
    request = DescribeNamespaceRequest(namespace=config.temporal_namespace)
    try:
        await client.workflow_service.describe_namespace(
            request, timeout=policies.SERVER_CHECK_TIMEOUT)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise ConfigError(f"TEMPORAL_NAMESPACE: the server at {config.temporal_address} "
                              f"has no namespace {config.temporal_namespace!r}") from None
        if err.status in (RPCStatusCode.UNAUTHENTICATED, RPCStatusCode.PERMISSION_DENIED):
            raise CredentialError(f"the server at {config.temporal_address} refused this "
                                  f"worker ({err.status.name}: {_first_line(err)})") from None
        raise


WaitReport = Callable[[str, int, float], None]  # cause, attempt, seconds until the next


async def connect_when_reachable(
        attempt: Callable[[], Awaitable[T]], config: WorkerConfig, on_wait: WaitReport, *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic) -> T:
    """`attempt()` until it succeeds; errors no wait cures are raised at once. After
    WORKER_STARTUP_WAIT_SECONDS, DependencyUnavailableError with the last cause."""
    started = clock()
    deadline = started + config.startup_wait_seconds
    delays = retry_delays(policies.STARTUP_RETRY_FIRST.total_seconds(),
                          policies.STARTUP_RETRY_CAP.total_seconds())
    attempts = 0
    while True:
        attempts += 1
        try:
            return await attempt()
        except Exception as err:
            cause = transient_cause(err, config)
            if cause is None:
                raise
        left = deadline - clock()
        if left <= 0:
            raise DependencyUnavailableError(cause, attempts, clock() - started)
        pause = min(next(delays), left)
        on_wait(cause, attempts, pause)
        await sleep(pause)


StateReport = Callable[[str | None], None]  # the outage's cause, or None: reachable again


async def _server_problem(client: Client, config: WorkerConfig) -> str | None:
    try:
        serving = await client.service_client.check_health(
            retry=False, timeout=policies.SERVER_CHECK_TIMEOUT)
    except Exception as err:  # whatever the transport raises: the server is not there
        return transient_cause(err, config) or f"health check failed: {_first_line(err)}"
    return None if serving else f"Temporal at {config.temporal_address} is not serving"


async def watch_server(client: Client, config: WorkerConfig, stop: asyncio.Event,
                       on_change: StateReport) -> None:
    """Until `stop`: check the server every SERVER_CHECK_INTERVAL; report an outage when
    it begins (`on_change(cause)`, WARNING), again at most once per
    OUTAGE_REPORT_INTERVAL while it lasts, and its end (`on_change(None)`)."""
    down_since: float | None = None
    reported_at = 0.0
    every = policies.OUTAGE_REPORT_INTERVAL.total_seconds()
    while not stop.is_set():
        cause = await _server_problem(client, config)
        now = time.monotonic()
        if stop.is_set():
            return
        if cause is not None and (down_since is None or now - reported_at >= every):
            if down_since is None:
                down_since = now
                on_change(cause)
            reported_at = now
            log.warning("temporal_unreachable", extra={
                "cause": cause, "down_seconds": round(now - down_since),
                "next_report_seconds": every})
        elif cause is None and down_since is not None:
            log.info("temporal_reachable_again",
                        extra={"down_seconds": round(now - down_since, 1)})
            down_since = None
            on_change(None)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), policies.SERVER_CHECK_INTERVAL.total_seconds())
