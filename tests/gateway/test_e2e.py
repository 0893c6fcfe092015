"""The gateway end to end, in explicit and transparent mode, with curl, requests and httpx inside the sandbox.

Everything runs in the hermetic world: the sandbox can reach the "internet" only through the gateway, and every
fact asserted about the far side comes from the upstream's own echo of what arrived.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.gateway.harness import CLIENTS, RunningGateway, request
from tests.support.world import World

pytestmark = [pytest.mark.netns, pytest.mark.gateway]


@pytest.mark.parametrize("client", CLIENTS)
def test_allowed_https_request_is_intercepted_and_forwarded(world: World, gateway: RunningGateway, client: str) -> None:
    r = request(world, client, "GET", "https://api.example.test/allowed/x?token=abc", gateway=gateway)
    assert r.status == 200, r
    echo = r.json()
    assert echo["server"] == "A"
    assert echo["path"] == "/allowed/x?token=abc"
    names = [h[0].lower() for h in echo["headers"]]
    assert "proxy-authorization" not in names
    (rec,) = gateway.records(event="decision", host="api.example.test")
    assert rec["verdict"] == "allow" and rec["rule"] == "api-intercepted" and rec["sandbox"] == "sb"
    assert rec["intercepted"] is True and rec["upstream_status"] == 200
    assert rec["upstream_address"] == "198.51.100.10:443"
    assert rec["path"] == "/allowed/x?token=REDACTED"
    assert rec["bytes_out"] > 0 and rec["duration_ms"] >= 0


@pytest.mark.parametrize("client", CLIENTS)
def test_request_level_deny_answers_403_json(world: World, gateway: RunningGateway, client: str) -> None:
    r = request(world, client, "GET", "https://api.example.test/admin/users", gateway=gateway)
    assert r.status == 403
    assert r.json() == {"rule": "api-deny-admin", "reason": "denied_by_rule"}
    (rec,) = gateway.records(event="decision", host="api.example.test")
    assert (rec["verdict"], rec["rule"], rec["phase"]) == ("deny", "api-deny-admin", "request")


@pytest.mark.parametrize("client", CLIENTS)
def test_method_not_allowed(world: World, gateway: RunningGateway, client: str) -> None:
    r = request(world, client, "DELETE", "https://api.example.test/allowed/x", gateway=gateway)
    assert r.status == 403
    assert r.json() == {"rule": None, "reason": "no_matching_rule"}


@pytest.mark.parametrize("client", CLIENTS)
def test_allowed_plain_http(world: World, gateway: RunningGateway, client: str) -> None:
    r = request(world, client, "POST", "http://api.example.test/echo", gateway=gateway, data="hello")
    assert r.status == 200, r
    echo = r.json()
    assert echo["server"] == "A" and echo["method"] == "POST" and echo["body_len"] == 5
    (rec,) = gateway.records(event="decision", host="api.example.test")
    assert rec["scheme"] == "http" and rec["bytes_in"] == 5


@pytest.mark.parametrize("client", CLIENTS)
def test_unlisted_host_is_refused(world: World, gateway: RunningGateway, client: str) -> None:
    r = request(world, client, "GET", "https://evil.example.test/", gateway=gateway)
    if gateway.mode == "explicit":
        # The CONNECT itself is refused with 403: no tunnel, no TLS, no upstream connection.
        assert r.status in (403, None), r
        if r.status is None:
            assert "403" in r.error
    else:
        assert r.status == 403
        assert r.json() == {"rule": None, "reason": "no_matching_rule"}
    (rec,) = gateway.records(event="decision", host="evil.example.test")
    assert (rec["verdict"], rec["reason"]) == ("deny", "no_matching_rule")


@pytest.mark.parametrize("client", CLIENTS)
def test_spliced_host_reaches_upstream_without_interception(world: World, gateway: RunningGateway, client: str) -> None:
    # Trusting only the upstream's CA proves the client saw the real upstream certificate: no MITM.
    r = request(world, client, "GET", "https://other.example.test/x", gateway=gateway, ca=world.upstream_ca_pem)
    assert r.status == 200, r
    assert r.json()["server"] == "B"
    (rec,) = gateway.records(event="decision", host="other.example.test")
    assert rec["intercepted"] is False and rec["rule"] == "other-spliced" and rec["phase"] == "connection"


def test_intercepted_host_presents_the_gateway_certificate(world: World, gateway: RunningGateway) -> None:
    r = request(world, "curl", "GET", "https://api.example.test/allowed/x", gateway=gateway, ca=world.upstream_ca_pem)
    assert r.status is None
    assert "certificate" in r.error.lower() or "SSL" in r.error


@pytest.mark.parametrize("client", CLIENTS)
def test_wildcard_subdomain_allowed_apex_refused(world: World, gateway: RunningGateway, client: str) -> None:
    ok = request(world, client, "GET", "https://a.wild.example.test/", gateway=gateway)
    assert ok.status == 200, ok
    apex = request(world, client, "GET", "https://wild.example.test/", gateway=gateway)
    assert apex.status in (403, None)


_KEEPALIVE = r"""
import json, sys
import requests
proxy, ca, url, n = json.loads(sys.argv[1])
s = requests.Session(); s.trust_env = False
proxies = {"http": proxy, "https": proxy} if proxy else {"http": None, "https": None}
out = []
for i in range(n):
    r = s.get(url, proxies=proxies, verify=ca, timeout=10)
    out.append([r.status_code, r.json()["client"][1] if r.status_code == 200 else None])
print(json.dumps(out))
"""


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_keep_alive_reuses_one_upstream_connection(world: World, gateway: RunningGateway, scheme: str) -> None:
    # mitmproxy allows five upstream connections per address per client: a gateway that opened a new one for every
    # request would hang on the sixth. And the upstream sees one connection, so nothing is re-dialled per request.
    args = json.dumps([gateway.proxy_url, str(gateway.trust_bundle), f"{scheme}://api.example.test/allowed/k", 12])
    proc = world.run("sandbox", [sys.executable, "-c", _KEEPALIVE, args], timeout=60)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [status for status, _ in results] == [200] * 12
    assert len({port for _, port in results}) == 1
    assert len(gateway.records(event="decision", host="api.example.test")) == 12
