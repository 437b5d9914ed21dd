"""Complete (or fail) a suspended pipeline activity: the agents' side of the handoff.

    complete_activity.py --task-file TASK.yml success|failed [message]   (preferred)
    complete_activity.py --token-file FILE    success|failed [message]
    complete_activity.py -                    success|failed [message]   (token on stdin)
    TASK_TOKEN=... complete_activity.py       success|failed [message]
    complete_activity.py TOKEN_B64            success|failed [message]   (compatible form;
                                              the token is visible to local users via ps)

Connection settings: the environment wins; with --task-file, what it leaves unset comes
from the task's payload.temporal (address, namespace, TLS server name), and the Vault
credentials, when the environment has none of them, from the worker's env file
(WORKER_ENV_FILE, or the env_file the task names). Works from any directory, through a
symlink, and without the worker's environment.

Exit codes: 0 done · 2 usage, malformed token, or a missing or wrong setting (named) ·
3 activity not found, already completed or timed out · 4 cannot reach Temporal or Vault
(retry later) · 1 anything else. The token is never printed or logged.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import glob
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The project's modules live beside this file, wherever it is run from and through
# whatever symlink (~/scripts/temporal-complete): put that folder first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    from temporalio.client import WorkflowExecutionStatus
    from temporalio.service import RPCError, RPCStatusCode
except ImportError:
    print(f"complete_activity: {sys.executable} cannot import temporalio: run this script "
          f"with the worker's interpreter (payload.complete_command[0] in the task file)",
          file=sys.stderr)
    sys.exit(2)

import policies
from config import (
    TASK_CONNECTION_FACTS,
    VAULT_VARS,
    WorkerConfig,
    load_config,
    read_env_file,
)
from decisions.closed_tasks import waited_task_id
from exceptions import (
    ActivityGoneError,
    CompletionError,
    ConfigError,
    CredentialError,
    CredentialSettingError,
    PhaseFailedError,
    ServerUnreachableError,
    TaskFileError,
    UsageError,
)
from models import BuildPhaseResult
from taskfiles.documents import add_history, read_task, task_time
from taskfiles.lookup import update_task
from taskfiles.safe_io import read_agent_file
from vocabulary import COMPLETED, FAILED, TASK_SEARCH_SUBDIRS

STATUSES = ("success", "failed")


@dataclass(frozen=True)
class ActivityIds:
    """A stage's activity named by its run, for task files that carry no token."""

    task_id: str
    workflow_id: str
    run_id: str
    activity_id: str


MAX_TOKEN_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 100_000
NAMESPACE_NOT_FOUND = "NamespaceNotFoundFailure"  # gRPC error detail of an unknown namespace
OVERALL_TIMEOUT_SECONDS = 15.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="complete_activity.py",
        description="Complete or fail the pipeline activity a task file belongs to.",
        epilog="Exit codes: 0 done, 2 usage/malformed token/missing or wrong setting, 3 "
               "activity not found or already completed, 4 cannot reach Temporal or Vault "
               "(retry later), 1 other error. With --task-file, connection settings the "
               "environment leaves unset come from the task's payload.temporal, and Vault "
               "credentials from the worker's env file.")
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


def locate_task_file(path: Path) -> Path:
    """The task file the command names, or where the platform's tools moved it since
    (archive/ or dead-letters/ beside it: the same name, or a name for the same id)."""
    if os.path.lexists(path):
        return path
    queue_dir = path.parent
    for sub in TASK_SEARCH_SUBDIRS:
        if os.path.lexists(queue_dir / sub / path.name):
            return queue_dir / sub / path.name
    id8 = path.stem.rpartition("-")[2]
    if len(id8) == 8:
        for sub in ("", *TASK_SEARCH_SUBDIRS):
            named = sorted((queue_dir / sub).glob(f"*-{glob.escape(id8)}.yml"))
            if len(named) == 1:
                return named[0]
    return path


