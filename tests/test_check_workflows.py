"""tools/check_workflows.py: the static check that stands in for the SDK's sandbox, which
worker.py leaves off. It must pass today's workflows and refuse each planted slip."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.check_workflows import WORKFLOW_DIR, check_source, main

REPO = Path(__file__).resolve().parent.parent
PIPELINE = WORKFLOW_DIR / "build_pipeline_workflow.py"


def plant(source: str, method: str, line: str) -> tuple[str, int]:
    """`source` with `line` as the first statement of `method`; and that line's number."""
    tree = ast.parse(source)
    target = next(node for node in ast.walk(tree)
                  if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef)
                  and node.name == method)
    first = target.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        first = target.body[1]  # after the docstring
    lines = source.splitlines()
    lines.insert(first.lineno - 1, " " * first.col_offset + line)
    return "\n".join(lines) + "\n", first.lineno


def test_todays_workflows_pass() -> None:
    assert main([]) == 0


def test_lint_runs_the_check() -> None:
    makefile = (REPO / "Makefile").read_text()
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "-m tools.check_workflows" in lint


def test_a_planted_datetime_now_in_the_pipeline_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = PIPELINE.read_text().replace("from datetime import timedelta",
                                          "from datetime import datetime, timedelta", 1)
    planted, line = plant(source, "run", "started = datetime.now()")
    copy = tmp_path / "build_pipeline_workflow.py"
    copy.write_text(planted)

    assert main([str(copy)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{copy}:{line}:{planted.splitlines()[line - 1].index('datetime') + 1}: "
        f"datetime.datetime.now: not deterministic in workflow code (use workflow.now())"]
    assert err == "check_workflows: 1 non-deterministic use(s) in workflow code\n"


@pytest.mark.parametrize(("planted", "named"), [
    ("import time\nx = time.monotonic()", "imports time"),
    ("from time import sleep", "imports time"),
    ("import random\nx = random.random()", "imports random"),
    ("import os\nx = os.environ['HOME']", "imports os"),
    ("from pathlib import Path", "imports pathlib"),
    ("import threading", "imports threading"),
    ("import httpx", "imports httpx"),
    ("import socket as s", "imports socket"),
    ("from taskfiles.safe_io import read_agent_file", "imports taskfiles.safe_io"),
    ("import datetime\nx = datetime.datetime.utcnow()", "datetime.datetime.utcnow"),
    ("from datetime import date\nx = date.today()", "datetime.date.today"),
    ("import uuid\nx = uuid.uuid4()", "uuid.uuid4"),
    ("from uuid import uuid1 as u\nx = u()", "uuid.uuid1"),
    ("import asyncio\nasync def f():\n    await asyncio.sleep(1)", "asyncio.sleep"),
    ("x = open('/etc/passwd').read()", "open"),
    ("x = hash('build')", "hash"),
    ("for x in {'a', 'b'}:\n    pass", "iterates a set"),
    ("x = [y for y in set('ab')]", "iterates a set"),
    ("s: set[str] = set()\nx = list(s)", "iterates a set"),
    ("def f(names: frozenset[str]) -> str:\n    return ','.join(names)", "iterates a set"),
    ("class W:\n    def f(self):\n        self.done = {1}\n        for n in self.done:\n"
     "            pass", "iterates a set"),
])
def test_each_kind_of_slip_is_refused(tmp_path: Path, planted: str, named: str) -> None:
    findings = check_source(planted + "\n", tmp_path / "w.py")
    assert len(findings) == 1, findings
    assert named in findings[0].message


def test_deterministic_code_passes(tmp_path: Path) -> None:
    source = """
from datetime import datetime, timedelta
import asyncio
from temporalio import workflow

async def f(blocks: set[str], text: str) -> list[str]:
    now = workflow.now()
    await workflow.sleep(timedelta(seconds=1))
    await asyncio.wait_for(asyncio.shield(g()), 1)
    when = datetime.fromisoformat(text)
    seen = set(blocks)
    ok = "a" in seen and now > when
    return [b for b in sorted(blocks | seen) if ok] + list({"k": 1})

class State:
    input: str | None = None

def echo(input: str) -> str:
    return input
"""
    assert check_source(source, tmp_path / "w.py") == []


def test_a_file_that_does_not_parse_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    assert main([str(broken)]) == 2
    assert capsys.readouterr().err.startswith(f"check_workflows: cannot check {broken}:")


def test_command_line_checks_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "workflows"
    shutil.copytree(WORKFLOW_DIR, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "extra.py").write_text("import random\n")
    done = subprocess.run([sys.executable, "-m", "tools.check_workflows", str(folder)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stdout == (f"{folder / 'extra.py'}:1:1: imports random: not deterministic "
                           f"in workflow code (use workflow.random())\n")
