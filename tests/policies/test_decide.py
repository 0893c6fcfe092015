"""The decision core, table-driven: each case names the verdict, mode, rule and reason it expects."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.policies import (
    CompiledPolicy,
    Identity,
    Mode,
    Reason,
    Verdict,
    facts_from_url,
    load_policy,
)

FIXTURE = Path(__file__).parent / "fixtures" / "decide.yaml"


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return load_policy([str(FIXTURE)])


@dataclass(frozen=True)
class Case:
    name: str
    method: str | None
    url: str
    verdict: Verdict
    reason: Reason
    rule: str | None
    mode: Mode = Mode.ENFORCE
    sandbox: str = "sb"
    headers: tuple[tuple[str, str], ...] = ()
    credential: str | None = None
    intercept: bool | None = None  # connection phase only


A, D = Verdict.ALLOW, Verdict.DENY
CASES = [
    # hosts, wildcards, normalisation
    Case("exact host", "GET", "https://pypi.org/simple/", A, Reason.ALLOWED_BY_RULE, "pypi"),
    Case("case and trailing dot", "GET", "https://PyPI.org./simple/", A, Reason.ALLOWED_BY_RULE, "pypi"),
    Case("wildcard one level", "GET", "https://files.pythonhosted.org/x", A, Reason.ALLOWED_BY_RULE, "pypi"),
    Case("wildcard two levels", "GET", "https://a.b.pythonhosted.org/x", A, Reason.ALLOWED_BY_RULE, "pypi"),
    Case("wildcard never matches apex", "GET", "https://pythonhosted.org/x", D, Reason.NO_MATCHING_RULE, None),
    Case("lookalike suffix", "GET", "https://evilpythonhosted.org/x", D, Reason.NO_MATCHING_RULE, None),
    Case("lookalike prefix", "GET", "https://malicious-api.github.com.evil.test/", D, Reason.NO_MATCHING_RULE, None),
    Case("unknown host", "GET", "https://example.net/", D, Reason.NO_MATCHING_RULE, None),
    # ports and schemes
    Case("default port only", "GET", "https://pypi.org:8443/", D, Reason.NO_MATCHING_RULE, None),
    Case("https rule does not cover http", "GET", "http://pypi.org/", D, Reason.NO_MATCHING_RULE, None),
    Case("port range", "GET", "http://mirror.example.com:8042/", A, Reason.ALLOWED_BY_RULE, "plain-mirror"),
    Case("outside port range", "GET", "http://mirror.example.com:8100/", D, Reason.NO_MATCHING_RULE, None),
    # methods, paths, headers
    Case("method allowed", "GET", "https://api.github.com/user", A, Reason.ALLOWED_BY_RULE, "gh-read", credential="gh"),
    Case("method not allowed", "DELETE", "https://api.github.com/user", D, Reason.NO_MATCHING_RULE, None),
    Case(
        "glob path",
        "POST",
        "https://api.github.com/repos/o/r/issues",
        A,
        Reason.ALLOWED_BY_RULE,
        "gh-issues",
        credential="gh",
    ),
    Case(
        "glob * stays in a segment",
        "POST",
        "https://api.github.com/repos/o/r/x/issues",
        D,
        Reason.NO_MATCHING_RULE,
        None,
    ),
    Case(
        "query ignored by path match",
        "POST",
        "https://api.github.com/repos/o/r/issues?x=1",
        A,
        Reason.ALLOWED_BY_RULE,
        "gh-issues",
        credential="gh",
    ),
    Case(
        "prefix path",
        "POST",
        "https://api.github.com/graphql/v2",
        A,
        Reason.ALLOWED_BY_RULE,
        "gh-issues",
        credential="gh",
    ),
    Case(
        "header condition met",
        "POST",
        "https://hooks.example.com/h",
        A,
        Reason.ALLOWED_BY_RULE,
        "json-only",
        headers=(("content-type", "application/json; charset=utf-8"),),
    ),
    Case(
        "header condition unmet",
        "POST",
        "https://hooks.example.com/h",
        D,
        Reason.NO_MATCHING_RULE,
        None,
        headers=(("content-type", "text/plain"),),
    ),
    Case("header condition missing", "POST", "https://hooks.example.com/h", D, Reason.NO_MATCHING_RULE, None),
    # precedence
    Case(
        "deny wins over allow",
        "GET",
        "https://api.github.com/repos/o/r/hooks/1",
        D,
        Reason.DENIED_BY_RULE,
        "gh-no-admin",
    ),
    Case(
        "deny wins, other policy",
        "GET",
        "https://pypi.org/simple/",
        D,
        Reason.DENIED_BY_RULE,
        "deny-pypi",
        sandbox="sb-locked",
    ),
    Case("deny path", "GET", "https://pypi.org/admin", D, Reason.DENIED_BY_RULE, "deny-beats-allow"),
    Case(
        "report deny passes, keeps credential",
        "GET",
        "https://api.github.com/orgs/x",
        D,
        Reason.DENIED_BY_RULE,
        "gh-orgs-report",
        mode=Mode.REPORT,
        credential="gh",
    ),
    Case(
        "default mode report",
        "GET",
        "https://example.net/",
        D,
        Reason.NO_MATCHING_RULE,
        None,
        mode=Mode.REPORT,
        sandbox="sb-report",
    ),
    Case(
        "enforced deny beats report default",
        "GET",
        "https://pypi.org/admin",
        D,
        Reason.DENIED_BY_RULE,
        "deny-beats-allow",
        sandbox="sb-report",
    ),
    # IP literals
    Case("ip literal without rule", "GET", "https://203.0.113.9/", D, Reason.IP_LITERAL_NOT_ALLOWED, None),
    Case("ip literal in cidr", "GET", "https://10.20.3.4/", A, Reason.ALLOWED_BY_RULE, "internal-net"),
    Case("decimal ip literal", "GET", "https://169090052/", A, Reason.ALLOWED_BY_RULE, "internal-net"),
    Case("hex ip literal", "GET", "https://0xa.0x14.3.4/", A, Reason.ALLOWED_BY_RULE, "internal-net"),
    Case("ip literal wrong port", "GET", "https://10.20.3.4:8443/", D, Reason.NO_MATCHING_RULE, None),
    Case("both schemes, each on its own port", "GET", "http://dual.example.com/", A, Reason.ALLOWED_BY_RULE, "dual"),
    Case("both schemes, https on 443", "GET", "https://dual.example.com/", A, Reason.ALLOWED_BY_RULE, "dual"),
    Case("no cross product: http on 443", "GET", "http://dual.example.com:443/", D, Reason.NO_MATCHING_RULE, None),
    Case("no cross product: https on 80", "GET", "https://dual.example.com:80/", D, Reason.NO_MATCHING_RULE, None),
    # paths an upstream could read differently from the policy
    Case(
        "escaped unreserved char", "POST", "https://api.github.com/repos/o/r/%69ssues", D, Reason.AMBIGUOUS_PATH, None
    ),
    Case("escaped slash", "GET", "https://api.github.com/repos/o%2Fr/hooks", D, Reason.AMBIGUOUS_PATH, None),
    Case("empty segment", "GET", "https://api.github.com/repos//o/r/hooks/1", D, Reason.AMBIGUOUS_PATH, None),
    Case("dot segment", "GET", "https://api.github.com/user/../repos/o/r/hooks/1", D, Reason.AMBIGUOUS_PATH, None),
    Case("escaped dot segment", "GET", "https://api.github.com/user/%2e%2e/x", D, Reason.AMBIGUOUS_PATH, None),
    Case("backslash", "GET", "https://api.github.com/user\\..\\x", D, Reason.AMBIGUOUS_PATH, None),
    Case(
        "escaped space is fine",
        "GET",
        "https://api.github.com/a%20b",
        A,
        Reason.ALLOWED_BY_RULE,
        "gh-read",
        credential="gh",
    ),
    Case(
        "trailing slash is fine",
        "GET",
        "https://api.github.com/user/",
        A,
        Reason.ALLOWED_BY_RULE,
        "gh-read",
        credential="gh",
    ),
    Case(
        "query is not a path",
        "GET",
        "https://api.github.com/user?next=/../x%2F",
        A,
        Reason.ALLOWED_BY_RULE,
        "gh-read",
        credential="gh",
    ),
    # connection phase: refuse, splice, intercept
    Case(
        "splice unconditional allow",
        None,
        "https://files.pythonhosted.org/",
        A,
        Reason.ALLOWED_BY_RULE,
        "pypi",
        intercept=False,
    ),
    Case(
        "intercept for conditions",
        None,
        "https://hooks.example.com/",
        A,
        Reason.ALLOWED_BY_RULE,
        "json-only",
        intercept=True,
    ),
    Case(
        "intercept for credential",
        None,
        "https://api.github.com/",
        A,
        Reason.ALLOWED_BY_RULE,
        "gh-read",
        intercept=True,
    ),
    Case(
        "intercept when a conditional deny exists",
        None,
        "https://pypi.org/",
        A,
        Reason.ALLOWED_BY_RULE,
        "pypi",
        intercept=True,
    ),
    Case("refuse unknown at connect", None, "https://example.net/", D, Reason.NO_MATCHING_RULE, None),
    Case(
        "refuse unconditional deny at connect",
        None,
        "https://pypi.org/",
        D,
        Reason.DENIED_BY_RULE,
        "deny-pypi",
        sandbox="sb-locked",
    ),
    Case("tcp tunnel", None, "tcp://db.example.com:5432", A, Reason.ALLOWED_BY_RULE, "db", intercept=False),
    Case("tcp other port", None, "tcp://db.example.com:5433", D, Reason.NO_MATCHING_RULE, None),
    Case(
        "report default intercepts",
        None,
        "https://example.net/",
        D,
        Reason.NO_MATCHING_RULE,
        None,
        mode=Mode.REPORT,
        sandbox="sb-report",
        intercept=True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(policy: CompiledPolicy, case: Case) -> None:
    decision = policy.decide(Identity(case.sandbox, "t"), facts_from_url(case.method, case.url, case.headers))
    got = (decision.verdict, decision.mode, decision.rule_id, decision.reason)
    assert got == (case.verdict, case.mode, case.rule, case.reason)
    assert (decision.credential.name if decision.credential else None) == case.credential
    assert decision.policy_hash == policy.policy_hash
    if case.intercept is not None:
        assert decision.intercept is case.intercept


def test_unknown_sandbox(policy: CompiledPolicy) -> None:
    d = policy.decide(Identity("nope", "t"), facts_from_url("GET", "https://pypi.org/"))
    assert (d.verdict, d.reason, d.blocks) == (Verdict.DENY, Reason.UNKNOWN_SANDBOX, True)
    assert policy.decide(None, facts_from_url("GET", "https://pypi.org/")).reason is Reason.UNKNOWN_SANDBOX


@pytest.mark.parametrize(
    ("source", "sandbox"),
    [
        ("10.200.0.2", "sb"),
        ("10.200.1.77", "sb-locked"),
        ("10.200.0.3", None),
        ("::ffff:10.200.0.2", "sb"),
        ("x", None),
    ],
)
def test_identify_by_source(policy: CompiledPolicy, source: str, sandbox: str | None) -> None:
    identity = policy.identify_by_source(source)
    assert (identity.sandbox_id if identity else None) == sandbox


def test_identify_by_token(policy: CompiledPolicy) -> None:
    assert policy.identify_by_token("test", "1.2.3.4:5") == Identity("sb", "1.2.3.4:5")
    assert policy.identify_by_token("Test", "1.2.3.4:5") is None
    assert policy.identify_by_token("", "1.2.3.4:5") is None


ADDRESS_CASES = [
    ("global", "93.184.216.34", True, None),
    ("loopback", "127.0.0.1", False, "loopback"),
    ("metadata", "169.254.169.254", False, "link_local"),
    ("private", "192.168.1.1", False, "private"),
    ("private allowed by cidr rule", "10.20.1.1", True, None),
    ("cgnat low edge", "100.64.0.1", False, "cgnat"),
    ("cgnat high edge", "100.127.255.254", False, "cgnat"),
    ("just below cgnat", "100.63.255.254", True, None),
    ("just above cgnat", "100.128.0.1", True, None),
    ("broadcast", "255.255.255.255", False, "broadcast"),
    ("unspecified", "0.0.0.0", False, "unspecified"),
    ("multicast", "224.0.0.1", False, "multicast"),
    ("documentation", "198.51.100.10", False, "reserved"),
    ("v6 loopback", "::1", False, "loopback"),
    ("v6 multicast", "ff02::2", False, "multicast"),
    ("nat64", "64:ff9b::a00:1", False, "nat64"),
    ("6to4", "2002:a00:1::1", False, "6to4"),
    ("teredo", "2001:0:4136:e378:8000:63bf:3fff:fdd2", False, "teredo"),
    ("ipv4-mapped", "::ffff:127.0.0.1", False, "ipv4_mapped"),
    ("v6 link local", "fe80::1", False, "link_local"),
    ("v6 unique local", "fd00::1", False, "private"),
    ("v6 global", "2606:4700::1111", True, None),
]


@pytest.mark.parametrize(("name", "address", "ok", "cls"), ADDRESS_CASES, ids=[c[0] for c in ADDRESS_CASES])
def test_check_addresses(policy: CompiledPolicy, name: str, address: str, ok: bool, cls: str | None) -> None:
    facts = facts_from_url("GET", "https://pypi.org/")
    check = policy.check_addresses(Identity("sb", "t"), facts, [ipaddress.ip_address(address)])
    assert check.ok is ok
    if not ok:
        assert check.decision is not None and check.decision.reason is Reason.ADDRESS_REFUSED
        assert [str(c) for _, c in check.refused] == [cls]


def test_one_refused_answer_refuses_the_name(policy: CompiledPolicy) -> None:
    facts = facts_from_url("GET", "https://pypi.org/")
    addrs = [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("127.0.0.1")]
    check = policy.check_addresses(Identity("sb", "t"), facts, addrs)
    assert not check.ok and check.decision is not None and check.decision.reason is Reason.ADDRESS_REFUSED


def test_gateway_own_address(policy: CompiledPolicy) -> None:
    own = frozenset({ipaddress.ip_address("10.20.0.1")})
    facts = facts_from_url("GET", "https://10.20.0.1/")
    ident = Identity("sb", "t")
    # Its listening port is always refused, even where a CIDR rule covers the address.
    loop = policy.check_addresses(ident, facts, [ipaddress.ip_address("10.20.0.1")], own, frozenset({443}))
    assert loop.decision is not None and loop.decision.reason is Reason.GATEWAY_LOOP
    # Another port of the gateway is allowed only because 'internal-net' names the CIDR explicitly.
    other = policy.check_addresses(ident, facts, [ipaddress.ip_address("10.20.0.1")], own, frozenset({3128}))
    assert other.ok


def test_no_addresses_is_a_refusal(policy: CompiledPolicy) -> None:
    check = policy.check_addresses(Identity("sb", "t"), facts_from_url("GET", "https://pypi.org/"), [])
    assert check.decision is not None and check.decision.reason is Reason.DESTINATION_NOT_RESOLVED


def test_deny_cidr_applies_to_names_resolving_into_it(policy: CompiledPolicy) -> None:
    facts = facts_from_url("GET", "https://pypi.org/")
    check = policy.check_addresses(Identity("sb", "t"), facts, [ipaddress.ip_address("1.1.1.7")])
    assert check.decision is not None
    assert (check.decision.reason, check.decision.rule_id) == (Reason.DENIED_BY_RULE, "deny-net")
    # Only for the schemes and ports the deny rule names.
    http = facts_from_url("GET", "http://mirror.example.com/")
    assert policy.check_addresses(Identity("sb", "t"), http, [ipaddress.ip_address("1.1.1.7")]).ok


def test_a_report_mode_rule_never_makes_the_outcome_laxer(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(
        "version: 1\npolicies:\n  p:\n    rules:\n"
        "      - {id: watch, action: deny, mode: report, hosts: [x.example.com]}\n"
        "sandboxes:\n  - {id: s, sources: [10.0.0.1/32], policies: [p]}\n"
    )
    policy = load_policy([str(p)])
    d = policy.decide(Identity("s", "t"), facts_from_url("GET", "https://x.example.com/"))
    assert d.blocks and d.reason is Reason.NO_MATCHING_RULE