def activity_ids(task: dict[str, Any], shown: Path) -> ActivityIds:
    """Where a task without a token comes from: its run and the stage's activity."""
    payload = task.get("payload")
    ids = [payload.get(key) if isinstance(payload, dict) else None
           for key in ("workflow_id", "run_id", "activity_id")]
    task_id = task.get("id")
    if not all(isinstance(value, str) and value for value in ids) or not isinstance(
            task_id, str):
        raise UsageError(f"{shown}: the file names no task token and no workflow_id, run_id "
                         f"and activity_id to complete")
    return ActivityIds(task_id=task_id, workflow_id=str(ids[0]), run_id=str(ids[1]),
                       activity_id=str(ids[2]))


def resolve_token(args: argparse.Namespace, token_arg: str | None, environ: dict[str, str]
                  ) -> tuple[bytes | ActivityIds, dict[str, Any] | None]:
    if args.task_file is not None:
        args.task_file = locate_task_file(args.task_file)
        try:
            task = read_task(args.task_file)
        except TaskFileError as err:
            raise UsageError(str(err)) from None
        payload = task.get("payload")
        token = payload.get("task_token") if isinstance(payload, dict) else None
        if token is None:  # the platform dialect keeps tokens off the shared folder
            return activity_ids(task, args.task_file), task
        if not isinstance(token, str):
            raise UsageError(f"{args.task_file}: payload.task_token must be a string")
        return decode_token(token, f"{args.task_file} payload.task_token"), task
    if args.token_file is not None:
        return decode_token(read_small(args.token_file, "--token-file"), "--token-file"), None
    if token_arg == "env":
        return decode_token(environ["TASK_TOKEN"], "TASK_TOKEN"), None
    if token_arg == "-":
        raw = sys.stdin.buffer.read(MAX_TOKEN_BYTES + 1)
        return decode_token(decode_text(raw, "stdin"), "stdin"), None
    return decode_token(token_arg or "", "the command line"), None


def with_origin(err: ConfigError, origin: Mapping[str, str]) -> ConfigError:
    """The error, saying where the value of the variable it names came from."""
    match = re.match(r"[A-Z][A-Z0-9_]*", str(err))
    where = origin.get(match.group(0)) if match else None
    return ConfigError(f"{err} (set by {where})") if where else err


def task_connection_facts(task: dict[str, Any] | None) -> dict[str, Any]:
    payload = task.get("payload") if task is not None else None
    facts = payload.get("temporal") if isinstance(payload, dict) else None
    if facts is None:
        return {}
    if not isinstance(facts, dict):
        raise ConfigError("payload.temporal in the task file must be a mapping")
    return facts


