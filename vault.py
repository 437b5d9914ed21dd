"""mTLS material from Vault: AppRole login, then one KV v2 read.

The secret-id is read from its file only for the login call and dropped right after;
certificates and key stay in memory (never written to disk). Every failure is a
CredentialError whose message says what to fix and never contains a secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from config import WorkerConfig
from exceptions import CredentialError

KV_MOUNT = "secret"
KV_PATH = "temporal/worker"
PEM_FIELDS = ("ca_cert_pem", "client_cert_pem", "client_key_pem")
VAULT_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class TlsMaterial:
    ca_cert_pem: bytes = field(repr=False)
    client_cert_pem: bytes = field(repr=False)
    client_key_pem: bytes = field(repr=False)


def _read_secret_id(config: WorkerConfig) -> str:
    path = config.vault_secret_id_file
    try:
        secret_id = path.read_text().strip() if path else ""
    except OSError as err:
        raise CredentialError(f"VAULT_SECRET_ID_FILE {path}: cannot read: {err.strerror}") \
            from None
    except UnicodeDecodeError:
        raise CredentialError(f"VAULT_SECRET_ID_FILE {path}: not text") from None
    if not secret_id:
        raise CredentialError(f"VAULT_SECRET_ID_FILE {path}: file is empty")
    return secret_id


def fetch_tls_material(config: WorkerConfig) -> TlsMaterial:
    """AppRole login + KV v2 read of secret/data/temporal/worker."""
    import hvac  # only when Vault is configured
    import requests

    if not config.vault_enabled or config.vault_role_id is None:
        raise CredentialError("Vault is not configured (VAULT_ADDR, VAULT_ROLE_ID, "
                              "VAULT_SECRET_ID_FILE)")
    client = hvac.Client(url=config.vault_addr, timeout=VAULT_TIMEOUT_SECONDS)
    secret_id: str | None = _read_secret_id(config)
    try:
        client.auth.approle.login(role_id=config.vault_role_id.get_secret_value(),
                                  secret_id=secret_id)
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden,
            hvac.exceptions.Unauthorized):
        raise CredentialError(f"Vault at {config.vault_addr} refused the AppRole login: check "
                              f"VAULT_ROLE_ID and the secret-id in VAULT_SECRET_ID_FILE") from None
    except requests.exceptions.RequestException as err:
        raise CredentialError(f"Vault at {config.vault_addr} unreachable "
                              f"({type(err).__name__}): check VAULT_ADDR") from None
    except hvac.exceptions.VaultError as err:
        raise CredentialError(f"Vault AppRole login failed: {type(err).__name__}") from None
    finally:
        secret_id = None
    try:
        response = client.secrets.kv.v2.read_secret_version(
            path=KV_PATH, mount_point=KV_MOUNT, raise_on_deleted_version=True)
    except hvac.exceptions.InvalidPath:
        raise CredentialError(f"Vault secret {KV_MOUNT}/data/{KV_PATH} does not exist") from None
    except hvac.exceptions.Forbidden:
        raise CredentialError(f"Vault policy of this AppRole may not read "
                              f"{KV_MOUNT}/data/{KV_PATH}") from None
    except requests.exceptions.RequestException as err:
        raise CredentialError(f"Vault at {config.vault_addr} unreachable "
                              f"({type(err).__name__})") from None
    except hvac.exceptions.VaultError as err:
        raise CredentialError(f"Vault read of {KV_MOUNT}/data/{KV_PATH} failed: "
                              f"{type(err).__name__}") from None
    data = (response or {}).get("data", {}).get("data") or {}
    values: dict[str, bytes] = {}
    for name in PEM_FIELDS:
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            raise CredentialError(f"Vault secret {KV_MOUNT}/data/{KV_PATH} has no field {name}")
        if "-----BEGIN " not in value:
            raise CredentialError(f"Vault secret field {name} is not PEM")
        values[name] = value.encode()
    return TlsMaterial(**values)
