"""The validated, compiled policy model: frozen values the decision core reads and never changes."""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..injectors import InjectorParams
from ._hosts import HostPattern
from ._yaml import Position

__all__ = [
    "CORRELATION_INVALID",
    "DEFAULT_PORTS",
    "CorrelationSpec",
    "CredentialRef",
    "HeaderCondition",
    "IPNetwork",
    "LimitScope",
    "LimitSubject",
    "Mode",
    "PathMatcher",
    "PortSet",
    "Rule",
    "Sandbox",
    "Scheme",
    "SecretRef",
    "UsageLimit",
    "Verdict",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Verdict(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Mode(enum.StrEnum):
    """ENFORCE blocks a deny; REPORT records the would-deny and lets the request pass (for rolling out a rule)."""

    ENFORCE = "enforce"
    REPORT = "report"


class Scheme(enum.StrEnum):
    HTTP = "http"
    HTTPS = "https"
    TCP = "tcp"  # a raw TCP tunnel through explicit CONNECT, never inspected


DEFAULT_PORTS = {Scheme.HTTP: 80, Scheme.HTTPS: 443}


@dataclass(frozen=True, slots=True)
class PortSet:
    ranges: tuple[tuple[int, int], ...]

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and any(lo <= port <= hi for lo, hi in self.ranges)

    def __str__(self) -> str:
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)


def _glob_regex(pattern: str, *, segment: str) -> re.Pattern[str]:
    """`**` matches anything, `*` anything but `segment` (the path separator), `?` one such character."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(f"[^{re.escape(segment)}]*" if segment else ".*")
            i += 1
        elif pattern[i] == "?":
            out.append(f"[^{re.escape(segment)}]" if segment else ".")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


@dataclass(frozen=True, slots=True)
class PathMatcher:
    kind: str  # "exact" | "prefix" | "glob"
    pattern: str
    regex: re.Pattern[str] | None = field(default=None, compare=False)

    @classmethod
    def build(cls, kind: str, pattern: str) -> PathMatcher:
        regex = _glob_regex(pattern, segment="/") if kind == "glob" else None
        return cls(kind, pattern, regex)

    def matches(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.pattern
        if self.kind == "prefix":
            return path.startswith(self.pattern)
        assert self.regex is not None
        return self.regex.match(path) is not None


@dataclass(frozen=True, slots=True)
class HeaderCondition:
    """The header must be present and (one of) its values must match the glob."""

    name: str  # lower case
    pattern: str
    regex: re.Pattern[str] = field(compare=False)

    @classmethod
    def build(cls, name: str, pattern: str) -> HeaderCondition:
        return cls(name.lower(), pattern, _glob_regex(pattern, segment=""))

    def matches(self, headers: tuple[tuple[str, str], ...]) -> bool:
        return any(n == self.name and self.regex.match(v) is not None for n, v in headers)


@dataclass(frozen=True, slots=True)
class SecretRef:
    """`path[#field]` for a static secret, `dynamic:path` for a credential leased per sandbox."""

    path: str
    field: str | None = None
    dynamic: bool = False

    @classmethod
    def parse(cls, text: str) -> SecretRef:
        dynamic = text.startswith("dynamic:")
        body = text.removeprefix("dynamic:")
        path, _, field = body.partition("#")
        path = path.strip("/")
        if not path:
            raise ValueError(f"secret reference {text!r} has no path")
        if dynamic and field:
            raise ValueError("a dynamic secret reference names a path only; injectors pick its fields")
        return cls(path, field or None, dynamic)

    def __str__(self) -> str:
        return ("dynamic:" if self.dynamic else "") + self.path + (f"#{self.field}" if self.field else "")


class LimitSubject(enum.StrEnum):
    SANDBOX = "sandbox"
    CREDENTIAL = "credential"


class LimitScope(enum.StrEnum):
    """Whose budget a credential limit is: one shared by every sandbox using it, or one per sandbox."""

    GLOBAL = "global"
    SANDBOX = "sandbox"


@dataclass(frozen=True, slots=True)
class UsageLimit:
    """A usage limit as the policy states it. The counting is stateful and lives outside the core
    (`gateway/limits.py`); counters are keyed by names (`meter_key`), so they survive a policy reload."""

    subject: LimitSubject
    name: str  # the sandbox id or the credential name
    scope: LimitScope  # always SANDBOX for a sandbox's own limits
    requests_per_minute: int | None
    bytes_per_session: int | None
    mode: Mode
    position: Position = field(compare=False)

    def meter_key(self, sandbox_id: str) -> tuple[str, str, str]:
        if self.subject is LimitSubject.SANDBOX:
            return (LimitSubject.SANDBOX.value, self.name, "")
        return (LimitSubject.CREDENTIAL.value, self.name, "*" if self.scope is LimitScope.GLOBAL else sandbox_id)


CORRELATION_INVALID = "<invalid>"
"""What a record shows for a correlation header whose value is not short printable ASCII, or that is repeated."""


@dataclass(frozen=True, slots=True)
class CorrelationSpec:
    """Which request headers carry agent correlation ids (lower case) and how long their values may be."""

    headers: tuple[str, ...] = ()
    max_length: int = 128

    def extract(self, headers: Iterable[tuple[str, str]]) -> dict[str, str]:
        """The correlation values of a request, by lower-case header name. A value that is too long, empty, not
        printable ASCII or sent twice becomes CORRELATION_INVALID: records stay small and parseable, and nothing
        the sandbox smuggles into these headers reaches the audit log."""
        if not self.headers:
            return {}
        found: dict[str, str] = {}
        for name, value in headers:
            key = name.lower()
            if key not in self.headers:
                continue
            ok = 0 < len(value) <= self.max_length and all(" " <= c <= "~" for c in value)
            found[key] = CORRELATION_INVALID if key in found or not ok else value
        return found


@dataclass(frozen=True, slots=True)
class CredentialRef:
    """What a rule says to inject: a named secret (a reference, never a value) and how it enters the request."""

    name: str
    secret: str
    injector: InjectorParams
    limits: UsageLimit | None = None

    @property
    def kind(self) -> str:
        return self.injector.kind


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    policy: str
    action: Verdict
    mode: Mode
    hosts: tuple[HostPattern, ...]
    cidrs: tuple[IPNetwork, ...]
    ports: PortSet | None  # None: each scheme's default port
    schemes: frozenset[Scheme]
    methods: frozenset[str] | None
    paths: tuple[PathMatcher, ...] | None
    headers: tuple[HeaderCondition, ...]
    credential: CredentialRef | None
    position: Position = field(compare=False)

    def covers(self, scheme: Scheme, port: int) -> bool:
        """Does this rule's destination part (scheme and port) include this connection?"""
        if scheme not in self.schemes:
            return False
        return port == DEFAULT_PORTS.get(scheme) if self.ports is None else port in self.ports

    @property
    def has_request_conditions(self) -> bool:
        """True when only the HTTP request (not the connection) can tell whether this rule matches."""
        return self.methods is not None or self.paths is not None or bool(self.headers)

    @property
    def needs_interception(self) -> bool:
        return self.has_request_conditions or self.credential is not None

    def matches_request(self, method: str, path: str, headers: tuple[tuple[str, str], ...]) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.paths is not None:
            bare = path.split("?", 1)[0]
            if not any(p.matches(bare) for p in self.paths):
                return False
        return all(h.matches(headers) for h in self.headers)


@dataclass(frozen=True, slots=True)
class Sandbox:
    id: str
    labels: tuple[tuple[str, str], ...]
    sources: tuple[IPNetwork, ...]
    token_sha256: str | None
    policies: tuple[str, ...]
    default_mode: Mode
    position: Position = field(compare=False)
    limits: UsageLimit | None = None
