"""Loading policy files: YAML with positions -> DTOs (structure) -> semantic checks -> CompiledPolicy.

Every problem found is collected, with its file:line:col, the rule it belongs to and a hint, and all of them are
raised together in one PolicyError, so an author fixes a file in one pass instead of one error per run.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pydantic

from ._decide import CompiledPolicy, path_is_ambiguous
from ._hosts import HostError, HostPattern
from ._model import (
    CorrelationSpec,
    CredentialRef,
    HeaderCondition,
    IPNetwork,
    LimitScope,
    LimitSubject,
    Mode,
    PathMatcher,
    PortSet,
    Rule,
    Sandbox,
    Scheme,
    SecretRef,
    UsageLimit,
    Verdict,
)
from ._schema import CredentialLimitDTO, LimitDTO, PolicyFileDTO, RuleDTO, SandboxDTO
from ._yaml import Located, PathKey, Position, YamlLoadError, load_yaml

__all__ = ["PolicyError", "PolicyIssue", "SandboxConflict", "add_sandboxes", "load_policy"]

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Correlation headers are stripped before upstream: none of these may be one (they frame the request, name the
# destination or carry credentials).
_NOT_CORRELATION = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "proxy-authorization",
        "proxy-connection",
        "authorization",
        "cookie",
    }
)


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    position: Position
    message: str
    rule_id: str | None = None
    hint: str | None = None
    severity: str = "error"

    def __str__(self) -> str:
        where = f" [rule {self.rule_id}]" if self.rule_id else ""
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"{self.position}: {self.severity}: {self.message}{where}{hint}"


class PolicyError(ValueError):
    """A policy set that cannot be loaded; `issues` lists every problem found."""

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


@dataclass(slots=True)
class _Ctx:
    issues: list[PolicyIssue] = field(default_factory=list)

    def error_count(self) -> int:
        return sum(1 for i in self.issues if i.severity == "error")

    def error(self, position: Position, message: str, rule_id: str | None = None, hint: str | None = None) -> None:
        self.issues.append(PolicyIssue(position, message, rule_id, hint))


@dataclass(slots=True)
class _File:
    path: str
    doc: Located
    dto: PolicyFileDTO


# -- reading files --------------------------------------------------------------------------------------------


def _data_path(value: Any, loc: tuple[int | str, ...]) -> PathKey:
    """Map a pydantic error location onto the document, skipping the union/tag names pydantic inserts."""
    out: list[str | int] = []
    for el in loc:
        if isinstance(value, dict) and isinstance(el, str) and value.get("kind") == el:
            continue  # the tag of a discriminated union (injector kinds), not a key in the file
        in_dict = isinstance(value, dict) and el in value
        in_list = isinstance(value, list) and isinstance(el, int) and 0 <= el < len(value)
        if in_dict or in_list:
            out.append(el)
            value = value[el]
    return tuple(out)


def _rule_id_at(value: Any, path: PathKey) -> str | None:
    """The id of the rule that `path` points into, for error messages."""
    if len(path) >= 4 and path[0] == "policies" and path[2] == "rules":
        try:
            rule = value["policies"][path[1]]["rules"][path[3]]
        except (KeyError, IndexError, TypeError):
            return None
        rid = rule.get("id") if isinstance(rule, dict) else None
        return rid if isinstance(rid, str) else None
    return None


def _schema_issues(doc: Located, exc: pydantic.ValidationError, ctx: _Ctx) -> None:
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = _data_path(doc.value, loc)
        rule_id = _rule_id_at(doc.value, path)
        kind = err["type"]
        hint: str | None = None
        if kind == "extra_forbidden":
            key = str(loc[-1])
            parent = path[:-1] if path and path[-1] == key else path
            allowed = _allowed_keys(doc.value, parent)
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = (
                f"did you mean {close[0]!r}?" if close else (f"allowed keys: {', '.join(allowed)}" if allowed else None)
            )
            ctx.error(doc.key_at((*parent, key)), f"unknown key {key!r}", rule_id, hint)
            continue
        if kind == "missing":
            ctx.error(doc.at(path), f"missing required key {str(loc[-1])!r}", rule_id)
            continue
        if kind == "literal_error" and loc and loc[-1] == "version":
            ctx.error(doc.at(path), "unsupported policy version", None, "this gateway reads 'version: 1'")
            continue
        if kind == "union_tag_invalid":
            ctx.error(doc.at((*path, "kind")), err["msg"], rule_id, "one of: " + ", ".join(_injector_kinds()))
            continue
        where = ".".join(str(p) for p in path) or "document"
        msg = str(err["msg"]).removeprefix("Value error, ")
        ctx.error(doc.at(path), f"{where}: {msg}", rule_id)


def _injector_kinds() -> list[str]:
    from ..injectors import INJECTOR_KINDS

    return sorted(INJECTOR_KINDS)


_KEYS_BY_SECTION: dict[str, list[str]] = {
    "file": sorted(PolicyFileDTO.model_fields),
    "rule": sorted(RuleDTO.model_fields),
}


def _allowed_keys(value: Any, parent: PathKey) -> list[str]:
    from ._schema import CredentialDTO, PolicyDTO, SandboxDTO

    if not parent:
        return _KEYS_BY_SECTION["file"]
    if parent[0] == "policies" and len(parent) == 2:
        return sorted(PolicyDTO.model_fields)
    if parent[0] == "policies" and len(parent) == 4:
        return _KEYS_BY_SECTION["rule"]
    if parent[0] == "sandboxes" and len(parent) == 2:
        return sorted(SandboxDTO.model_fields)
    if parent[0] == "sandboxes" and len(parent) == 3 and parent[2] == "limits":
        return sorted(LimitDTO.model_fields)
    if parent[0] == "credentials" and len(parent) == 3 and parent[2] == "limits":
        return sorted(CredentialLimitDTO.model_fields)
    if parent == ("correlation",):
        from ._schema import CorrelationDTO

        return sorted(CorrelationDTO.model_fields)
    if parent[0] == "credentials" and len(parent) == 2:
        return sorted(CredentialDTO.model_fields)
    if parent[0] == "credentials" and len(parent) == 3 and parent[2] == "injector":
        from ..injectors import INJECTOR_KINDS

        try:
            kind = value["credentials"][parent[1]]["injector"]["kind"]
            return sorted(INJECTOR_KINDS[kind].model_fields)
        except (KeyError, TypeError):
            return []
    return []


def _read_files(paths: Iterable[str], ctx: _Ctx) -> list[_File]:
    """Read the named files and, depth first, what they include; each file once, cycles are errors."""
    files: list[_File] = []
    seen: set[str] = set()

    def visit(path: str, included_from: Position | None, stack: tuple[str, ...]) -> None:
        real = os.path.realpath(path)
        if real in stack:
            assert included_from is not None
            ctx.error(included_from, f"include cycle: {' -> '.join((*stack, real))}")
            return
        if real in seen:
            return
        seen.add(real)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            pos = included_from or Position(path, 1, 1)
            ctx.error(pos, f"cannot read policy file {path!r}: {e.strerror}")
            return
        try:
            doc = load_yaml(text, path)
        except YamlLoadError as e:
            ctx.error(e.position, e.message)
            return
        if not isinstance(doc.value, dict):
            ctx.error(doc.at(()), "a policy file is a mapping with 'version: 1' at the top")
            return
        try:
            dto = PolicyFileDTO.model_validate(doc.value)
        except pydantic.ValidationError as e:
            _schema_issues(doc, e, ctx)
            # Still follow includes so errors in included files are reported in the same run.
            includes = doc.value.get("include")
            if isinstance(includes, list):
                for i, inc in enumerate(includes):
                    if isinstance(inc, str):
                        visit(os.path.join(os.path.dirname(path), inc), doc.at(("include", i)), (*stack, real))
            return
        for i, inc in enumerate(dto.include):
            visit(os.path.join(os.path.dirname(path), inc), doc.at(("include", i)), (*stack, real))
        files.append(_File(path, doc, dto))

    for p in paths:
        visit(p, None, ())
    return files


# -- semantic checks and compilation ---------------------------------------------------------------------------


def _parse_ports(
    raw: list[int | str] | None, schemes: frozenset[Scheme], where: PathKey, f: _File, rid: str, ctx: _Ctx
) -> PortSet | None:
    """None means "each scheme's own default port" (https:443, http:80), never the cross product."""
    if raw is None:
        if Scheme.TCP in schemes:
            ctx.error(f.doc.at(where), "a 'tcp' rule must list its ports", rid, "add 'ports: [5432]'")
        return None
    ranges: list[tuple[int, int]] = []
    for i, item in enumerate(raw):
        pos = f.doc.at((*where, i))
        lo = hi = -1
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str) and re.fullmatch(r"\d+-\d+", item):
            lo, hi = (int(x) for x in item.split("-"))
        else:
            ctx.error(pos, f"port {item!r} is not a number or a range", rid, "write 443 or '8000-8099'")
            continue
        if not (1 <= lo <= hi <= 65535):
            ctx.error(pos, f"port {item!r} is out of range", rid, "ports are 1-65535 and a range runs low-high")
            continue
        ranges.append((lo, hi))
    return PortSet(tuple(ranges))


def _parse_paths(
    raw: list[str | dict[str, str]] | None, where: PathKey, f: _File, rid: str, ctx: _Ctx
) -> tuple[PathMatcher, ...] | None:
    if raw is None:
        return None
    out: list[PathMatcher] = []
    for i, item in enumerate(raw):
        pos = f.doc.at((*where, i))
        if isinstance(item, str):
            kind, pattern = ("glob" if "*" in item else "exact"), item
        elif len(item) == 1 and next(iter(item)) in ("exact", "prefix", "glob"):
            kind, pattern = next(iter(item.items()))
        else:
            ctx.error(pos, f"path {item!r} must be a string or one of {{exact|prefix|glob: ...}}", rid)
            continue
        if not pattern.startswith("/"):
            ctx.error(pos, f"path {pattern!r} must start with '/'", rid)
            continue
        if "?" in pattern and kind != "glob":
            ctx.error(pos, "paths match without the query string; drop the '?...' part", rid)
            continue
        if path_is_ambiguous(pattern):
            ctx.error(pos, f"path {pattern!r} can never match: requests with such paths are refused", rid)
            continue
        out.append(PathMatcher.build(kind, pattern))
    return tuple(out)


def _parse_cidrs(raw: list[str] | None, where: PathKey, f: _File, rid: str, ctx: _Ctx) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for i, item in enumerate(raw or ()):
        try:
            out.append(ipaddress.ip_network(item, strict=True))
        except ValueError as e:
            ctx.error(
                f.doc.at((*where, i)), f"{item!r} is not a CIDR: {e}", rid, "write '203.0.113.0/24' or '203.0.113.7/32'"
            )
    return tuple(out)


def _compile_rule(
    dto: RuleDTO, policy: str, where: PathKey, f: _File, credentials: dict[str, CredentialRef], ctx: _Ctx
) -> Rule | None:
    rid = dto.id
    n_before = ctx.error_count()
    pos = f.doc.at(where)
    schemes = frozenset(Scheme(s) for s in (dto.schemes or ["https"]))
    if not dto.hosts and not dto.cidrs:
        ctx.error(pos, "a rule needs 'hosts:' or 'cidrs:'", rid, "name the destinations this rule is about")
    if dto.hosts and dto.cidrs:
        ctx.error(
            f.doc.at((*where, "cidrs")),
            "a rule has either 'hosts:' or 'cidrs:', not both",
            rid,
            "split it in two rules",
        )
    hosts: list[HostPattern] = []
    for i, h in enumerate(dto.hosts or ()):
        try:
            hosts.append(HostPattern.parse(h))
        except HostError as e:
            ctx.error(f.doc.at((*where, "hosts", i)), str(e), rid)
    cidrs = _parse_cidrs(dto.cidrs, (*where, "cidrs"), f, rid, ctx)
    ports = _parse_ports(dto.ports, schemes, (*where, "ports"), f, rid, ctx)
    for key in ("hosts", "cidrs", "ports", "schemes", "methods", "paths"):
        if getattr(dto, key) == []:
            ctx.error(f.doc.at((*where, key)), f"'{key}: []' matches nothing", rid, f"remove '{key}' to match any")
    methods: frozenset[str] | None = None
    if dto.methods is not None:
        for i, m in enumerate(dto.methods):
            if m not in HTTP_METHODS:
                hint = (
                    f"write {m.upper()!r}" if m.upper() in HTTP_METHODS else "one of " + ", ".join(sorted(HTTP_METHODS))
                )
                ctx.error(f.doc.at((*where, "methods", i)), f"unknown HTTP method {m!r}", rid, hint)
        methods = frozenset(dto.methods)
    paths = _parse_paths(dto.paths, (*where, "paths"), f, rid, ctx)
    headers: list[HeaderCondition] = []
    for name, pattern in (dto.headers or {}).items():
        if not _HEADER_NAME.match(name):
            ctx.error(f.doc.key_at((*where, "headers", name)), f"{name!r} is not a valid header name", rid)
        headers.append(HeaderCondition.build(name, pattern))
    if Scheme.TCP in schemes and (methods is not None or paths is not None or headers or dto.credential):
        ctx.error(
            pos,
            "a 'tcp' rule cannot have methods, paths, headers or a credential",
            rid,
            "TCP tunnels are never inspected",
        )
    mode = Mode(dto.mode or "enforce")
    if dto.action == "allow" and dto.mode == "report":
        ctx.error(
            f.doc.at((*where, "mode")),
            "'mode: report' applies to deny rules",
            rid,
            "remove it, or make this a deny rule",
        )
    credential: CredentialRef | None = None
    if dto.credential is not None:
        credential = credentials.get(dto.credential)
        if dto.action == "deny":
            ctx.error(f.doc.at((*where, "credential")), "a deny rule cannot carry a credential", rid)
        elif credential is None:
            close = difflib.get_close_matches(dto.credential, list(credentials), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "define it under 'credentials:'"
            ctx.error(f.doc.at((*where, "credential")), f"unknown credential {dto.credential!r}", rid, hint)
        if dto.cidrs:
            ctx.error(f.doc.at((*where, "credential")), "credentials are bound to host names, not CIDRs", rid)
        if Scheme.HTTP in schemes:
            if dto.allow_credential_over_http:
                ctx.issues.append(
                    PolicyIssue(pos, "this rule sends a credential over plain HTTP", rid, severity="warning")
                )
            else:
                ctx.error(
                    pos,
                    "a credential would be sent over plain HTTP",
                    rid,
                    "use 'schemes: [https]' (or 'allow_credential_over_http: true' if you accept the risk)",
                )
    if ctx.error_count() != n_before:
        return None
    return Rule(
        id=rid,
        policy=policy,
        action=Verdict(dto.action),
        mode=mode,
        hosts=tuple(hosts),
        cidrs=cidrs,
        ports=ports,
        schemes=schemes,
        methods=methods,
        paths=paths,
        headers=tuple(headers),
        credential=credential,
        position=pos,
    )


def _compile_limit(
    dto: LimitDTO | None, subject: LimitSubject, name: str, where: PathKey, at: Callable[[PathKey], Position], ctx: _Ctx
) -> UsageLimit | None:
    """`at` maps a path in the document to its position (a file's `doc.at`; one fixed place for registrations)."""
    if dto is None:
        return None
    pos = at(where)
    if dto.requests_per_minute is None and dto.bytes_per_session is None:
        ctx.error(
            pos,
            f"the limits of {subject} {name!r} set nothing",
            hint="give 'requests_per_minute', 'bytes_per_session' or both",
        )
        return None
    scope = dto.scope if isinstance(dto, CredentialLimitDTO) else "sandbox"
    if scope == "global" and dto.bytes_per_session is not None:
        ctx.error(
            at((*where, "bytes_per_session")),
            f"'bytes_per_session' counts one sandbox's session; credential {name!r} has a global limit",
            hint="add 'scope: sandbox' (a budget per sandbox), or keep only 'requests_per_minute'",
        )
        return None
    return UsageLimit(
        subject=subject,
        name=name,
        scope=LimitScope(scope),
        requests_per_minute=dto.requests_per_minute,
        bytes_per_session=dto.bytes_per_session,
        mode=Mode(dto.mode),
        position=pos,
    )


def _fixed(pos: Position, _path: PathKey) -> Position:
    """A registration has one position for all of it."""
    return pos


def _compile_correlation(files: list[_File], credentials: dict[str, CredentialRef], ctx: _Ctx) -> CorrelationSpec:
    """The one `correlation:` section of a policy set (at most one file may have it)."""
    first: Position | None = None
    spec = CorrelationSpec()
    for f in files:
        dto = f.dto.correlation
        if dto is None:
            continue
        pos = f.doc.key_at(("correlation",))
        duplicate = first is not None
        if first is not None:
            # Reported; its headers are still checked so their errors come out in the same run.
            ctx.error(pos, f"'correlation' is defined twice (first at {first})", hint="keep one section")
        else:
            first = pos
        injected = {
            str(getattr(c.injector, "header", "")).lower(): c.name
            for c in credentials.values()
            if c.injector.kind == "header"
        }
        names: list[str] = []
        for i, header in enumerate(dto.headers):
            hpos = f.doc.at(("correlation", "headers", i))
            key = header.lower()
            if not _HEADER_NAME.match(header):
                ctx.error(hpos, f"{header!r} is not a valid header name", hint="e.g. 'X-Agent-Run-Id'")
            elif key in _NOT_CORRELATION:
                ctx.error(
                    hpos,
                    f"{header!r} cannot be a correlation header: it would be stripped before upstream",
                    hint="use a header of your own, e.g. 'X-Agent-Run-Id'",
                )
            elif key in injected:
                ctx.error(hpos, f"{header!r} is the header credential {injected[key]!r} injects")
            elif key in names:
                ctx.error(hpos, f"correlation header {header!r} is listed twice")
            else:
                names.append(key)
        if not duplicate:
            spec = CorrelationSpec(tuple(names), dto.max_length)
    return spec


def _overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)


