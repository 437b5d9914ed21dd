"""The Matrix client-server API as this service uses it: one client, one call shape whose
errors name the step and never the token. Block notices (activities/notify.py) send
through it and the chat listener (decisions/chat_listener.py) reads the room through it.
"""

from __future__ import annotations

import hashlib
from typing import Any, TypedDict, Unpack
from urllib.parse import quote

import httpx

from config import WorkerConfig
from exceptions import NotifyFailedError
from models import MatrixNoticeRef

HTTP_TIMEOUT_SECONDS = 10.0


# Namespaced key of a block notice's content naming its pipeline (decisions/chat_listener.py).
PIPELINE_CONTENT_KEY = "org.temporal_build_worker.pipeline"


def matrix_token(config: WorkerConfig) -> str | None:
    if config.matrix_access_token is not None:
        return config.matrix_access_token.get_secret_value()
    if config.matrix_access_token_file is not None:
        try:
            return config.matrix_access_token_file.read_text().strip() or None
        except OSError as err:
            raise NotifyFailedError(f"MATRIX_ACCESS_TOKEN_FILE unreadable: {err.strerror}",
                               retryable=False) from None
    return None


def room_reference(room: str, server_name: str) -> str:
    """Room id (!x:s) and alias (#x:s) pass through; a short name becomes #name:server."""
    if room.startswith(("!", "#")):
        return room
    return f"#{room}:{server_name}"


def matrix_http(config: WorkerConfig, token: str,
                timeout: float = HTTP_TIMEOUT_SECONDS) -> httpx.AsyncClient:
    """A client-server API client; the token travels only in this header."""
    return httpx.AsyncClient(base_url=str(config.matrix_homeserver).rstrip("/"),
                             headers={"Authorization": f"Bearer {token}"}, timeout=timeout)


async def resolve_room(http: httpx.AsyncClient, config: WorkerConfig) -> str:
    """MATRIX_ROOM as a room id (aliases and short names resolved by the homeserver)."""
    room = config.matrix_room
    if room.startswith("!"):
        return room
    if not room.startswith("#"):
        whoami = await matrix_call(http, "whoami", "GET", "/_matrix/client/v3/account/whoami")
        server_name = str(whoami.get("user_id", "")).partition(":")[2]
        if not server_name:
            raise NotifyFailedError("Matrix whoami returned no server name")
        room = room_reference(room, server_name)
    resolved = await matrix_call(http, f"resolve {room}", "GET",
                           f"/_matrix/client/v3/directory/room/{quote(room, safe='')}")
    room_id = str(resolved.get("room_id") or "")
    if not room_id:
        raise NotifyFailedError(f"Matrix alias {config.matrix_room!r} did not resolve",
                           retryable=False)
    return room_id


def txn_id_for(seed: str) -> str:
    """A transaction id derived from `seed`: the homeserver sends a repeat only once."""
    return hashlib.sha256(seed.encode()).hexdigest()[:32]


async def send_matrix(config: WorkerConfig, message: str, txn_seed: str,
                      pipeline: MatrixNoticeRef | None = None) -> None:
    """Send `message` as an m.notice; `pipeline` rides along under PIPELINE_CONTENT_KEY so
    a reply or reaction to the notice names its pipeline without any state in a worker."""
    token = matrix_token(config)
    if not token:
        raise NotifyFailedError("MATRIX_HOMESERVER set but no access token configured",
                           retryable=False)
    # An empty m.mentions: the notice pings nobody, whatever its text.
    content: dict[str, object] = {"msgtype": "m.notice", "body": message, "m.mentions": {}}
    if pipeline is not None:
        content[PIPELINE_CONTENT_KEY] = pipeline.model_dump()
    async with matrix_http(config, token) as http:
        room = await resolve_room(http, config)
        # Derived from the workflow, so a retried stage is de-duplicated by the homeserver.
        await matrix_call(http, "send", "PUT",
                    f"/_matrix/client/v3/rooms/{quote(room, safe='')}/send/m.room.message/"
                    f"{txn_id_for(txn_seed)}", json=content)


class MatrixRequest(TypedDict, total=False):
    """What a call may add to its method and URL (httpx's request arguments)."""

    json: dict[str, Any]
    params: dict[str, str]
    timeout: float


async def matrix_call(http: httpx.AsyncClient, step: str, method: str, url: str,
                      **request: Unpack[MatrixRequest]) -> dict[str, Any]:
    """One client-server API call; errors name the step, never the token."""
    try:
        response = await http.request(method, url, **request)
    except httpx.HTTPError as err:
        raise NotifyFailedError(f"Matrix {step}: {type(err).__name__}") from None
    if response.status_code >= 400:
        try:
            code = str(response.json().get("errcode", ""))
        except ValueError:
            code = ""
        # 4xx other than timeouts and rate limits will not change on a retry.
        retryable = response.status_code >= 500 or response.status_code in (408, 429)
        raise NotifyFailedError(f"Matrix {step}: HTTP {response.status_code} {code}".rstrip(),
                           retryable=retryable)
    try:
        body = response.json()
    except ValueError:
        raise NotifyFailedError(f"Matrix {step}: response is not JSON") from None
    if not isinstance(body, dict):
        raise NotifyFailedError(f"Matrix {step}: response is not a JSON object")
    return body
