"""End to end: the tc guard on the host side of the world's sandbox veth, and the cgroup programs.

Needs root and a kernel bcc can compile for; skipped otherwise with the exact reason. Every test observes the
kernel's own report (ring-buffer event and counter), not just a failed client, so a test cannot pass because
something else (ip_forward=0, a missing route) happened to stop the packet.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.world import NAME_PREFIX, World, child_env

from . import frames

ebpf = pytest.importorskip("ebpf")

pytestmark = pytest.mark.netns

TPORT = 15001  # the gateway's transparent listener in these tests
PROXY_PORT = 3128
RELAY = Path(__file__).with_name("relay.py")


@pytest.fixture(scope="module")
def ebpf_ready() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel enforcement tests need root")
    t0 = time.monotonic()
    reason = ebpf.unavailable_reason()
    if reason is not None:
        pytest.skip(f"bcc cannot build the enforcement programs here: {reason}")
    print(f"ebpf: compile+load probe {time.monotonic() - t0:.2f}s")


def _mac(ns: str, ifname: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", ifname], capture_output=True, text=True, check=True)
    return str(json.loads(out.stdout)[0]["address"])


def _cxe_objects() -> tuple[set[str], set[str]]:
    """Names+ids of loaded cxe_ programs and maps (bpftool), to prove nothing is left behind."""
    out = []
    for kind in ("prog", "map"):
        proc = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True, check=True)
        out.append(
            {f"{o.get('name')}#{o['id']}" for o in json.loads(proc.stdout) if str(o.get("name", "")).startswith("cxe_")}
        )
    return out[0], out[1]


def _wait_gone(before: tuple[set[str], set[str]], timeout: float = 5) -> tuple[set[str], set[str]]:
    deadline = time.monotonic() + timeout
    while True:
        progs, maps = _cxe_objects()
        extra = (progs - before[0], maps - before[1])
        if not (extra[0] or extra[1]) or time.monotonic() > deadline:  # freed after an RCU grace period
            return extra
        time.sleep(0.05)


# -- attach/detach hygiene (first: nothing else of ours is attached yet) ---------------------------------------


def test_attach_detach_leaves_nothing(ebpf_ready: None) -> None:
    ns = f"{NAME_PREFIX}{os.getpid()}y-eb"
    before = _cxe_objects()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    cg = Path(ebpf.cgroup2_root()) / f"{NAME_PREFIX}{os.getpid()}y-cg"
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "name", "h0", "type", "veth", "peer", "name", "s0"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.9.0.1/24", "dev", "h0"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "h0", "up"], check=True)
        cg.mkdir()
        from gateway.cli import main

        args = [
            "sandbox",
            "attach",
            "--netns",
            ns,
            "--iface",
            "h0",
            "--ip",
            "10.9.0.2",
            "--mac",
            "02:00:00:00:00:02",
            "--id",
            "hygiene",
            "--transparent-port",
            str(TPORT),
        ]
        t0 = time.monotonic()
        assert main(args) == 0
        first = time.monotonic() - t0
        t0 = time.monotonic()
        assert main(args) == 0  # attaching twice is harmless
        second = time.monotonic() - t0
        print(f"attach (compile+pin) {first:.2f}s, re-attach (pinned) {second:.3f}s")
        filt = subprocess.run(
            ["tc", "-n", ns, "filter", "show", "dev", "h0", "ingress"], capture_output=True, text=True, check=True
        ).stdout
        assert filt.count("handle 0xce1") == 1 and "cxe_tc_guard" in filt, filt
        with ebpf.Enforcer.open(ns, create=False) as enf:
            pins = enf.pinned_objects()
            assert "prog_cxe_tc_guard" in pins and "map_cxe_ifaces" in pins, pins
            pin_dir = enf.pin_dir
            (value,) = enf.interfaces().values()
            assert value.sandbox_id == "hygiene" and value.gateway_ip == "10.9.0.1"  # inferred from h0
            spec = ebpf.SandboxSpec("hygiene-proc", ip="10.9.0.1", gateway_ip="10.9.0.1", transparent_port=TPORT)
            enf.attach_cgroup(str(cg), spec)
            enf.attach_cgroup(str(cg), spec)  # twice: harmless
        assert (
            subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "list", "table", "ip", "cxe_h0"], capture_output=True
            ).returncode
            == 0
        )

        with ebpf.Enforcer.open(ns, create=False) as enf:
            assert enf.detach_cgroup(str(cg))
        assert main(["sandbox", "detach", "--netns", ns, "--iface", "h0"]) == 0
        assert main(["sandbox", "detach", "--netns", ns, "--iface", "h0"]) == 0  # twice: harmless

        qdisc = subprocess.run(
            ["tc", "-n", ns, "qdisc", "show", "dev", "h0"], capture_output=True, text=True, check=True
        ).stdout
        assert "clsact" not in qdisc, qdisc
        ruleset = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "list", "ruleset"], capture_output=True, text=True, check=True
        ).stdout
        assert "cxe_" not in ruleset and "cube_egress" not in ruleset, ruleset
        assert not os.path.exists(pin_dir)
        assert not os.path.exists(ebpf.enforcer.PIN_ROOT) or not any(
            p.name == Path(pin_dir).name for p in Path(ebpf.enforcer.PIN_ROOT).iterdir()
        )
        assert _wait_gone(before) == (set(), set())

        # A sandbox whose interface vanished without a detach (a VM's tap deleted) is still fully cleaned up.
        assert main(args) == 0
        subprocess.run(["ip", "-n", ns, "link", "del", "h0"], check=True)
        assert ebpf.detach_sandbox("h0", netns=ns) is True
        assert not os.path.exists(pin_dir)
        assert (
            "cxe_"
            not in subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "list", "ruleset"], capture_output=True, text=True, check=True
            ).stdout
        )
        assert _wait_gone(before) == (set(), set())
    finally:
        with contextlib.suppress(OSError):
            cg.rmdir()
        subprocess.run(["ip", "netns", "del", ns], check=False)


# -- the guarded world -----------------------------------------------------------------------------------------


class Sandbox:
    def __init__(self, world: World, guard: ebpf.Guard, reader: ebpf.EventReader, mac: str, gw_mac: str) -> None:
        self.world = world
        self.guard = guard
        self.reader = reader
        self.mac = mac
        self.gw_mac = gw_mac

    def expect(
        self, code: ebpf.Code, match: Callable[[ebpf.DropEvent], bool] = lambda e: True, timeout: float = 3
    ) -> ebpf.DropEvent:
        """Wait for a drop report with ``code`` (and ``match``); fail with everything that arrived instead."""
        seen: list[ebpf.DropEvent] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.reader.wait(max(0.0, deadline - time.monotonic())):
                if ev.code is code and match(ev):
                    return ev
                seen.append(ev)
        raise AssertionError(f"no {code.label} report; got {seen}")

    def send(self, *raw: bytes) -> None:
        out = self.world.sandbox_python(frames.sender_code(self.world.sandbox_if, list(raw)))
        assert out.returncode == 0, out.stderr

    def tcp(self, host: str, port: int, timeout: float = 1.5) -> str:
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(({host!r}, {port}), timeout={timeout}).close(); print('connected')\n"
            "except OSError as e:\n"
            "    print(type(e).__name__)\n"
        )
        return self.world.sandbox_python(code).stdout.strip()

    def udp(self, host: str, port: int, wait: float = 1.0) -> str:
        code = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(" + str(wait) + ")\n"
            f"s.sendto(b'hello', ({host!r}, {port}))\n"
            "try:\n"
            "    print(s.recv(100).decode())\n"
            "except OSError as e:\n"
            "    print(type(e).__name__)\n"
        )
        return self.world.sandbox_python(code).stdout.strip()


@pytest.fixture(scope="module")
def sandbox(ebpf_ready: None, world: World) -> Iterator[Sandbox]:
    gw_ns = world.ns_name("gateway")
    mac = _mac(world.ns_name("sandbox"), world.sandbox_if)
    gw_mac = _mac(gw_ns, world.gw_sandbox_if)
    guard = ebpf.Guard(
        world.gw_sandbox_if,
        ip=world.sandbox_ip,
        mac=mac,
        sandbox_id="sb-e2e",
        gateway_ip=world.gateway_ip,
        transparent_port=TPORT,
        proxy_port=PROXY_PORT,
        netns=gw_ns,
    )
    with guard:
        reader = guard.events()
        try:
            yield Sandbox(world, guard, reader, mac, gw_mac)
        finally:
            reader.close()
    qdisc = subprocess.run(
        ["tc", "-n", gw_ns, "qdisc", "show", "dev", world.gw_sandbox_if], capture_output=True, text=True, check=True
    ).stdout
    assert "clsact" not in qdisc


@pytest.fixture
def relay(sandbox: Sandbox) -> Iterator[subprocess.Popen[str]]:
    """The stand-in transparent gateway (tests/ebpf/relay.py) on TPORT in the gateway namespace."""
    w = sandbox.world
    proc = w.popen("gateway", [sys.executable, str(RELAY), str(TPORT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    try:
        yield proc
    finally:
        w.stop(proc)


@pytest.fixture(autouse=True)
def _fresh_reports(request: pytest.FixtureRequest) -> None:
    if "sandbox" in request.fixturenames:
        request.getfixturevalue("sandbox").reader.drain()


def test_allowed_https_through_transparent_gateway(sandbox: Sandbox, relay: subprocess.Popen[str]) -> None:
    w = sandbox.world
    before = sandbox.guard.counters().get(ebpf.Code.PASS_REDIRECT, 0)
    up = w.upstream_ips["A"]
    out = w.curl(["--cacert", str(w.upstream_ca_pem), f"https://{up}/hello"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["server"] == "A"
    assert relay.stdout is not None
    seen = json.loads(relay.stdout.readline())
    assert seen["original"] == [up, 443] and seen["via"] == "so_original_dst"
    assert sandbox.guard.counters()[ebpf.Code.PASS_REDIRECT] > before


def test_gateway_services_allowed(sandbox: Sandbox) -> None:
    """TCP to the proxy port and DNS (UDP) to the gateway's resolver pass the guard."""
    w = sandbox.world
    code = (
        "import socket, threading\n"
        f"t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(('{w.gateway_ip}', "
        f"{PROXY_PORT})); t.listen()\n"
        f"u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('{w.gateway_ip}', 53))\n"
        "print('READY', flush=True)\n"
        "data, peer = u.recvfrom(100); u.sendto(b'answer', peer)\n"
        "c, _ = t.accept(); c.close()\n"
    )
    proc = w.popen("gateway", [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        assert sandbox.udp(w.gateway_ip, 53) == "answer"
        assert sandbox.tcp(w.gateway_ip, PROXY_PORT) == "connected"
    finally:
        w.stop(proc)
    counts = sandbox.guard.counters()
    assert counts.get(ebpf.Code.PASS_DNS, 0) >= 1 and counts.get(ebpf.Code.PASS_GATEWAY, 0) >= 1


def test_gateway_stopped_direct_443_is_dropped(sandbox: Sandbox) -> None:
    up = sandbox.world.upstream_ips["A"]
    assert sandbox.tcp(up, 443) in ("TimeoutError", "timeout")
    ev = sandbox.expect(ebpf.Code.GATEWAY_DOWN, lambda e: e.dst == up and e.dport == 443)
    assert ev.sandbox_id == "sb-e2e" and ev.protocol == "tcp" and ev.src == sandbox.world.sandbox_ip


def test_missing_redirect_is_dropped_even_when_forwarding(sandbox: Sandbox, relay: subprocess.Popen[str]) -> None:
    """With the listener up but the sandbox's redirect gone and ip_forward=1, marked packets die in forward."""
    w = sandbox.world
    gw = w.ns_name("gateway")
    from ebpf import _net

    before = _net.nft_unredirected(gw) or 0
    _net.nft_remove(gw, w.gw_sandbox_if)
    w.run("gateway", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], check=True)
    try:
        assert sandbox.tcp(w.upstream_ips["B"], 443) in ("TimeoutError", "timeout")
        assert (_net.nft_unredirected(gw) or 0) > before
    finally:
        w.run("gateway", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"], check=True)
        sandbox.guard.attach()  # re-attach: restores the redirect (attaching twice is harmless)
        assert sandbox.guard.enforcer is not None


@pytest.mark.parametrize("port", [22, 8080])
def test_other_tcp_ports_dropped(sandbox: Sandbox, port: int) -> None:
    up = sandbox.world.upstream_ips["A"]
    assert sandbox.tcp(up, port) in ("TimeoutError", "timeout")
    sandbox.expect(ebpf.Code.TCP_PORT, lambda e: e.dst == up and e.dport == port)


def test_dns_to_another_resolver_dropped(sandbox: Sandbox) -> None:
    w = sandbox.world
    w.clear_dns_log()
    assert sandbox.udp(w.gateway_resolver, 53) in ("TimeoutError", "timeout")
    sandbox.expect(ebpf.Code.DNS_OTHER, lambda e: e.dst == w.gateway_resolver and e.protocol == "udp")
    assert w.dns_queries() == []


def test_quic_dropped(sandbox: Sandbox) -> None:
    up = sandbox.world.upstream_ips["A"]
    sandbox.udp(up, 443, wait=0.2)
    sandbox.expect(ebpf.Code.QUIC, lambda e: e.dst == up and e.dport == 443)


def test_icmp_to_upstream_dropped(sandbox: Sandbox) -> None:
    up = sandbox.world.upstream_ips["A"]
    out = sandbox.world.run("sandbox", ["ping", "-c", "1", "-W", "1", up])
    assert out.returncode != 0
    sandbox.expect(ebpf.Code.ICMP, lambda e: e.dst == up and e.protocol == "icmp")


def test_ipv6_dropped(sandbox: Sandbox) -> None:
    sandbox.send(
        frames.eth(sandbox.gw_mac, sandbox.mac, frames.ETH_IPV6, frames.ipv6_udp("fe80::2", "2001:db8::10", 5000, 443))
    )
    ev = sandbox.expect(ebpf.Code.IPV6)
    assert ev.dst == "2001:db8::10" and ev.family == 6


def test_spoofed_source_ip_dropped(sandbox: Sandbox) -> None:
    w = sandbox.world
    sandbox.send(
        frames.eth(
            sandbox.gw_mac,
            sandbox.mac,
            frames.ETH_IP,
            frames.ipv4("10.200.0.99", w.gateway_ip, 6, frames.tcp_syn(40000, PROXY_PORT)),
        )
    )
    ev = sandbox.expect(ebpf.Code.SPOOF_IP)
    assert ev.src == "10.200.0.99"


def test_spoofed_source_mac_dropped(sandbox: Sandbox) -> None:
    w = sandbox.world
    sandbox.send(
        frames.eth(
            sandbox.gw_mac,
            "02:66:66:66:66:66",
            frames.ETH_IP,
            frames.ipv4(w.sandbox_ip, w.gateway_ip, 6, frames.tcp_syn(40001, PROXY_PORT)),
        )
    )
    ev = sandbox.expect(ebpf.Code.SPOOF_MAC)
    assert ev.src_mac == "02:66:66:66:66:66"


def test_gratuitous_arp_for_gateway_dropped(sandbox: Sandbox) -> None:
    w = sandbox.world
    for op in (1, 2):  # gratuitous request and reply, both claiming the gateway address
        sandbox.send(
            frames.eth(
                "ff:ff:ff:ff:ff:ff",
                sandbox.mac,
                frames.ETH_ARP,
                frames.arp(op, sandbox.mac, w.gateway_ip, "00:00:00:00:00:00", w.gateway_ip),
            )
        )
        ev = sandbox.expect(ebpf.Code.ARP_SPOOF)
        assert ev.protocol == "arp" and ev.src == w.gateway_ip


def test_ip_fragments_dropped(sandbox: Sandbox) -> None:
    w = sandbox.world
    first = frames.ipv4(w.sandbox_ip, w.gateway_ip, 17, frames.udp(5353, 53, b"a" * 32), frag=0x2000)
    later = frames.ipv4(w.sandbox_ip, w.gateway_ip, 17, b"b" * 16, frag=5)
    sandbox.send(frames.eth(sandbox.gw_mac, sandbox.mac, frames.ETH_IP, first))
    sandbox.expect(ebpf.Code.FRAGMENT)
    sandbox.send(frames.eth(sandbox.gw_mac, sandbox.mac, frames.ETH_IP, later))
    sandbox.expect(ebpf.Code.FRAGMENT)


def test_vlan_tagged_dropped(sandbox: Sandbox) -> None:
    w = sandbox.world
    inner = frames.ipv4(w.sandbox_ip, w.gateway_ip, 6, frames.tcp_syn(40002, PROXY_PORT))
    sandbox.send(frames.vlan(sandbox.gw_mac, sandbox.mac, 42, frames.ETH_IP, inner))
    sandbox.expect(ebpf.Code.VLAN)


def test_drop_reports_become_packet_dropped_records(sandbox: Sandbox) -> None:
    up = sandbox.world.upstream_ips["evil"]
    for _ in range(3):
        sandbox.tcp(up, 25, timeout=0.3)
    records: list[dict[str, object]] = []
    reporter = ebpf.DropReporter(records.append, window_s=60)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not records:
        for ev in sandbox.reader.wait(0.5):
            reporter.feed(ev)
    for ev in sandbox.reader.wait(0.5):
        reporter.feed(ev)
    assert len(records) == 1, records  # SYN retransmissions of three connections fold into one record
    rec = records[0]
    assert rec["sandbox"] == "sb-e2e" and rec["destination"] == up and rec["port"] == 25
    assert rec["protocol"] == "tcp" and rec["reason"] == "tcp_port"


def test_verify_prints_attachment_and_counters(sandbox: Sandbox) -> None:
    from gateway.cli import main

    w = sandbox.world
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["sandbox", "verify", "--netns", w.ns_name("gateway"), w.gw_sandbox_if])
    out = buf.getvalue()
    assert rc == 0, out
    assert "cxe_tc_guard" in out and "sb-e2e" in out and "tcp_port" in out and "direct-action" in out, out


def test_unguarded_interface_verify_fails(sandbox: Sandbox) -> None:
    from gateway.cli import main

    w = sandbox.world
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["sandbox", "verify", "--netns", w.ns_name("gateway"), w.gw_internet_if])
    assert rc == 1, buf.getvalue()


