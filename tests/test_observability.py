"""Logs, traces and metrics from real runs: a pipeline traced into the SDK's in-memory
span exporter, the runtime's Prometheus endpoint scraped over HTTP, the JSON log file
read back, and the worker process itself started with telemetry on and off."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio import activity, workflow
from temporalio.client import Client

from config import load_config
from models import BuildPipelineResult
from observability import CORE_LOGGER, REDACTED, configure_logging, setup_telemetry
from standins.agents import REPO, play_stage, poll
from taskfiles.documents import add_history
from taskfiles.lookup import update_task
from temporal_client import connect
from tests.conftest import PipelineEnv, make_env, serving
from tests.test_notify import BLOCKS, park_pipeline
from tests.worker_process import WorkerProcess
from tools.devserver import free_port
from vocabulary import (
    BUILD_PIPELINE_WORKFLOW,
    CLOSE_BUILD,
    IMPLEMENT_BUILD,
    NOTIFY_BLOCKS,
    PREFAB_SCAFFOLDING,
    REQUEST_SECURITY_AUDIT,
    SPAN_BUILD_NAME,
    SPAN_BUILD_STAGE,
    SUMMARIZE_WORKFLOW,
    TASK_BUILD_CLOSEOUT,
)

BUILD = "traced-build"
WORKER_ID = "test-host:4242"


@contextlib.contextmanager
def worker_logging(level: str, log_file: Path | None) -> Iterator[None]:
    """The worker's logging set up in this process, and the root logger restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging(level, log_file, WORKER_ID)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


@dataclass
class TracedRun:
    workflow_id: str
    task_queue: str
    result: BuildPipelineResult
    spans: tuple[ReadableSpan, ...]
    metrics_url: str
    log_lines: list[dict[str, Any]]
    runtime: Any  # the metrics endpoint lives as long as its runtime


@pytest.fixture(scope="module")
async def traced_run(temporal_address: str,
                     tmp_path_factory: pytest.TempPathFactory) -> TracedRun:
    """One pipeline with two blocks, approved through its task file, run by a worker whose
    client carries the tracing interceptor and a runtime serving Prometheus metrics."""
    root = tmp_path_factory.mktemp("traced")
    metrics_address = f"127.0.0.1:{free_port()}"
    variables = make_env(root, temporal_address, PROMETHEUS_BIND_ADDRESS=metrics_address,
                         LOG_FILE=str(root / "logs" / "worker.jsonl"))
    config = load_config(variables)
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(config, span_exporter=exporter)
    assert telemetry.runtime is not None
    assert len(telemetry.interceptors) == 1
    client = await connect(config, interceptors=telemetry.interceptors,
                           runtime=telemetry.runtime)
    try:
        with worker_logging(config.log_level, config.log_file):
            async with serving(client, config):
                pipeline = PipelineEnv(config=config, client=client, env=variables, root=root)
                handle, origin = await park_pipeline(pipeline, BUILD, BLOCKS)
                update_task(origin, lambda t: add_history(t, status="approved", actor="ops",
                                                          note="accepted"))
                await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_CLOSEOUT, pipeline.env)
                result = BuildPipelineResult.model_validate(await handle.result())
    finally:
        activity.logger.activity_info_on_message = True
        workflow.logger.workflow_info_on_message = True
    telemetry.shutdown()
    assert config.log_file is not None
    lines = [json.loads(line) for line in config.log_file.read_text().splitlines()]
    return TracedRun(workflow_id=handle.id, task_queue=config.task_queue, result=result,
                     spans=exporter.get_finished_spans(),
                     metrics_url=f"http://{metrics_address}/metrics", log_lines=lines,
                     runtime=telemetry.runtime)


# ---- traces ------------------------------------------------------------------------------

@pytest.mark.slow
def test_workflow_and_activity_spans_share_one_trace(traced_run: TracedRun) -> None:
    assert traced_run.result.outcome == "partial"  # blocks approved
    pipeline_spans = [s for s in traced_run.spans
                      if s.name.split(":")[0] in ("StartWorkflow", "RunWorkflow",
                                                  "StartActivity", "RunActivity")]
    names = {s.name for s in pipeline_spans}
    assert {"StartWorkflow:BuildPipelineWorkflow", "RunWorkflow:BuildPipelineWorkflow",
            "StartActivity:prefab_scaffolding", "RunActivity:prefab_scaffolding",
            "RunActivity:notify_blocks", "RunActivity:close_build",
            "RunActivity:summarize_workflow"} <= names
    assert len({s.context.trace_id for s in pipeline_spans}) == 1
    run = next(s for s in pipeline_spans if s.name == "RunActivity:notify_blocks")
    assert run.attributes is not None
    assert run.attributes["temporalWorkflowID"] == traced_run.workflow_id
    assert run.attributes[SPAN_BUILD_NAME] == BUILD
    assert run.attributes[SPAN_BUILD_STAGE] == NOTIFY_BLOCKS
    top = next(s for s in pipeline_spans if s.name == "RunWorkflow:BuildPipelineWorkflow")
    assert top.attributes is not None
    assert top.attributes[SPAN_BUILD_NAME] == BUILD
    assert run.resource.attributes["service.name"] == "temporal-build-worker"


