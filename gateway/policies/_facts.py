"""Building RequestFacts from a URL: what `policy explain`, `policy test`, replay and benchmarks ask about."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from ._decide import RequestFacts
from ._hosts import normalize_host
from ._model import Scheme

__all__ = ["facts_from_url"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def facts_from_url(method: str | None, url: str, headers: Iterable[tuple[str, str]] = ()) -> RequestFacts:
    """`method=None` asks the connection-phase question (what a CONNECT / ClientHello would get)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "tcp"):
        raise ValueError(f"{url!r}: scheme must be http, https or tcp")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    port = parts.port or _DEFAULT_PORTS.get(scheme)
    if port is None:
        raise ValueError(f"{url!r}: a tcp URL needs a port")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return RequestFacts(
        scheme=Scheme(scheme),
        host=normalize_host(parts.hostname),
        port=port,
        method=method.upper() if method else None,
        path=path if method else None,
        headers=tuple((k.lower(), v) for k, v in headers),
    )
