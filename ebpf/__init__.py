"""Kernel enforcement: BPF programs that force every packet a sandbox sends through the gateway, fail closed.

Two attachments, one compiled object (``guard.bpf.c``, compiled by bcc, pinned per network namespace):

* **VM/container sandboxes** (:class:`Guard`): a tc program on the *ingress* of the host side of the sandbox's
  tap or veth (a clsact qdisc, filter priority 1, protocol all, direct action), so it sees every frame the
  sandbox sends before anything else on the host does.
* **Process sandboxes** (:class:`CgroupGuard`): cgroup v2 ``connect4``/``sendmsg4`` (and ``connect6``/
  ``sendmsg6``, ``sock_ops``) programs on the sandbox's cgroup.

Per-sandbox settings (sandbox IP and MAC, gateway IP, proxy/transparent/DNS ports, redirected TCP ports) live in
maps keyed by interface index or cgroup id, so one loaded program serves every sandbox. Programs and maps are
named ``cxe_*`` (``bpftool prog``/``map`` show them).

Packet path (tc, frames from the sandbox)
-----------------------------------------
Passed only: frames whose source MAC and IP are the sandbox's; ARP from the sandbox about the gateway address;
TCP to the gateway's proxy/transparent/DNS ports; DNS (UDP) to the gateway; ICMP echo/errors to the gateway
itself; and TCP to *any* address on 80, 443 and the sandbox's policy ports, which must end at the gateway's
transparent listener. Everything else is dropped and counted per (sandbox, reason) (:class:`Code`), and
reported through a ring buffer (rate limited in the program).

"Must end at the transparent listener" is designed as three pieces that only together pass a packet:

1. tc (which runs before netfilter) marks such packets with :data:`MARK` and passes them, but first drops a new
   connection (a SYN) with ``gateway_down`` when no socket listens on ``gateway_ip:transparent_port`` in the
   namespace (``bpf_sk_lookup_tcp`` with an empty peer, so only a listener matches). A stopped gateway
   therefore yields a drop report, not a silent timeout.
2. Per sandbox, an nft table ``cxe_<ifname>`` redirects marked TCP from that interface to the transparent port
   (``nat prerouting``, priority dstnat-10; the listener reads the original destination with SO_ORIGINAL_DST,
   as mitmproxy's transparent mode does).
3. A namespace-wide nft table ``cube_egress`` drops marked packets in the ``forward`` hook (counter
   ``unredirected``): if a sandbox's redirect is missing, its marked packets can never be routed on, even on a
   host with ip_forward=1 (the test world also has ip_forward=0). It lives in its own table so that removing a
   sandbox's redirect cannot remove the drop.

The tc program cannot see whether nft will redirect; the mark is what ties the two together, and the forward drop
is what makes a missing redirect fail closed. ``Guard(redirect=False)`` leaves the nft part to the caller (who
must then redirect on the mark and drop it in forward).

Process sandboxes: ``connect()`` to the gateway's services is allowed; TCP to a redirected port is rewritten to
``gateway_ip:transparent_port`` and its original destination recorded in ``cxe_origdst`` (keyed by socket
cookie) and, once the source port is known, ``cxe_origpeer`` (keyed by the client address the gateway sees);
read them with :meth:`Enforcer.original_destination`. Everything else is refused with EPERM and reported.
Real IPv6 is refused; IPv4-mapped IPv6 follows the IPv4 rules.

Lifetime: the first attach in a namespace compiles (~1 s) and pins programs and maps under
``/run/cube-egress/bpf/net<netns cookie>/`` (a bpffs of our own); later attaches (any process) reuse the pins
(~50 ms). Detach removes the filter, the clsact qdisc when nothing else uses it, the nft table and the sandbox's
map entries; the last detach in the namespace unpins everything and removes the namespace-wide nft table.
Attaching twice is harmless (same slot, replaced settings).

Limits (stated, not hidden): a process sandbox with CAP_NET_RAW could send raw packets that no connect hook
sees (run sandboxes without it); loopback connections inside a process sandbox are refused too; one ring-buffer
reader per namespace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import TracebackType

from ._build import MARK, EnforcementUnavailable, unavailable_reason
from .enforcer import (
    DEFAULT_PORTS,
    AttachError,
    CgroupSandbox,
    Enforcer,
    OriginalDestination,
    SandboxSpec,
    cgroup2_root,
)
from .events import DropEvent, DropReporter, EventReader
from .reasons import FIRST_DROP, Code

__all__ = [
    "DEFAULT_PORTS",
    "FIRST_DROP",
    "MARK",
    "AttachError",
    "CgroupGuard",
    "CgroupSandbox",
    "Code",
    "DropEvent",
    "DropReporter",
    "EnforcementUnavailable",
    "Enforcer",
    "EventReader",
    "Guard",
    "OriginalDestination",
    "SandboxSpec",
    "attach_sandbox",
    "cgroup2_root",
    "detach_sandbox",
    "unavailable_reason",
]


def attach_sandbox(
    iface: str,
    *,
    ip: str,
    mac: str,
    sandbox_id: str,
    gateway_ip: str | None = None,
    transparent_port: int = 3129,
    proxy_port: int = 3128,
    dns_port: int = 53,
    ports: tuple[int, ...] = (),
    netns: str | None = None,
    redirect: bool = True,
) -> SandboxSpec:
    """Wire one VM/container sandbox (the hypervisor's call): guard the host side ``iface`` of its tap/veth.

    ``gateway_ip`` defaults to the first IPv4 address of ``iface``. Returns the settings written. Idempotent.
    """
    from . import _net

    if gateway_ip is None:
        info = _net.iface_info(netns, iface)
        if info is None or not info.ipv4:
            raise AttachError(f"cannot infer the gateway address: {iface!r} has no IPv4 address (pass gateway_ip)")
        gateway_ip = info.ipv4[0]
    spec = SandboxSpec(
        sandbox_id=sandbox_id,
        ip=ip,
        gateway_ip=gateway_ip,
        mac=mac,
        transparent_port=transparent_port,
        proxy_port=proxy_port,
        dns_port=dns_port,
        ports=tuple(ports),
    )
    with Enforcer.open(netns) as enf:
        enf.attach_interface(iface, spec, redirect=redirect)
    return spec


def detach_sandbox(iface: str, *, netns: str | None = None) -> bool:
    """Undo :func:`attach_sandbox` (no error when nothing is attached). True when something was removed."""
    try:
        enf = Enforcer.open(netns, create=False)
    except FileNotFoundError:
        from . import _net  # nothing pinned: still clean up a leftover filter/table

        removed = _net.detach_filter(netns, iface, "cxe_")
        _net.nft_remove(netns, iface)
        return removed
    with enf:
        return enf.detach_interface(iface)


class _GuardBase:
    enforcer: Enforcer | None
    slot: int

    def counters(self) -> dict[Code, int]:
        """This sandbox's counts by code (passes and drops)."""
        assert self.enforcer is not None, "not attached"
        return self.enforcer.counters(self.slot).get(self.slot, {})

    def drops(self) -> dict[Code, int]:
        return {c: n for c, n in self.counters().items() if c.is_drop}

    def events(self, match: Callable[[DropEvent], bool] | None = None) -> EventReader:
        """A reader of this sandbox's drop reports (``drain()``, ``wait(t)``, ``async for``); close it after use."""
        assert self.enforcer is not None, "not attached"
        slot = self.slot
        return EventReader(
            self.enforcer.maps["cxe_events"].fd,
            lambda ev: ev.slot == slot and (match is None or match(ev)),
        )


class Guard(_GuardBase):
    """Context manager: guard a sandbox interface on enter, always detach on exit (even after an error)."""

    def __init__(
        self,
        iface: str,
        *,
        ip: str,
        mac: str,
        sandbox_id: str,
        gateway_ip: str,
        transparent_port: int = 3129,
        proxy_port: int = 3128,
        dns_port: int = 53,
        ports: tuple[int, ...] = (),
        netns: str | None = None,
        redirect: bool = True,
    ) -> None:
        self.iface = iface
        self.netns = netns
        self.redirect = redirect
        self.spec = SandboxSpec(
            sandbox_id=sandbox_id,
            ip=ip,
            gateway_ip=gateway_ip,
            mac=mac,
            transparent_port=transparent_port,
            proxy_port=proxy_port,
            dns_port=dns_port,
            ports=tuple(ports),
        )
        self.enforcer = None
        self.slot = 0

    def attach(self) -> Guard:
        enf = Enforcer.open(self.netns)
        try:
            value = enf.attach_interface(self.iface, self.spec, redirect=self.redirect)
        except BaseException:
            enf.close()
            raise
        previous, self.enforcer, self.slot = self.enforcer, enf, value.slot
        if previous is not None:  # attached again (harmless): keep one set of descriptors
            previous.close()
        return self

    def detach(self) -> None:
        enf, self.enforcer = self.enforcer, None
        if enf is None:
            return
        try:
            enf.detach_interface(self.iface)
        finally:
            enf.close()

    def __enter__(self) -> Guard:
        return self.attach()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.detach()


class CgroupGuard(_GuardBase):
    """Context manager: enforce on a cgroup v2 directory on enter, always detach on exit."""

    def __init__(self, cgroup: str, spec: SandboxSpec, *, netns: str | None = None) -> None:
        self.cgroup = cgroup
        self.spec = spec
        self.netns = netns
        self.enforcer = None
        self.slot = 0
        self.cgroup_id = 0

    def __enter__(self) -> CgroupGuard:
        enf = Enforcer.open(self.netns)
        try:
            sb = enf.attach_cgroup(self.cgroup, self.spec)
        except BaseException:
            enf.close()
            raise
        self.enforcer, self.slot, self.cgroup_id = enf, sb.value.slot, sb.cgroup_id
        return self

    def original_destination(
        self, *, cookie: int | None = None, peer: tuple[str, int] | None = None
    ) -> OriginalDestination | None:
        assert self.enforcer is not None, "not attached"
        return self.enforcer.original_destination(cookie=cookie, peer=peer)

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        enf, self.enforcer = self.enforcer, None
        if enf is None:
            return
        try:
            enf.detach_cgroup(self.cgroup)
        finally:
            with contextlib.suppress(Exception):
                enf.close()
