"""Complete (or fail) a suspended pipeline activity: the agents' side of the handoff.

    complete_activity.py --task-file TASK.yml success|failed [message]   (preferred)
    complete_activity.py --token-file FILE    success|failed [message]
    complete_activity.py -                    success|failed [message]   (token on stdin)
    TASK_TOKEN=... complete_activity.py       success|failed [message]
    complete_activity.py TOKEN_B64            success|failed [message]   (compatible form;
                                              the token is visible to local users via ps)

Exit codes: 0 done · 2 usage or malformed token · 3 activity not found, already
completed or timed out · 4 cannot connect or credentials refused · 1 anything else.
The token is never printed or logged.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import os
import sys
from pathlib import Path
from typing import Any

from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

import policies
from config import load_config
from exceptions import (
    PHASE_FAILED,
    ActivityGoneError,
    CompletionError,
    ConfigError,
    ConnectError,
    CredentialError,
    TaskFileError,
    UsageError,
)
from models import BuildPhaseResult
from task_files import add_history, read_agent_file, read_task, timestamp, update_task

STATUSES = ("success", "failed")
MAX_TOKEN_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 100_000
OVERALL_TIMEOUT_SECONDS = 15.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="complete_activity.py",
        description="Complete or fail the pipeline activity a task file belongs to.",
        epilog="Exit codes: 0 done, 2 usage/malformed token, 3 activity not found or already "
               "completed, 4 cannot connect/credentials, 1 other error.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--task-file", type=Path, help="task YAML; token from payload.task_token, "
                        "and the file is marked completed/failed afterwards")
    source.add_argument("--token-file", type=Path, help="file holding the base64 task token")
    parser.add_argument("--completed-by", help="who completed it (default: AGENT_NAME or the "
                        "task's target_agent)")
    parser.add_argument("args", nargs="*", metavar="[TOKEN|-] STATUS [MESSAGE]")
    return parser.parse_args(argv)


def valid_utf8(text: str, what: str) -> str:
    """argv and the environment arrive decoded with surrogateescape: bytes that are not
    UTF-8 become lone surrogates, which no payload or task file can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UsageError(f"{what} is not valid UTF-8 (at character {err.start + 1})") from None
    return text


def split_positionals(args: argparse.Namespace, environ: dict[str, str]) -> tuple[str | None,
                                                                                   str, str]:
    """(token source, status, message); token source None means task/token file."""
    if args.completed_by is not None:
        valid_utf8(args.completed_by, "--completed-by")
    if "AGENT_NAME" in environ:
        valid_utf8(environ["AGENT_NAME"], "AGENT_NAME")
    rest = list(args.args)
    token: str | None = None
    if args.task_file is None and args.token_file is None:
        if rest and rest[0] in STATUSES and environ.get("TASK_TOKEN"):
            token = "env"
        elif rest and rest[0] not in STATUSES:
            # A status in first place means the token was left out, not that the
            # token is "success" (neither status word is valid base64 anyway).
            token = rest.pop(0)
        else:
            raise UsageError("missing task token: use --task-file PATH, --token-file PATH, "
                             "'-' for stdin, or TASK_TOKEN")
    if not rest:
        raise UsageError("missing status: expected 'success' or 'failed'")
    status = rest.pop(0)
    if status not in STATUSES:
        # A long "status" is usually a token in the wrong place: never echo it.
        shown = repr(status) if len(status) <= 16 else f"({len(status)} characters, not shown)"
        raise UsageError(f"unknown status {shown}: expected 'success' or 'failed'")
    message = valid_utf8(" ".join(rest), "the message")
    if len(message) > MAX_MESSAGE_CHARS:
        raise UsageError(f"message longer than {MAX_MESSAGE_CHARS} characters")
    return token, status, message


def decode_token(text: str, where: str) -> bytes:
    compact = "".join(text.split())
    if not compact:
        raise UsageError(f"task token from {where} is empty")
    if len(compact) > MAX_TOKEN_BYTES:
        raise UsageError(f"task token from {where} is longer than {MAX_TOKEN_BYTES} characters")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"task token from {where} is not valid base64") from None


def read_small(path: Path, what: str) -> str:
    """A token file, read as agent-writable input: no link followed, no FIFO waited on,
    at most MAX_TOKEN_BYTES + 1 bytes, UTF-8."""
    try:
        raw = read_agent_file(path, MAX_TOKEN_BYTES)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: cannot read: no such file") from None
    except TaskFileError as err:
        reason = str(err).removeprefix(f"{path}: ").removeprefix("cannot read: ")
        raise UsageError(f"{what} {path}: cannot read: {reason}") from None
    return decode_text(raw, f"{what} {path}")


