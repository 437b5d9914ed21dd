"""Agents and operators of the platform, played through the task tools stand-in only
(standins/task_tools.py): the dispatcher routes our tasks, agents list the approved ones,
claim them and close them with `update_task`, operators approve or cancel. No CLI, no
Temporal credentials, no token: what an agent on the platform has."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standins.task_tools import Dispatcher, TaskTools
from taskfiles.documents import SOURCE_AGENT
from vocabulary import CLOSE_BUILD, REQUEST_SECURITY_AUDIT

# What each agent stage's close carries as its output (close-out: the document's path).
CLOSEOUT_DOCUMENT = "/srv/builds/closeout.md"


@dataclass
class PlatformAgents:
    """Routes, claims and closes one pipeline's tasks, one tick at a time."""

    tools: TaskTools
    dispatcher: Dispatcher
    workflow_id: str
    triage: str = "blocks: []\nflags: []\ninfo: []\n"
    # stage -> how to close: "completed" or "failed"
    outcomes: dict[str, str] = field(default_factory=dict)
    closed: list[str] = field(default_factory=list)
    # stage -> the task record as the agent listed it
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)
    # tasks the agents leave alone for now (e.g. to close them another way)
    hold: Callable[[dict[str, Any]], bool] = lambda _task: False

    def ours(self, task: dict[str, Any]) -> bool:
        payload = task.get("payload") or {}
        return (task.get("source_agent") == SOURCE_AGENT
                and payload.get("workflow_id") == self.workflow_id)

    def step(self) -> None:
        self.dispatcher.tick()
        for task in self.tools.list_tasks(status="approved", limit=200):
            if self.ours(task) and not self.hold(task):
                self.work(task)

    def work(self, task: dict[str, Any]) -> None:
        agent, payload = task["target_agent"], task["payload"]
        stage = payload["stage"]
        claim = self.tools.update_task(task["id"], "in-progress", agent, note="on it")
        assert claim["ok"], claim
        if stage == REQUEST_SECURITY_AUDIT:
            triage = Path(payload["triage_path"])
            triage.parent.mkdir(parents=True, exist_ok=True)
            triage.write_text(self.triage)
            Path(payload["audit_report_path"]).write_text("# audit\n")
        status = self.outcomes.get(stage, "completed")
        output = CLOSEOUT_DOCUMENT if stage == CLOSE_BUILD else f"{stage} done"
        if status == "failed":
            output = f"{stage} could not be done"
        closed = self.tools.update_task(task["id"], status, agent, note="done", output=output)
        assert closed["ok"], closed
        self.seen[stage] = task
        self.closed.append(stage)

    async def run(self, until: Callable[[], bool], timeout: float = 90.0,
                  interval: float = 0.2) -> None:
        """Tick and work until `until()` holds (or fail after `timeout` seconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not until():
            if loop.time() > deadline:
                raise AssertionError(f"agents gave up after {timeout}s; closed {self.closed}")
            await asyncio.to_thread(self.step)
            await asyncio.sleep(interval)
