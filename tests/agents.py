"""Test-only checks on what the worker writes. Playing the agents (finding task files,
completing stages, the originating task, waiting) is tests/standin.py, shared with
the demo, the bench and the history recorder."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import jsonschema

from tests.standin import REPO, load_yaml

SCHEMA_PATH = REPO / "schemas" / "task-file.schema.json"


def assert_valid_task_file(path: Path) -> dict[str, Any]:
    """The file matches the published schema and is private (0600)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, f"{path} has mode {oct(mode)}, expected 0o600"
    task = load_yaml(path)
    jsonschema.validate(task, json.loads(SCHEMA_PATH.read_text()))
    assert path.name.endswith(f"-{task['id'][:8]}.yml"), path.name
    return task
