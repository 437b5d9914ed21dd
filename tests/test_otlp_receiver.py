"""Traces over the wire to a real OTLP receiver: Arize Phoenix (PyPI `arize-phoenix`), run
as its own server on loopback ports with a private working folder, stores the spans it
receives and answers queries about them over its REST API.

The worker runs as its own process (python worker.py) with OTEL_EXPORTER_OTLP_ENDPOINT
set to the receiver's gRPC endpoint, a pipeline with a flag and a block (approved) runs
through every stage, and the receiver is then asked for that build's spans: the workflow
span and each stage's StartActivity / RunActivity spans are there, in one trace, parented
as the workflow ran them, each with the build name and stage, and no task token or
instruction text in any attribute or event of any span."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from models import BuildPipelineInput, BuildPipelineResult
from standins.agents import StandIn, load_yaml, poll_async, task_files, write_origin_task
from tests.conftest import make_env
from tests.worker_process import WorkerProcess
from tools.devserver import free_port
from vocabulary import (
    BUILD_PIPELINE_WORKFLOW,
    SPAN_BUILD_NAME,
    SPAN_BUILD_STAGE,
    STAGES,
    WAIT_FOR_BLOCK_RESOLUTION,
)

pytestmark = pytest.mark.slow

BUILD = "otlp-traced-build"
# Every stage runs as the activity of its name, except stage 7, which the workflow waits
# out itself (its decision then recorded by an activity of another name).
ACTIVITY_STAGES = [stage for stage in STAGES if stage != WAIT_FOR_BLOCK_RESOLUTION]
WORKFLOW_SPAN = f"RunWorkflow:{BUILD_PIPELINE_WORKFLOW}"
# The receiver imports a great deal before it listens (about 10 s on an idle machine).
RECEIVER_START_SECONDS = 180.0
PROJECT = "default"  # where the receiver files spans that name no project of theirs


@dataclass(frozen=True)
class Receiver:
    api: str  # REST API base
    grpc_endpoint: str  # what OTEL_EXPORTER_OTLP_ENDPOINT gets


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    """Phoenix's server on two free loopback ports, its database in a temp folder, nothing
    fetched from or reported to anywhere else; stopped (then killed) at teardown."""
    http_port, grpc_port = free_port(), free_port()
    work = tmp_path / "phoenix"
    work.mkdir()
    env = {**os.environ, "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(http_port),
           "PHOENIX_GRPC_PORT": str(grpc_port), "PHOENIX_WORKING_DIR": str(work),
           "PHOENIX_TELEMETRY_ENABLED": "false", "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false"}
    api = f"http://127.0.0.1:{http_port}"
    with open(tmp_path / "phoenix.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "phoenix.server.main", "serve"],
                                   cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            async def healthy() -> bool:
                assert process.poll() is None, (
                    f"receiver exited {process.returncode}: {phoenix_tail(tmp_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    return (await http.get(f"{api}/healthz")).status_code == 200
                return False

            await poll_async(healthy, RECEIVER_START_SECONDS, what="the receiver's /healthz",
                             interval=0.25)
        yield Receiver(api=api, grpc_endpoint=f"http://127.0.0.1:{grpc_port}")
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def phoenix_tail(tmp_path: Path) -> str:
    return "\n".join((tmp_path / "phoenix.log").read_text(errors="replace").splitlines()[-15:])


async def stored_spans(api: str) -> list[dict[str, Any]]:
    """Every span the receiver stored, through its REST API, page by page."""
    spans: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 1000}
    async with httpx.AsyncClient(timeout=30.0) as http:
        while True:
            response = await http.get(f"{api}/v1/projects/{PROJECT}/spans", params=params)
            if response.status_code == 404:  # no span has arrived yet: no project either
                return spans
            response.raise_for_status()
            page = response.json()
            spans.extend(page["data"])
            if not page.get("next_cursor"):
                return spans
            params["cursor"] = page["next_cursor"]


def build_trace(spans: list[dict[str, Any]], workflow_id: str) -> list[dict[str, Any]]:
    """The spans of the trace the workflow's own span is in."""
    tops = [s for s in spans if s["name"] == WORKFLOW_SPAN
            and s["attributes"].get("temporalWorkflowID") == workflow_id]
    if len(tops) != 1:
        return []
    trace_id = tops[0]["context"]["trace_id"]
    return [s for s in spans if s["context"]["trace_id"] == trace_id]


def complete(trace: list[dict[str, Any]]) -> bool:
    names = {s["name"] for s in trace}
    return all({f"StartActivity:{stage}", f"RunActivity:{stage}"} <= names
               for stage in ACTIVITY_STAGES)


