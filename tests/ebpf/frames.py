"""Hand-built Ethernet frames for the guard tests (no scapy): spoofed, fragmented, tagged, ARP, IPv6."""

from __future__ import annotations

import socket
import struct

ETH_IP, ETH_ARP, ETH_IPV6, ETH_VLAN = 0x0800, 0x0806, 0x86DD, 0x8100


def mac(text: str) -> bytes:
    return bytes(int(p, 16) for p in text.split(":"))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def eth(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return mac(dst) + mac(src) + struct.pack("!H", ethertype) + payload


def vlan(dst: str, src: str, vid: int, ethertype: int, payload: bytes) -> bytes:
    return mac(dst) + mac(src) + struct.pack("!HHH", ETH_VLAN, vid, ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, frag: int = 0, ident: int = 0x1234) -> bytes:
    """``frag``: the flags/fragment-offset field (0x2000 = more fragments)."""
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        ident,
        frag,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def tcp_syn(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)


def udp(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return (
        struct.pack("!HHBBH", 1, ETH_IP, 6, 4, op) + mac(sha) + socket.inet_aton(spa) + mac(tha) + socket.inet_aton(tpa)
    )


def ipv6_udp(src: str, dst: str, sport: int, dport: int) -> bytes:
    payload = udp(sport, dport, b"x")
    return (
        struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(payload),
            17,
            64,
            socket.inet_pton(socket.AF_INET6, src),
            socket.inet_pton(socket.AF_INET6, dst),
        )
        + payload
    )


def sender_code(ifname: str, frames: list[bytes]) -> str:
    """Python for the sandbox namespace: send raw frames on ``ifname`` through an AF_PACKET socket."""
    hexes = [f.hex() for f in frames]
    return (
        "import socket\n"
        "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
        f"s.bind(({ifname!r}, 0))\n"
        f"for h in {hexes!r}:\n"
        "    s.send(bytes.fromhex(h))\n"
        "print('sent')\n"
    )
