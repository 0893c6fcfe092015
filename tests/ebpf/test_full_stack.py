"""The whole stack in the hermetic world: the kernel guard on the sandbox's veth, the gateway's DNS for names,
the mark-and-redirect into the real transparent gateway, and drop reports landing in the gateway's audit log.

The sandbox has no hosts file: it learns addresses only from the gateway's DNS, reaches allowed HTTPS only
through the gateway, and anything else it sends (QUIC here) is dropped in the kernel and audited."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ebpf
from tests.gateway.harness import PROXY_TOKEN, RunningGateway, gateway_process, hosts_for_sandbox, request
from tests.support.world import World, child_env

pytestmark = [pytest.mark.netns, pytest.mark.gateway]

TPORT = 8085


def _mac(ns: str, ifname: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", ifname], capture_output=True, text=True, check=True)
    return str(json.loads(out.stdout)[0]["address"])


@pytest.fixture(scope="module")
def stack(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    if os.geteuid() != 0:
        pytest.skip("kernel enforcement needs root")
    reason = ebpf.unavailable_reason()
    if reason is not None:
        pytest.skip(f"bcc cannot build the enforcement programs here: {reason}")
    hosts_for_sandbox(world, {})  # names come from the gateway's DNS only
    gw_ns = world.ns_name("gateway")
    with (
        gateway_process(
            world,
            tmp_path_factory.mktemp("stack"),
            "transparent",
            port=TPORT,
            dns={"listen": {"host": world.gateway_ip, "port": 53}},
            extra={"enforcement": {"report_drops": True}},
            redirect=False,  # the guard's own mark-and-redirect does it
        ) as gw,
        ebpf.Guard(
            world.gw_sandbox_if,
            ip=world.sandbox_ip,
            mac=_mac(world.ns_name("sandbox"), world.sandbox_if),
            sandbox_id="sb",
            gateway_ip=world.gateway_ip,
            transparent_port=TPORT,
            proxy_port=3128,
            dns_port=53,
            netns=gw_ns,
        ),
    ):
        yield gw


@pytest.mark.parametrize("client", ["curl", "requests"])
def test_allowed_https_through_guard_dns_and_gateway(world: World, stack: RunningGateway, client: str) -> None:
    stack.mark()
    r = request(world, client, "GET", "https://api.example.test/allowed/x", gateway=stack)
    assert r.status == 200, r
    assert r.json()["server"] == "A"
    (rec,) = stack.records(event="decision", host="api.example.test", phase="request")
    assert rec["sandbox"] == "sb" and rec["upstream_address"] == "198.51.100.10:443"
    assert stack.records(event="decision", phase="dns", host="api.example.test")


_QUIC = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    s.sendto(b"\xc3" + b"\0" * 1199, ("198.51.100.10", 443))
print("sent")
"""


def test_quic_is_dropped_in_the_kernel_and_audited(world: World, stack: RunningGateway) -> None:
    stack.mark()
    assert world.sandbox_python(_QUIC).stdout.strip() == "sent"
    deadline = time.monotonic() + 10
    drops: list[dict[str, object]] = []
    while not drops and time.monotonic() < deadline:
        time.sleep(0.2)
        drops = stack.records(event="security", kind="packet_dropped")
    assert drops, stack.log_text()[-2000:]
    assert drops[0]["reason"] == "quic" and drops[0]["sandbox"] == "sb"
    assert drops[0]["destination"] == "198.51.100.10" and drops[0]["port"] == 443


def test_names_outside_the_policy_do_not_resolve(world: World, stack: RunningGateway) -> None:
    r = request(world, "curl", "GET", "https://not-in-policy.example.test/", gateway=stack)
    assert r.status is None and "resolve" in r.error.lower()


def test_process_sandbox_reaches_only_the_real_gateway(world: World, tmp_path: Path) -> None:
    """A process sandbox (cgroup guard) uses the explicit proxy with its token: that works through the real
    gateway; a direct connection anywhere else is refused by the connect hook."""
    if os.geteuid() != 0 or ebpf.unavailable_reason() is not None:
        pytest.skip("kernel enforcement needs root and bcc")
    cg = Path(ebpf.cgroup2_root()) / f"{world.prefix}-fullstack"
    cg.mkdir()
    spec = ebpf.SandboxSpec(
        "tok", ip=world.gateway_ip, gateway_ip=world.gateway_ip, transparent_port=TPORT + 1, proxy_port=3133
    )
    try:
        with (
            gateway_process(world, tmp_path, "explicit", port=3133) as gw,
            ebpf.CgroupGuard(str(cg), spec, netns=world.ns_name("gateway")),
        ):
            gw.mark()
            code = (
                "import json, os, subprocess\n"
                f"open('{cg}/cgroup.procs', 'w').write(str(os.getpid()))\n"
                f"fd = os.open('/run/netns/{world.ns_name('gateway')}', os.O_RDONLY); os.setns(fd, os.CLONE_NEWNET)\n"
                "def curl(*args):\n"
                "    p = subprocess.run(['curl', '-q', '-sS', '--connect-timeout', '3', '-m', '10', '--cacert',\n"
                f"                        '{gw.trust_bundle}', *args], capture_output=True, text=True)\n"
                "    return p.stdout or p.stderr\n"
                "print(json.dumps({\n"
                f"    'proxied': curl('-x', 'http://agent:{PROXY_TOKEN}@{world.gateway_ip}:3133', 'https://other.example.test/p'),\n"
                "    'direct': curl('--noproxy', '*', '--resolve', 'other.example.test:443:198.51.100.11',\n"
                "                  'https://other.example.test/d'),\n"
                "}))\n"
            )
            proc = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=child_env()
            )
            assert proc.returncode == 0, proc.stderr
            out = json.loads(proc.stdout)
            assert out["proxied"].startswith("{"), out
            assert json.loads(out["proxied"])["server"] == "B", out
            assert out["direct"].startswith("curl: ") and '"server"' not in out["direct"], out  # never left the host
            (rec,) = gw.records(event="decision", host="other.example.test")
            assert rec["sandbox"] == "tok" and rec["verdict"] == "allow"
    finally:
        with contextlib.suppress(OSError):
            cg.rmdir()
