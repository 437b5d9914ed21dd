"""The build_phase activity's payload fields (the activity itself is
`PipelineActivities.build_phase`): one phase of a plan, one agent task file.

Besides our own fields the payload carries v0.5.0's `phase_number` and `description`,
so agents and scripts written for v0.5.0 keep reading them.
"""

from __future__ import annotations

from typing import Any

from models import AgentTaskRequest
from workflows import instructions

_MARK = "\x00description\x00"  # stands in for the description; no plan name holds a NUL


def description_from_instruction(instruction: str, plan_name: str, number: int,
                                 refs: list[str]) -> str | None:
    """The phase description inside an instruction built by `instructions.build_phase`:
    the same builder run around a marker gives the exact text before and after it."""
    prefix, _, suffix = instructions.build_phase(plan_name, number, _MARK, refs).partition(_MARK)
    if (len(instruction) < len(prefix) + len(suffix) or not instruction.startswith(prefix)
            or not instruction.endswith(suffix)):
        return None
    return instruction[len(prefix):len(instruction) - len(suffix)]


def phase_fields(request: AgentTaskRequest) -> dict[str, Any]:
    """v0.5.0's `phase_number` and `description` (and `plan_name`, `context_refs`)."""
    extra = request.extra_payload
    number = extra.get("phase_number", extra.get("phase"))
    plan_name = extra.get("plan_name", request.build_name)
    refs = extra.get("context_refs", [])
    fields: dict[str, Any] = {"plan_name": plan_name, "context_refs": refs}
    if isinstance(number, int):
        fields["phase_number"] = number
    description = extra.get("description")
    if not isinstance(description, str) and isinstance(number, int) and isinstance(refs, list):
        description = description_from_instruction(request.instruction, str(plan_name),
                                                   number, [str(ref) for ref in refs])
    if isinstance(description, str):
        fields["description"] = description
    return fields
