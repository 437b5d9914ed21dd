"""One base error for the whole service, and the tree beneath it.

BuildWorkerError                   -- everything this service raises on purpose
├── ConfigError                    -- an environment variable is missing or invalid
├── CredentialError                -- Vault / TLS material could not be obtained or used
│   ├── CredentialSettingError     -- ... because a Vault setting is wrong (not transient)
│   ├── VaultUnavailableError      -- ... because Vault is away or sealed (waited for)
│   └── TlsHandshakeError          -- ... because the TLS handshake failed for good
├── DependencyUnavailableError     -- Temporal or Vault still away when the start-up wait ended
├── TaskFileError               F  -- a task file could not be read, written or found
│   ├── TaskNotFoundError       f  -- no task file carries the requested id
│   ├── AmbiguousTaskError      f  -- two or more task files carry the requested id
│   ├── UnsafeTaskPathError     f  -- a symlink or foreign path where a task file belongs
│   └── DiskWriteError          F  -- the folder is full or read-only (retried)
├── FileIoStalledError          F  -- file I/O did not finish within its time bound
├── StartRefusedError              -- a workflow start refused before anything started
│   └── UnknownAgentError          -- ... because a stage agent is not on the roster
├── EventLogError                  -- an event could not be appended to the platform's log
├── NotifyFailedError              -- a notice channel (Matrix, ntfy, script) did not deliver
├── TriageError                    -- the security agent's triage output is unusable
│   ├── TriageMissingError      F  -- triage-output.yml not there yet (retried)
│   └── TriageInvalidError      F  -- present but not acceptable (never retried)
├── PhaseFailedError            F  -- an agent reported failure, or a stage ended the run
├── InvalidInputError           F  -- a workflow, Update or activity input no retry can fix
├── DecisionRefusedError        F  -- a block decision the pipeline cannot take now
├── BlocksPendingError          F  -- the polled stage 7 looked; no decision yet (benign)
├── WorkerLostError             F  -- the worker running an activity died (start-up recovery)
├── LegacyWaitHandedOverError   F  -- v0.5.0's stage-7 activity handed to the pipeline's wait
├── CompletionError                -- complete_activity.py could not finish an activity (exit 1)
│   ├── UsageError                 -- bad arguments or malformed token (exit 2)
│   ├── ActivityGoneError          -- activity not found / already completed (exit 3)
│   └── ServerUnreachableError     -- server unreachable or credentials refused (exit 4)
└── ToolError                      -- an operator command failed (its own exit code, 1 unless said)

F: a failure type (FailureType): it crosses the Temporal boundary as an ApplicationError
whose `type` is the class's `failure_type`. Histories, v0.5.0 clients, retry policies, the
docs and the Web UI match on that string, so it never changes, whatever the class is
called. Raise one with `SomeError.failure(message)`; recognise one, here or as it comes
back (an activity's, a workflow's or an Update's failure), with `SomeError.matches(err)`.
f: a subclass of a failure type without a string of its own crosses under its class name,
as the SDK names any exception that escapes an activity.

Pure: only temporalio's exception types are imported, so workflow code may use it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, ClassVar, Final

from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ApplicationErrorCategory,
    ChildWorkflowError,
    FailureError,
)


class FailureType:
    """Mixin of every error that crosses the Temporal boundary by its failure type.

    Attributes (class-level, never changed on an instance):
    `failure_type`: the `ApplicationError.type` string; a subclass that sets none gets
    its own class name.
    `non_retryable`: whether the ApplicationError is marked non-retryable when raised
    (a retry policy may still list the type in its `non_retryable_error_types`).
    `category`: BENIGN for an expected failure the SDK logs quietly; else UNSPECIFIED.
    `exit_code` (from BuildWorkerError): an entry point's own exit code, or None.
    """

    failure_type: ClassVar[str]
    non_retryable: ClassVar[bool] = False
    category: ClassVar[ApplicationErrorCategory] = ApplicationErrorCategory.UNSPECIFIED

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "failure_type" not in cls.__dict__:
            cls.failure_type = cls.__name__

    @classmethod
    def failure(cls, message: str, *details: Any, non_retryable: bool | None = None,
                next_retry_delay: timedelta | None = None) -> ApplicationError:
        """The ApplicationError that carries this failure across the boundary.
        `non_retryable` overrides the class's flag where a raise site decides it per call."""
        return ApplicationError(
            message, *details, type=cls.failure_type,
            non_retryable=cls.non_retryable if non_retryable is None else non_retryable,
            next_retry_delay=next_retry_delay, category=cls.category)

    @classmethod
    def matches(cls, err: BaseException | None) -> bool:
        """Whether `err` is this failure: an instance of the class, or an ApplicationError
        of its failure type, itself or as the cause of what wraps it (an ActivityError, a
        ChildWorkflowError, a client's WorkflowFailureError or WorkflowUpdateFailedError).
        A timeout, cancel or termination is none, whatever last failure it carries."""
        while err is not None:
            if isinstance(err, cls):
                return True
            if isinstance(err, ApplicationError):
                return err.type == cls.failure_type
            if isinstance(err, FailureError) and not isinstance(
                    err, ActivityError | ChildWorkflowError):
                return False
            cause = getattr(err, "cause", None)
            err = cause if isinstance(cause, BaseException) else None
        return False


