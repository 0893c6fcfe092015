"""Drop reports from the kernel (the cxe_events ring buffer) and their audit form (packet_dropped).

The programs rate-limit reports to 50 per (sandbox, reason) and second (counters stay exact). One reader per
network namespace should consume them (the gateway): a BPF ring buffer has a single consumer position, so two
readers would split the reports between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from . import _libbpf
from ._layout import EVENT, mac_str
from .reasons import Code

__all__ = ["HOOKS", "PROTOCOLS", "DropEvent", "DropReporter", "EventReader"]

HOOKS = {1: "tc", 2: "connect4", 3: "sendmsg4", 4: "connect6", 5: "sendmsg6"}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 47: "gre", 50: "esp", 0: ""}


def _boot_offset() -> float:
    """Wall-clock seconds at monotonic zero (bpf_ktime_get_ns counts CLOCK_MONOTONIC)."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass(frozen=True)
class DropEvent:
    """One dropped frame (tc) or refused connect()/sendmsg() (cgroup hooks)."""

    time: float  # wall clock, seconds
    sandbox_id: str
    slot: int
    code: Code
    hook: str  # tc | connect4 | sendmsg4 | connect6 | sendmsg6
    ifindex: int
    cgroup_id: int
    family: int  # 4, 6, or 0 (not IP: ARP fields are in src/dst when family is 4)
    src: str
    dst: str
    sport: int
    dport: int  # ICMP: the ICMP type
    protocol: str  # tcp | udp | icmp | ... | "" ; for non-IP frames, "ethertype 0x...."
    ethertype: int
    src_mac: str

    @classmethod
    def decode(cls, raw: bytes, boot: float | None = None) -> DropEvent:
        (
            ts,
            cgid,
            slot,
            code,
            ifindex,
            saddr,
            daddr,
            daddr6,
            sport,
            dport,
            ethertype,
            proto,
            hook,
            smac,
            family,
            _pad,
            sid,
        ) = EVENT.unpack(raw[: EVENT.size])
        try:
            c = Code(code)
        except ValueError:
            c = Code.UNPARSED
        if family == 6:
            dst = str(ipaddress.IPv6Address(daddr6))
            src = ""
        elif family == 4:
            dst, src = socket.inet_ntoa(daddr), socket.inet_ntoa(saddr)
        else:
            dst = src = ""
        if ethertype == 0x0806:
            protocol = "arp"
        elif family:
            protocol = PROTOCOLS.get(proto, str(proto))
        else:
            protocol = f"ethertype 0x{ethertype:04x}" if hook == 1 else ""
        return cls(
            time=(boot if boot is not None else _boot_offset()) + ts / 1e9,
            sandbox_id=sid.split(b"\0", 1)[0].decode(errors="replace"),
            slot=slot,
            code=c,
            hook=HOOKS.get(hook, str(hook)),
            ifindex=ifindex,
            cgroup_id=cgid,
            family=family,
            src=src,
            dst=dst,
            sport=sport,
            dport=dport,
            protocol=protocol,
            ethertype=ethertype,
            src_mac=mac_str(smac) if hook == 1 else "",
        )

    @property
    def reason(self) -> str:
        return self.code.label

    def audit_fields(self) -> dict[str, Any]:
        """Fields of the gateway's ``packet_dropped`` security event for this drop."""
        return {
            "sandbox": self.sandbox_id or None,
            "reason": self.reason,
            "detail": self.code.description,
            "destination": self.dst or None,
            "port": self.dport if self.protocol in ("tcp", "udp") else None,
            "protocol": self.protocol or None,
            "source": self.src or None,
            "source_mac": self.src_mac or None,
            "hook": self.hook,
        }


class EventReader:
    """Reads drop reports from a namespace's ring buffer (pinned map ``cxe_events``).

    ``drain()`` returns what is queued without blocking, ``wait(timeout)`` blocks until something arrives, and
    ``async for ev in reader`` yields reports as they come (the ring buffer's epoll fd on the running loop).
    ``match`` filters (e.g. one sandbox's slot); non-matching reports are discarded.
    """

    def __init__(self, map_fd: int, match: Callable[[DropEvent], bool] | None = None) -> None:
        self._match = match
        self._pending: list[DropEvent] = []
        self._boot = _boot_offset()
        self._fd = os.dup(map_fd)  # ours: the reader outlives the Enforcer that opened the map
        self._rb = _libbpf.RingBuffer(self._fd, self._on_record)

    def _on_record(self, raw: bytes) -> None:
        ev = DropEvent.decode(raw, self._boot)
        if self._match is None or self._match(ev):
            self._pending.append(ev)

    def drain(self) -> list[DropEvent]:
        self._rb.consume()
        out, self._pending = self._pending, []
        return out

    def wait(self, timeout: float) -> list[DropEvent]:
        """Block up to ``timeout`` seconds for at least one (matching) report; returns all queued ones."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.drain()
            left = deadline - time.monotonic()
            if got or left <= 0:
                return got
            select.select([self._rb.fileno()], [], [], left)

    async def __aiter__(self) -> AsyncIterator[DropEvent]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        fd = self._rb.fileno()
        loop.add_reader(fd, ready.set)
        try:
            while True:
                for ev in self.drain():
                    yield ev
                await ready.wait()
                ready.clear()
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)

    def close(self) -> None:
        self._rb.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DropReporter:
    """Turns drop reports into ``packet_dropped`` audit records: at most one per (sandbox, destination,
    protocol, port, reason) and ``window_s``; the next record of a key carries how many were folded into it.

    ``emit`` receives the audit fields (e.g. ``lambda f: audit.security("packet_dropped", **f)``).
    """

    def __init__(self, emit: Callable[[dict[str, Any]], None], window_s: float = 10.0) -> None:
        self.emit = emit
        self.window_s = window_s
        self._last: dict[tuple[str, str, str, int | None, str], tuple[float, int]] = {}

    def feed(self, ev: DropEvent) -> bool:
        fields = ev.audit_fields()
        key = (ev.sandbox_id, ev.dst, ev.protocol, fields["port"], ev.reason)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.window_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        folded = last[1] if last is not None else 0
        self._last[key] = (now, 0)
        self.emit({**fields, "count": folded + 1})
        if len(self._last) > 10_000:  # forget keys idle for a window
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.window_s}
        return True
