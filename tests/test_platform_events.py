"""The platform's event log (agent-bus, task-queue/PROTOCOL.md §7): the worker's events
chain onto another writer's, in the platform's record shape, and a log that cannot be
written never holds up or fails a stage."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.testing import ActivityEnvironment

from activities import platform_events
from config import load_config
from models import BuildPipelineInput, BuildPipelineResult, SummaryInput
from standins.agents import REPO, StandIn, poll, tasks_for, write_origin_task
from telemetry import event_log
from tests.conftest import make_env
from tests.test_observability import samples, value
from tests.worker_process import WorkerProcess
from tools.devserver import free_port
from vocabulary import (
    APPLY_FLAG_FIXES,
    BUILD_PIPELINE_WORKFLOW,
    BUS_EVENT_TYPES,
    CLOSE_BUILD,
    IMPLEMENT_BUILD,
    PREFAB_SCAFFOLDING,
    REQUEST_SECURITY_AUDIT,
)

# PROTOCOL.md §7, [BUS3]: the declared cross-agent event types.
DECLARED = frozenset((
    "task.dispatched", "task.approved", "task.completed", "task.failed", "task.routing-failed",
    "handoff.created", "handoff.picked-up", "handoff.completed", "audit.requested",
    "audit.completed", "build-plan.created", "diagnose.started", "diagnose.completed",
    "artifact.untracked", "preflight.started", "preflight.completed", "build.started",
    "build.completed", "deploy.started", "deploy.completed", "security.finding"))
RECORD_KEYS = ["id", "ts", "event", "scope", "source", "target", "artifact_path", "summary",
               "hostname", "metadata"]
WORKER_SOURCE = "temporal-worker"


def verify_chain(path: Path) -> list[dict[str, Any]]:
    """The platform's chain check: every line is one JSON object; the first has no
    prev_hash, every other's is the SHA-256 of the raw line before it. The records."""
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    records = []
    for number, line in enumerate(lines):
        record = json.loads(line)
        if number == 0:
            assert "prev_hash" not in record, "the file's first line has a prev_hash"
        else:
            assert record.get("prev_hash") == hashlib.sha256(lines[number - 1]).hexdigest(), (
                f"chain broken at line {number + 1} of {len(lines)}")
        records.append(record)
    return records


def assert_platform_record(record: dict[str, Any]) -> None:
    """The record fields of §7, in order, with their formats."""
    keys = list(record)
    assert keys in (RECORD_KEYS, [*RECORD_KEYS, "prev_hash"]), keys
    assert uuid.UUID(record["id"]).version == 4
    assert record["ts"].endswith("+00:00")
    datetime.fromisoformat(record["ts"])
    assert record["event"] in DECLARED
    assert record["scope"] == "cross-agent"
    assert isinstance(record["metadata"], dict)
    assert record["hostname"] == os.uname().nodename


