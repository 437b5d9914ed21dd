"""One base error for the whole service, and the tree beneath it.

BuildWorkerError                   -- everything this service raises on purpose
├── ConfigError                    -- an environment variable is missing or invalid
├── CredentialError                -- Vault / TLS material could not be obtained or used
│   └── CredentialSettingError     -- ... because a Vault setting is wrong (not transient)
├── TaskFileError                  -- a task file could not be read, written or found
│   ├── TaskNotFoundError          -- no task file carries the requested id
│   ├── AmbiguousTaskError         -- two or more task files carry the requested id
│   ├── UnsafeTaskPathError        -- a symlink or foreign path where a task file belongs
│   └── DiskWriteError             -- the folder is full or read-only (retried)
├── FileIoStalledError             -- file I/O did not finish within its time bound
├── StartRefusedError              -- a workflow start refused before anything started
│   └── UnknownAgentError          -- ... because a stage agent is not on the roster
├── EventLogError                  -- an event could not be appended to the platform's log
├── TriageError                    -- the security agent's triage output is unusable
│   ├── TriageMissingError         -- triage-output.yml not there yet (retryable)
│   └── TriageInvalidError         -- present but not acceptable (never retried)
└── CompletionError                -- complete_activity.py could not finish an activity
    ├── UsageError                 -- bad arguments or malformed token (exit 2)
    ├── ActivityGoneError          -- activity not found / already completed (exit 3)
    └── ConnectError               -- server unreachable or credentials refused (exit 4)

Failure *types* that cross the Temporal boundary (ApplicationError.type) are the
class names below, so the Web UI and clients can match on them as plain strings; the
strings themselves are defined in vocabulary.py.
"""

from __future__ import annotations


class BuildWorkerError(Exception):
    """Base of every error this service raises deliberately."""


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


class TaskFileError(BuildWorkerError):
    """A task file could not be read, parsed, written or found."""


class TaskNotFoundError(TaskFileError):
    """No task file with the requested id exists in the queue, archive or dead letters."""


class AmbiguousTaskError(TaskFileError):
    """More than one task file carries the requested id; none is picked."""


class UnsafeTaskPathError(TaskFileError):
    """A symlink or non-regular file sits where a task file (or its temp file) belongs."""


class DiskWriteError(TaskFileError):
    """A folder the worker writes (task, audit or summary folder) is full or read-only
    (ENOSPC, EDQUOT, EROFS). Nothing half-written is left; the write is retried until
    space returns. `folder` and `errno` say where and why."""

    def __init__(self, message: str, folder: str, errno: int) -> None:
        super().__init__(message)
        self.folder = folder
        self.errno = errno


class FileIoStalledError(BuildWorkerError):
    """Reading or writing a file took longer than its bound (or too many such reads are
    still stuck); the stage that asked fails, nothing else waits for it."""


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


class TriageError(BuildWorkerError):
    """The security agent's triage output cannot be used."""


class TriageMissingError(TriageError):
    """triage-output.yml does not exist yet; the stage retries."""


class TriageInvalidError(TriageError):
    """triage-output.yml exists but is malformed, unsafe or too large; never retried."""


class CompletionError(BuildWorkerError):
    """complete_activity.py could not complete the activity."""

    exit_code = 1


class UsageError(CompletionError):
    """Bad command-line usage or a malformed task token."""

    exit_code = 2


class ActivityGoneError(CompletionError):
    """The activity does not exist, was already completed, or timed out."""

    exit_code = 3


class ConnectError(CompletionError):
    """The Temporal server cannot be reached or refused our credentials."""

    exit_code = 4

