"""tools/start-build (docs/operators.md, "Starting builds"): input validated before anything
starts, the workflow id the first stdout line, a static summary and details for the Web UI."""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from dispatcher import roster
from exceptions import ConfigError, StartRefusedError, TaskNotFoundError, ToolError
from models import BuildPipelineInput, BuildPlanInput, PhaseSpec
from taskfiles.documents import SOURCE_AGENT, new_platform_task, new_task
from taskfiles.lookup import find_task, write_task
from tools.common import EXIT_NOT_FOUND, EXIT_USAGE, cli_json, worker_config
from vocabulary import BUILD_PIPELINE_WORKFLOW as PIPELINE

if TYPE_CHECKING:
    from config import WorkerConfig
from vocabulary import BUILD_PLAN_WORKFLOW as PLAN
from vocabulary import (
    DEFAULT_TASK_QUEUE,
    IN_PROGRESS,
    PLATFORM_TASK_BUILD,
    TASK_BUILD_REQUEST,
    TOTAL_STAGES,
)

START_OPTIONS = ("workflow_id", "task_queue", "workflow")
ORIGIN_SOURCE = "start-build"
PIPELINE_FLAGS = ("build_name", "plan_path", "task_id", "target_agent", "prefab_agent",
                  "security_agent", "block_wait_timeout_seconds", "block_poll_interval_seconds",
                  "reaudit_rounds", "agent_timeout_seconds", "pickup_timeout_seconds",
                  "work_timeout_seconds")
# tools/ops adds these to its start-build command.
OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--file",), {"type": Path, "help": "YAML file with the input fields at top level (a "
                   "`phases` list makes a plan), optional workflow_id and task_queue"}),
    *[((f"--{name.replace('_', '-')}",),
       {"type": float} if name.endswith("_seconds")
       else {"type": int} if name == "reaudit_rounds" else {}) for name in PIPELINE_FLAGS],
    (("--create-task",), {"action": "store_true", "help": "write a minimal originating task "
                          "into TASK_QUEUE_DIR and use its id (instead of --task-id)"}),
    (("--plan-name",), {}),
    (("--phase",), {"action": "append", "default": [], "metavar": "N:AGENT:DESCRIPTION"}),
    (("--workflow-id",), {"help": "default: build-<name>-<random> / plan-<name>-<random>"}),
    (("--task-queue",), {"help": f"default: TASK_QUEUE or {DEFAULT_TASK_QUEUE}"}),
    (("--wait",), {"action": "store_true", "help": "wait for the result, print it, exit "
                   "1 if the workflow failed or its outcome is not success"}),
    (("--timeout",), {"type": float, "help": "seconds --wait waits (default: forever)"}),
]


def parse_phase(text: str) -> dict[str, Any]:
    number, sep, rest = text.partition(":")
    agent, sep2, description = rest.partition(":")
    if not (sep and sep2) or not number.strip().isdigit():
        raise ToolError(f"--phase {text!r}: expected NUMBER:AGENT:DESCRIPTION", EXIT_USAGE)
    return {"number": int(number), "agent_type": agent.strip(), "description": description}


def fields_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    if args.plan_name or args.phase:
        return {"plan_name": args.plan_name, "phases": [parse_phase(p) for p in args.phase]}
    return {name: getattr(args, name) for name in PIPELINE_FLAGS
            if getattr(args, name) is not None}


