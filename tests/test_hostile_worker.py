"""The real worker process against agents that plant the worst they can (issue 10): at
LOG_LEVEL=DEBUG no task token reaches its log in any form, LOG_FILE is private under
umask 000, and FIFOs, an alias bomb and the like neither stall nor bloat it nor keep
SIGTERM from stopping it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import text_encoding
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError

from models import BuildPhaseResult, BuildPipelineInput, BuildPipelineResult
from standins.agents import (
    load_yaml,
    play_stage,
    poll,
    wait_for_task,
    wait_until_parked,
    write_origin_task,
)
from taskfiles.documents import task_filename, utc_now
from tests.conftest import make_env
from tests.worker_process import WorkerProcess
from vocabulary import (
    APPROVE_BLOCKS_UPDATE,
    AUDIT_REQUESTS_DIR,
    BUILD_PIPELINE_WORKFLOW,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
    TASK_SECURITY_FIX,
)

GRACE_SECONDS = 5
RSS_LIMIT_KB = 300 * 1024


@pytest.fixture
def worker(tmp_path: Path, temporal_address: str) -> Iterator[WorkerProcess]:
    """worker.py at DEBUG with LOG_FILE, started under umask 000."""
    env = make_env(tmp_path, temporal_address, LOG_LEVEL="DEBUG",
                   LOG_FILE=str(tmp_path / "logs" / "worker.jsonl"),
                   WORKER_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS))
    process = WorkerProcess(env, tmp_path / "worker.out")
    previous = os.umask(0)
    try:
        process.start()
    finally:
        os.umask(previous)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def log_file(worker: WorkerProcess) -> Path:
    return Path(worker.env["LOG_FILE"])


def haystack(worker: WorkerProcess) -> str:
    """Everything the worker printed (its stdout/stderr and LOG_FILE), raw and with each
    JSON line's strings decoded, so escaped forms are seen as the SDK printed them."""
    parts = []
    for path in (worker.log_path, log_file(worker)):
        raw = path.read_text(errors="replace")
        parts.append(raw)
        for line in raw.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            parts.extend(str(value) for value in record.values()) if isinstance(
                record, dict) else None
    return "\n".join(parts)


def token_forms(token: bytes) -> dict[str, str]:
    return {
        "base64": base64.b64encode(token).decode(),
        "urlsafe base64": base64.urlsafe_b64encode(token).decode(),
        "python bytes repr": repr(token)[2:-1],
        "protobuf text": text_encoding.CEscape(token, as_utf8=False),
        "protobuf text (utf-8)": text_encoding.CEscape(token, as_utf8=True),
        "hex": token.hex(),
    }


async def namespace_id(client: Client, namespace: str) -> str:
    answer = await client.workflow_service.describe_namespace(
        DescribeNamespaceRequest(namespace=namespace))
    return answer.namespace_info.id


def assert_no_token(text: str, tokens: set[bytes], ns_id: str) -> None:
    """No token of a task file, in any form; and no token of any activity at all: every
    task token begins with the namespace id (field 1), which nothing else logs."""
    assert tokens
    for token in tokens:
        for form, value in token_forms(token).items():
            assert value not in text, f"a task token is in the log ({form})"
    prefix = b"\n" + bytes([len(ns_id)]) + ns_id.encode()
    for form, value in token_forms(prefix).items():
        if form != "hex":
            assert value[:40] not in text, f"an activity token is in the log ({form})"
    assert ns_id not in text, "the namespace id (inside every task token) is in the log"


async def finish(client: Client, path: Path, tokens: set[bytes], output: str = "done") -> None:
    """What complete_activity.py does with a task file's token (the SDK call it makes)."""
    token = base64.b64decode(load_yaml(path)["payload"]["task_token"])
    tokens.add(token)
    await client.get_async_activity_handle(task_token=token).complete(
        BuildPhaseResult(status="success", output=output))


async def start(client: Client, worker: WorkerProcess, build: str, task_id: str,
                **extra: Any) -> WorkflowHandle:
    return await client.start_workflow(
        BUILD_PIPELINE_WORKFLOW,
        BuildPipelineInput(build_name=build, plan_path=f"/plans/{build}.md", task_id=task_id,
                           target_agent="builder", **extra),
        id=f"{build}-{uuid.uuid4().hex[:8]}", task_queue=worker.env["TASK_QUEUE"],
        result_type=BuildPipelineResult)


