"""The one way every entry point connects to Temporal: same address, namespace, TLS
(from Vault when configured) and pydantic data converter."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from temporalio.client import Client, Interceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime
from temporalio.service import TLSConfig

from config import WorkerConfig
from exceptions import CredentialError, TlsHandshakeError
from vault import fetch_tls_material

# Markers in the SDK core's connect error -> what to fix. The raw message (a Rust debug
# dump) is kept after the hint; the hint is what an operator reads first.
_MATERIAL_PROBLEMS = (
    ("KeyMismatch", "client_key_pem in Vault does not belong to client_cert_pem"),
    ("failed to parse", "the certificate or key in Vault cannot be parsed"),
)
# A refusal no wait cures: the certificates, the name or the address are wrong.
_HANDSHAKE_PROBLEMS = (
    ("NotValidForName", "the server certificate does not carry the name we asked for: set "
                        "TEMPORAL_TLS_SERVER_NAME to a name on the certificate"),
    ("InvalidCertificate", "the server certificate is not trusted by ca_cert_pem from Vault "
                           "(wrong CA?)"),
    ("UnknownCA", "the server does not trust our client certificate (client_cert_pem is "
                  "not signed by a CA it accepts)"),
    ("CertificateRequired", "the server requires a client certificate"),
    ("BadCertificate", "the server rejected our client certificate"),
    ("InvalidContentType", "the server does not speak TLS at TEMPORAL_ADDRESS"),
)
# A connection cut during or right after the handshake: a refused client certificate
# (TLS 1.3 reports it after the client's side is done) or a proxy whose server is not up
# yet. Explained, but left a plain RuntimeError, so the worker waits on it at start.
_HANDSHAKE_CUTS = (
    ("tls handshake eof", "the server closed the TLS handshake"),
    ("BrokenPipe", "the server closed the connection right after the TLS handshake (does "
                   "it accept our client certificate?)"),
    ("ConnectionReset", "the server reset the connection right after the TLS handshake "
                        "(does it accept our client certificate?)"),
    # The same refusal, seen on a loaded machine a moment later: the first call is cut.
    ('"connection closed"', "the server closed the connection right after the TLS "
                            "handshake (does it accept our client certificate?)"),
)


def explain_tls_failure(err: RuntimeError) -> Exception:
    """A CredentialError for unusable material from Vault, a TlsHandshakeError for a
    handshake refused for good, a RuntimeError for a cut connection; the first words of
    each say what is wrong. Anything else (the server down) is returned as it came."""
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    for marker, hint in _MATERIAL_PROBLEMS:
        if marker in detail:
            return CredentialError(f"{hint} ({detail})")
    for marker, hint in _HANDSHAKE_PROBLEMS:
        if marker in detail:
            return TlsHandshakeError(f"TLS handshake failed: {hint} ({detail})")
    for marker, hint in _HANDSHAKE_CUTS:
        if marker in detail:
            return RuntimeError(f"TLS handshake failed: {hint} ({detail})")
    return err


async def tls_config(config: WorkerConfig) -> TLSConfig | bool:
    if not config.vault_enabled:
        return False
    material = await asyncio.to_thread(fetch_tls_material, config)
    return TLSConfig(server_root_ca_cert=material.ca_cert_pem,
                     client_cert=material.client_cert_pem,
                     client_private_key=material.client_key_pem,
                     domain=config.tls_server_name)


async def connect(config: WorkerConfig, *, interceptors: Sequence[Interceptor] = (),
                  identity: str | None = None, runtime: Runtime | None = None) -> Client:
    tls = await tls_config(config)
    try:
        # An empty identity or no runtime leaves the SDK's own default (None).
        return await Client.connect(config.temporal_address,
                                    namespace=config.temporal_namespace, tls=tls,
                                    data_converter=pydantic_data_converter,
                                    interceptors=interceptors, identity=identity or None,
                                    runtime=runtime)
    except RuntimeError as err:
        if tls is False:
            raise
        raise explain_tls_failure(err) from None
