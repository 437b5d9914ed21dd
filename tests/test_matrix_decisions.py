"""Deciding parked blocks from the Matrix room, on a real Synapse and a real dev server.

Pipelines are driven to stage 7 by the agent stand-ins; the block notice reaches the room
through stage 6; users registered on the homeserver reply and react as a chat client
does. "Nothing changed" is proven by order, not by waiting: the listener reads the room
in order, so when a later allowed decision is the one applied, every event before it was
read and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client, WorkflowHandle

from activities.matrix import PIPELINE_CONTENT_KEY
from config import WorkerConfig, load_config
from decisions.chat_listener import (
    NOTE_MAX_CHARS,
    REFUSAL_TEXT,
    listen_for_decisions,
    parse_decision,
)
from models import BuildPipelineResult, PipelineStatus, StageEvent
from standins.agents import complete_task, load_yaml, poll, wait_for_status, wait_for_task
from tests.conftest import PipelineEnv
from tests.test_notify import park_pipeline, worker_with
from tests.worker_process import WorkerProcess
from tools import synapse
from vocabulary import CLOSE_BUILD, EVENTS_QUERY, STATUS_QUERY, TASK_BUILD_CLOSEOUT

BLOCKS = ["Deploy key committed to the chart"]
# A chat decision is recorded as such (the workflow names the source of each decision).
DECISION_EVENTS = ("approved_by_matrix", "rejected_by_matrix")
MAX_REPLY_TO_NEXT_STAGE_SECONDS = 3.0


# ---- the room: a bot (the worker's user), an approver, an outsider ------------------------

@dataclass
class User:
    user_id: str
    token: str


@dataclass
class Chat:
    server: synapse.Homeserver
    bot: User
    alice: User  # in MATRIX_APPROVERS
    mallory: User  # in the room, not an approver
    room_alias: str  # short name, as MATRIX_ROOM
    room_id: str
    other_room_id: str  # the bot and alice are here too
    token_file: Path

    def env(self) -> dict[str, str]:
        return {"MATRIX_HOMESERVER": self.server.url, "MATRIX_ROOM": self.room_alias,
                "MATRIX_ACCESS_TOKEN_FILE": str(self.token_file),
                "MATRIX_APPROVERS": f"@nobody:elsewhere.example, {self.alice.user_id}"}

    async def send(self, user: User, content: dict[str, Any], *, room: str | None = None,
                   event_type: str = "m.room.message") -> str:
        return await asyncio.to_thread(self.server.send, user.token, room or self.room_id,
                                       content, event_type)

    async def reply(self, user: User, target: str, text: str, *, room: str | None = None,
                    quoted: str = "Build chat: 1 security block(s) need a decision") -> str:
        """A reply as clients write it: the quoted fallback, a blank line, the text."""
        body = f"> <{self.bot.user_id}> {quoted}\n\n{text}"
        return await self.send(user, {"msgtype": "m.text", "body": body,
                                      "m.relates_to": {"m.in_reply_to": {"event_id": target}}},
                               room=room)

    async def react(self, user: User, target: str, key: str,
                    rel_type: str = "m.annotation") -> str:
        return await self.send(user, {"m.relates_to": {"rel_type": rel_type,
                                                       "event_id": target, "key": key}},
                               event_type="m.reaction")

    async def redact(self, user: User, event_id: str) -> None:
        await asyncio.to_thread(self.server.redact, user.token, self.room_id, event_id)

    def room_messages(self) -> list[dict[str, Any]]:
        return self.server.messages(self.bot.token, self.room_id)

    async def notice_for(self, workflow_id: str) -> str:
        """The event id of the block notice stage 6 sent for `workflow_id`."""
        def find() -> str | None:
            for event in self.room_messages():
                ref = event["content"].get(PIPELINE_CONTENT_KEY)
                if event["sender"] == self.bot.user_id and isinstance(ref, dict) \
                        and ref.get("workflow_id") == workflow_id:
                    return event["event_id"]
            return None
        return await poll(find, timeout=30, what=f"block notice of {workflow_id}")

    def refusals(self) -> list[dict[str, Any]]:
        return [e for e in self.room_messages()
                if e["sender"] == self.bot.user_id and e["content"].get("body") == REFUSAL_TEXT]


@pytest.fixture(scope="module")
def homeserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[synapse.Homeserver]:
    with synapse.running(tmp_path_factory.mktemp("synapse")) as server:
        yield server


@pytest.fixture(scope="module")
def users(homeserver: synapse.Homeserver) -> dict[str, User]:
    return {name: User(*homeserver.register(name))
            for name in ("build-notifier", "alice", "mallory")}


@pytest.fixture
def chat(homeserver: synapse.Homeserver, users: dict[str, User], tmp_path: Path) -> Chat:
    """A fresh room per test (so no test reads another's history), plus a second room."""
    bot, alice, mallory = users["build-notifier"], users["alice"], users["mallory"]
    alias = f"builds-{uuid.uuid4().hex[:8]}"
    room_id = homeserver.create_room(bot.token, alias)
    other = homeserver.create_room(bot.token, f"other-{uuid.uuid4().hex[:8]}")
    for user in (alice, mallory):
        homeserver.invite_and_join(bot.token, room_id, user.user_id, user.token)
    homeserver.invite_and_join(bot.token, other, alice.user_id, alice.token)
    token_file = tmp_path / "matrix-token"
    token_file.write_text(bot.token + "\n")
    token_file.chmod(0o600)
    return Chat(server=homeserver, bot=bot, alice=alice, mallory=mallory, room_alias=alias,
                room_id=room_id, other_room_id=other, token_file=token_file)


@contextlib.asynccontextmanager
async def listening(client: Client, config: WorkerConfig) -> AsyncIterator[asyncio.Task[None]]:
    """The chat listener beside an in-process worker, as worker.py runs it."""
    stop = asyncio.Event()
    task = asyncio.create_task(listen_for_decisions(client, config, stop))
    try:
        yield task
    finally:
        stop.set()
        # It must honour `stop` promptly even in the middle of a long poll.
        await asyncio.wait_for(task, 5)


@contextlib.asynccontextmanager
async def chat_worker(client: Client, root: Path, address: str, chat: Chat,
                      **env: str) -> AsyncIterator[PipelineEnv]:
    async with worker_with(client, root, address, **chat.env(), **env) as pipeline, \
            listening(client, pipeline.config):
        yield pipeline


# ---- reading the outcome -------------------------------------------------------------------

async def events_of(handle: WorkflowHandle) -> list[StageEvent]:
    return await handle.query(EVENTS_QUERY, result_type=list[StageEvent])


async def status_of(handle: WorkflowHandle) -> PipelineStatus:
    return await handle.query(STATUS_QUERY, result_type=PipelineStatus)


def decisions_in(events: list[StageEvent]) -> list[StageEvent]:
    return [e for e in events if e.event in DECISION_EVENTS]


async def decision_made(handle: WorkflowHandle) -> PipelineStatus:
    """The status once the pipeline has a decision (a clear failure if it never does)."""
    return await wait_for_status(handle, lambda s: s.decision is not None, "a block decision",
                             timeout=20)


async def result_of(client: Client, handle: WorkflowHandle,
                    timeout: float = 60.0) -> BuildPipelineResult:
    typed = client.get_workflow_handle(handle.id, result_type=BuildPipelineResult)
    return await asyncio.wait_for(typed.result(), timeout)


def last_history(origin: Path) -> dict[str, Any]:
    return load_yaml(origin)["history"][-1]


def malformed_replies(notice: str) -> list[dict[str, Any]]:
    return [{"msgtype": "m.text", "body": 12,
             "m.relates_to": {"m.in_reply_to": {"event_id": notice}}},
            {"msgtype": "m.text", "body": ["approve"],
             "m.relates_to": {"m.in_reply_to": {"event_id": notice}}},
            {"msgtype": "m.text", "body": "approve", "m.relates_to": [notice]},
            {"msgtype": "m.text", "body": "approve",
             "m.relates_to": {"m.in_reply_to": {"event_id": {"id": notice}}}},
            {"msgtype": "m.text", "body": "approve",
             "m.relates_to": {"m.in_reply_to": {"event_id": "$" + "x" * 5000}}},
            {"msgtype": "m.text", "body": "approve",
             "m.relates_to": {"m.in_reply_to": {"event_id": f"{notice} "}}},
            {"msgtype": "m.text", "body": "approve", "m.relates_to": {"m.in_reply_to": notice}}]


# ---- tests ---------------------------------------------------------------------------------

def test_malformed_events_are_not_decisions() -> None:
    """What a homeserver (or a federated one) may hand over, beyond what Synapse accepts
    from its own clients: none of it is a decision, none of it raises."""
    notice = "$notice:localhost"
    good = {"event_id": "$reply:localhost", "sender": "@alice:localhost",
            "type": "m.room.message",
            "content": {"msgtype": "m.text", "body": "approve",
                        "m.relates_to": {"m.in_reply_to": {"event_id": notice}}}}
    assert parse_decision(good) is not None  # the baseline the rows below break
    rows: list[Any] = [None, [], "approve", {"content": good["content"]},
                       {**good, "event_id": 7}, {**good, "sender": None},
                       {**good, "sender": "@" + "a" * 300}, {**good, "sender": "@a b:x"},
                       {**good, "content": "approve"},
                       {**good, "unsigned": {"redacted_because": {}}},
                       {**good, "type": "m.room.redaction"}]
    rows += [{**good, "content": content} for content in malformed_replies(notice)]
    rows += [{**good, "type": "m.reaction",
              "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": notice,
                                           "key": key}}}
             for key in (None, 5, ["✅"], "✅" * 40, "👍", "✅✅")]
    for row in rows:
        assert parse_decision(row) is None, row


