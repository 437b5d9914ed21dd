"""DEMO AGENT STAND-IN: plays the coding agents' side of one pipeline, for `make demo`.

This is not a coding agent. It watches the task queue for the task files one workflow
writes and finishes each of them the way a real agent must, through
`complete_activity.py --task-file` (a separate process), after writing what that stage
is supposed to leave behind:

  build_prefab, build_plan, security_fix, build_phase  -> success
  security_audit   -> audit.md + triage-output.yml (DEMO_TRIAGE: one flag, one block)
  build_closeout   -> a closeout note; its path is the stage output

    python -m tools.demo_agent --workflow-id ID [--timeout 90]

uses TASK_QUEUE_DIR / TEMPORAL_AUDIT_DIR / TEMPORAL_ADDRESS like the worker, and stops
when the closeout task is done. Exit codes: 0 closeout done · 1 a completion failed
· 2 usage · 5 timed out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vocabulary import AUDIT_REQUESTS_DIR, SUBMITTED, TASK_BUILD_CLOSEOUT, TASK_SECURITY_AUDIT

NAME = "demo-agent"
REPO = Path(__file__).resolve().parent.parent
DEMO_TRIAGE = """\
# Written by the demo agent stand-in (tools/demo_agent.py), not by a security review.
flags:
  - description: "Pin the base image to a digest"
blocks:
  - description: "Demo block: an operator must approve before close-out"
info:
  - "No secrets found in the demo build"
"""


class DemoAgentError(Exception):
    """complete_activity.py refused a completion."""


@dataclass
class DemoAgent:
    """Finishes every task file of one workflow, in the order the stages write them."""

    workflow_id: str
    queue_dir: Path
    audit_dir: Path
    env: Mapping[str, str]
    work_dir: Path
    done: list[str] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    def pending(self) -> list[tuple[Path, dict[str, Any]]]:
        from exceptions import TaskFileError
        from task_files import read_task

        found = []
        for path in sorted(self.queue_dir.glob("*.yml")):
            try:
                task = read_task(path)
            except TaskFileError:
                continue  # replaced between glob and read; the next scan sees it
            payload = task.get("payload")
            if (isinstance(payload, dict) and payload.get("workflow_id") == self.workflow_id
                    and task.get("status") == SUBMITTED and task.get("id") not in self._seen):
                found.append((path, task))
        return found

    def prepare(self, task: dict[str, Any]) -> str:
        """Leave behind what the stage asks for; return the completion message."""
        kind = task["task_type"]
        build = task["payload"].get("build_name", "build")
        if kind == TASK_SECURITY_AUDIT:
            folder = self.audit_dir / AUDIT_REQUESTS_DIR / build
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "audit.md").write_text(f"# Demo audit of {build}\n\nStand-in report.\n")
            (folder / "triage-output.yml").write_text(DEMO_TRIAGE)
            return "audit written (demo)"
        if kind == TASK_BUILD_CLOSEOUT:
            note = self.work_dir / f"{build}-closeout.md"
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(f"# {build} closed out by the demo agent stand-in\n")
            return str(note)
        return f"{kind} done (demo)"

    def complete(self, path: Path, message: str) -> None:
        result = subprocess.run(
            [sys.executable, str(REPO / "complete_activity.py"), "--task-file", str(path),
             "--completed-by", NAME, "success", message],
            env=dict(self.env), capture_output=True, text=True, timeout=60, cwd=REPO)
        if result.returncode != 0:
            raise DemoAgentError(f"complete_activity.py exit {result.returncode}: "
                                 f"{result.stderr.strip()[:300]}")

    async def step(self) -> list[str]:
        """Finish every task waiting right now; return their task types."""
        finished = []
        for path, task in self.pending():
            message = await asyncio.to_thread(self.prepare, task)
            await asyncio.to_thread(self.complete, path, message)
            self._seen.add(str(task["id"]))
            self.done.append(task["task_type"])
            finished.append(task["task_type"])
        return finished

    async def run(self, until: str = TASK_BUILD_CLOSEOUT, timeout: float = 90.0,
                  interval: float = 0.1) -> list[str]:
        deadline = time.monotonic() + timeout
        while until not in self.done:
            await self.step()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {until} task done within {timeout:g}s "
                                   f"(done so far: {', '.join(self.done) or 'nothing'})")
            await asyncio.sleep(interval)
        return self.done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo_agent",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow-id", required=True)
    parser.add_argument("--timeout", type=float, default=90.0)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return 2 if exit_request.code not in (0, None) else 0
    from config import load_config
    from exceptions import ConfigError

    try:
        config = load_config()
    except ConfigError as err:
        print(f"demo_agent: configuration error: {err}", file=sys.stderr)
        return 2
    agent = DemoAgent(workflow_id=args.workflow_id, queue_dir=config.task_queue_dir,
                      audit_dir=config.audit_dir, env=dict(os.environ),
                      work_dir=config.audit_dir / "demo-closeouts")
    try:
        done = asyncio.run(agent.run(timeout=args.timeout))
    except TimeoutError as err:
        print(f"demo_agent: {err}", file=sys.stderr)
        return 5
    except DemoAgentError as err:
        print(f"demo_agent: {err}", file=sys.stderr)
        return 1
    print(f"demo_agent: finished {', '.join(done)}")
    return 0


if __name__ == "__main__":
    from tools.ops import exit_process

    exit_process(main())