# ---- metrics -----------------------------------------------------------------------------

SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format → (name, labels, value)."""
    found = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(LABEL.findall(match["labels"] or ""))
            found.append((match["name"], labels, float(match["value"])))
    return found


def value(all_samples: list[tuple[str, dict[str, str], float]], name: str,
          **labels: str) -> float:
    return sum(v for n, lab, v in all_samples
               if n == name and all(lab.get(k) == want for k, want in labels.items()))


@pytest.mark.slow
async def test_prometheus_shows_sdk_and_own_metrics(traced_run: TracedRun) -> None:
    def scrape() -> list[tuple[str, dict[str, str], float]] | None:
        found = samples(httpx.get(traced_run.metrics_url, timeout=5).text)
        return found if value(found, "build_pipelines_completed_total") else None

    found = await poll(scrape, timeout=30, interval=0.5, what="our counters on /metrics")
    queue = {"task_queue": traced_run.task_queue}
    for stage in (PREFAB_SCAFFOLDING, IMPLEMENT_BUILD, REQUEST_SECURITY_AUDIT,
                  CLOSE_BUILD):
        assert value(found, "build_tasks_dispatched_total", stage=stage, **queue) == 1, stage
    assert value(found, "build_tasks_dispatched_total", **queue) == 4
    assert value(found, "build_blocks_notified_total", **queue) == len(BLOCKS)
    assert value(found, "build_notification_failures_total", channel="none", **queue) == 1
    assert value(found, "build_pipelines_completed_total", outcome="partial", **queue) == 1
    # The SDK's own worker metrics come out of the same endpoint.
    assert value(found, "temporal_workflow_completed_total",
                 workflow_type=BUILD_PIPELINE_WORKFLOW, **queue) >= 1
    assert value(found, "temporal_activity_execution_latency_count",
                 activity_type=NOTIFY_BLOCKS, **queue) >= 1
    # Stages 4 and 9 are local activities: their own series.
    assert value(found, "temporal_local_activity_execution_latency_count",
                 activity_type=SUMMARIZE_WORKFLOW, **queue) >= 1
    assert any(n == "temporal_worker_task_slots_available" for n, _, _ in found)
    assert all(lab.get("service_name") == "temporal-build-worker"
               for n, lab, _ in found if n.startswith("build_"))


# ---- logs --------------------------------------------------------------------------------

@pytest.mark.slow
def test_json_log_lines_carry_context(traced_run: TracedRun) -> None:
    lines = traced_run.log_lines
    assert lines
    assert all({"ts", "level", "event", "worker_id", "workflow_id", "activity",
                          "build_name"} <= set(line) for line in lines)
    assert all(line["worker_id"] == WORKER_ID for line in lines)
    mine = [line for line in lines if line["workflow_id"] == traced_run.workflow_id]
    dispatched = {line["activity"] for line in mine if line["event"] == "task_dispatched"}
    assert dispatched == {PREFAB_SCAFFOLDING, IMPLEMENT_BUILD, REQUEST_SECURITY_AUDIT,
                          CLOSE_BUILD}
    # activities.notify logs without passing any context: the filter supplies all of it.
    failed = [line for line in mine if line["event"] == "notification_failed"]
    assert failed, "no notification_failed line for the pipeline"
    assert all(line["activity"] == NOTIFY_BLOCKS and line["build_name"] == BUILD
               and line["logger"] == "activities.notify" for line in failed)
    assert any(line["event"] == "summary_written" and line["activity"] == SUMMARIZE_WORKFLOW
               for line in mine)
    # The SDK's context travels in fields, not glued onto the event text.
    assert not any("'workflow_id'" in line["event"] for line in lines)


# ---- the worker process ------------------------------------------------------------------

PROBE = """
import json, sys
import worker, observability
from config import load_config
telemetry = observability.setup_telemetry(load_config())
print(json.dumps({"otel": sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"),
                  "runtime": telemetry.runtime is not None,
                  "interceptors": len(telemetry.interceptors)}))
