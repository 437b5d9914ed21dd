"""vault.py and transport security on a real bed (tests/mtls.py): an OpenBao dev server
with AppRole and the KV v2 secret, and a TLS endpoint that demands client certificates in
front of the Temporal dev server. The worker and complete_activity.py run as separate
processes, exactly as deployed; every byte they print is searched for secrets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.service import TLSConfig

from config import VAULT_VARS, load_config
from exceptions import CredentialError, CredentialSettingError
from models import BuildPipelineInput, BuildPipelineResult, BuildPlanResult
from standins.agents import (
    REPO,
    complete_task,
    load_yaml,
    run_cli,
    task_files,
    wait_for_task,
    write_origin_task,
)
from temporal_client import connect
from tests.agents import assert_valid_task_file
from tests.conftest import make_env
from tests.mtls import (
    CLIENT_NAME,
    SERVER_NAME,
    AppRole,
    OpenBao,
    Pki,
    TlsProxy,
    issue,
    make_approle,
    make_ca,
    make_pki,
    openbao,
    tls_handshake,
    tls_proxy,
    vault_env,
    worker_secret,
    write_secret_id_file,
)
from tests.worker_process import WorkerProcess
from tools.devserver import free_port
from vault import fetch_tls_material
from vocabulary import (
    AUDIT_REQUESTS_DIR,
    BUILD_PIPELINE_WORKFLOW,
    BUILD_PLAN_WORKFLOW,
    TASK_BUILD_CLOSEOUT,
    TASK_BUILD_PHASE,
    TASK_BUILD_PLAN,
    TASK_BUILD_PREFAB,
    TASK_SECURITY_AUDIT,
    TASK_SECURITY_FIX,
)

# Valid base64 that no server ever issued: the CLI must fail on credentials before using it.
GARBAGE_TOKEN = "dGhpcyBpcyBub3QgYSB0YXNrIHRva2Vu"
# OpenBao/Vault service tokens (s.…, hvs.…, b.…): none may ever be printed.
VAULT_TOKEN_RE = re.compile(r"\b(?:hvs|hvb|s|b)\.[A-Za-z0-9_-]{20,}")


@dataclass
class Bed:
    bao: OpenBao
    proxy: TlsProxy
    pki: Pki
    role: AppRole

    def secrets(self) -> list[str]:
        """Strings that must never appear in any output: AppRole credentials, the root
        token, and a line of the client's private key."""
        key_line = self.pki.client.key_pem.splitlines()[1]
        return [self.role.role_id, self.role.secret_id, self.bao.root_token, key_line]

    def restore_secret(self) -> None:
        self.bao.write_worker_secret(worker_secret(self.pki))


