"""How a failed stage or a refused input is put into words and carried, inside workflows.

Pure functions and one exception class: safe in the workflow sandbox."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    FailureError,
    TimeoutError,
)

from exceptions import FailureType
from models import BlockDecision


class StageFailed(Exception):
    """A stage ended the pipeline; `kind` is the failure type the workflow fails with."""

    def __init__(self, stage: str, message: str, kind: type[FailureType]) -> None:
        super().__init__(message)
        self.stage = stage
        self.kind = kind


# How a local activity's failure reaches the workflow: as itself, not inside an
# ActivityError as an ordinary activity's does.
LOCAL_ACTIVITY_FAILURES = (ApplicationError, TimeoutError, CancelledError)


def describe_activity_failure(err: ActivityError | FailureError) -> tuple[str, str]:
    """(message, failure type) of a failed activity, for humans and for matching."""
    cause = err.cause if isinstance(err, ActivityError) else err
    if isinstance(cause, ApplicationError):
        return cause.message, cause.type or "ApplicationError"
    if isinstance(cause, TimeoutError):
        return f"timed out ({cause.type.name if cause.type else 'timeout'})", "TimeoutError"
    if isinstance(cause, CancelledError):
        return "cancelled", "CancelledError"
    return str(cause or err), type(cause or err).__name__


def span(delta: timedelta) -> str:
    """A limit for humans: 1.5s, 30m, 4h, 1d 2h."""
    seconds = delta.total_seconds()
    if seconds < 60:
        return f"{seconds:g}s"
    if seconds < 3600:
        return f"{seconds / 60:g}m"
    if seconds < 86400:
        return f"{seconds / 3600:g}h"
    days, rest = divmod(seconds, 86400)
    return f"{days:g}d" + (f" {rest / 3600:g}h" if rest else "")


def validation_message(err: ValidationError) -> str:
    parts = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "input"
        parts.append(f"{where}: {problem['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def coerce_decision(raw: Any) -> BlockDecision:
    """approve_blocks/reject_blocks accept a note string, a BlockDecision, or nothing."""
    if raw is None:
        return BlockDecision()
    if isinstance(raw, BlockDecision):
        return raw
    if isinstance(raw, str):
        return BlockDecision(note=raw)
    return BlockDecision.model_validate(raw)


def decider_label(choice: BlockDecision) -> str:
    """Who decided, as recorded: a file decision is the file's, whatever it claims."""
    if choice.source == "task_file":
        return "task file"
    return choice.decided_by
