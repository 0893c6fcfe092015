"""Agent correlation headers end to end: copied into every record of a request (decision, flow and security
records), stripped before the upstream (whose own echo proves it), in explicit and transparent mode, for HTTPS that
is intercepted and for plain HTTP; the headers of an explicit CONNECT label the records of its tunnel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.harness import CLIENTS, E2E_POLICY, RunningGateway, gateway_process, hosts_for_sandbox, request
from tests.support.world import UPSTREAM_IPS, World

pytestmark = [pytest.mark.netns, pytest.mark.gateway]

RUN, CALL = "X-Agent-Run-Id", "X-Agent-Tool-Call-Id"
HEADERS = {RUN: "run-7f3a", CALL: "call_0042"}
EXPECTED = {"x-agent-run-id": "run-7f3a", "x-agent-tool-call-id": "call_0042"}


def _policy(tmp: Path) -> Path:
    # The end-to-end policy, plus the correlation section.
    p = tmp / "correlation.yaml"
    p.write_text(f"version: 1\ninclude: ['{E2E_POLICY}']\ncorrelation:\n  headers: [{RUN}, {CALL}]\n  max_length: 64\n")
    return p


@pytest.fixture(scope="module")
def explicit_corr(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("corr-explicit")
    with gateway_process(world, tmp, "explicit", policies=[_policy(tmp)]) as gw:
        yield gw


@pytest.fixture(scope="module")
def transparent_corr(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    hosts_for_sandbox(world, {"api.example.test": UPSTREAM_IPS["A"], "other.example.test": UPSTREAM_IPS["B"]})
    tmp = tmp_path_factory.mktemp("corr-transparent")
    with gateway_process(world, tmp, "transparent", policies=[_policy(tmp)]) as gw:
        yield gw


@pytest.fixture(params=["explicit", "transparent"])
def gateway(request: pytest.FixtureRequest) -> RunningGateway:
    gw: RunningGateway = request.getfixturevalue(f"{request.param}_corr")
    gw.mark()
    return gw


def _upstream_saw(echo: dict[str, object]) -> set[str]:
    headers = echo["headers"]
    assert isinstance(headers, list)
    return {str(h[0]).lower() for h in headers}


@pytest.mark.parametrize("scheme", ["https", "http"])
@pytest.mark.parametrize("client", CLIENTS)
def test_correlation_is_recorded_and_never_reaches_the_upstream(
    world: World, gateway: RunningGateway, client: str, scheme: str
) -> None:
    r = request(world, client, "GET", f"{scheme}://api.example.test/allowed/c", gateway=gateway, headers=HEADERS)
    assert r.status == 200, r
    seen = _upstream_saw(r.json())
    assert "x-agent-run-id" not in seen and "x-agent-tool-call-id" not in seen
    assert "host" in seen  # the echo does list the headers that did arrive
    (rec,) = gateway.settled(1, event="decision", host="api.example.test")
    assert rec["correlation"] == EXPECTED and rec["intercepted"] is True and rec["upstream_status"] == 200


def test_refusals_and_security_events_carry_the_correlation(world: World, gateway: RunningGateway) -> None:
    denied = request(world, "curl", "GET", "https://api.example.test/admin/x", gateway=gateway, headers=HEADERS)
    assert denied.status == 403
    ambiguous = request(
        world,
        "curl",
        "GET",
        "https://api.example.test/allowed/../admin/x",
        gateway=gateway,
        headers=HEADERS,
        extra_curl=["--path-as-is"],
    )
    assert ambiguous.status == 403 and ambiguous.json()["reason"] == "ambiguous_path"
    records = gateway.records(host="api.example.test")
    assert [(r["event"], r.get("reason") or r.get("kind")) for r in records] == [
        ("decision", "denied_by_rule"),
        ("decision", "ambiguous_path"),
        ("security", "ambiguous_path"),
    ]
    assert all(r["correlation"] == EXPECTED for r in records)


def test_an_invalid_value_is_replaced_by_a_marker_and_reported(world: World, gateway: RunningGateway) -> None:
    long_value = "x" * 65  # over max_length 64
    r = request(
        world,
        "curl",
        "POST",
        "https://api.example.test/echo",
        gateway=gateway,
        headers={RUN: long_value, CALL: "call_1"},
        data="{}",
    )
    assert r.status == 200, r
    assert "x-agent-run-id" not in _upstream_saw(r.json())
    (decision,) = gateway.settled(1, event="decision", host="api.example.test")
    assert decision["correlation"] == {"x-agent-run-id": "<invalid>", "x-agent-tool-call-id": "call_1"}
    (event,) = gateway.records(event="security", kind="correlation_invalid")
    assert event["sandbox"] == "sb" and "x-agent-run-id" in event["detail"]
    assert long_value not in gateway.audit_path.read_text()


def test_connect_headers_label_the_tunnel_records(world: World, explicit_corr: RunningGateway) -> None:
    gw = explicit_corr
    gw.mark()
    proxy_headers = ["--proxy-header", f"{RUN}: run-tunnel", "--proxy-header", f"{CALL}: call-tunnel"]
    # Spliced: the gateway never sees a request inside, so the CONNECT's headers are the ones recorded.
    spliced = request(
        world,
        "curl",
        "GET",
        "https://other.example.test/x",
        gateway=gw,
        ca=world.upstream_ca_pem,
        extra_curl=proxy_headers,
    )
    assert spliced.status == 200, spliced
    # Refused at the CONNECT.
    refused = request(world, "curl", "GET", "https://evil.example.test/", gateway=gw, extra_curl=proxy_headers)
    assert refused.status is None and "403" in refused.error
    # Intercepted: a request's own header wins over its CONNECT's; the other comes from the CONNECT.
    inner = request(
        world,
        "curl",
        "GET",
        "https://api.example.test/allowed/t",
        gateway=gw,
        headers={CALL: "call-inner"},
        extra_curl=proxy_headers,
    )
    assert inner.status == 200, inner
    assert not {"x-agent-run-id", "x-agent-tool-call-id"} & _upstream_saw(inner.json())
    by_host = {r["host"]: r for r in gw.settled(3, event="decision")}
    tunnel = {"x-agent-run-id": "run-tunnel", "x-agent-tool-call-id": "call-tunnel"}
    assert by_host["other.example.test"]["correlation"] == tunnel
    assert by_host["other.example.test"]["intercepted"] is False
    assert by_host["evil.example.test"]["correlation"] == tunnel
    assert by_host["api.example.test"]["correlation"] == {
        "x-agent-run-id": "run-tunnel",
        "x-agent-tool-call-id": "call-inner",
    }


def test_requests_without_correlation_headers_have_no_correlation_field(world: World, gateway: RunningGateway) -> None:
    r = request(world, "curl", "GET", "https://api.example.test/allowed/plain", gateway=gateway)
    assert r.status == 200
    (rec,) = gateway.settled(1, event="decision", host="api.example.test")
    assert "correlation" not in rec
