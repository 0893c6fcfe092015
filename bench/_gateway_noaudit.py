"""`python -m bench._gateway_noaudit run --config FILE`: the gateway with every audit record discarded.

The `no audit` baseline of `python -m bench audit` and nothing else: a gateway without its audit log does not exist
outside this bench. Everything but the audit log is the real gateway (same config, addon, policy, mitmproxy).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from gateway import server
from gateway.audit import AuditLog
from gateway.cli import main


class DiscardingAuditLog(AuditLog):
    """Records are dropped at the door: no line is built, hashed, written or fsynced."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(None)

    def write(self, record: Mapping[str, Any]) -> int:
        return 0


if __name__ == "__main__":
    server.AuditLog = DiscardingAuditLog  # type: ignore[attr-defined]  # what server._open_audit constructs
    sys.exit(main(sys.argv[1:]))
