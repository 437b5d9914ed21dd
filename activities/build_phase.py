"""The build_phase activity of BuildPlanWorkflow: one phase, one agent task file."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from activities.dispatch import agent_stage
from config import WorkerConfig
from models import AgentTaskRequest, BuildPhaseResult

BUILD_PHASE = "build_phase"


def build_phase_activity(config: WorkerConfig) -> Callable[[AgentTaskRequest],
                                                           Awaitable[BuildPhaseResult]]:
    return agent_stage(config, BUILD_PHASE)