# -- process sandboxes (cgroup) -------------------------------------------------------------------------------


def test_process_sandbox_in_cgroup(sandbox: Sandbox, relay: subprocess.Popen[str]) -> None:
    """A process in the gateway namespace (which can route to the internet) confined by its cgroup."""
    w = sandbox.world
    cg = Path(ebpf.cgroup2_root()) / f"{w.prefix}-proc"
    cg.mkdir()
    spec = ebpf.SandboxSpec(
        "proc-1", ip=w.gateway_ip, gateway_ip=w.gateway_ip, transparent_port=TPORT, proxy_port=PROXY_PORT
    )
    up = w.upstream_ips["A"]
    # Join the cgroup first, then enter the gateway namespace (`ip netns exec` would hide /sys/fs/cgroup).
    code = (
        "import json, os, socket, subprocess, sys\n"
        f"open('{cg}/cgroup.procs', 'w').write(str(os.getpid()))\n"
        f"fd = os.open('/run/netns/{w.ns_name('gateway')}', os.O_RDONLY); os.setns(fd, os.CLONE_NEWNET)\n"
        "def tcp(host, port):\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=2).close(); return 'connected'\n"
        "    except OSError as e:\n"
        "        return type(e).__name__\n"
        "def udp(host, port):\n"
        "    try:\n"
        "        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', (host, port)); return 'sent'\n"
        "    except OSError as e:\n"
        "        return type(e).__name__\n"
        "def tcp6(host, port):\n"
        "    try:\n"
        "        socket.socket(socket.AF_INET6).connect((host, port)); return 'connected'\n"
        "    except OSError as e:\n"
        "        return type(e).__name__\n"
        "out = {\n"
        f"    'ssh': tcp('{up}', 22),\n"
        f"    'dns_other': udp('{w.gateway_resolver}', 53),\n"
        f"    'quic': udp('{up}', 443),\n"
        f"    'v6': tcp6('2001:db8::1', 443),\n"
        f"    'loopback': tcp('127.0.0.1', 22),\n"
        "}\n"
        "curl = subprocess.run(['curl', '-q', '-sS', '--noproxy', '*', '--connect-timeout', '3', '--cacert',\n"
        f"                      '{w.upstream_ca_pem}', 'https://{up}/proc'], capture_output=True, text=True)\n"
        "out['https'] = curl.stdout or curl.stderr\n"
        "print(json.dumps(out))\n"
    )
    try:
        with ebpf.CgroupGuard(str(cg), spec, netns=w.ns_name("gateway")) as g:
            reader = g.events()
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=child_env()
                )
                assert proc.returncode == 0, proc.stderr
                out = json.loads(proc.stdout)
                assert out["ssh"] == "PermissionError"
                assert out["dns_other"] == "PermissionError"
                assert out["quic"] == "PermissionError"
                assert out["v6"] == "PermissionError"
                assert out["loopback"] == "PermissionError"
                assert json.loads(out["https"])["server"] == "A", out["https"]  # redirected to the relay
                assert relay.stdout is not None
                seen = json.loads(relay.stdout.readline())
                assert seen["original"] == [up, 443] and seen["via"] == "cxe_origpeer"
                reports: list[ebpf.DropEvent] = []
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline and len(reports) < 5:
                    reports += reader.wait(0.5)
                got = {(e.code, e.hook, e.dport) for e in reports}
                assert (ebpf.Code.TCP_PORT, "connect4", 22) in got, reports
                assert (ebpf.Code.DNS_OTHER, "sendmsg4", 53) in got, reports
                assert (ebpf.Code.QUIC, "sendmsg4", 443) in got, reports
                assert (ebpf.Code.IPV6, "connect6", 443) in got, reports
                assert all(e.sandbox_id == "proc-1" for e in reports)
                counts = g.counters()
                assert counts[ebpf.Code.PASS_REDIRECT] >= 1 and counts[ebpf.Code.TCP_PORT] >= 2
            finally:
                reader.close()
    finally:
        with contextlib.suppress(OSError):
            cg.rmdir()


