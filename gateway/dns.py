"""Policy-aware DNS for sandboxes: UDP and TCP on one address, in the gateway's event loop.

A sandbox's resolver points here. Each query is identified by its source address, judged by the policy core
(`CompiledPolicy.decide_dns`) and audited as a decision record with phase `dns`:

* a name the sandbox's policy allows: A is answered with the addresses the gateway's own resolver returned (the
  answers transparent mode later checks original destinations against), after `check_dns_answers` accepted them,
  with a TTL that never outlives the gateway's cache entry; AAAA gets an empty NOERROR (no IPv6 in sandboxes);
* any other name: NXDOMAIN, and nothing is sent upstream, so names cannot carry data out;
* other query types, names that are no host names or look like encoded data, unknown sources, answers that point
  somewhere the sandbox may not go (169.254.169.254): REFUSED, with a security event where it is an attack signal.

Malformed packets are dropped (counted and logged); a UDP answer that does not fit the client's size is sent
truncated (TC) so the client retries over TCP. The policy is read at every query, so a reload applies at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from .audit import AuditLog
from .audit import fields as F
from .policies import AddressCheck, CompiledPolicy, DnsDecision, DnsReply, IPAddress, Reason
from .resolver import Resolution, Resolver

__all__ = ["DnsServer", "DnsStats"]

log = logging.getLogger("cube_egress.dns")

# The EDNS payload size the server offers and honours at most (the 2020 DNS flag day value, safe from
# fragmentation); without EDNS a UDP answer is at most 512 bytes.
UDP_PAYLOAD = 1232
UDP_PLAIN = 512
MAX_INFLIGHT = 1024  # UDP queries being answered at once; more are dropped (the client retries)
MAX_TCP_CLIENTS = 128
TCP_IDLE_S = 10.0
_LOG_EVERY_S = 10.0

# Security events for refusals that are attack signals (the rest are decision records only).
_SECURITY_KIND: dict[Reason, str] = {
    Reason.UNKNOWN_SANDBOX: "unknown_sandbox",
    Reason.BAD_NAME: "dns_refused",
    Reason.NAME_TOO_LONG: "dns_refused",
    Reason.LABEL_TOO_LONG: "dns_refused",
    Reason.HIGH_ENTROPY_LABEL: "dns_refused",
    Reason.ADDRESS_REFUSED: "address_refused",
    Reason.GATEWAY_LOOP: "gateway_loop",
}
_RCODE = {
    DnsReply.NODATA: dns.rcode.NOERROR,
    DnsReply.NXDOMAIN: dns.rcode.NXDOMAIN,
    DnsReply.REFUSED: dns.rcode.REFUSED,
}


@dataclasses.dataclass(slots=True)
class DnsStats:
    queries: int = 0  # answered (every one audited)
    malformed: int = 0  # unparseable, a response, an empty TCP message (dropped); not one question (FORMERR)
    overloaded: int = 0  # UDP queries dropped because MAX_INFLIGHT were being answered
    truncated: int = 0  # UDP answers sent with TC
    errors: int = 0  # internal errors: answered SERVFAIL and audited as hook_error, or (building the reply) dropped


@dataclasses.dataclass(slots=True)
class _Outcome:
    """What one query got, for the answer and its audit record."""

    decision: DnsDecision
    rcode: dns.rcode.Rcode
    refusal: AddressCheck | None = None  # the address check that refused the answer
    addresses: tuple[IPAddress, ...] = ()
    ttl: int | None = None
    error: str | None = None


class DnsServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        policy: Callable[[], CompiledPolicy],
        resolver: Resolver,
        audit: AuditLog,
        gateway_addresses: frozenset[IPAddress] = frozenset(),
        gateway_ports: frozenset[int] = frozenset(),
        static_ttl_s: int = 5,
    ) -> None:
        """`policy` is called at every query (the gateway passes `lambda: state.policy`, so reloads apply).
        `static_ttl_s`: the TTL of answers the resolver did not cache (its static `hosts`)."""
        self.host = host
        self.port = port
        self._policy = policy
        self._resolver = resolver
        self._audit = audit
        self._gateway_addresses = gateway_addresses
        self._gateway_ports = gateway_ports
        self._static_ttl_s = static_ttl_s
        self.stats = DnsStats()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_clients: set[asyncio.Task[Any]] = set()
        self._last_log = -math.inf

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind UDP and TCP (raises OSError if either cannot be bound; nothing stays bound then)."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(self.host, self.port)
        )
        self._udp = transport
        try:
            # With port 0 (tests), TCP takes the port UDP got.
            port = transport.get_extra_info("sockname")[1]
            self._tcp = await asyncio.start_server(self._tcp_client, self.host, port, reuse_address=True)
        except BaseException:
            transport.close()
            self._udp = None
            raise
        self.port = port
        log.info("DNS for sandboxes on %s:%d (udp, tcp)", self.host, self.port)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
        for task in [*self._tasks, *self._tcp_clients]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._tcp_clients, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()
            self._tcp = None

    # -- transports -----------------------------------------------------------------------------------------

    def _datagram(self, data: bytes, addr: tuple[Any, ...], transport: asyncio.DatagramTransport) -> None:
        if len(self._tasks) >= MAX_INFLIGHT:
            self.stats.overloaded += 1
            self._log_drop("overloaded", addr)
            return
        task = asyncio.ensure_future(self._udp_answer(data, addr, transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _udp_answer(self, data: bytes, addr: tuple[Any, ...], transport: asyncio.DatagramTransport) -> None:
        wire = await self.answer(data, (str(addr[0]), int(addr[1])), udp=True)
        if wire is not None and not transport.is_closing():
            transport.sendto(wire, addr)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        if task is None or len(self._tcp_clients) >= MAX_TCP_CLIENTS or not peer:
            writer.close()
            return
        self._tcp_clients.add(task)
        source = (str(peer[0]), int(peer[1]))
        try:
            while True:  # RFC 7766: several queries on one connection, answered in order
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S)
                    size = int.from_bytes(head, "big")
                    data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE_S)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                if not size:
                    self._malformed(source, "empty message")
                    return
                wire = await self.answer(data, source, udp=False)
                if wire is None:
                    return  # a malformed message ends the connection
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
        except ConnectionError:
            return
        finally:
            self._tcp_clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- one query ------------------------------------------------------------------------------------------

    async def answer(self, data: bytes, source: tuple[str, int], *, udp: bool) -> bytes | None:
        """The wire answer to one DNS message from `source` (ip, port), or None to drop it. Never raises."""
        try:
            return await self._answer(data, source, udp)
        except Exception:  # building or encoding the reply failed: drop it, keep serving
            self.stats.errors += 1
            log.exception("DNS message from %s:%s dropped", *source)
            return None

    async def _answer(self, data: bytes, source: tuple[str, int], udp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except Exception:  # dnspython raises many exception types on hostile input; none may escape
            self._malformed(source, "unparseable")
            return None
        if query.flags & dns.flags.QR:
            self._malformed(source, "a response, not a query")
            return None
        response = dns.message.make_response(query, recursion_available=True, our_payload=UDP_PAYLOAD)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return self._wire(response, query, udp)
        if len(query.question) != 1:
            self._malformed(source, f"{len(query.question)} questions")
            response.set_rcode(dns.rcode.FORMERR)
            return self._wire(response, query, udp)
        question = query.question[0]
        src = f"{source[0]}:{source[1]}"
        policy = self._policy()  # once per query: a reload in between does not mix two policies
        try:
            outcome = await self._decide(policy, source[0], src, question)
        except Exception as e:  # fail closed: no answer the policy did not approve
            self.stats.errors += 1
            log.exception("DNS query from %s failed", src)
            self._audit.security(
                "hook_error",
                **{
                    F.SANDBOX: None,
                    F.SOURCE: src,
                    F.POLICY_HASH: policy.policy_hash,
                    F.DETAIL: f"dns: {type(e).__name__}",
                },
            )
            response.set_rcode(dns.rcode.SERVFAIL)
            return self._wire(response, query, udp)
        self.stats.queries += 1
        response.set_rcode(outcome.rcode)
        a4 = [str(a) for a in outcome.addresses if a.version == 4]
        if a4:
            response.answer.append(dns.rrset.from_text_list(question.name, outcome.ttl or 0, "IN", "A", a4))
        self._record(src, question.rdclass, outcome, a4)
        return self._wire(response, query, udp)

    async def _decide(self, policy: CompiledPolicy, ip: str, src: str, question: dns.rrset.RRset) -> _Outcome:
        identity = policy.identify_by_source(ip)
        if identity is not None:
            identity = dataclasses.replace(identity, source=src)
        qname = question.name.to_text(omit_final_dot=True)
        qtype = dns.rdatatype.to_text(question.rdtype)
        qclass = dns.rdataclass.to_text(question.rdclass)
        decision = policy.decide_dns(identity, qname, qtype, qclass)
        if decision.reply is not DnsReply.ANSWER:
            return _Outcome(decision, _RCODE[decision.reply])
        assert identity is not None
        resolution = await self._resolver.resolve(decision.name)
        check = policy.check_dns_answers(
            identity, decision, resolution.addresses, self._gateway_addresses, self._gateway_ports
        )
        if check.decision is not None:
            if check.decision.reason is Reason.DESTINATION_NOT_RESOLVED:
                # The name is allowed but has no address: say so (NXDOMAIN), or SERVFAIL if the resolver failed.
                failed = resolution.error is not None and resolution.error.startswith("resolver failed")
                rcode = dns.rcode.SERVFAIL if failed else dns.rcode.NXDOMAIN
                return _Outcome(decision, rcode, check, error=resolution.error)
            return _Outcome(decision, dns.rcode.REFUSED, check)
        return _Outcome(decision, dns.rcode.NOERROR, addresses=check.allowed, ttl=self._ttl(resolution))

    def _ttl(self, resolution: Resolution) -> int:
        """Whole seconds the gateway's resolver keeps this answer: the sandbox must not cache it longer, or the
        transparent-mode check (its destination must be among the gateway's answers) could see a newer answer."""
        left = self._resolver.expires_in(resolution)
        if left is None:
            return self._static_ttl_s  # a static `hosts` answer (never cached) or an IP literal
        return max(0, math.floor(left))

    def _record(self, src: str, rdclass: dns.rdataclass.RdataClass, outcome: _Outcome, answers: list[str]) -> None:
        d = outcome.decision
        shown = outcome.refusal.decision if outcome.refusal is not None else None
        verdict, mode, rule, reason = (
            (shown.verdict, shown.mode, shown.rule_id, shown.reason)
            if shown is not None
            else (d.verdict, d.mode, d.rule_id, d.reason)
        )
        qtype = d.qtype if rdclass == dns.rdataclass.IN else f"{dns.rdataclass.to_text(rdclass)} {d.qtype}"
        self._audit.decision(
            **{
                F.SANDBOX: d.sandbox_id,
                F.SOURCE: src,
                F.POLICY_HASH: d.policy_hash,
                F.PHASE: F.PHASE_DNS,
                F.VERDICT: str(verdict),
                F.MODE: str(mode),
                F.RULE: rule,
                F.REASON: str(reason),
                F.HOST: d.name,
                F.QTYPE: qtype,
                F.RCODE: dns.rcode.to_text(outcome.rcode),
                F.ANSWERS: answers,
                F.TTL: outcome.ttl if answers else None,
                F.ERROR: outcome.error,
            }
        )
        kind = _SECURITY_KIND.get(reason)
        if kind is not None:
            detail = shown.detail if shown is not None else d.detail
            self._audit.security(
                kind,
                **{
                    F.SANDBOX: d.sandbox_id,
                    F.SOURCE: src,
                    F.POLICY_HASH: d.policy_hash,
                    F.HOST: d.name,
                    F.DETAIL: f"dns {qtype}: {detail}" if detail else f"dns {qtype}",
                },
            )

    def _wire(self, response: dns.message.Message, query: dns.message.Message, udp: bool) -> bytes:
        if not udp:
            return response.to_wire(max_size=65535)
        limit = max(UDP_PLAIN, min(query.payload, UDP_PAYLOAD)) if query.edns >= 0 else UDP_PLAIN
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            self.stats.truncated += 1
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    def _malformed(self, source: tuple[str, int], why: str) -> None:
        self.stats.malformed += 1
        self._log_drop(why, source)

    def _log_drop(self, why: str, source: tuple[Any, ...]) -> None:
        """At most one warning per 10 s: a flood of junk must not become a flood of log lines."""
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            s = self.stats
            log.warning(
                "DNS message from %s dropped (%s); so far %d malformed, %d dropped under load",
                source[0],
                why,
                s.malformed,
                s.overloaded,
            )


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self._transport is not None:
            self._server._datagram(data, addr, self._transport)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS UDP socket error: %s", exc)
