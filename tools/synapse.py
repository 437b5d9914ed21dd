"""A real Matrix homeserver (Synapse from PyPI) for the notification and chat tests.

`running(folder)` generates a config with Synapse's own generator, narrows it to a
loopback-only, federation-free, sqlite-backed server on a free port with rate limits
raised out of the way, starts it and yields a `Homeserver` once the client API answers.
Users are registered through the shared-secret admin API, as an operator would; they
invite, join, send, react and redact through the client-server API, as a chat client does.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tools.devserver import free_port

SERVER_NAME = "localhost"
STARTUP_TIMEOUT_SECONDS = 90.0
# Generous limits: tests send a burst of messages from one user.
_NO_LIMIT = {"per_second": 1000, "burst_count": 1000}


@dataclass
class Homeserver:
    url: str
    server_name: str
    shared_secret: str
    folder: Path

    def register(self, localpart: str, *, admin: bool = False) -> tuple[str, str]:
        """Register `localpart`; return (user_id, access_token)."""
        nonce = httpx.get(f"{self.url}/_synapse/admin/v1/register", timeout=10).json()["nonce"]
        password = uuid.uuid4().hex
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(),
                                 b"admin" if admin else b"notadmin"]))
        response = httpx.post(f"{self.url}/_synapse/admin/v1/register", timeout=30, json={
            "nonce": nonce, "username": localpart, "password": password, "admin": admin,
            "mac": mac.hexdigest()})
        response.raise_for_status()
        body = response.json()
        return body["user_id"], body["access_token"]

    def call(self, token: str, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, f"{self.url}{path}", timeout=30,
                                 headers={"Authorization": f"Bearer {token}"}, **kwargs)
        response.raise_for_status()
        return response.json()

    def create_room(self, token: str, alias_localpart: str) -> str:
        """A private room with alias #<alias_localpart>:<server>; returns the room id."""
        body = self.call(token, "POST", "/_matrix/client/v3/createRoom",
                         json={"room_alias_name": alias_localpart, "preset": "private_chat",
                               "name": alias_localpart})
        return str(body["room_id"])

    def invite_and_join(self, token: str, room_id: str, user_id: str,
                        user_token: str) -> None:
        """`token`'s user invites `user_id`, who joins with `user_token`."""
        self.call(token, "POST", f"/_matrix/client/v3/rooms/{room_id}/invite",
                  json={"user_id": user_id})
        self.call(user_token, "POST", f"/_matrix/client/v3/rooms/{room_id}/join", json={})

    def send(self, token: str, room_id: str, content: dict[str, Any],
             event_type: str = "m.room.message") -> str:
        """Send one event as `token`'s user; returns its event id."""
        body = self.call(token, "PUT", f"/_matrix/client/v3/rooms/{room_id}/send/"
                         f"{event_type}/{uuid.uuid4().hex}", json=content)
        return str(body["event_id"])

    def redact(self, token: str, room_id: str, event_id: str) -> str:
        body = self.call(token, "PUT", f"/_matrix/client/v3/rooms/{room_id}/redact/"
                         f"{event_id}/{uuid.uuid4().hex}", json={"reason": "test"})
        return str(body["event_id"])

    def messages(self, token: str, room_id: str) -> list[dict[str, Any]]:
        """The room's m.room.message events, oldest first."""
        body = self.call(token, "GET", f"/_matrix/client/v3/rooms/{room_id}/messages",
                         params={"dir": "b", "limit": 100})
        events = [e for e in body.get("chunk", []) if e.get("type") == "m.room.message"]
        return list(reversed(events))


def _configure(folder: Path, port: int) -> str:
    config_path = folder / "homeserver.yaml"
    subprocess.run(
        [sys.executable, "-m", "synapse.app.homeserver", "--server-name", SERVER_NAME,
         "--config-path", str(config_path), "--data-directory", str(folder),
         "--generate-config", "--report-stats=no"],
        cwd=folder, check=True, capture_output=True, timeout=120)
    config = yaml.safe_load(config_path.read_text())
    config.update({
        "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"], "type": "http",
                       "tls": False, "x_forwarded": False,
                       "resources": [{"names": ["client"], "compress": False}]}],
        "database": {"name": "sqlite3", "args": {"database": str(folder / "homeserver.db")}},
        "enable_registration": False,
        "federation_domain_whitelist": [],
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "report_stats": False,
        "presence": {"enabled": False},
        "rc_message": _NO_LIMIT,
        "rc_registration": _NO_LIMIT,
        "rc_login": {"address": _NO_LIMIT, "account": _NO_LIMIT,
                     "failed_attempts": _NO_LIMIT},
        "rc_joins": {"local": _NO_LIMIT, "remote": _NO_LIMIT},
        "rc_room_creation": _NO_LIMIT,
        "rc_joins_per_room": _NO_LIMIT,
        "rc_invites": {"per_room": _NO_LIMIT, "per_user": _NO_LIMIT,
                       "per_issuer": _NO_LIMIT},
    })
    config_path.write_text(yaml.safe_dump(config))
    return str(config["registration_shared_secret"])


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"synapse exited with {process.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/_matrix/client/versions", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"synapse did not answer within {STARTUP_TIMEOUT_SECONDS}s; see {log}")


@contextlib.contextmanager
def running(folder: Path) -> Iterator[Homeserver]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    secret = _configure(folder, port)
    url = f"http://127.0.0.1:{port}"
    log = folder / "stdout.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "-c",
             str(folder / "homeserver.yaml")],
            cwd=folder, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "SYNAPSE_NO_TLS": "1"})
    try:
        _wait_until_up(url, process, log)
        yield Homeserver(url=url, server_name=SERVER_NAME, shared_secret=secret, folder=folder)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
