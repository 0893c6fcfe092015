"""Durability `strict` in the addon (a response's end waits for its record's fsync), and `kill -9` of the real
gateway under load: the chain it leaves verifies (a torn tail is allowed and reported), with `strict` every
response a client received has its record, and a restart continues the chain with a recovery record.

Load: a client process in the sandbox namespace with several threads, each on its own keep-alive connection
through the explicit gateway to the echo upstream, every request carrying its own id in the path. The client
prints each id once it has read the whole response (status and body); the test kills the gateway mid-load.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import tflow

from gateway.addon import EgressAddon, GatewayState, _FlowInfo
from gateway.audit import AuditLog, read_records
from gateway.config import ResolverConfig
from gateway.policies import Identity, facts_from_url, load_policy
from gateway.resolver import Resolver
from tests.gateway.harness import gateway_process
from tests.support.world import GATEWAY_SANDBOX_IP, World

POLICY = Path(__file__).parents[1] / "policies" / "fixtures" / "decide.yaml"
THREADS = 6
KILL_AFTER = 150  # responses received before the kill
CUBE_EGRESS = str(Path(sys.executable).with_name("cube-egress"))

_CLIENT = r"""
import http.client, json, sys, threading, time
host, port, threads, tag = json.loads(sys.argv[1])
lock = threading.Lock()

