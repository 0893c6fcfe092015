"""Admin changes in the audit ledger: every registration, replacement, unregistration and reload (also a refused
one) through the real admin API, in-process and by SIGHUP leaves exactly one `admin` record saying what changed and
who did it; the records chain and verify like any other; no token or token hash ever reaches the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import chain_files, read_records
from gateway.audit import fields as F
from gateway.cli import main
from gateway.policies import SandboxDTO
from tests.admin.conftest import SANDBOX_TOKEN, LocalGateway, local_gateway, write_config

pytestmark = pytest.mark.gateway

TOKEN_SHA256 = hashlib.sha256(SANDBOX_TOKEN.encode()).hexdigest()


def audit_files(tmp: Path) -> list[Path]:
    return chain_files(str(tmp / "state" / "audit.jsonl"))


def admin_records(tmp: Path) -> list[dict[str, Any]]:
    return [r for r in read_records(audit_files(tmp)) if r[F.EVENT] == F.EVENT_ADMIN]


def verify(tmp: Path) -> dict[str, Any]:
    """`cube-egress audit verify --json` on the gateway's log (its key is next to the files)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["audit", "verify", "--json", *map(str, audit_files(tmp))])
    report: dict[str, Any] = json.loads(out.getvalue())
    assert code == 0, report
    return report


def assert_no_token_in_the_ledger(tmp: Path) -> None:
    for path in audit_files(tmp):
        text = path.read_text()
        assert SANDBOX_TOKEN not in text and TOKEN_SHA256 not in text, path


def edit_policy(g: LocalGateway, old: str, new: str) -> None:
    text = g.policy_path.read_text()
    assert old in text
    g.policy_path.write_text(text.replace(old, new, 1))


def test_admin_api_changes_are_audited_in_order(tmp_path: Path) -> None:
    with local_gateway(tmp_path) as g, g.unix() as unix, g.tcp() as tcp:
        hash0 = g.gateway.policies.policy.policy_hash
        r = unix.put(
            "/v1/sandboxes/audit-sb",
            json={
                "policies": ["local"],
                "sources": ["127.0.0.7/32"],
                "labels": {"vm": "clone-7"},
                "limits": {"requests_per_minute": 100},
                "token": SANDBOX_TOKEN,
            },
        )
        assert r.status_code == 201, r.text
        r = tcp.put(
            "/v1/sandboxes/audit-sb",
            json={"policies": ["local", "quiet"], "sources": ["127.0.0.8/32"], "default_mode": "report"},
        )
        assert r.status_code == 200, r.text
        r = tcp.delete("/v1/sandboxes/audit-sb")
        assert r.status_code == 200 and r.json()["leases_revoked"] == 0
        edit_policy(g, '"/forbidden/**"', '"/forbidden-too/**"')
        r = unix.post("/v1/policy/reload")
        assert r.status_code == 200
        hash1 = r.json()["policy_hash"]
        assert hash1 != hash0
        edit_policy(g, "cidrs: [127.0.0.0/8]", "cidrs: [127.0.0.0/33]")
        edit_policy(g, "policies: [local, quiet]", "policies: [local, quiet, nope]")
        r = unix.post("/v1/policy/reload")
        assert r.status_code == 422 and len(r.json()["issues"]) == 2
        locations = [i["location"] for i in r.json()["issues"]]
        # Refused changes write nothing: a conflict and an invalid registration.
        clash = unix.put("/v1/sandboxes/clash", json={"policies": ["local"], "sources": ["127.0.0.1/32"]})
        invalid = unix.put("/v1/sandboxes/bad", json={"policies": ["nope"], "sources": ["127.0.0.9/32"]})
        assert (clash.status_code, invalid.status_code) == (409, 422)
        assert unix.delete("/v1/sandboxes/never-registered").status_code == 404

        # Admin records are not decisions: the recent-decisions ring and the decision counter ignore them.
        assert unix.get("/v1/decisions").json()["decisions"] == []
        counted = [s for m in g.gateway.metrics.decisions_total.collect() for s in m.samples]
        assert sum(s.value for s in counted if s.name.endswith("_total")) == 0

    records = admin_records(tmp_path)
    assert [(r[F.ACTION], r[F.VIA]) for r in records] == [
        ("sandbox_registered", "admin_api"),
        ("sandbox_replaced", "admin_api"),
        ("sandbox_unregistered", "admin_api"),
        ("policy_reloaded", "admin_api"),
        ("policy_reload_failed", "admin_api"),
    ]
    registered, replaced, unregistered, reloaded, failed = records
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    assert registered[F.PEER] == "unix" and reloaded[F.PEER] == "unix" and failed[F.PEER] == "unix"
    for record in (replaced, unregistered):
        host, _, port = record[F.PEER].rpartition(":")
        assert host == "127.0.0.1" and 0 < int(port) < 65536  # the TCP client
    expected_registration: dict[str, Any] = {
        F.SANDBOX: "audit-sb",
        F.SOURCES: ["127.0.0.7/32"],
        F.POLICIES: ["local"],
        F.LABELS: {"vm": "clone-7"},
        F.DEFAULT_MODE: "enforce",
        F.LIMITS: {"requests_per_minute": 100, "mode": "enforce"},
        F.HAS_TOKEN: True,
        F.POLICY_HASH: hash0,
    }
    assert {k: registered[k] for k in expected_registration} == expected_registration
    replacement: dict[str, Any] = {
        F.SANDBOX: "audit-sb",
        F.SOURCES: ["127.0.0.8/32"],
        F.POLICIES: ["local", "quiet"],
        F.LABELS: {},
        F.DEFAULT_MODE: "report",
        F.LIMITS: None,
        F.HAS_TOKEN: False,
        F.POLICY_HASH: hash0,
    }
    assert {k: replaced[k] for k in replacement} == replacement
    assert {k: unregistered[k] for k in replacement} == replacement  # what was removed
    assert unregistered[F.LEASES_REVOKED] == 0
    assert F.LEASES_REVOKED not in replaced
    assert (reloaded[F.OLD_POLICY_HASH], reloaded[F.POLICY_HASH], reloaded[F.SANDBOXES]) == (hash0, hash1, 1)
    assert reloaded[F.RULE_COUNT] == 4 and F.ERRORS not in reloaded
    assert (failed[F.OLD_POLICY_HASH], failed[F.POLICY_HASH], failed[F.RULE_COUNT]) == (hash1, hash1, 4)
    assert failed[F.ERRORS] == 2 and failed[F.ERROR_LOCATIONS] == locations
    assert all(loc.startswith(str(g.policy_path) + ":") for loc in locations)
    report = verify(tmp_path)
    assert report["records"] >= len(records) + 2  # header, admin records, closing checkpoint
    assert_no_token_in_the_ledger(tmp_path)


