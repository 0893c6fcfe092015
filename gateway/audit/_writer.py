"""The audit log: one canonical JSON line per decision and per security event.

Lines are built from plain values (no mitmproxy objects), serialised with orjson with sorted keys so that the same
record always has the same bytes, and appended with a single write() each so concurrent readers never see half a
line. Secret values never reach this module: records name a credential, they never carry one.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

import orjson

from . import _fields as F

__all__ = ["AuditLog", "redact_path"]

_REDACTED = "REDACTED"


_PARAM_NAME = re.compile(r"^[A-Za-z0-9_.\-\[\]]{1,40}$")


def redact_path(path: str) -> str:
    """Keep the path and the names of query parameters; replace every value (tokens often travel there).

    A "name" that does not look like one (too long, odd characters, or a bare `?token` with no `=`) is itself
    replaced: the secret may be the whole query.
    """
    bare, sep, query = path.partition("?")
    if not sep:
        return bare
    parts = []
    for item in query.split("&"):
        name, eq, _ = item.partition("=")
        parts.append(f"{name}={_REDACTED}" if eq and _PARAM_NAME.match(name) else _REDACTED)
    return bare + "?" + "&".join(parts)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class AuditLog:
    """Append-only JSON-lines file. `path=None` keeps records in memory only (for `policy explain` and tests)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.records_written = 0

    def write(self, record: Mapping[str, Any]) -> None:
        line = orjson.dumps({F.TIME: _now(), **record}, option=orjson.OPT_SORT_KEYS) + b"\n"
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, line)
            self.records_written += 1

    def decision(self, **fields: Any) -> None:
        self.write({F.EVENT: F.EVENT_DECISION, **fields})

    def security(self, kind: str, **fields: Any) -> None:
        assert kind in F.SECURITY_KINDS, kind
        self.write({F.EVENT: F.EVENT_SECURITY, F.KIND: kind, **fields})

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
