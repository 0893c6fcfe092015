"""The Vault backend against a real OpenBao: KV v1 and v2, token file, AppRole (ambient tokens ignored), token
renewal, namespaces, and TLS with a CA file. The backend runs on a thread inside the gateway namespace, where the
OpenBao dev servers listen."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.policies import SecretRef
from gateway.secrets import SecretNotFound, SecretUnavailable, VaultAuth, VaultBackend, VaultConfig
from tests.support import openbao as openbao_mod
from tests.support.netns import NetnsThread
from tests.support.openbao import OpenBao
from tests.support.world import World

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def bao(world: World) -> Iterator[OpenBao]:
    reason = openbao_mod.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with OpenBao(world) as server:
        server.kv_put("secret", "apps/web", {"token": "kv2-secret-value-01"})
        server.enable_kv1("kv1")
        server.kv_put("kv1", "apps/db", {"password": "kv1-secret-value-02"})
        yield server


@pytest.fixture(scope="module")
def gw(world: World) -> Iterator[NetnsThread]:
    with NetnsThread(world, "gateway") as thread:
        yield thread


def run_in[T](gw: NetnsThread, coro: Coroutine[Any, Any, T]) -> T:
    return gw.call(asyncio.run, coro)


def test_kv2_and_kv1_with_a_token_file(bao: OpenBao, gw: NetnsThread, tmp_path: Path) -> None:
    bao.policy(
        "read-apps",
        'path "secret/data/apps/*" { capabilities = ["read"] }\npath "kv1/apps/*" { capabilities = ["read"] }',
    )
    token = bao.create_token(["read-apps"], ttl="1h")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")

    async def main() -> tuple[str, str]:
        v2 = VaultBackend(VaultConfig(address=bao.addr, auth=VaultAuth(method="token_file", path=str(token_file))))
        v1 = VaultBackend(
            VaultConfig(
                address=bao.addr,
                kv_mount="kv1",
                kv_version=1,
                auth=VaultAuth(method="token_file", path=str(token_file)),
            )
        )
        a = (await v2.read(SecretRef.parse("apps/web#token"))).bundle.single(None).reveal()
        b = (await v1.read(SecretRef.parse("apps/db"))).bundle.single("password").reveal()
        await v2.close()
        await v1.close()
        return a, b

    assert run_in(gw, main()) == ("kv2-secret-value-01", "kv1-secret-value-02")


def test_approle_ignores_an_ambient_root_token(
    bao: OpenBao, gw: NetnsThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    role_id, secret_id = bao.approle("only-web", 'path "secret/data/apps/web" { capabilities = ["read"] }')
    (tmp_path / "sid").write_text(secret_id)
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)  # what hvac would pick up by itself

    async def main() -> tuple[str, bool]:
        backend = VaultBackend(
            VaultConfig(
                address=bao.addr,
                auth=VaultAuth(method="approle", role_id=role_id, secret_id_file=str(tmp_path / "sid")),
            )
        )
        web = (await backend.read(SecretRef.parse("apps/web#token"))).bundle.single(None).reveal()
        try:
            await backend.read(SecretRef.parse("other/path"))
            refused = False
        except SecretUnavailable:
            refused = True  # the AppRole's policy does not cover it; a root token would have
        await backend.close()
        return web, refused

    assert run_in(gw, main()) == ("kv2-secret-value-01", True)


def test_the_gateway_renews_its_own_token(bao: OpenBao, gw: NetnsThread, tmp_path: Path) -> None:
    role_id, secret_id = bao.approle(
        "short-lived", 'path "secret/data/apps/*" { capabilities = ["read"] }', token_ttl="6s", token_max_ttl="5m"
    )
    (tmp_path / "sid").write_text(secret_id)

    async def main() -> tuple[int, int, str]:
        backend = VaultBackend(
            VaultConfig(
                address=bao.addr,
                auth=VaultAuth(method="approle", role_id=role_id, secret_id_file=str(tmp_path / "sid")),
            )
        )
        await backend.read(SecretRef.parse("apps/web#token"))
        token = backend._client.token
        for _ in range(20):  # 10 s: past the 6 s TTL, so only renewal keeps this token alive
            await asyncio.sleep(0.5)
            await backend.maintain()
        after = backend._client.token
        ttl = int(backend._client.auth.token.lookup_self()["data"]["ttl"])
        value = (await backend.read(SecretRef.parse("apps/web#token"))).bundle.single(None).reveal()
        await backend.close()
        return (token == after), ttl, value

    same_token, ttl, value = run_in(gw, main())
    assert same_token and ttl > 0 and value == "kv2-secret-value-01"


def test_namespaces(bao: OpenBao, gw: NetnsThread, monkeypatch: pytest.MonkeyPatch) -> None:
    bao.bao("namespace", "create", "team-a")
    bao.bao("secrets", "enable", "-namespace=team-a", "-path=kv", "-version=2", "kv")
    bao.bao("kv", "put", "-namespace=team-a", "-mount=kv", "app", "token=namespaced-secret-03")

    async def main(namespace: str | None) -> str:
        backend = VaultBackend(VaultConfig(address=bao.addr, namespace=namespace, kv_mount="kv"))
        try:
            return (await backend.read(SecretRef.parse("app#token"))).bundle.single(None).reveal()
        finally:
            await backend.close()

    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    assert run_in(gw, main("team-a")) == "namespaced-secret-03"
    with pytest.raises(SecretNotFound):  # outside the namespace there is no such mount
        run_in(gw, main(None))


def test_tls_with_a_ca_file(world: World, gw: NetnsThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = openbao_mod.bao_binary()
    assert binary is not None
    port = 28400
    certs = tmp_path / "certs"
    certs.mkdir()
    proc = world.popen(
        "gateway",
        [
            str(binary),
            "server",
            "-dev",
            "-dev-tls",
            f"-dev-tls-cert-dir={certs}",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-root-token-id=tls-root",
            "-dev-no-store-token",
        ],
        env={"HOME": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not (certs / "vault-ca.pem").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        world.wait_listening("gateway", port)
        env = {
            "BAO_ADDR": f"https://127.0.0.1:{port}",
            "BAO_TOKEN": "tls-root",
            "BAO_CACERT": str(certs / "vault-ca.pem"),
            "HOME": str(tmp_path),
        }
        world.run(
            "gateway",
            [str(binary), "kv", "put", "-mount=secret", "tls/app", "token=over-tls-secret-04"],
            env=env,
            check=True,
        )

        async def main(ca: str | None) -> str:
            backend = VaultBackend(VaultConfig(address=f"https://127.0.0.1:{port}", ca_file=ca))
            try:
                return (await backend.read(SecretRef.parse("tls/app#token"))).bundle.single(None).reveal()
            finally:
                await backend.close()

        monkeypatch.setenv("VAULT_TOKEN", "tls-root")
        assert run_in(gw, main(str(certs / "vault-ca.pem"))) == "over-tls-secret-04"
        with pytest.raises(SecretUnavailable):  # without the CA the server's certificate is not trusted
            run_in(gw, main(None))
    finally:
        world.stop(proc)
