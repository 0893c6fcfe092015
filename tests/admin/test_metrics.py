"""GatewayMetrics: a registry per gateway, bounded labels, and what a real gateway counts (read back from /metrics
with prometheus_client's own parser)."""

from __future__ import annotations

import time

import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.audit import fields as F
from gateway.metrics import OTHER, GatewayMetrics
from tests.admin.conftest import SANDBOX_TOKEN, LocalGateway
from tests.ebpf import test_full_stack as full_stack
from tests.gateway.harness import RunningGateway
from tests.support.world import World

# The kernel guard on the world's sandbox veth + the transparent gateway reading its drop reports (fixture "stack").
stack = full_stack.stack

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def decision(**over: object) -> dict[str, object]:
    record: dict[str, object] = {
        F.EVENT: F.EVENT_DECISION,
        F.VERDICT: "deny",
        F.MODE: "enforce",
        F.RULE: "r1",
        F.REASON: "denied_by_rule",
        F.PHASE: "request",
        F.HOST: "secret-host.example",
        F.PATH: "/private/path",
        F.SOURCE: "10.0.0.9:5555",
    }
    record.update(over)
    return record


# -- units ---------------------------------------------------------------------------------------------------------


def test_each_gateway_has_its_own_registry() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()  # a second one in the default registry would raise "Duplicated"
    a.observe_audit_record(decision())
    assert (
        value(
            parse(a.exposition()[0].decode()),
            "cube_egress_decisions_total",
            verdict="deny",
            mode="enforce",
            rule="r1",
            reason="denied_by_rule",
            phase="request",
        )
        == 1
    )
    assert "cube_egress_decisions_total{" not in b.exposition()[0].decode()
    assert not any(name.startswith("cube_egress") for name in prometheus_client.REGISTRY._names_to_collectors)


def test_decisions_are_counted_from_audit_records_only() -> None:
    m = GatewayMetrics()
    m.observe_audit_record(decision(**{F.RULE: None, F.REASON: "no_matching_rule"}))
    m.observe_audit_record({F.EVENT: F.EVENT_SECURITY, F.KIND: "host_mismatch"})
    m.observe_audit_record({F.EVENT: "checkpoint"})
    m.observe_audit_record(decision(**{F.VERDICT: "maybe", F.REASON: "made_up", F.PHASE: "dns", F.MODE: "report"}))
    samples = parse(m.exposition()[0].decode())
    counted = {k: v for k, v in samples.items() if k[0] == "cube_egress_decisions_total"}
    assert counted == {
        (
            "cube_egress_decisions_total",
            frozenset(
                {
                    ("verdict", "deny"),
                    ("mode", "enforce"),
                    ("rule", ""),
                    ("reason", "no_matching_rule"),
                    ("phase", "request"),
                }
            ),
        ): 1.0,
        (
            "cube_egress_decisions_total",
            frozenset({("verdict", OTHER), ("mode", "report"), ("rule", "r1"), ("reason", OTHER), ("phase", "dns")}),
        ): 1.0,
    }
    text = m.exposition()[0].decode()
    for leak in ("secret-host.example", "/private/path", "10.0.0.9"):
        assert leak not in text  # never labelled by host, path or source


def test_label_values_are_bounded() -> None:
    m = GatewayMetrics(max_label_values=3)
    for i in range(10):
        m.observe_audit_record(decision(**{F.RULE: f"rule-{i}"}))
        m.count_injection(f"cred-{i}")
    samples = parse(m.exposition()[0].decode())
    rules = {dict(k[1])["rule"] for k in samples if k[0] == "cube_egress_decisions_total"}
    assert rules == {"rule-0", "rule-1", "rule-2", OTHER}
    assert (
        value(
            samples,
            "cube_egress_decisions_total",
            verdict="deny",
            mode="enforce",
            rule=OTHER,
            reason="denied_by_rule",
            phase="request",
        )
        == 7
    )
    creds = {dict(k[1])["credential"] for k in samples if k[0] == "cube_egress_injections_total"}
    assert creds == {"cred-0", "cred-1", "cred-2", OTHER}


def test_policy_info_keeps_one_hash() -> None:
    m = GatewayMetrics()
    m.set_policy("aaa", 2, 0)
    m.set_policy("bbb", 2, 3)
    samples = parse(m.exposition()[0].decode())
    assert value(samples, "cube_egress_policy_info", hash="bbb") == 1
    assert ("cube_egress_policy_info", frozenset({("hash", "aaa")})) not in samples
    assert value(samples, "cube_egress_sandboxes", origin="api") == 3


