"""The platform dispatcher's start request, mapped to this worker's workflow inputs: the
one place that mapping lives (tools/workflow_start.py applies it; docs/pipeline.md, "Started by
the platform's dispatcher", documents it).

The dispatcher (PROTOCOL.md §5.4) runs `<workflow_type> <workflow_id> <input_json>` for
a task of type `workflow` it picked up (the *filing task*): workflow_id is
`<plan_name>-<first 8 characters of the filing task's id>`, input_json a JSON object,
`plan_name` first, then the filing task's other payload keys in file order
(`workflow_type`, `plan_name` and `task_token` dropped).

BuildPipelineWorkflow, key by key (every other key, such as `context_refs`, `priority`,
`originating_task_id` or `amendments`, is accepted and not used):

  plan_name        -> build_name (required)
  plan_path        -> plan_path; absent: <PLAN_DIR>/<plan_name>.md; neither: refused
  target_agent     -> target_agent; absent: DEFAULT_TARGET_AGENT; neither: refused
  prefab_agent, security_agent, agent_timeout_seconds, pickup_timeout_seconds,
  work_timeout_seconds, block_wait_timeout_seconds,
  reaudit_rounds   -> the same optional fields
  description      -> the run's summary in the Web UI (its first line)
  (workflow id)    -> task_id: the full id of the filing task, found in TASK_QUEUE_DIR by
                      the 8 characters the workflow id ends with (a `workflow` task of
                      this plan_name); none or several: refused

BuildPlanWorkflow: plan_name -> plan_name; phases -> phases (each {number, agent_type,
description, context_refs}; a phase without context_refs gets the task's
`context_refs`); description -> the Web UI summary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from config import FIELD_ENV, WorkerConfig
from exceptions import StartRefusedError, TaskFileError
from models import BuildPipelineInput, BuildPlanInput, check_name, shown
from taskfiles.lookup import find_by_prefix
from taskfiles.visible_text import visible_line
from vocabulary import BUILD_PLAN_WORKFLOW, TASK_WORKFLOW, TOTAL_STAGES, WORKFLOW_TYPES

# The dispatcher's own rules (§5.4), checked again here: the script may be run by hand.
PLAN_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
ID8_RE = re.compile(r"[0-9a-f]{8}")
# Optional BuildPipelineInput fields a filing task may set under the same name.
PIPELINE_OPTIONAL_KEYS = ("prefab_agent", "security_agent", "agent_timeout_seconds",
                          "pickup_timeout_seconds", "work_timeout_seconds",
                          "block_wait_timeout_seconds", "reaudit_rounds")
PLAN_SUFFIX = ".md"
SUMMARY_CHARS = 200
MAX_INPUT_BYTES = 1024 * 1024


def refuse(message: str) -> StartRefusedError:
    return StartRefusedError(message)


def parse_request(workflow_type: str, workflow_id: str, input_json: str) -> dict[str, Any]:
    """The three arguments checked for shape; the input as a dict with a valid plan_name."""
    if workflow_type not in WORKFLOW_TYPES:
        raise refuse(f"unknown workflow type {shown(workflow_type)} "
                     f"(allowed: {', '.join(WORKFLOW_TYPES)})")
    if len(input_json.encode("utf-8", "surrogatepass")) > MAX_INPUT_BYTES:
        raise refuse(f"input is larger than {MAX_INPUT_BYTES} bytes")
    try:
        fields = json.loads(input_json)
    except ValueError as err:
        raise refuse(f"input is not JSON: {str(err).splitlines()[0][:120]}") from None
    if not isinstance(fields, dict):
        raise refuse(f"input must be a JSON object, got {type(fields).__name__}")
    name = fields.get("plan_name")
    if name is None:
        raise refuse("input has no plan_name")
    if not isinstance(name, str) or not PLAN_NAME_RE.fullmatch(name):
        raise refuse(f"invalid plan_name {shown(name)}: must match {PLAN_NAME_RE.pattern}")
    try:
        check_name(name, "plan_name")
    except ValueError as err:
        raise refuse(str(err)) from None
    if not workflow_id.startswith(f"{name}-"):
        raise refuse(f"workflow id {shown(workflow_id)} is not <plan_name>-<id8> for "
                     f"plan_name {name!r}")
    return fields


def filing_task_prefix(workflow_id: str, plan_name: str) -> str:
    """The first 8 characters of the filing task's id, from `<plan_name>-<id8>`."""
    id8 = workflow_id.removeprefix(f"{plan_name}-")
    if not ID8_RE.fullmatch(id8):
        raise refuse(f"workflow id {shown(workflow_id)} does not end in the filing task's id "
                     f"(8 lowercase hex characters after {plan_name}-)")
    return id8


