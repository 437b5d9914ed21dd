"""tools/temporal-workflow-start.sh: the platform dispatcher's start of a workflow.

    temporal-workflow-start.sh <workflow_type> <workflow_id> <input_json>

exactly as the dispatcher calls it (PROTOCOL.md §5.4); the input is mapped by
dispatcher/start_request.py and validated, the agents checked against AGENT_ROSTER_FILE, and
only then is the workflow started, with the worker's connection (Vault mTLS included).

Settings: this process's environment over the worker's env file (WORKER_ENV_FILE, else
`worker.env` in the repository), as pm2 gives them to the worker: the dispatcher's own
environment is not the worker's.

Exit codes: 0 the run has started (its id and run id on stdout) · 2 refused: arguments,
input, filing task, roster or settings · 3 a workflow with that id is already running ·
4 cannot connect to Temporal or Vault, or credentials refused · 5 no answer in time ·
1 anything else. Anything but 0 is one line on stderr and nothing started; the whole
run ends within the dispatcher's 30 s.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import policies
from config import FIELD_ENV, WorkerConfig, load_config, read_env_file
from dispatcher import roster
from dispatcher.start_request import (
    find_filing_task,
    parse_request,
    pipeline_input,
    plan_input,
    summary_text,
)
from exceptions import (
    ConfigError,
    CredentialError,
    CredentialSettingError,
    StartRefusedError,
    ToolError,
)
from models import BuildPipelineInput
from tools.common import (
    EXIT_ATTENTION,
    EXIT_CONNECT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    REPO,
    exit_process,
)
from vocabulary import BUILD_PLAN_WORKFLOW

NAME = "temporal-workflow-start"
USAGE = f"usage: {NAME}.sh <workflow_type> <workflow_id> <input_json>"
DEFAULT_ENV_FILE = REPO / "worker.env"
ENV_FILE_SETTING = FIELD_ENV["worker_env_file"]


def settings(environ: Mapping[str, str]) -> WorkerConfig:
    """The worker's settings: `environ` over its env file (read as pm2 reads it)."""
    path = Path(environ.get(ENV_FILE_SETTING) or DEFAULT_ENV_FILE)
    try:
        values = dict(read_env_file(path))
        if values and ENV_FILE_SETTING not in environ:
            values[ENV_FILE_SETTING] = str(path)
        values.update(environ)
        return load_config(values)
    except ConfigError as err:
        raise ToolError(f"configuration error: {err}", EXIT_USAGE) from None


def build_input(workflow_type: str, workflow_id: str, input_json: str,
                config: WorkerConfig) -> tuple[BaseModel, dict[str, Any]]:
    """(validated input, the request's fields): refused unless every check passes."""
    fields = parse_request(workflow_type, workflow_id, input_json)
    task_id, _path = find_filing_task(config.task_queue_dir, workflow_id, fields["plan_name"])
    if workflow_type == BUILD_PLAN_WORKFLOW:
        inp: BaseModel = plan_input(fields, task_id)
    else:
        inp = pipeline_input(fields, task_id, config)
    roster.check_start(inp, config)
    return inp, fields


def details_text(inp: BaseModel, fields: dict[str, Any]) -> str:
    lines = [summary_text(inp, fields)]
    if isinstance(inp, BuildPipelineInput):
        lines += [f"- build `{inp.build_name}` → `{inp.target_agent}`",
                  f"- plan: `{inp.plan_path}`", f"- filing (originating) task: `{inp.task_id}`"]
    lines.append("Started by the platform's dispatcher (temporal-workflow-start.sh).")
    return "\n".join(lines)


async def start(workflow_type: str, workflow_id: str, inp: BaseModel, fields: dict[str, Any],
                config: WorkerConfig) -> str:
    """Connect as the worker does and start the run; its run id."""
    from temporalio.common import WorkflowIDConflictPolicy
    from temporalio.exceptions import WorkflowAlreadyStartedError
    from temporalio.service import RPCError

    from temporal_client import connect

    limit = policies.CLI_CONNECT_TIMEOUT.total_seconds()
    where = f"Temporal at {config.temporal_address}" + (
        f" (credentials from Vault at {config.vault_addr})" if config.vault_enabled else "")
    try:
        client = await asyncio.wait_for(connect(config), limit)
    except CredentialSettingError as err:
        raise ToolError(f"credentials: {err}", EXIT_USAGE) from None
    except CredentialError as err:
        raise ToolError(f"credentials: {err}", EXIT_CONNECT) from None
    except TimeoutError:
        raise ToolError(f"cannot connect to {where}: no answer within {limit:g}s",
                        EXIT_CONNECT) from None
    except RuntimeError as err:
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ToolError(f"cannot connect to {where}: {detail}", EXIT_CONNECT) from None
    try:
        handle = await client.start_workflow(
            workflow_type, inp, id=workflow_id, task_queue=config.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            static_summary=summary_text(inp, fields), static_details=details_text(inp, fields),
            rpc_timeout=policies.CLI_RPC_TIMEOUT)
    except WorkflowAlreadyStartedError:
        raise ToolError(f"a workflow with id {workflow_id!r} is already running",
                        EXIT_NOT_FOUND) from None
    except RPCError as err:
        raise ToolError(f"Temporal refused the start: {err.status.name}: "
                        f"{str(err).splitlines()[0][:200]}", EXIT_CONNECT) from None
    return handle.result_run_id or ""


def run(argv: list[str], environ: Mapping[str, str]) -> int:
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return EXIT_OK
    if len(argv) != 3:
        raise ToolError(f"expected 3 arguments, got {len(argv)}; {USAGE}", EXIT_USAGE)
    workflow_type, workflow_id, input_json = argv
    config = settings(environ)
    try:
        inp, fields = build_input(workflow_type, workflow_id, input_json, config)
    except (StartRefusedError, ConfigError) as err:
        raise ToolError(f"refused: {err}", EXIT_USAGE) from None
    deadline = policies.DISPATCHER_START_DEADLINE.total_seconds()
    # Not asyncio.run: it would wait at the end for a Vault request still hanging in its
    # thread; close() leaves that thread behind, and the process exits without it.
    loop = asyncio.new_event_loop()
    try:
        run_id = loop.run_until_complete(asyncio.wait_for(
            start(workflow_type, workflow_id, inp, fields, config), deadline))
    except TimeoutError:
        raise ToolError(f"no answer from Temporal at {config.temporal_address} (or Vault) "
                        f"within {deadline:g}s", EXIT_TIMEOUT) from None
    finally:
        loop.close()
    print(f"{NAME}: started {workflow_type} {workflow_id} (run {run_id}) on task queue "
          f"{config.task_queue}", flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv, dict(os.environ))
    except ToolError as err:
        print(f"{NAME}: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except Exception as err:  # the dispatcher's log gets one line, never a traceback
        first = str(err).splitlines()[0][:300] if str(err) else ""
        print(f"{NAME}: unexpected {type(err).__name__}: {first}", file=sys.stderr, flush=True)
        return EXIT_ATTENTION


if __name__ == "__main__":
    exit_process(main())
