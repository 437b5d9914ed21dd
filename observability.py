"""Logging (JSON lines), the service's own counters, and opt-in telemetry.

Nothing is configured at import time, and OpenTelemetry is imported only when
OTEL_EXPORTER_OTLP_ENDPOINT is set (or a test hands in a span exporter): a worker
without telemetry never loads it.

The SDK core (Rust) logs through the worker's Temporal runtime, which forwards its lines
into Python logging (logger `temporalio.core`), so they leave as JSON like every other
line instead of as plain text on stderr.

Metrics all go through the Temporal runtime's meter, so the SDK's worker metrics and
ours leave by the same road: OTLP (OTEL_EXPORTER_OTLP_ENDPOINT) or a Prometheus
scrape endpoint (PROMETHEUS_BIND_ADDRESS; it wins when both are set, because the
runtime exports metrics one way only — traces still go over OTLP).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from temporalio import activity, workflow
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    OpenTelemetryConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from policies import OUTAGE_REPORT_INTERVAL
from telemetry.context import bound_build_name

if TYPE_CHECKING:
    from temporalio.client import Interceptor

    from config import WorkerConfig

# Keys of LogRecord itself; anything else passed via `extra=` is ours to print.
_RECORD_KEYS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
CONTEXT_KEYS = ("worker_id", "workflow_id", "activity", "build_name")

# Counters of our own (names as exported; Prometheus may add a _total suffix).
TASKS_DISPATCHED = "build_tasks_dispatched"
PIPELINES_COMPLETED = "build_pipelines_completed"
BLOCKS_NOTIFIED = "build_blocks_notified"
NOTIFICATIONS_SENT = "build_notifications_sent"
NOTIFICATION_FAILURES = "build_notification_failures"
PLATFORM_EVENTS_WRITTEN = "build_platform_events_written"
PLATFORM_EVENT_FAILURES = "build_platform_event_failures"
_COUNTER_HELP = {
    TASKS_DISPATCHED: "Agent task files written, by stage",
    PIPELINES_COMPLETED: "Build pipelines that wrote their summary, by outcome",
    BLOCKS_NOTIFIED: "Security blocks announced to operators",
    NOTIFICATIONS_SENT: "Block notifications delivered, by channel",
    NOTIFICATION_FAILURES: "Block notifications that failed after retries, by channel",
    PLATFORM_EVENTS_WRITTEN: "Events appended to the platform's event log, by event type",
    PLATFORM_EVENT_FAILURES: "Events the platform's event log did not take, by event type",
}

# Histograms of where builds' time went (seconds), recorded once per build by its summary.
PICKUP_WAIT = "build_stage_pickup_wait_seconds"
WORK_TIME = "build_stage_work_seconds"
DECISION_WAIT = "build_decision_wait_seconds"
_HISTOGRAM_HELP = {
    PICKUP_WAIT: "Agent tasks: seconds from written to claimed, by stage",
    WORK_TIME: "Agent tasks: seconds from claimed to done, by stage",
    DECISION_WAIT: "Block decisions: seconds a pipeline waited at stage 7, by who decided",
}
# From seconds to a week: agents are picked up in minutes to hours, decisions take days.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
                    28800.0, 86400.0, 259200.0, 604800.0)

# How often the runtime pushes metrics over OTLP.
OTLP_METRIC_PERIOD = timedelta(seconds=10)

# The logger the SDK core's lines are forwarded to, and what the core sends: its own
# warnings and errors, its dependencies' errors (the SDK's default; INFO and below from the
# core is per-poll chatter).
CORE_LOGGER = "temporalio.core"
CORE_LOG_FILTER = TelemetryFilter(core_level="WARN", other_level="ERROR")
# Core modules whose warnings repeat for every retried call while the server is away.
CORE_RETRY_TARGETS = ("temporalio_client::retry", "temporalio_sdk_core::worker::heartbeat")

# Task tokens are capabilities: whoever reads one can complete that stage. The SDK logs
# them at DEBUG ("Running activity X (token b'...')", "Completing activity with
# completion: task_token: \"...\"", "Cannot find activity to cancel for token b'...'")
# and we never want them anywhere, so every record is scrubbed before a handler writes
# it: bytes arguments are dropped, and in the text a labelled token (task_token: ...,
# TASK_TOKEN=...), any bytes literal and any long base64 run are replaced.
REDACTED = "<redacted>"
_TOKEN_FIELD = re.compile(
    r"""(task_?token["']?\s*[:=]\s*)"""
    r"""(b?"(?:[^"\\]|\\.)*"|b?'(?:[^'\\]|\\.)*'|[A-Za-z0-9+/=_-]+)""",
    re.IGNORECASE)
_BYTES_LITERAL = re.compile(r"""(?<![A-Za-z0-9_])b(?:'(?:[^'\\]|\\.){8,}'|"(?:[^"\\]|\\.){8,}")""")
_LONG_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{100,}={0,2}(?![A-Za-z0-9+/=])")


class ContextFilter(logging.Filter):
    """Fills workflow_id / activity / build_name from the running activity or workflow
    when the call site did not pass them, so module loggers carry them too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "workflow_id", None) is None:
            if activity.in_activity():
                info = activity.info()
                record.workflow_id = info.workflow_id
                if getattr(record, "activity", None) is None:
                    record.activity = info.activity_type
            elif workflow.in_workflow():
                record.workflow_id = workflow.info().workflow_id
        if getattr(record, "build_name", None) is None:
            record.build_name = bound_build_name()
        return True


def redact(text: str) -> str:
    """`text` with anything that looks like a task token replaced by <redacted>."""
    text = _TOKEN_FIELD.sub(lambda m: m.group(1) + REDACTED, text)
    text = _BYTES_LITERAL.sub(REDACTED, text)
    return _LONG_BASE64.sub(REDACTED, text)


def _redact_arg(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return REDACTED
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))  # protobuf messages print their token field as text


class RedactTokens(logging.Filter):
    """Scrubs task tokens from every record a handler writes, whichever logger made it
    (the SDK's included): arguments first, then the formatted message, which replaces
    msg/args so no later formatting can bring the raw values back."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, dict):
            record.args = {key: _redact_arg(value) for key, value in args.items()}
        elif args:
            record.args = tuple(_redact_arg(value) for value in args)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: keep its parts, scrubbed
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        if record.exc_info:
            formatter = logging.Formatter()
            record.exc_text = redact(formatter.formatException(record.exc_info))
            record.exc_info = None
        for key, value in list(vars(record).items()):
            if key not in _RECORD_KEYS and isinstance(value, str | bytes):
                setattr(record, key, _redact_arg(value))
        return True


class CoreLogFields(logging.Filter):
    """A forwarded core line keeps the core's message as its event; the core's target
    (Rust module) and structured fields become `core_target` and `core_fields`, the
    fields' values as text with task tokens scrubbed (the core logs tokens as fields named
    task_token, which are dropped whole)."""

    def filter(self, record: logging.LogRecord) -> bool:
        entry = vars(record).pop("temporal_log", None)
        if entry is None:
            return True
        record.core_target = entry.target
        try:
            fields = entry.fields
        except Exception:  # the SDK documents this conversion as fallible
            fields = {}
        record.core_fields = {
            str(key): REDACTED if "token" in str(key).lower() else _redact_arg(value)
            for key, value in fields.items()}
        return True


class CoreRetryChatter(logging.Filter):
    """While the server is away the SDK core warns about every retried call ("gRPC call
    poll_activity_task_queue retried 12 times", "Network error while sending worker
    heartbeat"): about two lines a second from the pollers alone. startup/reachability.py reports
    the outage itself; of these, one per `interval` passes, carrying how many were
    dropped before it (`similar_dropped`)."""

    def __init__(self, interval: timedelta) -> None:
        super().__init__()
        self.interval = interval.total_seconds()
        self.passed_at: float | None = None
        self.dropped = 0

    @staticmethod
    def is_chatter(record: logging.LogRecord) -> bool:
        entry = getattr(record, "temporal_log", None)
        target = getattr(entry, "target", "") or ""
        return target.startswith(CORE_RETRY_TARGETS)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.is_chatter(record):
            return True
        now = time.monotonic()
        if self.passed_at is not None and now - self.passed_at < self.interval:
            self.dropped += 1
            return False
        record.similar_dropped = self.dropped
        self.passed_at, self.dropped = now, 0
        return True


def core_logging() -> LoggingConfig:
    """The runtime's logging: core lines forwarded to CORE_LOGGER, message and fields kept
    apart (CoreLogFields turns them into JSON fields)."""
    return LoggingConfig(filter=CORE_LOG_FILTER, forwarding=LogForwardingConfig(
        logger=logging.getLogger(CORE_LOGGER), append_target_to_name=False,
        prepend_target_on_message=False, append_log_fields_to_message=False))


# While LOG_FILE cannot be written (a full or read-only disk), one WARNING per this many
# seconds says so on the other handlers (stdout), with the number of records lost.
LOG_FILE_WARNING_SECONDS = 60.0


class PrivateFileHandler(logging.FileHandler):
    """LOG_FILE, created 0600 (and tightened to 0600 if it exists) whatever the umask:
    the log names workflows, builds and paths that are nobody else's business.

    A write that fails (ENOSPC, EROFS, ...) never reaches the code that logged: the
    record is dropped, the file is reopened for the next one, a WARNING goes to the other
    handlers at most every LOG_FILE_WARNING_SECONDS, and once the file takes lines again
    it gets one saying how many were lost. A line the disk cut short is ended first, so
    every complete line stays one JSON document."""

    def __init__(self, filename: Path) -> None:
        self._dropped = 0
        self._warned_at = -LOG_FILE_WARNING_SECONDS
        self._warning = False
        # Opened by the first record, where a failure is handled like any other: a
        # LOG_FILE on a full or read-only disk does not stop the worker from starting.
        super().__init__(filename, delay=True)

    def _open(self) -> io.TextIOWrapper:
        flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:  # readable too, to look at the last byte
            fd = os.open(self.baseFilename, os.O_RDWR | flags, 0o600)
        except PermissionError:
            fd = os.open(self.baseFilename, os.O_WRONLY | flags, 0o600)
        # Not ours to change when another account created the file for us.
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o600)
        with contextlib.suppress(OSError):
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        if self._warning:
            return  # the warning about this file, for the other handlers only
        try:
            if self.stream is None:
                self.stream = self._open()
        except OSError:
            self.handleError(record)
            return
        logging.StreamHandler.emit(self, record)
        if self._dropped and self.stream is not None:
            dropped, self._dropped = self._dropped, 0
            logging.getLogger(__name__).warning("log_file_written_again", extra={
                "log_file": self.baseFilename, "dropped_records": dropped})

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            super().handleError(record)
            return
        self._dropped += 1
        stream, self.stream = self.stream, None
        if stream is not None:  # its buffer holds the failed line: dropped with it
            with contextlib.suppress(OSError, ValueError):
                stream.close()
        now = time.monotonic()
        if now - self._warned_at < LOG_FILE_WARNING_SECONDS:
            return
        self._warned_at = now
        code = errno.errorcode.get(err.errno or 0, str(err.errno))
        self._warning = True
        try:
            logging.getLogger(__name__).warning("log_file_not_written", extra={
                "log_file": self.baseFilename,
                "error": f"{os.path.dirname(self.baseFilename)}: {err.strerror} ({code})",
                "dropped_records": self._dropped})
        finally:
            self._warning = False


def _private_parents(folder: Path) -> None:
    """Create the missing folders on the way to LOG_FILE as 0700 (not the umask's mode);
    existing ones are left as they are."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, worker_id, workflow_id, activity,
    build_name, plus any extra fields."""

    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self.worker_id = worker_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "event": record.getMessage(),
            "logger": record.name,
            "worker_id": self.worker_id,
            "workflow_id": None,
            "activity": None,
            "build_name": None,
        }
        temporal = getattr(record, "temporal_activity", None) or getattr(
            record, "temporal_workflow", None)
        if isinstance(temporal, dict):
            entry["workflow_id"] = temporal.get("workflow_id")
            entry["activity"] = temporal.get("activity_type")
        for key, value in vars(record).items():
            if key in _RECORD_KEYS or key.startswith("temporal_"):
                continue
            if value is None and key in CONTEXT_KEYS and entry.get(key) is not None:
                continue  # the SDK's context wins over an unset filter default
            entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_file: Path | None, worker_id: str) -> None:
    """JSON lines to stdout and, when LOG_FILE is set, to that file (0600) as well; task
    tokens scrubbed from every record, Python warnings and the SDK core's lines included."""
    formatter = JsonFormatter(worker_id)
    core = CoreLogFields()
    context = ContextFilter()
    redaction = RedactTokens()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        with contextlib.suppress(OSError):  # reported by the handler, on its first record
            _private_parents(log_file.parent)
        handlers.append(PrivateFileHandler(log_file))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(core)
        handler.addFilter(context)
        handler.addFilter(redaction)
        root.addHandler(handler)
    root.setLevel(level)
    core_logger = logging.getLogger(CORE_LOGGER)
    for old in [f for f in core_logger.filters if isinstance(f, CoreRetryChatter)]:
        core_logger.removeFilter(old)
    core_logger.addFilter(CoreRetryChatter(OUTAGE_REPORT_INTERVAL))
    # watchfiles reports every batch of changes at INFO ("2 changes detected"): noise.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    # The SDK warns "Cannot find activity to cancel for token b'...'" through the
    # warnings module, which would print to stderr past every handler filter.
    logging.captureWarnings(True)
    # httpx logs every request at INFO; the Matrix listener's long poll alone would add a
    # line every 25 s. Failures are logged by our own code, with the step that failed.
    logging.getLogger("httpx").setLevel(logging.NOTSET if level == "DEBUG" else logging.WARNING)
    # The JSON fields carry the SDK's context; appending it to the event text too would
    # make `event` differ per workflow and defeat grouping by event.
    activity.logger.activity_info_on_message = False
    workflow.logger.workflow_info_on_message = False


