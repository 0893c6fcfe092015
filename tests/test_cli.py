"""The command line: policy check / explain / test, and the README's run command on its embedded default."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.world import World

REPO = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("cube-egress"))
BROKEN = REPO / "tests" / "policies" / "fixtures" / "broken"


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_check_example_policies() -> None:
    files = sorted(str(p) for p in (REPO / "policies").glob("*.yaml"))
    r = cli("policy", "check", *files)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: ")


def test_check_reports_every_error_of_every_file() -> None:
    files = sorted(BROKEN.glob("*.yaml"))
    r = cli("policy", "check", *map(str, files))
    assert r.returncode == 1
    for f in files:
        line, col = f.read_text().splitlines()[0].split()[2].split(":")
        assert f"{f}:{line}:{col}: error:" in r.stderr, f.name


def test_explain_json() -> None:
    r = cli(
        "policy",
        "explain",
        "--policy",
        "policies/sandboxes.yaml",
        "--sandbox",
        "local-dev",
        "--method",
        "POST",
        "--url",
        "https://api.openai.com/v1/files",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["verdict"], out["rule"], out["reason"], out["passes"]) == (
        "deny",
        "openai-no-file-upload",
        "denied_by_rule",
        False,
    )
    assert out["connection"]["handling"] == "intercepted"


def test_explain_text_and_unknown_sandbox() -> None:
    r = cli(
        "policy",
        "explain",
        "--policy",
        "policies/sandboxes.yaml",
        "--sandbox",
        "local-dev",
        "--url",
        "https://files.pythonhosted.org/x",
    )
    assert r.returncode == 0 and "rule:       pypi" in r.stdout and "connection: spliced" in r.stdout
    r = cli("policy", "explain", "--policy", "policies/sandboxes.yaml", "--sandbox", "nope", "--url", "https://x.org/")
    assert r.returncode == 2 and "unknown sandbox 'nope'" in r.stderr


def test_policy_test_passes_on_examples() -> None:
    r = cli("policy", "test", "policies/tests/cases.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("0 failed")


def test_policy_test_shows_a_diff_on_mismatch(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        f"version: 1\npolicy: [{REPO / 'policies' / 'sandboxes.yaml'}]\ncases:\n"
        "  - name: wrong expectation\n    sandbox: local-dev\n    method: POST\n"
        "    url: https://api.openai.com/v1/files\n    expect: {verdict: allow, rule: openai-api}\n"
    )
    r = cli("policy", "test", str(cases))
    assert r.returncode == 1
    assert "- expected verdict: allow" in r.stdout and "+ actual   verdict: deny" in r.stdout
    assert "+ actual   rule: openai-no-file-upload" in r.stdout


def test_run_rejects_a_broken_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("version: 1\npolicies: [p.yaml]\nlisten: {hots: x}\n")
    r = cli("run", "--config", str(cfg))
    assert r.returncode == 2
    assert f"{cfg}:3:" in r.stderr and "unknown key" in r.stderr


def test_run_refuses_a_broken_policy_with_file_line_col(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text((BROKEN / "bad_cidr.yaml").read_text())
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"version: 1\npolicies: [p.yaml]\nstate_dir: {tmp_path / 'state'}\n")
    r = cli("run", "--config", str(cfg))
    assert r.returncode == 1, r.stderr  # like `policy check`: the policy is wrong, not the command
    assert f"{policy}:" in r.stdout + r.stderr


@pytest.mark.netns
def test_readme_run_command_default(world: World, tmp_path: Path) -> None:
    """README command (1): the embedded default proxies to an allowed local upstream and refuses the rest.

    Run on the loopback of the world's gateway namespace, so nothing binds the machine's own 127.0.0.1:3128."""
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    upstream = world.popen(
        "gateway",
        [sys.executable, "-m", "http.server", "9000", "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        gw = world.popen("gateway", [EXE, "run"], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        world.wait_listening("gateway", 9000)
        world.wait_listening("gateway", 3128, timeout=30)
        proxy = [
            "curl",
            "-q",
            "-sS",
            "-m",
            "10",
            "-x",
            "http://127.0.0.1:3128",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ]
        ok = world.run("gateway", [*proxy, "http://127.0.0.1:9000/"])
        assert ok.stdout == "200", ok
        denied = world.run("gateway", [*proxy, "http://example.com/"])
        assert denied.stdout == "403", denied
        # The development policy injects a credential from the file backend on this path (http.server: 404).
        injected = world.run("gateway", [*proxy, "http://localhost:9000/with-credential/x"])
        assert injected.stdout == "404", injected
        text = log.read_text()
        assert "DEVELOPMENT ONLY" in text
        records = [json.loads(x) for x in (tmp_path / ".cube-egress" / "audit.jsonl").read_text().splitlines()]
        decisions = [r for r in records if r["event"] == "decision"]
        assert [(r["host"], r["verdict"]) for r in decisions] == [
            ("127.0.0.1", "allow"),
            ("example.com", "deny"),
            ("localhost", "allow"),
        ]
        assert decisions[2]["credential"] == "local-demo" and len(decisions[2]["credential_fingerprint"]) == 32
        audit_text = (tmp_path / ".cube-egress" / "audit.jsonl").read_text()
        for secret in ("dev-openai-key-not-real", "dev-github-token-not-real", "dev-local-demo-token-0123"):
            assert secret not in text and secret not in audit_text
    finally:
        world.stop(gw)
        world.stop(upstream)


def test_policy_test_fails_on_unknown_sandbox_and_checks_explicit_nulls(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        f"version: 1\npolicy: [{REPO / 'policies' / 'sandboxes.yaml'}]\ncases:\n"
        "  - {name: typo, sandbox: lcoal-dev, url: 'https://example.net/', expect: {verdict: deny}}\n"
        "  - {name: no rule, sandbox: local-dev, url: 'https://pypi.org/', expect: {rule: null}}\n"
    )
    r = cli("policy", "test", str(cases))
    assert r.returncode == 1
    assert "FAIL typo: unknown sandbox 'lcoal-dev'" in r.stdout
    assert "FAIL no rule" in r.stdout and "+ actual   rule: pypi" in r.stdout
    assert "0 passed, 2 failed" in r.stdout
