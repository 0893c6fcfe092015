"""Interfaces, tc (via pyroute2) and nftables, inside a named network namespace or the current one.

pyroute2's synchronous IPRoute cannot run inside a running asyncio loop, so every call here runs on a short-lived
worker thread: the public API is usable from plain code and from coroutines alike.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "FILTER_HANDLE",
    "FILTER_PRIO",
    "INGRESS",
    "IfaceInfo",
    "NetError",
    "attach_filter",
    "detach_filter",
    "iface_info",
    "ingress_filters",
    "links",
    "netns_inode",
    "netns_key",
    "nft_install",
    "nft_install_guard",
    "nft_remove_guard",
    "nft_unredirected",
    "nft_remove",
    "nft_table",
    "nft_table_exists",
]

T = TypeVar("T")

INGRESS = 0xFFFFFFF2  # clsact ingress (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)): frames the sandbox sends
EGRESS = 0xFFFFFFF3
FILTER_PRIO = 1  # first: our verdict is final (direct action), nothing before it can pass a frame
FILTER_HANDLE = 0xCE1
ETH_P_ALL = 0x0003


class NetError(RuntimeError):
    pass


def _in_thread[T](fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on a new thread that ends afterwards (it may have entered another network namespace)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxe-netlink") as ex:
        return ex.submit(fn, *args).result()  # the executor's only thread exits at shutdown


def netns_inode(netns: str | None) -> int:
    """Identity of a network namespace (its nsfs inode); the current one when ``netns`` is None."""
    path = f"/run/netns/{netns}" if netns else "/proc/thread-self/ns/net"
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        raise NetError(f"network namespace {netns!r} does not exist (no {path})") from None


SO_NETNS_COOKIE = 71


def _enter(netns: str | None) -> None:
    """Move the calling thread into ``netns`` (a worker thread of :func:`_in_thread`)."""
    if netns is None:
        return
    path = f"/run/netns/{netns}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetError(f"network namespace {netns!r} does not exist (no {path})") from None
    try:
        os.setns(fd, os.CLONE_NEWNET)
    finally:
        os.close(fd)


def _netns_key(netns: str | None) -> str:
    _enter(netns)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            cookie = struct.unpack("<Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
            return f"net{cookie}"
        except OSError:  # kernel < 5.14: the inode (may be reused after the namespace is gone)
            return f"ino{os.stat('/proc/thread-self/ns/net').st_ino}"


def netns_key(netns: str | None) -> str:
    """A name for a network namespace that is never reused while the machine runs (its netns cookie)."""
    return _in_thread(_netns_key, netns)


def _ipr(netns: str | None) -> Any:
    """An IPRoute socket in ``netns``. Called on a throwaway worker thread (see :func:`_in_thread`): the thread
    itself enters the namespace (setns affects only the calling thread), so no process is forked. pyroute2's own
    ``netns=`` forks a helper, which can deadlock in a multi-threaded process and would create a missing
    namespace."""
    from pyroute2 import IPRoute

    _enter(netns)
    return IPRoute()


@dataclass(frozen=True)
class IfaceInfo:
    index: int
    name: str
    mac: str
    ipv4: tuple[str, ...]


def _links(netns: str | None) -> dict[int, str]:
    with _ipr(netns) as ipr:
        return {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}


def links(netns: str | None) -> dict[int, str]:
    """ifindex -> name of every interface in the namespace."""
    return _in_thread(_links, netns)


def _iface_info(netns: str | None, ifname: str) -> IfaceInfo | None:
    with _ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return None
        idx = int(found[0])
        link = ipr.get_links(idx)[0]
        mac = str(link.get_attr("IFLA_ADDRESS") or "")
        addrs = tuple(str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=idx, family=2))
        return IfaceInfo(idx, ifname, mac, addrs)


def iface_info(netns: str | None, ifname: str) -> IfaceInfo | None:
    """Index, MAC and IPv4 addresses of an interface, or None when it does not exist."""
    return _in_thread(_iface_info, netns, ifname)


def _filters(ipr: Any, idx: int, parent: int) -> list[dict[str, Any]]:
    out = []
    for msg in ipr.get_filters(index=idx, parent=parent):
        if msg.get("handle", 0) == 0:  # the per-priority chain header, not a filter
            continue
        opts = msg.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        flags = opts.get_attr("TCA_BPF_FLAGS") if opts is not None else None
        out.append(
            {
                "kind": msg.get_attr("TCA_KIND"),
                "prio": msg["info"] >> 16,
                "protocol": ((msg["info"] & 0xFF) << 8) | ((msg["info"] >> 8) & 0xFF),
                "handle": msg["handle"],
                "name": name,
                "direct_action": bool(flags and flags & 1),
            }
        )
    return out


def _has_clsact(ipr: Any, idx: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=idx))


def _attach(netns: str | None, ifname: str, prog_fd: int, prog_name: str) -> None:
    with _ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise NetError(f"no interface {ifname!r}" + (f" in network namespace {netns!r}" if netns else ""))
        idx = found[0]
        if not _has_clsact(ipr, idx):
            ipr.tc("add", "clsact", idx)
        # replace: attaching twice leaves one filter, now running the given program.
        ipr.tc(
            "replace-filter",
            "bpf",
            idx,
            handle=FILTER_HANDLE,
            fd=prog_fd,
            name=prog_name,
            parent=INGRESS,
            prio=FILTER_PRIO,
            protocol=ETH_P_ALL,
            direct_action=True,
            classid=1,
        )


def attach_filter(netns: str | None, ifname: str, prog_fd: int, prog_name: str) -> None:
    """clsact on the interface (if missing) and our filter first on its ingress, protocol all, direct action."""
    _in_thread(_attach, netns, ifname, prog_fd, prog_name)


def _detach(netns: str | None, ifname: str, prefix: str) -> bool:
    with _ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False  # the interface is gone, and its qdisc and filters with it
        idx = found[0]
        if not _has_clsact(ipr, idx):
            return False
        removed = False
        for f in _filters(ipr, idx, INGRESS):
            if f["kind"] == "bpf" and (f["name"] or "").startswith(prefix):
                ipr.tc(
                    "del-filter",
                    "bpf",
                    idx,
                    handle=f["handle"],
                    parent=INGRESS,
                    prio=f["prio"],
                    protocol=f["protocol"],
                )
                removed = True
        if not _filters(ipr, idx, INGRESS) and not _filters(ipr, idx, EGRESS):
            ipr.tc("del", "clsact", idx)  # ours alone: leave the interface as it was
        return removed


def detach_filter(netns: str | None, ifname: str, prefix: str) -> bool:
    """Remove our filters (by program-name prefix) from the interface, and the clsact qdisc when nothing else
    uses it. True when a filter was removed; no error when the interface or the filter is already gone."""
    return _in_thread(_detach, netns, ifname, prefix)


def _ingress_filters(netns: str | None, ifname: str) -> tuple[bool, list[dict[str, Any]]] | None:
    with _ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return None
        idx = found[0]
        if not _has_clsact(ipr, idx):
            return False, []
        return True, _filters(ipr, idx, INGRESS)


def ingress_filters(netns: str | None, ifname: str) -> tuple[bool, list[dict[str, Any]]] | None:
    """(clsact present, ingress filters) of an interface; None when the interface does not exist."""
    return _in_thread(_ingress_filters, netns, ifname)


# -- nftables -------------------------------------------------------------------------------------------------


def nft_table(ifname: str) -> str:
    """The per-sandbox nft table (family ip): ``cxe_<ifname>`` with unsafe characters replaced."""
    return "cxe_" + re.sub(r"[^A-Za-z0-9_]", "_", ifname)


def _nft(netns: str | None, script: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["nft", *args] if script is None else ["nft", "-f", "-"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        return subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as e:
        raise NetError(f"nftables is needed for the transparent redirect: {e}") from e


GUARD_TABLE = "cube_egress"


def nft_install(netns: str | None, ifname: str, transparent_port: int, mark: int) -> None:
    """Redirect marked TCP arriving on the interface to the transparent port (table ``cxe_<ifname>``).

    Replaced atomically (one nft transaction), so attaching twice is harmless.
    """
    t = nft_table(ifname)
    script = (
        f"add table ip {t}\n"
        f"delete table ip {t}\n"
        f"table ip {t} {{\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat - 10; policy accept;\n"
        f'    iifname "{ifname}" meta mark {mark:#x} meta l4proto tcp redirect to :{int(transparent_port)}\n'
        "  }\n"
        "}\n"
    )
    proc = _nft(netns, script)
    if proc.returncode != 0:
        raise NetError(f"nft could not install table {t}: {proc.stderr.strip()}")


def nft_install_guard(netns: str | None, mark: int) -> None:
    """Namespace-wide table ``cube_egress``: drop any marked packet that would be forwarded (its redirect is
    missing), whatever the interface, so a marked packet never leaves even with ip_forward=1."""
    t = GUARD_TABLE
    if nft_table_exists(netns, t):
        return  # keep its counter
    script = (
        f"table ip {t} {{\n"
        "  counter unredirected {}\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter - 10; policy accept;\n"
        f'    meta mark {mark:#x} counter name "unredirected" drop\n'
        "  }\n"
        "}\n"
    )
    proc = _nft(netns, script)
    if proc.returncode != 0:
        raise NetError(f"nft could not install table {t}: {proc.stderr.strip()}")


def nft_remove_guard(netns: str | None) -> None:
    t = GUARD_TABLE
    proc = _nft(netns, f"add table ip {t}\ndelete table ip {t}\n")
    if proc.returncode != 0:
        raise NetError(f"nft could not remove table {t}: {proc.stderr.strip()}")


def nft_unredirected(netns: str | None) -> int | None:
    """Packets the forward rule dropped (marked but not redirected); None when the table is absent."""
    proc = _nft(netns, None, "list", "counter", "ip", GUARD_TABLE, "unredirected")
    if proc.returncode != 0:
        return None
    m = re.search(r"packets (\d+)", proc.stdout)
    return int(m.group(1)) if m else None


def nft_remove(netns: str | None, ifname: str) -> None:
    t = nft_table(ifname)
    proc = _nft(netns, f"add table ip {t}\ndelete table ip {t}\n")
    if proc.returncode != 0:
        raise NetError(f"nft could not remove table {t}: {proc.stderr.strip()}")


def nft_table_exists(netns: str | None, table: str) -> bool:
    return _nft(netns, None, "list", "table", "ip", table).returncode == 0
