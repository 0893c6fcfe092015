"""Usage limits: the meter on its own with an injected clock (windows, budgets, sessions, bounds, threads), then the
real gateway with a real client in the sandbox: 429 with the reason and Retry-After, byte budgets refused before
anything goes upstream, a credential budget shared by two sandboxes, report mode, metrics, the end of a session.

No timing asserts: the per-minute limits in the end-to-end tests are a handful of requests, hit within a fraction
of the window; window roll-over is tested on the meter, with its clock injected.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.limits import Admission, LimitKind, UsageMeter, limit_decision
from gateway.policies import (
    Decision,
    Identity,
    LimitScope,
    LimitSubject,
    Mode,
    Reason,
    UsageLimit,
    Verdict,
    facts_from_url,
    load_policy,
)
from gateway.policies._yaml import Position
from tests.gateway.harness import InThreadGateway, RunningGateway, gateway_in_thread, request
from tests.support.world import World

HERE = Position("test", 1, 1)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sandbox_limit(
    name: str = "sb", rpm: int | None = None, nbytes: int | None = None, mode: Mode = Mode.ENFORCE
) -> UsageLimit:
    return UsageLimit(LimitSubject.SANDBOX, name, LimitScope.SANDBOX, rpm, nbytes, mode, HERE)


def credential_limit(
    name: str = "key",
    rpm: int | None = None,
    nbytes: int | None = None,
    scope: LimitScope = LimitScope.GLOBAL,
    mode: Mode = Mode.ENFORCE,
) -> UsageLimit:
    return UsageLimit(LimitSubject.CREDENTIAL, name, scope, rpm, nbytes, mode, HERE)


def admitted(meter: UsageMeter, sandbox: str, limits: list[UsageLimit], n: int) -> list[bool]:
    return [meter.admit_request(sandbox, limits).ok for _ in range(n)]


# -- the meter --------------------------------------------------------------------------------------------------


def test_requests_per_minute_refuses_the_next_request_and_says_when_to_retry() -> None:
    clock = Clock()
    meter = UsageMeter(clock=clock)
    limits = [sandbox_limit(rpm=3)]
    assert admitted(meter, "sb", limits, 3) == [True, True, True]
    clock.now += 20.5
    refused = meter.admit_request("sb", limits)
    assert refused.refused is not None
    assert refused.refused.kind is LimitKind.REQUESTS_PER_MINUTE
    assert (refused.refused.used, refused.refused.allowed) == (3, 3)
    assert refused.refused.label == "requests_per_minute:sandbox"
    # The first three were counted in second 1000; they leave the count at 1061, 40.5 s from now.
    assert refused.refused.retry_after_s == 41
    # A refused request spends nothing: still exactly three in the window.
    assert meter.usage("sb", limits) == {"sandbox": {"requests_per_minute": 3}}


def test_the_window_slides_it_does_not_reset_on_minute_boundaries() -> None:
    clock = Clock(1000.0)
    meter = UsageMeter(clock=clock)
    limits = [sandbox_limit(rpm=4)]
    assert admitted(meter, "sb", limits, 2) == [True, True]  # second 1000
    clock.now = 1030.0
    assert admitted(meter, "sb", limits, 2) == [True, True]  # second 1030
    clock.now = 1060.5
    # Still refused: a request of second 1000 may have been made at 1000.9, less than 60 s ago.
    assert admitted(meter, "sb", limits, 1) == [False]
    clock.now = 1061.0
    assert admitted(meter, "sb", limits, 3) == [True, True, False]  # the two of second 1000 left; 1030's stay
    clock.now = 1091.0
    assert admitted(meter, "sb", limits, 2) == [True, True]  # 1030's left too
    clock.now = 1200.0
    assert meter.usage("sb", limits) == {"sandbox": {"requests_per_minute": 0}}


def test_retry_after_waits_for_enough_requests_to_leave() -> None:
    clock = Clock(1000.0)
    meter = UsageMeter(clock=clock)
    assert admitted(meter, "sb", [sandbox_limit(rpm=3)], 1) == [True]
    clock.now = 1010.0
    assert admitted(meter, "sb", [sandbox_limit(rpm=3)], 2) == [True, True]
    clock.now = 1020.0
    one_more = meter.admit_request("sb", [sandbox_limit(rpm=3)]).refused
    assert one_more is not None and one_more.retry_after_s == 41  # when second 1000's request leaves
    # Lowered by a reload to 2: two must leave before one more fits, so wait for second 1010's as well.
    two_more = meter.admit_request("sb", [sandbox_limit(rpm=2)]).refused
    assert two_more is not None and two_more.retry_after_s == 51


def test_an_enforced_limit_refuses_atomically_across_limits() -> None:
    meter = UsageMeter(clock=Clock())
    own, key = sandbox_limit(rpm=10), credential_limit(rpm=2)
    assert admitted(meter, "sb", [own, key], 2) == [True, True]
    refusal = meter.admit_request("sb", [own, key])
    assert refusal.refused is not None and refusal.refused.label == "requests_per_minute:credential"
    # The sandbox's own count did not move for the refused request.
    assert meter.usage("sb", [own, key]) == {
        "sandbox": {"requests_per_minute": 2},
        "credential": {"requests_per_minute": 2},
    }


def test_report_mode_counts_passes_and_reports() -> None:
    meter = UsageMeter(clock=Clock())
    limits = [sandbox_limit(rpm=1, mode=Mode.REPORT)]
    first, second, third = (meter.admit_request("sb", limits) for _ in range(3))
    assert first.ok and not first.reported
    assert second.ok and [e.label for e in second.reported] == ["requests_per_minute:sandbox"]
    assert third.ok and third.reported[0].used == 2
    assert third.usage == {"sandbox": {"requests_per_minute": 3}}


def test_a_report_limit_does_not_hide_an_enforced_refusal() -> None:
    meter = UsageMeter(clock=Clock())
    limits = [sandbox_limit(rpm=1, mode=Mode.REPORT), credential_limit(rpm=1)]
    assert meter.admit_request("sb", limits).ok
    refusal = meter.admit_request("sb", limits)
    assert refusal.refused is not None and refusal.refused.limit.subject is LimitSubject.CREDENTIAL


def test_bytes_per_session_refuses_a_declared_size_early_and_counts_what_was_read() -> None:
    meter = UsageMeter(clock=Clock())
    limits = [sandbox_limit(nbytes=1000)]
    assert meter.admit_request("sb", limits, expected_bytes=600).ok  # declared, not yet counted
    assert meter.add_bytes("sb", limits, 600).usage == {"sandbox": {"bytes_per_session": 600}}
    early = meter.admit_request("sb", limits, expected_bytes=401)
    assert early.refused is not None and early.refused.label == "bytes_per_session:sandbox"
    assert early.refused.retry_after_s is None  # a session budget does not refill
    late = meter.add_bytes("sb", limits, 401)  # a chunked body: only its read size tells
    assert late.refused is not None and (late.refused.used, late.refused.allowed) == (600, 1000)
    assert meter.add_bytes("sb", limits, 400).ok  # the refused 401 were not counted
    assert meter.usage("sb", limits) == {"sandbox": {"bytes_per_session": 1000}}


def test_byte_budget_in_report_mode_passes_and_reports() -> None:
    meter = UsageMeter(clock=Clock())
    limits = [credential_limit(nbytes=100, scope=LimitScope.SANDBOX, mode=Mode.REPORT)]
    assert meter.admit_request("sb", limits, expected_bytes=10_000).ok  # report mode never refuses early
    over = meter.add_bytes("sb", limits, 150)
    assert over.ok and [e.label for e in over.reported] == ["bytes_per_session:credential"]


def test_global_credential_budget_is_shared_sandbox_scope_is_not() -> None:
    meter = UsageMeter(clock=Clock())
    shared = [credential_limit("shared", rpm=3)]
    assert admitted(meter, "a", shared, 2) + admitted(meter, "b", shared, 2) == [True, True, True, False]
    own = [credential_limit("per", rpm=2, scope=LimitScope.SANDBOX)]
    assert admitted(meter, "a", own, 3) + admitted(meter, "b", own, 3) == [True, True, False] * 2


def test_end_session_resets_the_sandboxs_counts_and_keeps_shared_ones() -> None:
    meter = UsageMeter(clock=Clock())
    own = sandbox_limit("a", rpm=5, nbytes=100)
    per = credential_limit("per", nbytes=100, scope=LimitScope.SANDBOX)
    shared = credential_limit("shared", rpm=5)
    for key in (per, shared):  # a request carries one credential
        meter.admit_request("a", [own, key])
        meter.add_bytes("a", [own, key], 40)
    meter.admit_request("b", [sandbox_limit("b", rpm=5), shared])
    assert meter.end_session("a") == 2  # its own counts and its share of "per"
    assert meter.usage("a", [own, per]) == {
        "sandbox": {"requests_per_minute": 0, "bytes_per_session": 0},
        "credential": {"bytes_per_session": 0},
    }
    assert meter.usage("a", [shared]) == {"credential": {"requests_per_minute": 2}}  # global: not a's alone
    assert meter.usage("b", [sandbox_limit("b", rpm=5)]) == {"sandbox": {"requests_per_minute": 1}}


def test_counts_survive_a_changed_limit_keyed_by_names() -> None:
    meter = UsageMeter(clock=Clock())
    assert admitted(meter, "sb", [sandbox_limit(rpm=10)], 5) == [True] * 5
    # A reload lowered the number: the five already counted apply to it.
    assert admitted(meter, "sb", [sandbox_limit(rpm=6)], 2) == [True, False]


def test_memory_is_bounded_idle_entries_are_swept_and_lru_evicted() -> None:
    clock = Clock()
    meter = UsageMeter(clock=clock, max_keys=50)
    for i in range(200):
        meter.admit_request(f"s{i}", [sandbox_limit(f"s{i}", rpm=5)])
    assert len(meter) == 50  # least recently used evicted
    assert meter.usage("s199", [sandbox_limit("s199", rpm=5)]) == {"sandbox": {"requests_per_minute": 1}}
    assert meter.usage("s0", [sandbox_limit("s0", rpm=5)]) == {"sandbox": {"requests_per_minute": 0}}
    meter.add_bytes("keep", [sandbox_limit("keep", nbytes=10)], 3)
    clock.now += 62
    for _ in range(1024):  # one sweep happens every 1024 calls
        meter.admit_request("hot", [sandbox_limit("hot", rpm=10_000)])
    # Empty windows are gone; the session bytes of "keep" are not idle and stay.
    assert len(meter) == 2
    assert meter.usage("keep", [sandbox_limit("keep", nbytes=10)]) == {"sandbox": {"bytes_per_session": 3}}


def test_concurrent_callers_never_get_more_than_the_limit() -> None:
    meter = UsageMeter()
    limits = [sandbox_limit(rpm=500)]
    results: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = admitted(meter, "sb", limits, 200)
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 500 and len(results) == 1600


def test_no_limits_admit_without_counting() -> None:
    meter = UsageMeter()
    assert meter.admit_request("sb", []) == Admission(None)
    assert meter.add_bytes("sb", [sandbox_limit(rpm=1)], 10**9).ok  # no byte budget among them
    assert len(meter) == 0
    with pytest.raises(ValueError):
        UsageMeter(max_keys=0)


def test_limit_decision_keeps_rule_and_credential(tmp_path: Path) -> None:
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(
        "version: 1\ncredentials:\n  k: {secret: a/b, injector: {kind: header, header: X-K}}\npolicies:\n  p:\n"
        "    rules:\n      - {id: r, action: allow, hosts: [a.example.com], credential: k}\n"
        "      - {id: d, action: deny, mode: report, hosts: [a.example.com], paths: [/old]}\n"
        "sandboxes:\n  - {id: sb, sources: [10.0.0.0/8], policies: [p]}\n"
    )
    policy = load_policy([str(policy_file)])
    allow = policy.decide(Identity("sb", "t"), facts_from_url("GET", "https://a.example.com/x"))
    meter = UsageMeter(clock=Clock())
    meter.admit_request("sb", [sandbox_limit(rpm=1)])
    enforced = meter.admit_request("sb", [sandbox_limit(rpm=1)]).refused
    assert enforced is not None
    refusal = limit_decision(allow, enforced)
    assert (refusal.verdict, refusal.mode, refusal.reason, refusal.rule_id, refusal.detail) == (
        Verdict.DENY,
        Mode.ENFORCE,
        Reason.USAGE_LIMIT_EXCEEDED,
        "r",
        "requests_per_minute:sandbox",
    )
    assert refusal.blocks and refusal.credential is not None and refusal.credential.name == "k"
    reported = meter.admit_request("sb", [sandbox_limit(rpm=1, mode=Mode.REPORT)]).reported[0]
    would: Decision = limit_decision(allow, reported)
    assert (would.verdict, would.mode, would.reason, would.blocks) == (
        Verdict.DENY,
        Mode.REPORT,
        Reason.USAGE_LIMIT_EXCEEDED,
        False,
    )
    already = policy.decide(Identity("sb", "t"), facts_from_url("GET", "https://a.example.com/old"))
    assert already.mode is Mode.REPORT and limit_decision(already, reported) is already


# -- through the real gateway ------------------------------------------------------------------------------------

SHARED_KEY = "limits-e2e-shared-key-0123456789"
TOKENS = {name: f"limits-token-{name}" for name in ("rpm", "bytes", "report", "agent-a", "agent-b", "splice")}


def _policy(tmp: Path) -> Path:
    def sandbox(name: str, policies: list[str], limits: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": name,
            "token_sha256": hashlib.sha256(TOKENS[name].encode()).hexdigest(),
            "policies": policies,
        }
        if limits is not None:
            out["limits"] = limits
        return out

    doc = {
        "version": 1,
        "credentials": {
            "shared-key": {
                "secret": "limits/shared#token",
                "injector": {"kind": "header", "header": "X-Api-Key"},
                "limits": {"requests_per_minute": 4},  # scope global: one budget for every sandbox
            }
        },
        "policies": {
            "upstreams": {
                "rules": [
                    {
                        "id": "api",
                        "action": "allow",
                        "hosts": ["api.example.test"],
                        "schemes": ["https", "http"],
                        "ports": [443, 80],
                        "paths": ["/allowed/**", "/echo"],
                    },
                    {"id": "spliced", "action": "allow", "hosts": ["other.example.test"]},
                    {
                        "id": "upstream-addresses",
                        "action": "allow",
                        "cidrs": ["198.51.100.10/32", "198.51.100.11/32"],
                        "schemes": ["http", "https"],
                        "ports": [80, 443],
                    },
                ]
            },
            "keyed": {
                "rules": [
                    {
                        "id": "keyed-api",
                        "action": "allow",
                        "hosts": ["api.example.test"],
                        "paths": ["/keyed/**"],
                        "credential": "shared-key",
                    }
                ]
            },
        },
        "sandboxes": [
            sandbox("rpm", ["upstreams"], {"requests_per_minute": 3}),
            sandbox("bytes", ["upstreams"], {"bytes_per_session": 4000}),
            sandbox("report", ["upstreams"], {"requests_per_minute": 1, "mode": "report"}),
            sandbox("agent-a", ["upstreams", "keyed"]),
            sandbox("agent-b", ["upstreams", "keyed"]),
            sandbox("splice", ["upstreams"], {"requests_per_minute": 1}),
        ],
    }
    path = tmp / "limits-policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def limited(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningGateway, InThreadGateway]]:
    tmp = tmp_path_factory.mktemp("limits")
    secrets = tmp / "secrets.yaml"
    secrets.write_text(yaml.safe_dump({"limits/shared": {"token": SHARED_KEY}}))
    # In this process, so a test can end a sandbox's session and read the meter and the metrics.
    with gateway_in_thread(
        world, tmp, "explicit", 3128, policies=[_policy(tmp)], secrets={"backend": "file", "path": str(secrets)}
    ) as pair:
        yield pair


def _as(sandbox: str) -> str:
    return f"agent:{TOKENS[sandbox]}"


def _retry_after(stderr: str) -> str | None:
    for line in stderr.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() == "retry-after":
            return value.strip()
    return None


@pytest.mark.netns
@pytest.mark.gateway
def test_over_the_per_minute_limit_is_429_with_reason_and_retry_after(
    world: World, limited: tuple[RunningGateway, InThreadGateway]
) -> None:
    gw, _ = limited
    gw.mark()
    statuses = [
        request(world, "curl", "GET", f"https://api.example.test/allowed/{i}", gateway=gw, proxy_user=_as("rpm")).status
        for i in range(3)
    ]
    assert statuses == [200, 200, 200]
    # Plain HTTP and a second client count against the same sandbox budget.
    over = request(
        world,
        "curl",
        "GET",
        "http://api.example.test/allowed/4",
        gateway=gw,
        proxy_user=_as("rpm"),
        extra_curl=["-D", "/dev/stderr"],
    )
    assert over.status == 429, over
    assert over.json() == {"rule": "api", "reason": "usage_limit_exceeded", "limit": "requests_per_minute:sandbox"}
    retry = _retry_after(over.error)
    assert retry is not None and 1 <= int(retry) <= 61
    again = request(world, "requests", "GET", "https://api.example.test/allowed/5", gateway=gw, proxy_user=_as("rpm"))
    assert again.status == 429 and again.json()["limit"] == "requests_per_minute:sandbox"
    passed = gw.settled(3, event="decision", sandbox="rpm", verdict="allow")
    assert len(passed) == 3 and passed[-1]["usage"] == {"sandbox": {"requests_per_minute": 3}}
    refused = gw.records(event="decision", sandbox="rpm", reason="usage_limit_exceeded")
    assert [(r["verdict"], r["mode"], r["rule"], r["limit"], r["phase"]) for r in refused] == [
        ("deny", "enforce", "api", "requests_per_minute:sandbox", "request")
    ] * 2
    assert refused[0]["usage"] == {"sandbox": {"requests_per_minute": 3}}


@pytest.mark.netns
@pytest.mark.gateway
def test_byte_budget_refuses_before_upstream_and_a_new_session_starts_fresh(
    world: World, limited: tuple[RunningGateway, InThreadGateway]
) -> None:
    gw, igw = limited
    gw.mark()
    first = request(
        world, "curl", "POST", "https://api.example.test/echo", gateway=gw, proxy_user=_as("bytes"), data="a" * 1000
    )
    assert first.status == 200 and first.json()["body_len"] == 1000, first
    (rec,) = gw.settled(1, event="decision", sandbox="bytes")
    used = rec["usage"]["sandbox"]["bytes_per_session"]
    assert 1000 < used < 1600  # the body plus the request line and headers as sent
    # Declared too big: refused from its headers, before the body is read.
    big = request(
        world, "curl", "POST", "https://api.example.test/echo", gateway=gw, proxy_user=_as("bytes"), data="b" * 5000
    )
    assert big.status == 429 and big.json()["limit"] == "bytes_per_session:sandbox", big
    assert _retry_after(big.error) is None
    # Chunked: no size up front; refused once read whole, still before anything is sent upstream.
    chunked = request(
        world,
        "curl",
        "POST",
        "https://api.example.test/echo",
        gateway=gw,
        proxy_user=_as("bytes"),
        data="c" * 2900,
        extra_curl=["-H", "Transfer-Encoding: chunked"],
    )
    assert chunked.status == 429 and chunked.json() == {
        "rule": "api",
        "reason": "usage_limit_exceeded",
        "limit": "bytes_per_session:sandbox",
    }
    # Refused bytes were not spent: a small request still fits.
    small = request(
        world, "curl", "POST", "https://api.example.test/echo", gateway=gw, proxy_user=_as("bytes"), data="d" * 100
    )
    assert small.status == 200
    refusals = gw.records(event="decision", sandbox="bytes", reason="usage_limit_exceeded")
    assert [r["limit"] for r in refusals] == ["bytes_per_session:sandbox"] * 2
    # Unregistering ends the session: the budget starts again.
    igw.call(igw.gateway.unregister_sandbox("bytes"))
    igw.gateway.register_sandbox("bytes")
    fresh = request(
        world, "curl", "POST", "https://api.example.test/echo", gateway=gw, proxy_user=_as("bytes"), data="e" * 2900
    )
    assert fresh.status == 200, fresh


@pytest.mark.netns
@pytest.mark.gateway
def test_a_credential_budget_is_shared_by_the_sandboxes_using_it(
    world: World, limited: tuple[RunningGateway, InThreadGateway]
) -> None:
    gw, igw = limited
    gw.mark()
    got = []
    for who in ("agent-a", "agent-b", "agent-a", "agent-b"):
        r = request(world, "curl", "GET", "https://api.example.test/keyed/x", gateway=gw, proxy_user=_as(who))
        assert r.status == 200, r
        got.append(r.json())
    # The key arrived (the gateway redacts its echo on the way back) and each sandbox's request was injected.
    assert all([k for k, _ in echo["headers"] if k.lower() == "x-api-key"] for echo in got)
    injected = gw.settled(4, event="decision", rule="keyed-api", verdict="allow")
    assert [r["sandbox"] for r in injected] == ["agent-a", "agent-b", "agent-a", "agent-b"]
    assert all(r["credential"] == "shared-key" and r["credential_fingerprint"] for r in injected)
    assert injected[-1]["usage"] == {"credential": {"requests_per_minute": 4}}
    for who in ("agent-b", "agent-a"):
        r = request(world, "httpx", "GET", "https://api.example.test/keyed/y", gateway=gw, proxy_user=_as(who))
        assert r.status == 429, r
        assert r.json() == {
            "rule": "keyed-api",
            "reason": "usage_limit_exceeded",
            "limit": "requests_per_minute:credential",
        }
        assert SHARED_KEY not in r.body
    # Requests without the credential are not limited by it.
    assert (
        request(
            world, "curl", "GET", "https://api.example.test/allowed/z", gateway=gw, proxy_user=_as("agent-a")
        ).status
        == 200
    )
    refused = gw.records(event="decision", reason="usage_limit_exceeded")
    assert [(r["sandbox"], r["credential"]) for r in refused] == [("agent-b", "shared-key"), ("agent-a", "shared-key")]
    metrics = igw.gateway.state.metrics.registry
    labels = {"sandbox_scope": "global", "credential": "shared-key", "limit": "requests_per_minute"}
    assert metrics.get_sample_value("cube_egress_usage_limited_total", labels) == 2


@pytest.mark.netns
@pytest.mark.gateway
def test_report_mode_records_the_would_refusal_and_lets_requests_pass(
    world: World, limited: tuple[RunningGateway, InThreadGateway]
) -> None:
    gw, _ = limited
    gw.mark()
    for i in range(3):
        r = request(
            world, "curl", "GET", f"https://api.example.test/allowed/r{i}", gateway=gw, proxy_user=_as("report")
        )
        assert r.status == 200, r
        assert r.json()["server"] == "A"
    recs = gw.settled(3, event="decision", sandbox="report")
    assert [(r["verdict"], r["mode"], r["reason"], r.get("limit")) for r in recs] == [
        ("allow", "enforce", "allowed_by_rule", None),
        ("deny", "report", "usage_limit_exceeded", "requests_per_minute:sandbox"),
        ("deny", "report", "usage_limit_exceeded", "requests_per_minute:sandbox"),
    ]
    assert all(r["rule"] == "api" and r["upstream_status"] == 200 for r in recs)
    assert recs[-1]["usage"] == {"sandbox": {"requests_per_minute": 3}}


@pytest.mark.netns
@pytest.mark.gateway
def test_a_spliced_connection_counts_as_one_request(
    world: World, limited: tuple[RunningGateway, InThreadGateway]
) -> None:
    gw, _ = limited
    gw.mark()
    ok = request(
        world,
        "curl",
        "GET",
        "https://other.example.test/x",
        gateway=gw,
        proxy_user=_as("splice"),
        ca=world.upstream_ca_pem,
    )
    assert ok.status == 200 and ok.json()["server"] == "B", ok
    over = request(
        world,
        "curl",
        "GET",
        "https://other.example.test/y",
        gateway=gw,
        proxy_user=_as("splice"),
        ca=world.upstream_ca_pem,
    )
    # The CONNECT itself is answered 429: no tunnel, no upstream connection.
    assert over.status is None and "429" in over.error, over
    recs = gw.settled(2, event="decision", sandbox="splice")
    assert [(r["phase"], r["verdict"], r["reason"], r.get("intercepted")) for r in recs] == [
        ("connection", "allow", "allowed_by_rule", False),
        ("connection", "deny", "usage_limit_exceeded", None),
    ]
    assert recs[1]["limit"] == "requests_per_minute:sandbox"
