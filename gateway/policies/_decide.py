"""The decision core: pure functions from (identity, request facts) to a Decision value.

No I/O and no mitmproxy here. The gateway's addon gathers facts (normalised host, port, scheme, method, path,
headers; resolved addresses) and asks; everything that decides whether a byte may leave a sandbox lives in this
module, so it can be tested table-driven and reasoned about in one place.

Precedence, for the rules of the sandbox's policies that match: an enforced deny wins; then a deny in report mode
(the request passes, the would-deny is recorded); then an allow; no match is a deny in the sandbox's default mode.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ._addresses import AddressClass, IPAddress, classify_address
from ._dns import DnsNameError, NameFault, encoded_data, parse_query_name
from ._hosts import parse_ip_literal
from ._model import DEFAULT_PORTS, CorrelationSpec, CredentialRef, Mode, Rule, Sandbox, Scheme, UsageLimit, Verdict

__all__ = [
    "AddressCheck",
    "CompiledPolicy",
    "Decision",
    "DnsDecision",
    "DnsReply",
    "Identity",
    "Reason",
    "RequestFacts",
    "path_is_ambiguous",
]

# A percent-escape of an unreserved character (RFC 3986 2.3: never needed, so only used to disguise a path), or of a
# separator, a dot, a backslash or NUL: each lets the policy and the upstream read different paths.
_SUSPICIOUS_ESCAPE = re.compile(r"%(?:[46][1-9a-f]|[57][0-9a]|3[0-9]|2[def]|5[cf]|7e|00)", re.IGNORECASE)


def path_is_ambiguous(path: str) -> bool:
    """True for a request path that an upstream could resolve differently from how the policy matched it:
    disguising escapes, backslashes, dot segments and empty segments (`//`, which many servers merge)."""
    bare = path.split("?", 1)[0]
    if "%" not in bare and "\\" not in bare and "/." not in bare and "//" not in bare:
        return False  # the common case, decided with four substring scans
    if "\\" in bare or _SUSPICIOUS_ESCAPE.search(bare):
        return True
    segments = bare.split("/")[1:]
    return any(s in (".", "..") for s in segments) or any(s == "" for s in segments[:-1])


class Reason(enum.StrEnum):
    """Why a decision came out as it did. Stable strings: they appear in 403 bodies, audit records and tests."""

    ALLOWED_BY_RULE = "allowed_by_rule"
    DENIED_BY_RULE = "denied_by_rule"
    NO_MATCHING_RULE = "no_matching_rule"
    UNKNOWN_SANDBOX = "unknown_sandbox"
    BAD_PROXY_TOKEN = "bad_proxy_token"  # noqa: S105 (a reason code, not a password)
    IP_LITERAL_NOT_ALLOWED = "ip_literal_not_allowed"
    ADDRESS_REFUSED = "address_refused"
    GATEWAY_LOOP = "gateway_loop"
    HOST_MISMATCH = "host_mismatch"
    BAD_HOST = "bad_host"
    AMBIGUOUS_PATH = "ambiguous_path"
    DESTINATION_NOT_RESOLVED = "destination_not_resolved"
    DESTINATION_NOT_IN_ANSWERS = "destination_not_in_answers"
    PROTOCOL_NOT_ALLOWED = "protocol_not_allowed"
    GATEWAY_ERROR = "gateway_error"
    CREDENTIAL_ENDPOINT_MISMATCH = "credential_endpoint_mismatch"
    SECRET_UNAVAILABLE = "secret_unavailable"  # noqa: S105 (a reason code)
    CREDENTIAL_INVALID = "credential_invalid"
    MALFORMED_REQUEST = "malformed_request"
    # DNS queries from sandboxes (`CompiledPolicy.decide_dns`)
    BAD_NAME = "bad_name"
    NAME_TOO_LONG = "name_too_long"
    LABEL_TOO_LONG = "label_too_long"
    HIGH_ENTROPY_LABEL = "high_entropy_label"
    QTYPE_REFUSED = "qtype_refused"
    # A usage limit of the sandbox or of the credential (`CompiledPolicy.limits_for`, counted by gateway/limits.py)
    USAGE_LIMIT_EXCEEDED = "usage_limit_exceeded"


@dataclass(frozen=True, slots=True)
class Identity:
    sandbox_id: str
    source: str


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the gateway knows about one connection or request. `method is None` means connection phase.

    `host` must already be normalised (`normalize_host`); an IP literal is its canonical text.
    """

    scheme: Scheme
    host: str
    port: int
    method: str | None = None
    path: str | None = None
    headers: tuple[tuple[str, str], ...] = ()  # names lower case, in arrival order

    @property
    def is_connection_phase(self) -> bool:
        return self.method is None


