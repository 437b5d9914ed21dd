"""The error tree (exceptions.py): each failure type's string, retry flag and exit code,
the ApplicationError a class builds and what it matches, and that the module's opening
diagram shows every class. The strings are written out here on purpose: recorded
histories, v0.5.0 clients, retry policies, the docs and the Web UI match on them, so a
renamed class must not change one."""

from __future__ import annotations

import ast
import inspect
import itertools
import re
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ApplicationErrorCategory,
    RetryState,
    TimeoutError,
    TimeoutType,
)

import exceptions
from exceptions import (
    BlocksPendingError,
    BuildWorkerError,
    CompletionError,
    DecisionRefusedError,
    DiskWriteError,
    FailureType,
    FileIoStalledError,
    InvalidInputError,
    LegacyWaitHandedOverError,
    PhaseFailedError,
    ServerUnreachableError,
    TaskFileError,
    TaskNotFoundError,
    ToolError,
    TriageInvalidError,
    TriageMissingError,
    WorkerLostError,
)

REPO = Path(__file__).resolve().parent.parent

# class: (failure_type, non_retryable, benign)
CONTRACT: dict[type[FailureType], tuple[str, bool, bool]] = {
    PhaseFailedError: ("PhaseFailedError", True, False),
    TriageMissingError: ("TriageMissingError", False, False),
    TriageInvalidError: ("TriageInvalidError", True, False),
    InvalidInputError: ("InvalidInputError", True, False),
    BlocksPendingError: ("BlocksPendingError", False, True),
    DecisionRefusedError: ("DecisionRefusedError", True, False),
    TaskFileError: ("TaskFileError", False, False),
    FileIoStalledError: ("FileIoStalledError", False, False),
    WorkerLostError: ("WorkerLostError", False, False),
    LegacyWaitHandedOverError: ("LegacyWaitHandedOverError", True, False),
    DiskWriteError: ("DiskWriteError", False, False),
}
# complete_activity.py's exit codes (its docstring and docs/agents.md state them).
EXIT_CODES = {CompletionError: 1, exceptions.UsageError: 2, exceptions.ActivityGoneError: 3,
              ServerUnreachableError: 4}
# Where an ApplicationError may still be built by hand: activities/failures.py turns any
# other exception into one typed by its class name, as the SDK itself would.
HAND_BUILT_ALLOWED = {"exceptions.py", "activities/failures.py"}
SERVICE_DIRS = ("activities", "decisions", "dispatcher", "startup", "standins", "taskfiles",
                "telemetry", "tools", "workflows")


def test_the_contract_lists_every_failure_type() -> None:
    assert list(CONTRACT) == list(exceptions.FAILURE_TYPES)


@pytest.mark.parametrize("kind", list(CONTRACT), ids=lambda kind: kind.__name__)
def test_failure_type_string_flag_and_exit_code(kind: type[FailureType]) -> None:
    failure_type, non_retryable, benign = CONTRACT[kind]
    assert kind.failure_type == failure_type
    assert kind.non_retryable is non_retryable
    assert (kind.category == ApplicationErrorCategory.BENIGN) is benign
    assert issubclass(kind, BuildWorkerError)
    assert kind.exit_code is None  # no entry point gives a failure type its own code


@pytest.mark.parametrize("kind", list(CONTRACT), ids=lambda kind: kind.__name__)
def test_failure_builds_the_application_error(kind: type[FailureType]) -> None:
    error = kind.failure("the message, as raised", {"detail": 1})
    assert isinstance(error, ApplicationError)
    assert (error.message, error.type, error.non_retryable, error.category) == (
        "the message, as raised", CONTRACT[kind][0], CONTRACT[kind][1], kind.category)
    assert list(error.details) == [{"detail": 1}]
    assert error.next_retry_delay is None


@pytest.mark.parametrize(("kind", "other"), list(itertools.permutations(CONTRACT, 2)),
                         ids=lambda kind: kind.__name__)
def test_a_failure_matches_its_class_and_no_sibling(kind: type[FailureType],
                                                    other: type[FailureType]) -> None:
    error = kind.failure("x")
    assert kind.matches(error)
    assert not other.matches(error)


