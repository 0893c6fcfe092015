"""The seam: the only code that touches mitmproxy flows.

It turns connections and requests into `RequestFacts`, asks the policy core, and applies the answer (refuse, splice,
intercept, pin the dialled address), writing one audit line per decision. It decides nothing itself.

Fail closed: mitmproxy logs an exception raised in a hook and lets the flow go on. Every hook here is wrapped so
that an exception instead refuses what the hook was about (403 for a request, a killed connection otherwise) and
is audited as a `hook_error` security event.

The order of checks on every path is: who is asking (identity), where to (normalised host = SNI = CONNECT authority,
absolute URL = Host), is that allowed (policy), and where exactly will we connect (the gateway's own DNS answer,
classified). The upstream connection is only ever made to an address pinned by those checks.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from mitmproxy import connection, http, tcp, tls
from mitmproxy.http import Headers
from mitmproxy.proxy import server_hooks

from .audit import AuditLog, redact_path
from .audit import fields as F
from .credentials import CredentialBroker
from .injectors._apply import InjectionError, OutgoingRequest, apply, find_placeholders
from .injectors._echo import EchoRedactor, needles_for
from .limits import Admission, UsageMeter, limit_decision
from .metrics import GatewayMetrics
from .policies import (
    CORRELATION_INVALID,
    CompiledPolicy,
    Decision,
    HostError,
    Identity,
    IPAddress,
    LimitSubject,
    Reason,
    RequestFacts,
    Scheme,
    Verdict,
    normalize_host,
    parse_ip_literal,
)
from .resolver import Resolver
from .secrets import SecretError

__all__ = ["EgressAddon", "GatewayState"]

log = logging.getLogger("cube_egress.gateway")

# Denials that are attacks or misconfigurations worth a separate security event, by the reason that caused them.
_SECURITY_KIND: dict[Reason, str] = {
    Reason.CREDENTIAL_ENDPOINT_MISMATCH: "credential_endpoint_mismatch",
    Reason.SECRET_UNAVAILABLE: "secret_unavailable",
    Reason.CREDENTIAL_INVALID: "credential_invalid",
    Reason.HOST_MISMATCH: "host_mismatch",
    Reason.BAD_HOST: "host_mismatch",
    Reason.ADDRESS_REFUSED: "address_refused",
    Reason.DESTINATION_NOT_IN_ANSWERS: "destination_not_in_answers",
    Reason.IP_LITERAL_NOT_ALLOWED: "ip_literal_refused",
    Reason.GATEWAY_LOOP: "gateway_loop",
    Reason.AMBIGUOUS_PATH: "ambiguous_path",
    Reason.BAD_PROXY_TOKEN: "bad_proxy_token",
    Reason.UNKNOWN_SANDBOX: "unknown_sandbox",
    Reason.PROTOCOL_NOT_ALLOWED: "protocol_not_allowed",
    Reason.GATEWAY_ERROR: "hook_error",
}
_DEFAULT_PORT = {"http": 80, "https": 443}
# The one place a refusal's reason becomes an HTTP status; everything not listed is a 403.
_STATUS: dict[Reason, int] = {
    Reason.MALFORMED_REQUEST: 400,
    Reason.BAD_PROXY_TOKEN: 407,
    Reason.SECRET_UNAVAILABLE: 503,
    Reason.CREDENTIAL_INVALID: 502,
    Reason.USAGE_LIMIT_EXCEEDED: 429,
}


@dataclass
class GatewayState:
    """What the addon reads: swapped as a whole on policy reload, never mutated in place."""

    policy: CompiledPolicy
    resolver: Resolver
    audit: AuditLog
    transparent: bool
    gateway_addresses: frozenset[IPAddress] = frozenset()
    gateway_ports: frozenset[int] = frozenset()
    broker: CredentialBroker | None = None
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    # Usage-limit counters: kept across policy reloads (keyed by names), so never rebuilt with the policy.
    meter: UsageMeter = field(default_factory=UsageMeter)


@dataclass
class _Conn:
    """Per client connection: who it is, what it asked to reach, and the addresses we agreed to dial."""

    source: str
    identity: Identity | None = None
    authority: tuple[str, int] | None = None  # explicit CONNECT target, normalised
    tls_name: str | None = None  # normalised SNI
    tcp_allowed: Decision | None = None  # a 'tcp' rule allowed this CONNECT: relay bytes, never inspect
    splice: Decision | None = None  # connection-phase allow that needs no interception
    refused: Decision | None = None  # every request on this connection gets this answer
    pinned: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)  # (name, port) -> (ip, port)
    pinned_names: dict[tuple[str, int], str] = field(default_factory=dict)  # (ip, port) -> the name it was checked for
    correlation: dict[str, str] = field(default_factory=dict)  # from the CONNECT: for the connection's records
    audit_seq: int = 0  # the last audit record about this connection (durability strict: on disk before replying)

    def pin(self, name: str, port: int, target: tuple[str, int]) -> None:
        self.pinned[(name, port)] = target
        self.pinned_names.setdefault(target, name)


@dataclass
class _FlowInfo:
    decision: Decision
    facts: RequestFacts
    # Every intercepted response streams through this: it counts bytes and, when a credential was injected,
    # overwrites echoes of it (an upstream that reflects the request must not hand the secret to the sandbox).
    stream: EchoRedactor = field(default_factory=lambda: EchoRedactor([]))
    fingerprint: str | None = None
    header_redactions: int = 0
    buffered: bool = False  # a compressed response to an injected request: redacted whole, after decoding
    correlation: dict[str, str] = field(default_factory=dict)
    limit: str | None = None  # a report-mode usage limit this request passed
    usage: dict[str, dict[str, int]] | None = None  # usage-limit counts after this request


class _Refusal(Exception):
    """Internal: a check failed; carries the decision to answer with."""

    def __init__(
        self, decision: Decision, retry_after: int | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(decision.reason)
        self.decision = decision
        self.retry_after = retry_after  # seconds, for a 429 (Retry-After)
        self.extra = extra or {}  # more audit fields for the refusal's record


def _fail_closed[H: Callable[..., Any]](hook: H) -> H:
    """Run a hook; on any exception refuse what it was about and audit it (see module docstring)."""
    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def async_wrapper(self: EgressAddon, arg: Any) -> None:
            try:
                before = self.state.audit.last_seq
                await hook(self, arg)
                await self._settle_audit(arg, before)
            except Exception as e:
                self._on_hook_error(hook.__name__, arg, e)

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(hook)
    def wrapper(self: EgressAddon, arg: Any) -> None:
        try:
            hook(self, arg)
        except Exception as e:
            self._on_hook_error(hook.__name__, arg, e)

    return wrapper  # type: ignore[return-value]


def _split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port` or `[v6]:port` -> (normalised host, port). Raises HostError."""
    a = authority.strip()
    if a.startswith("["):
        end = a.find("]")
        if end == -1:
            raise HostError(f"bad authority {authority!r}")
        host, rest = a[: end + 1], a[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            raise HostError(f"bad authority {authority!r}")
    elif a.count(":") == 1:
        host, port_text = a.split(":")
    else:
        host, port_text = a, None
    if port_text is None or port_text == "":
        port = default_port
    elif port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise HostError(f"bad port in {authority!r}")
    return normalize_host(host), port


def _deny_body(decision: Decision) -> bytes:
    # Only the rule and the reason: nothing internal (no addresses, no policy text) reaches the sandbox.
    body: dict[str, Any] = {"rule": decision.rule_id, "reason": str(decision.reason)}
    if decision.reason is Reason.USAGE_LIMIT_EXCEEDED:
        body["limit"] = decision.detail  # which limit, e.g. "requests_per_minute:sandbox" (limits.Exceeded.label)
    return orjson.dumps(body)


class EgressAddon:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self._conns: dict[str, _Conn] = {}

    # -- helpers ----------------------------------------------------------------------------------------------

    @property
    def policy(self) -> CompiledPolicy:
        return self.state.policy

    def _conn(self, client: connection.Client) -> _Conn:
        conn = self._conns.get(client.id)
        if conn is None:
            # client_connected always runs first; if it did not, we know nothing about this client: refuse.
            conn = _Conn(source=f"{client.peername[0]}:{client.peername[1]}")
            conn.refused = self.policy.deny(Reason.UNKNOWN_SANDBOX, None, detail="connection state missing")
            self._conns[client.id] = conn
        return conn

    def _source_ip(self, conn: _Conn) -> str:
        return conn.source.rsplit(":", 1)[0]

    def _decide(self, identity: Identity, facts: RequestFacts) -> Decision:
        """The policy core's answer, timed for the decision_seconds histogram."""
        t0 = time.perf_counter()
        decision = self.policy.decide(identity, facts)
        self.state.metrics.decision_seconds.observe(time.perf_counter() - t0)
        return decision

    def _audit_decision(self, conn: _Conn, decision: Decision, facts: RequestFacts | None, **extra: Any) -> None:
        record: dict[str, Any] = {
            F.SANDBOX: decision.sandbox_id,
            F.SOURCE: conn.source,
            F.POLICY_HASH: decision.policy_hash,
            F.VERDICT: str(decision.verdict),
            F.MODE: str(decision.mode),
            F.RULE: decision.rule_id,
            F.REASON: str(decision.reason),
            F.PHASE: "connection" if facts is None or facts.is_connection_phase else "request",
            F.CREDENTIAL: decision.credential.name if decision.credential else None,
        }
        if facts is not None:
            record.update(
                {
                    F.SCHEME: str(facts.scheme),
                    F.HOST: facts.host,
                    F.PORT: facts.port,
                    F.METHOD: facts.method,
                    F.PATH: redact_path(facts.path) if facts.path is not None else None,
                }
            )
        # A request's own correlation ids (passed in extra), else those of its CONNECT.
        correlation = extra.pop(F.CORRELATION, None) or conn.correlation
        if correlation:
            record[F.CORRELATION] = correlation
        if decision.reason is Reason.USAGE_LIMIT_EXCEEDED:
            record[F.LIMIT] = decision.detail
        record.update(extra)
        self.state.audit.decision(**record)
        conn.audit_seq = self.state.audit.last_seq
        kind = _SECURITY_KIND.get(decision.reason)
        if kind is not None:
            self.state.audit.security(
                kind,
                **{
                    F.SANDBOX: decision.sandbox_id,
                    F.SOURCE: conn.source,
                    F.POLICY_HASH: decision.policy_hash,
                    F.HOST: facts.host if facts else extra.get(F.HOST),
                    F.PORT: facts.port if facts else extra.get(F.PORT),
                    F.DETAIL: decision.detail,
                    **({F.CORRELATION: correlation} if correlation else {}),
                },
            )
        invalid = sorted(name for name, value in (correlation or {}).items() if value == CORRELATION_INVALID)
        if invalid:
            # The value is not kept (it may be anything the sandbox chose); that it was sent is worth knowing.
            self.state.audit.security(
                "correlation_invalid",
                **{
                    F.SANDBOX: decision.sandbox_id,
                    F.SOURCE: conn.source,
                    F.POLICY_HASH: decision.policy_hash,
                    F.HOST: facts.host if facts else extra.get(F.HOST),
                    F.PORT: facts.port if facts else extra.get(F.PORT),
                    F.DETAIL: "not short printable ASCII, or sent twice: " + ", ".join(invalid),
                    F.CORRELATION: correlation,
                },
            )

    async def _settle_audit(self, arg: Any, before: int) -> None:
        """Durability strict: whatever a hook lets reach the sandbox (an answer, a response's end, spliced or
        relayed bytes) goes only once every record about its connection is on disk. Records the hook itself
        wrote may be followed by related ones (a security event after its decision): wait for all of them."""
        audit = self.state.audit
        if not audit.holds_responses:
            return
        client = _client_of(arg)
        conn = self._conns.get(client.id) if client is not None else None
        if conn is None or not conn.audit_seq:
            return
        await audit.durable(audit.last_seq if conn.audit_seq > before else conn.audit_seq)

    def _respond(self, flow: http.HTTPFlow, decision: Decision, retry_after: int | None = None) -> None:
        headers = {"Content-Type": "application/json", "Connection": "close"}
        status = _STATUS.get(decision.reason, 403)
        if decision.reason is Reason.BAD_PROXY_TOKEN:
            headers["Proxy-Authenticate"] = 'Basic realm="cube-egress"'
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        flow.response = http.Response.make(status, _deny_body(decision), headers)

    def _identify(self, conn: _Conn, proxy_authorization: str | None) -> Identity:
        """A Proxy-Authorization token names the sandbox; otherwise its source address does."""
        if proxy_authorization is not None:
            token = _token_from_header(proxy_authorization)
            identity = self.policy.identify_by_token(token, conn.source) if token is not None else None
            if identity is None:
                raise _Refusal(self.policy.deny(Reason.BAD_PROXY_TOKEN, None))
            return identity
        identity = self.policy.identify_by_source(self._source_ip(conn))
        if identity is None:
            raise _Refusal(self.policy.deny(Reason.UNKNOWN_SANDBOX, None, detail=conn.source))
        return Identity(identity.sandbox_id, conn.source)

    async def _authorize_destination(self, conn: _Conn, identity: Identity, facts: RequestFacts) -> tuple[str, int]:
        """Resolve with our own resolver, classify every answer, and remember the address to dial."""
        resolution = await self.state.resolver.resolve(facts.host)
        check = self.policy.check_addresses(
            identity, facts, resolution.addresses, self.state.gateway_addresses, self.state.gateway_ports
        )
        if check.decision is not None:
            raise _Refusal(check.decision)
        target = (str(check.allowed[0]), facts.port)
        conn.pin(facts.host, facts.port, target)
        return target

    async def _check_original_destination(self, conn: _Conn, identity: Identity, facts: RequestFacts, dst: str) -> None:
        """Transparent mode: the sandbox chose where its packets went; that address must be one of *our* answers
        for the name it claims (SNI/Host), or a forged /etc/hosts entry could steer an allowed name anywhere."""
        dst_ip = parse_ip_literal(dst)
        if dst_ip is None:
            raise _Refusal(self.policy.deny(Reason.BAD_HOST, identity, detail=f"original destination {dst!r}"))
        answers: tuple[IPAddress, ...] = (dst_ip,)
        if parse_ip_literal(facts.host) is None:
            answers = (await self.state.resolver.resolve(facts.host)).addresses
            if dst_ip not in answers:
                raise _Refusal(
                    self.policy.deny(
                        Reason.DESTINATION_NOT_IN_ANSWERS,
                        identity,
                        detail=f"{facts.host} -> {dst_ip} not in our answers",
                    )
                )
        elif dst_ip != parse_ip_literal(facts.host):
            raise _Refusal(self.policy.deny(Reason.HOST_MISMATCH, identity, detail=f"{facts.host} != {dst_ip}"))
        # All of our answers are judged, as in explicit mode: one refused answer refuses the name (rebinding).
        check = self.policy.check_addresses(
            identity, facts, answers, self.state.gateway_addresses, self.state.gateway_ports
        )
        if check.decision is not None:
            raise _Refusal(check.decision)
        conn.pin(facts.host, facts.port, (str(dst_ip), facts.port))

    # -- agent correlation and usage limits ------------------------------------------------------------------

    def _correlation(self, conn: _Conn, headers: Headers) -> dict[str, str]:
        """The correlation ids of a request (its own over its CONNECT's), as the policy's `correlation:` names
        them. Read before any check, so a refusal is labelled too."""
        own = self.policy.correlation.extract(headers.items(multi=True))
        return {**conn.correlation, **own} if own else conn.correlation

    def _strip_correlation(self, headers: Headers) -> None:
        for name in self.policy.correlation.headers:
            if name in headers:
                del headers[name]  # every value of it

    def _admit(self, decision: Decision, expected_bytes: int) -> tuple[Decision, Admission]:
        """Count a request (or a spliced connection or tunnel) against the usage limits of its sandbox and
        credential. Raises _Refusal (429) for an enforced limit; a report-mode one makes the decision a would-deny."""
        limits = self.policy.limits_for(decision.sandbox_id, decision.credential)
        if not limits or decision.sandbox_id is None:
            return decision, Admission(None)
        admission = self.state.meter.admit_request(decision.sandbox_id, limits, expected_bytes)
        return self._apply_admission(decision, admission), admission

    def _apply_admission(self, decision: Decision, admission: Admission) -> Decision:
        refused = admission.refused
        if refused is not None:
            credential = refused.limit.name if refused.limit.subject is LimitSubject.CREDENTIAL else None
            self.state.metrics.count_usage_limited(refused.scope, credential, str(refused.kind))
            extra = {F.USAGE: admission.usage} if admission.usage else {}
            raise _Refusal(limit_decision(decision, refused), refused.retry_after_s, extra)
        if admission.reported:
            return limit_decision(decision, admission.reported[0])
        return decision

    def _count_request_bytes(self, flow: http.HTTPFlow, info: _FlowInfo) -> bool:
        """The whole request has been read: count its bytes against the session budgets before anything is sent.
        False when it was refused (answered 429 and audited here)."""
        decision = info.decision
        limits = self.policy.limits_for(decision.sandbox_id, decision.credential)
        if decision.sandbox_id is None or not any(limit.bytes_per_session for limit in limits):
            return True
        req = flow.request
        admission = self.state.meter.add_bytes(
            decision.sandbox_id, limits, _request_bytes(req, len(req.raw_content or b""))
        )
        try:
            info.decision = self._apply_admission(decision, admission)
        except _Refusal as r:
            flow.metadata.pop("cube_egress", None)
            conn = self._conn(flow.client_conn)
            self._audit_decision(conn, r.decision, info.facts, **r.extra, **{F.CORRELATION: info.correlation})
            self._respond(flow, r.decision)
            return False
        info.limit = info.limit or _reported(admission)
        usage = dict(info.usage or {})
        for subject, counts in (admission.usage or {}).items():
            usage[subject] = {**usage.get(subject, {}), **counts}  # bytes now, the request count from before
        info.usage = usage
        return True

    # -- connection hooks ---------------------------------------------------------------------------------------

    @_fail_closed
    def client_connected(self, client: connection.Client) -> None:
        conn = _Conn(source=f"{client.peername[0]}:{client.peername[1]}")
        self._conns[client.id] = conn
        if self.state.transparent:
            try:
                conn.identity = self._identify(conn, None)
            except _Refusal as r:
                # Keep the connection so the refusal can be answered with a readable 403 at the first request.
                self._refuse_connection(conn, r.decision, None)

    def client_disconnected(self, client: connection.Client) -> None:
        self._conns.pop(client.id, None)

    @_fail_closed
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """Explicit CONNECT: identity, authority and policy are checked, and the destination resolved and pinned,
        before any upstream connection exists; a refusal here never reaches the network."""
        conn = self._conn(flow.client_conn)
        proxy_auth = flow.request.headers.get("Proxy-Authorization")
        flow.request.headers.pop("Proxy-Authorization", None)
        # The CONNECT's correlation ids label every record of the tunnel (requests inside may add their own).
        conn.correlation = self._correlation(conn, flow.request.headers)
        self._strip_correlation(flow.request.headers)
        facts: RequestFacts | None = None
        try:
            identity = self._identify(conn, proxy_auth)
            conn.identity = identity
            try:
                host, port = _split_authority(f"{flow.request.host}:{flow.request.port}", 443)
            except HostError as e:
                raise _Refusal(self.policy.deny(Reason.BAD_HOST, identity, detail=str(e))) from None
            conn.authority = (host, port)
            tcp_facts = RequestFacts(Scheme.TCP, host, port)
            tcp_decision = self._decide(identity, tcp_facts)
            if tcp_decision.verdict is Verdict.ALLOW:
                facts = tcp_facts
                await self._authorize_destination(conn, identity, facts)
                conn.tcp_allowed, _ = self._admit(tcp_decision, 0)  # a tunnel counts as one request
                return
            facts = RequestFacts(Scheme.HTTPS, host, port)
            decision = self._decide(identity, facts)
            if decision.blocks:
                raise _Refusal(decision)
            await self._authorize_destination(conn, identity, facts)
            if not decision.intercept:
                conn.splice, _ = self._admit(decision, 0)  # a spliced connection counts as one request
        except _Refusal as r:
            self._audit_decision(conn, r.decision, facts, **r.extra)
            self._respond(flow, r.decision, r.retry_after)

    @_fail_closed
    async def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        conn = self._conn(data.context.client)
        if conn.refused is not None:
            return  # intercept, so the refusal is answered as a 403 at the first request
        sni_raw = data.client_hello.sni
        try:
            sni = normalize_host(sni_raw) if sni_raw else None
        except HostError as e:
            self._refuse_connection(conn, self.policy.deny(Reason.BAD_HOST, conn.identity, detail=str(e)), None)
            return
        conn.tls_name = sni
        if not self.state.transparent:
            if conn.tcp_allowed is not None:
                data.ignore_connection = True  # a 'tcp' rule: bytes are relayed as they are
                self._audit_connection(conn, conn.tcp_allowed, RequestFacts(Scheme.TCP, *conn.authority or ("", 0)))
                return
            if conn.authority is None:
                self._refuse_connection(
                    conn, self.policy.deny(Reason.BAD_HOST, None, detail="TLS without CONNECT"), None
                )
                return
            if sni is not None and sni != conn.authority[0]:
                self._refuse_connection(
                    conn,
                    self.policy.deny(
                        Reason.HOST_MISMATCH, conn.identity, detail=f"SNI {sni} != CONNECT {conn.authority[0]}"
                    ),
                    RequestFacts(Scheme.HTTPS, *conn.authority),
                )
                return
            if conn.splice is not None:
                data.ignore_connection = True
                self._audit_connection(conn, conn.splice, RequestFacts(Scheme.HTTPS, *conn.authority))
            return
        # Transparent: the name comes from SNI, the port and address from the original destination.
        dst = data.context.server.address
        if dst is None or conn.identity is None:
            self._refuse_connection(conn, self.policy.deny(Reason.UNKNOWN_SANDBOX, conn.identity), None)
            return
        facts = RequestFacts(Scheme.HTTPS, sni or normalize_host(dst[0]), dst[1])
        try:
            decision = self._decide(conn.identity, facts)
            if decision.blocks:
                raise _Refusal(decision)
            await self._check_original_destination(conn, conn.identity, facts, dst[0])
            if not decision.intercept:
                decision, _ = self._admit(decision, 0)  # a spliced connection counts as one request
        except _Refusal as r:
            self._refuse_connection(conn, r.decision, facts)
            return
        if not decision.intercept:
            data.ignore_connection = True
            self._audit_connection(conn, decision, facts)

    def _refuse_connection(self, conn: _Conn, decision: Decision, facts: RequestFacts | None) -> None:
        """Audit the refusal now (the client may never send a request) and mark the connection: its TLS handshake
        is intercepted so the sandbox gets a readable 403 for every request, and every server_connect for it is
        refused, so no upstream connection is ever made."""
        conn.refused = decision
        conn.splice = None
        conn.tcp_allowed = None
        self._audit_decision(conn, decision, facts)

    def _audit_connection(self, conn: _Conn, decision: Decision, facts: RequestFacts) -> None:
        self._audit_decision(conn, decision, facts, **{F.INTERCEPTED: False})

    @_fail_closed
    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Dial only what the checks pinned. Anything else (a name nobody checked) is refused here, as the last line."""
        conn = self._conns.get(data.client.id)
        address = data.server.address
        if conn is None or conn.refused is not None or address is None:
            data.server.error = "refused by cube-egress: connection not authorised"
            return
        try:
            key = (normalize_host(str(address[0])), int(address[1]))
        except HostError:
            data.server.error = "refused by cube-egress: bad destination"
            return
        if key in conn.pinned:
            # A spliced CONNECT: mitmproxy dials the authority's name; swap in the address we checked.
            target, name = conn.pinned[key], key[0]
        elif key in conn.pinned_names:
            # An intercepted request: requestheaders already pointed it at the pinned address (so keep-alive finds
            # the connection again); the name it was checked for stays the SNI and the certificate name.
            target, name = key, conn.pinned_names[key]
        else:
            data.server.error = "refused by cube-egress: destination not authorised"
            return
        if data.server.sni == str(address[0]) and parse_ip_literal(name) is None:
            data.server.sni = name
        data.server.address = target

    @_fail_closed
    async def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """Non-HTTP bytes: only a CONNECT that a 'tcp' rule allowed may carry them."""
        conn = self._conn(flow.client_conn)
        if conn.tcp_allowed is not None and not self.state.transparent:
            self._audit_connection(conn, conn.tcp_allowed, RequestFacts(Scheme.TCP, *conn.authority or ("", 0)))
            return
        decision = self.policy.deny(Reason.PROTOCOL_NOT_ALLOWED, conn.identity, detail="non-HTTP traffic")
        target = conn.authority or flow.server_conn.address
        facts = RequestFacts(Scheme.TCP, str(target[0]), int(target[1])) if target else None
        self._audit_decision(conn, decision, facts)
        flow.kill()

    # -- request hooks ------------------------------------------------------------------------------------------

    @_fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        conn = self._conn(flow.client_conn)
        facts: RequestFacts | None = None
        correlation = self._correlation(conn, flow.request.headers)
        try:
            if conn.refused is not None:
                self._respond(flow, conn.refused)  # audited when the connection was refused
                return
            facts, identity = self._request_facts(conn, flow)
            self._strip_correlation(flow.request.headers)  # decided on as sent; never sent upstream
            decision = self._decide(identity, facts)
            if decision.blocks:
                raise _Refusal(decision)
            if self.state.transparent:
                dst = flow.server_conn.address
                if dst is None:
                    raise _Refusal(self.policy.deny(Reason.UNKNOWN_SANDBOX, identity))
                await self._check_original_destination(conn, identity, facts, str(dst[0]))
            else:
                if (facts.host, facts.port) not in conn.pinned:
                    await self._authorize_destination(conn, identity, facts)
                # mitmproxy keys upstream connections by (request.host, port): pointing the request at the pinned
                # address (the Host header stays as sent) makes the next request reuse the same connection.
                flow.request.data.host, flow.request.data.port = conn.pinned[(facts.host, facts.port)]
            decision, admission = self._admit(decision, _request_bytes(flow.request, _declared_length(flow.request)))
            flow.metadata["cube_egress"] = _FlowInfo(
                decision, facts, correlation=correlation, usage=admission.usage, limit=_reported(admission)
            )
        except _Refusal as r:
            # Refused before the facts were complete: record what the request claimed, as it claimed it.
            extra = (
                {}
                if facts is not None
                else {
                    F.PHASE: "request",
                    F.METHOD: flow.request.method,
                    F.PATH: redact_path(flow.request.path),
                    F.HOST: flow.request.pretty_host,
                    F.PORT: flow.request.port,
                    F.SCHEME: flow.request.scheme,
                }
            )
            self._audit_decision(conn, r.decision, facts, **extra, **r.extra, **{F.CORRELATION: correlation})
            self._respond(flow, r.decision, r.retry_after)

    def _request_facts(self, conn: _Conn, flow: http.HTTPFlow) -> tuple[RequestFacts, Identity]:
        req = flow.request
        proxy_auth = req.headers.get("Proxy-Authorization")
        req.headers.pop("Proxy-Authorization", None)
        identity = conn.identity
        if not self.state.transparent and conn.authority is None:
            # A plain proxy request (no CONNECT): each request names its sandbox (source or token).
            identity = self._identify(conn, proxy_auth)
        if identity is None:
            raise _Refusal(self.policy.deny(Reason.UNKNOWN_SANDBOX, None, detail=conn.source))
        scheme = req.scheme if req.scheme in _DEFAULT_PORT else "http"
        hosts = req.headers.get_all("Host")
        if len(hosts) > 1:
            raise _Refusal(self.policy.deny(Reason.BAD_HOST, identity, detail="duplicate Host header"))
        host_value = req.host_header
        if not host_value:
            raise _Refusal(self.policy.deny(Reason.BAD_HOST, identity, detail="missing Host"))
        if hosts and req.authority and (req.is_http2 or req.is_http3) and hosts[0] != req.authority:
            raise _Refusal(self.policy.deny(Reason.HOST_MISMATCH, identity, detail=":authority != Host"))
        try:
            host, port = _split_authority(host_value, _DEFAULT_PORT[scheme])
        except HostError as e:
            raise _Refusal(self.policy.deny(Reason.BAD_HOST, identity, detail=str(e))) from None

        def mismatch(what: str, other: tuple[str, int]) -> _Refusal:
            return _Refusal(
                self.policy.deny(
                    Reason.HOST_MISMATCH, identity, detail=f"Host {host}:{port} != {what} {other[0]}:{other[1]}"
                )
            )

        if self.state.transparent:
            dst = flow.server_conn.address
            if dst is not None and dst[1] != port:
                raise mismatch("original destination", (str(dst[0]), dst[1]))
            if conn.tls_name is not None and conn.tls_name != host:
                raise mismatch("SNI", (conn.tls_name, port))
        elif conn.authority is None:
            # mitmproxy has already moved the absolute-form URL into host/port (and blanked the authority for
            # HTTP/1); an origin-form request sent straight to the proxy lands here with host from Host.
            try:
                url_target = _split_authority(f"{req.host}:{req.port}", _DEFAULT_PORT[scheme])
            except HostError as e:
                raise _Refusal(self.policy.deny(Reason.BAD_HOST, identity, detail=str(e))) from None
            if url_target != (host, port):
                raise mismatch("absolute URL", url_target)
        else:
            if conn.authority != (host, port):
                raise mismatch("CONNECT", conn.authority)
            if conn.tls_name is not None and conn.tls_name != host:
                raise mismatch("SNI", (conn.tls_name, port))
        path = req.path
        headers = tuple((k.lower(), v) for k, v in req.headers.items(multi=True))
        return RequestFacts(Scheme(scheme), host, port, req.method, path, headers), identity

    @_fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        """With the whole request read: refuse placeholders that are not bound here, then inject the credential."""
        info = flow.metadata.get("cube_egress")
        if flow.response is not None or not isinstance(info, _FlowInfo):
            return
        if not self._count_request_bytes(flow, info):
            return
        decision = info.decision
        cred = decision.credential
        if cred is None and not self.policy.placeholders:
            return  # nothing to inject and no placeholder that could be misplaced: leave the request untouched
        conn = self._conn(flow.client_conn)
        sandbox = decision.sandbox_id or ""
        identity = Identity(sandbox, conn.source)
        outgoing = _outgoing(flow)
        foreign = find_placeholders(self.policy.placeholders, outgoing) - ({cred.name} if cred else set())

        def refusal(reason: Reason, detail: str) -> _Refusal:
            # Name the rule and the credential: "which credential failed" is the first question an operator asks.
            return _Refusal(self.policy.deny(reason, identity, detail=detail, rule_id=decision.rule_id))

        try:
            if foreign:
                raise refusal(
                    Reason.CREDENTIAL_ENDPOINT_MISMATCH,
                    f"placeholder of {', '.join(sorted(foreign))} sent to {info.facts.host}",
                )
            if cred is None:
                return
            broker = self.state.broker
            if broker is None:
                raise refusal(Reason.SECRET_UNAVAILABLE, f"credential {cred.name}: no secret backend")
            try:
                material = await broker.material(cred, sandbox)
                inserted = apply(cred.injector, material, outgoing)
            except SecretError as e:
                raise refusal(Reason.SECRET_UNAVAILABLE, f"credential {cred.name}: {e}") from None
            except InjectionError as e:
                reason = Reason.CREDENTIAL_INVALID if e.reason == "credential_invalid" else Reason.MALFORMED_REQUEST
                raise refusal(reason, f"credential {cred.name}: {e}") from None
        except _Refusal as r:
            flow.metadata.pop("cube_egress", None)
            self._audit_decision(
                conn,
                r.decision,
                info.facts,
                **{F.CREDENTIAL: cred.name if cred else None, F.CORRELATION: info.correlation},
            )
            self._respond(flow, r.decision)
            return
        if inserted:
            # An upstream that compresses its answer would carry an echo past the redactor: ask for none.
            outgoing.set_header("Accept-Encoding", "identity")
        _write_back(flow, outgoing)
        if inserted:
            info.stream = EchoRedactor(needles_for(inserted))
            info.fingerprint = _fingerprint(broker.hmac_key, inserted[0])
            self.state.metrics.count_injection(cred.name)

    @_fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Before any response byte reaches the sandbox: redact echoed credentials from the headers and route the
        body through the streaming redactor (which also counts it)."""
        info = flow.metadata.get("cube_egress")
        if not isinstance(info, _FlowInfo) or flow.response is None:
            return
        self._prepare_response(flow.response, info)
        if self.state.audit.holds_responses:
            _hold_end_until_audited(flow, info)

    def _prepare_response(self, response: http.Response, info: _FlowInfo) -> None:
        if info.stream.needles and response.headers.get("content-encoding", "identity").lower() != "identity":
            # The upstream compressed anyway: buffer this one response and redact its decoded body in `response`.
            info.buffered = True
            response.stream = False
            self._redact_headers(response, info)
            return
        self._redact_headers(response, info)
        # Stream every other intercepted response: server-sent events stay live and memory stays flat.
        response.stream = info.stream

    def _redact_headers(self, response: http.Response, info: _FlowInfo) -> None:
        if info.stream.needles:
            for name in set(response.headers.keys()):
                values = response.headers.get_all(name)
                redacted = [info.stream.redact_header_value(v) for v in values]
                if redacted != values:
                    info.header_redactions += sum(a != b for a, b in zip(values, redacted, strict=True))
                    response.headers.set_all(name, redacted)

    @_fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:  # async: the wrapper awaits the record (strict)
        info = flow.metadata.get("cube_egress")
        if isinstance(info, _FlowInfo) and info.buffered and flow.response is not None:
            body = flow.response.get_content(strict=False) or b""
            redacted = info.stream(body) + info.stream(b"")
            if redacted != body:
                flow.response.content = redacted  # re-encoded with the response's own Content-Encoding
        self._audit_flow(flow)

    @_fail_closed
    async def error(self, flow: http.HTTPFlow) -> None:
        self._audit_flow(flow)

    def _audit_flow(self, flow: http.HTTPFlow) -> None:
        info = flow.metadata.get("cube_egress")
        if not isinstance(info, _FlowInfo):
            return  # refused in requestheaders: already audited there
        conn = self._conns.get(flow.client_conn.id) or _Conn(
            source=f"{flow.client_conn.peername[0]}:{flow.client_conn.peername[1]}"
        )
        resp = flow.response
        started = flow.request.timestamp_start
        ended = (resp.timestamp_end if resp is not None else None) or time.time()
        self.state.metrics.request_seconds.observe(max(ended - started, 0.0))
        if resp is not None and resp.timestamp_start and flow.request.timestamp_end:
            self.state.metrics.upstream_seconds.observe(max(resp.timestamp_start - flow.request.timestamp_end, 0.0))
        peer = flow.server_conn.peername
        if resp is None:
            bytes_out = 0
        elif resp.stream:
            bytes_out = info.stream.bytes_out
        else:
            bytes_out = len(resp.raw_content or b"")
        echoes = info.stream.hits + info.header_redactions
        if echoes:
            self.state.audit.security(
                "secret_echo",
                **{
                    F.SANDBOX: info.decision.sandbox_id,
                    F.SOURCE: conn.source,
                    F.POLICY_HASH: info.decision.policy_hash,
                    F.HOST: info.facts.host,
                    F.PORT: info.facts.port,
                    F.CREDENTIAL: info.decision.credential.name if info.decision.credential else None,
                    F.DETAIL: f"{echoes} echo(es) of the injected credential redacted from the response",
                    **({F.CORRELATION: info.correlation} if info.correlation else {}),
                },
            )
        self._audit_decision(
            conn,
            info.decision,
            info.facts,
            **{
                F.INTERCEPTED: True,
                F.UPSTREAM_ADDRESS: f"{peer[0]}:{peer[1]}" if peer else None,
                F.UPSTREAM_STATUS: resp.status_code if resp is not None else None,
                F.BYTES_IN: len(flow.request.raw_content or b""),
                F.BYTES_OUT: bytes_out,
                F.CREDENTIAL: info.decision.credential.name if info.fingerprint and info.decision.credential else None,
                F.CREDENTIAL_FINGERPRINT: info.fingerprint,
                F.ECHO_REDACTIONS: echoes,
                F.DURATION_MS: round((ended - started) * 1000, 3),
                F.ERROR: flow.error.msg if flow.error else None,
                F.CORRELATION: info.correlation,
                **({F.LIMIT: info.limit} if info.limit else {}),
                **({F.USAGE: info.usage} if info.usage else {}),
            },
        )

    # -- failure ------------------------------------------------------------------------------------------------

    def _on_hook_error(self, hook: str, arg: Any, exc: Exception) -> None:
        log.error("hook %s failed (%s); refusing", hook, type(exc).__name__, exc_info=exc)
        decision = self.policy.deny(Reason.GATEWAY_ERROR, None, detail=f"{hook}: {type(exc).__name__}")
        client = _client_of(arg)
        conn = self._conns.get(client.id) if client is not None else None
        if conn is not None:
            conn.refused = decision
            conn.splice = None
            conn.tcp_allowed = None
        self.state.audit.security(
            "hook_error",
            **{F.SOURCE: conn.source if conn else None, F.POLICY_HASH: decision.policy_hash, F.DETAIL: decision.detail},
        )
        if isinstance(arg, http.HTTPFlow):
            arg.metadata.pop("cube_egress", None)
            if hook in ("responseheaders", "response"):
                # The upstream has answered: cut the connection rather than let any of it through.
                arg.kill()
            else:
                self._respond(arg, decision)
        elif isinstance(arg, tls.ClientHelloData):
            arg.ignore_connection = False
        elif isinstance(arg, server_hooks.ServerConnectionHookData):
            arg.server.error = "refused by cube-egress: gateway error"
        elif isinstance(arg, tcp.TCPFlow):
            arg.kill()
        elif isinstance(arg, connection.Client):
            arg.error = "refused by cube-egress: gateway error"


def _hold_end_until_audited(flow: http.HTTPFlow, info: _FlowInfo) -> None:
    """Durability strict: a streamed body goes out as it arrives (server-sent events stay live), but its end (the
    last chunk of a chunked HTTP/1.1 body, END_STREAM in HTTP/2) is sent only after the `response` hook has made
    the record durable. An HTTP/1 body framed by Content-Length would end with its last byte, before that hook,
    so it is re-framed as chunked; an HTTP/1.0 client cannot take chunked, so its response is buffered whole."""
    response = flow.response
    version = flow.request.http_version
    if response is None or not response.stream or version not in ("HTTP/1.1", "HTTP/1.0"):
        return
    if flow.request.method.upper() == "HEAD" or response.status_code in (204, 304) or response.status_code < 200:
        return  # no body: the response goes out whole after the `response` hook
    if "chunked" in response.headers.get("transfer-encoding", "").lower():
        return
    if version == "HTTP/1.0":
        info.buffered = True
        response.stream = False
        return
    response.headers.pop("content-length", None)
    response.headers["transfer-encoding"] = "chunked"


def _client_of(arg: Any) -> connection.Client | None:
    if isinstance(arg, connection.Client):
        return arg
    if isinstance(arg, http.HTTPFlow | tcp.TCPFlow):
        return arg.client_conn
    if isinstance(arg, tls.ClientHelloData):
        return arg.context.client
    if isinstance(arg, server_hooks.ServerConnectionHookData):
        return arg.client
    return None


def _token_from_header(value: str) -> str | None:
    """`Basic base64(user:token)` (what curl -x http://user:token@gw sends) or `Bearer token`."""
    scheme, _, param = value.strip().partition(" ")
    if scheme.lower() == "bearer" and param:
        return param.strip()
    if scheme.lower() == "basic" and param:
        try:
            decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        _, _, token = decoded.partition(":")
        return token or None
    return None


def _outgoing(flow: http.HTTPFlow) -> OutgoingRequest:
    req = flow.request
    return OutgoingRequest(
        scheme=req.scheme,
        host=req.host_header or req.pretty_host,
        method=req.method,
        path=req.path,
        headers=[(k, v) for k, v in req.headers.items(multi=True)],
        body=req.get_content(strict=False) or b"",
    )


def _write_back(flow: http.HTTPFlow, outgoing: OutgoingRequest) -> None:
    req = flow.request
    req.path = outgoing.path
    req.headers = Headers([(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in outgoing.headers])
    if outgoing.body != (req.get_content(strict=False) or b""):
        req.content = outgoing.body


def _declared_length(req: http.Request) -> int:
    """The body size a request announces (0 when chunked or absent): lets a byte budget refuse it unread."""
    value = req.headers.get("content-length", "")
    return int(value) if value.isdigit() else 0


def _request_bytes(req: http.Request, body: int) -> int:
    """What a byte budget counts for a request: its request line (method, target), header block and body."""
    return len(req.method) + len(req.path) + len(bytes(req.headers)) + body


def _reported(admission: Admission) -> str | None:
    return admission.reported[0].label if admission.reported else None


def _fingerprint(key: bytes, value: str) -> str:
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]
