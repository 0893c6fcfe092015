"""DNS decisions of the core, table-driven: which names a sandbox may resolve, which queries are refused, which
addresses it may be told, and the shape test for names that carry encoded data."""

from __future__ import annotations

import base64
import ipaddress
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.policies import (
    CompiledPolicy,
    DnsReply,
    Identity,
    Mode,
    Reason,
    Scheme,
    Verdict,
    encoded_data,
    load_policy,
    parse_query_name,
)

FIXTURE = Path(__file__).parent / "fixtures" / "dns.yaml"


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return load_policy([str(FIXTURE)])


A, D = Verdict.ALLOW, Verdict.DENY
ANSWER, NODATA, NX, REFUSED = DnsReply.ANSWER, DnsReply.NODATA, DnsReply.NXDOMAIN, DnsReply.REFUSED


@dataclass(frozen=True)
class Case:
    name: str
    qname: str
    reply: DnsReply
    reason: Reason
    rule: str | None = None
    qtype: str = "A"
    sandbox: str = "sb"
    verdict: Verdict | None = None  # default: allow for ANSWER/NODATA, deny otherwise
    mode: Mode = Mode.ENFORCE
    qclass: str = "IN"


HEX32 = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
CASES = [
    # names the policy allows
    Case("exact host", "api.openai.com", ANSWER, Reason.ALLOWED_BY_RULE, "openai"),
    Case("case and final dot", "API.OpenAI.COM.", ANSWER, Reason.ALLOWED_BY_RULE, "openai"),
    Case("wildcard one level", "files.pythonhosted.org", ANSWER, Reason.ALLOWED_BY_RULE, "pypi"),
    Case("wildcard deeper", "a.b.pythonhosted.org", ANSWER, Reason.ALLOWED_BY_RULE, "pypi"),
    Case("registry", "registry.npmjs.org", ANSWER, Reason.ALLOWED_BY_RULE, "registries"),
    Case("github", "github.com", ANSWER, Reason.ALLOWED_BY_RULE, "registries"),
    Case("short hex label below a wildcard", "a3f9c2d1.cdn.example.com", ANSWER, Reason.ALLOWED_BY_RULE, "cdn"),
    Case("request-conditioned allow resolves", "api.github.com", ANSWER, Reason.ALLOWED_BY_RULE, "gh-read"),
    Case("tcp rule resolves", "db.example.com", ANSWER, Reason.ALLOWED_BY_RULE, "db"),
    Case("deny on one scheme, allow on another", "partly.example.com", ANSWER, Reason.ALLOWED_BY_RULE, "partly-allow"),
    Case("aws bucket", "my-company-artifacts.s3.us-west-2.amazonaws.com", ANSWER, Reason.ALLOWED_BY_RULE, "aws"),
    Case("aws account id", "123456789012.dkr.ecr.us-east-1.amazonaws.com", ANSWER, Reason.ALLOWED_BY_RULE, "aws"),
    Case("ec2 name", "ec2-203-113-225-199.compute-1.amazonaws.com", ANSWER, Reason.ALLOWED_BY_RULE, "aws"),
    Case(
        "elb name",
        "internal-my-loadbalancer-1234567890.us-east-1.elb.amazonaws.com",
        ANSWER,
        Reason.ALLOWED_BY_RULE,
        "aws",
    ),
    Case("spelled-out random name", "d3vv6lp55qjaqc.cloudfront.net", ANSWER, Reason.ALLOWED_BY_RULE, "random-names"),
    Case(
        "spelled-out hex name is trusted as written",
        f"{HEX32}.lambda-url.us-east-1.on.aws",
        ANSWER,
        Reason.ALLOWED_BY_RULE,
        "random-names",
    ),
    Case("AAAA of an allowed name is empty", "api.openai.com", NODATA, Reason.ALLOWED_BY_RULE, "openai", "AAAA"),
    # a deny in report mode: answered, recorded as would-deny
    Case(
        "report-mode deny",
        "reported.example.com",
        ANSWER,
        Reason.DENIED_BY_RULE,
        "reported-deny",
        verdict=D,
        mode=Mode.REPORT,
    ),
    Case(
        "report-mode deny alone does not make a name resolvable",
        "watched.example.com",
        NX,
        Reason.NO_MATCHING_RULE,
        None,
        verdict=D,
    ),
    Case(
        "report sandbox, unknown name",
        "example.net",
        ANSWER,
        Reason.NO_MATCHING_RULE,
        sandbox="sb-report",
        verdict=D,
        mode=Mode.REPORT,
    ),
    # names the policy does not allow: NXDOMAIN
    Case("unknown name", "example.net", NX, Reason.NO_MATCHING_RULE),
    Case("wildcard never matches its apex", "pythonhosted.org", NX, Reason.NO_MATCHING_RULE),
    Case("lookalike suffix", "evilpythonhosted.org", NX, Reason.NO_MATCHING_RULE),
    Case("lookalike prefix", "api.openai.com.evil.test", NX, Reason.NO_MATCHING_RULE),
    Case("unconditional deny beats the allow", "blocked.example.com", NX, Reason.DENIED_BY_RULE, "blocked-deny"),
    Case("deny of one name below a wildcard", "secret.cdn.example.com", NX, Reason.DENIED_BY_RULE, "wide-deny"),
    Case("a deny rule alone", "nope.example.com", NX, Reason.DENIED_BY_RULE, "denied-exact"),
    Case("another sandbox's deny", "pypi.org", NX, Reason.DENIED_BY_RULE, "deny-pypi", sandbox="sb-locked"),
    Case("AAAA of an unknown name", "example.net", NX, Reason.NO_MATCHING_RULE, qtype="AAAA"),
    Case("a name inside an allowed CIDR is no allowed name", "ip-10-20-1-1.example.com", NX, Reason.NO_MATCHING_RULE),
    # query types
    Case("TXT", "api.openai.com", REFUSED, Reason.QTYPE_REFUSED, qtype="TXT"),
    Case("NULL", "api.openai.com", REFUSED, Reason.QTYPE_REFUSED, qtype="NULL"),
    Case("ANY", "api.openai.com", REFUSED, Reason.QTYPE_REFUSED, qtype="ANY"),
    Case("MX", "github.com", REFUSED, Reason.QTYPE_REFUSED, qtype="MX"),
    Case("HTTPS", "github.com", REFUSED, Reason.QTYPE_REFUSED, qtype="HTTPS"),
    Case("unknown type", "github.com", REFUSED, Reason.QTYPE_REFUSED, qtype="TYPE65534"),
    Case("TXT of an unknown name", "example.net", REFUSED, Reason.QTYPE_REFUSED, qtype="TXT"),
    Case("CHAOS class", "version.bind", REFUSED, Reason.QTYPE_REFUSED, qtype="TXT", qclass="CH"),
    Case("A in CHAOS class", "github.com", REFUSED, Reason.QTYPE_REFUSED, qclass="CH"),
    # names that are no host names
    Case("root", ".", REFUSED, Reason.BAD_NAME),
    Case("IPv4 spelling", "10.20.1.1", REFUSED, Reason.BAD_NAME),
    Case("hex IPv4 spelling", "0x7f.1", REFUSED, Reason.BAD_NAME),
    Case("escaped dot in a label", "a\\.b.example.com", REFUSED, Reason.BAD_NAME),
    Case("escaped byte", "a\\000b.example.com", REFUSED, Reason.BAD_NAME),
    Case("leading hyphen", "-a.example.com", REFUSED, Reason.BAD_NAME),
    Case("empty label", "a..example.com", REFUSED, Reason.BAD_NAME),
    Case("non-ASCII", "bücher.example.com", REFUSED, Reason.BAD_NAME),
    Case("label over 63", "a" * 64 + ".cdn.example.com", REFUSED, Reason.LABEL_TOO_LONG),
    Case("name over 253", ".".join(["abcdefghi"] * 26) + ".cdn.example.com", REFUSED, Reason.NAME_TOO_LONG),
    Case("label of 63 is fine", "a" * 63 + ".cdn.example.com", ANSWER, Reason.ALLOWED_BY_RULE, "cdn"),
    # encoded data
    Case("hex label below a wildcard", "a3f9c2d1e5b70c4d.cdn.example.com", REFUSED, Reason.HIGH_ENTROPY_LABEL),
    Case("hex split into labels", "a3f9c2d1.e5b70c4d.9f8e7d6c.cdn.example.com", REFUSED, Reason.HIGH_ENTROPY_LABEL),
    Case(
        "base32 label below a wildcard",
        "mfrggzdfmztwq2lknnwg23tpobyxe43u.cdn.example.com",
        REFUSED,
        Reason.HIGH_ENTROPY_LABEL,
    ),
    Case("random name below a wildcard", f"{HEX32}x.lambda-url.us-east-1.on.aws", REFUSED, Reason.HIGH_ENTROPY_LABEL),
    Case("encoded label of a name nobody allows", f"{HEX32}.evil.test", REFUSED, Reason.HIGH_ENTROPY_LABEL),
    Case("any type", f"{HEX32}.evil.test", REFUSED, Reason.HIGH_ENTROPY_LABEL, qtype="TXT"),
    Case("decimal data", "123456789012345678901.cdn.example.com", REFUSED, Reason.HIGH_ENTROPY_LABEL),
    Case("uuid", "123e4567-e89b-12d3-a456-426614174000.cdn.example.com", REFUSED, Reason.HIGH_ENTROPY_LABEL),
    # identity
    Case("unknown sandbox", "api.openai.com", REFUSED, Reason.UNKNOWN_SANDBOX, sandbox="nope"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide_dns(policy: CompiledPolicy, case: Case) -> None:
    d = policy.decide_dns(Identity(case.sandbox, "t"), case.qname, case.qtype, case.qclass)
    verdict = case.verdict or (A if case.reply in (ANSWER, NODATA) else D)
    assert (d.reply, d.reason, d.rule_id, d.verdict, d.mode) == (case.reply, case.reason, case.rule, verdict, case.mode)
    assert d.policy_hash == policy.policy_hash and d.qtype == case.qtype
    assert d.sandbox_id == (None if case.sandbox == "nope" else case.sandbox)
    assert bool(d.destinations) is (case.reply in (ANSWER, NODATA))
    if d.reply is REFUSED:
        assert d.blocks and d.rule_id is None


def test_no_identity_is_an_unknown_sandbox(policy: CompiledPolicy) -> None:
    d = policy.decide_dns(None, "api.openai.com", "A")
    assert (d.reply, d.reason, d.sandbox_id) == (REFUSED, Reason.UNKNOWN_SANDBOX, None)


@pytest.mark.parametrize(
    ("qname", "destinations"),
    [
        ("api.openai.com", ((Scheme.HTTPS, 443, 443),)),
        ("partly.example.com", ((Scheme.HTTP, 80, 80),)),  # https is denied unconditionally
        ("both.example.com", ((Scheme.HTTP, 80, 80), (Scheme.HTTPS, 443, 443))),
        ("ranged.example.com", ((Scheme.HTTP, 8000, 9000),)),
        ("db.example.com", ((Scheme.TCP, 5432, 5432),)),
        ("example.net", ()),
    ],
)
def test_destinations(policy: CompiledPolicy, qname: str, destinations: tuple[object, ...]) -> None:
    assert policy.decide_dns(Identity("sb", "t"), qname, "A").destinations == destinations


ANSWER_CASES = [
    # (name, qname, addresses, ok, reason when refused)
    ("global answer", "api.openai.com", ["93.184.216.34"], True, None),
    ("metadata address", "api.openai.com", ["169.254.169.254"], False, Reason.ADDRESS_REFUSED),
    ("loopback", "api.openai.com", ["127.0.0.1"], False, Reason.ADDRESS_REFUSED),
    ("one bad answer refuses all", "api.openai.com", ["93.184.216.34", "10.9.9.9"], False, Reason.ADDRESS_REFUSED),
    ("private allowed by a CIDR rule on the name's port", "internal.example.com", ["10.20.1.1"], True, None),
    ("CIDR rule covers another port than the name", "internal-http.example.com", ["10.20.1.1"], False, None),
    ("CIDR rule inside the name's port range", "ranged.example.com", ["10.30.0.5"], True, None),
    ("deny CIDR on the only scheme", "httpsonly.example.com", ["1.1.1.7"], False, Reason.DENIED_BY_RULE),
    ("deny CIDR on one of two schemes", "both.example.com", ["1.1.1.7"], True, None),
    ("no address", "api.openai.com", [], False, Reason.DESTINATION_NOT_RESOLVED),
]


@pytest.mark.parametrize(("name", "qname", "addresses", "ok", "reason"), ANSWER_CASES, ids=[c[0] for c in ANSWER_CASES])
def test_check_dns_answers(
    policy: CompiledPolicy, name: str, qname: str, addresses: list[str], ok: bool, reason: Reason | None
) -> None:
    identity = Identity("sb", "t")
    d = policy.decide_dns(identity, qname, "A")
    assert d.reply is ANSWER
    check = policy.check_dns_answers(identity, d, [ipaddress.ip_address(a) for a in addresses])
    assert check.ok is ok
    if not ok:
        assert check.decision is not None
        assert check.decision.reason is (reason or Reason.ADDRESS_REFUSED)
    else:
        assert [str(a) for a in check.allowed] == addresses


def test_gateway_address_in_an_answer(policy: CompiledPolicy) -> None:
    identity = Identity("sb", "t")
    own = frozenset({ipaddress.ip_address("10.20.0.1")})
    d = policy.decide_dns(identity, "internal.example.com", "A")
    # The gateway's own address on one of its ports is never handed out, even inside an allowed CIDR.
    loop = policy.check_dns_answers(identity, d, [ipaddress.ip_address("10.20.0.1")], own, frozenset({443}))
    assert loop.decision is not None and loop.decision.reason is Reason.GATEWAY_LOOP
    other = policy.check_dns_answers(identity, d, [ipaddress.ip_address("10.20.0.1")], own, frozenset({53, 3128}))
    assert other.ok


# -- the shape test on its own --------------------------------------------------------------------------------

REAL_NAMES = [
    "api.openai.com",
    "api.anthropic.com",
    "files.pythonhosted.org",
    "github.com",
    "objects.githubusercontent.com",
    "registry.npmjs.org",
    "registry-1.docker.io",
    "production.cloudflare.docker.com",
    "generativelanguage.googleapis.com",
    "us-central1-aiplatform.googleapis.com",
    "bedrock-runtime.us-east-1.amazonaws.com",
    "my-company-production-artifacts.s3.us-west-2.amazonaws.com",
    "internal-my-loadbalancer-1234567890.us-east-1.elb.amazonaws.com",
    "ec2-203-113-225-199.compute-1.amazonaws.com",
    "123456789012.dkr.ecr.us-east-1.amazonaws.com",
    "abc123defg.execute-api.us-east-1.amazonaws.com",
    "d3vv6lp55qjaqc.cloudfront.net",
    "o4504123456789012.ingest.us.sentry.io",
    "index-name-abc1234.svc.us-east1-gcp.pinecone.io",
    "service-abc123xyz-uc.a.run.app",
    "my-app-git-feature-branch-myteam.vercel.app",
    "cdn-lfs-us-1.huggingface.co",
    "cas-bridge.xethub.hf.co",
    "westeurope-5.in.applicationinsights.azure.com",
    "kubernetes-dashboard.kube-system.svc.cluster.local",
    "thisisaverylonglabelmadeofenglishwordsforexample.example.com",
    "node-v20-11-1-linux-x64.example.com",
    "a3f9c2d1.cdn.example.com",
    "xn--mller-kva.example.com",
    "_dmarc.example.com",
]


@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_names_do_not_look_encoded(name: str) -> None:
    labels = parse_query_name(name).split(".")
    assert [encoded_data(label) for label in labels] == [None] * len(labels)
    # Also as the part below a wildcard on the last two labels.
    assert encoded_data(".".join(labels[:-2])) is None


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def _b64(data: bytes) -> str:
    return base64.b64encode(data, altchars=b"-_").decode().rstrip("=").lower()


@pytest.mark.parametrize(
    ("encoding", "size"), [("hex", 8), ("hex", 30), ("b32", 20), ("b32", 39), ("b64", 32), ("b64", 45)]
)
def test_exfiltration_encodings_are_caught(encoding: str, size: int) -> None:
    """Random data of `size` bytes per query, as the tools encode it, in one label or split into labels."""
    rng = random.Random(f"{encoding}{size}")
    encode = {"hex": bytes.hex, "b32": _b32, "b64": _b64}[encoding]
    caught = 0
    for _ in range(200):
        text = encode(rng.randbytes(size))
        labels = [text[i : i + 60] for i in range(0, len(text), 60)]
        caught += encoded_data(".".join(labels)) is not None
    assert caught >= 190, caught  # at these sizes, 95% or more


def test_exfiltration_split_into_short_labels() -> None:
    rng = random.Random(7)
    caught = 0
    for _ in range(200):
        text = rng.randbytes(16).hex()
        caught += encoded_data(".".join(text[i : i + 8] for i in range(0, len(text), 8))) is not None
    assert caught == 200


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a3f9c2d1e5b70c4d", "16 hex digits in a row"),
        ("a3f9c2d1e5b70c4", None),  # 15
        ("deadbeefcafebabe", None),  # hex letters only: a word-like label
        ("12345678901234567890", "20 decimal digits in a row"),
        ("1234567890123456789", None),
        ("a1b2-c3d4-e5f6-a7b8-c9d0", "20 characters, letters and digits interleaved 15 times, 3.9 bits/char"),
        ("a1-a1-a1-a1-a1-a1-a1-a1-a1-a1", None),  # interleaved, but no information
    ],
)
def test_encoded_data_rules(text: str, expected: str | None) -> None:
    assert encoded_data(text) == expected
