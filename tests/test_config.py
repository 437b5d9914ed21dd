"""Settings from the environment: defaults, one clear error per bad variable, no secrets out."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config import load_config
from exceptions import ConfigError
from vocabulary import DEFAULT_TASK_QUEUE

REPO = Path(__file__).resolve().parent.parent
MATRIX_SECRET = "mx-SECRET-d41d8cd98f00b204"
ROLE_SECRET = "role-SECRET-9e107d9d372bb682"
SECRET_ID = "secret-id-SECRET-e4d909c290d0fb1c"
VAULT = {"VAULT_ADDR": "https://vault.example:8200", "VAULT_ROLE_ID": "role",
         "VAULT_SECRET_ID_FILE": "/run/secrets/secret-id"}


def test_defaults_are_home_relative() -> None:
    config = load_config({"HOME": "/srv/agent"})

    assert config.temporal_address == "localhost:7233"
    assert config.temporal_namespace == "default"
    assert config.task_queue == DEFAULT_TASK_QUEUE
    assert config.require_tls is False
    assert config.task_queue_dir == Path("/srv/agent/.claude/task-queue")
    assert config.audit_dir == Path("/srv/agent/.claude/comms/artifacts")
    assert config.summary_dir == Path("/srv/agent/repos/personal/agent-activity/workflows")
    assert (config.prefab_agent, config.security_agent) == ("claudebox", "security-agent")
    assert config.matrix_room == "sysadmin"
    assert config.log_level == "INFO"
    assert config.otel_service_name == "temporal-build-worker"
    assert config.vault_enabled is False
    assert config.max_concurrent_activities is None


def test_tilde_follows_the_given_home() -> None:
    config = load_config({"HOME": "/srv/agent", "TASK_QUEUE_DIR": "~/queue",
                          "LOG_FILE": "~/logs/worker.log", "TEMPORAL_AUDIT_DIR": "/abs/audit"})
    assert config.task_queue_dir == Path("/srv/agent/queue")
    assert config.log_file == Path("/srv/agent/logs/worker.log")
    assert config.audit_dir == Path("/abs/audit")


def test_values_are_read() -> None:
    config = load_config({
        "TEMPORAL_ADDRESS": "temporal.internal:7233", "TEMPORAL_NAMESPACE": "builds",
        "TASK_QUEUE": "q1", "LOG_LEVEL": "debug", "TEMPORAL_MAX_CONCURRENT_ACTIVITIES": "4",
        "PREFAB_AGENT": "scaffolder", "MATRIX_HOMESERVER": "https://matrix.example.org",
        **VAULT, "TEMPORAL_REQUIRE_TLS": "true"})
    assert config.temporal_address == "temporal.internal:7233"
    assert config.temporal_namespace == "builds"
    assert config.task_queue == "q1"
    assert config.log_level == "DEBUG"
    assert config.max_concurrent_activities == 4
    assert config.prefab_agent == "scaffolder"
    assert config.require_tls
    assert config.vault_enabled


@pytest.mark.parametrize(("env", "variable"), [
    ({"TEMPORAL_ADDRESS": "localhost"}, "TEMPORAL_ADDRESS"),
    ({"TEMPORAL_ADDRESS": "localhost:0"}, "TEMPORAL_ADDRESS"),
    ({"TEMPORAL_ADDRESS": "localhost:99999"}, "TEMPORAL_ADDRESS"),
    ({"TEMPORAL_ADDRESS": ":7233"}, "TEMPORAL_ADDRESS"),
    ({"TEMPORAL_NAMESPACE": "two words"}, "TEMPORAL_NAMESPACE"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"TEMPORAL_REQUIRE_TLS": "true"}, "TEMPORAL_REQUIRE_TLS"),
    ({"TEMPORAL_REQUIRE_TLS": "maybe"}, "TEMPORAL_REQUIRE_TLS"),
    ({"VAULT_ADDR": "https://vault.example:8200"}, "VAULT_ROLE_ID"),
    ({"VAULT_ADDR": "https://vault.example:8200", "VAULT_ROLE_ID": "r"}, "VAULT_SECRET_ID_FILE"),
    ({"VAULT_ROLE_ID": "r", "VAULT_SECRET_ID_FILE": "/f"}, "VAULT_ADDR"),
    ({**VAULT, "VAULT_ADDR": "vault.example:8200"}, "VAULT_ADDR"),
    ({"TEMPORAL_MAX_CONCURRENT_ACTIVITIES": "0"}, "TEMPORAL_MAX_CONCURRENT_ACTIVITIES"),
    ({"TEMPORAL_MAX_CONCURRENT_ACTIVITIES": "many"}, "TEMPORAL_MAX_CONCURRENT_ACTIVITIES"),
    ({"MATRIX_HOMESERVER": "matrix.example.org"}, "MATRIX_HOMESERVER"),
    ({"MATRIX_HOMESERVER": "ftp://matrix.example.org"}, "MATRIX_HOMESERVER"),
    ({"PREFAB_AGENT": "Claude Box"}, "PREFAB_AGENT"),
    ({"MATRIX_ACCESS_TOKEN": "t", "MATRIX_ACCESS_TOKEN_FILE": "/f"}, "MATRIX_ACCESS_TOKEN"),
])
def test_bad_value_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"HOME": "/srv/agent", **env})
    # "VAR: problem", or "VAR, OTHER_VAR: problem" when several are missing together.
    assert re.match(rf"{variable}[:,] ", str(caught.value)), str(caught.value)


def test_partial_vault_lists_every_missing_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"VAULT_ADDR": "https://vault.example:8200"})
    message = str(caught.value)
    assert "VAULT_ROLE_ID" in message
    assert "VAULT_SECRET_ID_FILE" in message


def test_blank_values_mean_default() -> None:
    config = load_config({"HOME": "/h", "TEMPORAL_ADDRESS": "  ", "LOG_LEVEL": ""})
    assert config.temporal_address == "localhost:7233"
    assert config.log_level == "INFO"


def worker_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TEMPORAL_", "VAULT_", "MATRIX_", "LOG_"))}
    env.update({"HOME": str(tmp_path), "TEMPORAL_ADDRESS": "127.0.0.1:7233",
                "TASK_QUEUE": "check-config-queue"})
    env.update(extra)
    return env


def run_worker(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "worker.py"), *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_check_config_prints_settings_without_secrets(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(SECRET_ID)
    secret_file.chmod(0o600)
    env = worker_env(tmp_path, MATRIX_ACCESS_TOKEN=MATRIX_SECRET, VAULT_ROLE_ID=ROLE_SECRET,
                     VAULT_ADDR="https://vault.example:8200",
                     VAULT_SECRET_ID_FILE=str(secret_file),
                     MATRIX_HOMESERVER="https://matrix.example.org")

    result = run_worker(["--check-config"], env)

    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for secret in (MATRIX_SECRET, ROLE_SECRET, SECRET_ID):
        assert secret not in output
        assert secret.rsplit("-", 1)[1] not in output  # not even its distinctive tail
    settings = [json.loads(line)["settings"] for line in result.stdout.splitlines()
                if line.startswith("{") and "settings" in json.loads(line)]
    assert settings, f"no settings line in {result.stdout!r}"
    shown = settings[0]
    assert shown["TASK_QUEUE"] == "check-config-queue"
    assert shown["TEMPORAL_ADDRESS"] == "127.0.0.1:7233"
    assert shown["TASK_QUEUE_DIR"] == str(tmp_path / ".claude" / "task-queue")
    assert shown["VAULT_SECRET_ID_FILE"] == str(secret_file)
    assert shown["MATRIX_ACCESS_TOKEN"] == "set"
    assert shown["VAULT_ROLE_ID"] == "set"


@pytest.mark.parametrize(("variable", "value"), [
    ("TEMPORAL_ADDRESS", "no-port-here"),
    ("LOG_LEVEL", "LOUD"),
    ("TEMPORAL_MAX_CONCURRENT_ACTIVITIES", "0"),
    ("VAULT_ROLE_ID", ROLE_SECRET),  # partial Vault settings: the secret is not echoed
])
def test_worker_bad_variable_exits_2(tmp_path: Path, variable: str, value: str) -> None:
    result = run_worker(["--check-config"], worker_env(tmp_path, **{variable: value}))

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] or "VAULT_ADDR" in lines[0]
    assert ROLE_SECRET not in result.stdout + result.stderr
    assert result.stdout == ""


def test_agent_routes_and_roles() -> None:
    config = load_config({"AGENT_TASK_QUEUES": " builder=helm-build.build-host , "
                                               "security-agent=helm-build.sec-host,"})
    assert config.agent_task_queues == {"builder": "helm-build.build-host",
                                        "security-agent": "helm-build.sec-host"}
    assert (config.worker_role, config.pipeline_queue) == ("all", DEFAULT_TASK_QUEUE)
    host = load_config({"WORKER_ROLE": "agent-host", "TASK_QUEUE": "helm-build.sec-host"})
    assert host.agent_host
    assert host.pipeline_queue == DEFAULT_TASK_QUEUE  # the workflows' queue by default
    assert load_config({"WORKER_ROLE": "agent-host", "TASK_QUEUE": "h",
                        "WORKFLOW_TASK_QUEUE": "builds"}).pipeline_queue == "builds"


@pytest.mark.parametrize(("env", "error"), [
    ({"AGENT_TASK_QUEUES": "builder"}, "AGENT_TASK_QUEUES: 'builder' is not agent=task-queue"),
    ({"AGENT_TASK_QUEUES": "Builder=q"}, "AGENT_TASK_QUEUES: agent 'Builder' must match"),
    ({"AGENT_TASK_QUEUES": "b=q1,b=q2"}, "AGENT_TASK_QUEUES: agent 'b' named twice"),
    ({"WORKER_ROLE": "agents"}, "WORKER_ROLE: must be one of all, agent-host"),
    ({"WORKER_ROLE": "agent-host"}, "TASK_QUEUE: an agent-host worker polls its host's own"),
])
def test_routing_settings_refused(env: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    assert str(caught.value).startswith(error), caught.value