def secrets_of(queue_dir: Path, tokens: set[str]) -> set[str]:
    """Each token handed to an agent (as written, and as the bytes' hex) and each line of
    every task's instruction that is long enough to say something."""
    secrets = set(tokens) | {base64.b64decode(token).hex() for token in tokens}
    for path in task_files(queue_dir):
        task = load_yaml(path)
        if isinstance(task, dict) and isinstance(task.get("instruction"), str):
            secrets |= {line.strip() for line in task["instruction"].splitlines()
                        if len(line.strip()) >= 20}
    return secrets


def strings(value: Any) -> Iterator[str]:
    """Every text in a span as the receiver returned it: names, attribute keys and values,
    events and their attributes."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


async def test_build_spans_reach_a_real_receiver(receiver: Receiver, temporal_address: str,
                                                 client: Client, tmp_path: Path) -> None:
    env = make_env(tmp_path, temporal_address,
                   OTEL_EXPORTER_OTLP_ENDPOINT=receiver.grpc_endpoint, LOG_LEVEL="INFO")
    queue_dir, audit_dir = Path(env["TASK_QUEUE_DIR"]), Path(env["TEMPORAL_AUDIT_DIR"])
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        await asyncio.to_thread(worker.wait_ready)
        inp = BuildPipelineInput(build_name=BUILD, plan_path="/plans/demo.md",
                                 task_id=write_origin_task(queue_dir, BUILD),
                                 target_agent="builder", block_poll_interval_seconds=0.2)
        handle = await client.start_workflow(BUILD_PIPELINE_WORKFLOW, inp,
                                             id=f"build-{BUILD}-{os.urandom(4).hex()}",
                                             task_queue=env["TASK_QUEUE"],
                                             result_type=BuildPipelineResult)
        agents = StandIn(queue_dir, audit_dir, env, tmp_path / "work", workflow_id=handle.id,
                         approve_origins=True)
        await agents.run(timeout=120)
        result = await handle.result()
        assert result.outcome == "partial", result  # one flag fixed, one block approved
        # The batch exporter sends every few seconds; the receiver has them by then.
        trace = await wait_for_trace(receiver.api, handle.id, worker)
    finally:
        worker.stop()
    tokens = {token for _name, token in agents._handed}
    assert tokens, "no task was handed to an agent"
    check_trace(trace, handle.id, secrets_of(queue_dir, tokens))


async def wait_for_trace(api: str, workflow_id: str, worker: WorkerProcess
                         ) -> list[dict[str, Any]]:
    async def ready() -> list[dict[str, Any]] | None:
        trace = build_trace(await stored_spans(api), workflow_id)
        return trace if complete(trace) else None

    try:
        return await poll_async(ready, 60, what="every stage's spans", interval=0.5)
    except AssertionError:
        spans = await stored_spans(api)
        names = sorted(f"{s['context']['trace_id'][:8]}/{s['context']['span_id'][:6]}"
                       f"<-{(s['parent_id'] or '')[:6]} {s['name']}" for s in spans)
        raise AssertionError(f"the receiver has {len(spans)} spans: {names}\n"
                             f"worker log:\n{worker.tail(30)}") from None


def check_trace(trace: list[dict[str, Any]], workflow_id: str, secrets: set[str]) -> None:
    by_id = {s["context"]["span_id"]: s for s in trace}
    top = next(s for s in trace if s["name"] == WORKFLOW_SPAN)
    # Started by a client that does not trace: the workflow's span is the trace's root.
    assert top["parent_id"] is None
    assert top["attributes"][SPAN_BUILD_NAME] == BUILD
    assert top["attributes"]["temporalWorkflowID"] == workflow_id
    for stage in ACTIVITY_STAGES:
        start = one(trace, f"StartActivity:{stage}")
        run = one(trace, f"RunActivity:{stage}")
        for span in (start, run):
            assert span["attributes"][SPAN_BUILD_NAME] == BUILD, span
            assert span["attributes"][SPAN_BUILD_STAGE] == stage, span
        # The activity's span hangs under the workflow's span that scheduled it, which
        # hangs under the workflow's own.
        assert run["parent_id"] == start["context"]["span_id"], (stage, run, start)
        assert by_id[start["parent_id"]]["name"] == WORKFLOW_SPAN, (stage, start)
    texts = list(strings(trace))
    leaked = sorted(secret[:40] for secret in secrets if any(secret in t for t in texts))
    assert not leaked, f"in the spans: {leaked}"


def one(trace: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The span named `name` (a stage runs once on this path; a retry would show here)."""
    spans = [s for s in trace if s["name"] == name]
    assert len(spans) == 1, (name, spans)
    return spans[0]

