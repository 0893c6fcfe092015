"""`cube-egress policy replay`: re-deciding recorded requests under a proposed policy.

First a recorded run: the real gateway, real clients, its real audit file, replayed against the same policy (no
change: replay rebuilds the requests faithfully) and against a modified one (the exact diff). Then the command's
contract on hand-written records: classification, grouping, what is skipped and why, inexact decisions, exit codes
and errors.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.policies import load_policy
from gateway.replay import Change, render_text, replay
from tests.gateway.harness import E2E_POLICY, gateway_process, request
from tests.support.world import World

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed command, as a CI job runs it."""
    exe = str(Path(sys.executable).with_name("cube-egress"))
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """The same command in this process (an interpreter start per call would dominate these tests)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


# -- a recorded run ----------------------------------------------------------------------------------------------


def _proposed(tmp: Path) -> Path:
    """The end-to-end policy with three changes: /echo is no longer allowed, the admin deny becomes report-only
    (so admin requests pass), and other.example.test needs interception (a path condition)."""
    text = E2E_POLICY.read_text()
    assert 'paths: ["/allowed/**", /echo]' in text and "      - id: api-deny-admin\n        action: deny\n" in text
    text = text.replace('paths: ["/allowed/**", /echo]', 'paths: ["/allowed/**", "/admin/**"]')
    text = text.replace(
        "      - id: api-deny-admin\n        action: deny\n",
        "      - id: api-deny-admin\n        action: deny\n        mode: report\n",
    )
    text = text.replace(
        "        hosts: [other.example.test]\n", "        hosts: [other.example.test]\n        paths: [/x]\n"
    )
    out = tmp / "proposed.yaml"
    out.write_text(text)
    return out


@pytest.mark.netns
@pytest.mark.gateway
def test_replay_of_a_recorded_run(world: World, tmp_path: Path) -> None:
    with gateway_process(world, tmp_path / "gw", "explicit") as gw:
        for method, url, data in [
            ("GET", "https://api.example.test/allowed/a?token=secret", None),
            ("GET", "https://api.example.test/allowed/a?token=other", None),
            ("POST", "http://api.example.test/echo", "hello"),
            ("GET", "https://api.example.test/admin/users", None),
            ("DELETE", "https://api.example.test/allowed/a", None),
            ("GET", "https://other.example.test/x", None),
            ("GET", "https://evil.example.test/", None),
        ]:
            ca = world.upstream_ca_pem if "other." in url else None
            request(world, "curl", method, url, gateway=gw, data=data, ca=ca)
        audit = gw.audit_path
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    decisions = [r for r in records if r.get("event") == "decision"]
    assert len(decisions) == 7

    same = cli("policy", "replay", "--audit", str(audit), "--policy", str(E2E_POLICY))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "replayed 7 of 7 decision record(s)" in same.stdout and "unchanged: 7" in same.stdout

    proposed = _proposed(tmp_path)
    diff = run("policy", "replay", "--audit", str(audit), "--policy", str(proposed), "--format", "json")
    assert diff.returncode == 1, diff.stdout + diff.stderr
    doc = json.loads(diff.stdout)
    assert (doc["replayed"], doc["unchanged"], doc["skipped"]) == (7, 4, {})

    def summary(entries: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [
            (e["method"], e["scheme"], e["host"], e["path"], e["count"], e["before"]["rule"], e["after"]["reason"])
            for e in entries
        ]

    assert summary(doc["newly_denied"]) == [
        ("POST", "http", "api.example.test", "/echo", 1, "api-intercepted", "no_matching_rule")
    ]
    assert summary(doc["newly_allowed"]) == [
        ("GET", "https", "api.example.test", "/admin/users", 1, "api-deny-admin", "denied_by_rule")
    ]
    assert doc["newly_allowed"][0]["after"] == {
        "verdict": "deny",
        "mode": "report",
        "rule": "api-deny-admin",
        "reason": "denied_by_rule",
    }
    (changed,) = doc["changed"]
    assert (changed["phase"], changed["host"], changed["before"]["handling"], changed["after"]["handling"]) == (
        "connection",
        "other.example.test",
        "spliced",
        "intercepted",
    )
    # Only newly denied requests fail a CI job that asks for that; here there is one.
    assert (
        run("policy", "replay", "--audit", str(audit), "--policy", str(proposed), "--fail-on", "denied").returncode == 1
    )
    text = run("policy", "replay", "--audit", str(audit), "--policy", str(proposed)).stdout
    assert "newly denied: 1\n  sb POST http://api.example.test/echo\n" in text
    assert "secret" not in diff.stdout  # query values were redacted when recorded


# -- the contract, on hand-written records -------------------------------------------------------------------------

POLICY = """\
version: 1
correlation:
  headers: [X-Agent-Run-Id]
