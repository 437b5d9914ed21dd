// pm2 process file for the worker:  pm2 start ecosystem.config.js
//
// No secrets and no personal paths live here. Settings come from the environment of
// the `pm2 start` call, or from an untracked env file: WORKER_ENV_FILE if set, else
// `worker.env` beside this file (`*.env` is git-ignored). See docs/operations.md.
//
// A second app, the agent-host worker (WORKER_ROLE=agent-host: only the activities of
// the agents on this host, see docs/deployment.md), is off unless its own env
// file exists: AGENT_HOST_ENV_FILE if set, else `agent-host.env` beside this file. On an
// agent-only host: pm2 start ecosystem.config.js --only temporal-build-agent-host
//
// Shutdown: pm2 sends SIGINT, waits kill_timeout, then SIGKILLs. The worker stops
// polling at once and gives running activities WORKER_SHUTDOWN_GRACE_SECONDS (default
// 30) to finish, so kill_timeout is that grace plus 15 s of headroom.

"use strict";

const fs = require("fs");
const path = require("path");

// KEY=VALUE lines; blank lines and `#` comments skipped; optional `export ` prefix and
// matching single or double quotes around the value are removed. Nothing is expanded.
function readEnvFile(file) {
  const values = {};
  if (!fs.existsSync(file)) {
    return values;
  }
  for (const raw of fs.readFileSync(file, "utf8").split(/\r?\n/)) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) {
      continue;
    }
    const match = /^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$/.exec(line);
    if (!match) {
      throw new Error(`${file}: cannot parse line: ${line.split("=")[0]}=...`);
    }
    let value = match[2];
    if (value.length >= 2 && (value[0] === '"' || value[0] === "'") &&
        value[value.length - 1] === value[0]) {
      value = value.slice(1, -1);
    }
    values[match[1]] = value;
  }
  return values;
}

const envFile = path.resolve(process.env.WORKER_ENV_FILE || path.join(__dirname, "worker.env"));
const fileEnv = readEnvFile(envFile);
// The worker names its env file in every task (payload.temporal.env_file), so
// complete_activity.py, run by an agent without this environment, finds the credentials.
const envFileSetting = fs.existsSync(envFile) ? { WORKER_ENV_FILE: envFile } : {};
// The calling environment wins over the file, so one-off overrides need no edit.
const setting = (name) => process.env[name] ?? fileEnv[name];

function killTimeout(value) {
  const graceSeconds = Number(value || 30);
  if (!Number.isFinite(graceSeconds) || graceSeconds < 0) {
    throw new Error("WORKER_SHUTDOWN_GRACE_SECONDS must be a non-negative number");
  }
  return Math.ceil(graceSeconds * 1000) + 15000;
}

const agentEnvFile = path.resolve(
  process.env.AGENT_HOST_ENV_FILE || path.join(__dirname, "agent-host.env"));
const agentFileEnv = readEnvFile(agentEnvFile);

// What both apps share: the worker, its interpreter, restarts and shutdown.
const common = {
  script: path.join(__dirname, "worker.py"),
  interpreter: path.join(__dirname, ".venv", "bin", "python"),
  cwd: __dirname,
  exec_mode: "fork",
  instances: 1,
  autorestart: true,
  // 100 ms, ×1.5 per restart up to pm2's 15 s cap; reset once the worker stays up 30 s.
  exp_backoff_restart_delay: 100,
  // pm2 gives up (errored) after 10 restarts that each lived < 30 s. A Temporal
  // server or Vault that is not up yet costs none of them: the worker waits for it
  // (WORKER_STARTUP_WAIT_SECONDS, 15 min by default) and exits 4 only after that,
  // which pm2 counts as a stable run and restarts, so the worker waits again.
  max_restarts: 10,
  min_uptime: "30s",
  // Exit 2 (a bad setting, an unknown namespace) and 3 (credentials refused or not
  // usable) need an operator: restarting cannot fix them.
  stop_exit_codes: [2, 3],
  treekill: true,
  merge_logs: true,
};

module.exports = {
  apps: [
    {
      ...common,
      name: process.env.PM2_APP_NAME || "temporal-build-worker",
      env: { ...fileEnv, ...envFileSetting, PYTHONUNBUFFERED: "1" },
      kill_timeout: killTimeout(setting("WORKER_SHUTDOWN_GRACE_SECONDS")),
    },
    {
      ...common,
      name: process.env.PM2_AGENT_HOST_APP_NAME || "temporal-build-agent-host",
      // Its own file only: an agent host's folders and queue are not the main worker's.
      env: { ...agentFileEnv, WORKER_ENV_FILE: agentEnvFile, WORKER_ROLE: "agent-host",
             PYTHONUNBUFFERED: "1" },
      autostart: fs.existsSync(agentEnvFile),
      kill_timeout: killTimeout(agentFileEnv.WORKER_SHUTDOWN_GRACE_SECONDS),
    },
  ],
};