def is_filing_task(plan_name: str) -> Callable[[dict[str, Any]], bool]:
    def accept(task: dict[str, Any]) -> bool:
        payload = task.get("payload")
        return (task.get("task_type") == TASK_WORKFLOW and isinstance(payload, dict)
                and payload.get("plan_name") == plan_name)
    return accept


def find_filing_task(queue_dir: Path, workflow_id: str, plan_name: str) -> tuple[str, Path]:
    """(full id, path) of the one `workflow` task for `plan_name` whose id begins with the
    8 characters `workflow_id` ends with."""
    prefix = filing_task_prefix(workflow_id, plan_name)
    try:
        found = find_by_prefix(queue_dir, prefix, is_filing_task(plan_name))
    except TaskFileError as err:
        raise refuse(f"filing task: {err}") from None
    if not found:
        raise refuse(f"no readable `{TASK_WORKFLOW}` task for plan {plan_name!r} with an id "
                     f"starting {prefix} in {queue_dir} ({FIELD_ENV['task_queue_dir']})")
    if len(found) > 1:
        raise refuse(f"{len(found)} `{TASK_WORKFLOW}` tasks for plan {plan_name!r} have ids "
                     f"starting {prefix}; refusing to pick one")
    path, task = found[0]
    return str(task["id"]), path


def _invalid(kind: str, err: ValidationError, renamed: dict[str, str]) -> StartRefusedError:
    problem = err.errors()[0]
    where = ".".join(renamed.get(str(part), str(part)) for part in problem["loc"]) or "input"
    message = problem["msg"].removeprefix("Value error, ")
    for field, key in renamed.items():
        message = message.replace(field, key)
    return refuse(f"invalid {kind} input: {where}: {message}")


def pipeline_input(fields: dict[str, Any], task_id: str,
                   config: WorkerConfig) -> BuildPipelineInput:
    name = fields["plan_name"]
    plan_path = fields.get("plan_path")
    if plan_path is None and config.plan_dir is not None:
        plan_path = str(config.plan_dir / f"{name}{PLAN_SUFFIX}")
    if plan_path is None:
        raise refuse(f"input has no plan_path and {FIELD_ENV['plan_dir']} is not set")
    target = fields.get("target_agent", config.default_target_agent)
    if target is None:
        raise refuse(f"input has no target_agent and {FIELD_ENV['default_target_agent']} "
                     f"is not set")
    values = {"build_name": name, "plan_path": plan_path, "task_id": task_id,
              "target_agent": target,
              **{key: fields[key] for key in PIPELINE_OPTIONAL_KEYS if key in fields}}
    try:
        return BuildPipelineInput.model_validate(values)
    except ValidationError as err:
        raise _invalid("BuildPipelineWorkflow", err, {"build_name": "plan_name"}) from None


def plan_input(fields: dict[str, Any], task_id: str | None = None) -> BuildPlanInput:
    phases = fields.get("phases")
    if phases is None:
        raise refuse("input has no phases (a BuildPlanWorkflow needs a list of "
                     "{number, agent_type, description})")
    refs = fields.get("context_refs")
    if isinstance(phases, list) and isinstance(refs, list):
        phases = [{"context_refs": refs, **phase} if isinstance(phase, dict) else phase
                  for phase in phases]
    try:
        return BuildPlanInput.model_validate({"plan_name": fields["plan_name"],
                                              "phases": phases, "task_id": task_id})
    except ValidationError as err:
        raise _invalid(BUILD_PLAN_WORKFLOW, err, {}) from None


def summary_text(inp: BaseModel, fields: dict[str, Any]) -> str:
    """The run's one-line summary in the Web UI: the filing task's description, else
    what the run is."""
    description = fields.get("description")
    if isinstance(description, str) and description.strip():
        return visible_line(description, SUMMARY_CHARS)
    if isinstance(inp, BuildPlanInput):
        return f"plan {inp.plan_name}: {len(inp.phases)} phase(s)"
    assert isinstance(inp, BuildPipelineInput)
    return f"build {inp.build_name} → {inp.target_agent} ({TOTAL_STAGES} stages)"
