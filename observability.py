"""Logging (JSON lines), the service's own counters, and opt-in telemetry.

Nothing is configured at import time, and OpenTelemetry is imported only when
OTEL_EXPORTER_OTLP_ENDPOINT is set (or a test hands in a span exporter): a worker
without telemetry never loads it.

Metrics all go through the Temporal runtime's meter, so the SDK's worker metrics and
ours leave by the same road: OTLP (OTEL_EXPORTER_OTLP_ENDPOINT) or a Prometheus
scrape endpoint (PROMETHEUS_BIND_ADDRESS; it wins when both are set, because the
runtime exports metrics one way only — traces still go over OTLP).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from temporalio import activity, workflow
from temporalio.runtime import (
    OpenTelemetryConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
)

if TYPE_CHECKING:
    from temporalio.client import Interceptor

    from config import WorkerConfig

# Keys of LogRecord itself; anything else passed via `extra=` is ours to print.
_RECORD_KEYS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
CONTEXT_KEYS = ("worker_id", "workflow_id", "activity", "build_name")

# Set by activities that know their build, so every line they log (including from the
# modules they call) carries it without threading it through every signature.
_build_name: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "build_name", default=None)

# Counters of our own (names as exported; Prometheus may add a _total suffix).
TASKS_DISPATCHED = "build_tasks_dispatched"
PIPELINES_COMPLETED = "build_pipelines_completed"
BLOCKS_NOTIFIED = "build_blocks_notified"
NOTIFICATIONS_SENT = "build_notifications_sent"
NOTIFICATION_FAILURES = "build_notification_failures"
_COUNTER_HELP = {
    TASKS_DISPATCHED: "Agent task files written, by stage",
    PIPELINES_COMPLETED: "Build pipelines that wrote their summary, by outcome",
    BLOCKS_NOTIFIED: "Security blocks announced to operators",
    NOTIFICATIONS_SENT: "Block notifications delivered, by channel",
    NOTIFICATION_FAILURES: "Block notifications that failed after retries, by channel",
}

# How often the runtime pushes metrics over OTLP.
OTLP_METRIC_PERIOD = timedelta(seconds=10)


def bind_build_name(build_name: str) -> None:
    """Tag every log line of the current activity (task) with `build_name`."""
    _build_name.set(build_name)


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
            record.build_name = _build_name.get()
        return True


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
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_file: Path | None, worker_id: str) -> None:
    """JSON lines to stdout and, when LOG_FILE is set, to that file as well."""
    formatter = JsonFormatter(worker_id)
    context = ContextFilter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(context)
        root.addHandler(handler)
    root.setLevel(level)
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


@dataclass
class Telemetry:
    """What the worker hands to Client.connect: a runtime (metrics) and interceptors
    (traces). Both empty when nothing is configured."""

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
                                counters_total_suffix=True, durations_as_seconds=True)
    if config.otel_endpoint:
        return OpenTelemetryConfig(url=config.otel_endpoint, metric_periodicity=OTLP_METRIC_PERIOD,
                                   durations_as_seconds=True)
    return None


def setup_telemetry(config: WorkerConfig, *, span_exporter: Any = None) -> Telemetry:
    """Build the runtime and interceptors the settings ask for.

    `span_exporter` replaces the OTLP span exporter (tests use the SDK's in-memory one)
    and turns tracing on by itself. Raises RuntimeError naming the variable if the
    metrics exporter cannot start (e.g. the Prometheus address is in use).
    """
    telemetry = Telemetry()
    metrics = metrics_config(config)
    if metrics is not None:
        try:
            telemetry.runtime = Runtime(telemetry=TelemetryConfig(
                metrics=metrics, global_tags={"service_name": config.otel_service_name}))
        except ValueError as err:  # the runtime reports a busy port this way
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
    from temporalio.contrib.opentelemetry import TracingInterceptor

    # A provider of our own rather than the global one: setting the global provider is
    # once per process, and nothing else in the worker traces.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: config.otel_service_name}))
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = str(config.otel_endpoint)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=endpoint, insecure=endpoint.startswith("http://"))))
    # Pipelines are mostly started by operators' tools that do not trace; without this
    # their workflows would produce no spans at all.
    interceptor = TracingInterceptor(provider.get_tracer("temporal-build-worker"),
                                     always_create_workflow_spans=True)
    return interceptor, provider.shutdown
