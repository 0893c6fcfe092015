"""The hard invariants (a-f of the foundation issue), each shown with a real attack from inside the sandbox.

Every test here fails if its invariant is removed from the gateway: the attack would then reach an upstream
(which echoes it back) or be answered with something other than the refusal asserted.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from gateway.addon import EgressAddon
from tests.gateway.harness import (
    PROXY_TOKEN,
    RunningGateway,
    gateway_in_thread,
    gateway_process,
    request,
)
from tests.support.world import GATEWAY_SANDBOX_IP, World

pytestmark = [pytest.mark.netns, pytest.mark.gateway]

_RAW = r"""
import json, socket, ssl, sys
proxy_host, proxy_port, mode, connect_to, sni, payload, ca = json.loads(sys.argv[1])
out = {"reply": "", "error": ""}
try:
    if mode == "explicit-connect":
        s = socket.create_connection((proxy_host, proxy_port), timeout=5)
        s.sendall(f"CONNECT {connect_to} HTTP/1.1\r\nHost: {connect_to}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        out["connect"] = head.decode(errors="replace").split("\r\n")[0]
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(print(json.dumps(out)))
    else:  # plain: talk to the proxy (explicit) or to the destination (transparent) directly
        host, port = connect_to.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=5)
    if sni is not None:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False
        s = ctx.wrap_socket(s, server_hostname=sni)
    s.sendall(payload.encode())
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (socket.timeout, ssl.SSLError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data and b"Connection: close" in data:
            pass
    out["reply"] = data.decode(errors="replace")
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def raw(
    world: World,
    gw: RunningGateway,
    *,
    mode: str,
    connect_to: str,
    payload: str,
    sni: str | None = None,
) -> dict[str, str]:
    args = json.dumps([GATEWAY_SANDBOX_IP, gw.port, mode, connect_to, sni, payload, str(gw.trust_bundle)])
    proc = world.run("sandbox", [sys.executable, "-c", _RAW, args], timeout=30)
    result: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def status_of(reply: str) -> int | None:
    first = reply.split("\r\n", 1)[0]
    parts = first.split(" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def body_of(reply: str) -> str:
    return reply.split("\r\n\r\n", 1)[1] if "\r\n\r\n" in reply else ""


def security(gw: RunningGateway, kind: str) -> list[dict[str, object]]:
    return gw.records(event="security", kind=kind)


# -- a. Host = SNI = CONNECT authority; absolute-form = Host; one Host -------------------------------------------


def test_a_host_header_differs_from_sni_and_authority(world: World, gateway: RunningGateway) -> None:
    r = request(
        world,
        "curl",
        "GET",
        "https://api.example.test/allowed/x",
        gateway=gateway,
        headers={"Host": "other.example.test"},
    )
    assert r.status == 403
    assert r.json()["reason"] == "host_mismatch"
    assert security(gateway, "host_mismatch")


def test_a_sni_differs_from_connect_authority(world: World, explicit_gateway: RunningGateway) -> None:
    gw = explicit_gateway
    gw.mark()
    # CONNECT to the spliced host, then a ClientHello naming another: never spliced, never forwarded.
    out = raw(
        world,
        gw,
        mode="explicit-connect",
        connect_to="other.example.test:443",
        sni="api.example.test",
        payload="GET /allowed/x HTTP/1.1\r\nHost: other.example.test\r\nConnection: close\r\n\r\n",
    )
    assert status_of(out["reply"]) == 403, out
    assert json.loads(body_of(out["reply"]))["reason"] == "host_mismatch"
    (event,) = security(gw, "host_mismatch")
    assert "SNI api.example.test != CONNECT other.example.test" in str(event["detail"])


def test_a_sni_differs_from_host_transparent(world: World, transparent_gateway: RunningGateway) -> None:
    gw = transparent_gateway
    gw.mark()
    out = raw(
        world,
        gw,
        mode="plain",
        connect_to="198.51.100.10:443",
        sni="api.example.test",
        payload="GET /allowed/x HTTP/1.1\r\nHost: evil.example.test\r\nConnection: close\r\n\r\n",
    )
    assert status_of(out["reply"]) == 403, out
    assert json.loads(body_of(out["reply"]))["reason"] == "host_mismatch"


def test_a_absolute_url_differs_from_host(world: World, explicit_gateway: RunningGateway) -> None:
    gw = explicit_gateway
    gw.mark()
    r = request(world, "curl", "GET", "http://api.example.test/echo", gateway=gw, headers={"Host": "evil.example.test"})
    assert r.status == 403 and r.json()["reason"] == "host_mismatch"
    assert security(gw, "host_mismatch")


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("duplicate", "Host: api.example.test\r\nHost: evil.example.test\r\n"),
        ("missing", ""),
    ],
)
def test_a_duplicate_or_missing_host_is_refused(
    world: World, explicit_gateway: RunningGateway, name: str, head: str
) -> None:
    gw = explicit_gateway
    gw.mark()
    out = raw(
        world,
        gw,
        mode="plain",
        connect_to=f"{GATEWAY_SANDBOX_IP}:{gw.port}",
        payload=f"GET http://api.example.test/echo HTTP/1.1\r\n{head}Connection: close\r\n\r\n",
    )
    status = status_of(out["reply"])
    assert status is not None and 400 <= status < 500, out
    assert '"server"' not in out["reply"]  # the upstream never saw it