@pytest.fixture(scope="module")
def bed(temporal_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    folder = tmp_path_factory.mktemp("mtls-bed")
    pki = make_pki()
    with openbao(folder / "bao.log") as bao, tls_proxy(temporal_address, pki, folder) as proxy:
        role = make_approle(bao)
        bed = Bed(bao=bao, proxy=proxy, pki=pki, role=role)
        bed.restore_secret()
        yield bed


@pytest.fixture
def vault_vars(bed: Bed, tmp_path: Path) -> dict[str, str]:
    """Worker/CLI environment: private folders, Vault credentials, the TLS endpoint."""
    secret_id_file = write_secret_id_file(tmp_path, bed.role.secret_id)
    return make_env(tmp_path, bed.proxy.address,
                    **vault_env(bed.bao, bed.role, secret_id_file, bed.proxy.address))


# Writes the worker's secret (None: deletes it).
SwapSecret = Callable[[dict[str, str] | None], None]


@pytest.fixture
def swap_secret(bed: Bed) -> Iterator[SwapSecret]:
    """Replace secret/data/temporal/worker for one test; the good secret comes back after."""

    def swap(data: dict[str, str] | None) -> None:
        if data is None:
            bed.bao.delete_worker_secret()
        else:
            bed.bao.write_worker_secret(data)

    try:
        yield swap
    finally:
        bed.restore_secret()


def assert_no_secrets(bed: Bed, *texts: str) -> None:
    for text in texts:
        for secret in bed.secrets():
            assert secret not in text, "a secret was printed"
        assert not VAULT_TOKEN_RE.search(text), "a Vault token was printed"


def run_worker_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """worker.py as pm2 runs it, for runs that must end by themselves (bad credentials)."""
    return subprocess.run([sys.executable, str(REPO / "worker.py")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def run_both(env: dict[str, str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str],
                                                          subprocess.CompletedProcess[str]]:
    """The worker and the CLI on the same environment, side by side (halves the wait)."""
    token_file = tmp_path / "garbage-token"
    token_file.write_text(GARBAGE_TOKEN)
    with ThreadPoolExecutor(2) as pool:
        worker = pool.submit(run_worker_once, env)
        cli = pool.submit(run_cli, ["--token-file", str(token_file), "success"], env)
        return worker.result(), cli.result()


def stderr_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {result.stderr!r}"
    return lines[0]


# --- the happy path -----------------------------------------------------------------


def test_fetch_keeps_the_three_pems_in_memory(bed: Bed, vault_vars: dict[str, str],
                                               tmp_path: Path) -> None:
    before = sorted(tmp_path.rglob("*"))
    material = fetch_tls_material(load_config(vault_vars))

    assert material.ca_cert_pem == bed.pki.ca.cert_pem.encode()
    assert material.client_cert_pem == bed.pki.client.cert_pem.encode()
    assert material.client_key_pem == bed.pki.client.key_pem.encode()
    assert "PRIVATE KEY" not in repr(material)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written to disk


@pytest.fixture
def umask_000() -> Iterator[None]:
    """The loosest umask an operator could have: files must still come out private."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def modes_under(root: Path) -> dict[Path, int]:
    return {path: stat.S_IMODE(path.lstat().st_mode) for path in [root, *root.rglob("*")]}


@pytest.mark.slow
@pytest.mark.usefixtures("umask_000")
async def test_worker_runs_a_pipeline_through_mtls(bed: Bed, vault_vars: dict[str, str],
                                                   tmp_path: Path) -> None:
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    env = {**vault_vars, "LOG_LEVEL": "DEBUG", "TMPDIR": str(scratch)}
    config = load_config(env)
    accepted_before = len(bed.proxy.log.accepted)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    cli_output: list[str] = []
    try:
        await asyncio.to_thread(worker.wait_ready, 60)
        client = await connect(config)  # the operator's side goes through mTLS too
        inp = BuildPipelineInput(build_name="mtls-build", plan_path="/plans/mtls.md",
                                 task_id=write_origin_task(config.task_queue_dir),
                                 target_agent="builder")
        handle = await client.start_workflow(BUILD_PIPELINE_WORKFLOW, inp,
                                             id=f"mtls-{uuid.uuid4()}",
                                             task_queue=config.task_queue,
                                             result_type=BuildPipelineResult)
        for task_type in (TASK_BUILD_PREFAB, TASK_BUILD_PLAN, TASK_SECURITY_AUDIT,
                          TASK_SECURITY_FIX, TASK_BUILD_CLOSEOUT):
            path = await wait_for_task(config.task_queue_dir, handle.id, task_type, timeout=60)
            if task_type == TASK_SECURITY_AUDIT:
                triage = config.audit_dir / AUDIT_REQUESTS_DIR / "mtls-build" / "triage-output.yml"
                triage.write_text("flags:\n- Pin the base image\n")
            done = await complete_task(path, env, "success", f"{task_type} done")
            cli_output += [done.stdout, done.stderr]
        result = await asyncio.wait_for(handle.result(), 60)
        worker.signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(worker.wait, 60)
    finally:
        worker.stop()

    assert result.outcome == "success"
    assert result.flags == 1
    assert exit_code == 0, worker.tail()
    # Everyone went through the client-certificate check: worker, test client, 5 CLI runs.
    accepted = bed.proxy.log.accepted[accepted_before:]
    assert len(accepted) >= 7
    assert set(accepted) == {CLIENT_NAME}
    # No task token, AppRole credential, Vault token or key material in any output.
    tokens = [load_yaml(p)["payload"]["task_token"] for p in task_files(config.task_queue_dir)
              if "task_token" in load_yaml(p)["payload"]]
    assert len(tokens) == 5
    worker_log = (tmp_path / "worker.log").read_text()
    assert '"level": "DEBUG"' in worker_log  # the strictest log level was really on
    for text in [worker_log, *cli_output]:
        for token in tokens:
            assert token[:24] not in text, "a task token was printed"
    assert_no_secrets(bed, worker_log, *cli_output)
    # The certificates stayed in memory: no file the worker or CLI could write holds them.
    key_line = bed.pki.client.key_pem.splitlines()[1]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key_line not in path.read_text(errors="replace"), f"key material in {path}"
    # umask 000, yet every folder the service made is 0700 and every file 0600, including
    # the task files complete_activity.py rewrote.
    for root in (config.task_queue_dir, config.audit_dir, config.summary_dir):
        for path, mode in modes_under(root).items():
            if path.name == "triage-output.yml":
                continue  # written by this test, playing the security agent
            expected = 0o700 if path.is_dir() else 0o600
            assert mode == expected, f"{path} is {oct(mode)}"
    for path in task_files(config.task_queue_dir):
        if "task_token" in load_yaml(path)["payload"]:  # the five the worker wrote
            assert assert_valid_task_file(path)["status"] == "completed"


@pytest.mark.slow
async def test_agent_cli_takes_vault_settings_from_the_env_file(bed: Bed,
                                                                vault_vars: dict[str, str],
                                                                tmp_path: Path) -> None:
    """The worker runs as pm2 runs it (settings from its env file); an agent with only
    PATH and HOME, in `/`, runs the task's command: the connection facts come from the
    task, the Vault credentials from the env file the task names."""
    env_file = tmp_path / "worker.env"
    credentials = "".join(f"{name}={vault_vars[name]}\n" for name in VAULT_VARS)
    env_file.write_text(credentials)
    env_file.chmod(0o600)
    env = {**vault_vars, "WORKER_ENV_FILE": str(env_file)}
    config = load_config(env)
    agent = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    accepted_before = len(bed.proxy.log.accepted)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        await asyncio.to_thread(worker.wait_ready, 60)
        client = await connect(config)
        handle = await client.start_workflow(
            BUILD_PLAN_WORKFLOW, {"plan_name": "mtls-plan", "phases": [
                {"number": 1, "agent_type": "builder", "description": "through mTLS"}]},
            id=f"mtls-plan-{uuid.uuid4()}", task_queue=config.task_queue,
            result_type=BuildPlanResult)
        path = await wait_for_task(config.task_queue_dir, handle.id, TASK_BUILD_PHASE, timeout=60)
        payload = assert_valid_task_file(path)["payload"]
        assert payload["temporal"] == {
            "address": bed.proxy.address, "namespace": "default",
            "task_queue": config.task_queue, "tls_server_name": SERVER_NAME,
            "require_tls": True, "tls": True, "env_file": str(env_file)}
        command = [*payload["complete_command"], "success"]

        env_file.write_text("# credentials moved elsewhere\n")
        missing = subprocess.run([*command, "not yet"], cwd="/", env=agent,
                                 capture_output=True, text=True, timeout=60)
        env_file.write_text(credentials)
        done = subprocess.run([*command, "through the env file"], cwd="/", env=agent,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        result = await asyncio.wait_for(handle.result(), 60)
    finally:
        worker.stop()

    assert missing.returncode == 2, missing.stderr
    assert "VAULT_ADDR" in stderr_line(missing)
    assert str(env_file) in stderr_line(missing)
    assert result == BuildPlanResult(status="success", phases_run=1)
    assert load_yaml(path)["result"]["output"] == "through the env file"
    # Worker, test client and the agent's CLI all passed the client-certificate check.
    assert len(bed.proxy.log.accepted[accepted_before:]) >= 3
    assert_no_secrets(bed, missing.stdout, missing.stderr, done.stdout, done.stderr)


# --- the TLS endpoint refuses ------------------------------------------------------------


async def test_client_without_certificate_is_refused(bed: Bed, tmp_path: Path) -> None:
    ca = bed.pki.ca.cert_pem
    refused_before = len(bed.proxy.log.refused)

    with_cert = tls_handshake(bed.proxy.address, ca_pem=ca, client=bed.pki.client,
                              folder=tmp_path)
    without = tls_handshake(bed.proxy.address, ca_pem=ca, client=None, folder=tmp_path)

    assert with_cert == "ok"
    assert without != "ok"
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in bed.proxy.log.refused[refused_before:]
    # The SDK without a client certificate, and in plaintext: neither gets a connection.
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(Client.connect(bed.proxy.address, tls=TLSConfig(
            server_root_ca_cert=ca.encode(), domain=SERVER_NAME)), 30)
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(Client.connect(bed.proxy.address), 30)
    assert len(bed.proxy.log.refused) >= refused_before + 3


def foreign_client(pki: Pki) -> dict[str, str]:
    """A client certificate from a CA the endpoint does not trust."""
    other_ca, other_key = make_ca("some other CA")
    client = issue(other_ca, other_key, CLIENT_NAME, server=False)
    return {**worker_secret(pki), "client_cert_pem": client.cert_pem,
            "client_key_pem": client.key_pem}


def test_wrong_ca_is_a_clear_error(bed: Bed, vault_vars: dict[str, str], tmp_path: Path,
                                   swap_secret: SwapSecret) -> None:
    swap_secret({**worker_secret(bed.pki), "ca_cert_pem": make_ca()[0].cert_pem})

    worker, cli = run_both(vault_vars, tmp_path)

    # The worker exits at once (no wait cures it), as a credential error pm2 does not
    # restart; for the agent's CLI any credential trouble is "retry later".
    assert (worker.returncode, cli.returncode) == (3, 4), (worker.stderr, cli.stderr)
    hint = "TLS handshake failed: the server certificate is not trusted by ca_cert_pem"
    assert hint in stderr_line(worker)
    assert hint in stderr_line(cli)
    assert_no_secrets(bed, worker.stdout, worker.stderr, cli.stdout, cli.stderr)


@pytest.mark.parametrize(("case", "hints"), [
    # TLS 1.3 checks the client certificate after the client's side of the handshake: the
    # refusal arrives as the server's alert or, on a loaded machine, as the connection
    # closing before the alert is read. Both messages name the client certificate.
    ("foreign client certificate", ("the server does not trust our client certificate",
                                    "(does it accept our client certificate?)")),
    ("no server name", ("set TEMPORAL_TLS_SERVER_NAME to a name on the certificate",)),
])
async def test_tls_failures_are_clear(bed: Bed, vault_vars: dict[str, str],
                                      swap_secret: SwapSecret, case: str,
                                      hints: tuple[str, ...]) -> None:
    env = dict(vault_vars)
    if case == "foreign client certificate":
        swap_secret(foreign_client(bed.pki))
    else:
        del env["TEMPORAL_TLS_SERVER_NAME"]  # 127.0.0.1 is not on the certificate

    with pytest.raises(RuntimeError) as caught:
        await connect(load_config(env))

    assert str(caught.value).startswith("TLS handshake failed: ")
    assert any(hint in str(caught.value) for hint in hints), str(caught.value)
    assert_no_secrets(bed, str(caught.value))


def test_key_not_matching_certificate_is_a_credential_error(
        bed: Bed, vault_vars: dict[str, str], swap_secret: SwapSecret) -> None:
    swap_secret({**worker_secret(bed.pki), "client_key_pem": make_pki().client.key_pem})

    worker = run_worker_once(vault_vars)

    assert worker.returncode == 3, worker.stderr
    assert "client_key_pem in Vault does not belong to client_cert_pem" in stderr_line(worker)
    assert_no_secrets(bed, worker.stdout, worker.stderr)


@pytest.mark.slow
def test_require_tls_refuses_plaintext(pipeline_env_vars: dict[str, str],
                                       tmp_path: Path) -> None:
    env = {**pipeline_env_vars, "TEMPORAL_REQUIRE_TLS": "true"}  # and no Vault

    worker, cli = run_both(env, tmp_path)

    assert (worker.returncode, cli.returncode) == (2, 2), (worker.stderr, cli.stderr)
    for result in (worker, cli):
        assert "TEMPORAL_REQUIRE_TLS: plaintext refused" in stderr_line(result)
    assert "Worker started" not in worker.stdout


# --- every Vault failure: a CredentialError naming the problem, exit 3 / 4 -------------


def _bad_secret_id_file(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"secret-id-{kind}"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_text("\n")
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00secret")
    elif kind == "two-lines":
        path.write_text(f"{uuid.uuid4()}\n{uuid.uuid4()}\n")
    elif kind == "wrong":
        path.write_text(str(uuid.uuid4()))
    return path


# (case, message in the error, also run through both entry points as processes?)
# The issue's list runs as processes; the rest are checked in-process, which is the same
# code path minus a second of interpreter start-up each.
VAULT_FAILURES = [
    ("unreachable", "unreachable", True),
    ("wrong role-id", "refused the AppRole login", True),
    ("secret-id file missing", "cannot read", True),
    ("secret-id file empty", "file is empty", True),
    ("field missing", "has no field client_key_pem", True),
    ("field not pem", "ca_cert_pem is not PEM", True),
    ("wrong secret-id", "refused the AppRole login", False),
    ("secret-id file is a directory", "cannot read", False),
    ("secret-id file not text", "not text", False),
    ("secret-id file holds two lines", "does not hold a single secret-id", False),
    ("secret missing", "does not exist", False),
    ("policy forbids the read", "may not read secret/data/temporal/worker", False),
    ("pem with garbage body", "client_cert_pem is not PEM", False),
    ("key where a certificate belongs", "client_cert_pem holds a PRIVATE KEY block", False),
]
# A wrong Vault setting (the role id, the secret-id file) is CredentialSettingError, the
# CLI's exit 2 "fix the setting"; what waiting may cure (Vault down, its secret being
# fixed by an operator) stays exit 4.
SETTING_FAILURES = frozenset({"wrong role-id", "wrong secret-id", "secret-id file missing",
                              "secret-id file empty", "secret-id file is a directory",
                              "secret-id file not text", "secret-id file holds two lines"})


@pytest.mark.parametrize(("case", "message", "processes"), VAULT_FAILURES,
                         ids=[case for case, _, _ in VAULT_FAILURES])
def test_vault_failure(bed: Bed, vault_vars: dict[str, str], tmp_path: Path,
                       swap_secret: SwapSecret, case: str, message: str, processes: bool) -> None:
    env = dict(vault_vars)
    good = worker_secret(bed.pki)
    if case == "unreachable":
        env["VAULT_ADDR"] = f"http://127.0.0.1:{free_port()}"
        env["WORKER_STARTUP_WAIT_SECONDS"] = "0"  # one attempt: the wait is tested apart
    elif case == "wrong role-id":
        env["VAULT_ROLE_ID"] = str(uuid.uuid4())
    elif case.startswith(("wrong secret-id", "secret-id file")):
        kind = {"wrong secret-id": "wrong", "secret-id file missing": "missing",
                "secret-id file is a directory": "directory", "secret-id file empty": "empty",
                "secret-id file not text": "binary",
                "secret-id file holds two lines": "two-lines"}[case]
        env["VAULT_SECRET_ID_FILE"] = str(_bad_secret_id_file(kind, tmp_path))
    elif case == "secret missing":
        swap_secret(None)
    elif case == "policy forbids the read":
        other = make_approle(bed.bao, role="other-service", readable="secret/data/other")
        env["VAULT_ROLE_ID"] = other.role_id
        env["VAULT_SECRET_ID_FILE"] = str(write_secret_id_file(tmp_path, other.secret_id,
                                                               "other-secret-id"))
    elif case == "field missing":
        swap_secret({k: v for k, v in good.items() if k != "client_key_pem"})
    elif case == "field not pem":
        swap_secret({**good, "ca_cert_pem": "not a certificate"})
    elif case == "pem with garbage body":
        swap_secret({**good, "client_cert_pem":
                     "-----BEGIN CERTIFICATE-----\nnot*base64!\n-----END CERTIFICATE-----\n"})
    elif case == "key where a certificate belongs":
        swap_secret({**good, "client_cert_pem": bed.pki.client.key_pem})

    with pytest.raises(CredentialError) as caught:
        fetch_tls_material(load_config(env))
    assert message in str(caught.value)
    assert isinstance(caught.value, CredentialSettingError) == (case in SETTING_FAILURES)
    assert_no_secrets(bed, str(caught.value))
    if not processes:
        return
    worker, cli = run_both(env, tmp_path)

    # A Vault that does not answer is waited for, then exit 4 like an absent server.
    assert worker.returncode == (4 if case == "unreachable" else 3), worker.stderr
    assert cli.returncode == (2 if case in SETTING_FAILURES else 4), cli.stderr
    if case != "unreachable":
        assert stderr_line(worker).startswith("worker: credential error: ")
    assert message in stderr_line(worker)
    assert stderr_line(cli).startswith("complete_activity: credentials: ")
    assert message in stderr_line(cli)
    assert "Worker started" not in worker.stdout
    assert_no_secrets(bed, worker.stdout, worker.stderr, cli.stdout, cli.stderr)