@dataclass(frozen=True, slots=True)
class Decision:
    """One answer, with its reason always set together with its verdict."""

    verdict: Verdict
    mode: Mode
    reason: Reason
    rule_id: str | None
    policy_hash: str
    sandbox_id: str | None = None
    credential: CredentialRef | None = None
    # Connection phase only: False when the connection can be spliced (no request-level rule could change the
    # outcome and nothing must be injected), so TLS is never terminated for it.
    intercept: bool = True
    detail: str = ""

    @property
    def blocks(self) -> bool:
        return self.verdict is Verdict.DENY and self.mode is Mode.ENFORCE


@dataclass(frozen=True, slots=True)
class AddressCheck:
    """The result of judging the addresses a destination resolved to: what may be dialled, or why nothing may."""

    allowed: tuple[IPAddress, ...]
    refused: tuple[tuple[IPAddress, AddressClass], ...]
    decision: Decision | None  # a deny when the destination must not be dialled at all

    @property
    def ok(self) -> bool:
        return self.decision is None


class DnsReply(enum.StrEnum):
    """What the DNS server does with a query, once the core has decided."""

    ANSWER = "answer"  # resolve with the gateway's resolver, check the addresses (`check_dns_answers`), answer A
    NODATA = "nodata"  # NOERROR without records (AAAA: sandboxes have no IPv6)
    NXDOMAIN = "nxdomain"  # for this sandbox the name does not exist
    REFUSED = "refused"  # a query the gateway does not answer (type, shape of the name, unknown sandbox)


# Query types the gateway answers (IN class only); every other type is refused.
_DNS_QTYPES = {"A": DnsReply.ANSWER, "AAAA": DnsReply.NODATA}
_NAME_FAULT_REASON = {
    NameFault.BAD_NAME: Reason.BAD_NAME,
    NameFault.NAME_TOO_LONG: Reason.NAME_TOO_LONG,
    NameFault.LABEL_TOO_LONG: Reason.LABEL_TOO_LONG,
}


@dataclass(frozen=True, slots=True)
class DnsDecision:
    """The answer to one DNS query of a sandbox. `verdict`, `mode`, `reason` and `rule_id` read like a Decision's
    (the connection-phase decision that made the name resolvable, or the refusal); `reply` says what to send."""

    verdict: Verdict
    mode: Mode
    reason: Reason
    rule_id: str | None
    policy_hash: str
    sandbox_id: str | None
    name: str  # normalised (lower case, no final dot); as received when it is not a valid name
    qtype: str
    reply: DnsReply
    # Where the sandbox may reach the name: (scheme, first port, last port); `check_dns_answers` judges the
    # resolved addresses for these. Empty unless the name is resolvable.
    destinations: tuple[tuple[Scheme, int, int], ...] = ()
    detail: str = ""

    @property
    def blocks(self) -> bool:
        return self.verdict is Verdict.DENY and self.mode is Mode.ENFORCE


def _port_spans(rule: Rule, scheme: Scheme) -> tuple[tuple[int, int], ...]:
    """The ports a rule covers for one scheme, as inclusive ranges."""
    if scheme not in rule.schemes:
        return ()
    if rule.ports is None:
        port = DEFAULT_PORTS.get(scheme)
        return () if port is None else ((port, port),)
    return rule.ports.ranges