def test_a_duplicate_host_inside_tunnel(world: World, transparent_gateway: RunningGateway) -> None:
    gw = transparent_gateway
    gw.mark()
    out = raw(
        world,
        gw,
        mode="plain",
        connect_to="198.51.100.10:80",
        payload="GET /echo HTTP/1.1\r\nHost: api.example.test\r\nHost: evil.example.test\r\nConnection: close\r\n\r\n",
    )
    status = status_of(out["reply"])
    assert status is not None and 400 <= status < 500, out
    assert '"server"' not in out["reply"]


# -- b. The gateway resolves the name itself and dials what it checked --------------------------------------------


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_b_forged_resolution_cannot_steer_an_allowed_name(
    world: World, transparent_gateway: RunningGateway, scheme: str
) -> None:
    gw = transparent_gateway
    gw.mark()
    port = 443 if scheme == "https" else 80
    # The sandbox claims api.example.test lives at the evil server (which even has a valid certificate for it).
    r = request(
        world,
        "curl",
        "GET",
        f"{scheme}://api.example.test/allowed/x",
        gateway=gw,
        extra_curl=["--resolve", f"api.example.test:{port}:198.51.100.20"],
    )
    assert r.status == 403, r
    assert r.json()["reason"] == "destination_not_in_answers"
    (event,) = security(gw, "destination_not_in_answers")
    assert "198.51.100.20" in str(event["detail"])


def test_b_explicit_mode_dials_the_gateways_own_answer(world: World, explicit_gateway: RunningGateway) -> None:
    gw = explicit_gateway
    gw.mark()
    world.clear_dns_log()
    r = request(world, "curl", "GET", "https://api.example.test/allowed/x", gateway=gw)
    assert r.status == 200 and r.json()["server"] == "A"
    (rec,) = gw.records(event="decision", host="api.example.test")
    assert rec["upstream_address"] == "198.51.100.10:443"


# -- c. Address classification on every resolved address ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("meta.example.test", "169.254.169.254 (link_local)"),
        ("private.example.test", "10.9.9.9 (private)"),
        ("loop.example.test", "127.0.0.1 (loopback)"),
    ],
)
@pytest.mark.parametrize("scheme", ["https", "http"])
def test_c_allowed_name_resolving_to_internal_address_is_refused(
    world: World, explicit_gateway: RunningGateway, name: str, cls: str, scheme: str
) -> None:
    gw = explicit_gateway
    gw.mark()
    r = request(world, "curl", "GET", f"{scheme}://{name}/", gateway=gw)
    assert r.status in (403, None), r
    if r.status is None:
        assert "403" in r.error
    else:
        assert r.json()["reason"] == "address_refused"
    (event,) = security(gw, "address_refused")
    assert event["detail"] == cls


