"""DNS for sandboxes (gateway/dns.py): in-process against a fake upstream, then end to end in the hermetic world.

The in-process tests run `DnsServer` on loopback with the gateway's real `Resolver` pointed at a tiny upstream
that logs what it was asked, so "never forwarded upstream" is an observed fact. The end-to-end tests run
`cube-egress run` in the gateway namespace with DNS on 10.200.0.1:53, where the sandbox's resolv.conf points.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest

from gateway.audit import AuditLog
from gateway.audit import fields as F
from gateway.config import ConfigError, ResolverConfig, load_config
from gateway.dns import DnsServer
from gateway.policies import CompiledPolicy, load_policy
from gateway.resolver import Resolver
from tests.gateway.harness import gateway_process, request, write_config
from tests.support.world import GATEWAY_SANDBOX_IP, UPSTREAM_IPS, Role, World

HEX = "6f70656e61692d6b65793a20736b2d70726f6a2d41626364"  # "openai-key: sk-proj-Abcd" in hex

POLICY = """
version: 1
policies:
  p:
    rules:
      - {id: api, action: allow, hosts: [api.test]}
      - {id: cdn, action: allow, hosts: ["*.cdn.test"]}
      - {id: meta, action: allow, hosts: [meta.test]}
      - {id: many, action: allow, hosts: [many.test]}
      - {id: gone, action: allow, hosts: [gone.test, silent.test]}
      - {id: static, action: allow, hosts: [static.test]}
sandboxes:
  - {id: sb, sources: [127.0.0.1/32], policies: [p]}