@contextlib.contextmanager
def other_writer(log: Path, rng: random.Random) -> Iterator[subprocess.Popen[str]]:
    """tests/bus_writer.py appending to `log` until the block ends; it must exit 0."""
    stop = log.parent.parent / f"stop-{uuid.uuid4().hex[:6]}"
    writer = subprocess.Popen([sys.executable, "-m", "tests.bus_writer", str(log), str(stop),
                               str(rng.randrange(2**32))], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        yield writer
    finally:
        stop.touch()
        out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, err
    assert int(out) > 0


def event_record(number: int) -> dict[str, Any]:
    return event_log.new_record("build.started", WORKER_SOURCE, f"ours {number}",
                                metadata={"n": number})


# ---- the append protocol -------------------------------------------------------------------

def test_a_fresh_log_starts_unchained_and_chains_on(tmp_path: Path) -> None:
    first = event_log.append(tmp_path, [event_record(1)])
    assert first == tmp_path / "logs" / f"{datetime.now(UTC):%Y-%m-%d}-cross-agent.jsonl"
    event_log.append(tmp_path, [event_record(2), event_record(3)])
    records = verify_chain(first)
    assert [r["summary"] for r in records] == ["ours 1", "ours 2", "ours 3"]
    for record in records:
        assert_platform_record(record)


async def test_a_second_writer_process_keeps_the_chain(tmp_path: Path,
                                                       rng: random.Random) -> None:
    log = event_log.log_path(tmp_path)
    with other_writer(log, rng):
        await poll(lambda: log.exists() and log.stat().st_size > 0, what="the other writer")
        for number in range(1, 101):
            event_log.append(tmp_path, [event_record(number)])
    records = verify_chain(log)
    sources = [r["source"] for r in records]
    ours = [at for at, source in enumerate(sources) if source == WORKER_SOURCE]
    assert len(ours) == 100
    # The other writer appended between our first and our last line: they did contend.
    assert "bus-writer" in sources[ours[0]:ours[-1]]


# ---- a log that cannot be written ------------------------------------------------------------

@dataclass
class Meter:
    runtime: Runtime
    url: str

    def failures(self) -> float:
        return value(samples(httpx.get(self.url, timeout=5).text),
                     "build_platform_event_failures_total", event="build.completed")


@pytest.fixture(scope="module")
def meter() -> Meter:
    """A real runtime serving its metrics for Prometheus, for activities run in a test."""
    address = f"127.0.0.1:{free_port()}"
    runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(
        bind_address=address, counters_total_suffix=True)))
    return Meter(runtime=runtime, url=f"http://{address}/metrics")


def unwritable(comms: Path) -> None:
    (comms / "logs").write_text("a file where the logs folder belongs\n")


def fifo(comms: Path) -> None:
    event_log.log_path(comms).parent.mkdir(parents=True)
    os.mkfifo(event_log.log_path(comms))


def linked_folder(comms: Path) -> None:
    """An agent's link in place of logs/, to a folder of its choosing."""
    (comms / "elsewhere").mkdir()
    (comms / "logs").symlink_to(comms / "elsewhere")


MAKE_FAULT = {"unwritable": unwritable, "fifo": fifo, "linked_folder": linked_folder}


@contextlib.contextmanager
def lock_held(comms: Path) -> Iterator[None]:
    """Another writer holds the log's lock for as long as the test runs."""
    path = event_log.log_path(comms)
    path.parent.mkdir(parents=True)
    with open(path, "ab") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def summary_input() -> SummaryInput:
    now = datetime.now(UTC)
    return SummaryInput(workflow_id="wf", run_id="run", build_name="web", target_agent="dev",
                        plan_path="/p.md", task_id="t", outcome="success",
                        stages_completed=[], started_at=now, ended_at=now)


