"""Small namespace helpers shared by the service fixtures (OpenBao, PostgreSQL, fake APIs).

* :class:`NetnsThread` runs Python callables in a dedicated thread that has ``setns``'d into one of the world's
  network namespaces. Sockets are bound to the namespace of the thread that *creates* them, so an HTTP call made
  in that thread talks to ``127.0.0.1`` *of the gateway namespace* without starting a process per call (a
  subprocess per OpenBao API call would cost ~100 ms each). Only the network namespace changes: the thread still
  sees the host's ``/etc/resolv.conf``, so use IP addresses there, never names (a name lookup would go to the
  host's resolver address, which has no route inside the world, so it fails rather than leaks).
* :func:`ensure_internet_ip` / :func:`remove_internet_ip` give an extra service address to the internet
  namespace the same way ``world.py`` does for its own servers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .world import Role, World

__all__ = ["NetnsThread", "ensure_internet_ip", "remove_internet_ip"]

T = TypeVar("T")

_DOC_NET_ON_LINK = ipaddress.ip_network("198.51.100.0/24")  # on the gateway<->internet link: the gateway ARPs for it
_DOC_NET_ROUTED = ipaddress.ip_network("203.0.113.0/24")  # routed by the gateway via the internet router: lives on lo


class NetnsThread:
    """One worker thread living in a world namespace; :meth:`call` runs a function there and returns its result.

    Exceptions propagate to the caller. The thread never returns to the root namespace, so it is only ever used
    for this namespace and dies with :meth:`close` (also a context manager).
    """

    def __init__(self, world: World, role: Role) -> None:
        self.role = role
        self._path = f"/run/netns/{world.ns_name(role)}"
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"netns-{role}", initializer=self._enter
        )
        self._closed = False
        self._lock = threading.Lock()
        # Fail now, in the caller, if setns is impossible (the executor would otherwise report it on first use).
        self.call(lambda: None)

    def _enter(self) -> None:
        fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.setns(fd, os.CLONE_NEWNET)
        finally:
            os.close(fd)

    def call(self, fn: Callable[..., T], *args: object, timeout: float = 60) -> T:
        """Run ``fn(*args)`` in the namespace thread; raise what it raised (or TimeoutError)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"NetnsThread({self.role}) is closed")
            future = self._pool.submit(fn, *args)
        return future.result(timeout=timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> NetnsThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _internet_dev(world: World, ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    if addr in _DOC_NET_ON_LINK:
        return world.internet_if
    if addr in _DOC_NET_ROUTED:
        return "lo"
    # Only documentation ranges may be used for "internet" services: the world's hermeticity argument relies on it.
    raise ValueError(f"{ip} is outside 198.51.100.0/24 and 203.0.113.0/24; use a documentation address")


def _has_ip(world: World, ip: str) -> bool:
    out = world.run("internet", ["ip", "-o", "-4", "addr", "show"], check=True).stdout
    return any(f" {ip}/" in line for line in out.splitlines())


def ensure_internet_ip(world: World, ip: str) -> bool:
    """Give ``ip`` to the internet namespace (a /32 on the veth for 198.51.100.x, on lo for 203.0.113.x) unless it
    is already there. Returns True when this call added it (so the caller knows to remove it again)."""
    dev = _internet_dev(world, ip)
    if _has_ip(world, ip):
        return False
    world.run("internet", ["ip", "addr", "add", f"{ip}/32", "dev", dev], check=True)
    return True


def remove_internet_ip(world: World, ip: str) -> None:
    """Undo :func:`ensure_internet_ip` (no error if the address or the world is already gone)."""
    with contextlib.suppress(Exception):
        world.run("internet", ["ip", "addr", "del", f"{ip}/32", "dev", _internet_dev(world, ip)])