def count(name: str, value: int = 1, **attributes: str) -> None:
    """Add to one of our counters from inside an activity (tagged by the SDK with
    namespace, task queue and activity type). Outside an activity it does nothing."""
    if value <= 0 or not activity.in_activity():
        return
    try:
        meter = activity.metric_meter()
    except RuntimeError:
        return
    counter = meter.create_counter(name, _COUNTER_HELP.get(name))
    counter.add(value, dict(attributes) or None)


def observe(name: str, seconds: float, **attributes: str) -> None:
    """Record a duration in one of our histograms from inside an activity; elsewhere
    nothing (a workflow records nothing: a replay would record it again)."""
    if seconds < 0 or not activity.in_activity():
        return
    try:
        meter = activity.metric_meter()
    except RuntimeError:
        return
    histogram = meter.create_histogram_float(name, _HISTOGRAM_HELP.get(name))
    histogram.record(seconds, dict(attributes) or None)


def _buckets() -> dict[str, list[float]]:
    return {name: list(DURATION_BUCKETS) for name in _HISTOGRAM_HELP}


@dataclass
class Telemetry:
    """What the worker hands to Client.connect: a runtime (core log forwarding, and
    metrics when configured) and interceptors (traces; empty unless configured)."""

    runtime: Runtime | None = None
    interceptors: Sequence[Interceptor] = ()
    _closers: list[Callable[[], object]] = field(default_factory=list)

    def shutdown(self) -> None:
        """Flush spans still buffered (called once the worker has stopped)."""
        for close in self._closers:
            close()
        self._closers.clear()


