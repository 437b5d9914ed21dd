"""Decide parked blocks from the Matrix room the block notices go to.

An operator listed in MATRIX_APPROVERS replies to a block notice with `approve …`,
`reject …` or `changes …` (the rest is the note; changes go back to the build agent
when the pipeline has a re-audit round left), or reacts to it with ✅ / ❌. The listener long-polls
the room through /sync, fetches the notice a reply or reaction points at, reads the
pipeline it names from the notice's own content (PIPELINE_CONTENT_KEY, written by stage 6),
and hands the decision to decisions.deliver_decision, the one path every decision takes.
It keeps no state another worker would need: several workers may listen to one room, and
the per-run Update id makes their deliveries of one decision collapse into one.

What never decides: a sender outside MATRIX_APPROVERS (answered once a minute at most with
who may decide), any room but MATRIX_ROOM, a message that only points at a notice posted
by someone other than this worker's own Matrix user, edits (m.replace), redactions and
redacted events, and reactions other than ✅ / ❌. Every event is hostile input: sizes are
bounded, the note is folded to one clean line, and an event that cannot be read is skipped
without stopping the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard, TypeVar
from urllib.parse import quote

import httpx
from pydantic import ValidationError
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities.matrix import (
    PIPELINE_CONTENT_KEY,
    matrix_call,
    matrix_http,
    matrix_token,
    resolve_room,
    txn_id_for,
)
from config import WorkerConfig
from decisions.delivery import deliver_decision
from exceptions import NotifyFailedError
from models import BlockDecision, Decision, MatrixNoticeRef
from taskfiles.visible_text import visible_line

log = logging.getLogger(__name__)

# A long poll the homeserver answers at once when something happens in the room; bounded
# so a dead connection is noticed, and always shorter than the HTTP timeout around it.
SYNC_TIMEOUT_SECONDS = 25.0
SYNC_HTTP_TIMEOUT_SECONDS = SYNC_TIMEOUT_SECONDS + 15.0
# Events of the room's recent past read at start: decisions made while no worker ran.
CATCH_UP_EVENTS = 50
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
MAX_EVENTS_PER_SYNC = 500
MAX_BODY_CHARS = 8000
NOTE_MAX_CHARS = 500
MAX_ID_CHARS = 255
MAX_REACTION_KEY_CHARS = 16
NOTICE_CACHE_SIZE = 512
REFUSAL_INTERVAL_SECONDS = 60.0
DECISION_WORDS: dict[str, Decision] = {"approve": "approved", "approved": "approved",
                                       "reject": "rejected", "rejected": "rejected",
                                       "changes": "changes_requested"}
REACTIONS: dict[str, Decision] = {"✅": "approved", "❌": "rejected"}
REFUSAL_TEXT = ("Only the operators listed in MATRIX_APPROVERS may approve or reject blocks "
                "from this room; nothing was changed.")
# The word, then only separators: "approve: fine" decides, "approve?" and "approves" don't.
_DECISION_RE = re.compile(
    r"(approved|approve|rejected|reject|changes)(?:$|[\s:,.;!—–-]+)(.*)", re.I | re.S)
_ID_RE = re.compile(r"[!-~]+")  # printable ASCII, no spaces: Matrix ids and event ids
TRANSIENT_RPC = frozenset({RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED,
                           RPCStatusCode.RESOURCE_EXHAUSTED, RPCStatusCode.ABORTED,
                           RPCStatusCode.INTERNAL, RPCStatusCode.UNKNOWN})
T = TypeVar("T")


@dataclass(frozen=True)
class ChatDecision:
    """A reply or reaction that asks to decide the blocks of the notice it points at."""

    event_id: str
    sender: str
    notice_id: str
    decision: Decision
    note: str
    kind: Literal["reply", "reaction"]


class _TryLater(Exception):
    """Matrix or Temporal is unreachable: the whole batch is read again after a back-off."""


def _is_id(value: object, sigil: str) -> TypeGuard[str]:
    return (isinstance(value, str) and 2 <= len(value) <= MAX_ID_CHARS
            and value.startswith(sigil) and _ID_RE.fullmatch(value) is not None)


def clean_note(text: str) -> str:
    """One line of at most NOTE_MAX_CHARS, without control or invisible format characters
    (terminal escapes, zero-width and bidi characters only hide text from a reader)."""
    return visible_line(text[:MAX_BODY_CHARS], NOTE_MAX_CHARS)


def strip_reply_fallback(body: str) -> str:
    """The text of a reply without the quoted "> …" lines clients put before it."""
    lines = body.splitlines()
    first = next((n for n, line in enumerate(lines) if not line.startswith(">")), len(lines))
    return "\n".join(lines[first:]).strip()


def parse_decision(event: object) -> ChatDecision | None:
    """The decision an event asks for, or None for anything else (malformed included)."""
    if not isinstance(event, dict):
        return None
    event_id, sender, content = event.get("event_id"), event.get("sender"), event.get("content")
    unsigned = event.get("unsigned")
    if not (_is_id(event_id, "$") and _is_id(sender, "@") and isinstance(content, dict)):
        return None
    if isinstance(unsigned, dict) and "redacted_because" in unsigned:
        return None
    relates = content.get("m.relates_to")
    if not isinstance(relates, dict):
        return None
    kind = event.get("type")
    if kind == "m.reaction":
        key, target = relates.get("key"), relates.get("event_id")
        if (relates.get("rel_type") != "m.annotation" or not _is_id(target, "$")
                or not isinstance(key, str) or len(key) > MAX_REACTION_KEY_CHARS):
            return None
        decision = REACTIONS.get(key.replace("\ufe0f", "").strip())
        if decision is None:
            return None
        return ChatDecision(event_id, sender, target, decision, "", "reaction")
    if kind != "m.room.message" or content.get("msgtype") != "m.text":
        return None
    # An edit can rewrite any message into "approve" after the fact: never a decision.
    if "m.new_content" in content or relates.get("rel_type") not in (None, "m.thread"):
        return None
    reply_to = relates.get("m.in_reply_to")
    target = reply_to.get("event_id") if isinstance(reply_to, dict) else None
    body = content.get("body")
    if not _is_id(target, "$") or not isinstance(body, str):
        return None
    text = unicodedata.normalize("NFKC", strip_reply_fallback(body[:MAX_BODY_CHARS]))
    match = _DECISION_RE.match(text)
    if match is None:
        return None
    return ChatDecision(event_id, sender, target, DECISION_WORDS[match.group(1).lower()],
                        clean_note(match.group(2)), "reply")


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run `work` until it finishes or `stop` is set: (finished, result)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopper):
            if not pending.done():
                pending.cancel()
    if task.done() and not task.cancelled():
        return True, task.result()
    return False, None


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class RoomListener:
    """One connection's worth of state: whom to listen as, where, and a bounded cache."""

    def __init__(self, client: Client, config: WorkerConfig, http: httpx.AsyncClient,
                 bot: str, room_id: str) -> None:
        self.client = client
        self.task_queue = config.pipeline_queue
        self.approvers = frozenset(config.matrix_approvers)
        self.http = http
        self.bot = bot
        self.room_id = room_id
        self._notices: OrderedDict[str, MatrixNoticeRef | None] = OrderedDict()
        self._refused_at: dict[str, float] = {}

    def sync_filter(self) -> str:
        """Only the decision room's messages and reactions, nothing of our own."""
        return json.dumps({
            "presence": {"types": []}, "account_data": {"types": []},
            "room": {"rooms": [self.room_id], "state": {"types": []},
                     "ephemeral": {"types": []}, "account_data": {"types": []},
                     "timeline": {"limit": CATCH_UP_EVENTS, "not_senders": [self.bot],
                                  "types": ["m.room.message", "m.reaction"]}}},
            separators=(",", ":"))

    async def sync(self, since: str | None) -> tuple[str, list[Any]]:
        """One /sync: (next batch token, the decision room's new timeline events)."""
        params = {"filter": self.sync_filter(),
                  "timeout": str(int(SYNC_TIMEOUT_SECONDS * 1000) if since else 0)}
        if since:
            params["since"] = since
        body = await self._call("sync", "GET", "/_matrix/client/v3/sync", params=params,
                                timeout=SYNC_HTTP_TIMEOUT_SECONDS)
        next_batch = body.get("next_batch")
        if not isinstance(next_batch, str) or not next_batch or len(next_batch) > 4096:
            raise _TryLater("Matrix sync: no next_batch")
        room = _dig(body, "rooms", "join", self.room_id)
        events = _dig(room, "timeline", "events")
        return next_batch, events[:MAX_EVENTS_PER_SYNC] if isinstance(events, list) else []

    async def handle(self, events: list[Any], *, catching_up: bool) -> None:
        for event in events:
            try:
                await self._handle(event, catching_up=catching_up)
            except _TryLater:
                raise
            except Exception as err:  # a malformed event must never stop the loop
                log.warning("chat_event_skipped", extra={
                    "matrix_event": _event_id(event), "error": type(err).__name__})

    async def _handle(self, event: object, *, catching_up: bool) -> None:
        wanted = parse_decision(event)
        if wanted is None or wanted.sender == self.bot:
            return
        notice = await self._notice(wanted.notice_id)
        if notice is None:
            return
        fields = {"matrix_event": wanted.event_id, "matrix_sender": wanted.sender,
                  "workflow_id": notice.workflow_id, "decision": wanted.decision,
                  "via": wanted.kind}
        if wanted.sender not in self.approvers:
            log.warning("chat_decision_not_allowed", extra=fields)
            if not catching_up:  # an earlier run may have answered it already
                await self._refuse(wanted)
            return
        log.info("chat_decision", extra={**fields, "catching_up": catching_up})
        choice = BlockDecision(note=wanted.note, decided_by=wanted.sender, source="matrix",
                               round=notice.round)
        try:
            await deliver_decision(self.client, workflow_id=notice.workflow_id,
                                   run_id=notice.run_id, decision=wanted.decision, choice=choice,
                                   task_queue=self.task_queue)
        except RPCError as err:
            if err.status in TRANSIENT_RPC:
                raise _TryLater(f"Temporal: {err.status.name if err.status else 'error'}") \
                    from None
            log.warning("chat_decision_not_delivered", extra={
                **fields, "error": (err.status.name if err.status else "RPCError")})

    async def _notice(self, event_id: str) -> MatrixNoticeRef | None:
        """The pipeline a block notice of ours names; None for any other event."""
        if event_id in self._notices:
            self._notices.move_to_end(event_id)
            return self._notices[event_id]
        try:
            event = await self._call(
                "fetch notice", "GET", f"/_matrix/client/v3/rooms/{quote(self.room_id, safe='')}"
                f"/event/{quote(event_id, safe='')}")
        except NotifyFailedError as err:
            if err.retryable:
                raise _TryLater(str(err)) from None
            event = {}  # not found, or not visible to us: not a notice
        notice = self._notice_of(event)
        self._notices[event_id] = notice
        while len(self._notices) > NOTICE_CACHE_SIZE:
            self._notices.popitem(last=False)
        return notice

    def _notice_of(self, event: dict[str, Any]) -> MatrixNoticeRef | None:
        content = event.get("content")
        if (event.get("sender") != self.bot or event.get("type") != "m.room.message"
                or event.get("room_id", self.room_id) != self.room_id
                or not isinstance(content, dict) or content.get("msgtype") != "m.notice"):
            return None
        try:
            return MatrixNoticeRef.model_validate(content.get(PIPELINE_CONTENT_KEY))
        except ValidationError:
            return None

    async def _refuse(self, wanted: ChatDecision) -> None:
        """Tell a sender once a minute at most that only the approvers decide."""
        now = time.monotonic()
        if now - self._refused_at.get(wanted.sender, -REFUSAL_INTERVAL_SECONDS) \
                < REFUSAL_INTERVAL_SECONDS:
            return
        if len(self._refused_at) > 1000:
            self._refused_at.clear()
        self._refused_at[wanted.sender] = now
        # No ids in the body and no mentions: a user named @room must not ping the room.
        content = {"msgtype": "m.notice", "body": REFUSAL_TEXT, "m.mentions": {},
                   "m.relates_to": {"m.in_reply_to": {"event_id": wanted.event_id}}}
        try:
            # One answer per event, however many workers listen (same transaction id).
            await self._call("answer", "PUT",
                             f"/_matrix/client/v3/rooms/{quote(self.room_id, safe='')}/send/"
                             f"m.room.message/{txn_id_for('refusal/' + wanted.event_id)}",
                             json=content)
        except NotifyFailedError as err:
            log.warning("chat_answer_failed", extra={"error": str(err)})

    async def _call(self, step: str, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        return await matrix_call(self.http, step, method, url, **kwargs)


def _dig(value: object, *keys: str) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _event_id(event: object) -> str | None:
    value = event.get("event_id") if isinstance(event, dict) else None
    return value if _is_id(value, "$") else None


async def listen_for_decisions(client: Client, config: WorkerConfig,
                               stop: asyncio.Event) -> None:
    """Act on approvers' replies and reactions in MATRIX_ROOM until `stop` is set (or the
    task is cancelled). Off unless MATRIX_APPROVERS, MATRIX_HOMESERVER and a token are set."""
    if not config.matrix_approvers:
        return
    if not config.matrix_homeserver:
        log.warning("chat_decisions_off", extra={
            "reason": "MATRIX_APPROVERS is set but MATRIX_HOMESERVER is not"})
        return
    cursor = _Cursor()
    failures = 0
    while not stop.is_set():
        try:
            await _listen(client, config, stop, cursor)
            return
        except (NotifyFailedError, _TryLater) as err:
            problem = str(err)
        except Exception as err:  # never let the listener die: nothing else restarts it
            problem = f"unexpected {type(err).__name__}"
            log.exception("chat_listener_error")
        # A connection that handled a batch before failing starts the back-off afresh.
        failures = 1 if cursor.progressed else failures + 1
        cursor.progressed = False
        delay = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (failures - 1))
        log.warning("chat_listener_retrying", extra={"error": problem[:300],
                                                     "retry_in_seconds": delay})
        await _pause(stop, delay)


