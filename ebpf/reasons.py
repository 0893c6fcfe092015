"""The one registry of verdict codes, shared by the BPF programs (as a generated C enum) and Python.

Codes below :data:`FIRST_DROP` are passes (counted only); codes from it on are drops or refusals (counted, and
reported as events). A code's number is part of the pinned-map interface: never renumber one, only add.
"""

from __future__ import annotations

import enum
import itertools

__all__ = ["FIRST_DROP", "Code", "c_enum"]

FIRST_DROP = 32


class Code(enum.IntEnum):
    """What the kernel programs decided for one packet (tc) or one connect()/sendmsg() (cgroup)."""

    # -- passes ---------------------------------------------------------------------------------------------
    PASS_ARP = 1
    """ARP from the sandbox's own MAC and IP asking for (or answering) the gateway address."""
    PASS_GATEWAY = 2
    """TCP to the gateway's proxy, transparent or DNS port."""
    PASS_DNS = 3
    """UDP DNS to the gateway's resolver."""
    PASS_REDIRECT = 4
    """TCP to a redirected port (80, 443, policy ports): marked for the transparent listener (tc) or rewritten
    to it (cgroup connect)."""
    PASS_ICMP = 5
    """ICMP echo/unreachable/time-exceeded to the gateway itself."""

    # -- drops and refusals ---------------------------------------------------------------------------------
    NO_CONFIG = 32
    """The program ran for an interface or cgroup with no settings (a detach race or a stale attachment)."""
    UNPARSED = 33
    """A header could not be read or is malformed (truncated frame, IP version/IHL wrong)."""
    SPOOF_MAC = 34
    """Ethernet source MAC is not the sandbox's."""
    SPOOF_IP = 35
    """IPv4 source address is not the sandbox's."""
    ARP_SPOOF = 36
    """ARP whose sender MAC/IP is not the sandbox's (e.g. a gratuitous ARP claiming the gateway address)."""
    ARP_OTHER = 37
    """ARP not about the gateway address, or not Ethernet/IPv4 request/reply."""
    VLAN = 38
    """802.1Q / 802.1ad tagged frame."""
    IPV6 = 39
    """IPv6 (frames, or connect/sendmsg to a non-IPv4-mapped IPv6 address)."""
    ETHERTYPE = 40
    """Any other layer-3 protocol."""
    FRAGMENT = 41
    """IPv4 fragment (MF set or non-zero offset)."""
    TCP_PORT = 42
    """TCP to a port that is neither a gateway service nor redirected."""
    UDP = 43
    """UDP other than DNS to the gateway."""
    QUIC = 44
    """UDP to port 443 (QUIC / HTTP/3)."""
    DNS_OTHER = 45
    """DNS (UDP port 53) to a resolver other than the gateway."""
    ICMP = 46
    """ICMP beyond the gateway (or an ICMP type the gateway does not need)."""
    IP_PROTO = 47
    """Any other IP protocol (SCTP, GRE, ...)."""
    GATEWAY_DOWN = 48
    """A new redirected TCP connection while nothing listens on the gateway's transparent port."""

    @property
    def is_drop(self) -> bool:
        return self.value >= FIRST_DROP

    @property
    def label(self) -> str:
        """The name used in audit records and CLI output (``spoof_mac``)."""
        return self.name.lower()

    @property
    def description(self) -> str:
        return _DOCS.get(self, "")


def _docs() -> dict[Code, str]:
    """Member docstrings (the attribute docstrings above), read from this module's source once."""
    import ast
    import inspect

    out: dict[Code, str] = {}
    tree = ast.parse(inspect.getsource(Code))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.Assign)
            and isinstance(stmt.targets[0], ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            out[Code[stmt.targets[0].id]] = " ".join(nxt.value.value.split())
    return out


_DOCS = _docs()


def c_enum() -> str:
    """``enum cxe_code`` for the BPF source, plus ``CXE_FIRST_DROP``."""
    lines = ["enum cxe_code {"]
    lines += [f"    CXE_{c.name} = {c.value}," for c in Code]
    lines.append("};")
    lines.append(f"#define CXE_FIRST_DROP {FIRST_DROP}")
    return "\n".join(lines) + "\n"