def test_c_transparent_metadata_address(world: World, transparent_gateway: RunningGateway) -> None:
    gw = transparent_gateway
    gw.mark()
    r = request(
        world,
        "curl",
        "GET",
        "http://meta.example.test/latest/meta-data/",
        gateway=gw,
        extra_curl=["--resolve", "meta.example.test:80:169.254.169.254"],
    )
    assert r.status == 403 and r.json()["reason"] == "address_refused", r


def test_c_request_to_the_gateway_itself(world: World, explicit_gateway: RunningGateway) -> None:
    gw = explicit_gateway
    gw.mark()
    r = request(world, "curl", "GET", f"http://{GATEWAY_SANDBOX_IP}:{gw.port}/", gateway=gw)
    assert r.status == 403
    assert r.json()["reason"] in ("gateway_loop", "ip_literal_not_allowed")


# -- d. IP literals refused unless a rule names them ------------------------------------------------------------


@pytest.mark.parametrize("literal", ["198.51.100.20", "3325256724", "0xc6.0x33.0x64.0x14", "0306.063.0144.024"])
def test_d_ip_literal_refused(world: World, explicit_gateway: RunningGateway, literal: str) -> None:
    gw = explicit_gateway
    gw.mark()
    r = request(world, "curl", "GET", f"http://{literal}/echo", gateway=gw)
    assert r.status == 403, r
    assert r.json()["reason"] == "ip_literal_not_allowed"
    (rec,) = gw.records(event="decision")
    assert rec["host"] == "198.51.100.20"  # every spelling is judged as the address it denotes


def test_d_ip_literal_transparent(world: World, transparent_gateway: RunningGateway) -> None:
    gw = transparent_gateway
    gw.mark()
    r = request(world, "curl", "GET", "http://198.51.100.20/echo", gateway=gw)
    assert r.status == 403 and r.json()["reason"] == "ip_literal_not_allowed", r


def test_d_ip_literal_named_by_a_rule_is_allowed(world: World, gateway: RunningGateway) -> None:
    r = request(world, "curl", "GET", "https://203.0.113.7/x", gateway=gateway, ca=world.upstream_ca_pem)
    assert r.status == 200, r
    assert r.json()["server"] == "lit"


# -- e. Upstream TLS is always verified ---------------------------------------------------------------------------


def test_e_upstream_certificate_is_verified(world: World, tmp_path: Path) -> None:
    # A gateway that does not trust the upstreams' CA: the intercepted request must fail, never pass unverified.
    with gateway_process(world, tmp_path, "explicit", upstream_ca=False, port=3131) as gw:
        gw.mark()
        r = request(world, "curl", "GET", "https://api.example.test/allowed/x", gateway=gw)
        assert r.status == 502, r
        assert '"server"' not in r.body
        assert "certificate verify failed" in r.body.lower() or "certificate" in r.body.lower()


# -- f. Selective interception -------------------------------------------------------------------------------------
# (the positive cases live in test_e2e.py: a spliced host verifies against the upstream's own CA)


def test_f_spliced_connection_is_audited_once(world: World, gateway: RunningGateway) -> None:
    r = request(world, "curl", "GET", "https://other.example.test/x", gateway=gateway, ca=world.upstream_ca_pem)
    assert r.status == 200
    recs = gateway.records(event="decision", host="other.example.test")
    assert len(recs) == 1 and recs[0]["intercepted"] is False


# -- identity ---------------------------------------------------------------------------------------------------------