def test_a_reply_beginning_with_changes_requests_changes() -> None:
    content = {"msgtype": "m.text", "body": "> <@bot:localhost> Build x: 2 blocks\n\n"
                                            "changes: rotate the token",
               "m.relates_to": {"m.in_reply_to": {"event_id": "$notice:localhost"}}}
    wanted = parse_decision({"event_id": "$reply:localhost", "sender": "@alice:localhost",
                             "type": "m.room.message", "content": content})
    assert wanted is not None
    assert (wanted.decision, wanted.note) == ("changes_requested", "rotate the token")
    content["body"] = "changesets look fine"
    assert parse_decision({"event_id": "$reply:localhost", "sender": "@alice:localhost",
                           "type": "m.room.message", "content": content}) is None



async def test_approver_replies_approve_and_reject(
        chat: Chat, client: Client, temporal_address: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO)
    async with chat_worker(client, tmp_path, temporal_address, chat) as pipeline:
        (approve, approve_origin), (reject, reject_origin) = await asyncio.gather(
            park_pipeline(pipeline, "chat-approve", BLOCKS),
            park_pipeline(pipeline, "chat-reject", BLOCKS))
        approve_notice = await chat.notice_for(approve.id)
        reject_notice = await chat.notice_for(reject.id)

        sent = time.monotonic()
        await chat.reply(chat.alice, approve_notice, "Approve: risk accepted for the demo")
        closeout = await wait_for_task(pipeline.queue_dir, approve.id, TASK_BUILD_CLOSEOUT)
        latency = time.monotonic() - sent
        with capsys.disabled():
            print(f"\nmatrix reply -> next stage (close_build task written): {latency:.3f}s")
        assert latency <= MAX_REPLY_TO_NEXT_STAGE_SECONDS
        status = await status_of(approve)
        assert (status.decision, status.decided_by) == ("approved", chat.alice.user_id)
        await complete_task(closeout, pipeline.env)
        approved = await result_of(client, approve)
        approve_events = await events_of(approve)

        await chat.reply(chat.alice, reject_notice, "REJECT  the deploy key must go first")
        assert (await decision_made(reject)).decision == "rejected"
        rejected = await result_of(client, reject)
        reject_status, reject_events = await status_of(reject), await events_of(reject)

    assert approved.outcome == "partial"
    assert approved.decision == "approved"
    [decided] = decisions_in(approve_events)
    assert decided.event == "approved_by_matrix"
    assert decided.detail == f"{chat.alice.user_id}: risk accepted for the demo"
    summary = load_yaml(Path(approved.summary_path or ""))
    assert (summary["decision"], summary["decided_by"]) == ("approved", chat.alice.user_id)
    entry = last_history(approve_origin)
    assert (entry["status"], entry["actor"]) == ("approved", chat.alice.user_id)
    assert "risk accepted for the demo" in entry["note"]

    assert rejected.outcome == "rejected"
    assert rejected.decision == "rejected"
    assert CLOSE_BUILD not in rejected.stages_completed
    assert (reject_status.decision, reject_status.decided_by) == ("rejected", chat.alice.user_id)
    [decided] = decisions_in(reject_events)
    assert decided.detail == f"{chat.alice.user_id}: the deploy key must go first"
    summary = load_yaml(Path(rejected.summary_path or ""))
    assert (summary["outcome"], summary["decided_by"]) == ("rejected", chat.alice.user_id)
    entry = last_history(reject_origin)
    assert (entry["status"], entry["actor"]) == ("rejected", chat.alice.user_id)
    assert chat.bot.token not in caplog.text