class BuildWorkerError(Exception):
    """Base of every error this service raises deliberately.

    `exit_code`: the exit code an entry point ends with on this error; None when no entry
    point gives it one of its own."""

    exit_code: int | None = None


class ConfigError(BuildWorkerError):
    """An environment variable is missing or has an invalid value."""


class CredentialError(BuildWorkerError):
    """TLS credentials could not be fetched from Vault or could not be used."""


class CredentialSettingError(CredentialError):
    """A Vault setting is wrong: the secret-id file is unusable or the AppRole login is
    refused. Fixing VAULT_ROLE_ID / VAULT_SECRET_ID_FILE helps; waiting does not."""


class VaultUnavailableError(CredentialError):
    """Vault did not answer, or answered that it is sealed or cannot serve: waiting (a
    reboot, an unseal) may cure it, so the worker retries it at start."""


class TlsHandshakeError(CredentialError, RuntimeError):
    """The TLS handshake with Temporal failed for a reason no wait cures (an untrusted
    certificate, a name not on it, plaintext at the address). Still a RuntimeError, as
    every other failed connect is."""


class DependencyUnavailableError(BuildWorkerError):
    """Temporal or Vault was still unreachable when WORKER_STARTUP_WAIT_SECONDS ran out."""

    def __init__(self, cause: str, attempts: int, waited_seconds: float) -> None:
        super().__init__(cause)
        self.cause, self.attempts, self.waited_seconds = cause, attempts, waited_seconds


class TaskFileError(FailureType, BuildWorkerError):
    """A task file could not be read, parsed, written or found.

    Escaping an activity it crosses as `TaskFileError`, retryable; the stage-6 and polled
    stage-7 retry policies list it as non-retryable (policies.py)."""

    failure_type = "TaskFileError"


class TaskNotFoundError(TaskFileError):
    """No task file with the requested id exists in the queue, archive or dead letters."""


class AmbiguousTaskError(TaskFileError):
    """More than one task file carries the requested id; none is picked."""


class UnsafeTaskPathError(TaskFileError):
    """A symlink or non-regular file sits where a task file (or its temp file) belongs."""


class DiskWriteError(TaskFileError):
    """A folder the worker writes (task, audit or summary folder) is full or read-only
    (ENOSPC, EDQUOT, EROFS). Nothing half-written is left; the write is retried until
    space returns. `folder` and `errno` say where and why (in the message too when it
    crosses, retryable, out of an activity that writes: activities/failures.py)."""

    failure_type = "DiskWriteError"

    def __init__(self, message: str, folder: str, errno: int) -> None:
        super().__init__(message)
        self.folder = folder
        self.errno = errno


class FileIoStalledError(FailureType, BuildWorkerError):
    """Reading or writing a file took longer than its bound (or too many such reads are
    still stuck); the stage that asked fails, retryable, nothing else waits for it."""

    failure_type = "FileIoStalledError"


class StartRefusedError(BuildWorkerError):
    """A start request (the dispatcher's or tools/start-build's) does not make a valid
    input: a missing or invalid key, no filing task to go with it. Nothing was started."""


