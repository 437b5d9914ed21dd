"""Block notifications on real endpoints: a Synapse homeserver, the legacy send script
as a real process, and an HTTP recorder standing in for an ntfy server. A failed
notification must never lose the block: the pipeline still parks and the failure is
recorded in the originating task and in get_status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle

import policies
from activities import matrix, notify
from config import load_config
from exceptions import NotifyFailedError
from models import BuildPipelineInput, BuildPipelineResult, PipelineStatus
from standins.agents import (
    complete_task,
    load_yaml,
    play_stage,
    poll,
    poll_async,
    wait_for_task,
    wait_until_parked,
    write_origin_task,
    write_triage,
)
from taskfiles.documents import add_history
from taskfiles.lookup import find_task, update_task
from tests.conftest import PipelineEnv, make_env, serving
from tests.test_operator_controls import current_details
from tools import synapse
from tools.devserver import free_port
from vocabulary import (
    BUILD_PIPELINE_WORKFLOW,
    EVENTS_QUERY,
    IN_PROGRESS,
    INPUT_REQUIRED,
    PREFAB_SCAFFOLDING,
    STATUS_QUERY,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
)
from worker import build_worker

BLOCKS = ["Token is logged in plain text", "Admin endpoint has no authentication"]


# ---- driving a pipeline to stage 7 -------------------------------------------------------

@contextlib.asynccontextmanager
async def worker_with(client: Client, root: Path, address: str,
                      **env: str) -> AsyncIterator[PipelineEnv]:
    """An in-process worker on a fresh task queue, configured by `env` on top of the
    usual private folders."""
    variables = make_env(root, address, **env)
    config = load_config(variables)
    async with build_worker(client, config):
        yield PipelineEnv(config=config, client=client, env=variables, root=root)


async def park_pipeline(pipeline: PipelineEnv, build: str,
                        blocks: list[str]) -> tuple[WorkflowHandle, Path]:
    """Run a pipeline whose audit reports `blocks` until it parks at stage 7; return its
    handle and the originating task file."""
    task_id = write_origin_task(pipeline.queue_dir, build)
    inp = BuildPipelineInput(build_name=build, plan_path="/plans/demo.md", task_id=task_id,
                             target_agent="builder", block_poll_interval_seconds=0.2)
    handle = await pipeline.start(BUILD_PIPELINE_WORKFLOW, inp)
    await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_PREFAB, pipeline.env)
    await play_stage(pipeline.queue_dir, handle.id, TASK_BUILD_PLAN, pipeline.env)
    audit = await wait_for_task(pipeline.queue_dir, handle.id, TASK_SECURITY_AUDIT)
    pipeline.write_triage(build, "blocks:\n" + "".join(f"- description: {b}\n"
                                                       for b in blocks))
    await complete_task(audit, pipeline.env, "success", "audit written")
    status = await wait_until_parked(handle)
    assert status.blocks == len(blocks)
    return handle, find_task(pipeline.queue_dir, task_id)



def origin_note(origin: Path) -> tuple[str, str]:
    """(status, newest history note) of the originating task."""
    task = load_yaml(origin)
    return task["status"], task["history"][-1]["note"]


# ---- Matrix: a real Synapse --------------------------------------------------------------

@pytest.fixture(scope="module")
def homeserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[synapse.Homeserver]:
    with synapse.running(tmp_path_factory.mktemp("synapse")) as server:
        yield server


@pytest.fixture(scope="module")
def matrix_token(homeserver: synapse.Homeserver) -> str:
    _, token = homeserver.register("build-notifier")
    return token


def notices(homeserver: synapse.Homeserver, token: str, room_id: str) -> list[dict[str, Any]]:
    return [event["content"] for event in homeserver.messages(token, room_id)]


async def test_block_notices_reach_the_room(homeserver: synapse.Homeserver, matrix_token: str,
                                            client: Client, temporal_address: str,
                                            tmp_path: Path) -> None:
    room_id = homeserver.create_room(matrix_token, "builds")
    token_file = tmp_path / "matrix-token"
    token_file.write_text(matrix_token + "\n")
    token_file.chmod(0o600)
    async with worker_with(client, tmp_path, temporal_address,
                           MATRIX_HOMESERVER=homeserver.url, MATRIX_ROOM="builds",
                           MATRIX_ACCESS_TOKEN_FILE=str(token_file)) as pipeline:
        # Two pipelines park at once on one worker; each announces its own blocks.
        (first, first_origin), (second, _) = await asyncio.gather(
            park_pipeline(pipeline, "notice-one", BLOCKS),
            park_pipeline(pipeline, "notice-two", BLOCKS[:1]))
        received = await poll(lambda: len(notices(homeserver, matrix_token, room_id)) >= 2,
                              timeout=30, what="two notices in the room") and notices(
            homeserver, matrix_token, room_id)
        for handle in (first, second):
            status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
            assert status.notification_failures == []
            await handle.terminate("test done")

    assert len(received) == 2
    assert all(content["msgtype"] == "m.notice" for content in received)
    assert all(content["m.mentions"] == {} for content in received)  # pings nobody
    by_build = {("notice-one" if "notice-one" in c["body"] else "notice-two"): c["body"]
                for c in received}
    assert "Build notice-one: 2 security block(s) need a decision" in by_build["notice-one"]
    assert f"- {BLOCKS[0]}" in by_build["notice-one"]
    assert f"- {BLOCKS[1]}" in by_build["notice-one"]
    assert f"Workflow: {first.id}" in by_build["notice-one"]
    assert "Build notice-two: 1 security block(s)" in by_build["notice-two"]
    assert BLOCKS[1] not in by_build["notice-two"]
    status, note = origin_note(first_origin)
    assert status == INPUT_REQUIRED
    assert "2 security block(s) await approval" in note
    assert "notification failed" not in note


async def test_room_id_alias_and_short_name_resolve(homeserver: synapse.Homeserver,
                                                    matrix_token: str) -> None:
    room_id = homeserver.create_room(matrix_token, "forms")
    for form in (room_id, f"#forms:{homeserver.server_name}", "forms"):
        config = load_config({"MATRIX_HOMESERVER": homeserver.url, "MATRIX_ROOM": form,
                              "MATRIX_ACCESS_TOKEN": matrix_token})
        await matrix.send_matrix(config, f"sent to {form}", txn_seed=f"forms/{form}")
    bodies = [c["body"] for c in notices(homeserver, matrix_token, room_id)]
    assert bodies == [f"sent to {room_id}", f"sent to #forms:{homeserver.server_name}",
                      "sent to forms"]


async def test_same_transaction_is_sent_once(homeserver: synapse.Homeserver,
                                             matrix_token: str) -> None:
    """A retried stage reuses its transaction id: the room shows the notice once."""
    room_id = homeserver.create_room(matrix_token, "retried")
    config = load_config({"MATRIX_HOMESERVER": homeserver.url, "MATRIX_ROOM": room_id,
                          "MATRIX_ACCESS_TOKEN": matrix_token})
    for _ in range(2):
        await matrix.send_matrix(config, "only once", txn_seed="wf-1/blocks")
    assert [c["body"] for c in notices(homeserver, matrix_token, room_id)] == ["only once"]


async def test_bad_token_and_unknown_room_fail_without_retry(
        homeserver: synapse.Homeserver, matrix_token: str) -> None:
    bad = "syt_not_a_real_token_" + uuid.uuid4().hex
    config = load_config({"MATRIX_HOMESERVER": homeserver.url, "MATRIX_ROOM": "builds",
                          "MATRIX_ACCESS_TOKEN": bad})
    with pytest.raises(NotifyFailedError) as failed:
        await matrix.send_matrix(config, "x", txn_seed="bad-token")
    assert "HTTP 401 M_UNKNOWN_TOKEN" in str(failed.value)
    assert not failed.value.retryable
    assert bad not in str(failed.value)
    config = load_config({"MATRIX_HOMESERVER": homeserver.url, "MATRIX_ROOM": "no-such-room",
                          "MATRIX_ACCESS_TOKEN": matrix_token})
    with pytest.raises(NotifyFailedError) as failed:
        await matrix.send_matrix(config, "x", txn_seed="no-room")
    assert "#no-such-room:localhost" in str(failed.value)
    assert "M_NOT_FOUND" in str(failed.value)
    assert not failed.value.retryable


async def test_homeserver_down_still_parks_and_records(client: Client, temporal_address: str,
                                                       tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    secret = "syt_secret_" + uuid.uuid4().hex
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    caplog.set_level(logging.INFO)
    async with worker_with(client, tmp_path, temporal_address, MATRIX_HOMESERVER=down,
                           MATRIX_ACCESS_TOKEN=secret) as pipeline:
        handle, origin = await park_pipeline(pipeline, "hs-down", BLOCKS)
        status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
        events = await handle.query(EVENTS_QUERY)
        await handle.terminate("test done")

    assert status.notification_failures == ["matrix: Matrix whoami: ConnectError"]
    assert any(e["event"] == "notification_failed" for e in events)
    task_status, note = origin_note(origin)
    assert task_status == INPUT_REQUIRED
    assert "2 security block(s) await approval" in note
    assert "notification failed: matrix: Matrix whoami: ConnectError" in note
    attempts = [r for r in caplog.records if r.getMessage() == "notification_failed"]
    assert [getattr(r, "attempt", None) for r in attempts] == [1, 2, 3]
    assert secret not in caplog.text
    assert secret not in origin.read_text()


# ---- legacy script and ntfy --------------------------------------------------------------

class Recorder(ThreadingHTTPServer):
    """Stands in for an ntfy server: records each POST and answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = status
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append({"path": self.path, "headers": dict(self.headers),
                                        "body": body.decode()})
                self.send_response(server.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def ntfy() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


RECORDING_SCRIPT = """#!{python}
import json, os, sys
with open({out!r}, "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, f)
"""


async def test_script_and_ntfy_channels(client: Client, temporal_address: str, tmp_path: Path,
                                        ntfy: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "script-call.json"
    script = tmp_path / "send-matrix"
    script.write_text(RECORDING_SCRIPT.format(python=sys.executable, out=str(record)))
    script.chmod(0o700)
    # The worker runs under pm2, which leaves its IPC channel in the environment; a Node
    # script inheriting it would talk on pm2's channel.
    for name in notify.PM2_IPC_VARIABLES:
        monkeypatch.setenv(name, "3")
    monkeypatch.setenv("BUILD_WORKER_CANARY", "kept")
    async with worker_with(client, tmp_path, temporal_address, SEND_MATRIX_SCRIPT=str(script),
                           MATRIX_ROOM="ops", NTFY_URL=f"{ntfy.url}/builds") as pipeline:
        handle, origin = await park_pipeline(pipeline, "script-build", BLOCKS[:1])
        status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
        await handle.terminate("test done")

    assert status.notification_failures == []
    call = json.loads(record.read_text())
    assert call["argv"][0] == "ops"
    assert "Build script-build: 1 security block(s)" in call["argv"][1]
    assert BLOCKS[0] in call["argv"][1]
    assert not set(notify.PM2_IPC_VARIABLES) & set(call["env"])
    assert call["env"]["BUILD_WORKER_CANARY"] == "kept"
    [posted] = ntfy.requests
    assert posted["path"] == "/builds"
    assert posted["headers"]["Title"] == "Build script-build: 1 security block(s) need a decision"
    assert set(posted["headers"]["Tags"].split(",")) >= {"warning"}
    assert BLOCKS[0] in posted["body"]
    assert "notification failed" not in origin_note(origin)[1]


async def test_failing_channel_is_retried_then_reported(ntfy: Recorder) -> None:
    ntfy.status = 503
    config = load_config({"NTFY_URL": f"{ntfy.url}/builds"})
    delivered, failures = await notify.notify_all(config, "title", "message", "seed")
    assert delivered == []
    assert failures == ["ntfy: ntfy: HTTP 503"]
    assert len(ntfy.requests) == notify.ATTEMPTS_PER_CHANNEL


# ---- reminders: a task nobody picks up -----------------------------------------------------

async def test_unclaimed_task_is_reminded_then_waits_until_claimed(
        homeserver: synapse.Homeserver, matrix_token: str, client: Client,
        temporal_address: str, tmp_path: Path) -> None:
    """Past its pickup limit a stage reminds the room (at most PICKUP_REMINDERS times) and
    keeps waiting, saying so; claimed and completed later, the pipeline completes."""
    room_id = homeserver.create_room(matrix_token, "pickups")
    config = load_config(make_env(tmp_path, temporal_address, MATRIX_HOMESERVER=homeserver.url,
                                  MATRIX_ROOM="pickups", MATRIX_ACCESS_TOKEN=matrix_token))
    env = make_env(tmp_path, temporal_address, TASK_QUEUE=config.task_queue)
    async with serving(client, config):
        build = "slow-pickup"
        handle = await client.start_workflow(
            BUILD_PIPELINE_WORKFLOW,
            BuildPipelineInput(build_name=build, plan_path="/plans/demo.md",
                               task_id=write_origin_task(config.task_queue_dir, build),
                               target_agent="builder", pickup_timeout_seconds=1),
            id=f"pickup-{uuid.uuid4()}", task_queue=config.task_queue)
        prefab = await wait_for_task(config.task_queue_dir, handle.id, TASK_BUILD_PREFAB)
        task_id = load_yaml(prefab)["id"]

        def reminders() -> list[str]:
            return [c["body"] for c in notices(homeserver, matrix_token, room_id)
                    if task_id in c["body"]]

        await poll(lambda: len(reminders()) >= policies.PICKUP_REMINDERS, timeout=30,
                   what="every reminder in the room")
        status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
        assert status.stage == PREFAB_SCAFFOLDING
        assert status.waiting_on is not None
        assert status.waiting_on.task_id == task_id
        assert status.waiting_on.note is not None
        assert status.waiting_on.note.startswith("waiting for pickup by claudebox since ")
        assert "**Waiting for pickup by claudebox since " in await current_details(handle)
        # An agent claims it at last (v0.5.0's words: the file's status), then finishes.
        update_task(prefab, lambda t: add_history(t, status=IN_PROGRESS, actor="claudebox",
                                                  note="on it"))
        await poll_async(lambda: _claimed(handle), timeout=20, what="the claim in the status")
        await complete_task(prefab, env)
        for task_type in (TASK_BUILD_PLAN, TASK_SECURITY_AUDIT):
            if task_type == TASK_SECURITY_AUDIT:
                write_triage(config.audit_dir, build, "info:\n- fine\n")
            await play_stage(config.task_queue_dir, handle.id, task_type, env)
        await play_stage(config.task_queue_dir, handle.id, TASK_BUILD_CLOSEOUT, env)
        result = BuildPipelineResult.model_validate(await handle.result())
        history = [e async for e in handle.fetch_history_events()]

    assert result.outcome == "success"
    sent = reminders()
    assert len(sent) == policies.PICKUP_REMINDERS  # bounded: no reminder after the last
    assert f"Build {build}: {PREFAB_SCAFFOLDING} waits for pickup by claudebox" in sent[0]
    assert f"Reminder {policies.PICKUP_REMINDERS} of {policies.PICKUP_REMINDERS}" in sent[-1]
    timers = [e.user_metadata.summary.data for e in history
              if e.HasField("timer_started_event_attributes")]
    assert timers.count(f'"pickup limit of {PREFAB_SCAFFOLDING}"'.encode()) == \
        policies.PICKUP_REMINDERS
    summary = load_yaml(Path(str(result.summary_path)))
    prefab_time = summary["time"]["stages"][0]
    assert (prefab_time["stage"], prefab_time["reminders"]) == (PREFAB_SCAFFOLDING,
                                                                policies.PICKUP_REMINDERS)
    assert prefab_time["pickup_seconds"] >= policies.PICKUP_REMINDERS * 1.0
    assert prefab_time["outcome"] == "completed"


async def _claimed(handle: WorkflowHandle) -> bool:
    status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
    return status.waiting_on is not None and status.waiting_on.claimed_at is not None