"""


def probe(**env: str) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("OTEL_", "PROMETHEUS_", "TEMPORAL_"))}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_opentelemetry_not_imported_unless_configured() -> None:
    # The runtime is always there: it forwards the SDK core's log lines.
    assert probe() == {"otel": [], "runtime": True, "interceptors": 0}
    enabled = probe(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert "opentelemetry.sdk.trace" in enabled["otel"]
    assert enabled["runtime"]
    assert enabled["interceptors"] == 1


@pytest.fixture
def worker_process(temporal_address: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str],
                                                                          str, str]]:
    address = f"127.0.0.1:{free_port()}"
    env = make_env(tmp_path, temporal_address, PROMETHEUS_BIND_ADDRESS=address)
    env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
    process = subprocess.Popen([sys.executable, "worker.py"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield process, address, env["TASK_QUEUE"]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.slow
async def test_worker_process_serves_prometheus(
        worker_process: tuple[subprocess.Popen[str], str, str]) -> None:
    process, address, task_queue = worker_process

    def slots() -> list[tuple[str, dict[str, str], float]] | None:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            found = samples(httpx.get(f"http://{address}/metrics", timeout=2).text)
        except httpx.HTTPError:
            return None
        return [s for s in found if s[0] == "temporal_worker_task_slots_available"
                and s[1].get("task_queue") == task_queue] or None

    found = await poll(slots, timeout=60, interval=0.5, what="worker metrics on /metrics")
    assert {labels["worker_type"] for _, labels, _ in found} >= {"ActivityWorker",
                                                                 "WorkflowWorker"}
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0
    # A normal run prints JSON lines only, on stdout, and nothing on stderr.
    assert err == ""
    records = json_lines(out)
    started = [r for r in records if r["event"] == "worker_starting"]
    assert started
    assert started[0]["settings"]["PROMETHEUS_BIND_ADDRESS"] == address
    assert any(r["event"] == "worker_stopped" for r in records)


def test_core_fields_never_carry_a_token(tmp_path: Path) -> None:
    """The core logs task tokens as fields (`task_token`, or inside a debug dump): what
    reaches the log has neither, the rest of the line intact."""
    token = b"\x0a\x24secret-task-token-bytes"

    # The SDK's BufferedLogEntry, as the forwarding hands it over.
    entry = SimpleNamespace(target="temporalio_sdk_core::worker::activities", fields={
        "task_token": token.hex(), "details": f"NotFound {{ token: {token!r} }}",
        "attempt": 2})

    log_file = tmp_path / "core.jsonl"
    with worker_logging("INFO", log_file):
        logging.getLogger(CORE_LOGGER).warning("Activity not found on completion",
                                               extra={"temporal_log": entry})
    text = log_file.read_text()
    [line] = [json.loads(raw) for raw in text.splitlines()]
    assert line["event"] == "Activity not found on completion"
    assert line["core_target"] == entry.target
    assert line["core_fields"]["attempt"] == 2
    assert line["core_fields"]["task_token"] == REDACTED
    assert line["core_fields"]["details"].startswith("NotFound")
    assert token.hex() not in text
    assert "secret-task-token" not in text


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as a JSON log record; fails naming the first line that is not."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(record, dict), line
        assert {"ts", "level", "event", "logger", "worker_id"} <= set(record), line
        records.append(record)
    return records


@pytest.mark.slow
async def test_sdk_core_warning_is_a_json_line(temporal_address: str, tmp_path: Path,
                                              client: Client) -> None:
    """The core (Rust) warns "Failing workflow task" when the worker cannot run a task:
    here a workflow type it does not have. The line reaches the worker's output as JSON
    with the core's message as event and its fields (run id, failure) as fields."""
    env = make_env(tmp_path, temporal_address)
    worker = WorkerProcess(env, tmp_path / "worker.out").start()
    try:
        worker.wait_ready()
        handle = await client.start_workflow("NoSuchWorkflow", id=f"unknown-{uuid.uuid4()}",
                                             task_queue=env["TASK_QUEUE"])
        try:
            def core_warning() -> dict[str, Any] | None:
                return next((r for r in worker.log_records()
                             if r.get("logger") == CORE_LOGGER), None)

            line = await poll(core_warning, timeout=60, interval=0.2,
                              what="the core's warning in the worker's output")
        finally:
            await handle.terminate("test over")
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    finally:
        worker.stop()
    assert line["level"] == "WARNING"
    assert line["event"] == "Failing workflow task"
    assert line["core_target"].startswith("temporalio_sdk_core")
    assert line["core_fields"]["run_id"] == handle.result_run_id
    assert "NoSuchWorkflow" in line["core_fields"]["failure"]
    assert line["worker_id"].endswith(f":{worker.pid}")
    # Nothing the worker printed, on stdout or stderr, is anything but a JSON line.
    records = json_lines(worker.log_path.read_text())
    assert any(r["event"] == "worker_stopped" for r in records)


@pytest.mark.slow
def test_prometheus_address_errors_exit_2(temporal_address: str, tmp_path: Path) -> None:
    env = make_env(tmp_path, temporal_address, PROMETHEUS_BIND_ADDRESS="no-port")
    done = subprocess.run([sys.executable, "worker.py"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "PROMETHEUS_BIND_ADDRESS: must be host:port" in done.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env["PROMETHEUS_BIND_ADDRESS"] = f"127.0.0.1:{busy.getsockname()[1]}"
        done = subprocess.run([sys.executable, "worker.py"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "PROMETHEUS_BIND_ADDRESS" in line
    assert "in use" in line
