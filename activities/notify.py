"""Block notifications: native Matrix (client-server API), legacy script, ntfy.

Each channel is tried a few times inside the stage; whatever still fails is returned
as a failure line so the workflow can record it. A failed notification never fails the
stage: the block must park either way.

The notice itself (`compose_block_notice`) says only what we mean, whatever the triage
author wrote: block text and ids are cleaned like flags are for the fix agent (Unicode-
folded, no control, format or line-separator characters, `<` `>` `&` escaped) and
mentions cannot ping (`@` becomes the fullwidth `＠`, and Matrix events carry an empty
`m.mentions`). It is bounded to NOTICE_MAX_BYTES, so no volume of findings can exceed
argv (SEND_MATRIX_SCRIPT), Matrix or ntfy (4 KiB message) limits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence

import httpx

from activities.matrix import (
    HTTP_TIMEOUT_SECONDS,
    send_matrix,
)
from config import WorkerConfig
from exceptions import NotifyFailedError
from models import Finding, MatrixNoticeRef, PickupReminder
from observability import NOTIFICATION_FAILURES, NOTIFICATIONS_SENT, count
from workflows.instructions import sanitize_finding

log = logging.getLogger(__name__)

ATTEMPTS_PER_CHANNEL = 3
RETRY_DELAY_SECONDS = 1.0
SCRIPT_TIMEOUT_SECONDS = 30.0
PM2_IPC_VARIABLES = ("NODE_CHANNEL_FD", "NODE_CHANNEL_SERIALIZATION_MODE", "NODE_UNIQUE_ID")
# ntfy turns messages over 4096 bytes into attachments; Matrix events stop at 64 KiB and
# one argv string at 128 KiB. Every notice fits the smallest, with room to spare.
NOTICE_MAX_BYTES = 3800
NOTICE_MAX_BLOCKS = 10
NOTICE_BLOCK_CHARS = 300
NOTICE_FIELD_CHARS = 200
NOTICE_MAX_PROBLEMS = 3
_PARTIAL_ENTITY = re.compile(r"&[a-z]*$")


def notice_text(text: str, limit: int) -> str:
    """One line of untrusted text, safe to show in any channel: folded and cleaned as
    flags are (sanitize_finding), at most `limit` characters, mentions neutralized."""
    clean = sanitize_finding(text)
    if len(clean) > limit:
        clean = _PARTIAL_ENTITY.sub("", clean[:limit - 1]) + "…"
    return clean.replace("@", "\uff20")


def _utf8_len(text: str) -> int:
    return len(text.encode())


def _more(omitted: int) -> str:
    return f"- … and {omitted} more block(s) (all of them: triage file, pipeline summary)"


def compose_block_notice(build_name: str, task_id: str, workflow_id: str,
                         blocks: Sequence[Finding], problems: Sequence[str] = (), *,
                         file_decisions: bool = True, platform: bool = False,
                         round_no: int | None = None,
                         changes_allowed: bool = False) -> tuple[str, str]:
    """(title, message) of the notice that a pipeline parked on `blocks`.

    Lists the first NOTICE_MAX_BLOCKS blocks, each cut to NOTICE_BLOCK_CHARS, then
    "… and K more"; `problems` (e.g. the originating task cannot be used) are stated,
    and then the task file is not offered as a way to decide. The message never
    exceeds NOTICE_MAX_BYTES of UTF-8. With `round_no` (pipelines with audit rounds) the
    blocks are numbered, as per-block verdicts name them."""
    build = notice_text(build_name, NOTICE_FIELD_CHARS)
    task = notice_text(task_id, NOTICE_FIELD_CHARS)
    title = f"Build {build}: {len(blocks)} security block(s) need a decision"
    if round_no is not None:
        title += f" (audit round {round_no})"
    footer = [f"Workflow: {notice_text(workflow_id, NOTICE_FIELD_CHARS)}"]
    shown_problems = [notice_text(problem, NOTICE_BLOCK_CHARS)
                      for problem in problems[:NOTICE_MAX_PROBLEMS]]
    if len(problems) > NOTICE_MAX_PROBLEMS:
        shown_problems.append(f"and {len(problems) - NOTICE_MAX_PROBLEMS} more problem(s)")
    footer += [f"Problem: {problem}" for problem in shown_problems]
    if file_decisions and not problems and platform:
        footer.append(f"Approve task {task} (`!task approve`, the widget or the plugin) or "
                      f"use the approve_blocks update; Cancel it to reject.")
    elif file_decisions and not problems:
        footer.append(f"Approve: set task {task} to status 'approved' (or use the "
                      f"approve_blocks update); reject with status 'rejected'.")
    else:
        footer.append("Approve with the approve_blocks update, reject with reject_blocks "
                      f"(originating task {task}).")
    if round_no is not None:
        footer.append("Per block: verdicts accept/reject/change by number (block_verdicts in "
                      "the task, or the update's verdicts)."
                      + (" Request changes: request_changes update, or changes_requested "
                         "in the task." if changes_allowed else ""))
    budget = NOTICE_MAX_BYTES - _utf8_len(title) - sum(_utf8_len(line) + 1 for line in footer)
    listed: list[str] = []
    for number, block in enumerate(blocks[:NOTICE_MAX_BLOCKS], start=1):
        bullet = f"{number}." if round_no is not None else "-"
        line = f"{bullet} {notice_text(block.description, NOTICE_BLOCK_CHARS)}"
        after = len(blocks) - len(listed) - 1
        # Keep room for the "and K more" line whenever something would follow.
        need = _utf8_len(line) + 1 + (_utf8_len(_more(after)) + 1 if after else 0)
        if need > budget:
            break
        listed.append(line)
        budget -= _utf8_len(line) + 1
    if len(listed) < len(blocks):
        listed.append(_more(len(blocks) - len(listed)))
    message = "\n".join([title, *listed, *footer])
    if _utf8_len(message) > NOTICE_MAX_BYTES:  # only with long non-ASCII ids and paths
        message = message.encode()[:NOTICE_MAX_BYTES - 3].decode(errors="ignore") + "…"
    return title, message

def compose_pickup_reminder(reminder: PickupReminder) -> tuple[str, str]:
    """(title, message) of a reminder that an agent task waits for someone to pick it up."""
    build = notice_text(reminder.build_name, NOTICE_FIELD_CHARS)
    agent = notice_text(reminder.agent, NOTICE_FIELD_CHARS)
    title = f"Build {build}: {reminder.stage} waits for pickup by {agent}"
    message = "\n".join([
        title,
        f"Task {notice_text(reminder.task_id, NOTICE_FIELD_CHARS)} has waited since "
        f"{reminder.since:%Y-%m-%d %H:%M:%S}Z and nobody has claimed it (status "
        f"in-progress). Hand it to {agent}, or cancel the build.",
        f"Reminder {reminder.reminder} of {reminder.of}. "
        f"Workflow: {notice_text(reminder.workflow_id, NOTICE_FIELD_CHARS)}"])
    return title, message


async def send_script(config: WorkerConfig, message: str) -> None:
    script = str(config.send_matrix_script)
    env = {k: v for k, v in os.environ.items() if k not in PM2_IPC_VARIABLES}
    try:
        process = await asyncio.create_subprocess_exec(
            script, config.matrix_room, message, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    except OSError as err:
        raise NotifyFailedError(f"SEND_MATRIX_SCRIPT {script}: {err.strerror}",
                                retryable=False) from None
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), SCRIPT_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise NotifyFailedError(
            f"SEND_MATRIX_SCRIPT timed out after {SCRIPT_TIMEOUT_SECONDS:.0f}s") from None
    if process.returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise NotifyFailedError(f"SEND_MATRIX_SCRIPT exited {process.returncode}: {tail[0][:200]}")


async def send_ntfy(config: WorkerConfig, title: str, message: str) -> None:
    headers = {"Title": title, "Tags": "warning,construction", "Priority": "high"}
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_SECONDS) as http:
            response = await http.post(str(config.ntfy_url), content=message.encode(),
                                       headers=headers)
    except httpx.HTTPError as err:
        raise NotifyFailedError(f"ntfy: {type(err).__name__}") from None
    if response.status_code >= 400:
        raise NotifyFailedError(f"ntfy: HTTP {response.status_code}",
                                retryable=response.status_code >= 500
                                or response.status_code in (408, 429))


async def _with_retries(name: str, send: Callable[[], Awaitable[None]]) -> str | None:
    """Try one channel; return None on success or the last failure message."""
    last = ""
    for attempt in range(1, ATTEMPTS_PER_CHANNEL + 1):
        try:
            await send()
            return None
        except NotifyFailedError as err:
            last = str(err)
            log.warning("notification_failed", extra={"channel": name, "attempt": attempt,
                                                      "error": last})
            if not err.retryable:
                break
        if attempt < ATTEMPTS_PER_CHANNEL:
            await asyncio.sleep(RETRY_DELAY_SECONDS * attempt)
    return f"{name}: {last}"


async def notify_all(config: WorkerConfig, title: str, message: str, txn_seed: str,
                     pipeline: MatrixNoticeRef | None = None) -> tuple[list[str], list[str]]:
    """Send through every configured channel; return (delivered, failures)."""
    channels: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    if config.matrix_homeserver:
        channels.append(("matrix", lambda: send_matrix(config, message, txn_seed, pipeline)))
    elif config.send_matrix_script:
        channels.append(("matrix-script", lambda: send_script(config, message)))
    if config.ntfy_url:
        channels.append(("ntfy", lambda: send_ntfy(config, title, message)))
    if not channels:
        unset = ("no notification channel configured (set MATRIX_HOMESERVER, "
                 "SEND_MATRIX_SCRIPT or NTFY_URL)")
        log.warning("notification_failed", extra={"channel": "none", "error": unset})
        count(NOTIFICATION_FAILURES, channel="none")
        return [], [unset]
    delivered: list[str] = []
    failures: list[str] = []
    # Channels are independent: a slow or dead one must not delay the others.
    results = await asyncio.gather(*(_with_retries(name, send) for name, send in channels))
    for (name, _), failure in zip(channels, results, strict=True):
        if failure is None:
            delivered.append(name)
            count(NOTIFICATIONS_SENT, channel=name)
        else:
            failures.append(failure)
            count(NOTIFICATION_FAILURES, channel=name)
    return delivered, failures
