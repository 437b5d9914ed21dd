"""The one settings model: every environment variable the service reads.

`load_config(environ)` is called once by each entry point; nothing here runs at
import time. A bad value raises ConfigError naming the variable.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from exceptions import ConfigError
from models import MAX_REAUDIT_ROUNDS
from models import NAME_RE as NAME_PATTERN
from vocabulary import (
    DEFAULT_TASK_QUEUE,
    DIALECT_PLATFORM,
    DIALECTS,
    ROLE_AGENT_HOST,
    ROLE_ALL,
    WORKER_ROLES,
    WORKFLOW_MODES,
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MATRIX_USER_RE = re.compile(r"^@[a-z0-9._=/+-]+:[A-Za-z0-9.-]+(:[0-9]+)?$")

# environment variable -> model field
ENV_FIELDS: dict[str, str] = {
    "TEMPORAL_ADDRESS": "temporal_address",
    "TEMPORAL_NAMESPACE": "temporal_namespace",
    "TASK_QUEUE": "task_queue",
    "TEMPORAL_TLS_SERVER_NAME": "tls_server_name",
    "TEMPORAL_REQUIRE_TLS": "require_tls",
    "TASK_QUEUE_DIR": "task_queue_dir",
    "TEMPORAL_AUDIT_DIR": "audit_dir",
    "SUMMARY_DIR": "summary_dir",
    "PREFAB_AGENT": "prefab_agent",
    "SECURITY_AGENT": "security_agent",
    "MATRIX_ROOM": "matrix_room",
    "MATRIX_HOMESERVER": "matrix_homeserver",
    "MATRIX_ACCESS_TOKEN_FILE": "matrix_access_token_file",
    "MATRIX_ACCESS_TOKEN": "matrix_access_token",
    "SEND_MATRIX_SCRIPT": "send_matrix_script",
    "NTFY_URL": "ntfy_url",
    "LOG_LEVEL": "log_level",
    "LOG_FILE": "log_file",
    "VAULT_ADDR": "vault_addr",
    "VAULT_ROLE_ID": "vault_role_id",
    "VAULT_SECRET_ID_FILE": "vault_secret_id_file",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "otel_endpoint",
    "OTEL_SERVICE_NAME": "otel_service_name",
    "PROMETHEUS_BIND_ADDRESS": "prometheus_bind_address",
    "TEMPORAL_MAX_CONCURRENT_ACTIVITIES": "max_concurrent_activities",
    "TEMPORAL_MAX_CONCURRENT_WORKFLOW_TASKS": "max_concurrent_workflow_tasks",
    "TEMPORAL_MAX_CACHED_WORKFLOWS": "max_cached_workflows",
    "WORKER_SHUTDOWN_GRACE_SECONDS": "shutdown_grace_seconds",
    "WORKER_STARTUP_WAIT_SECONDS": "startup_wait_seconds",
    "WORKER_STATUS_FILE": "status_file",
    "WORKER_ENV_FILE": "worker_env_file",
    "MATRIX_APPROVERS": "matrix_approvers",
    "BLOCK_FILE_DECISIONS": "file_decisions",
    "TASK_WATCH_POLLING": "watch_polling",
    "TASK_FILE_DIALECT": "task_file_dialect",
    "TASK_WORKFLOW_MODE": "task_workflow_mode",
    "TASK_TOKEN_IN_FILE": "task_token_in_file",
    "PLAN_DIR": "plan_dir",
    "DEFAULT_TARGET_AGENT": "default_target_agent",
    "AGENT_ROSTER_FILE": "agent_roster_file",
    "AGENT_BUS_COMMS_DIR": "agent_bus_comms_dir",
    "WORKER_ROLE": "worker_role",
    "AGENT_TASK_QUEUES": "agent_task_queues",
    "WORKFLOW_TASK_QUEUE": "workflow_task_queue",
    "REAUDIT_ROUNDS": "reaudit_rounds",
}
FIELD_ENV = {field: env for env, field in ENV_FIELDS.items()}
# Settings that take one of a few words: field -> the words.
CHOICES: dict[str, tuple[str, ...]] = {"worker_role": WORKER_ROLES,
                                       "task_file_dialect": DIALECTS,
                                       "task_workflow_mode": WORKFLOW_MODES}
SECRET_FIELDS = frozenset({"matrix_access_token", "vault_role_id"})
VAULT_VARS = ("VAULT_ADDR", "VAULT_ROLE_ID", "VAULT_SECRET_ID_FILE")
# payload.temporal of every agent task: key -> the variable it stands for. Non-secret
# facts only, so complete_activity.py can reach the worker's server from the task file.
TASK_CONNECTION_FACTS: dict[str, str] = {
    "address": "TEMPORAL_ADDRESS",
    "namespace": "TEMPORAL_NAMESPACE",
    "task_queue": "TASK_QUEUE",
    "tls_server_name": "TEMPORAL_TLS_SERVER_NAME",
    "require_tls": "TEMPORAL_REQUIRE_TLS",
    "env_file": "WORKER_ENV_FILE",
}
MAX_ENV_FILE_BYTES = 64 * 1024
# readEnvFile in ecosystem.config.js, line for line: pm2 and complete_activity.py must
# read the same env file the same way.
ENV_LINE_RE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")


def _home() -> Path:
    return Path(os.path.expanduser("~"))


# Folders that default to a place under HOME (parts relative to HOME).
HOME_DIRS: dict[str, tuple[str, ...]] = {
    "task_queue_dir": (".claude", "task-queue"),
    "audit_dir": (".claude", "comms", "artifacts"),
    "summary_dir": ("repos", "personal", "agent-activity", "workflows"),
}


class WorkerConfig(BaseModel):
    """Validated settings shared by the worker, complete_activity.py and the tools."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    task_queue: str = DEFAULT_TASK_QUEUE
    tls_server_name: str | None = None
    require_tls: bool = False
    task_queue_dir: Path = Field(default_factory=lambda: _home().joinpath(
        *HOME_DIRS["task_queue_dir"]))
    audit_dir: Path = Field(default_factory=lambda: _home().joinpath(*HOME_DIRS["audit_dir"]))
    summary_dir: Path = Field(default_factory=lambda: _home().joinpath(*HOME_DIRS["summary_dir"]))
    prefab_agent: str = "claudebox"
    security_agent: str = "security-agent"
    # Re-audits after fixes, for pipelines whose input does not say (0: audit once).
    reaudit_rounds: int = Field(default=0, ge=0, le=MAX_REAUDIT_ROUNDS)
    matrix_room: str = "sysadmin"
    matrix_homeserver: str | None = None
    matrix_access_token_file: Path | None = None
    matrix_access_token: SecretStr | None = None
    send_matrix_script: Path | None = None
    ntfy_url: str | None = None
    log_level: str = "INFO"
    log_file: Path | None = None
    vault_addr: str | None = None
    vault_role_id: SecretStr | None = None
    vault_secret_id_file: Path | None = None
    otel_endpoint: str | None = None
    otel_service_name: str = "temporal-build-worker"
    prometheus_bind_address: str | None = None
    max_concurrent_activities: int | None = Field(default=None, ge=1)
    max_concurrent_workflow_tasks: int | None = Field(default=None, ge=2)
    # Bounded so a thousand parked pipelines do not each keep a cached workflow in memory
    # (measured: 1000 parked, RSS 322 MB at the SDK default of 1000, 158 MB at 200).
    max_cached_workflows: int | None = Field(default=200, ge=0)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0, le=3600)
    # How long the worker waits at start for an unreachable Temporal server or Vault
    # (retrying with capped backoff) before it exits 4: long enough for a reboot or an
    # upgrade to bring them up after the worker; 0 = one attempt.
    startup_wait_seconds: float = Field(default=900.0, ge=0, le=86400)
    # Optional JSON file monitors read: {"state": "waiting"|"ready"|"stopping"|"stopped",
    # "reason" while waiting, ...}.
    status_file: Path | None = None
    # The env file pm2 loads (ecosystem.config.js); complete_activity.py reads credentials
    # (the Vault variables) from it when its own environment lacks them.
    worker_env_file: Path | None = None
    # Matrix user ids allowed to approve/reject blocks from the room; empty = chat off.
    matrix_approvers: tuple[str, ...] = ()
    # Whether an originating task's status (approved/rejected) decides parked blocks.
    file_decisions: bool = True
    # Watch the task folder by polling (network filesystems) instead of inotify.
    watch_polling: bool = False
    # Whose words task files speak: the platform's task tools' (default) or v0.5.0's.
    task_file_dialect: str = DIALECT_PLATFORM
    # workflow_mode of platform-dialect task files (what the dispatcher does with them).
    task_workflow_mode: str = "semi-auto"
    # Put the task token back into platform-dialect files (agents passing it on argv).
    task_token_in_file: bool = False
    # Builds the platform's dispatcher starts (dispatcher/start_request.py): where a plan named in
    # a `workflow` task lives (<plan_dir>/<plan_name>.md) and who implements it, when the
    # task's payload does not say. Unset: the payload must.
    plan_dir: Path | None = None
    default_target_agent: str | None = None
    # The dispatcher's roster (agent-launch.yml): the agents it can launch. Set, a start
    # naming a stage agent not on it is refused, and the worker warns at start.
    agent_roster_file: Path | None = None
    # The platform's comms folder: events go to its logs/ (agent-bus). Unset = no events.
    agent_bus_comms_dir: Path | None = None
    # `all`: workflows and every activity. `agent-host`: only the activities bound to this
    # host's folders (its agents' task files, audits, triage) and the folder watch.
    worker_role: str = ROLE_ALL
    # Agent -> the task queue of the host it runs on: that agent's stages run there.
    agent_task_queues: dict[str, str] = Field(default_factory=dict)
    # The queue the pipelines' workflows run on (an agent-host worker serves their
    # activities from its own TASK_QUEUE); unset = TASK_QUEUE, or for an agent host the
    # default queue.
    workflow_task_queue: str | None = None

    @field_validator("temporal_address", "prometheus_bind_address")
    @classmethod
    def _address_has_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port")
        return value

    @field_validator("matrix_approvers", mode="before")
    @classmethod
    def _user_ids(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        ids = tuple(part.strip() for part in value.split(",") if part.strip())
        for user_id in ids:
            if not MATRIX_USER_RE.match(user_id):
                raise ValueError(f"{user_id!r} is not a Matrix user id (@name:server)")
        return ids

    @field_validator("temporal_namespace", "task_queue", "workflow_task_queue")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(ch.isspace() for ch in value)):
            raise ValueError("must be non-empty and contain no whitespace")
        return value

    @field_validator(*CHOICES)
    @classmethod
    def _one_of(cls, value: str, info: ValidationInfo) -> str:
        allowed = CHOICES[str(info.field_name)]
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    @field_validator("agent_task_queues", mode="before")
    @classmethod
    def _agent_queues(cls, value: object) -> object:
        """`agent=queue,agent=queue`: each agent once, a name as agents' names go, a queue
        without whitespace."""
        if not isinstance(value, str):
            return value
        queues: dict[str, str] = {}
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            agent, sep, queue = (piece.strip() for piece in item.partition("="))
            if not sep or not queue or any(ch.isspace() for ch in queue):
                raise ValueError(f"{item!r} is not agent=task-queue")
            if not NAME_PATTERN.match(agent) or len(agent) > 63:
                raise ValueError(f"agent {agent!r} must match ^[a-z0-9][a-z0-9-]*$ (max 63)")
            if agent in queues:
                raise ValueError(f"agent {agent!r} named twice")
            queues[agent] = queue
        return queues

    @field_validator("prefab_agent", "security_agent", "default_target_agent")
    @classmethod
    def _agent_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not NAME_PATTERN.match(value) or len(value) > 63:
            raise ValueError("must match ^[a-z0-9][a-z0-9-]*$ (max 63)")
        return value


    @property
    def platform_dialect(self) -> bool:
        return self.task_file_dialect == DIALECT_PLATFORM

    @property
    def token_in_task_file(self) -> bool:
        """Whether agent task files carry payload.task_token: always in v050."""
        return not self.platform_dialect or self.task_token_in_file

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return upper

    @field_validator("matrix_homeserver", "ntfy_url", "vault_addr", "otel_endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("task_queue_dir", "audit_dir", "summary_dir", "log_file",
                     "matrix_access_token_file", "send_matrix_script", "vault_secret_id_file",
                     "status_file", "worker_env_file", "plan_dir", "agent_roster_file",
                     "agent_bus_comms_dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(os.path.expanduser(str(value)))

    @field_validator("plan_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path (or start with ~)")
        return value

    @property
    def agent_host(self) -> bool:
        return self.worker_role == ROLE_AGENT_HOST

    @property
    def pipeline_queue(self) -> str:
        """The task queue the pipelines' workflows run on."""
        if self.workflow_task_queue:
            return self.workflow_task_queue
        return DEFAULT_TASK_QUEUE if self.agent_host else self.task_queue

    @property
    def vault_enabled(self) -> bool:
        return bool(self.vault_addr and self.vault_role_id and self.vault_secret_id_file)

    def public_summary(self) -> dict[str, Any]:
        """Settings safe to log: secrets are reported only as set / unset."""
        summary: dict[str, Any] = {}
        for field in type(self).model_fields:
            value = getattr(self, field)
            if field in SECRET_FIELDS:
                summary[FIELD_ENV[field]] = "set" if value is not None else "unset"
            else:
                summary[FIELD_ENV[field]] = str(value) if isinstance(value, Path) else value
        return summary


def load_config(environ: Mapping[str, str] | None = None) -> WorkerConfig:
    """Build the settings from the environment; raise ConfigError naming the bad variable."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    partial_vault = [name for name in VAULT_VARS if env.get(name, "").strip()]
    for name, field in ENV_FIELDS.items():
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            continue
        values[field] = raw.strip()
    home = env.get("HOME", "").strip()
    if environ is not None and home:
        # The mapping is the whole environment: `~` and the default folders follow its
        # HOME, not the calling process's (os.path.expanduser only sees os.environ).
        for field, parts in HOME_DIRS.items():
            values.setdefault(field, str(Path(home).joinpath(*parts)))
        for field, raw in values.items():
            if raw == "~" or raw.startswith("~/"):
                annotation = str(WorkerConfig.model_fields[field].annotation)
                if "Path" in annotation:
                    values[field] = home + raw[1:]
    try:
        config = WorkerConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        name = FIELD_ENV.get(field, field)
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{name}: {message}") from None
    _check_together(config, partial_vault)
    return config


def _check_together(config: WorkerConfig, partial_vault: list[str]) -> None:
    """Settings that are each valid but not together."""
    if 0 < len(partial_vault) < len(VAULT_VARS):
        missing = sorted(set(VAULT_VARS) - set(partial_vault))
        raise ConfigError(
            f"{', '.join(missing)}: Vault mTLS needs VAULT_ADDR, VAULT_ROLE_ID and "
            f"VAULT_SECRET_ID_FILE together (only {', '.join(partial_vault)} set)"
        )
    if config.require_tls and not config.vault_enabled:
        raise ConfigError(
            "TEMPORAL_REQUIRE_TLS: plaintext refused; set VAULT_ADDR, VAULT_ROLE_ID and "
            "VAULT_SECRET_ID_FILE so TLS credentials can be fetched"
        )
    if config.agent_host and config.pipeline_queue == config.task_queue:
        raise ConfigError(f"TASK_QUEUE: an agent-host worker polls its host's own queue, not "
                          f"the workflows' ({config.pipeline_queue}; WORKFLOW_TASK_QUEUE)")
    if config.matrix_access_token_file is not None and config.matrix_access_token is not None:
        raise ConfigError("MATRIX_ACCESS_TOKEN: set either MATRIX_ACCESS_TOKEN or "
                          "MATRIX_ACCESS_TOKEN_FILE, not both")


def connection_facts(config: WorkerConfig) -> dict[str, Any]:
    """payload.temporal: where and how the worker reaches Temporal, without any secret.

    `tls` says the worker uses mTLS (credentials from Vault), so a client without the
    Vault settings knows it cannot connect rather than trying in plaintext."""
    facts: dict[str, Any] = {
        "address": config.temporal_address,
        "namespace": config.temporal_namespace,
        "task_queue": config.task_queue,
        "require_tls": config.require_tls,
        "tls": config.vault_enabled,
    }
    if config.tls_server_name:
        facts["tls_server_name"] = config.tls_server_name
    if config.worker_env_file is not None:
        facts["env_file"] = os.path.abspath(config.worker_env_file)
    return facts


def read_env_file(path: Path, label: str = "WORKER_ENV_FILE") -> dict[str, str]:
    """KEY=VALUE lines, as readEnvFile in ecosystem.config.js reads them: blank lines and
    `#` comments skipped, an optional `export ` prefix and matching single or double
    quotes around the value removed, nothing expanded. A missing file is empty, as for
    pm2. Errors name `label` and a line number, never a value (values may be secrets)."""
    try:
        # Non-blocking and bounded: a FIFO or /dev/zero named here must not stall us.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ConfigError(f"{label} {path}: cannot read: {err.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{label} {path}: not a regular file")
        raw = handle.read(MAX_ENV_FILE_BYTES + 1)
    if len(raw) > MAX_ENV_FILE_BYTES:
        raise ConfigError(f"{label} {path}: larger than {MAX_ENV_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{label} {path}: not UTF-8 text") from None
    values: dict[str, str] = {}
    for number, raw_line in enumerate(re.split(r"\r?\n", text), start=1):
        line = raw_line.strip().strip("\ufeff").strip()  # JavaScript's trim() drops a BOM too
        if not line or line.startswith("#"):
            continue
        match = ENV_LINE_RE.match(line)
        if match is None:
            raise ConfigError(f"{label} {path}: line {number} is not KEY=VALUE")
        value = match.group(2)
        if len(value) >= 2 and value[0] in "\"'" and value[-1] == value[0]:
            value = value[1:-1]
        values[match.group(1)] = value
    return values