def cli_settings(task: dict[str, Any] | None,
                 environ: Mapping[str, str]) -> tuple[WorkerConfig, dict[str, str]]:
    """The settings to connect with, and where each connection setting came from.

    The environment wins. The task file's payload.temporal fills in what it leaves unset
    (the worker's own address, namespace and TLS facts). The Vault credentials come as a
    set, from the environment if it has any of them, else from the env file: never some
    from each, so a file cannot redirect credentials the environment holds."""
    given = {name: value for name, value in environ.items() if value.strip()}
    merged = dict(given)
    origin = {name: "the environment" for name in (*TASK_CONNECTION_FACTS.values(), *VAULT_VARS)
              if name in given}
    facts = task_connection_facts(task)
    for key, name in TASK_CONNECTION_FACTS.items():
        value = facts.get(key)
        if value is None or name in given:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        if not isinstance(value, str) or not value.strip() or any(
                ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ConfigError(f"{name}: payload.temporal.{key} in the task file must be a "
                              f"non-empty single-line string")
        merged[name] = value
        origin[name] = f"payload.temporal.{key} in the task file"
    env_file: Path | None = None
    if not any(name in given for name in VAULT_VARS) and merged.get("WORKER_ENV_FILE"):
        raw = merged["WORKER_ENV_FILE"].strip()
        home = merged.get("HOME", "")
        if home and (raw == "~" or raw.startswith("~/")):
            raw = home + raw[1:]
        env_file = Path(raw)
        try:
            file_values = read_env_file(env_file)
        except ConfigError as err:
            raise with_origin(err, origin) from None
        for name in VAULT_VARS:
            if file_values.get(name, "").strip():
                merged[name] = file_values[name]
                origin[name] = f"the env file {env_file}"
    if facts.get("tls") is True and "TEMPORAL_ADDRESS" not in given and not any(
            merged.get(name, "").strip() for name in VAULT_VARS):
        where = f"the env file {env_file}" if env_file else "an env file named by WORKER_ENV_FILE"
        raise ConfigError(f"{', '.join(VAULT_VARS)}: the worker reaches Temporal with mTLS "
                          f"(payload.temporal.tls in the task file), which needs these "
                          f"credentials: set them in the environment or in {where}")
    try:
        return load_config(merged), origin
    except ConfigError as err:
        raise with_origin(err, origin) from None


def rpc_error(err: RPCError, config: WorkerConfig, origin: Mapping[str, str]) -> Exception:
    first = (err.message or "").splitlines()[0][:200] if err.message else ""
    details = err.grpc_status.details if err.grpc_status is not None else []
    if any(detail.type_url.endswith(NAMESPACE_NOT_FOUND) for detail in details):
        # A wrong setting, not a finished activity: fixing it lets the same command work.
        return with_origin(ConfigError(f"TEMPORAL_NAMESPACE: the server at "
                                       f"{config.temporal_address} has no namespace "
                                       f"{config.temporal_namespace!r}"), origin)
    if err.status == RPCStatusCode.NOT_FOUND:
        return ActivityGoneError("activity not found: already completed, timed out, or its "
                                 f"workflow ended ({first})")
    if err.status == RPCStatusCode.INVALID_ARGUMENT:
        return UsageError(f"the server rejected the task token as malformed ({first})")
    if err.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED,
                      RPCStatusCode.CANCELLED,  # the client's own time limit ran out
                      RPCStatusCode.UNAUTHENTICATED, RPCStatusCode.PERMISSION_DENIED):
        return ServerUnreachableError(f"Temporal server refused or did not answer: "
                                      f"{err.status.name} ({first})")
    return CompletionError(f"Temporal error {err.status.name}: {first}")


async def check_waiting_on(client: Any, ids: ActivityIds, config: WorkerConfig,
                           origin: Mapping[str, str]) -> None:
    """A task file without a token completes only the stage its run waits on now: the
    run must be running with the file's activity pending, scheduled (as its history
    records) for this very task. Read from the server alone: no worker need be up."""
    handle = client.get_workflow_handle(ids.workflow_id, run_id=ids.run_id)
    gone = ActivityGoneError(f"workflow {ids.workflow_id} is not waiting on task "
                             f"{ids.task_id}: a task of an earlier attempt, another stage "
                             f"or an ended run completes nothing")
    try:
        described = await handle.describe(rpc_timeout=policies.CLI_RPC_TIMEOUT)
        if described.status != WorkflowExecutionStatus.RUNNING:
            raise ActivityGoneError(f"workflow {ids.workflow_id} has ended "
                                    f"({described.status.name.lower()}); task {ids.task_id} "
                                    f"completes nothing")
        if ids.activity_id not in {activity.activity_id for activity in
                                   described.raw_description.pending_activities}:
            raise gone
        waited = await waited_task_id(handle, ids.workflow_id, ids.run_id, ids.activity_id,
                                      policies.CLI_RPC_TIMEOUT)
    except RPCError as err:
        raise rpc_error(err, config, origin) from None
    if waited != ids.task_id:
        raise gone


