"""The one way every entry point connects to Temporal: same address, namespace, TLS
(from Vault when configured) and pydantic data converter."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from temporalio.client import Client, Interceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import TLSConfig

from config import WorkerConfig
from vault import fetch_tls_material


async def tls_config(config: WorkerConfig) -> TLSConfig | bool:
    if not config.vault_enabled:
        return False
    material = await asyncio.to_thread(fetch_tls_material, config)
    return TLSConfig(server_root_ca_cert=material.ca_cert_pem,
                     client_cert=material.client_cert_pem,
                     client_private_key=material.client_key_pem,
                     domain=config.tls_server_name)


async def connect(config: WorkerConfig, *, interceptors: Sequence[Interceptor] = (),
                  identity: str | None = None) -> Client:
    tls = await tls_config(config)
    kwargs = {"identity": identity} if identity else {}
    return await Client.connect(config.temporal_address, namespace=config.temporal_namespace,
                                tls=tls, data_converter=pydantic_data_converter,
                                interceptors=interceptors, **kwargs)