def _pieces(spans: Iterable[tuple[int, int]], cuts: Iterable[int]) -> list[tuple[int, int]]:
    """Split port ranges at the cut points (the first port of a range that may be judged differently), so every
    piece is judged alike at all of its ports; overlapping input ranges give each piece once, in order."""
    cut = sorted(set(cuts))
    out: set[tuple[int, int]] = set()
    for lo, hi in spans:
        points = [lo, *(c for c in cut if lo < c <= hi)]
        ends = [p - 1 for p in points[1:]] + [hi]
        out.update(zip(points, ends, strict=True))
    return sorted(out)


def _cuts(rules: Iterable[Rule], scheme: Scheme) -> list[int]:
    return [p for r in rules for lo, hi in _port_spans(r, scheme) for p in (lo, hi + 1)]


@dataclass(slots=True)
class _RuleIndex:
    """Rules of one set of policies, indexed so a decision looks at a handful of candidates, not every rule."""

    exact: dict[str, list[Rule]] = field(default_factory=dict)
    wildcard: dict[str, list[Rule]] = field(default_factory=dict)
    # CIDR rules by (IP version, prefix length) then network number: an address is looked up once per distinct
    # prefix length in use, however many CIDR rules there are.
    by_prefix: dict[tuple[int, int], dict[int, list[Rule]]] = field(default_factory=dict)

    def add(self, rule: Rule) -> None:
        for pattern in rule.hosts:
            target = self.wildcard if pattern.wildcard else self.exact
            target.setdefault(pattern.host, []).append(rule)
        for net in rule.cidrs:
            nets = self.by_prefix.setdefault((net.version, net.prefixlen), {})
            nets.setdefault(int(net.network_address), []).append(rule)

    def for_host(self, host: str) -> list[Rule]:
        found = list(self.exact.get(host, ()))
        # `*.example.com` is stored under `example.com`; walk up the labels of the host (never the host itself,
        # so a wildcard can never match its own apex).
        dot = host.find(".")
        while dot != -1:
            suffix = host[dot + 1 :]
            found.extend(self.wildcard.get(suffix, ()))
            dot = host.find(".", dot + 1)
        return found

    def for_address(self, address: IPAddress) -> list[Rule]:
        bits = 32 if address.version == 4 else 128
        value = int(address)
        found: list[Rule] = []
        for (version, plen), nets in self.by_prefix.items():
            if version == address.version:
                key = value & (((1 << plen) - 1) << (bits - plen)) if plen else 0
                for rule in nets.get(key, ()):
                    if rule not in found:
                        found.append(rule)
        return found


_PLAN_CACHE_SIZE = 65_536


@dataclass(frozen=True, slots=True)
class _Plan:
    """The rules covering one (sandbox, host, scheme, port), split by whether only a request can tell if they match."""

    unconditional: tuple[Rule, ...]
    conditional: tuple[Rule, ...]
    connection: Decision  # the connection-phase answer
    request: Decision | None  # the answer for every request, when no conditional rule is in play