async def test_approver_reactions_decide(chat: Chat, client: Client, temporal_address: str,
                                         tmp_path: Path) -> None:
    async with chat_worker(client, tmp_path, temporal_address, chat) as pipeline:
        (approve, _), (reject, _) = await asyncio.gather(
            park_pipeline(pipeline, "react-approve", BLOCKS),
            park_pipeline(pipeline, "react-reject", BLOCKS))
        # With the emoji variation selector, as some clients send it.
        await chat.react(chat.alice, await chat.notice_for(approve.id), "✅\ufe0f")
        await chat.react(chat.alice, await chat.notice_for(reject.id), "❌")
        closeout = await wait_for_task(pipeline.queue_dir, approve.id, TASK_BUILD_CLOSEOUT)
        await complete_task(closeout, pipeline.env)
        approved = await result_of(client, approve)
        assert (await decision_made(reject)).decision == "rejected"
        rejected = await result_of(client, reject)
        seen = {decision: (await status_of(handle), await events_of(handle))
                for handle, decision in ((approve, "approved"), (reject, "rejected"))}

    assert (approved.decision, rejected.outcome) == ("approved", "rejected")
    for decision, (status, events) in seen.items():
        assert (status.decision, status.decided_by) == (decision, chat.alice.user_id)
        [decided] = decisions_in(events)
        assert decided.detail == chat.alice.user_id  # a reaction carries no note