def decode_text(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{where}: cannot read: not UTF-8 (byte {err.start})") from None


def resolve_token(args: argparse.Namespace, token_arg: str | None,
                  environ: dict[str, str]) -> tuple[bytes, dict[str, Any] | None]:
    if args.task_file is not None:
        try:
            task = read_task(args.task_file)
        except TaskFileError as err:
            raise UsageError(str(err)) from None
        payload = task.get("payload")
        token = payload.get("task_token") if isinstance(payload, dict) else None
        if not isinstance(token, str):
            raise UsageError(f"{args.task_file}: payload.task_token missing")
        return decode_token(token, f"{args.task_file} payload.task_token"), task
    if args.token_file is not None:
        return decode_token(read_small(args.token_file, "--token-file"), "--token-file"), None
    if token_arg == "env":
        return decode_token(environ["TASK_TOKEN"], "TASK_TOKEN"), None
    if token_arg == "-":
        raw = sys.stdin.buffer.read(MAX_TOKEN_BYTES + 1)
        return decode_token(decode_text(raw, "stdin"), "stdin"), None
    return decode_token(token_arg or "", "the command line"), None


def rpc_error(err: RPCError) -> CompletionError:
    first = (err.message or "").splitlines()[0][:200] if err.message else ""
    if err.status == RPCStatusCode.NOT_FOUND:
        return ActivityGoneError("activity not found: already completed, timed out, or its "
                                 f"workflow ended ({first})")
    if err.status == RPCStatusCode.INVALID_ARGUMENT:
        return UsageError(f"the server rejected the task token as malformed ({first})")
    if err.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED,
                      RPCStatusCode.UNAUTHENTICATED, RPCStatusCode.PERMISSION_DENIED):
        return ConnectError(f"Temporal server refused or did not answer: {err.status.name} "
                            f"({first})")
    return CompletionError(f"Temporal error {err.status.name}: {first}")


async def send(token: bytes, status: str, message: str) -> None:
    from temporal_client import connect

    config = load_config()
    try:
        client = await asyncio.wait_for(connect(config),
                                        policies.CLI_CONNECT_TIMEOUT.total_seconds())
    except CredentialError as err:
        raise ConnectError(f"credentials: {err}") from None
    except (TimeoutError, RuntimeError) as err:
        detail = str(err).splitlines()[0][:200] if str(err) else "timed out"
        raise ConnectError(f"cannot connect to Temporal at {config.temporal_address}: "
                           f"{detail}") from None
    handle = client.get_async_activity_handle(task_token=token)
    try:
        if status == "success":
            await handle.complete(BuildPhaseResult(status="success", output=message),
                                  rpc_timeout=policies.CLI_RPC_TIMEOUT)
        else:
            await handle.fail(ApplicationError(message or "agent reported failure",
                                               type=PHASE_FAILED, non_retryable=True),
                              rpc_timeout=policies.CLI_RPC_TIMEOUT)
    except RPCError as err:
        raise rpc_error(err) from None


def mark_task_file(path: Path, task: dict[str, Any], status: str, message: str,
                   completed_by: str) -> None:
    final = "completed" if status == "success" else "failed"

    def apply(document: dict[str, Any]) -> None:
        document["result"] = {"output": message, "completed_by": completed_by,
                              "completed_at": timestamp()}
        add_history(document, status=final, actor=completed_by,
                    note=message[:500] or f"activity reported {status}")

    update_task(path, apply)


def main(argv: list[str] | None = None) -> int:
    environ = dict(os.environ)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_request:
        return 2 if exit_request.code not in (0, None) else 0
    try:
        token_arg, status, message = split_positionals(args, environ)
        token, task = resolve_token(args, token_arg, environ)
        asyncio.run(asyncio.wait_for(send(token, status, message), OVERALL_TIMEOUT_SECONDS))
        if task is not None:
            completed_by = (args.completed_by or environ.get("AGENT_NAME")
                            or str(task.get("target_agent") or "agent"))
            try:
                mark_task_file(args.task_file, task, status, message, completed_by)
            except TaskFileError as err:
                print(f"complete_activity: activity {status} recorded in Temporal, but the "
                      f"task file was not updated: {err}", file=sys.stderr)
                return 1
    except CompletionError as err:
        print(f"complete_activity: {err}", file=sys.stderr)
        return err.exit_code
    except ConfigError as err:
        print(f"complete_activity: configuration error: {err}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"complete_activity: no answer from Temporal within {OVERALL_TIMEOUT_SECONDS:.0f}s",
              file=sys.stderr)
        return 4
    print(f"complete_activity: activity {'completed' if status == 'success' else 'failed'}")
    return 0


if __name__ == "__main__":
    exit_code = main()
    # The Temporal client's Rust threads can abort CPython's teardown (SIGABRT/SIGSEGV,
    # temporalio/sdk-python#300), replacing the documented exit code; skip the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