@dataclass
class _Cursor:
    """Where the room was read up to; kept across reconnections so nothing is skipped."""

    since: str | None = None
    progressed: bool = False


async def _listen(client: Client, config: WorkerConfig, stop: asyncio.Event,
                  cursor: _Cursor) -> None:
    # Read again on every (re)connection: a rotated token file is picked up.
    token = matrix_token(config)
    if not token:
        raise NotifyFailedError("MATRIX_APPROVERS is set but no Matrix access token is configured")
    async with matrix_http(config, token) as http:
        whoami = await matrix_call(http, "whoami", "GET", "/_matrix/client/v3/account/whoami")
        bot = whoami.get("user_id")
        if not _is_id(bot, "@"):
            raise NotifyFailedError("Matrix whoami returned no user id")
        room_id = await resolve_room(http, config)
        listener = RoomListener(client, config, http, str(bot), room_id)
        log.info("chat_decisions_listening", extra={
            "matrix_room": room_id, "matrix_user": bot,
            "approvers": len(listener.approvers), "catching_up": cursor.since is None})
        while not stop.is_set():
            finished, batch = await _unless_stopped(stop, listener.sync(cursor.since))
            if not finished or batch is None:
                return
            next_batch, events = batch
            # The first sync brings the recent past: decisions made while no worker ran.
            await listener.handle(events, catching_up=cursor.since is None)
            # Only once the batch is handled: after a failure it is read again.
            cursor.since, cursor.progressed = next_batch, True
