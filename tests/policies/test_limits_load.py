"""Usage limits and agent correlation in policy files: what loads, what the pure core answers about them.

Broken inputs have one fixture each under fixtures/broken (limit_*.yaml, correlation_*.yaml), checked with every
other broken fixture by test_load.py; what needs more than one file is here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policies import (
    CORRELATION_INVALID,
    CorrelationSpec,
    Identity,
    LimitScope,
    LimitSubject,
    Mode,
    PolicyError,
    SandboxDTO,
    add_sandboxes,
    facts_from_url,
    load_policy,
)
from gateway.policies._yaml import Position

REPO = Path(__file__).parents[2]

POLICY = """\
version: 1
correlation:
  headers: [X-Agent-Run-Id, X-Agent-Tool-Call-Id]
  max_length: 16
credentials:
  shared:
    secret: api/shared
    injector: {kind: header, header: X-Api-Key}
    limits: {requests_per_minute: 600}
  mine:
    secret: api/mine
    injector: {kind: header, header: X-Other-Key}
    limits: {requests_per_minute: 30, bytes_per_session: 1_000_000, scope: sandbox, mode: report}
policies:
  p:
    rules:
      - id: shared-api
        action: allow
        hosts: [shared.example.com]
        credential: shared
      - id: mine-api
        action: allow
        hosts: [mine.example.com]
        credential: mine
      - id: by-header
        action: allow
        hosts: [h.example.com]
        methods: [POST]
        paths: [/v1/**]
        headers: {X-Tenant: "acme-*"}
      - id: by-run-id
        action: allow
        hosts: [r.example.com]
        headers: {X-Agent-Run-Id: "run-*"}
sandboxes:
  - id: limited
    sources: [10.0.0.0/24]
    policies: [p]
    limits: {requests_per_minute: 5, bytes_per_session: 2048}
  - id: free
    sources: [10.0.1.0/24]
    policies: [p]
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    p = tmp_path / "limits.yaml"
    p.write_text(POLICY)
    return p


def test_sandbox_and_credential_limits_compile(policy_file: Path) -> None:
    policy = load_policy([str(policy_file)])
    own = policy.sandboxes["limited"].limits
    assert own is not None
    assert (own.subject, own.name, own.scope, own.mode) == (
        LimitSubject.SANDBOX,
        "limited",
        LimitScope.SANDBOX,
        Mode.ENFORCE,
    )
    assert (own.requests_per_minute, own.bytes_per_session) == (5, 2048)
    assert (own.position.line, own.position.col) == (39, 13)
    assert policy.sandboxes["free"].limits is None

    shared = policy.credentials["shared"].limits
    assert shared is not None
    # A credential's limit is shared by default: it models the provider's quota on the key.
    assert (shared.scope, shared.requests_per_minute, shared.bytes_per_session) == (LimitScope.GLOBAL, 600, None)
    mine = policy.credentials["mine"].limits
    assert mine is not None
    assert (mine.scope, mine.mode, mine.bytes_per_session) == (LimitScope.SANDBOX, Mode.REPORT, 1_000_000)


def test_limits_for_lists_the_sandbox_limit_then_the_credential_limit(policy_file: Path) -> None:
    policy = load_policy([str(policy_file)])
    shared, mine = policy.credentials["shared"], policy.credentials["mine"]
    assert [lim.subject for lim in policy.limits_for("limited", shared)] == ["sandbox", "credential"]
    assert [lim.name for lim in policy.limits_for("free", mine)] == ["mine"]
    assert policy.limits_for("free", None) == ()
    assert policy.limits_for(None, None) == ()
    assert policy.limits_for("no-such-sandbox", shared) == (shared.limits,)
    # The decision carries the credential that limits_for is asked about.
    decision = policy.decide(Identity("limited", "t"), facts_from_url("GET", "https://shared.example.com/x"))
    assert decision.credential is not None and decision.credential.name == "shared"


def test_meter_keys_are_names_so_counts_survive_a_reload(policy_file: Path) -> None:
    first = load_policy([str(policy_file)])
    policy_file.write_text(POLICY.replace("requests_per_minute: 5,", "requests_per_minute: 50,"))
    second = load_policy([str(policy_file)])
    assert first.policy_hash != second.policy_hash
    a, b = first.sandboxes["limited"].limits, second.sandboxes["limited"].limits
    assert a is not None and b is not None and a != b
    assert a.meter_key("limited") == b.meter_key("limited") == ("sandbox", "limited", "")
    shared, mine = first.credentials["shared"].limits, first.credentials["mine"].limits
    assert shared is not None and mine is not None
    # global: one key for every sandbox; scope sandbox: one per sandbox
    assert shared.meter_key("limited") == shared.meter_key("free") == ("credential", "shared", "*")
    assert mine.meter_key("limited") != mine.meter_key("free")


def test_correlation_spec_compiles_lower_case(policy_file: Path) -> None:
    policy = load_policy([str(policy_file)])
    assert policy.correlation == CorrelationSpec(("x-agent-run-id", "x-agent-tool-call-id"), 16)


def test_no_correlation_section_extracts_nothing(tmp_path: Path) -> None:
    p = tmp_path / "plain.yaml"
    p.write_text(POLICY.split("credentials:")[0].replace("correlation:\n", "").split("  headers")[0] + "\n")
    policy = load_policy([str(p)])
    assert policy.correlation.headers == ()
    assert policy.correlation.extract([("X-Agent-Run-Id", "run-1")]) == {}


SPEC = CorrelationSpec(("x-agent-run-id", "x-agent-tool-call-id"), 16)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("X-Agent-Run-Id", "run-42")], {"x-agent-run-id": "run-42"}),
        ([("x-agent-run-id", "run 42 / step:1")], {"x-agent-run-id": "run 42 / step:1"}),
        ([("X-AGENT-TOOL-CALL-ID", "call_7")], {"x-agent-tool-call-id": "call_7"}),
        ([("X-Other", "v"), ("Authorization", "Bearer x")], {}),
        # 17 characters: over max_length
        ([("X-Agent-Run-Id", "r" * 17)], {"x-agent-run-id": CORRELATION_INVALID}),
        ([("X-Agent-Run-Id", "r" * 16)], {"x-agent-run-id": "r" * 16}),
        ([("X-Agent-Run-Id", "")], {"x-agent-run-id": CORRELATION_INVALID}),
        ([("X-Agent-Run-Id", "lauf-ä")], {"x-agent-run-id": CORRELATION_INVALID}),
        ([("X-Agent-Run-Id", "a\tb")], {"x-agent-run-id": CORRELATION_INVALID}),
        ([("X-Agent-Run-Id", "a\x7f")], {"x-agent-run-id": CORRELATION_INVALID}),
        # Sent twice: which one would be the truth? Neither is kept.
        ([("X-Agent-Run-Id", "a"), ("x-agent-run-id", "b")], {"x-agent-run-id": CORRELATION_INVALID}),
        (
            [("X-Agent-Run-Id", "run-1"), ("X-Agent-Tool-Call-Id", "t" * 40)],
            {"x-agent-run-id": "run-1", "x-agent-tool-call-id": CORRELATION_INVALID},
        ),
    ],
)
def test_correlation_values_are_kept_only_when_short_printable_ascii(
    headers: list[tuple[str, str]], expected: dict[str, str]
) -> None:
    assert SPEC.extract(headers) == expected


def test_correlation_defined_in_two_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("version: 1\ncorrelation:\n  headers: [X-Agent-Run-Id]\n")
    (tmp_path / "b.yaml").write_text("version: 1\ninclude: [a.yaml]\ncorrelation:\n  headers: [X-Step]\n")
    with pytest.raises(PolicyError) as exc:
        load_policy([str(tmp_path / "b.yaml")])
    (issue,) = exc.value.issues
    assert str(issue).startswith(f"{tmp_path / 'b.yaml'}:3:1: error: 'correlation' is defined twice")
    assert f"first at {tmp_path / 'a.yaml'}:2:1" in str(issue)


def test_errors_in_limits_and_correlation_come_out_together(tmp_path: Path) -> None:
    p = tmp_path / "many.yaml"
    p.write_text(
        "version: 1\n"
        "correlation:\n"
        "  headers: [Cookie]\n"
        "credentials:\n"
        "  c:\n"
        "    secret: x/y\n"
        "    injector: {kind: basic}\n"
        "    limits: {bytes_per_session: 10}\n"
        "policies:\n"
        "  p:\n"
        "    rules:\n"
        "      - {id: r, action: allow, hosts: [a.example.com], credential: c}\n"
        "sandboxes:\n"
        "  - {id: s, sources: [10.0.0.0/8], policies: [p], limits: {mode: enforce}}\n"
    )
    with pytest.raises(PolicyError) as exc:
        load_policy([str(p)])
    where = sorted((i.position.line, i.position.col) for i in exc.value.issues)
    assert where == [(3, 13), (8, 33), (14, 59)], [str(i) for i in exc.value.issues]


def test_registered_sandboxes_carry_their_limits_and_keep_correlation(policy_file: Path) -> None:
    policy = load_policy([str(policy_file)])
    dto = SandboxDTO.model_validate(
        {"id": "api-1", "sources": ["10.9.0.0/24"], "policies": ["p"], "limits": {"requests_per_minute": 7}}
    )
    extended = add_sandboxes(policy, [(dto, Position("admin-api", 1, 1))])
    limit = extended.sandboxes["api-1"].limits
    assert limit is not None and limit.requests_per_minute == 7 and limit.subject is LimitSubject.SANDBOX
    assert extended.correlation == policy.correlation
    empty = SandboxDTO.model_validate({"id": "api-2", "sources": ["10.9.1.0/24"], "policies": ["p"], "limits": {}})
    with pytest.raises(PolicyError, match="set nothing"):
        add_sandboxes(policy, [(empty, Position("admin-api", 1, 1))])


@pytest.mark.parametrize(
    ("method", "url", "known", "expected"),
    [
        ("POST", "https://h.example.com/v1/x", (), True),  # X-Tenant decides, and records have no headers
        ("GET", "https://h.example.com/v1/x", (), False),  # the header rule is for POST only
        ("POST", "https://h.example.com/v2/x", (), False),  # ... and for /v1/** only
        ("GET", "https://r.example.com/", (), True),
        ("GET", "https://r.example.com/", ("X-Agent-Run-Id",), False),  # a correlation header replay knows
        ("GET", "https://shared.example.com/", (), False),
        (None, "https://h.example.com/", (), False),  # connection phase: no request, no headers
    ],
)
def test_depends_on_headers(
    policy_file: Path, method: str | None, url: str, known: tuple[str, ...], expected: bool
) -> None:
    policy = load_policy([str(policy_file)])
    facts = facts_from_url(method, url)
    assert policy.depends_on_headers(Identity("free", "t"), facts, ignore=known) is expected
    assert policy.depends_on_headers(None, facts) is False


def test_example_policies_show_limits_and_correlation() -> None:
    # Acceptance of issue 6: the repository's example policies carry a usage limit and the correlation headers.
    policy = load_policy([str(REPO / "policies" / "sandboxes.yaml")])
    fleet = policy.sandboxes["agent-fleet"].limits
    assert fleet is not None and fleet.requests_per_minute and fleet.bytes_per_session
    openai = policy.credentials["openai"].limits
    assert openai is not None and openai.scope is LimitScope.GLOBAL
    anthropic = policy.credentials["anthropic"].limits
    assert anthropic is not None and anthropic.mode is Mode.REPORT and anthropic.scope is LimitScope.SANDBOX
    assert policy.correlation.headers == ("x-agent-run-id", "x-agent-tool-call-id")
