"""Echo protection: an allowed upstream that reflects the request back must not hand the credential to the sandbox.

Responses to a request that carried an injected credential are scanned for the inserted values in every form a
reflector is likely to use (raw, URL-encoded, base64 at any alignment); matches are overwritten with `*` of the same
length, so Content-Length and framing stay valid. The body is scanned as it streams: only a tail that could be the
start of a secret is held back between chunks, so server-sent events keep flowing.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

__all__ = ["EchoRedactor", "needles_for"]

_MIN_NEEDLE = 6  # shorter fragments would redact ordinary text; a credential is longer than this


def _b64_cores(value: bytes) -> list[bytes]:
    """Substrings that appear in any base64 text containing `value`, whatever its offset in the encoded data."""
    cores = []
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + value)
        start = math.ceil(shift * 4 / 3)
        tail = len(enc) - (4 if (shift + len(value)) % 3 else 0)
        core = enc[start:tail].rstrip(b"=")
        if len(core) >= _MIN_NEEDLE:
            cores.append(core)
            cores.append(core.replace(b"+", b"-").replace(b"/", b"_"))
    return cores


def needles_for(values: Iterable[str]) -> list[bytes]:
    out: set[bytes] = set()
    for value in values:
        raw = value.encode()
        if len(raw) < _MIN_NEEDLE:
            continue
        out.update({raw, quote(value, safe="").encode(), quote_plus(value).encode(), *_b64_cores(raw)})
    # Longest first: a longer form is redacted whole before a shorter one could cut into it.
    return sorted((n for n in out if len(n) >= _MIN_NEEDLE), key=len, reverse=True)


class EchoRedactor:
    """Callable for mitmproxy's `response.stream`: bytes in, redacted bytes out; `b""` flushes the held tail."""

    def __init__(self, needles: list[bytes]) -> None:
        self.needles = needles
        # For the tail check: every proper prefix of every needle, and the bytes such a prefix can start with.
        self._prefixes = {n[:k] for n in needles for k in range(1, len(n))}
        self._first_bytes = {n[0] for n in needles}
        self._window = max((len(n) for n in needles), default=1) - 1
        self._hold = b""
        self.hits = 0
        self.bytes_out = 0

    def redact(self, data: bytes, *, count: bool = True) -> bytes:
        for needle in self.needles:
            if needle in data:
                if count:
                    self.hits += data.count(needle)
                data = data.replace(needle, b"*" * len(needle))
        return data

    def _held_tail(self, data: bytes) -> int:
        """Length of the longest suffix of `data` that is a proper prefix of some needle (0 when none)."""
        if not self._window:
            return 0
        start = max(0, len(data) - self._window)
        for i in range(start, len(data)):  # earliest start first: the longest candidate suffix wins
            if data[i] in self._first_bytes and data[i:] in self._prefixes:
                return len(data) - i
        return 0

    def __call__(self, chunk: bytes) -> bytes:
        data = self.redact(self._hold + chunk)
        if not chunk:  # end of the body
            self._hold = b""
            self.bytes_out += len(data)
            return data
        keep = self._held_tail(data)
        self._hold = data[len(data) - keep :] if keep else b""
        out = data[: len(data) - keep]
        self.bytes_out += len(out)
        return out

    def redact_header_value(self, value: str) -> str:
        data = value.encode("utf-8", "surrogateescape")
        redacted = self.redact(data, count=False)  # the caller counts header redactions itself
        return value if redacted == data else redacted.decode("utf-8", "surrogateescape")