def _compile(files: list[_File], ctx: _Ctx) -> CompiledPolicy | None:
    credentials: dict[str, CredentialRef] = {}
    cred_pos: dict[str, Position] = {}
    for f in files:
        for name, c in f.dto.credentials.items():
            pos = f.doc.key_at(("credentials", name))
            where_limits: PathKey = ("credentials", name, "limits")
            limits = _compile_limit(c.limits, LimitSubject.CREDENTIAL, name, where_limits, f.doc.at, ctx)
            if name in credentials:
                ctx.error(pos, f"credential {name!r} is defined twice (first at {cred_pos[name]})")
                continue
            try:
                SecretRef.parse(c.secret)
            except ValueError as e:
                ctx.error(
                    f.doc.at(("credentials", name, "secret")),
                    str(e),
                    hint="write 'path', 'path#field' or 'dynamic:path'",
                )
            placeholder = getattr(c.injector, "placeholder", None)
            if placeholder is not None:
                clash = next(
                    (
                        n
                        for n, other in credentials.items()
                        if getattr(other.injector, "placeholder", None) == placeholder
                    ),
                    None,
                )
                if clash is not None:
                    ctx.error(
                        f.doc.at(("credentials", name, "injector")),
                        f"placeholder {placeholder!r} is already used by credential {clash!r}",
                        hint="each credential needs its own placeholder",
                    )
            credentials[name] = CredentialRef(name=name, secret=c.secret, injector=c.injector, limits=limits)
            cred_pos[name] = pos

    rules_by_policy: dict[str, list[Rule]] = {}
    policy_pos: dict[str, Position] = {}
    rule_pos: dict[str, Position] = {}
    for f in files:
        for pname, p in f.dto.policies.items():
            ppos = f.doc.key_at(("policies", pname))
            duplicate = pname in rules_by_policy
            if duplicate:
                # Reported, and its rules are still checked below so their errors come out in the same run.
                ctx.error(ppos, f"policy {pname!r} is defined twice (first at {policy_pos[pname]})", hint="rename one")
            else:
                policy_pos[pname] = ppos
            rules: list[Rule] = []
            for i, rdto in enumerate(p.rules):
                where: PathKey = ("policies", pname, "rules", i)
                if rdto.id in rule_pos:
                    ctx.error(
                        f.doc.at((*where, "id")),
                        f"duplicate rule id {rdto.id!r} (first at {rule_pos[rdto.id]})",
                        rdto.id,
                        "rule ids are unique across all files",
                    )
                else:
                    rule_pos[rdto.id] = f.doc.at(where)
                rule = _compile_rule(rdto, pname, where, f, credentials, ctx)
                if rule is not None:
                    rules.append(rule)
            if not duplicate:
                rules_by_policy[pname] = rules

    sandboxes: list[Sandbox] = []
    sandbox_pos: dict[str, Position] = {}
    for f in files:
        for i, s in enumerate(f.dto.sandboxes):
            where = ("sandboxes", i)
            pos = f.doc.at(where)
            duplicate = s.id in sandbox_pos
            if duplicate:
                # Reported; the rest of it is still checked so its other errors come out in the same run.
                ctx.error(f.doc.at((*where, "id")), f"sandbox {s.id!r} is defined twice (first at {sandbox_pos[s.id]})")
            else:
                sandbox_pos[s.id] = pos
            for j, pname in enumerate(s.policies):
                if pname not in rules_by_policy:
                    close = difflib.get_close_matches(pname, list(rules_by_policy), n=1)
                    ctx.error(
                        f.doc.at((*where, "policies", j)),
                        f"sandbox {s.id!r} names unknown policy {pname!r}",
                        hint=f"did you mean {close[0]!r}?" if close else "define it under 'policies:'",
                    )
            if not s.sources and not s.token_sha256:
                ctx.error(
                    pos,
                    f"sandbox {s.id!r} has no 'sources:' and no 'token_sha256:'",
                    hint="the gateway could never recognise it",
                )
            sources: list[IPNetwork] = []
            for j, src in enumerate(s.sources):
                try:
                    sources.append(ipaddress.ip_network(src, strict=True))
                except ValueError as e:
                    ctx.error(f.doc.at((*where, "sources", j)), f"{src!r} is not a CIDR: {e}")
            limits = _compile_limit(s.limits, LimitSubject.SANDBOX, s.id, (*where, "limits"), f.doc.at, ctx)
            if duplicate:
                continue
            sandboxes.append(
                Sandbox(
                    id=s.id,
                    labels=tuple(sorted(s.labels.items())),
                    sources=tuple(sources),
                    token_sha256=s.token_sha256,
                    policies=tuple(s.policies),
                    default_mode=Mode(s.default_mode),
                    position=pos,
                    limits=limits,
                )
            )
    for i, a in enumerate(sandboxes):
        for b in sandboxes[i + 1 :]:
            for na in a.sources:
                for nb in b.sources:
                    if _overlaps(na, nb):
                        ctx.error(
                            b.position,
                            f"sources of sandboxes {a.id!r} ({na}) and {b.id!r} ({nb}) overlap",
                            hint="a source address must identify exactly one sandbox",
                        )
            if a.token_sha256 and a.token_sha256 == b.token_sha256:
                ctx.error(b.position, f"sandboxes {a.id!r} and {b.id!r} share a proxy token")
    used = {r.credential.name for rs in rules_by_policy.values() for r in rs if r.credential}
    for name in credentials:
        if name not in used:
            ctx.issues.append(
                PolicyIssue(cred_pos[name], f"credential {name!r} is not used by any rule", severity="warning")
            )

    correlation = _compile_correlation(files, credentials, ctx)
    if any(i.severity == "error" for i in ctx.issues):
        return None
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        digest.update(orjson.dumps(f.doc.value, option=orjson.OPT_SORT_KEYS))
    return CompiledPolicy(
        sandboxes,
        rules_by_policy,
        digest.hexdigest(),
        tuple(f.path for f in files),
        credentials.values(),
        correlation=correlation,
    )