def test_in_process_changes_are_audited_and_an_id_being_unregistered_cannot_come_back(tmp_path: Path) -> None:
    with local_gateway(tmp_path) as g:
        gateway = g.gateway
        spec = SandboxDTO(id="py-sb", policies=["local"], sources=["127.0.0.9/32"], token_sha256=TOKEN_SHA256)
        assert g.call(asyncio.to_thread(gateway.add_sandbox, spec)) is True
        # Hold the lease revocation of the unregistration, as a slow secret store would.
        release = asyncio.Event()
        real = gateway.unregister_sandbox

        async def slow_unregister(sandbox_id: str) -> int:
            await release.wait()
            return await real(sandbox_id)

        gateway.unregister_sandbox = slow_unregister  # type: ignore[method-assign]
        removing = asyncio.run_coroutine_threadsafe(gateway.remove_sandbox("py-sb"), g.loop)
        with g.unix() as c:
            deadline = time.monotonic() + 10
            while c.get("/v1/sandboxes/py-sb").status_code != 404:  # the policy change comes first
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = c.put("/v1/sandboxes/py-sb", json={"policies": ["local"], "sources": ["127.0.0.9/32"]})
            assert r.status_code == 409 and "being unregistered" in r.json()["issues"][0]["message"]
            g.loop.call_soon_threadsafe(release.set)
            assert removing.result(10) == 0
            r = c.put("/v1/sandboxes/py-sb", json={"policies": ["local"], "sources": ["127.0.0.9/32"]})
            assert r.status_code == 201
    records = admin_records(tmp_path)
    assert [(r[F.ACTION], r[F.VIA], r.get(F.PEER)) for r in records] == [
        ("sandbox_registered", "python", None),
        ("sandbox_unregistered", "python", None),
        ("sandbox_registered", "admin_api", "unix"),
    ]
    assert records[0][F.HAS_TOKEN] is True and records[2][F.HAS_TOKEN] is False
    verify(tmp_path)
    assert_no_token_in_the_ledger(tmp_path)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def gateway_process(tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`cube-egress run` as operators run it (SIGHUP handlers need the main thread of their own process)."""
    cfg, port = write_config(tmp)
    exe = str(Path(sys.executable).with_name("cube-egress"))
    with open(tmp / "gateway.log", "wb") as log:
        proc = subprocess.Popen([exe, "run", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not _listening(port):  # the signal handlers are installed before the proxy listens
            assert proc.poll() is None, (tmp / "gateway.log").read_text()
            assert time.monotonic() < deadline, "the gateway did not listen within 30 s"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_admin_records(tmp: Path, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while len(records := admin_records(tmp)) < n:
        assert time.monotonic() < deadline, records
        time.sleep(0.05)
    return records


def test_sighup_reload_is_audited(tmp_path: Path) -> None:
    with gateway_process(tmp_path) as proc:
        policy = tmp_path / "policy.yaml"
        policy.write_text(policy.read_text().replace('"/forbidden/**"', '"/forbidden-too/**"'))
        os.kill(proc.pid, signal.SIGHUP)
        [reloaded] = _wait_for_admin_records(tmp_path, 1)
        policy.write_text(policy.read_text().replace("cidrs: [127.0.0.0/8]", "cidrs: [127.0.0.0/33]"))  # two rules
        os.kill(proc.pid, signal.SIGHUP)
        _, failed = _wait_for_admin_records(tmp_path, 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert (reloaded[F.ACTION], reloaded[F.VIA], reloaded[F.SANDBOXES]) == ("policy_reloaded", "sighup", 1)
    assert F.PEER not in reloaded and reloaded[F.OLD_POLICY_HASH] != reloaded[F.POLICY_HASH]
    assert (failed[F.ACTION], failed[F.VIA], failed[F.ERRORS]) == ("policy_reload_failed", "sighup", 2)
    assert failed[F.POLICY_HASH] == failed[F.OLD_POLICY_HASH] == reloaded[F.POLICY_HASH]
    assert [loc.rsplit(":", 2)[0] for loc in failed[F.ERROR_LOCATIONS]] == [str(policy)] * 2
    verify(tmp_path)
