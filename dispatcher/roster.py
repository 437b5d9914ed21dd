"""The platform dispatcher's roster (`agent-launch.yml`, PROTOCOL.md §5.7): the agents it
can launch. A pipeline addressing an agent that is not on it would park a task for
nobody, so with AGENT_ROSTER_FILE set a start naming one is refused before anything
starts, and the worker warns at start about its own settings.

The roster is the platform's file (trusted), read bounded all the same: only its
top-level names matter here, not what each entry says about launching.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import yaml
from pydantic import BaseModel

from config import FIELD_ENV, WorkerConfig
from exceptions import ConfigError, UnknownAgentError
from models import BuildPipelineInput, BuildPlanInput

log = logging.getLogger("roster")

MAX_ROSTER_BYTES = 256 * 1024
# The dispatcher's own rule for roster names.
ROSTER_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
ROSTER_SETTING = FIELD_ENV["agent_roster_file"]


def load_roster(path: Path) -> frozenset[str]:
    """The agent names of the roster at `path`; ConfigError naming AGENT_ROSTER_FILE when
    it cannot be read or is not the dispatcher's format (a non-empty mapping of names)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_ROSTER_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{ROSTER_SETTING} {path}: cannot read: {err.strerror}") from None
    if len(raw) > MAX_ROSTER_BYTES:
        raise ConfigError(f"{ROSTER_SETTING} {path}: larger than {MAX_ROSTER_BYTES} bytes")
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "invalid"
        raise ConfigError(f"{ROSTER_SETTING} {path}: not valid YAML: {first}") from None
    if not isinstance(document, dict) or not document:
        raise ConfigError(f"{ROSTER_SETTING} {path}: must be a non-empty mapping of agent "
                          f"names (the dispatcher's agent-launch.yml)")
    bad = [name for name in document if not isinstance(name, str)
           or not ROSTER_NAME_RE.match(name)]
    if bad:
        raise ConfigError(f"{ROSTER_SETTING} {path}: {str(bad[0])[:40]!r} is not an agent "
                          f"name ({ROSTER_NAME_RE.pattern})")
    return frozenset(document)


def configured_agents(config: WorkerConfig) -> list[tuple[str, str]]:
    """(setting, agent) of every agent the worker's settings name for a stage."""
    named = [(FIELD_ENV["prefab_agent"], config.prefab_agent),
             (FIELD_ENV["security_agent"], config.security_agent)]
    if config.default_target_agent:
        named.append((FIELD_ENV["default_target_agent"], config.default_target_agent))
    return named


def input_agents(inp: BaseModel, config: WorkerConfig) -> list[tuple[str, str]]:
    """(role, agent) of every agent a start would address: a pipeline's stage 1 and 3
    agents (the input's, else the worker's setting) and its target agent; a plan's
    phase agents."""
    if isinstance(inp, BuildPlanInput):
        return [(f"phase {phase.number}", phase.agent_type) for phase in inp.phases]
    assert isinstance(inp, BuildPipelineInput)
    return [("prefab agent", inp.prefab_agent or config.prefab_agent),
            ("security agent", inp.security_agent or config.security_agent),
            ("target agent", inp.target_agent)]


def check_start(inp: BaseModel, config: WorkerConfig) -> None:
    """With AGENT_ROSTER_FILE set: UnknownAgentError naming the first agent of `inp`
    that is not on the roster (ConfigError when the roster cannot be read)."""
    if config.agent_roster_file is None:
        return
    names = load_roster(config.agent_roster_file)
    for role, agent in input_agents(inp, config):
        if agent not in names:
            raise UnknownAgentError(
                f"{role} {agent!r} is not on the dispatcher's roster "
                f"({ROSTER_SETTING} {config.agent_roster_file}: {', '.join(sorted(names))})")


def warn_missing(config: WorkerConfig) -> list[str]:
    """At worker start: one WARNING per configured stage agent not on the roster (or one
    saying the roster cannot be read). Returns the agents missing."""
    if config.agent_roster_file is None:
        return []
    try:
        names = load_roster(config.agent_roster_file)
    except ConfigError as err:
        log.warning("agent_roster_unreadable", extra={"error": str(err)})
        return []
    missing = []
    for setting, agent in configured_agents(config):
        if agent not in names:
            missing.append(agent)
            log.warning("stage_agent_not_on_roster",
                        extra={"setting": setting, "agent": agent,
                               "roster": str(config.agent_roster_file)})
    return missing