class UnknownAgentError(StartRefusedError):
    """A stage agent of the start is not on the dispatcher's roster (AGENT_ROSTER_FILE):
    its task would wait for an agent nobody launches."""


class EventLogError(BuildWorkerError):
    """An event could not be appended to the platform's event log (its lock stayed taken,
    the file is not a regular file, its last line is unreadable...). Never fails a stage:
    the event is dropped with a warning."""


class NotifyFailedError(BuildWorkerError):
    """One notice channel (Matrix, ntfy, SEND_MATRIX_SCRIPT) could not deliver, or the
    chat listener could not read the room. The message is safe to record: no secrets.

    `retryable` is False when trying again cannot help (bad token, unknown room)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class TriageError(BuildWorkerError):
    """The security agent's triage output cannot be used."""


class TriageMissingError(FailureType, TriageError):
    """triage-output.yml does not exist yet; stage 4 retries (policies.TRIAGE)."""

    failure_type = "TriageMissingError"


class TriageInvalidError(FailureType, TriageError):
    """triage-output.yml exists but is malformed, unsafe or too large; never retried, and
    the pipeline fails with this type rather than PhaseFailedError."""

    failure_type = "TriageInvalidError"
    non_retryable = True


class PhaseFailedError(FailureType, BuildWorkerError):
    """An agent reported failure (complete_activity.py, a task closed as failed, a phase of
    a plan), or a stage ended the pipeline (timed out, its agent went silent): the
    pipeline's or plan's own failure. Never retried: an agent's work is not repeated."""

    failure_type = "PhaseFailedError"
    non_retryable = True


class InvalidInputError(FailureType, BuildWorkerError):
    """A workflow input, a block decision or an activity's arguments that no retry can
    fix; the message names the field."""

    failure_type = "InvalidInputError"
    non_retryable = True


class DecisionRefusedError(FailureType, BuildWorkerError):
    """A block decision (approve_blocks / reject_blocks / request_changes) the pipeline
    cannot take now: not waiting on blocks, another task's file, another audit round's
    blocks, or changes with no re-audit left."""

    failure_type = "DecisionRefusedError"
    non_retryable = True


class BlocksPendingError(FailureType, BuildWorkerError):
    """The polled stage 7 (runs recorded before it became event-driven, v0.5.0's) looked
    and found no decision yet: an expected, benign failure whose retry is the poll."""

    failure_type = "BlocksPendingError"
    category = ApplicationErrorCategory.BENIGN


class WorkerLostError(FailureType, BuildWorkerError):
    """The worker running an activity died; start-up recovery (startup/recovery.py) fails
    the activity so it runs again at once, non-retryable only on its last attempt."""

    failure_type = "WorkerLostError"


class LegacyWaitHandedOverError(FailureType, BuildWorkerError):
    """v0.5.0's stage-7 activity, which this worker does not hold open: the pipeline's own
    stage 7 waits for the decision instead."""

    failure_type = "LegacyWaitHandedOverError"
    non_retryable = True


class CompletionError(BuildWorkerError):
    """complete_activity.py could not complete the activity."""

    exit_code: int = 1


class UsageError(CompletionError):
    """Bad command-line usage or a malformed task token."""

    exit_code = 2


class ActivityGoneError(CompletionError):
    """The activity does not exist, was already completed, or timed out."""

    exit_code = 3


class ServerUnreachableError(CompletionError):
    """The Temporal server cannot be reached or refused our credentials: the same command
    works once it is back."""

    exit_code = 4


class ToolError(BuildWorkerError):
    """An operator command (tools/) failed; it prints one line and exits with `exit_code`
    (1, needs attention, unless the raise site names another: tools/common.py's EXIT_*)."""

    exit_code: int

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# The failure types this service raises and matches on purpose, in the order of
# docs/pipeline.md's table (tests/test_vocabulary.py compares the two).
FAILURE_TYPES: Final[tuple[type[FailureType], ...]] = (
    PhaseFailedError, TriageMissingError, TriageInvalidError, InvalidInputError,
    BlocksPendingError, DecisionRefusedError, TaskFileError, FileIoStalledError,
    WorkerLostError, LegacyWaitHandedOverError, DiskWriteError)