def test_usage_limit_and_kernel_drop_counters() -> None:
    m = GatewayMetrics()
    m.count_usage_limited("sandbox", None, "requests_per_minute")
    m.count_usage_limited("credential", "openai", "bytes_per_session")
    m.count_kernel_drop("quic")
    m.count_kernel_drop("quic", 4)
    samples = parse(m.exposition()[0].decode())
    assert (
        value(
            samples,
            "cube_egress_usage_limited_total",
            sandbox_scope="credential",
            credential="openai",
            limit="bytes_per_session",
        )
        == 1
    )
    assert value(samples, "cube_egress_kernel_drops_total", reason="quic") == 5


# -- a real gateway --------------------------------------------------------------------------------------------------


@pytest.mark.gateway
def test_a_gateway_counts_what_it_does(gw: LocalGateway) -> None:
    def scrape() -> Samples:
        with gw.tcp() as c:
            r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return parse(r.text)

    before = scrape()
    base = f"http://127.0.0.1:{gw.upstream_port}"
    assert gw.proxy(gw.upstream("/inject/a")).status_code == 200
    assert gw.proxy(gw.upstream("/inject/b")).status_code == 200
    assert gw.proxy(f"{base}/forbidden/c").status_code == 403
    assert gw.proxy(gw.upstream("/missing/d")).status_code == 503  # its secret is not in the file
    assert gw.proxy(f"{base}/e", token=SANDBOX_TOKEN).status_code == 407
    with gw.unix() as c:
        assert c.post("/v1/policy/reload").status_code == 200
        assert (
            c.put("/v1/sandboxes/metrics-sb", json={"policies": ["local"], "sources": ["127.0.0.4/32"]}).status_code
            == 201
        )
        policy_hash = c.get("/v1/policy").json()["policy_hash"]
    try:
        after = scrape()
    finally:
        with gw.unix() as c:
            c.delete("/v1/sandboxes/metrics-sb")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    allow = {"verdict": "allow", "mode": "enforce", "reason": "allowed_by_rule", "phase": "request"}
    assert delta("cube_egress_decisions_total", rule="local-inject", **allow) == 2
    assert (
        delta(
            "cube_egress_decisions_total",
            verdict="deny",
            mode="enforce",
            rule="quiet-deny-forbidden",
            reason="denied_by_rule",
            phase="request",
        )
        == 1
    )
    assert (
        delta(
            "cube_egress_decisions_total",
            verdict="deny",
            mode="enforce",
            rule="local-missing",
            reason="secret_unavailable",
            phase="request",
        )
        == 1
    )
    assert (
        delta(
            "cube_egress_decisions_total",
            verdict="deny",
            mode="enforce",
            rule="",
            reason="bad_proxy_token",
            phase="request",
        )
        == 1
    )
    assert delta("cube_egress_injections_total", credential="local-key") == 2
    assert delta("cube_egress_secret_backend_errors_total", backend="file", kind="not_found") >= 1
    assert delta("cube_egress_decision_seconds_count") >= 4
    assert delta("cube_egress_request_seconds_count") == 2  # the two requests that went upstream
    assert delta("cube_egress_upstream_seconds_count") == 2
    assert delta("cube_egress_policy_reloads_total", result="ok") == 1
    assert value(after, "cube_egress_policy_info", hash=policy_hash) == 1
    assert value(after, "cube_egress_sandboxes", origin="file") == 1
    assert value(after, "cube_egress_sandboxes", origin="api") == 1
    # Bounded labels: nothing is labelled by host, path, source address or sandbox.
    labels = {v for (_, ls) in after for (_, v) in ls}
    for unbounded in ("upstream.test", "/inject/a", "127.0.0.1", "metrics-sb", "file-sb"):
        assert not any(unbounded in v for v in labels), unbounded


@pytest.mark.netns
def test_kernel_drops_are_counted_one_by_one(world: World, stack: RunningGateway) -> None:
    """The guard drops three QUIC datagrams; the audit folds repeats into one record per window, the counter
    counts each (read from the gateway process's own admin socket)."""
    assert world.sandbox_python(full_stack._QUIC).stdout.strip() == "sent"  # three datagrams
    socket_path = stack.state_dir / "admin.sock"
    deadline = time.monotonic() + 10
    drops = 0.0
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://admin") as c:
        while drops < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            drops = value(parse(c.get("/metrics").text), "cube_egress_kernel_drops_total", reason="quic")
    assert drops == 3, stack.log_text()[-2000:]
