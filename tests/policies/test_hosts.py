"""Host normalisation and patterns: table cases plus hypothesis properties."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policies import (
    HostError,
    HostPattern,
    Identity,
    Mode,
    Reason,
    Verdict,
    facts_from_url,
    load_policy,
    normalize_host,
)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("API.Example.COM", "api.example.com"),
        ("api.example.com.", "api.example.com"),
        ("Bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("169.254.43518", "169.254.169.254"),
        ("[::1]", "::1"),
        ("[::ffff:169.254.169.254]", "169.254.169.254"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("1.example", "1.example"),
    ],
)
def test_normalize(raw: str, normal: str) -> None:
    assert normalize_host(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".",
        "a..b",
        "-a.example",
        "exa mple.com",
        "256.1.1.1",
        "1.2.3.4.5",
        "08.1.1.1",
        "x" * 64 + ".com",
        "1.2.3.0x100",
        "[::g]",
    ],
)
def test_normalize_rejects(raw: str) -> None:
    with pytest.raises(HostError):
        normalize_host(raw)


label = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
hostname = st.lists(label, min_size=2, max_size=5).map(".".join)


@given(hostname, st.sampled_from(["", "."]), st.booleans())
def test_normalize_is_idempotent_and_case_insensitive(host: str, dot: str, upper: bool) -> None:
    spelled = (host.upper() if upper else host) + dot
    once = normalize_host(spelled)
    assert once == host
    assert normalize_host(once) == once


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_ipv4_spelling_normalises_to_dotted_quad(value: int) -> None:
    dotted = str(ipaddress.IPv4Address(value))
    a, b, c, d = (int(x) for x in dotted.split("."))
    spellings = [
        str(value),
        hex(value),
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"{a}.{b}.{(c << 8) | d}",
        ".".join(oct(x).replace("0o", "0") for x in (a, b, c, d)),
        ".".join(hex(x) for x in (a, b, c, d)),
    ]
    for s in spellings:
        assert normalize_host(s) == dotted, s
    assert normalize_host(dotted) == dotted


@given(hostname)
def test_wildcard_never_matches_its_apex(host: str) -> None:
    pattern = HostPattern.parse(f"*.{host}")
    assert not pattern.matches(host)
    assert pattern.matches(f"a.{host}")
    assert pattern.matches(f"a.b.{host}")
    assert not pattern.matches(f"a{host}")


@given(hostname, label)
def test_wildcard_through_the_index_never_matches_apex(host: str, sub: str) -> None:
    # The same property, through the compiled index the gateway uses, not only the pattern object.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "p.yaml"
        p.write_text(
            "version: 1\npolicies:\n  p:\n    rules:\n"
            f"      - {{id: w, action: allow, hosts: ['*.{host}']}}\n"
            "sandboxes:\n  - {id: s, sources: [10.0.0.1/32], policies: [p]}\n"
        )
        policy = load_policy([str(p)])
    ident = Identity("s", "t")
    assert policy.decide(ident, facts_from_url("GET", f"https://{host}/")).verdict is Verdict.DENY
    assert policy.decide(ident, facts_from_url("GET", f"https://{sub}.{host}/")).verdict is Verdict.ALLOW


rule_spec = st.tuples(
    st.sampled_from(["allow", "deny"]),
    st.sampled_from([None, "report"]),
    st.sampled_from([None, ["GET"], ["POST"]]),
    st.sampled_from([None, ["/a/**"], ["/b"]]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(rule_spec, min_size=1, max_size=6), st.sampled_from(["GET", "POST"]), st.sampled_from(["/a/x", "/b"]))
def test_precedence_enforced_deny_then_report_then_allow(rules, method: str, path: str) -> None:  # type: ignore[no-untyped-def]
    import tempfile

    lines = []
    for i, (action, mode, methods, paths) in enumerate(rules):
        if action == "allow":
            mode = None
        parts = [f"id: r{i}", f"action: {action}", "hosts: [h.example.com]"]
        if mode:
            parts.append(f"mode: {mode}")
        if methods:
            parts.append(f"methods: {methods}")
        if paths:
            parts.append(f"paths: {paths}")
        lines.append("      - {" + ", ".join(parts) + "}")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "p.yaml"
        p.write_text(
            "version: 1\npolicies:\n  p:\n    rules:\n" + "\n".join(lines) + "\n"
            "sandboxes:\n  - {id: s, sources: [10.0.0.1/32], policies: [p]}\n"
        )
        policy = load_policy([str(p)])
    decision = policy.decide(Identity("s", "t"), facts_from_url(method, f"https://h.example.com{path}"))

    def matches(methods: list[str] | None, paths: list[str] | None) -> bool:
        ok_m = methods is None or method in methods
        ok_p = paths is None or (path.startswith("/a/") if paths == ["/a/**"] else path == "/b")
        return ok_m and ok_p

    matched = [(a, None if a == "allow" else m) for a, m, ms, ps in rules if matches(ms, ps)]
    if ("deny", None) in matched:
        assert (decision.verdict, decision.mode, decision.reason) == (Verdict.DENY, Mode.ENFORCE, Reason.DENIED_BY_RULE)
    elif ("deny", "report") in matched and ("allow", None) in matched:
        assert (decision.verdict, decision.mode) == (Verdict.DENY, Mode.REPORT)
    elif ("allow", None) in matched:
        assert decision.verdict is Verdict.ALLOW
    else:
        assert decision.reason is Reason.NO_MATCHING_RULE and decision.blocks


@given(st.one_of(hostname, st.from_regex(r"[a-z0-9_.-]{1,30}", fullmatch=True)))
def test_fast_path_agrees_with_full_normalisation(host: str) -> None:
    from gateway.policies._hosts import _normalize_host

    try:
        slow: str | None = _normalize_host(host)
    except HostError:
        slow = None
    try:
        fast: str | None = normalize_host(host)
    except HostError:
        fast = None
    assert fast == slow