# -- the explicit nftables fallback ------------------------------------------------------------------------------


def test_nftables_fallback_is_explicit_and_enforces(capsys: pytest.CaptureFixture[str]) -> None:
    """`--enforcer nftables` (no BPF): loud warning, same redirect design, per-reason counters, clean detach."""
    from tests.support.world import netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from gateway.cli import main

    with World() as w:
        gw = w.ns_name("gateway")
        mac = _mac(w.ns_name("sandbox"), w.sandbox_if)
        base = ["--netns", gw, "--iface", w.gw_sandbox_if]
        attach = ["sandbox", "attach", *base, "--ip", w.sandbox_ip, "--mac", mac, "--id", "sb-nft"]
        assert main([*attach, "--transparent-port", str(TPORT), "--enforcer", "nftables"]) == 0
        assert "WARNING: --enforcer nftables: the BPF guard is NOT in use" in capsys.readouterr().err
        relay = w.popen("gateway", [sys.executable, str(RELAY), str(TPORT)], stdout=subprocess.PIPE, text=True)
        assert relay.stdout is not None and relay.stdout.readline().strip() == "READY"
        out = w.curl(["--cacert", str(w.upstream_ca_pem), f"https://{w.upstream_ips['B']}/"])
        assert out.returncode == 0 and json.loads(out.stdout)["server"] == "B", out.stderr
        up = w.upstream_ips["A"]
        w.sandbox_python(f"import socket\ntry: socket.create_connection(('{up}', 22), 1)\nexcept OSError: pass")
        w.sandbox_python(
            frames.sender_code(
                w.sandbox_if,
                [
                    frames.eth(
                        _mac(gw, w.gw_sandbox_if),
                        "02:66:66:66:66:66",
                        frames.ETH_IP,
                        frames.ipv4(w.sandbox_ip, w.gateway_ip, 6, frames.tcp_syn(40000, PROXY_PORT)),
                    )
                ],
            )
        )
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["sandbox", "verify", "--netns", gw, w.gw_sandbox_if]) == 0
        text = buf.getvalue()
        assert "nftables (FALLBACK)" in text, text
        counts = dict(re.findall(r"nft drop (\w+)\s+(\d+)", text))
        assert int(counts["tcp_port"]) >= 1 and int(counts["spoof_mac"]) >= 1, text
        assert main(["sandbox", "detach", *base, "--enforcer", "nftables"]) == 0
        ruleset = w.run("gateway", ["nft", "list", "ruleset"], check=True).stdout
        assert "cxg_" not in ruleset and "cxe_" not in ruleset, ruleset