class CompiledPolicy:
    """A loaded policy set: sandboxes, their rules compiled into indexes, and the version hash of the inputs."""

    def __init__(
        self,
        sandboxes: Iterable[Sandbox],
        rules_by_policy: Mapping[str, Iterable[Rule]],
        policy_hash: str,
        files: tuple[str, ...] = (),
        credentials: Iterable[CredentialRef] = (),
        *,
        shared_indexes: Mapping[tuple[str, ...], _RuleIndex] | None = None,
        correlation: CorrelationSpec | None = None,
    ) -> None:
        self.policy_hash = policy_hash
        self.correlation = correlation or CorrelationSpec()
        self.files = files
        self.credentials: dict[str, CredentialRef] = {c.name: c for c in credentials}
        # Placeholder token -> credential name: a placeholder may only appear in requests bound to its credential.
        self.placeholders: dict[str, str] = {
            c.injector.placeholder: c.name for c in self.credentials.values() if c.injector.kind == "placeholder"
        }
        self.sandboxes: dict[str, Sandbox] = {s.id: s for s in sandboxes}
        self.rules_by_policy: dict[str, tuple[Rule, ...]] = {k: tuple(v) for k, v in rules_by_policy.items()}
        # Indexes are immutable once built; a policy derived with `with_sandboxes` reuses its parent's.
        self._indexes: dict[tuple[str, ...], _RuleIndex] = dict(shared_indexes or {})
        self._sandbox_index: dict[str, _RuleIndex] = {}
        for sb in self.sandboxes.values():
            index = self._indexes.get(sb.policies)
            if index is None:
                index = _RuleIndex()
                for name in sb.policies:
                    for rule in self.rules_by_policy[name]:
                        index.add(rule)
                self._indexes[sb.policies] = index
            self._sandbox_index[sb.id] = index
        # Identification by source: longest prefix wins; the loader rejects overlaps between sandboxes.
        self._by_prefix: list[tuple[int, int, dict[int, str]]] = []
        by_len: dict[tuple[int, int], dict[int, str]] = {}
        for sb in self.sandboxes.values():
            for net in sb.sources:
                by_len.setdefault((net.version, net.prefixlen), {})[int(net.network_address)] = sb.id
        for (version, plen), nets in sorted(by_len.items(), key=lambda kv: -kv[0][1]):
            self._by_prefix.append((version, plen, nets))
        self._tokens = [(sb.token_sha256, sb.id) for sb in self.sandboxes.values() if sb.token_sha256]
        self._plans: dict[tuple[str, str, Scheme, int], _Plan] = {}
        self._decisions: dict[tuple[str, str | None, str | None, str | None], Decision] = {}

    @property
    def rule_count(self) -> int:
        return sum(len(r) for r in self.rules_by_policy.values())

    def with_sandboxes(self, extra: Iterable[Sandbox]) -> CompiledPolicy:
        """This policy plus `extra` sandboxes (registered at run time), sharing the compiled rule indexes and
        keeping the policy hash (the rules are the same). Validation is the caller's: use `add_sandboxes`."""
        return CompiledPolicy(
            (*self.sandboxes.values(), *extra),
            self.rules_by_policy,
            self.policy_hash,
            self.files,
            self.credentials.values(),
            shared_indexes=self._indexes,
            correlation=self.correlation,
        )

    # -- identification -------------------------------------------------------------------------------------

    def identify_by_source(self, source: str) -> Identity | None:
        try:
            addr = ipaddress.ip_address(source)
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        bits = 32 if addr.version == 4 else 128
        value = int(addr)
        for version, plen, nets in self._by_prefix:
            if version != addr.version:
                continue
            key = value & (((1 << plen) - 1) << (bits - plen)) if plen else 0
            sandbox_id = nets.get(key)
            if sandbox_id is not None:
                return Identity(sandbox_id, source)
        return None

    def identify_by_token(self, token: str, source: str) -> Identity | None:
        """Map a proxy token to its sandbox, comparing against every known token in constant time."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        found: str | None = None
        for expected, sandbox_id in self._tokens:
            if hmac.compare_digest(digest, expected):
                found = sandbox_id
        return Identity(found, source) if found else None

    # -- usage limits ---------------------------------------------------------------------------------------

    def limits_for(self, sandbox_id: str | None, credential: CredentialRef | None) -> tuple[UsageLimit, ...]:
        """The usage limits a request of this sandbox, carrying this credential, counts against: the sandbox's own,
        then the credential's. The caller counts (the core keeps no state)."""
        sandbox = self.sandboxes.get(sandbox_id) if sandbox_id is not None else None
        found = [sandbox.limits if sandbox is not None else None, credential.limits if credential else None]
        return tuple(limit for limit in found if limit is not None)

    # -- decisions ------------------------------------------------------------------------------------------

    def deny(
        self, reason: Reason, identity: Identity | None = None, detail: str = "", rule_id: str | None = None
    ) -> Decision:
        """A deny that no rule produced (identity, protocol and address invariants): always enforced."""
        return Decision(
            verdict=Verdict.DENY,
            mode=Mode.ENFORCE,
            reason=reason,
            rule_id=rule_id,
            policy_hash=self.policy_hash,
            sandbox_id=identity.sandbox_id if identity else None,
            detail=detail,
        )

    def _plan(self, sandbox: Sandbox, host: str, scheme: Scheme, port: int) -> _Plan:
        """What the rules say about one destination for one sandbox, computed once and cached.

        The cache key is the destination (attacker-influenced), so the cache is bounded: when full it is dropped
        and rebuilt, which costs time, never correctness."""
        key = (sandbox.id, host, scheme, port)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        index = self._sandbox_index[sandbox.id]
        address = parse_ip_literal(host)
        if address is not None:
            found = index.for_address(address)
            if not found:
                refused = self.deny(Reason.IP_LITERAL_NOT_ALLOWED, Identity(sandbox.id, ""), detail=host)
                return self._remember(key, _Plan((), (), refused, refused))
        else:
            found = index.for_host(host)
        candidates = [r for r in found if r.covers(scheme, port)]
        unconditional = tuple(r for r in candidates if not r.has_request_conditions)
        conditional = tuple(r for r in candidates if r.has_request_conditions)
        connection = self._decide_connection(sandbox, candidates, unconditional)
        # With no request-level rule in play, every request to this destination gets the same answer.
        request = self._resolve(sandbox, unconditional) if not conditional else None
        return self._remember(key, _Plan(unconditional, conditional, connection, request))

    def _remember(self, key: tuple[str, str, Scheme, int], plan: _Plan) -> _Plan:
        if len(self._plans) >= _PLAN_CACHE_SIZE:
            # Drop the oldest eighth (dicts keep insertion order): a flood of new names ages out old entries
            # gradually instead of flushing everyone's hot destinations at once.
            for old in list(itertools.islice(self._plans, _PLAN_CACHE_SIZE // 8)):
                del self._plans[old]
        self._plans[key] = plan
        return plan

    def decide(self, identity: Identity | None, facts: RequestFacts) -> Decision:
        sandbox = self.sandboxes.get(identity.sandbox_id) if identity is not None else None
        if sandbox is None:
            return self.deny(Reason.UNKNOWN_SANDBOX, identity)
        plan = self._plan(sandbox, facts.host, facts.scheme, facts.port)
        if facts.method is None:
            return plan.connection
        assert facts.path is not None
        if path_is_ambiguous(facts.path):
            return self.deny(Reason.AMBIGUOUS_PATH, identity, detail=facts.path.split("?", 1)[0])
        if plan.request is not None:
            return plan.request
        method, path, headers = facts.method, facts.path, facts.headers
        matched = [r for r in plan.conditional if r.matches_request(method, path, headers)]
        return self._resolve(sandbox, [*plan.unconditional, *matched])

    def depends_on_headers(self, identity: Identity | None, facts: RequestFacts, ignore: Iterable[str] = ()) -> bool:
        """Could the request's headers change its decision? True when a rule with header conditions (other than on
        the headers in `ignore`) covers the destination and matches the method and path. Replay uses it: audit
        records do not carry headers."""
        sandbox = self.sandboxes.get(identity.sandbox_id) if identity is not None else None
        if sandbox is None or facts.method is None or facts.path is None:
            return False
        skip = {h.lower() for h in ignore}
        plan = self._plan(sandbox, facts.host, facts.scheme, facts.port)
        bare = facts.path.split("?", 1)[0]
        return any(
            any(h.name not in skip for h in r.headers)
            and (r.methods is None or facts.method in r.methods)
            and (r.paths is None or any(p.matches(bare) for p in r.paths))
            for r in plan.conditional
        )

    def _resolve(self, sandbox: Sandbox, matched: Iterable[Rule]) -> Decision:
        enforced_deny = report_deny = allow = None
        for rule in matched:
            if rule.action is Verdict.ALLOW:
                allow = allow or rule
            elif rule.mode is Mode.ENFORCE:
                enforced_deny = enforced_deny or rule
            else:
                report_deny = report_deny or rule
        key = (
            sandbox.id,
            enforced_deny.id if enforced_deny else None,
            report_deny.id if report_deny else None,
            allow.id if allow else None,
        )
        cached = self._decisions.get(key)
        if cached is not None:
            return cached

        def decision(
            verdict: Verdict, mode: Mode, reason: Reason, rule: Rule | None, credential: CredentialRef | None
        ) -> Decision:
            made = Decision(
                verdict,
                mode,
                reason,
                rule.id if rule else None,
                policy_hash=self.policy_hash,
                sandbox_id=sandbox.id,
                credential=credential,
            )
            # Bounded by sandboxes x rules: decisions are values, so identical outcomes share one object.
            self._decisions[key] = made
            return made

        if enforced_deny is not None:
            return decision(Verdict.DENY, Mode.ENFORCE, Reason.DENIED_BY_RULE, enforced_deny, None)
        credential = allow.credential if allow is not None else None
        if report_deny is not None and allow is not None:
            # The request passes as it would without the rule, credential included; the would-deny is recorded.
            # (Without an allow it would not pass anyway: a report-mode rule never makes the outcome laxer.)
            return decision(Verdict.DENY, Mode.REPORT, Reason.DENIED_BY_RULE, report_deny, credential)
        if allow is not None:
            return decision(Verdict.ALLOW, Mode.ENFORCE, Reason.ALLOWED_BY_RULE, allow, credential)
        return decision(Verdict.DENY, sandbox.default_mode, Reason.NO_MATCHING_RULE, None, None)

    def _decide_connection(self, sandbox: Sandbox, candidates: list[Rule], unconditional: tuple[Rule, ...]) -> Decision:
        """Before any request is seen: refuse what no request could make allowed, splice what no request could
        make denied or need a credential, and intercept the rest so each request is decided on its own."""
        decision = self._resolve(sandbox, unconditional)
        if decision.blocks:
            if decision.reason is Reason.DENIED_BY_RULE:
                return decision
            if any(r.action is Verdict.ALLOW for r in candidates):
                # Only request-conditioned allows exist: the connection may proceed, each request is judged.
                first = next(r for r in candidates if r.action is Verdict.ALLOW)
                return Decision(
                    Verdict.ALLOW,
                    Mode.ENFORCE,
                    Reason.ALLOWED_BY_RULE,
                    first.id,
                    policy_hash=self.policy_hash,
                    sandbox_id=sandbox.id,
                    intercept=True,
                )
            return decision
        splice = decision.verdict is Verdict.ALLOW and not any(
            r.needs_interception or r.action is Verdict.DENY for r in candidates
        )
        return Decision(
            decision.verdict,
            decision.mode,
            decision.reason,
            decision.rule_id,
            policy_hash=self.policy_hash,
            sandbox_id=sandbox.id,
            credential=None,
            intercept=not splice,
        )

    def check_addresses(
        self,
        identity: Identity,
        facts: RequestFacts,
        addresses: Iterable[IPAddress],
        gateway_addresses: frozenset[IPAddress] = frozenset(),
        gateway_ports: frozenset[int] = frozenset(),
    ) -> AddressCheck:
        """Judge every address a destination resolved to. Anything but global unicast needs a rule naming its CIDR
        (for this sandbox, scheme and port); any refused address refuses the destination, so a name that answers
        with one public and one internal address (DNS rebinding) is not dialled at all."""
        index = self._sandbox_index.get(identity.sandbox_id)
        addresses = tuple(addresses)
        if index is None:
            return AddressCheck((), (), self.deny(Reason.UNKNOWN_SANDBOX, identity))
        if not addresses:
            return AddressCheck((), (), self.deny(Reason.DESTINATION_NOT_RESOLVED, identity, detail=facts.host))
        allowed: list[IPAddress] = []
        refused: list[tuple[IPAddress, AddressClass]] = []
        for address in addresses:
            rules = index.for_address(address)
            denied_by = next(
                (
                    r
                    for r in rules
                    if r.action is Verdict.DENY
                    and r.mode is Mode.ENFORCE
                    and not r.has_request_conditions
                    and r.covers(facts.scheme, facts.port)
                ),
                None,
            )
            if denied_by is not None:
                # A deny rule naming a network applies to names that resolve into it, not only to IP literals.
                denied = Decision(
                    Verdict.DENY,
                    Mode.ENFORCE,
                    Reason.DENIED_BY_RULE,
                    denied_by.id,
                    policy_hash=self.policy_hash,
                    sandbox_id=identity.sandbox_id,
                    detail=str(address),
                )
                return AddressCheck((), (), denied)
            cls = classify_address(address, gateway_addresses)
            if cls is AddressClass.GATEWAY and facts.port in gateway_ports:
                return AddressCheck(
                    (), ((address, cls),), self.deny(Reason.GATEWAY_LOOP, identity, detail=f"{address}:{facts.port}")
                )
            if cls is AddressClass.GLOBAL or any(
                r.action is Verdict.ALLOW and r.covers(facts.scheme, facts.port) for r in rules
            ):
                allowed.append(address)
            else:
                refused.append((address, cls))
        if refused:
            detail = ", ".join(f"{a} ({c})" for a, c in refused)
            return AddressCheck(
                tuple(allowed), tuple(refused), self.deny(Reason.ADDRESS_REFUSED, identity, detail=detail)
            )
        return AddressCheck(tuple(allowed), (), None)

    # -- DNS ------------------------------------------------------------------------------------------------

    def decide_dns(self, identity: Identity | None, qname: str, qtype: str, qclass: str = "IN") -> DnsDecision:
        """Judge one DNS query of a sandbox: `qname` in presentation form, `qtype` and `qclass` as mnemonics
        ("A", "TXT", "TYPE65534"; "IN").

        In order: an unknown sandbox, a name that is not a host name (`bad_name`, `name_too_long`,
        `label_too_long`) and a name that looks like encoded data (`high_entropy_label`, see `encoded_data`) are
        refused, whatever the type; then every type but A and AAAA in class IN (`qtype_refused`). Then the
        policy: the name is resolvable when, for some scheme and port that a rule naming it (exactly or below a
        `*.` wildcard) covers, the connection-phase decision does not block, as `decide` would judge a
        connection there: so an allow rule makes it resolvable, and a deny rule makes it unresolvable only where
        it refuses every connection the allow rules open (enforced, without request conditions, on all of the
        allowed schemes and ports); a deny in report mode lets connections through, so its name resolves too.
        CIDR rules never make a name resolvable. A sandbox whose default mode is
        `report` gets names no rule allows too (judged as https/443 and http/80), recorded as would-deny. A
        resolvable A query is answered (`DnsReply.ANSWER`: the caller resolves and calls `check_dns_answers`), a
        resolvable AAAA query gets no records; anything else is NXDOMAIN.

        The shape test skips names an allow rule spells out exactly; below a wildcard it judges the labels left
        of the wildcard's suffix, joined; for names no rule allows, each label on its own.
        """
        sandbox = self.sandboxes.get(identity.sandbox_id) if identity is not None else None
        sandbox_id = sandbox.id if sandbox is not None else None

        def refused(reason: Reason, name: str, detail: str = "") -> DnsDecision:
            return DnsDecision(
                Verdict.DENY,
                Mode.ENFORCE,
                reason,
                None,
                self.policy_hash,
                sandbox_id,
                name,
                qtype,
                DnsReply.REFUSED,
                detail=detail,
            )

        if sandbox is None:
            return refused(Reason.UNKNOWN_SANDBOX, qname)
        try:
            name = parse_query_name(qname)
        except DnsNameError as e:
            return refused(_NAME_FAULT_REASON[e.fault], qname, e.detail)
        index = self._sandbox_index[sandbox.id]
        for text in self._dns_chosen_parts(index, name):
            why = encoded_data(text)
            if why is not None:
                return refused(Reason.HIGH_ENTROPY_LABEL, name, why)
        reply = _DNS_QTYPES.get(qtype) if qclass == "IN" else None
        if reply is None:
            return refused(Reason.QTYPE_REFUSED, name, f"{qclass} {qtype}")
        decision, destinations = self._dns_destinations(sandbox, index, name)
        return DnsDecision(
            decision.verdict,
            decision.mode,
            decision.reason,
            decision.rule_id,
            self.policy_hash,
            sandbox.id,
            name,
            qtype,
            reply if destinations else DnsReply.NXDOMAIN,
            destinations,
        )

    @staticmethod
    def _dns_chosen_parts(index: _RuleIndex, name: str) -> tuple[str, ...]:
        """The parts of a name the sandbox chose freely, for the shape test: nothing for a name an allow rule
        spells out; the labels left of the longest allowing wildcard suffix; else every label."""
        if any(r.action is Verdict.ALLOW for r in index.exact.get(name, ())):
            return ()
        dot = name.find(".")
        while dot != -1:
            if any(r.action is Verdict.ALLOW for r in index.wildcard.get(name[dot + 1 :], ())):
                return (name[:dot],)
            dot = name.find(".", dot + 1)
        return tuple(name.split("."))

    def _dns_destinations(
        self, sandbox: Sandbox, index: _RuleIndex, name: str
    ) -> tuple[Decision, tuple[tuple[Scheme, int, int], ...]]:
        """The (scheme, port range) pieces, among those the rules naming `name` cover, where a connection to it is
        not blocked, and the decision to record: the first allow among them, else the first would-deny (report
        mode), else the first refusal."""
        rules = index.for_host(name)
        found: list[tuple[Decision, tuple[Scheme, int, int]]] = []
        blocked: Decision | None = None
        for scheme in Scheme:
            spans = [s for r in rules for s in _port_spans(r, scheme)]
            if sandbox.default_mode is Mode.REPORT and scheme in DEFAULT_PORTS:
                spans.append((DEFAULT_PORTS[scheme], DEFAULT_PORTS[scheme]))
            for lo, hi in _pieces(spans, _cuts(rules, scheme)):
                decision = self._plan(sandbox, name, scheme, lo).connection
                if decision.blocks:
                    blocked = blocked or decision
                else:
                    found.append((decision, (scheme, lo, hi)))
        if not found:
            return blocked or self._resolve(sandbox, ()), ()
        allowed = [d for d, _ in found if d.verdict is Verdict.ALLOW]
        return (allowed or [found[0][0]])[0], tuple(dest for _, dest in found)

    def check_dns_answers(
        self,
        identity: Identity,
        decision: DnsDecision,
        addresses: Iterable[IPAddress],
        gateway_addresses: frozenset[IPAddress] = frozenset(),
        gateway_ports: frozenset[int] = frozenset(),
    ) -> AddressCheck:
        """May the sandbox be told these addresses for the name? Yes when, for at least one destination the name is
        resolvable for, `check_addresses` passes all of them (so a name pointing at 169.254.169.254 is handed out
        only where a CIDR rule of the sandbox allows that address for a scheme and port the name is allowed on).
        Otherwise the refusal of the first destination."""
        addresses = tuple(addresses)
        if not addresses or not decision.destinations:
            return AddressCheck((), (), self.deny(Reason.DESTINATION_NOT_RESOLVED, identity, detail=decision.name))
        index = self._sandbox_index.get(identity.sandbox_id)
        if index is None:
            return AddressCheck((), (), self.deny(Reason.UNKNOWN_SANDBOX, identity))
        cidr_rules = [r for a in addresses for r in index.for_address(a)]
        gateway_cuts = [p for g in gateway_ports for p in (g, g + 1)]
        first: AddressCheck | None = None
        for scheme, lo, hi in decision.destinations:
            for port, _ in _pieces([(lo, hi)], [*_cuts(cidr_rules, scheme), *gateway_cuts]):
                facts = RequestFacts(scheme, decision.name, port)
                check = self.check_addresses(identity, facts, addresses, gateway_addresses, gateway_ports)
                if check.ok:
                    return check
                first = first or check
        assert first is not None
        return first
