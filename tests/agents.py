"""Test-only checks on what the worker writes, and on how a workflow failed. Playing the
agents (finding task files, completing stages, the originating task, waiting) is
standins/agents.py, shared with the demo, the bench and the history recorder."""

from __future__ import annotations

import json
import stat
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from exceptions import FailureType
from standins.agents import REPO, load_yaml

SCHEMA_PATH = REPO / "schemas" / "task-file.schema.json"


def assert_valid_task_file(path: Path) -> dict[str, Any]:
    """The file matches the published schema and is private (0600)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, f"{path} has mode {oct(mode)}, expected 0o600"
    task = load_yaml(path)
    assert_schema_valid(task)
    assert path.name.endswith(f"-{task['id'][:8]}.yml"), path.name
    return task


def assert_schema_valid(task: dict[str, Any]) -> None:
    """The task matches the published schema; native timestamps (the platform dialect's)
    are checked in the ISO form they load to."""
    shown = json.loads(json.dumps(task, default=lambda value: value.isoformat()))
    jsonschema.validate(shown, json.loads(SCHEMA_PATH.read_text()))


async def application_failure(result: Awaitable[Any],
                              kind: type[FailureType]) -> ApplicationError:
    """The ApplicationError a workflow failed with (`result`: what awaits its result); it
    must be of failure type `kind`."""
    with pytest.raises(WorkflowFailureError) as caught:
        await result
    cause = caught.value.cause
    assert isinstance(cause, ApplicationError), cause
    assert kind.matches(cause), cause
    return cause