def worker(t):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    end = time.monotonic() + 30
    i = 0
    while time.monotonic() < end:
        rid = f"{tag}-{t}-{i}"
        i += 1
        try:
            conn.request("GET", f"http://api.example.test/allowed/{rid}")
            r = conn.getresponse()
            body = r.read()
        except Exception as e:  # the gateway is gone
            with lock:
                print("ERR", rid, type(e).__name__, flush=True)
            return
        ok = r.status == 200 and json.loads(body)["path"] == f"/allowed/{rid}"
        with lock:
            print("OK" if ok else f"BAD{r.status}", rid, flush=True)

ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
"""


# -- the addon: what strict changes -----------------------------------------------------------------------------


def _addon(log: AuditLog) -> tuple[EgressAddon, Any]:
    policy = load_policy([str(POLICY)])
    addon = EgressAddon(GatewayState(policy, Resolver(ResolverConfig()), log, transparent=False))
    url = "https://api.github.com/user"
    flow = tflow.tflow(resp=True)
    addon.client_connected(flow.client_conn)
    flow.metadata["cube_egress"] = _FlowInfo(
        policy.decide(Identity("sb", "t"), facts_from_url("GET", url)), facts_from_url("GET", url)
    )
    return addon, flow


def test_strict_response_hook_returns_only_once_the_record_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"), durability="strict")
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        time.sleep(0.2)  # a slow disk: without the wait, the hook would return long before this completes
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    addon, flow = _addon(log)
    asyncio.run(addon.response(flow))
    (record,) = [r for r in read_records([tmp_path / "audit.jsonl"]) if r.get("host") == "api.github.com"]
    assert log.durable_seq >= record["seq"]
    log.close()


def test_batched_response_hook_does_not_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"), durability="batched", batch_ms=10_000)
    addon, flow = _addon(log)
    asyncio.run(addon.response(flow))
    assert log.durable_seq < log.last_seq  # the hook returned with its record written, not yet fsynced
    log.close()


@pytest.mark.parametrize(
    ("version", "method", "status", "headers", "framing"),
    [
        ("HTTP/1.1", "GET", 200, {"content-length": "7"}, "chunked"),  # would end with its last byte: re-framed
        ("HTTP/1.1", "GET", 200, {"transfer-encoding": "chunked"}, "chunked"),  # its end is the last chunk
        ("HTTP/1.0", "GET", 200, {"content-length": "7"}, "buffered"),  # no chunked in 1.0: held whole
        ("HTTP/1.1", "HEAD", 200, {"content-length": "7"}, "unchanged"),  # no body: sent after the hook anyway
        ("HTTP/1.1", "GET", 304, {}, "unchanged"),
        ("HTTP/2.0", "GET", 200, {"content-length": "7"}, "unchanged"),  # END_STREAM comes after the hook
    ],
)
def test_strict_holds_back_the_end_of_a_streamed_response(
    tmp_path: Path, version: str, method: str, status: int, headers: dict[str, str], framing: str
) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"), durability="strict")
    addon, flow = _addon(log)
    flow.request.http_version = version
    flow.request.method = method
    flow.response.status_code = status
    flow.response.headers.clear()
    for k, v in headers.items():
        flow.response.headers[k] = v
    addon.responseheaders(flow)
    info = flow.metadata["cube_egress"]
    if framing == "chunked":
        assert flow.response.stream is info.stream and "content-length" not in flow.response.headers
        assert flow.response.headers["transfer-encoding"] == "chunked"
    elif framing == "buffered":
        assert flow.response.stream is False and info.buffered
    else:
        assert dict(flow.response.headers) == headers and flow.response.stream is info.stream
    log.close()


# -- kill -9 -------------------------------------------------------------------------------------------------


def _load_until_kill(world: World, proc: subprocess.Popen[Any], port: int, tag: str) -> list[str]:
    """Run the client, SIGKILL the gateway after KILL_AFTER responses; returns every id whose response arrived."""
    client = world.popen(
        "sandbox",
        [sys.executable, "-c", _CLIENT, json.dumps([GATEWAY_SANDBOX_IP, port, THREADS, tag])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while sum(line.startswith("OK ") for line in lines) < KILL_AFTER:
            assert time.monotonic() < deadline, f"load did not get {KILL_AFTER} responses: {lines[-5:]}"
            ready, _, _ = select.select([client.stdout], [], [], 1.0)
            if ready:
                line = client.stdout.readline()
                assert line, f"the client ended early: {lines[-5:]} {client.stderr.read() if client.stderr else ''}"
                lines.append(line.strip())
        proc.send_signal(signal.SIGKILL)  # mid-load: every thread has a request in flight
        proc.wait(10)
        rest, _ = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    lines += rest.splitlines()
    bad = [line for line in lines if line.startswith("BAD")]
    assert not bad, bad
    assert any(line.startswith("ERR") for line in lines), "no request failed: was the gateway killed?"
    return [line.split()[1] for line in lines if line.startswith("OK ")]


def _verify(state: Path) -> dict[str, Any]:
    files = sorted(str(p) for p in state.glob("audit*.jsonl"))
    proc = subprocess.run(
        [CUBE_EGRESS, "audit", "verify", "--json", *files], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["ok"] and out["signatures_checked"] and out["first_seq"] == 1, out
    return out


def _audited_ids(state: Path, tag: str) -> set[str]:
    prefix = f"/allowed/{tag}-"
    return {
        r["path"].removeprefix("/allowed/")
        for r in read_records(state.glob("audit*.jsonl"))
        if r.get("event") == "decision"
        and str(r.get("path", "")).startswith(prefix)
        and r.get("upstream_status") == 200
    }


@pytest.mark.netns
@pytest.mark.gateway
@pytest.mark.parametrize("durability", ["strict", "batched"])
def test_kill_9_under_load_leaves_a_chain_that_verifies(world: World, tmp_path: Path, durability: str) -> None:
    audit = {"durability": durability, "rotate_bytes": 16384, "checkpoint_records": 40}
    port = 3140 if durability == "strict" else 3141
    with gateway_process(world, tmp_path, "explicit", port=port, extra={"audit": audit}) as gw:
        assert gw.proc is not None
        received = _load_until_kill(world, gw.proc, port, "k9")
    state = gw.state_dir
    out = _verify(state)
    assert not out["closed"] and len(out["files"]) >= 2, out  # killed, and rotated under load
    assert any("does not end with a clean shutdown" in n for n in out["notes"])
    audited = _audited_ids(state, "k9")
    if durability == "strict":
        missing = sorted(set(received) - audited)
        assert not missing, f"{len(missing)} responses reached the client without their record: {missing[:5]}"
        assert len(received) >= KILL_AFTER
    else:
        return  # a restart is the same in every mode: checked once

    # The next start continues the chain: a recovery record, then a clean shutdown with its checkpoint.
    with gateway_process(world, tmp_path, "explicit", port=port, extra={"audit": audit}) as gw:
        assert gw.proc is not None
        r = world.curl(
            ["-o", "/dev/null", "-w", "%{http_code}", "http://api.example.test/allowed/after-restart"],
            proxy=gw.proxy_url,
        )
        assert r.stdout == "200", r
        gw.proc.send_signal(signal.SIGTERM)
        gw.proc.wait(20)
    out = _verify(state)
    assert out["closed"] and out["unsigned"] == 0 and len(out["recoveries"]) == 1, out
    assert "after-restart" in _audited_ids(state, "after")