def test_matches_looks_through_what_wraps_the_failure() -> None:
    """As it comes back: an activity's failure inside an ActivityError, a run's inside a
    WorkflowFailureError; a plain exception or None is no failure type."""
    activity_error = ActivityError("activity failed", scheduled_event_id=5,
                                   started_event_id=6, identity="w", activity_type="a",
                                   activity_id="1", retry_state=RetryState.NON_RETRYABLE_FAILURE)
    activity_error.__cause__ = TriageInvalidError.failure("bad triage")
    assert TriageInvalidError.matches(activity_error)
    assert not PhaseFailedError.matches(activity_error)
    run_error = WorkflowFailureError(cause=PhaseFailedError.failure("stage failed"))
    assert PhaseFailedError.matches(run_error)
    assert not TriageInvalidError.matches(run_error)
    assert not PhaseFailedError.matches(ValueError("PhaseFailedError"))
    assert not PhaseFailedError.matches(None)
    # A timeout is no application failure, even with one as the last attempt's cause.
    timeout = TimeoutError("timed out", type=TimeoutType.SCHEDULE_TO_CLOSE,
                           last_heartbeat_details=[])
    timeout.__cause__ = TriageInvalidError.failure("bad triage")
    activity_error.__cause__ = timeout
    assert not TriageInvalidError.matches(activity_error)
    # The first ApplicationError decides: one of another type wrapping ours is not ours.
    outer = ApplicationError("outer", type="Other")
    outer.__cause__ = PhaseFailedError.failure("inner")
    assert not PhaseFailedError.matches(outer)


def test_an_instance_matches_by_class() -> None:
    """In-process, before it crosses: isinstance, so a subclass matches its parent."""
    assert TriageMissingError.matches(TriageMissingError("not there yet"))
    assert TaskFileError.matches(DiskWriteError("full", folder="/q", errno=28))
    assert not DiskWriteError.matches(TaskFileError("unreadable"))


def test_a_raise_site_may_decide_the_flag_per_call() -> None:
    """startup/recovery.py: WorkerLostError is final only on the activity's last attempt."""
    last = WorkerLostError.failure("died", non_retryable=True,
                                   next_retry_delay=timedelta(seconds=1))
    assert (last.type, last.non_retryable, last.next_retry_delay) == (
        "WorkerLostError", True, timedelta(seconds=1))
    assert WorkerLostError.failure("died").non_retryable is False


def test_a_subclass_without_its_own_string_crosses_under_its_name() -> None:
    """The SDK types an exception escaping an activity by its class name; the attribute
    says the same, and the parent's failure does not match it."""
    assert TaskNotFoundError.failure_type == "TaskNotFoundError"
    assert not TaskFileError.matches(TaskNotFoundError.failure("no such task"))


def test_exit_codes() -> None:
    for kind, code in EXIT_CODES.items():
        assert kind.exit_code == code, kind
    assert ToolError("needs attention").exit_code == 1
    assert ToolError("usage", 2).exit_code == 2
    # httpx has a ConnectError of its own; ours no longer shadows it.
    assert not hasattr(exceptions, "ConnectError")


def test_the_opening_diagram_shows_every_class() -> None:
    """exceptions.py opens with its tree: each class once, under its parent."""
    doc = exceptions.__doc__ or ""
    drawn = re.findall(r"^[│├└─ ]*(\w+Error)\b", doc, re.MULTILINE)
    classes = [name for name, value in vars(exceptions).items()
               if inspect.isclass(value) and issubclass(value, BuildWorkerError)
               and value.__module__ == "exceptions"]
    assert sorted(drawn) == sorted(classes)
    marked = set(re.findall(r"^[│├└─ ]*(\w+Error)\s+F\s", doc, re.MULTILINE))
    assert marked == {kind.__name__ for kind in exceptions.FAILURE_TYPES}


def hand_built(path: Path) -> list[int]:
    """Lines of `path` that call ApplicationError(...) themselves."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "ApplicationError"]


def test_no_failure_is_built_by_hand() -> None:
    """Raise sites raise by class (`SomeError.failure(...)`): the type string and its flag
    come from one place."""
    files = [*REPO.glob("*.py"), *(path for folder in SERVICE_DIRS
                                   for path in (REPO / folder).rglob("*.py"))]
    found = [f"{path.relative_to(REPO)}:{line}" for path in files
             if path.relative_to(REPO).as_posix() not in HAND_BUILT_ALLOWED
             for line in hand_built(path)]
    assert found == []
