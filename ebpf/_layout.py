"""Byte layouts of the structs shared with guard.bpf.c (map keys, values and ring-buffer records)."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from ._build import ID_LEN

__all__ = [
    "COUNT_KEY",
    "EVENT",
    "IFNAME_LEN",
    "ORIG",
    "PEER_KEY",
    "PORT_KEY",
    "SANDBOX",
    "SandboxValue",
    "mac_bytes",
    "mac_str",
]

IFNAME_LEN = 16

# struct cxe_sandbox: slot, sandbox_ip, gateway_ip, proxy/transparent/dns port, mac, flags, id, ifname
SANDBOX = struct.Struct(f"<I4s4sHHH6sH{ID_LEN}s{IFNAME_LEN}s2x")
PORT_KEY = struct.Struct("<IHH")
COUNT_KEY = struct.Struct("<II")
# struct cxe_event
EVENT = struct.Struct(f"<QQIII4s4s16sHHHBB6sBB{ID_LEN}s4x")
# struct cxe_orig
ORIG = struct.Struct("<4sHHIIQ")
PEER_KEY = struct.Struct("<4sHH")


def mac_bytes(mac: str) -> bytes:
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {mac!r}") from None


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def ip4(addr: str) -> bytes:
    return ipaddress.IPv4Address(addr).packed


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True)
class SandboxValue:
    """A decoded settings entry of the cxe_ifaces / cxe_cgroups map."""

    slot: int
    sandbox_ip: str
    gateway_ip: str
    proxy_port: int
    transparent_port: int
    dns_port: int
    mac: str
    flags: int
    sandbox_id: str
    ifname: str

    def pack(self) -> bytes:
        return SANDBOX.pack(
            self.slot,
            ip4(self.sandbox_ip),
            ip4(self.gateway_ip),
            self.proxy_port,
            self.transparent_port,
            self.dns_port,
            mac_bytes(self.mac),
            self.flags,
            self.sandbox_id.encode(),
            self.ifname.encode(),
        )

    @classmethod
    def unpack(cls, raw: bytes) -> SandboxValue:
        slot, sip, gip, pp, tp, dp, mac, flags, sid, ifname = SANDBOX.unpack(raw[: SANDBOX.size])
        return cls(
            slot,
            socket.inet_ntoa(sip),
            socket.inet_ntoa(gip),
            pp,
            tp,
            dp,
            mac_str(mac),
            flags,
            _cstr(sid),
            _cstr(ifname),
        )