@pytest.mark.parametrize("fault", ["unwritable", "fifo", "linked_folder", "lock_held"])
async def test_a_log_that_cannot_be_written_is_a_warning_and_a_count(
        tmp_path: Path, meter: Meter, fault: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config({}).agent_bus_comms_dir is None  # off unless set
    comms = tmp_path / "comms"
    comms.mkdir()
    config = load_config({"AGENT_BUS_COMMS_DIR": str(comms)})
    monkeypatch.setattr(event_log, "LOCK_WAIT_SECONDS", 0.3)
    env = ActivityEnvironment()
    env.metric_meter = meter.runtime.metric_meter
    before = meter.failures()
    with lock_held(comms) if fault == "lock_held" else contextlib.nullcontext():
        if fault != "lock_held":
            MAKE_FAULT[fault](comms)
        started = asyncio.get_running_loop().time()
        await env.run(platform_events.build_completed, config, summary_input(),
                      tmp_path / "summary.yml")
        assert asyncio.get_running_loop().time() - started < 3
    warnings = [r for r in caplog.records if r.getMessage() == "platform_event_not_written"]
    assert [r.levelname for r in warnings] == ["WARNING"]
    assert meter.failures() == before + 1
    if fault == "lock_held":
        assert event_log.log_path(comms).read_bytes() == b""
    if fault == "linked_folder":
        assert list((comms / "elsewhere").iterdir()) == []


# ---- a real pipeline ---------------------------------------------------------------------

EXPECTED = [("build.started", None), ("handoff.created", PREFAB_SCAFFOLDING),
            ("handoff.created", IMPLEMENT_BUILD), ("audit.requested", REQUEST_SECURITY_AUDIT),
            ("audit.completed", None), ("security.finding", "block"),
            ("security.finding", "flag"), ("handoff.created", APPLY_FLAG_FIXES),
            ("handoff.completed", None), ("handoff.created", CLOSE_BUILD),
            ("build.completed", None)]


@pytest.mark.slow
async def test_a_pipeline_with_a_flag_and_a_block_tells_the_platform(
        temporal_address: str, client: Client, tmp_path: Path, rng: random.Random) -> None:
    comms = tmp_path / "comms"
    env = make_env(tmp_path, temporal_address, AGENT_BUS_COMMS_DIR=str(comms))
    log = event_log.log_path(comms)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        await asyncio.to_thread(worker.wait_ready, 60)
        with other_writer(log, rng):
            build = f"bus-{uuid.uuid4().hex[:6]}"
            origin = write_origin_task(Path(env["TASK_QUEUE_DIR"]), build)
            handle = await client.start_workflow(
                BUILD_PIPELINE_WORKFLOW, BuildPipelineInput(
                    build_name=build, plan_path="/plans/bus.md", task_id=origin,
                    target_agent="builder"),
                id=f"bus-{uuid.uuid4().hex[:8]}", task_queue=env["TASK_QUEUE"],
                result_type=BuildPipelineResult)
            await StandIn(queue_dir=Path(env["TASK_QUEUE_DIR"]),
                          audit_dir=Path(env["TEMPORAL_AUDIT_DIR"]), env=env,
                          work_dir=tmp_path / "work", workflow_id=handle.id,
                          approve_origins=True).run(timeout=90)
            result = await asyncio.wait_for(handle.result(), 60)
            await poll(lambda: any('"build.completed"' in line for line in
                                   log.read_text().splitlines()), what="build.completed")
    finally:
        worker.stop()
    assert result.outcome == "partial"

    records = verify_chain(log)
    ours = [r for r in records if r["source"] == WORKER_SOURCE]
    assert len(ours) < len(records)  # the other writer's lines are in the same chain
    assert {r["event"] for r in ours} <= set(BUS_EVENT_TYPES) <= DECLARED
    found = [(r["event"], r["metadata"].get("severity") or (
        r["metadata"]["stage"] if r["event"] in ("handoff.created", "audit.requested")
        else None)) for r in ours]
    assert found == EXPECTED
    for record in ours:
        assert_platform_record(record)
        assert record["metadata"]["workflow_id"] == handle.id
        assert record["metadata"]["build_name"] == build
        assert len(record["summary"]) <= platform_events.SUMMARY_CHARS
    decision = ours[8]["metadata"]
    assert (decision["decision"], decision["decision_source"], decision["claimed_by"]) == (
        "approved", "task_file", "ted")
    assert ours[-1]["metadata"]["outcome"] == "partial"

    text = log.read_text()
    tasks = [task for _, task in tasks_for(Path(env["TASK_QUEUE_DIR"]), handle.id)]
    assert len(tasks) == 5
    for task in tasks:
        payload = task["payload"]
        if payload.get("task_token"):
            assert payload["task_token"] not in text
        for line in payload["instruction"].splitlines():
            assert line.strip() not in text or len(line.strip()) < 20, line
    assert "complete_activity.py" not in text
    for finding in ("Demo block", "Pin the base image"):  # the stand-in's finding texts
        assert finding not in text
