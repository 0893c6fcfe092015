"""Drop reports from the kernel guard (ebpf/) into the audit log as `packet_dropped` security events.

The guard drops what a sandbox must not send (QUIC, other ports, spoofing, ...) before it reaches the gateway's
sockets; the kernel reports each drop through a ring buffer in the gateway's network namespace. This task reads
it and writes one record per (sandbox, destination, protocol, port, reason) and window, with the folded count.
Only one reader per namespace should run (ring buffers hand each report to one reader): hence opt-in config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .audit import AuditLog
from .metrics import GatewayMetrics

__all__ = ["report_drops"]

log = logging.getLogger("cube_egress.enforcement")


async def report_drops(audit: AuditLog, retry_s: float = 2.0, metrics: GatewayMetrics | None = None) -> None:
    """Run until cancelled. Waits for the guard to be attached in this namespace (a sandbox may come later)."""
    import ebpf  # imported here: the gateway runs without bcc where no kernel enforcement is configured
    from ebpf.enforcer import Enforcer
    from ebpf.events import DropReporter, EventReader

    reason = ebpf.unavailable_reason()
    if reason is not None:
        log.warning("drop reports disabled: kernel enforcement unavailable (%s)", reason)
        return
    reporter = DropReporter(lambda fields: audit.security("packet_dropped", **fields))
    while True:
        try:
            enforcer = Enforcer.open(None, create=False)
        except FileNotFoundError:
            await asyncio.sleep(retry_s)  # no guard attached in this namespace yet
            continue
        try:
            reader = EventReader(enforcer.maps["cxe_events"].fd)
        finally:
            enforcer.close()
        log.info("reporting kernel drops as packet_dropped audit events")
        with contextlib.closing(reader):
            async for event in reader:
                if metrics is not None:
                    metrics.count_kernel_drop(event.reason)  # every drop; the audit folds repeats per window
                reporter.feed(event)
