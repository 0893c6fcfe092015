"""The networking seam of a VM: its tap, its addresses, and the hooks that wire it to the guard and the gateway.

A VM with a :class:`NetSpec` gets a tap of its own (created here with pyroute2, optionally inside a named network
namespace) that QEMU opens by name (``-netdev tap,ifname=...,script=no,downscript=no``). The host side of every
tap carries the gateway's address as a /32 plus a /32 route to the guest, so any number of taps in one namespace
share one gateway address (the gateway listens there, the guard's ``gateway_ip`` defaults to it) and each guest
is reachable through its own tap only. In the guest, the address is ``ip/prefix`` and the only route and the DNS
server are the gateway address (from the kernel command line on a cold boot, from the agent's ``net_config`` after
a restore or a clone).

Hooks (:class:`SandboxHook`) are called with a :class:`SandboxLink` after the tap exists and before the guest
runs (``sandbox_up``), and before the tap is removed (``sandbox_down``). :class:`EbpfGuard` is the hook for the
kernel guard (``ebpf.attach_sandbox``); gateway registration is another hook of the same shape.

Netlink calls for a namespace run on a short-lived thread that has entered it (sockets belong to the namespace of
the thread that creates them; pyroute2's sync IPRoute must not run inside an asyncio loop either).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from ._errors import VMError

__all__ = [
    "EbpfGuard",
    "NetSpec",
    "SandboxHook",
    "SandboxLink",
    "Subnet",
    "create_tap",
    "delete_tap",
    "random_mac",
    "tap_exists",
    "tap_up",
]

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1, no '/' or spaces
_NETNS = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def random_mac() -> str:
    """A random locally administered unicast MAC (first octet 0x02 | random bits, multicast bit clear)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def _check_mac(mac: str) -> str:
    m = mac.lower()
    if not _MAC.match(m):
        raise ValueError(f"MAC {mac!r}: expected six hex octets separated by ':' (e.g. 02:00:00:00:07:02)")
    if int(m[:2], 16) & 1:
        raise ValueError(f"MAC {mac!r} is a multicast address; a NIC needs a unicast one (first octet even)")
    return m


def _check_ifname(name: str, what: str = "tap") -> str:
    if not _IFNAME.match(name):
        raise ValueError(f"{what} name {name!r}: 1-15 characters from [A-Za-z0-9_.-]")
    return name


@dataclass(frozen=True)
class NetSpec:
    """One VM's network: guest address, gateway (its only route and its DNS), MAC, tap name and namespace."""

    ip: str
    gateway_ip: str
    prefix: int = 24
    dns: str | None = None  # None: the gateway address
    mac: str | None = None  # None: a random locally administered MAC, chosen when the VM is created
    netns: str | None = None  # an `ip netns` name; None: the caller's namespace
    tap: str | None = None  # None: "cxe" + the VM id

    def __post_init__(self) -> None:
        try:
            ip = ipaddress.IPv4Address(self.ip)
            gw = ipaddress.IPv4Address(self.gateway_ip)
            if self.dns is not None:
                ipaddress.IPv4Address(self.dns)
        except ValueError as e:
            raise ValueError(f"NetSpec: {e} (IPv4 addresses only)") from None
        if not 8 <= self.prefix <= 30:
            raise ValueError(f"NetSpec: prefix /{self.prefix}: use /8 to /30")
        net = ipaddress.IPv4Network(f"{ip}/{self.prefix}", strict=False)
        if gw not in net:
            raise ValueError(f"NetSpec: gateway {gw} is not inside the guest's network {net} (the guest ARPs for it)")
        if ip == gw:
            raise ValueError(f"NetSpec: guest and gateway share the address {ip}")
        if self.mac is not None:
            object.__setattr__(self, "mac", _check_mac(self.mac))
        if self.tap is not None:
            _check_ifname(self.tap)
        if self.netns is not None and not _NETNS.match(self.netns):
            raise ValueError(f"NetSpec: network namespace name {self.netns!r} is not valid")

    def for_vm(self, vm_id: str) -> NetSpec:
        """This spec with every default filled in for VM ``vm_id`` (tap name, MAC, DNS)."""
        return replace(
            self,
            tap=self.tap or f"cxe{vm_id}"[:15],
            mac=self.mac or random_mac(),
            dns=self.dns or self.gateway_ip,
        )

    def kernel_args(self) -> str:
        """The guest init's network keys on the kernel command line (see the image contract)."""
        return f"cube.ip={self.ip}/{self.prefix} cube.gw={self.gateway_ip} cube.dns={self.dns or self.gateway_ip}"