def metrics_config(config: WorkerConfig) -> PrometheusConfig | OpenTelemetryConfig | None:
    if config.prometheus_bind_address:
        return PrometheusConfig(bind_address=config.prometheus_bind_address,
                                counters_total_suffix=True, durations_as_seconds=True,
                                histogram_bucket_overrides=_buckets())
    if config.otel_endpoint:
        return OpenTelemetryConfig(url=config.otel_endpoint, metric_periodicity=OTLP_METRIC_PERIOD,
                                   durations_as_seconds=True,
                                   histogram_bucket_overrides=_buckets())
    return None


def setup_telemetry(config: WorkerConfig, *, span_exporter: Any = None) -> Telemetry:
    """Build the runtime (always: it forwards the core's log lines) and the interceptors
    the settings ask for.

    `span_exporter` replaces the OTLP span exporter (tests use the SDK's in-memory one)
    and turns tracing on by itself. Raises RuntimeError naming the variable if the
    metrics exporter cannot start (e.g. the Prometheus address is in use).
    """
    telemetry = Telemetry()
    metrics = metrics_config(config)
    try:
        telemetry.runtime = Runtime(telemetry=TelemetryConfig(
            logging=core_logging(), metrics=metrics,
            global_tags={"service_name": config.otel_service_name}))
    except ValueError as err:  # the runtime reports a busy port this way
        if metrics is None:
            raise
        where = ("PROMETHEUS_BIND_ADDRESS" if config.prometheus_bind_address
                 else "OTEL_EXPORTER_OTLP_ENDPOINT")
        raise RuntimeError(f"{where}: {err}") from None
    if config.otel_endpoint or span_exporter is not None:
        interceptor, close = _tracing(config, span_exporter)
        telemetry.interceptors = (interceptor,)
        telemetry._closers.append(close)
    return telemetry


def _tracing(config: WorkerConfig, span_exporter: Any) -> tuple[Interceptor, Callable[[], None]]:
    # Imported here so a worker without OTEL_EXPORTER_OTLP_ENDPOINT never loads them.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from telemetry.tracing import BuildTracingInterceptor, WorkflowRootIds

    # A provider of our own rather than the global one: setting the global provider is
    # once per process, and nothing else in the worker traces.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: config.otel_service_name}),
                              id_generator=WorkflowRootIds())
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = str(config.otel_endpoint)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=endpoint, insecure=endpoint.startswith("http://"))))
    # Pipelines are mostly started by operators' tools that do not trace; without this
    # their workflows would produce no spans at all.
    interceptor = BuildTracingInterceptor(provider.get_tracer("temporal-build-worker"),
                                          always_create_workflow_spans=True)
    return interceptor, provider.shutdown
