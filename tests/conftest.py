"""Shared fixtures: one real Temporal dev server per session, a pydantic-converter
client, and per test a fresh task queue, private folders and an in-process worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from config import WorkerConfig, load_config
from decisions.file_watcher import watch_block_decisions
from standins.agents import write_triage
from taskfiles.safe_io import ensure_private_dir
from temporal_client import connect
from tests import temporal_server
from vocabulary import AUDIT_REQUESTS_DIR, DIALECT_V050
from worker import build_worker

SEED_ENV = "TEST_SEED"


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """The test's only source of randomness (e.g. when to SIGKILL a worker). Its seed is
    printed (pytest shows it with the failure) and TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    print(f"\n{request.node.nodeid}: {SEED_ENV}={seed}")
    return random.Random(seed)


@pytest.fixture(scope="session")
def temporal_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("devserver") / "server.log"
    with temporal_server.running(log_path=log) as address:
        yield address


@pytest.fixture(scope="session")
async def client(temporal_address: str) -> Client:
    return await connect(load_config({"TEMPORAL_ADDRESS": temporal_address}))


@dataclass
class PipelineEnv:
    """Everything one test needs to run pipelines: config, client, folders, CLI env."""

    config: WorkerConfig
    client: Client
    env: dict[str, str]
    root: Path

    @property
    def queue_dir(self) -> Path:
        return self.config.task_queue_dir

    @property
    def audit_dir(self) -> Path:
        return self.config.audit_dir

    @property
    def summary_dir(self) -> Path:
        return self.config.summary_dir

    def triage_path(self, build_name: str) -> Path:
        return self.audit_dir / AUDIT_REQUESTS_DIR / build_name / "triage-output.yml"

    def write_triage(self, build_name: str, text: str | bytes) -> Path:
        return write_triage(self.audit_dir, build_name, text)

    async def start(self, workflow: str, arg: object, workflow_id: str | None = None,
                    **kwargs: Any) -> WorkflowHandle[Any, Any]:
        return await self.client.start_workflow(
            workflow, arg, id=workflow_id or f"test-{uuid.uuid4()}",
            task_queue=self.config.task_queue, **kwargs)


def make_env(root: Path, address: str, **extra: str) -> dict[str, str]:
    """A worker's environment with private folders. Task files speak v0.5.0's words unless
    `TASK_FILE_DIALECT` is given: the suite written against v0.5.0's contract keeps
    testing it unchanged; the platform dialect's tests ask for it. TEST_TASK_FILE_DIALECT
    runs the whole suite in another dialect (to see what of it holds there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "VAULT_"))}
    env.update({
        "TASK_FILE_DIALECT": os.environ.get("TEST_TASK_FILE_DIALECT") or DIALECT_V050,
        "TEMPORAL_ADDRESS": address,
        "TASK_QUEUE": f"test-{uuid.uuid4().hex[:12]}",
        "TASK_QUEUE_DIR": str(root / "task-queue"),
        "TEMPORAL_AUDIT_DIR": str(root / "artifacts"),
        "SUMMARY_DIR": str(root / "summaries"),
    })
    env.update(extra)
    return env


@pytest.fixture
def pipeline_env_vars(tmp_path: Path, temporal_address: str) -> dict[str, str]:
    return make_env(tmp_path, temporal_address)


@contextlib.asynccontextmanager
async def serving(client: Client, config: WorkerConfig, **overrides: Any
                  ) -> AsyncIterator[None]:
    """One in-process worker with its task-folder decision watcher, as worker.py runs
    them (the watcher's folder is made first, so it is there before a test looks).
    Workflows run in the SDK's sandbox here, which worker.py skips for speed: every
    workflow test also checks that workflow code makes no non-deterministic call."""
    ensure_private_dir(config.task_queue_dir)
    overrides.setdefault("workflow_runner", SandboxedWorkflowRunner())
    stop = asyncio.Event()
    async with build_worker(client, config, **overrides):
        watcher = asyncio.create_task(watch_block_decisions(client, config, stop))
        try:
            yield
        finally:
            stop.set()
            await watcher


@pytest.fixture
async def pipeline(pipeline_env_vars: dict[str, str], client: Client,
                   tmp_path: Path) -> AsyncIterator[PipelineEnv]:
    """A running in-process worker, with its decision watcher, on a fresh task queue with
    private folders."""
    config = load_config(pipeline_env_vars)
    async with serving(client, config):
        yield PipelineEnv(config=config, client=client, env=pipeline_env_vars, root=tmp_path)