def load_policy(paths: Iterable[str], *, warnings: list[PolicyIssue] | None = None) -> CompiledPolicy:
    """Load and compile policy files (and their includes). Raises PolicyError listing every problem."""
    ctx = _Ctx()
    paths = list(paths)
    if not paths:
        raise PolicyError([PolicyIssue(Position("<none>", 1, 1), "no policy files given")])
    files = _read_files(paths, ctx)
    compiled = _compile(files, ctx) if files else None
    errors = [i for i in ctx.issues if i.severity == "error"]
    if warnings is not None:
        warnings.extend(i for i in ctx.issues if i.severity != "error")
    if errors or compiled is None:
        raise PolicyError(errors or [PolicyIssue(Position(paths[0], 1, 1), "no policy could be loaded")])
    return compiled


class SandboxConflict(PolicyError):
    """A sandbox registration clashes with another sandbox (same id, overlapping sources or a shared token)."""


def add_sandboxes(policy: CompiledPolicy, extra: Sequence[tuple[SandboxDTO, Position]]) -> CompiledPolicy:
    """`policy` plus sandboxes registered at run time, each judged by the same checks as one in a policy file
    (unknown policy names, bad CIDRs, no way to recognise it, overlaps and shared tokens with any other sandbox).

    A registration can never replace a sandbox of the policy files. Raises PolicyError listing every problem, or
    its subclass SandboxConflict when one of them is a clash with another sandbox. Pure: nothing is reparsed.
    """
    ctx = _Ctx()
    conflicts = 0
    added: list[Sandbox] = []
    seen: dict[str, Position] = {}
    for dto, pos in extra:
        where = f"sandbox {dto.id!r}"
        if dto.id in policy.sandboxes:
            ctx.error(
                pos,
                f"{where} is defined in a policy file ({policy.sandboxes[dto.id].position})",
                hint="a registration cannot replace a sandbox of the policy files; choose another id",
            )
            conflicts += 1
        if dto.id in seen:
            ctx.error(pos, f"{where} is registered twice (first at {seen[dto.id]})")
            conflicts += 1
        seen.setdefault(dto.id, pos)
        for pname in dto.policies:
            if pname not in policy.rules_by_policy:
                close = difflib.get_close_matches(pname, list(policy.rules_by_policy), n=1)
                ctx.error(
                    pos,
                    f"{where} names unknown policy {pname!r}",
                    hint=f"did you mean {close[0]!r}?" if close else "it must be defined in a policy file",
                )
        if not dto.sources and not dto.token_sha256:
            ctx.error(pos, f"{where} has no 'sources' and no token", hint="the gateway could never recognise it")
        sources: list[IPNetwork] = []
        for src in dto.sources:
            try:
                sources.append(ipaddress.ip_network(src, strict=True))
            except ValueError as e:
                ctx.error(pos, f"{where}: {src!r} is not a CIDR: {e}")
        added.append(
            Sandbox(
                id=dto.id,
                labels=tuple(sorted(dto.labels.items())),
                sources=tuple(sources),
                token_sha256=dto.token_sha256,
                policies=tuple(dto.policies),
                default_mode=Mode(dto.default_mode),
                position=pos,
                limits=_compile_limit(
                    dto.limits, LimitSubject.SANDBOX, dto.id, (), functools.partial(_fixed, pos), ctx
                ),
            )
        )
    existing = list(policy.sandboxes.values())
    for i, b in enumerate(added):
        for a in existing + added[:i]:
            for na in a.sources:
                for nb in b.sources:
                    if _overlaps(na, nb):
                        conflicts += 1
                        ctx.error(
                            b.position,
                            f"sources of sandboxes {a.id!r} ({na}, at {a.position}) and {b.id!r} ({nb}) overlap",
                            hint="a source address must identify exactly one sandbox",
                        )
            if a.token_sha256 and a.token_sha256 == b.token_sha256:
                conflicts += 1
                ctx.error(b.position, f"sandboxes {a.id!r} and {b.id!r} share a proxy token")
    if ctx.issues:
        raise (SandboxConflict if conflicts else PolicyError)(ctx.issues)
    return policy.with_sandboxes(added)
