"""Host names as the decision core sees them: one canonical spelling per destination.

Every host that reaches a decision (from a policy file, a CONNECT authority, a Host header, an SNI or a DNS
answer) goes through `normalize_host` first, so that `API.Example.com.`, `api.example.com` and an IDN spelling all
compare equal, and so that the many spellings of an IPv4 address (`2130706433`, `0x7f.1`, `0177.0.0.1`) cannot
sneak past a rule that names the dotted form.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

__all__ = ["HostError", "HostPattern", "normalize_host", "parse_ip_literal"]

# A DNS label after IDNA: letters, digits, hyphen, and underscore (seen in real service names such as
# `_dmarc`); not starting or ending with a hyphen.
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_IPV4_PART = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


class HostError(ValueError):
    """A string that is not a host name or address; the message says why."""


def _parse_ipv4_part(part: str) -> int | None:
    if not _IPV4_PART.match(part):
        return None
    if part.startswith("0x"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        if any(c in "89" for c in part):
            raise HostError(f"{part!r} is not a valid octal IPv4 component")
        return int(part, 8)
    return int(part)


def _parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Parse the inet_aton forms browsers and libc accept (1 to 4 parts, decimal, octal or hex).

    Returns None when `host` is not numeric at all (a name), raises HostError when it is numeric but invalid.
    """
    parts = host.split(".")
    if parts and parts[-1] == "":
        parts.pop()
    # Like the URL standard: a host whose last label is numeric is an address (`1.example` is a name), and one
    # that cannot be an address is an error rather than a name, so `1.2.3.4.5` never reaches DNS.
    if not parts or _IPV4_PART.match(parts[-1]) is None:
        return None
    if len(parts) > 4:
        raise HostError(f"{host!r} has too many components for an IPv4 address")
    values = [_parse_ipv4_part(p) for p in parts]
    if any(v is None for v in values):
        raise HostError(f"{host!r} mixes numeric and non-numeric labels")
    nums = [v for v in values if v is not None]
    *head, last = nums
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(nums)):
        raise HostError(f"{host!r} is out of range for an IPv4 address")
    value = last
    for i, v in enumerate(head):
        value += v << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def parse_ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host string denotes, or None if it is a name. Accepts `[v6]` and legacy IPv4 forms."""
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if ":" in h:
        try:
            return ipaddress.IPv6Address(h.split("%", 1)[0])
        except ValueError as e:
            raise HostError(f"{host!r} is not a valid IPv6 address") from e
    return _parse_legacy_ipv4(h)


# Already canonical: lower-case ASCII labels, no trailing dot, not all-numeric last label (an IPv4 spelling), no
# punycode prefix to validate. Most hosts a gateway sees are like this, and IDNA processing costs tens of us.
_CANONICAL_NAME = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*$")


def normalize_host(host: str) -> str:
    """The canonical form of a host: lower case, no trailing dot, punycode, dotted-quad IPv4, compressed IPv6.

    Idempotent: `normalize_host(normalize_host(h)) == normalize_host(h)`. Raises HostError on anything that is
    neither a valid name nor an address.
    """
    if len(host) <= 253 and _CANONICAL_NAME.match(host) and "xn--" not in host:
        last = host.rpartition(".")[2]
        if not last.isdigit() and not (last.startswith("0x") and _IPV4_PART.match(last)):
            return host
    return _normalize_host(host)


def _normalize_host(host: str) -> str:
    """The full normalisation (the slow path of `normalize_host`)."""
    if not host or len(host) > 255:
        raise HostError("empty or over-long host")
    ip = parse_ip_literal(host)
    if ip is not None:
        # Strip the IPv4-mapped wrapper so `::ffff:127.0.0.1` is judged as the IPv4 address it reaches.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ip)
    name = host.strip().rstrip(".") if host.strip() != "." else ""
    if not name:
        raise HostError("empty host")
    try:
        name = idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        # Underscore labels are not valid IDNA but do occur in DNS; accept plain ASCII ones as they are.
        if not name.isascii():
            raise HostError(f"{host!r} is not a valid international domain name: {e}") from e
        name = name.lower()
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise HostError(f"{host!r} has an invalid label {label!r}")
    return name


@dataclass(frozen=True, slots=True)
class HostPattern:
    """An exact host, or `*.suffix` which matches any name below `suffix` (any depth) but never `suffix` itself."""

    host: str
    wildcard: bool

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """Parse a policy host pattern; HostError carries a message that tells the author what to write instead."""
        raw = text.strip()
        if raw in ("*", "**", "*."):
            raise HostError("a bare '*' would allow every host; list the hosts, or use '*.example.com'")
        wildcard = raw.startswith("*.")
        body = raw[2:] if wildcard else raw
        if "*" in body:
            raise HostError("'*' is only allowed as a whole leading label ('*.example.com'), not inside a name")
        if parse_ip_literal(body) is not None:
            raise HostError(f"{raw!r} is an IP address; put addresses under 'cidrs:', not 'hosts:'")
        suffix = normalize_host(body)
        if wildcard and "." not in suffix:
            raise HostError(
                f"'*.{suffix}' would allow a whole top-level domain; "
                f"name a registered domain such as '*.example.{suffix}'"
            )
        return cls(host=suffix, wildcard=wildcard)

    def matches(self, host: str) -> bool:
        """Match an already-normalised host."""
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host

    def __str__(self) -> str:
        return f"*.{self.host}" if self.wildcard else self.host