def test_proxy_token_selects_its_sandbox_and_is_stripped(world: World, explicit_gateway: RunningGateway) -> None:
    gw = explicit_gateway
    gw.mark()
    user = f"agent:{PROXY_TOKEN}"
    ok = request(world, "curl", "GET", "http://other.example.test/x", gateway=gw, proxy_user=user)
    assert ok.status == 200, ok
    assert "proxy-authorization" not in [h[0].lower() for h in ok.json()["headers"]]
    # The token's sandbox has no rule for api.example.test, although the source address's sandbox does.
    no = request(world, "curl", "GET", "http://api.example.test/echo", gateway=gw, proxy_user=user)
    assert no.status == 403
    sandboxes = {r["sandbox"] for r in gw.records(event="decision")}
    assert sandboxes == {"tok"}
    bad = request(world, "curl", "GET", "http://other.example.test/x", gateway=gw, proxy_user="agent:wrong")
    assert bad.status == 407 and bad.json()["reason"] == "bad_proxy_token"
    assert PROXY_TOKEN not in gw.audit_path.read_text()
    assert PROXY_TOKEN not in gw.log_text()


# -- protocol -------------------------------------------------------------------------------------------------------


def test_non_http_bytes_in_a_tunnel_are_killed(world: World, explicit_gateway: RunningGateway) -> None:
    gw = explicit_gateway
    gw.mark()
    out = raw(world, gw, mode="explicit-connect", connect_to="api.example.test:443", payload="SSH-2.0-OpenSSH_9.2\r\n")
    assert '"server"' not in out["reply"]
    assert gw.records(event="security", kind="protocol_not_allowed")


def test_encoded_separators_are_refused(world: World, gateway: RunningGateway) -> None:
    r = request(
        world,
        "curl",
        "GET",
        "https://api.example.test/allowed/..%2Fadmin/users",
        gateway=gateway,
        extra_curl=["--path-as-is"],
    )
    assert r.status == 403 and r.json()["reason"] == "ambiguous_path"


# -- CA ---------------------------------------------------------------------------------------------------------------


def test_ca_key_is_private_and_never_served(world: World, explicit_gateway: RunningGateway) -> None:
    gw = explicit_gateway
    key = gw.state_dir / "ca" / "mitmproxy-ca.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not list((gw.state_dir / "ca").glob("*.p12"))
    # mitmproxy's onboarding app (which serves the CA) is not loaded; mitm.it is just another unlisted host.
    r = request(world, "curl", "GET", "http://mitm.it/cert/pem", gateway=gw)
    assert r.status == 403 and "BEGIN" not in r.body


# -- fail closed: an exception in a hook refuses ---------------------------------------------------------------------


def _boom(*_args: object, **_kw: object) -> None:
    raise RuntimeError("injected fault")


@pytest.mark.parametrize(
    ("target", "url"),
    [
        ("_request_facts", "https://api.example.test/allowed/x"),  # requestheaders
        ("_audit_connection", "https://other.example.test/x"),  # tls_clienthello, splice path
        ("_prepare_response", "https://api.example.test/allowed/x"),  # responseheaders: upstream answered
        ("_identify", "https://api.example.test/allowed/x"),  # http_connect
    ],
)
def test_hook_exception_denies(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, url: str
) -> None:
    with gateway_in_thread(world, tmp_path, "explicit", 3130) as (gw, _inproc):
        monkeypatch.setattr(EgressAddon, target, _boom)
        r = request(world, "curl", "GET", url, gateway=gw)
        assert r.status in (403, None), r
        if r.status == 403:
            assert r.json() == {"rule": None, "reason": "gateway_error"}
        else:
            # Refused at CONNECT (curl reports the 403 as an error), or cut after the upstream answered.
            assert r.status is None and ("403" in r.error or "not closed cleanly" in r.error), r
        assert '"server"' not in r.body
        (event,) = gw.records(event="security", kind="hook_error")
        assert "RuntimeError" in str(event["detail"])