@dataclass(frozen=True)
class SandboxLink:
    """What the hooks get: which tap (in which namespace) carries which sandbox, with its addresses."""

    sandbox_id: str
    vm_id: str
    tap: str
    netns: str | None
    ip: str
    mac: str
    gateway_ip: str
    prefix: int


@runtime_checkable
class SandboxHook(Protocol):
    """Called after a VM's tap exists and before its guest runs; and before the tap is removed.

    ``sandbox_up`` raising aborts the VM's start (the VM is destroyed, earlier hooks get ``sandbox_down``).
    ``sandbox_down`` errors are collected and reported by ``destroy`` after every cleanup step ran.
    """

    def sandbox_up(self, link: SandboxLink) -> None: ...

    def sandbox_down(self, link: SandboxLink) -> None: ...


class EbpfGuard:
    """The kernel guard as a hook: ``ebpf.attach_sandbox`` on the host side of the tap, ``detach`` at the end.

    The guard's gateway address is the tap's (the :class:`NetSpec` gateway); the ports must match the gateway's
    listeners (docs/enforcement.md, "Wiring a sandbox").
    """

    def __init__(
        self,
        *,
        transparent_port: int = 3129,
        proxy_port: int = 3128,
        dns_port: int = 53,
        ports: tuple[int, ...] = (),
        redirect: bool = True,
    ) -> None:
        self.transparent_port = transparent_port
        self.proxy_port = proxy_port
        self.dns_port = dns_port
        self.ports = tuple(ports)
        self.redirect = redirect

    def sandbox_up(self, link: SandboxLink) -> None:
        import ebpf  # lazily: the guard needs bcc and root, a VM without it does not

        ebpf.attach_sandbox(
            link.tap,
            ip=link.ip,
            mac=link.mac,
            sandbox_id=link.sandbox_id,
            gateway_ip=link.gateway_ip,
            transparent_port=self.transparent_port,
            proxy_port=self.proxy_port,
            dns_port=self.dns_port,
            ports=self.ports,
            netns=link.netns,
            redirect=self.redirect,
        )

    def sandbox_down(self, link: SandboxLink) -> None:
        import ebpf

        ebpf.detach_sandbox(link.tap, netns=link.netns)


class Subnet:
    """Hands out guest addresses (and fresh MACs) from one network whose gateway is the tap-side address.

    Thread-safe. Addresses in ``exclude`` (e.g. those of VMs found by ``list_vms``) and the gateway are never
    handed out; :meth:`release` returns one.
    """

    def __init__(
        self,
        cidr: str,
        gateway_ip: str,
        *,
        netns: str | None = None,
        dns: str | None = None,
        exclude: Iterable[str] = (),
    ) -> None:
        try:
            self.network = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as e:
            raise ValueError(f"Subnet {cidr!r}: {e}") from None
        self.gateway_ip = gateway_ip
        self.netns = netns
        self.dns = dns
        NetSpec(ip=str(self.network.network_address + 2), gateway_ip=gateway_ip, prefix=self.network.prefixlen)
        self._used = {ipaddress.IPv4Address(gateway_ip), *(ipaddress.IPv4Address(a) for a in exclude)}
        self._lock = threading.Lock()

    def lease(self) -> NetSpec:
        with self._lock:
            for host in self.network.hosts():
                if host not in self._used:
                    self._used.add(host)
                    return NetSpec(
                        ip=str(host),
                        gateway_ip=self.gateway_ip,
                        prefix=self.network.prefixlen,
                        dns=self.dns,
                        netns=self.netns,
                    )
        raise VMError(f"subnet {self.network}: no free guest address left")

    def release(self, ip: str) -> None:
        with self._lock:
            self._used.discard(ipaddress.IPv4Address(ip))