policies:
  p:
    rules:
      - {id: read, action: allow, hosts: [api.example.com], methods: [GET]}
      - {id: write, action: allow, hosts: [api.example.com], methods: [POST], paths: [/v1/**]}
      - {id: tenant, action: allow, hosts: [t.example.com], headers: {X-Tenant: acme}}
      - {id: runs, action: allow, hosts: [r.example.com], headers: {X-Agent-Run-Id: "run-*"}}
      - {id: pkgs, action: allow, hosts: [pypi.org]}
sandboxes:
  - {id: sb, sources: [10.0.0.0/24], policies: [p]}
"""


def rec(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event": "decision",
        "time": "2026-01-01T00:00:00.000000Z",
        "sandbox": "sb",
        "source": "10.0.0.2:5000",
        "phase": "request",
        "scheme": "https",
        "host": "api.example.com",
        "port": 443,
        "method": "GET",
        "path": "/v1/x",
        "verdict": "allow",
        "mode": "enforce",
        "rule": "read",
        "reason": "allowed_by_rule",
    }
    base.update(fields)
    return base


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    return p


def test_classification_grouping_and_skips(policy_path: Path) -> None:
    policy = load_policy([str(policy_path)])
    records = [
        rec(),  # unchanged
        rec(method="DELETE", verdict="allow", rule="old-delete"),  # newly denied (no rule allows DELETE)
        rec(method="DELETE", verdict="allow", rule="old-delete", path="/v1/x?id=REDACTED"),  # same: grouped
        rec(method="POST", verdict="deny", rule=None, reason="no_matching_rule"),  # newly allowed by "write"
        rec(method="GET", rule="old-read"),  # changed: same verdict, another rule
        rec(host="pypi.org", phase="connection", method=None, path=None, intercepted=False, rule="pkgs"),
        rec(reason="address_refused", verdict="deny", rule=None),  # not the policy's answer: skipped
        rec(reason="usage_limit_exceeded", verdict="deny", rule="read", limit="requests_per_minute:sandbox"),
        {"event": "decision", "phase": "dns", "host": "api.example.com", "reason": "allowed_by_rule"},
        {"event": "security", "kind": "ambiguous_path"},  # not a decision: not counted
        {"event": "admin", "action": "sandbox_registered", "via": "admin_api", "sandbox": "sb"},  # neither
        rec(host=None),
    ]
    report = replay(records, policy)
    assert (report.records, report.replayed, report.unchanged) == (10, 7, 3)
    assert report.skipped == {"address_refused": 1, "dns": 1, "incomplete record": 1}
    (denied,) = report.of(Change.NEWLY_DENIED)
    assert (denied.count, denied.request.method, denied.before.rule, denied.after.reason) == (
        2,
        "DELETE",
        "old-delete",
        "no_matching_rule",
    )
    (allowed,) = report.of(Change.NEWLY_ALLOWED)
    assert (allowed.request.method, allowed.after.rule) == ("POST", "write")
    (changed,) = report.of(Change.CHANGED)
    assert (changed.before.rule, changed.after.rule) == ("old-read", "read")
    text = render_text(report, ["audit.jsonl"])
    assert "newly denied: 2\n  sb DELETE https://api.example.com/v1/x  x2\n" in text
    assert "skipped: 3 (address_refused 1, dns 1, incomplete record 1)" in text


def test_unknown_sandboxes_and_ip_literals_are_replayed(policy_path: Path) -> None:
    policy = load_policy([str(policy_path)])
    report = replay(
        [
            rec(sandbox="gone"),  # a sandbox the proposed policy no longer has
            rec(host="203.0.113.9", verdict="deny", rule=None, reason="ip_literal_not_allowed"),
            rec(sandbox=None, verdict="deny", rule=None, reason="unknown_sandbox"),
        ],
        policy,
    )
    (denied,) = report.of(Change.NEWLY_DENIED)
    assert denied.request.sandbox == "gone" and denied.after.reason == "unknown_sandbox"
    assert report.unchanged == 2


def test_header_conditions_make_a_decision_inexact(policy_path: Path) -> None:
    policy = load_policy([str(policy_path)])
    report = replay(
        [
            rec(host="t.example.com", path="/", rule="tenant"),
            # Only the correlation header decides, and the record has it: exact, and still allowed.
            rec(host="r.example.com", path="/", rule="runs", correlation={"x-agent-run-id": "run-1"}),
            rec(host="r.example.com", path="/", rule="runs", correlation={"x-agent-run-id": "<invalid>"}),
        ],
        policy,
    )
    assert report.inexact == 2
    assert report.unchanged == 1
    entries = report.entries
    assert [(e.request.host, e.inexact, e.change) for e in entries] == [
        ("t.example.com", True, Change.NEWLY_DENIED),
        ("r.example.com", True, Change.NEWLY_DENIED),
    ]
    assert "(inexact: header conditions)" in render_text(report)


def _audit(tmp: Path, records: list[dict[str, Any]]) -> Path:
    p = tmp / "audit.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def test_exit_codes(tmp_path: Path, policy_path: Path) -> None:
    unchanged = _audit(tmp_path, [rec()])
    r = run("policy", "replay", "--audit", str(unchanged), "--policy", str(policy_path))
    assert r.returncode == 0 and "unchanged: 1" in r.stdout, r.stderr
    allowed_only = _audit(tmp_path, [rec(method="POST", verdict="deny", rule=None, reason="no_matching_rule")])
    assert run("policy", "replay", "--audit", str(allowed_only), "--policy", str(policy_path)).returncode == 1
    r = run("policy", "replay", "--audit", str(allowed_only), "--policy", str(policy_path), "--fail-on", "denied")
    assert r.returncode == 0 and "newly allowed: 1" in r.stdout


def test_errors_exit_2_with_positions(tmp_path: Path, policy_path: Path) -> None:
    audit = _audit(tmp_path, [rec()])
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\npolicies:\n  p:\n    rules:\n      - {id: r, action: allow, hosts: ['*']}\n")
    r = run("policy", "replay", "--audit", str(audit), "--policy", str(broken))
    assert r.returncode == 2 and f"{broken}:5:" in r.stderr and r.stdout == ""
    r = run("policy", "replay", "--audit", str(tmp_path / "missing.jsonl"), "--policy", str(policy_path))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text(json.dumps(rec()) + "\nnot json\n")
    r = run("policy", "replay", "--audit", str(garbled), "--policy", str(policy_path))
    assert r.returncode == 2 and f"{garbled}:2" in r.stderr