def fields_from_file(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ToolError(f"{path}: cannot read: {err}", EXIT_USAGE) from None
    except yaml.YAMLError as err:
        raise ToolError(f"{path}: not valid YAML: {str(err).splitlines()[0]}",
                        EXIT_USAGE) from None
    if not isinstance(document, dict):
        raise ToolError(f"{path}: top level must be a mapping of input fields", EXIT_USAGE)
    return document


def build_request(args: argparse.Namespace) -> tuple[str, BaseModel, dict[str, Any]]:
    """(workflow type, validated input, start options) from the file or the flags.

    With --create-task the input gets a fresh task id and the option `create_task`."""
    flagged = fields_from_flags(args)
    if args.file is not None and flagged:
        raise ToolError("give either --file or the input flags, not both", EXIT_USAGE)
    fields = fields_from_file(args.file) if args.file is not None else flagged
    if not fields:
        raise ToolError("nothing to start: give --file, or --build-name ... for a pipeline, "
                        "or --plan-name/--phase for a plan", EXIT_USAGE)
    options = {key: fields.pop(key) for key in START_OPTIONS if key in fields}
    kind = options.pop("workflow", None) or (PLAN if "phases" in fields else PIPELINE)
    if kind not in (PIPELINE, PLAN):
        raise ToolError(f"workflow must be {PIPELINE} or {PLAN}, not {kind!r}", EXIT_USAGE)
    if args.create_task:
        if kind != PIPELINE:
            raise ToolError("--create-task is for a BuildPipelineWorkflow", EXIT_USAGE)
        if "task_id" in fields:
            raise ToolError("give either a task id or --create-task, not both", EXIT_USAGE)
        fields["task_id"] = str(uuid.uuid4())
        options["create_task"] = True
    model = BuildPlanInput if kind == PLAN else BuildPipelineInput
    try:
        if kind == PLAN and isinstance(fields.get("phases"), list):
            fields["phases"] = [PhaseSpec.model_validate(p) for p in fields["phases"]]
        inp = model.model_validate(fields)
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "input"
        raise ToolError(f"invalid {kind} input: {where}: "
                        f"{problem['msg'].removeprefix('Value error, ')}", EXIT_USAGE) from None
    if args.workflow_id:
        options["workflow_id"] = args.workflow_id
    if args.task_queue:
        options["task_queue"] = args.task_queue
    return kind, inp, options


def web_ui_text(inp: BaseModel) -> tuple[str, str]:
    """(static summary, static details) shown for the whole life of the workflow."""
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    if isinstance(inp, BuildPlanInput):
        summary = f"plan {inp.plan_name}: {len(inp.phases)} phase(s)"
        lines = [f"**{inp.plan_name}** ({len(inp.phases)} phases)"] + [
            f"- phase {p.number} → `{p.agent_type}`: {' '.join(p.description.split())[:120]}"
            for p in inp.phases]
    else:
        assert isinstance(inp, BuildPipelineInput)
        summary = f"build {inp.build_name} → {inp.target_agent} ({TOTAL_STAGES} stages)"
        lines = [f"**{inp.build_name}** → `{inp.target_agent}`",
                 f"- plan: `{inp.plan_path}`", f"- originating task: `{inp.task_id}`",
                 "- approve blocks: `tools/approve-build --workflow-id <this id>`"]
    lines.append(f"Started by `{who}` with tools/start-build at {when}.")
    return summary, "\n".join(lines)


def originating_task(inp: BuildPipelineInput, workflow_id: str,
                     config: WorkerConfig | None = None) -> dict[str, Any]:
    """The minimal originating task: addressed to the worker, so no agent takes it as work.
    In the platform dialect it is a `build` task `in-progress`, the status the dispatcher
    leaves alone (a `submitted` one it would route, and dead-letter)."""
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    summary = f"Build {inp.build_name} ({inp.plan_path}) → {inp.target_agent}"
    payload: dict[str, Any] = {"build_name": inp.build_name, "plan_path": inp.plan_path,
               "target_agent": inp.target_agent}
    if config is not None and config.platform_dialect:
        payload = {"description": summary, "context_refs": [inp.plan_path],
                   "priority": "normal", **payload}
        task = new_platform_task(task_id=inp.task_id, target_agent=SOURCE_AGENT,
                                 task_type=PLATFORM_TASK_BUILD, summary=summary,
                                 payload=payload, workflow_mode=config.task_workflow_mode)
        task["status"] = task["history"][0]["status"] = IN_PROGRESS
    else:
        task = new_task(task_id=inp.task_id, target_agent=SOURCE_AGENT,
                        task_type=TASK_BUILD_REQUEST, summary=summary, payload=payload)
    task["source_agent"] = ORIGIN_SOURCE
    task["history"][0].update(actor=who, note=f"build requested with tools/start-build "
                                              f"(workflow {workflow_id})")
    return task


def warn_if_no_task_file(inp: BuildPipelineInput) -> None:
    queue_dir = worker_config().task_queue_dir
    try:
        find_task(queue_dir, inp.task_id)
    except TaskNotFoundError:
        print(f"start-build: warning: no task file with id {inp.task_id!r} in {queue_dir} "
              f"(TASK_QUEUE_DIR): if the build hits blocks, nobody is told through it and "
              f"only approve-build / reject-build can decide; --create-task writes one",
              file=sys.stderr, flush=True)


def check_roster(inp: BaseModel, env: dict[str, str] | None) -> None:
    """With AGENT_ROSTER_FILE set, refuse (exit 2) a start whose agents it lacks."""
    try:
        roster.check_start(inp, worker_config(env))
    except (StartRefusedError, ConfigError) as err:
        raise ToolError(f"refused: {err}", EXIT_USAGE) from None


def start(kind: str, inp: BaseModel, options: dict[str, Any],
          env: dict[str, str] | None = None) -> str:
    """Start the workflow (`temporal workflow start`), print its id and return it.

    Refused first if an agent is not on the roster (AGENT_ROSTER_FILE). A pipeline's
    originating task is written first with option `create_task`, else looked for (a
    warning when missing) with option `check_task`."""
    check_roster(inp, env)
    name = getattr(inp, "build_name", None) or getattr(inp, "plan_name", "build")
    prefix = "plan" if kind == PLAN else "build"
    workflow_id = options.get("workflow_id") or f"{prefix}-{name}-{uuid.uuid4().hex[:8]}"
    queue = options.get("task_queue") or (env or os.environ).get("TASK_QUEUE") or DEFAULT_TASK_QUEUE
    summary, details = web_ui_text(inp)
    created: Path | None = None
    if isinstance(inp, BuildPipelineInput) and options.get("create_task"):
        # Before the start: the pipeline may look for it at once.
        config = worker_config(env)
        created = write_task(config.task_queue_dir, originating_task(inp, workflow_id, config),
                             may_exist=False)
    elif isinstance(inp, BuildPipelineInput) and options.get("check_task"):
        warn_if_no_task_file(inp)
    try:
        # The input goes in a private file: an argument is capped at 128 KiB (a plan may
        # be larger) and any local user can read another's argv.
        with tempfile.NamedTemporaryFile("w", prefix="start-build-", suffix=".json") as file:
            file.write(inp.model_dump_json())
            file.flush()
            cli_json("workflow", "start", "--type", kind, "--workflow-id", workflow_id,
                     "--fail-existing", "--task-queue", queue, "--input-file", file.name,
                     "--static-summary", summary, "--static-details", details, env=env)
    except BaseException as err:
        if created is not None:
            created.unlink(missing_ok=True)  # no pipeline will ever use it
        if isinstance(err, ToolError) and "already running" in str(err):
            raise ToolError(f"a workflow with id {workflow_id!r} is already running",
                            EXIT_NOT_FOUND) from None
        raise
    if created is not None and isinstance(inp, BuildPipelineInput):
        print(f"start-build: originating task {inp.task_id} written to {created}",
              file=sys.stderr, flush=True)
    print(workflow_id, flush=True)
    return workflow_id