# -- netlink, on a short-lived thread in the namespace ---------------------------------------------------------------


def _in_netns[T](netns: str | None, fn: Callable[[Any], T]) -> T:
    """Run ``fn(IPRoute())`` on a new thread that entered ``netns`` and ends afterwards.

    A thread per call (~1 ms) rather than a cached one: a thread parked in a namespace would keep a deleted
    namespace alive, and a namespace deleted and re-created under the same name would be a different one.
    """
    if netns is not None and not os.path.exists(f"/run/netns/{netns}"):
        raise VMError(f"network namespace {netns!r} does not exist (create it with `ip netns add {netns}`)")

    def _body() -> T:
        if netns is not None:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.setns(fd, os.CLONE_NEWNET)
            finally:
                os.close(fd)
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return fn(ipr)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxe-netlink") as ex:
        return ex.submit(_body).result(timeout=30)


def _where(netns: str | None) -> str:
    return f" in namespace {netns}" if netns else ""


def create_tap(name: str, netns: str | None = None) -> None:
    """Create a persistent tap ``name`` (down, no address). Fails if the name is taken."""
    _check_ifname(name)

    def _create(ipr: Any) -> None:
        if ipr.link_lookup(ifname=name):
            raise VMError(f"tap {name}{_where(netns)} already exists (a leftover? run cleanup_stale())")
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")

    try:
        _in_netns(netns, _create)
    except VMError:
        raise
    except Exception as e:
        raise VMError(f"cannot create tap {name}{_where(netns)}: {e} (root needed)") from e


def configure_tap(name: str, netns: str | None, *, gateway_ip: str) -> None:
    """Give the tap's host side the gateway address (/32); the link stays down until :func:`tap_up`, so that the
    hooks (the guard first of all) are in place before a running guest's first frame can arrive."""

    def _configure(ipr: Any) -> None:
        index = _tap_index(ipr, name, netns)
        # rp_filter would drop a guest whose source is only routed via its own /32: set loose explicitly.
        with contextlib.suppress(OSError), open(f"/proc/sys/net/ipv4/conf/{name}/rp_filter", "w") as f:
            f.write("2")
        with contextlib.suppress(Exception):  # already there after a restart of the same VM: keep it
            ipr.addr("add", index=index, address=gateway_ip, prefixlen=32)

    _tap_call(name, netns, "configure", _configure)


def tap_up(name: str, netns: str | None, *, guest_ip: str) -> None:
    """Bring the tap up and route the guest's /32 through it (a route needs the link up)."""

    def _up(ipr: Any) -> None:
        index = _tap_index(ipr, name, netns)
        ipr.link("set", index=index, state="up")
        ipr.route("replace", dst=f"{guest_ip}/32", oif=index, scope=253)  # scope link

    _tap_call(name, netns, "bring up", _up)


def _tap_index(ipr: Any, name: str, netns: str | None) -> int:
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        raise VMError(f"tap {name}{_where(netns)} is gone")
    return int(idx[0])


def _tap_call(name: str, netns: str | None, what: str, fn: Callable[[Any], None]) -> None:
    try:
        _in_netns(netns, fn)
    except VMError:
        raise
    except Exception as e:
        raise VMError(f"cannot {what} tap {name}{_where(netns)}: {e}") from e


def delete_tap(name: str, netns: str | None = None) -> bool:
    """Remove tap ``name`` (with its routes); False when it was not there (or the namespace is gone)."""
    if netns is not None and not os.path.exists(f"/run/netns/{netns}"):
        return False

    def _delete(ipr: Any) -> bool:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return False
        ipr.link("del", index=idx[0])
        return True

    try:
        return _in_netns(netns, _delete)
    except Exception as e:
        raise VMError(f"cannot remove tap {name}{_where(netns)}: {e}") from e


def tap_exists(name: str, netns: str | None = None) -> bool:
    if netns is not None and not os.path.exists(f"/run/netns/{netns}"):
        return False
    return bool(_in_netns(netns, lambda ipr: ipr.link_lookup(ifname=name)))
