"""Address classification: which resolved addresses a sandbox may reach without a rule naming them.

Applied to every address the gateway is about to dial (its own DNS answers, IP literals, transparent original
destinations). Anything that is not plain global unicast is refused unless a policy rule names its CIDR, because an
allowed name that resolves to 169.254.169.254 or 127.0.0.1 is the classic SSRF path out of a sandbox.
"""

from __future__ import annotations

import enum
import ipaddress

__all__ = ["AddressClass", "IPAddress", "classify_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressClass(enum.StrEnum):
    GLOBAL = "global"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link_local"
    CGNAT = "cgnat"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"
    UNSPECIFIED = "unspecified"
    RESERVED = "reserved"
    NAT64 = "nat64"
    SIXTO4 = "6to4"
    TEREDO = "teredo"
    IPV4_MAPPED = "ipv4_mapped"
    GATEWAY = "gateway"


def _nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Order matters: the first table that contains the address names its class. The specific classes come before the
# catch-all "reserved" so that a reader of an audit record learns *why* an address was refused.
_TABLE: tuple[tuple[AddressClass, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]], ...] = (
    (AddressClass.UNSPECIFIED, _nets("0.0.0.0/8", "::/128")),
    (AddressClass.LOOPBACK, _nets("127.0.0.0/8", "::1/128")),
    (AddressClass.BROADCAST, _nets("255.255.255.255/32")),
    (AddressClass.LINK_LOCAL, _nets("169.254.0.0/16", "fe80::/10")),
    (AddressClass.PRIVATE, _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")),
    (AddressClass.CGNAT, _nets("100.64.0.0/10")),
    (AddressClass.MULTICAST, _nets("224.0.0.0/4", "ff00::/8")),
    (AddressClass.NAT64, _nets("64:ff9b::/96", "64:ff9b:1::/48")),
    (AddressClass.SIXTO4, _nets("2002::/16")),
    (AddressClass.TEREDO, _nets("2001::/32")),
    (AddressClass.IPV4_MAPPED, _nets("::ffff:0:0/96")),
    (
        AddressClass.RESERVED,
        _nets(
            "192.0.0.0/24",  # IETF protocol assignments
            "192.0.2.0/24",  # TEST-NET-1
            "198.18.0.0/15",  # benchmarking
            "198.51.100.0/24",  # TEST-NET-2
            "203.0.113.0/24",  # TEST-NET-3
            "240.0.0.0/4",  # class E
            "100::/64",  # discard-only
            "2001:db8::/32",  # documentation
            "::/96",  # IPv4-compatible (deprecated)
        ),
    ),
)


def classify_address(address: IPAddress, gateway_addresses: frozenset[IPAddress] = frozenset()) -> AddressClass:
    """The class of one address; GLOBAL is the only class reachable without an explicit CIDR rule."""
    if address in gateway_addresses:
        return AddressClass.GATEWAY
    for cls, nets in _TABLE:
        if any(address in n for n in nets if n.version == address.version):
            return cls
    # Python's own registry knows assignments we do not list (e.g. future IANA special-purpose blocks).
    if not address.is_global:
        return AddressClass.RESERVED
    return AddressClass.GLOBAL
