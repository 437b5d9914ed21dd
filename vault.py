"""mTLS material from Vault: AppRole login, then one KV v2 read.

The secret-id is read from its file only for the login call and dropped right after;
certificates and key stay in memory (never written to disk). Every failure is a
CredentialError whose message says what to fix and never contains a secret.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from config import WorkerConfig
from exceptions import CredentialError, CredentialSettingError, VaultUnavailableError

KV_MOUNT = "secret"
KV_PATH = "temporal/worker"
PEM_FIELDS = ("ca_cert_pem", "client_cert_pem", "client_key_pem")
VAULT_TIMEOUT_SECONDS = 10
MAX_SECRET_ID_CHARS = 1024
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\s*([A-Za-z0-9+/=\s]*?)\s*-----END \1-----")


@dataclass(frozen=True)
class TlsMaterial:
    ca_cert_pem: bytes = field(repr=False)
    client_cert_pem: bytes = field(repr=False)
    client_key_pem: bytes = field(repr=False)


def _read_secret_id(config: WorkerConfig) -> str:
    path = config.vault_secret_id_file
    try:
        # Bounded read: a secret-id is a few dozen bytes; a wrong path (a log, /dev/zero)
        # must not be read whole into memory.
        with open(path or "", encoding="utf-8") as handle:
            secret_id = handle.read(MAX_SECRET_ID_CHARS + 1).strip()
    except OSError as err:
        raise CredentialSettingError(f"VAULT_SECRET_ID_FILE {path}: cannot read: "
                                     f"{err.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialSettingError(f"VAULT_SECRET_ID_FILE {path}: not text") from None
    if not secret_id:
        raise CredentialSettingError(f"VAULT_SECRET_ID_FILE {path}: file is empty")
    if len(secret_id) > MAX_SECRET_ID_CHARS or any(ch.isspace() for ch in secret_id):
        raise CredentialSettingError(f"VAULT_SECRET_ID_FILE {path}: does not hold a single "
                                     f"secret-id (whitespace inside or over "
                                     f"{MAX_SECRET_ID_CHARS} characters)")
    return secret_id


def _check_pem(name: str, value: str) -> None:
    """Refuse what the TLS stack would reject later with a less helpful message."""
    blocks = _PEM_BLOCK.findall(value)
    if not blocks:
        raise CredentialError(f"Vault secret field {name} is not PEM (no complete "
                              f"-----BEGIN/END----- block)")
    wanted = "private key" if name == "client_key_pem" else "certificate"
    for label, body in blocks:
        try:
            base64.b64decode("".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise CredentialError(f"Vault secret field {name} is not PEM (the {label} block "
                                  f"is not valid base64)") from None
        if label == "ENCRYPTED PRIVATE KEY":
            raise CredentialError(f"Vault secret field {name} holds an encrypted key; "
                                  f"store it unencrypted (PKCS#8 or PKCS#1/SEC1)")
        fits = label == "CERTIFICATE" if wanted == "certificate" else label.endswith(
            "PRIVATE KEY")
        if not fits:
            raise CredentialError(f"Vault secret field {name} holds a {label} block; "
                                  f"expected a {wanted}")


def _unavailable(config: WorkerConfig, err: Exception) -> VaultUnavailableError:
    state = "sealed or not ready" if type(err).__name__ == "VaultDown" else "not serving"
    return VaultUnavailableError(f"Vault at {config.vault_addr} is {state} "
                                 f"({type(err).__name__})")


def _unavailable_errors() -> tuple[type[Exception], ...]:
    """Vault's answers waiting may cure: 503 (sealed, standby), 502 and 500 (a proxy in
    front of it, a restart)."""
    import hvac

    return (hvac.exceptions.VaultDown, hvac.exceptions.BadGateway,
            hvac.exceptions.InternalServerError)


def _login(client: Any, config: WorkerConfig) -> None:
    import hvac
    import requests

    assert config.vault_role_id is not None
    secret_id: str | None = _read_secret_id(config)
    try:
        client.auth.approle.login(role_id=config.vault_role_id.get_secret_value(),
                                  secret_id=secret_id)
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden,
            hvac.exceptions.Unauthorized):
        raise CredentialSettingError(f"Vault at {config.vault_addr} refused the AppRole login: "
                                     f"check VAULT_ROLE_ID and the secret-id in "
                                     f"VAULT_SECRET_ID_FILE") from None
    except requests.exceptions.RequestException as err:
        raise VaultUnavailableError(f"Vault at {config.vault_addr} unreachable "
                                    f"({type(err).__name__}): check VAULT_ADDR") from None
    except _unavailable_errors() as err:
        raise _unavailable(config, err) from None
    except hvac.exceptions.VaultError as err:
        raise CredentialError(f"Vault AppRole login failed: {type(err).__name__}") from None
    finally:
        secret_id = None


def _read_secret(client: Any, config: WorkerConfig) -> dict[str, Any]:
    import hvac
    import requests

    try:
        response = client.secrets.kv.v2.read_secret_version(
            path=KV_PATH, mount_point=KV_MOUNT, raise_on_deleted_version=True)
    except hvac.exceptions.InvalidPath:
        raise CredentialError(f"Vault secret {KV_MOUNT}/data/{KV_PATH} does not exist") from None
    except hvac.exceptions.Forbidden:
        raise CredentialError(f"Vault policy of this AppRole may not read "
                              f"{KV_MOUNT}/data/{KV_PATH}") from None
    except requests.exceptions.RequestException as err:
        raise VaultUnavailableError(f"Vault at {config.vault_addr} unreachable "
                                    f"({type(err).__name__})") from None
    except _unavailable_errors() as err:
        raise _unavailable(config, err) from None
    except hvac.exceptions.VaultError as err:
        raise CredentialError(f"Vault read of {KV_MOUNT}/data/{KV_PATH} failed: "
                              f"{type(err).__name__}") from None
    return (response or {}).get("data", {}).get("data") or {}


def fetch_tls_material(config: WorkerConfig) -> TlsMaterial:
    """AppRole login + KV v2 read of secret/data/temporal/worker."""
    import hvac  # only when Vault is configured

    if not config.vault_enabled or config.vault_role_id is None:
        raise CredentialError("Vault is not configured (VAULT_ADDR, VAULT_ROLE_ID, "
                              "VAULT_SECRET_ID_FILE)")
    client = hvac.Client(url=config.vault_addr, timeout=VAULT_TIMEOUT_SECONDS)
    _login(client, config)
    data = _read_secret(client, config)
    values: dict[str, bytes] = {}
    for name in PEM_FIELDS:
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            raise CredentialError(f"Vault secret {KV_MOUNT}/data/{KV_PATH} has no field {name}")
        _check_pem(name, value)
        values[name] = value.encode()
    return TlsMaterial(**values)
