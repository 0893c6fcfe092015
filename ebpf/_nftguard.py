"""The explicit nftables fallback (``--enforcer nftables``): the guard's rules as an nft netdev ingress chain.

Only for kernels that cannot run the BPF programs, and never chosen silently. What it lacks, compared with the
BPF guard: no gateway-down check (a redirected SYN while the gateway is stopped is refused by the kernel with a
RST instead of being dropped and reported), no drop reports (only per-reason nft counters), no process
(cgroup) sandboxes, no QUIC/DNS distinction beyond counters. The redirect/forward-drop tables are the same.
"""

from __future__ import annotations

import json
import re

from . import _build, _net
from .enforcer import SandboxSpec

__all__ = ["WARNING", "attach", "counters", "detach", "table"]

WARNING = (
    "WARNING: --enforcer nftables: the BPF guard is NOT in use. Fallback limits: no gateway-down detection, no "
    "drop reports (counters only), no process sandboxes. Use it only where the kernel cannot run the BPF programs."
)

REASONS = (
    "spoof_mac",
    "vlan",
    "arp_spoof",
    "arp_other",
    "ipv6",
    "ethertype",
    "spoof_ip",
    "fragment",
    "tcp_port",
    "dns_other",
    "quic",
    "udp",
    "icmp",
    "ip_proto",
)


def table(ifname: str) -> str:
    return "cxg_" + re.sub(r"[^A-Za-z0-9_]", "_", ifname)


def attach(netns: str | None, ifname: str, spec: SandboxSpec) -> None:
    if _net.iface_info(netns, ifname) is None:
        raise _net.NetError(f"no interface {ifname!r}")
    t = table(ifname)
    gw, sb, mac = spec.gateway_ip, spec.ip, spec.mac.lower()
    svc_tcp = ", ".join(str(p) for p in sorted({spec.proxy_port, spec.transparent_port, spec.dns_port} - {0}))
    redirect = ", ".join(str(p) for p in spec.redirect_ports)
    counters = "".join(f"  counter c_{r} {{}}\n" for r in REASONS)  # c_: "vlan" is a keyword
    rules = [
        f'ether saddr != {mac} counter name "c_spoof_mac" drop',
        'ether type { 0x8100, 0x88a8 } counter name "c_vlan" drop',
        f"ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp operation {{ request, reply }} "
        f"arp saddr ether {mac} arp saddr ip {sb} arp daddr ip {gw} accept",
        f'ether type arp arp saddr ip != {sb} counter name "c_arp_spoof" drop',
        'ether type arp counter name "c_arp_other" drop',
        'ether type ip6 counter name "c_ipv6" drop',
        'ether type != ip counter name "c_ethertype" drop',
        f'ip saddr != {sb} counter name "c_spoof_ip" drop',
        'ip frag-off & 0x3fff != 0 counter name "c_fragment" drop',
    ]
    if svc_tcp:
        rules.append(f"ip daddr {gw} tcp dport {{ {svc_tcp} }} accept")
    if spec.dns_port:
        rules.append(f"ip daddr {gw} udp dport {spec.dns_port} accept")
    rules += [
        f"ip daddr {gw} icmp type {{ echo-request, echo-reply, destination-unreachable, time-exceeded }} accept",
        f"tcp dport {{ {redirect} }} meta mark set {_build.MARK:#x} accept",
        'meta l4proto tcp counter name "c_tcp_port" drop',
        'udp dport 53 counter name "c_dns_other" drop',
        'udp dport 443 counter name "c_quic" drop',
        'meta l4proto udp counter name "c_udp" drop',
        'meta l4proto icmp counter name "c_icmp" drop',
        'counter name "c_ip_proto" drop',
    ]
    body = "".join(f"    {r}\n" for r in rules)
    script = (
        f"add table netdev {t}\n"
        f"delete table netdev {t}\n"
        f"table netdev {t} {{\n{counters}"
        "  chain ingress {\n"
        f'    type filter hook ingress device "{ifname}" priority -500; policy drop;\n'
        f"{body}"
        "  }\n"
        "}\n"
    )
    _net.nft_install_guard(netns, _build.MARK)
    _net.nft_install(netns, ifname, spec.transparent_port, _build.MARK)
    proc = _net._nft(netns, script)
    if proc.returncode != 0:
        _net.nft_remove(netns, ifname)
        raise _net.NetError(f"nft could not install the fallback guard {t}: {proc.stderr.strip()}")


def detach(netns: str | None, ifname: str) -> bool:
    t = table(ifname)
    existed = _net._nft(netns, None, "list", "table", "netdev", t).returncode == 0
    _net._nft(netns, f"add table netdev {t}\ndelete table netdev {t}\n")
    _net.nft_remove(netns, ifname)
    return existed


def counters(netns: str | None, ifname: str) -> dict[str, int] | None:
    """Packets per drop reason of the fallback guard; None when it is not attached."""
    proc = _net._nft(netns, None, "-j", "list", "table", "netdev", table(ifname))
    if proc.returncode != 0:
        return None
    out: dict[str, int] = {}
    for item in json.loads(proc.stdout).get("nftables", []):
        c = item.get("counter")
        if isinstance(c, dict) and "name" in c:
            out[str(c["name"]).removeprefix("c_")] = int(c.get("packets", 0))
    return out