def triage_path(worker: WorkerProcess, build: str) -> Path:
    folder = Path(worker.env["TEMPORAL_AUDIT_DIR"]) / AUDIT_REQUESTS_DIR / build
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "triage-output.yml"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def assert_private_log(worker: WorkerProcess) -> None:
    path = log_file(worker)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_no_token_in_any_log_at_debug(worker: WorkerProcess, client: Client) -> None:
    """Finding 2: at DEBUG the SDK logged every agent stage's token. One pipeline goes
    through every stage (flags, blocks approved by Update, which cancels the running
    check) with its agent stages finished by the real complete_activity.py."""
    queue = Path(worker.env["TASK_QUEUE_DIR"])
    handle = await start(client, worker, "token-check", write_origin_task(queue),
                         block_poll_interval_seconds=0.2)
    tokens: set[bytes] = set()

    async def stage(task_type: str) -> None:
        path = await play_stage(queue, handle.id, task_type, worker.env)
        tokens.add(base64.b64decode(load_yaml(path)["payload"]["task_token"]))

    await stage(TASK_BUILD_PREFAB)
    await stage(TASK_BUILD_PLAN)
    triage_path(worker, "token-check").write_text(
        "blocks:\n- secrets in the image\nflags:\n- pin the base image\n")
    await stage(TASK_SECURITY_AUDIT)
    await stage(TASK_SECURITY_FIX)
    await wait_until_parked(handle)
    await handle.execute_update(APPROVE_BLOCKS_UPDATE, "risk accepted")
    await stage(TASK_BUILD_CLOSEOUT)
    result = await handle.result()
    assert result.outcome == "partial"
    assert len(tokens) == 5
    assert any("Completing activity with completion" in str(r.get("event"))
               for r in worker.log_records()), "the SDK's DEBUG lines were not logged at all"

    worker.signal(signal.SIGTERM)
    assert worker.wait(GRACE_SECONDS + 10) == 0
    assert_no_token(haystack(worker), tokens,
                    await namespace_id(client, worker.env.get("TEMPORAL_NAMESPACE", "default")))
    assert_private_log(worker)



def alias_bomb(task_id: str) -> str:
    lines = [f"id: {task_id}", "status: submitted",
             'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\npayload: [*a9]\n"


async def test_planted_files_stall_bloat_and_leak_nothing(worker: WorkerProcess,
                                                          client: Client) -> None:
    """The issue's scenario end to end: 8 FIFOs as triage outputs and an alias-bomb
    originating task on a worker at DEBUG; then three new clean pipelines finish within
    10 s, RSS stays at most 300 MB, no token is in the log in any form, and SIGTERM ends
    the worker within its grace plus 10 s."""
    queue = Path(worker.env["TASK_QUEUE_DIR"])
    tokens: set[bytes] = set()
    fifos: list[Path] = []

    async def to_audit(handle: WorkflowHandle) -> Path:
        for task_type in (TASK_BUILD_PREFAB, TASK_BUILD_PLAN):
            await finish(client, await wait_for_task(queue, handle.id, task_type), tokens)
        return await wait_for_task(queue, handle.id, TASK_SECURITY_AUDIT)

    async def fifo_pipeline(index: int) -> WorkflowHandle:
        build = f"fifo-{index}"
        handle = await start(client, worker, build, write_origin_task(queue))
        audit = await to_audit(handle)
        fifo = triage_path(worker, build)
        os.mkfifo(fifo)
        fifos.append(fifo)
        await finish(client, audit, tokens)
        return handle

    async def bomb_pipeline() -> WorkflowHandle:
        task_id = str(uuid.uuid4())
        (queue / task_filename(task_id, utc_now())).write_text(alias_bomb(task_id))
        handle = await start(client, worker, "alias-bomb", task_id,
                             block_poll_interval_seconds=0.2)
        audit = await to_audit(handle)
        triage_path(worker, "alias-bomb").write_text("blocks:\n- needs a decision\n")
        await finish(client, audit, tokens)
        return handle

    async def clean_pipeline(index: int) -> BuildPipelineResult:
        build = f"clean-{index}"
        handle = await start(client, worker, build, write_origin_task(queue))
        audit = await to_audit(handle)
        triage_path(worker, build).write_text("info:\n- nothing to report\n")
        await finish(client, audit, tokens)
        await finish(client, await wait_for_task(queue, handle.id, TASK_BUILD_CLOSEOUT), tokens)
        return await handle.result()

    try:
        fifo_handles = await asyncio.gather(*(fifo_pipeline(i) for i in range(8)))
        bomb = await bomb_pipeline()
        parked = await wait_until_parked(bomb)
        assert any("aliases expanded" in failure
                   for failure in parked.notification_failures), parked.notification_failures

        began = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(*(clean_pipeline(i) for i in range(3))), 60)
        elapsed = time.monotonic() - began
        assert [r.outcome for r in results] == ["success"] * 3
        assert elapsed < 10, f"three clean pipelines took {elapsed:.1f}s"

        for handle in fifo_handles:
            with pytest.raises(WorkflowFailureError) as caught:
                await asyncio.wait_for(handle.result(), 30)
            cause = caught.value.cause
            assert isinstance(cause, ApplicationError)
            assert "a FIFO" in cause.message
        await poll(lambda: any(r.get("event") == "task_file_skipped"
                               and "aliases expanded" in str(r.get("reason"))
                               for r in worker.log_records()), 10,
                   what="the bomb reported as skipped")
        rss = rss_kb(worker.pid)
        assert rss <= RSS_LIMIT_KB, f"worker RSS {rss / 1024:.0f} MB"
        await bomb.terminate("test done")

        stopping = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait(GRACE_SECONDS + 10) == 0
        assert time.monotonic() - stopping <= GRACE_SECONDS + 10
    finally:
        for fifo in fifos:  # a reader that did block would be let go
            if fifo.exists():
                os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
    assert len(tokens) == 8 * 3 + 3 + 3 * 4
    assert_no_token(haystack(worker), tokens,
                    await namespace_id(client, worker.env.get("TEMPORAL_NAMESPACE", "default")))
    assert_private_log(worker)
    print(f"clean pipelines {elapsed:.2f}s, RSS {rss / 1024:.0f} MB")
    assert yaml  # the triage files above are plain YAML text