async def send(config: WorkerConfig, origin: Mapping[str, str], token: bytes | ActivityIds,
               status: str, message: str) -> None:
    from temporal_client import connect

    try:
        client = await asyncio.wait_for(connect(config),
                                        policies.CLI_CONNECT_TIMEOUT.total_seconds())
    except CredentialSettingError as err:
        raise UsageError(f"credentials: {with_origin(ConfigError(str(err)), origin)}") from None
    except CredentialError as err:
        raise ServerUnreachableError(f"credentials: {err}") from None
    except (TimeoutError, RuntimeError) as err:
        detail = str(err).splitlines()[0][:200] if str(err) else "timed out"
        where = origin.get("TEMPORAL_ADDRESS")
        source = f"set by {where}" if where else "unset: the default"
        raise ServerUnreachableError(f"cannot connect to Temporal at {config.temporal_address} "
                                     f"(TEMPORAL_ADDRESS {source}): {detail}") from None
    if isinstance(token, ActivityIds):
        await check_waiting_on(client, token, config, origin)
        handle = client.get_async_activity_handle(workflow_id=token.workflow_id,
                                                  run_id=token.run_id,
                                                  activity_id=token.activity_id)
    else:
        handle = client.get_async_activity_handle(task_token=token)
    try:
        if status == "success":
            await handle.complete(BuildPhaseResult(status="success", output=message),
                                  rpc_timeout=policies.CLI_RPC_TIMEOUT)
        else:
            await handle.fail(PhaseFailedError.failure(message or "agent reported failure"),
                              rpc_timeout=policies.CLI_RPC_TIMEOUT)
    except RPCError as err:
        raise rpc_error(err, config, origin) from None


def mark_task_file(path: Path, status: str, message: str,
                   completed_by: str) -> None:
    final = COMPLETED if status == "success" else FAILED

    def apply(document: dict[str, Any]) -> None:
        document["result"] = {"output": message, "completed_by": completed_by,
                              "completed_at": task_time(document)}
        add_history(document, status=final, actor=completed_by,
                    note=message[:500] or f"activity reported {status}")

    update_task(path, apply)


def already_closed(task: dict[str, Any] | None, status: str) -> bool:
    """Whether the task file already says what the caller reports, closed with the task
    tools (the worker then finished the stage from the file): a harmless repeat, said so."""
    wanted = COMPLETED if status == "success" else FAILED
    if task is None or task.get("status") != wanted:
        return False
    result = task.get("result")
    by = result.get("completed_by") if isinstance(result, dict) else None
    print(f"complete_activity: nothing to do: task {str(task.get('id'))[:80]} was already "
          f"closed as {wanted}" + (f" by {str(by)[:80]}" if by else "")
          + "; its stage took that close")
    return True


def main(argv: list[str] | None = None) -> int:
    environ = dict(os.environ)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_request:
        return 2 if exit_request.code not in (0, None) else 0
    try:
        token_arg, status, message = split_positionals(args, environ)
        token, task = resolve_token(args, token_arg, environ)
        config, origin = cli_settings(task, environ)
        try:
            asyncio.run(asyncio.wait_for(send(config, origin, token, status, message),
                                         OVERALL_TIMEOUT_SECONDS))
        except ActivityGoneError:
            if already_closed(task, status):
                return 0
            raise
        if task is not None:
            completed_by = (args.completed_by or environ.get("AGENT_NAME")
                            or str(task.get("target_agent") or "agent"))
            try:
                mark_task_file(args.task_file, status, message, completed_by)
            except TaskFileError as err:
                print(f"complete_activity: activity {status} recorded in Temporal, but the "
                      f"task file was not updated: {err}", file=sys.stderr)
                return 1
    except CompletionError as err:
        # Exit 4 is for the agent to act on: the same command works once the server is
        # back, and the task file is untouched until then.
        advice = "; retry later" if isinstance(err, ServerUnreachableError) else ""
        print(f"complete_activity: {err}{advice}", file=sys.stderr)
        return err.exit_code
    except ConfigError as err:
        print(f"complete_activity: configuration error: {err}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"complete_activity: no answer from Temporal within "
              f"{OVERALL_TIMEOUT_SECONDS:.0f}s; retry later", file=sys.stderr)
        return ServerUnreachableError.exit_code
    print(f"complete_activity: activity {'completed' if status == 'success' else 'failed'}")
    return 0


if __name__ == "__main__":
    exit_code = main()
    # The Temporal client's Rust threads can abort CPython's teardown (SIGABRT/SIGSEGV,
    # temporalio/sdk-python#300), replacing the documented exit code; skip the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