"""

MANY = [f"93.184.216.{i}" for i in range(1, 61)]
ZONE = {
    "api.test": ["93.184.216.34"],
    "meta.test": ["169.254.169.254"],
    "many.test": MANY,
    "x.cdn.test": ["93.184.216.35"],
    "other.test": ["93.184.216.36"],
}


class _Upstream(asyncio.DatagramProtocol):
    """An authoritative server for ZONE (TTL 30) that logs every question; `silent.test` is never answered."""

    def __init__(self) -> None:
        self.queries: list[tuple[str, str]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        query = dns.message.from_wire(data)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True)
        self.queries.append((name, dns.rdatatype.to_text(q.rdtype)))
        if name == "silent.test":
            return
        response = dns.message.make_response(query)
        if name not in ZONE:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif q.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text_list(q.name, 30, "IN", "A", ZONE[name]))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)

    def names(self) -> list[str]:
        return [n for n, _ in self.queries]


@dataclass
class Rig:
    server: DnsServer
    upstream: _Upstream
    resolver: Resolver
    audit_path: Path
    policy: list[CompiledPolicy]
    offset: int = field(default=0)

    async def ask(
        self, name: str, rdtype: str = "A", *, tcp: bool = False, source: str = "127.0.0.1", **kw: Any
    ) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, **kw)
        query = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
        response: dns.message.Message = await query(q, "127.0.0.1", timeout=3, port=self.server.port, source=source)
        return response

    def records(self, **match: Any) -> list[dict[str, Any]]:
        lines = self.audit_path.read_bytes()[self.offset :].splitlines()
        out = [json.loads(line) for line in lines if line.strip()]
        out = [r for r in out if r.get("event") not in F.CHAIN_EVENTS]  # the audit chain's own header, checkpoints
        return [r for r in out if all(r.get(k) == v for k, v in match.items())]

    def mark(self) -> None:
        self.offset = self.audit_path.stat().st_size


@asynccontextmanager
async def rig(tmp_path: Path, policy_text: str = POLICY) -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    transport, upstream = await loop.create_datagram_endpoint(_Upstream, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    resolver = Resolver(
        ResolverConfig(nameservers=["127.0.0.1"], port=port, timeout_s=0.5, hosts={"static.test": ["93.184.216.40"]})
    )
    (tmp_path / "p.yaml").write_text(policy_text)
    holder = [load_policy([str(tmp_path / "p.yaml")])]
    audit_path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(audit_path))
    server = DnsServer("127.0.0.1", 0, policy=lambda: holder[0], resolver=resolver, audit=audit, static_ttl_s=7)
    await server.start()
    try:
        yield Rig(server, upstream, resolver, audit_path, holder)
    finally:
        await server.stop()
        transport.close()
        audit.close()


def run(tmp_path: Path, body: Callable[[Rig], Awaitable[None]], policy_text: str = POLICY) -> None:
    async def main() -> None:
        async with rig(tmp_path, policy_text) as r:
            await body(r)

    asyncio.run(main())


def addresses(response: dns.message.Message) -> list[str]:
    return [rd.address for rrset in response.answer for rd in rrset]


# -- in process ----------------------------------------------------------------------------------------------


def test_allowed_name_is_answered_with_the_gateways_own_resolution(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        response = await r.ask("api.test")
        assert response.rcode() == dns.rcode.NOERROR and addresses(response) == ["93.184.216.34"]
        assert response.flags & dns.flags.RA and not response.flags & dns.flags.AA
        ttl = response.answer[0].ttl
        assert 28 <= ttl <= 30
        # The answer is the one the gateway cached, so the transparent-mode check will find it.
        cached = r.resolver.cached("api.test")
        assert cached is not None and [str(a) for a in cached.addresses] == ["93.184.216.34"]
        again = await r.ask("API.test.")
        assert addresses(again) == ["93.184.216.34"]
        assert r.upstream.queries == [("api.test", "A")]  # asked once; the second answer came from the cache
        (rec, _) = r.records(event="decision")
        assert rec["phase"] == "dns" and rec["verdict"] == "allow" and rec["rule"] == "api"
        assert rec["reason"] == "allowed_by_rule" and rec["host"] == "api.test" and rec["qtype"] == "A"
        assert rec["rcode"] == "NOERROR" and rec["answers"] == ["93.184.216.34"] and rec["sandbox"] == "sb"
        assert rec["source"].startswith("127.0.0.1:") and rec["ttl"] == ttl
        assert not r.records(event="security")

    run(tmp_path, body)


def test_ttl_never_outlives_the_gateways_cache_entry(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        await r.ask("api.test")
        _, resolution = r.resolver._cache["api.test"]
        r.resolver._cache["api.test"] = (time.monotonic() + 3.5, resolution)
        assert (await r.ask("api.test")).answer[0].ttl == 3
        static = await r.ask("static.test")  # static answers are never cached: the configured TTL
        assert addresses(static) == ["93.184.216.40"] and static.answer[0].ttl == 7
        assert "static.test" not in r.upstream.names()

    run(tmp_path, body)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_other_names_get_nxdomain_and_are_never_forwarded(tmp_path: Path, tcp: bool) -> None:
    async def body(r: Rig) -> None:
        for name in ("other.test", "api.test.evil.test", "cdn.test"):
            response = await r.ask(name, tcp=tcp)
            assert response.rcode() == dns.rcode.NXDOMAIN and not response.answer
        assert r.upstream.queries == []
        recs = r.records(event="decision")
        assert [(x["host"], x["verdict"], x["reason"], x["rcode"]) for x in recs] == [
            ("other.test", "deny", "no_matching_rule", "NXDOMAIN"),
            ("api.test.evil.test", "deny", "no_matching_rule", "NXDOMAIN"),
            ("cdn.test", "deny", "no_matching_rule", "NXDOMAIN"),
        ]
        assert not r.records(event="security")

    run(tmp_path, body)


@pytest.mark.parametrize("qtype", ["TXT", "NULL", "ANY", "MX", "SRV", "HTTPS", "PTR"])
def test_other_query_types_are_refused(tmp_path: Path, qtype: str) -> None:
    async def body(r: Rig) -> None:
        response = await r.ask("api.test", qtype)
        assert response.rcode() == dns.rcode.REFUSED and not response.answer
        assert r.upstream.queries == []
        (rec,) = r.records(event="decision")
        assert (rec["reason"], rec["qtype"], rec["rcode"]) == ("qtype_refused", qtype, "REFUSED")

    run(tmp_path, body)


def test_aaaa_is_empty(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        response = await r.ask("api.test", "AAAA")
        assert response.rcode() == dns.rcode.NOERROR and not response.answer
        assert (await r.ask("other.test", "AAAA")).rcode() == dns.rcode.NXDOMAIN
        assert r.upstream.queries == []  # nothing to ask: sandboxes have no IPv6
        assert [x["rcode"] for x in r.records(event="decision")] == ["NOERROR", "NXDOMAIN"]

    run(tmp_path, body)


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        (f"{HEX[:48]}.cdn.test", "48 hex digits in a row"),
        (f"{HEX[:16]}.{HEX[16:32]}.{HEX[32:48]}.cdn.test", "16 hex digits in a row"),
        ("nbswy3dpeb3w64tmmqqgc3tpnzsxi.cdn.test", None),  # base32
        (f"{HEX[:40]}.evil.test", "40 hex digits in a row"),  # a name nobody allows: refused all the same
    ],
)
def test_exfiltration_names_are_refused_and_never_forwarded(tmp_path: Path, name: str, detail: str | None) -> None:
    async def body(r: Rig) -> None:
        for rdtype in ("A", "TXT"):
            response = await r.ask(name, rdtype)
            assert response.rcode() == dns.rcode.REFUSED and not response.answer
        assert r.upstream.queries == []
        recs = r.records(event="decision")
        assert [(x["reason"], x["verdict"], x["host"]) for x in recs] == [("high_entropy_label", "deny", name)] * 2
        sec = r.records(event="security")
        assert [(x["kind"], x["host"], x["sandbox"]) for x in sec] == [("dns_refused", name, "sb")] * 2
        assert sec[0]["detail"].startswith("dns A: ") and sec[1]["detail"].startswith("dns TXT: ")
        if detail:
            assert sec[0]["detail"] == f"dns A: {detail}"

    run(tmp_path, body)


def test_short_names_below_a_wildcard_are_forwarded(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        response = await r.ask("x.cdn.test")
        assert addresses(response) == ["93.184.216.35"]
        assert r.upstream.names() == ["x.cdn.test"]

    run(tmp_path, body)


def test_answers_the_sandbox_may_not_reach_are_refused(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        response = await r.ask("meta.test")
        assert response.rcode() == dns.rcode.REFUSED and not response.answer
        (rec,) = r.records(event="decision")
        assert (rec["verdict"], rec["reason"], rec["rcode"], rec["answers"]) == (
            "deny",
            "address_refused",
            "REFUSED",
            [],
        )
        (sec,) = r.records(event="security")
        assert (sec["kind"], sec["host"], sec["detail"]) == (
            "address_refused",
            "meta.test",
            "dns A: 169.254.169.254 (link_local)",
        )

    run(tmp_path, body)


def test_allowed_name_that_does_not_exist_or_does_not_answer(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        assert (await r.ask("gone.test")).rcode() == dns.rcode.NXDOMAIN
        assert (await r.ask("silent.test")).rcode() == dns.rcode.SERVFAIL
        recs = r.records(event="decision")
        assert [(x["reason"], x["rcode"]) for x in recs] == [
            ("destination_not_resolved", "NXDOMAIN"),
            ("destination_not_resolved", "SERVFAIL"),
        ]
        assert recs[0]["error"] == "no such name" and recs[1]["error"].startswith("resolver failed")

    run(tmp_path, body)


def test_unknown_source_is_refused(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        response = await r.ask("api.test", source="127.0.0.2")
        assert response.rcode() == dns.rcode.REFUSED
        assert r.upstream.queries == []
        (rec,) = r.records(event="decision")
        assert (rec["sandbox"], rec["reason"]) == (None, "unknown_sandbox")
        (sec,) = r.records(event="security")
        assert sec["kind"] == "unknown_sandbox" and sec["source"].startswith("127.0.0.2:")

    run(tmp_path, body)


def test_large_answer_is_truncated_over_udp_and_whole_over_tcp(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        udp = await r.ask("many.test")
        assert udp.flags & dns.flags.TC and not udp.answer
        assert r.server.stats.truncated == 1
        edns = await r.ask("many.test", use_edns=0, payload=4096)  # fits in the server's 1232 bytes
        assert sorted(addresses(edns)) == sorted(MANY) and not edns.flags & dns.flags.TC
        tcp = await r.ask("many.test", tcp=True)
        assert sorted(addresses(tcp)) == sorted(MANY) and not tcp.flags & dns.flags.TC
        assert len(r.records(event="decision")) == 3

    run(tmp_path, body)


def test_malformed_packets_are_dropped(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            valid = dns.message.make_query("api.test", "A")
            reply = dns.message.make_response(valid).to_wire()  # a response, not a query
            for junk in (b"", b"\x00", b"\xff" * 11, b"\x12\x34" + b"\x01\x00" + b"\x00\x01" * 4 + b"\x3fabc", reply):
                await loop.sock_sendto(sock, junk, ("127.0.0.1", r.server.port))
            await asyncio.sleep(0.2)
            with pytest.raises(BlockingIOError):
                sock.recv(4096)  # nothing was answered
        finally:
            sock.close()
        # TCP: garbage closes the connection, an empty message too.
        for junk in (b"\x00\x05hello", b"\x00\x00"):
            reader, writer = await asyncio.open_connection("127.0.0.1", r.server.port)
            writer.write(junk)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
        assert r.server.stats.malformed >= 6
        # Still serving.
        assert addresses(await r.ask("api.test")) == ["93.184.216.34"]
        assert addresses(await r.ask("api.test", tcp=True)) == ["93.184.216.34"]

    run(tmp_path, body)


def test_internal_error_fails_closed(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        async def broken(name: str) -> Any:
            raise RuntimeError("boom")

        r.resolver.resolve = broken  # type: ignore[method-assign]
        response = await r.ask("api.test")
        assert response.rcode() == dns.rcode.SERVFAIL and not response.answer
        assert r.server.stats.errors == 1 and not r.records(event="decision")
        (sec,) = r.records(event="security")
        assert (sec["kind"], sec["detail"]) == ("hook_error", "dns: RuntimeError")
        assert (await r.ask("other.test")).rcode() == dns.rcode.NXDOMAIN  # still serving

    run(tmp_path, body)


def test_signed_query_without_key_is_dropped(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        q = dns.message.make_query("api.test", "A")
        q.use_tsig(dns.tsigkeyring.from_text({"k.": "c2VjcmV0c2VjcmV0"}), keyname="k.")
        with pytest.raises(dns.exception.Timeout):
            await dns.asyncquery.udp(q, "127.0.0.1", timeout=0.3, port=r.server.port)
        assert r.server.stats.malformed == 1 and not r.records()

    run(tmp_path, body)


def test_tcp_connection_carries_several_queries(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", r.server.port)
        try:
            for name, rcode in (("api.test", dns.rcode.NOERROR), ("other.test", dns.rcode.NXDOMAIN)):
                wire = dns.message.make_query(name, "A").to_wire()
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
                size = int.from_bytes(await reader.readexactly(2), "big")
                assert dns.message.from_wire(await reader.readexactly(size)).rcode() == rcode
        finally:
            writer.close()

    run(tmp_path, body)


def test_policy_reload_applies_to_the_next_query(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        assert (await r.ask("other.test")).rcode() == dns.rcode.NXDOMAIN
        (tmp_path / "p2.yaml").write_text(POLICY.replace("hosts: [api.test]", "hosts: [api.test, other.test]"))
        r.policy[0] = load_policy([str(tmp_path / "p2.yaml")])
        assert addresses(await r.ask("other.test")) == ["93.184.216.36"]
        hashes = [x["policy_hash"] for x in r.records(event="decision")]
        assert hashes[0] != hashes[1] == r.policy[0].policy_hash

    run(tmp_path, body)


def test_stop_frees_the_port(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            port = r.server.port
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # an idle TCP client
            await r.server.stop()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
        again = DnsServer("127.0.0.1", port, policy=lambda: r.policy[0], resolver=r.resolver, audit=AuditLog(None))
        await again.start()
        await again.stop()

    asyncio.run(main())


def test_config_section(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    base = "version: 1\npolicies: [p.yaml]\nlisten: {host: 10.200.0.1, port: 3128}\n"
    (tmp_path / "a.yaml").write_text(base)
    assert load_config(str(tmp_path / "a.yaml")).dns is None
    (tmp_path / "b.yaml").write_text(base + "dns: {listen: {host: 10.200.0.9}}\n")
    cfg = load_config(str(tmp_path / "b.yaml"))
    assert cfg.dns is not None and (cfg.dns.listen.host, cfg.dns.listen.port) == ("10.200.0.9", 53)
    # The DNS address and port are the gateway's own: never a destination.
    assert {str(a) for a in cfg.own_addresses()} == {"10.200.0.1", "10.200.0.9"}
    assert cfg.own_ports() == {3128, 53}
    (tmp_path / "c.yaml").write_text(base + "dns: {listen: {port: 5353}, tcp: false}\n")
    with pytest.raises(ConfigError, match=r"unknown key \(dns.tcp\)"):
        load_config(str(tmp_path / "c.yaml"))


# -- end to end, in the hermetic world ------------------------------------------------------------------------

E2E_PROXY_PORT = 8093
E2E_DNS = {"listen": {"host": GATEWAY_SANDBOX_IP, "port": 53}}

_SANDBOX_QUERY = r"""
import json, sys
import dns.message, dns.query, dns.rcode
name, rdtype, tcp = json.loads(sys.argv[1])
q = dns.message.make_query(name, rdtype)
r = (dns.query.tcp if tcp else dns.query.udp)(q, "10.200.0.1", timeout=5)
print(json.dumps({"rcode": dns.rcode.to_text(r.rcode()), "tc": bool(r.flags & 0x200),
                  "answers": [rd.to_text() for rrset in r.answer for rd in rrset],
                  "ttl": [rrset.ttl for rrset in r.answer]}))
