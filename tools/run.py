"""`make run`: the worker, after starting an embedded Temporal dev server if nothing listens
at a local plaintext TEMPORAL_ADDRESS (docs/development.md, "make run"; a remote or TLS
address is never replaced). Signals go on to the worker; then only a dev server this
started is stopped. Exit codes: the worker's; 1 if the dev server cannot be started."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from config import WorkerConfig, load_config
from exceptions import ConfigError
from tools import devserver

REPO = Path(__file__).resolve().parent.parent
DEFAULT_UI_PORT = 8233
DEFAULT_STATE_DIR = REPO / ".run"
EXIT_ERROR = 1
# The dev server has no authentication: anyone who can open the port is an operator.
DEV_SERVER_WARNING = (
    "run: WARNING: the embedded dev server accepts anyone who can reach {address}: on this "
    "machine every local user can complete or fail any stage and approve or reject blocks "
    "(operator power). Use a Temporal server with mTLS when others share this host "
    "(SECURITY.md).")


def is_local_host(host: str) -> bool:
    """Literal loopback only: no DNS lookup decides whether we start a server."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wants_dev_server(config: WorkerConfig) -> bool:
    """Start one only for a plaintext, local address where nothing listens yet."""
    if config.vault_enabled or config.require_tls:
        return False
    host, port = devserver.split_address(config.temporal_address)
    return is_local_host(host) and not devserver.is_listening(host, port)


class _Signals:
    """Remembers SIGINT/SIGTERM and passes each one on to the worker once it runs.

    The worker gets its own process group, so a terminal's Ctrl+C reaches it only through
    here: exactly once per keypress (the worker forces its exit on the second)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.forwarded = 0
        self.child: subprocess.Popen[bytes] | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)
        self.forward(signum)

    def forward(self, signum: int) -> None:
        if self.child is not None and self.child.poll() is None:
            self.forwarded += 1
            self.child.send_signal(signum)

    def adopt(self, child: subprocess.Popen[bytes]) -> None:
        """Start forwarding to `child`; pass on a signal that came while it was spawned."""
        self.child = child
        if self.received and not self.forwarded:
            self.forward(self.received[-1])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.run", description=__doc__)
    parser.add_argument("--ui-port", type=int,
                        default=int(os.environ.get("DEV_SERVER_UI_PORT") or DEFAULT_UI_PORT),
                        help="Web UI port of an embedded dev server (env DEV_SERVER_UI_PORT, "
                             f"default {DEFAULT_UI_PORT})")
    parser.add_argument("--state-dir", type=Path,
                        default=Path(os.environ.get("DEV_SERVER_DIR") or DEFAULT_STATE_DIR),
                        help="where an embedded dev server keeps temporal.db and temporal.log "
                             "(env DEV_SERVER_DIR, default .run/ in the repository)")
    return parser.parse_args(argv)


def start_dev_server(config: WorkerConfig, ui_port: int,
                     state_dir: Path) -> subprocess.Popen[bytes]:
    host, port = devserver.split_address(config.temporal_address)
    if devserver.is_listening(host, ui_port):
        raise RuntimeError(f"Web UI port {ui_port} is already in use: set DEV_SERVER_UI_PORT "
                           f"(or --ui-port) to a free port")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)  # the database holds task tokens and build details
    namespaces = () if config.temporal_namespace == "default" else (config.temporal_namespace,)
    return devserver.start(port, ui_port=ui_port, db_filename=state_dir / "temporal.db",
                           log_path=state_dir / "temporal.log", host=host,
                           namespaces=namespaces)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signals = _Signals()
    previous = {signum: signal.signal(signum, signals)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    server: subprocess.Popen[bytes] | None = None
    try:
        try:
            config: WorkerConfig | None = load_config()
        except ConfigError:
            config = None  # the worker reports it (exit 2)
        if config is not None and wants_dev_server(config):
            try:
                server = start_dev_server(config, args.ui_port, args.state_dir)
            except (RuntimeError, FileNotFoundError, OSError) as err:
                print(f"run: cannot start the Temporal dev server: {err}", file=sys.stderr)
                return EXIT_ERROR
            print(f"run: nothing was listening at {config.temporal_address}, so an embedded "
                  f"Temporal dev server is running there (state {args.state_dir}/temporal.db, "
                  f"log {args.state_dir}/temporal.log); Web UI http://localhost:{args.ui_port}",
                  flush=True)
            print(DEV_SERVER_WARNING.format(address=config.temporal_address), file=sys.stderr,
                  flush=True)
        if signals.received:
            return 0  # asked to stop while the dev server was starting
        child = subprocess.Popen([sys.executable, str(REPO / "worker.py")], cwd=REPO,
                                 process_group=0)
        signals.adopt(child)
        code = child.wait()
        return code if code >= 0 else 128 - code  # killed by signal N -> 128+N
    finally:
        if signals.child is not None and signals.child.poll() is None:
            signals.child.terminate()  # only reached if we are failing ourselves
            signals.child.wait()
        if server is not None:
            devserver.stop(server)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
