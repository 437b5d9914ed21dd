"""The activity contracts (workflows/contracts.py) against what the worker registers:
the same names (the ones every recorded history schedules), the same typed signatures,
every contract implemented, nothing registered outside a contract."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.build_pipeline_activities import PipelineActivities
from config import WorkerConfig, load_config
from exceptions import InvalidInputError
from vocabulary import BUILD_PHASE, STAGE_NUMBERS
from worker import worker_activities
from workflows.contracts import BuildPipelineActivities, BuildPlanActivities

CONTRACTS = (BuildPipelineActivities, BuildPlanActivities)
HISTORIES = Path(__file__).resolve().parent / "histories"


def declared(contract: type) -> dict[str, Callable[..., Any]]:
    return {name: member for name, member in vars(contract).items()
            if hasattr(member, "__temporal_activity_definition")}


def registered_name(fn: Callable[..., Any]) -> str | None:
    """The name the SDK registers `fn` under (its public way: a worker would refuse a
    callable without a definition)."""
    return activity._Definition.must_from_callable(fn).name  # the SDK's own reader


def typed(fn: Callable[..., Any]) -> Callable[..., Any]:
    return getattr(fn, "typed_form", fn)


def hints(fn: Callable[..., Any]) -> tuple[list[tuple[str, Any]], Any]:
    fn = typed(fn)
    found = typing.get_type_hints(fn)
    params = [(name, found.get(name)) for name in inspect.signature(fn).parameters
              if name != "self"]
    return params, found.get("return")


def build_phase_environment() -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(ActivityEnvironment.default_info(), activity_type=BUILD_PHASE)
    return env


@pytest.fixture
def config(tmp_path: Path) -> WorkerConfig:
    return load_config({"TASK_QUEUE_DIR": str(tmp_path / "tasks"),
                        "TEMPORAL_AUDIT_DIR": str(tmp_path / "audit"),
                        "WORKFLOW_SUMMARY_DIR": str(tmp_path / "summaries")})


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.__name__)
def test_every_contract_method_is_named_as_its_activity(contract: type) -> None:
    for name, member in declared(contract).items():
        assert registered_name(member) == name


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.__name__)
def test_every_contract_is_implemented_under_its_name_with_its_types(contract: type) -> None:
    for name, member in declared(contract).items():
        implementation = vars(PipelineActivities).get(name)
        assert implementation is not None, f"{name} is not implemented"
        assert registered_name(implementation) == name
        assert hints(implementation) == hints(member), name


def test_the_worker_registers_exactly_the_contracts(config: WorkerConfig) -> None:
    names = sorted(registered_name(fn) or "" for fn in worker_activities(config))
    wanted = sorted(name for contract in CONTRACTS for name in declared(contract))
    assert names == wanted
    host = config.model_copy(update={"worker_role": "agent-host"})
    assert {registered_name(fn) for fn in worker_activities(host)} <= set(wanted)


def test_every_activity_a_recorded_history_schedules_has_a_contract() -> None:
    """The names in tests/histories/ (v0.5.0's too) are the names still registered."""
    scheduled = set()
    for path in HISTORIES.glob("*/*.json"):
        for event in json.loads(path.read_text())["events"]:
            attributes = event.get("activityTaskScheduledEventAttributes")
            if attributes:
                scheduled.add(attributes["activityType"]["name"])
    wanted = {name for contract in CONTRACTS for name in declared(contract)}
    assert scheduled
    assert scheduled <= wanted, scheduled - wanted
    assert set(STAGE_NUMBERS) <= wanted


async def test_build_phase_refuses_positional_arguments(config: WorkerConfig) -> None:
    """build_phase has no v0.5.0 form: positional arguments fail at once, not retried."""
    env = build_phase_environment()
    wire: Callable[..., Any] = PipelineActivities(config).build_phase  # as the wire calls it
    with pytest.raises(ApplicationError) as caught:
        await env.run(wire, "plan", 1)
    assert (caught.value.type, caught.value.non_retryable) == (InvalidInputError.failure_type, True)
    assert "no v0.5.0 form" in str(caught.value)


async def test_own_form_that_does_not_fit_its_model_fails_at_once(config: WorkerConfig) -> None:
    env = build_phase_environment()
    wire: Callable[..., Any] = PipelineActivities(config).build_phase  # as the wire calls it
    with pytest.raises(ApplicationError) as caught:
        await env.run(wire, {"task_id": "x"})
    assert (caught.value.type, caught.value.non_retryable) == (InvalidInputError.failure_type, True)