"""


@pytest.fixture(scope="module")
def dns_gateway(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A transparent gateway serving DNS on 10.200.0.1:53, with the sandbox's hosts file emptied so that every
    name it resolves comes from the gateway."""
    hosts = Path("/etc/netns") / world.ns_name("sandbox") / "hosts"
    saved = hosts.read_text()
    hosts.write_text("127.0.0.1\tlocalhost\n")
    try:
        with gateway_process(
            world, tmp_path_factory.mktemp("dns"), "transparent", port=E2E_PROXY_PORT, dns=E2E_DNS
        ) as gw:
            yield gw
    finally:
        hosts.write_text(saved)


def sandbox_query(world: World, name: str, rdtype: str = "A", tcp: bool = False, role: Role = "sandbox") -> Any:
    """One query from inside the sandbox (or another namespace) to the gateway's DNS, with dnspython."""
    proc = world.run(role, [sys.executable, "-c", _SANDBOX_QUERY, json.dumps([name, rdtype, tcp])], timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def upstream_names(world: World) -> list[str]:
    return [q["name"] for q in world.dns_queries()]


@pytest.mark.netns
@pytest.mark.gateway
def test_e2e_sandbox_resolves_through_the_gateway(world: World, dns_gateway: Any) -> None:
    dns_gateway.mark()
    code = "import socket; print(sorted({a[4][0] for a in socket.getaddrinfo('api.example.test', 443)}))"
    proc = world.sandbox_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"['{UPSTREAM_IPS['A']}']"  # what the world's DNS told the gateway
    recs = dns_gateway.records(event="decision", phase="dns", host="api.example.test")
    assert {r["qtype"] for r in recs} == {"A", "AAAA"}  # glibc asks both
    a = next(r for r in recs if r["qtype"] == "A")
    assert a["sandbox"] == "sb" and a["answers"] == [UPSTREAM_IPS["A"]] and a["rule"] == "api-intercepted"
    assert next(r for r in recs if r["qtype"] == "AAAA")["answers"] == []
    # The sandbox reaches it in transparent mode with that answer alone (no hosts file): the original
    # destination is one of the gateway's own answers.
    r = request(world, "curl", "GET", "https://api.example.test/allowed/dns", gateway=dns_gateway)
    assert r.status == 200, r
    assert r.json()["server"] == "A"


@pytest.mark.netns
@pytest.mark.gateway
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_e2e_answers(world: World, dns_gateway: Any, tcp: bool) -> None:
    world.clear_dns_log()
    allowed = sandbox_query(world, "a.wild.example.test", tcp=tcp)
    assert (allowed["rcode"], allowed["answers"]) == ("NOERROR", [UPSTREAM_IPS["B"]])
    assert 0 < allowed["ttl"][0] <= 30
    assert sandbox_query(world, "evil.example.test", tcp=tcp)["rcode"] == "NXDOMAIN"
    assert sandbox_query(world, "api.example.test", "TXT", tcp=tcp)["rcode"] == "REFUSED"
    aaaa = sandbox_query(world, "api.example.test", "AAAA", tcp=tcp)
    assert (aaaa["rcode"], aaaa["answers"]) == ("NOERROR", [])
    names = upstream_names(world)
    assert "evil.example.test" not in names
    assert all(q["type"] == "A" for q in world.dns_queries())  # never TXT or AAAA upstream


@pytest.mark.netns
@pytest.mark.gateway
def test_e2e_exfiltration_name_is_refused_and_never_leaves(world: World, dns_gateway: Any) -> None:
    dns_gateway.mark()
    world.clear_dns_log()
    exfil = f"{HEX}.wild.example.test"  # below an allowed wildcard: the only names a sandbox can choose
    for rdtype in ("A", "TXT"):
        assert sandbox_query(world, exfil, rdtype)["rcode"] == "REFUSED"
    # glibc too, the way a careless script would try it
    proc = world.sandbox_python(
        f"import socket\ntry:\n socket.gethostbyname({exfil!r})\nexcept OSError as e:\n print(e)"
    )
    assert proc.stdout.strip(), proc.stdout
    assert not any(HEX[:16] in name for name in upstream_names(world))
    sec = dns_gateway.records(event="security", kind="dns_refused")
    assert sec and all(s["host"] == exfil and s["sandbox"] == "sb" for s in sec)
    assert {r["reason"] for r in dns_gateway.records(event="decision", host=exfil)} == {"high_entropy_label"}


@pytest.mark.netns
@pytest.mark.gateway
def test_e2e_trap_names_and_unknown_sources(world: World, dns_gateway: Any) -> None:
    dns_gateway.mark()
    # Allowed names whose answers the sandbox may not reach: refused, with a security event.
    for name in ("meta.example.test", "loop.example.test", "private.example.test"):
        assert sandbox_query(world, name)["rcode"] == "REFUSED"
    kinds = [(s["host"], s["kind"]) for s in dns_gateway.records(event="security")]
    assert kinds == [(n, "address_refused") for n in ("meta.example.test", "loop.example.test", "private.example.test")]
    # A source that is no sandbox (the gateway namespace itself, 10.200.0.1): refused.
    assert sandbox_query(world, "api.example.test", role="gateway")["rcode"] == "REFUSED"
    assert dns_gateway.records(event="security", kind="unknown_sandbox")


@pytest.mark.netns
@pytest.mark.gateway
def test_e2e_dns_address_taken_is_a_start_error(world: World, dns_gateway: Any, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        "explicit",
        3199,
        upstream_ca=None,
        policies=[Path(__file__).parent / "fixtures" / "e2e.yaml"],
        dns=E2E_DNS,
    )
    exe = str(Path(sys.executable).with_name("cube-egress"))
    proc = world.run("gateway", [exe, "run", "--config", str(cfg)], timeout=60)
    assert proc.returncode == 1
    assert "cannot listen for DNS on 10.200.0.1:53" in proc.stderr
    # The running gateway still answers.
    assert sandbox_query(world, "api.example.test")["rcode"] == "NOERROR"
