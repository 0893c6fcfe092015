"""The whole stack in the hermetic world: the kernel guard on the sandbox's veth, the gateway's DNS for names,
the mark-and-redirect into the real transparent gateway, and drop reports landing in the gateway's audit log.

The sandbox has no hosts file: it learns addresses only from the gateway's DNS, reaches allowed HTTPS only
through the gateway, and anything else it sends (QUIC here) is dropped in the kernel and audited."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

import ebpf
from tests.gateway.harness import RunningGateway, gateway_process, hosts_for_sandbox, request
from tests.support.world import World

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