async def test_only_an_approver_in_the_notice_room_decides(
        chat: Chat, client: Client, temporal_address: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    alice, mallory = chat.alice, chat.mallory
    async with chat_worker(client, tmp_path, temporal_address, chat) as pipeline:
        handle, origin = await park_pipeline(pipeline, "chat-guarded", BLOCKS)
        notice = await chat.notice_for(handle.id)
        ref = {"workflow_id": handle.id, "run_id": handle.result_run_id or "",
               "task_id": load_yaml(origin)["id"]}

        # Someone not in MATRIX_APPROVERS: a reply and a reaction; answered once.
        outsider = await chat.reply(mallory, notice, "approve, ship it")
        await chat.react(mallory, notice, "✅")
        refusal = (await poll(chat.refusals, what="answer to the outsider"))[0]
        # The approver, but not at one of our notices: the bot's answer, a look-alike
        # notice posted by someone else with the pipeline's key, an unknown event.
        await chat.reply(alice, refusal["event_id"], "approve")
        fake = await chat.send(mallory, {"msgtype": "m.notice", "body": "Build chat-guarded",
                                         PIPELINE_CONTENT_KEY: ref})
        await chat.reply(alice, fake, "approve")
        await chat.reply(alice, "$no-such-event:localhost", "approve")
        # The approver in another room, pointing at the notice.
        await chat.reply(alice, notice, "approve", room=chat.other_room_id)
        # Edits: a reply turned into "approve", even one that names the notice.
        looking = await chat.reply(alice, notice, "looking into it")
        for relates in ({"rel_type": "m.replace", "event_id": looking},
                        {"rel_type": "m.replace", "event_id": looking,
                         "m.in_reply_to": {"event_id": notice}}):
            await chat.send(alice, {"msgtype": "m.text", "body": "approve",
                                    "m.new_content": {"msgtype": "m.text", "body": "approve"},
                                    "m.relates_to": relates})
        await chat.redact(alice, looking)
        # Not a decision: the word only in the quoted fallback, look-alike words, a notice
        # instead of a message, other reactions and relation types.
        await chat.reply(alice, notice, "let me check", quoted="approve")
        await chat.reply(alice, notice, "approves of nothing")
        await chat.reply(alice, notice, "approve?")
        await chat.send(alice, {"msgtype": "m.notice", "body": "approve",
                                "m.relates_to": {"m.in_reply_to": {"event_id": notice}}})
        await chat.react(alice, notice, "👍")
        await chat.react(alice, notice, "✅", rel_type="m.reference")
        await chat.react(alice, notice, "✅" * 40)
        # Malformed: wrong types where ids and bodies go (what this homeserver lets through;
        # the rest is covered by test_malformed_events_are_not_decisions).
        carried = 0
        for content in malformed_replies(notice):
            with contextlib.suppress(httpx.HTTPStatusError):
                await chat.send(alice, content)
                carried += 1
        assert carried >= 2

        # The decision that counts: hostile text in the note is folded and bounded.
        hostile = "\x1b[31mred\x1b[0m \u202ereversed\u200b " + "y" * 3000
        await chat.reply(alice, notice, f"reject {hostile}")
        status = await decision_made(handle)
        assert (status.decision, status.decided_by) == ("rejected", alice.user_id)
        result = await result_of(client, handle)
        refusals = chat.refusals()
        status, events = await status_of(handle), await events_of(handle)

    assert result.outcome == "rejected"
    [decided] = decisions_in(events)
    assert decided.event == "rejected_by_matrix"
    note = decided.detail.removeprefix(f"{alice.user_id}: ")
    assert note.startswith("[31mred [0m reversed yyy")
    assert note.endswith("…")
    assert len(note) == NOTE_MAX_CHARS
    assert not any(ch in note for ch in "\x1b\u202e\u200b")
    assert (status.decision, status.decided_by) == ("rejected", alice.user_id)
    entry = last_history(origin)
    assert (entry["status"], entry["actor"]) == ("rejected", alice.user_id)
    # One answer to the outsider (not one per attempt), as a reply to their message.
    assert len(refusals) == 1
    assert refusals[0]["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == outsider
    not_allowed = [r for r in caplog.records if r.getMessage() == "chat_decision_not_allowed"]
    assert {getattr(r, "matrix_sender", None) for r in not_allowed} == {mallory.user_id}
    assert len(not_allowed) == 2
    assert [getattr(r, "matrix_sender", None) for r in caplog.records
            if r.getMessage() == "chat_decision"] == [alice.user_id]
    assert not [r for r in caplog.records if r.getMessage() in (
        "chat_listener_error", "chat_listener_retrying")]


async def test_decisions_made_while_no_worker_listened(
        chat: Chat, client: Client, temporal_address: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    alice = chat.alice
    async with worker_with(client, tmp_path, temporal_address, **chat.env()) as pipeline:
        (first, _), (second, _), (ended, _) = await asyncio.gather(
            park_pipeline(pipeline, "offline-redacted", BLOCKS),
            park_pipeline(pipeline, "offline-approved", BLOCKS),
            park_pipeline(pipeline, "offline-ended", BLOCKS))
        first_notice, second_notice, ended_notice = [
            await chat.notice_for(h.id) for h in (first, second, ended)]
        # Nobody listens yet. A reject, taken back (redacted) before anyone read it:
        withdrawn = await chat.reply(alice, first_notice, "reject")
        await chat.redact(alice, withdrawn)
        # An approval that must be applied when a listener starts:
        await chat.reply(alice, second_notice, "approve while you were out")
        # A decision for a pipeline that has ended since: refused quietly.
        await ended.terminate("ended before anyone read the room")
        late = await chat.reply(alice, ended_notice, "approve")
        # An outsider's attempt is not answered after the fact.
        await chat.reply(chat.mallory, first_notice, "approve")

        async with listening(client, pipeline.config):
            await wait_for_task(pipeline.queue_dir, second.id, TASK_BUILD_CLOSEOUT)
            # Read in order after the withdrawn reject: a live approval decides `first`.
            await chat.react(alice, first_notice, "✅")
            await wait_for_task(pipeline.queue_dir, first.id, TASK_BUILD_CLOSEOUT)
        first_status, second_status = await status_of(first), await status_of(second)
        first_events, second_events = await events_of(first), await events_of(second)
        for handle in (first, second):
            await handle.terminate("test done")

    assert (first_status.decision, first_status.decided_by) == ("approved", alice.user_id)
    assert (second_status.decision, second_status.decided_by) == ("approved", alice.user_id)
    [decided] = decisions_in(second_events)
    assert decided.detail == f"{alice.user_id}: while you were out"
    assert len(decisions_in(first_events)) == 1
    assert chat.refusals() == []
    tried = [r for r in caplog.records if getattr(r, "matrix_event", None) == late]
    assert [r.getMessage() for r in tried] == ["chat_decision"]
    assert any(r.getMessage() in ("decision_target_gone", "decision_refused")
               and getattr(r, "workflow_id", None) == ended.id for r in caplog.records)
    assert not [r for r in caplog.records if r.getMessage() in (
        "chat_listener_error", "chat_listener_retrying", "chat_decision_not_delivered")]


async def test_two_workers_listening_apply_one_decision(
        chat: Chat, client: Client, temporal_address: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """An in-process worker and a worker.py process on one task queue and one room."""
    caplog.set_level(logging.INFO)
    queue = f"test-{uuid.uuid4().hex[:12]}"
    async with chat_worker(client, tmp_path, temporal_address, chat,
                           TASK_QUEUE=queue) as pipeline:
        other = WorkerProcess(pipeline.env, tmp_path / "worker.log").start()
        try:
            await asyncio.to_thread(other.wait_ready)
            await poll(lambda: any(r.get("event") == "chat_decisions_listening"
                                   for r in other.log_records()),
                       timeout=30, what="the worker process listening to the room")
            handle, origin = await park_pipeline(pipeline, "two-listeners", BLOCKS)
            reply = await chat.reply(chat.alice, await chat.notice_for(handle.id), "approve")
            closeout = await wait_for_task(pipeline.queue_dir, handle.id, TASK_BUILD_CLOSEOUT)

            def seen_by_process() -> bool:
                return any(r.get("event") == "chat_decision" and r.get("matrix_event") == reply
                           for r in other.log_records())
            await poll(seen_by_process, timeout=30, what="the process's listener acting")
            await poll(lambda: any(getattr(r, "matrix_event", None) == reply
                                   and r.getMessage() == "chat_decision"
                                   for r in caplog.records),
                       timeout=30, what="the in-process listener acting")
            await complete_task(closeout, pipeline.env)
            result = await result_of(client, handle)
            events = await events_of(handle)

            # The long poll in flight does not hold up a SIGTERM.
            other.signal(signal.SIGTERM)
            assert await asyncio.to_thread(other.wait, 30) == 0
        finally:
            other.stop()

    assert result.outcome == "partial"
    assert result.decision == "approved"
    [decided] = decisions_in(events)
    assert decided.detail == chat.alice.user_id
    entries = [h for h in load_yaml(origin)["history"] if h["status"] == "approved"]
    assert len(entries) == 1
    assert entries[0]["actor"] == chat.alice.user_id
    stopped = [r for r in other.log_records() if r.get("event") == "worker_stopped"]
    assert stopped
    assert stopped[0]["shutdown_seconds"] < 5
    # The long poll is not logged request by request (one line per 25 s when idle).
    assert not [r for r in other.log_records() if r.get("logger") == "httpx"]
    log_text = other.log_path.read_text()
    assert chat.bot.token not in log_text
    assert chat.bot.token not in caplog.text


async def test_listener_is_off_without_approvers_and_survives_a_bad_token(
        chat: Chat, client: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    env = {**chat.env(), "MATRIX_APPROVERS": ""}
    stop = asyncio.Event()
    # No approvers: returns at once, never touching the homeserver.
    await asyncio.wait_for(listen_for_decisions(client, load_config(env), stop), 1)
    bad = "syt_not_valid_" + uuid.uuid4().hex
    chat.token_file.write_text(bad)
    async with listening(client, load_config(chat.env())):
        await poll(lambda: any(r.getMessage() == "chat_listener_retrying"
                               for r in caplog.records), what="a retry after the 401")
    retry = next(r for r in caplog.records if r.getMessage() == "chat_listener_retrying")
    assert "HTTP 401" in getattr(retry, "error", "")
    assert bad not in caplog.text
