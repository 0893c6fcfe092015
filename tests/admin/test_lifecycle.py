"""Admin API lifecycle: registrations survive a restart, unsafe credentials refuse the start, the socket is
replaced when stale and never stolen from a live server, mTLS, and turning the API off."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import httpx
import pytest
import trustme

from gateway.admin import AdminAuthError
from gateway.config import ConfigError, load_config
from gateway.policies import PolicyError
from gateway.registry import RegistryError
from gateway.server import Gateway, GatewayStartError
from tests.admin.conftest import free_port, local_gateway, write_config

pytestmark = pytest.mark.gateway


def test_registrations_survive_a_restart(tmp_path: Path) -> None:
    with local_gateway(tmp_path) as g, g.unix() as c:
        r = c.put("/v1/sandboxes/persist-sb", json={"policies": ["local"], "sources": ["127.0.0.6/32"]})
        assert r.status_code == 201
    registry = tmp_path / "state" / "sandboxes.json"
    assert '"persist-sb"' in registry.read_text()
    with local_gateway(tmp_path) as g:
        with g.unix() as c:
            assert c.get("/v1/sandboxes/persist-sb").json()["origin"] == "api"
        assert g.proxy(f"http://127.0.0.1:{g.upstream_port}/again", source="127.0.0.6").status_code == 200
        with g.unix() as c:
            assert c.delete("/v1/sandboxes/persist-sb").status_code == 200
    assert '"persist-sb"' not in registry.read_text()


def test_a_broken_registry_file_refuses_the_start(tmp_path: Path) -> None:
    cfg, _ = write_config(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / "sandboxes.json").write_text("{not json")
    with pytest.raises(RegistryError, match=r"sandboxes\.json: not JSON"):
        Gateway(load_config(str(cfg)))
    # Valid JSON, but a registration the policy files no longer allow: every error, with the file and line.
    (state / "sandboxes.json").write_text(
        '{"version": 1, "sandboxes": [\n'
        '{"id": "a", "sources": ["127.0.0.1/32"], "policies": ["local"]},\n'
        '{"id": "b", "sources": ["127.0.1.0/24"], "policies": ["gone"]}\n]}\n'
    )
    with pytest.raises(PolicyError) as e:
        Gateway(load_config(str(cfg)))
    located = sorted(str(i.position) for i in e.value.issues)
    assert located == [f"{state / 'sandboxes.json'}:2:1", f"{state / 'sandboxes.json'}:3:1"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_token_file_others_can_read_refuses_the_start(tmp_path: Path, mode: int) -> None:
    cfg, _ = write_config(tmp_path)
    os.chmod(tmp_path / "admin-token", mode)
    with pytest.raises(AdminAuthError, match="chmod 600"):
        Gateway(load_config(str(cfg)))
    assert not (tmp_path / "state" / "admin.sock").exists()


def test_bad_admin_config_is_refused(tmp_path: Path) -> None:
    cfg, _ = write_config(tmp_path)
    (tmp_path / "admin-token").write_text("short\n")
    with pytest.raises(AdminAuthError, match="16 to 4096"):
        Gateway(load_config(str(cfg)))
    for admin, message in [
        ({"tcp": {"port": 9999}}, "needs 'token_file' or 'tls'"),
        ({"tcp": {"host": "admin.example", "port": 9999}, "token_file": "t"}, "must be an IP address"),
        ({"token_file": "t"}, "apply to 'tcp' only"),
    ]:
        cfg, _ = write_config(tmp_path / f"c{len(message)}", admin=admin)
        with pytest.raises(ConfigError, match=message):
            load_config(str(cfg))


def test_stale_socket_is_replaced_and_a_live_one_is_not_taken(tmp_path: Path) -> None:
    sock_path = tmp_path / "state" / "admin.sock"
    sock_path.parent.mkdir(parents=True)
    admin = {"unix_socket": str(sock_path)}
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(sock_path))
    live.listen(1)
    try:
        with (
            pytest.raises(GatewayStartError, match="another process serves the admin API"),
            local_gateway(tmp_path, admin=admin),
        ):
            pass
        assert sock_path.exists()  # still the other server's
    finally:
        live.close()
    # Now only a stale file is left (nobody accepts on it): the gateway replaces it.
    with local_gateway(tmp_path, admin=admin) as g, g.unix() as c:
        assert c.get("/v1/health").status_code == 200
    assert not sock_path.exists()  # removed at stop


def test_mtls(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("operator@example.test")
    files = {}
    for name, blob in [
        ("ca.pem", ca.cert_pem),
        ("server.pem", server.cert_chain_pems[0]),
        ("server.key", server.private_key_pem),
        ("client.pem", client.cert_chain_pems[0]),
        ("client.key", client.private_key_pem),
    ]:
        path = tmp_path / name
        blob.write_to_path(str(path))
        files[name] = str(path)
    port = free_port()
    admin = {
        "tcp": {"host": "127.0.0.1", "port": port},
        "tls": {"cert": files["server.pem"], "key": files["server.key"], "client_ca": files["ca.pem"]},
    }
    with local_gateway(tmp_path, admin=admin) as g:
        assert not g.socket_path.exists()  # TCP only: no Unix socket unless configured
        anonymous = ssl.create_default_context(cafile=files["ca.pem"])
        with (
            pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
            httpx.Client(verify=anonymous, trust_env=False) as c,
        ):
            c.get(f"https://127.0.0.1:{port}/v1/sandboxes")
        operator = ssl.create_default_context(cafile=files["ca.pem"])
        operator.load_cert_chain(files["client.pem"], files["client.key"])
        with httpx.Client(verify=operator, trust_env=False) as c:
            r = c.get(f"https://127.0.0.1:{port}/v1/sandboxes")  # no bearer token: the certificate is enough
            assert r.status_code == 200 and r.json()["sandboxes"][0]["id"] == "file-sb"


def test_admin_api_can_be_turned_off(tmp_path: Path) -> None:
    with local_gateway(tmp_path, admin={"enabled": False}) as g:
        assert g.gateway.admin is None
        assert not (tmp_path / "state" / "admin.sock").exists()
        assert g.proxy(f"http://127.0.0.1:{g.upstream_port}/").status_code == 200
