"""Loading and validation: every broken input has its own fixture, and every error names file:line:col."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import pytest

from gateway.policies import PolicyError, load_policy

FIXTURES = Path(__file__).parent / "fixtures"
BROKEN = sorted((FIXTURES / "broken").glob("*.yaml"))
REPO = Path(__file__).parents[2]


def _expectation(path: Path) -> tuple[int, int, list[str]]:
    first = path.read_text().splitlines()[0]
    m = re.match(r"# expect: (\d+):(\d+) (.*)", first)
    assert m, f"{path} must start with '# expect: LINE:COL message | more'"
    return int(m[1]), int(m[2]), [p.strip() for p in m[3].split("|")]


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_fixture_reports_position_and_message(path: Path) -> None:
    line, col, fragments = _expectation(path)
    with pytest.raises(PolicyError) as exc:
        load_policy([str(path)])
    rendered = [str(i) for i in exc.value.issues]
    matching = [r for r in rendered if f"{path}:{line}:{col}:" in r]
    assert matching, f"no issue at {line}:{col}; got:\n" + "\n".join(rendered)
    for fragment in fragments:
        assert any(fragment in r for r in matching), f"{fragment!r} not in {matching}"


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    p = tmp_path / "many.yaml"
    p.write_text(
        "version: 1\n"
        "policies:\n"
        "  p:\n"
        "    rules:\n"
        "      - id: a\n"
        "        action: allow\n"
        "        hosts: ['*']\n"
        "      - id: b\n"
        "        action: allow\n"
        "        hosts: [x.example.com]\n"
        "        ports: [0]\n"
        "      - id: c\n"
        "        action: allow\n"
        "        hosts: [y.example.com]\n"
        "        methods: [FETCH]\n"
        "        colour: red\n"
    )
    with pytest.raises(PolicyError) as exc:
        load_policy([str(p)])
    text = str(exc.value)
    # The unknown key is a structural error found first; semantic errors of the other rules still need the
    # structure to be valid, so fix it and expect the three semantic errors together.
    assert f"{p}:16:9: error: unknown key 'colour' [rule c]" in text
    p.write_text(p.read_text().replace("        colour: red\n", ""))
    with pytest.raises(PolicyError) as exc:
        load_policy([str(p)])
    issues = [str(i) for i in exc.value.issues]
    assert len(issues) == 3, issues
    assert any(f"{p}:7:17:" in i and "[rule a]" in i for i in issues)
    assert any(f"{p}:11:17:" in i and "[rule b]" in i for i in issues)
    assert any(f"{p}:15:19:" in i and "[rule c]" in i for i in issues)


def test_errors_in_included_files_carry_their_own_file(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "version: 1\npolicies:\n  base:\n    rules:\n      - id: x\n        action: allow\n        hosts: ['*.com']\n"
    )
    (tmp_path / "team.yaml").write_text("version: 1\ninclude: [base.yaml]\n")
    with pytest.raises(PolicyError) as exc:
        load_policy([str(tmp_path / "team.yaml")])
    assert f"{tmp_path / 'base.yaml'}:7:17:" in str(exc.value)


def test_include_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("version: 1\ninclude: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("version: 1\ninclude: [a.yaml]\n")
    with pytest.raises(PolicyError, match="include cycle"):
        load_policy([str(tmp_path / "a.yaml")])


def test_shared_base_is_loaded_once_through_two_includes(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "version: 1\npolicies:\n  base:\n    rules:\n"
        "      - id: x\n        action: deny\n        hosts: [a.example.com]\n"
    )
    (tmp_path / "t1.yaml").write_text("version: 1\ninclude: [base.yaml]\n")
    (tmp_path / "t2.yaml").write_text("version: 1\ninclude: [base.yaml]\n")
    policy = load_policy([str(tmp_path / "t1.yaml"), str(tmp_path / "t2.yaml")])
    assert policy.rule_count == 1


def test_policy_hash_changes_with_content_only(tmp_path: Path) -> None:
    text = "version: 1\npolicies:\n  p:\n    rules:\n      - {id: x, action: allow, hosts: [a.example.com]}\n"
    (tmp_path / "p.yaml").write_text(text)
    h1 = load_policy([str(tmp_path / "p.yaml")]).policy_hash
    (tmp_path / "p.yaml").write_text("# a comment\n" + text)
    assert load_policy([str(tmp_path / "p.yaml")]).policy_hash == h1
    (tmp_path / "p.yaml").write_text(text.replace("a.example.com", "b.example.com"))
    assert load_policy([str(tmp_path / "p.yaml")]).policy_hash != h1


def test_example_policies_are_valid() -> None:
    files = sorted(glob.glob(os.path.join(REPO, "policies", "*.yaml")))
    assert files
    policy = load_policy(files)
    assert "local-dev" in policy.sandboxes


def test_a_warning_does_not_drop_its_rule(tmp_path: Path) -> None:
    p = tmp_path / "w.yaml"
    p.write_text(
        "version: 1\ncredentials:\n  c: {secret: s, injector: {kind: header, header: X-Key}}\n"
        "policies:\n  p:\n    rules:\n"
        "      - {id: r, action: allow, hosts: [h.example.com], schemes: [http], credential: c,"
        " allow_credential_over_http: true}\n"
    )
    from gateway.policies import PolicyIssue

    warnings: list[PolicyIssue] = []
    policy = load_policy([str(p)], warnings=warnings)
    assert [w.message for w in warnings] == ["this rule sends a credential over plain HTTP"]
    assert policy.rule_count == 1
