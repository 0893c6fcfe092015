"""Tiny authoritative DNS server for the hermetic test world (dnspython, UDP + TCP).

Run as a standalone script inside the ``internet`` namespace. It answers A queries from a fixed zone so that the
gateway's resolution path (and its SSRF checks on private/metadata/loopback answers) can be tested without any
real resolver. Every query is appended to a JSON-lines log so tests can assert *what the gateway asked*.

Semantics (deliberately simple and predictable):

* names are case-insensitive; a trailing dot is optional in the zone
* ``*.suffix`` entries match any name below ``suffix`` (any depth) unless a more specific entry exists
* known name + type A  -> the address(es), TTL ``--ttl`` (default 30)
* known name + other type (AAAA, MX, ...) -> empty NOERROR (so clients fall back to A without waiting)
* unknown name -> NXDOMAIN

Zone format (JSON object or ``name=ip[,ip...]`` arguments): ``{"api.example.test": "198.51.100.10",
"multi.example.test": ["198.51.100.10", "198.51.100.11"]}``.

Prints ``READY`` on stdout once both sockets are bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socketserver
import sys
import threading
import time
from typing import Any, TextIO

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

DEFAULT_ZONE: dict[str, list[str]] = {
    "api.example.test": ["198.51.100.10"],
    "other.example.test": ["198.51.100.11"],
    "evil.example.test": ["198.51.100.20"],
    "*.wild.example.test": ["198.51.100.11"],
    "private.example.test": ["10.9.9.9"],
    "meta.example.test": ["169.254.169.254"],
    "loop.example.test": ["127.0.0.1"],
}


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


class Zone:
    """Exact and wildcard A records with longest-suffix wildcard matching."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.exact: dict[str, list[str]] = {}
        self.wild: dict[str, list[str]] = {}
        for name, ips in records.items():
            n = _norm(name)
            if n.startswith("*."):
                self.wild[n[2:]] = list(ips)
            else:
                self.exact[n] = list(ips)

    def lookup(self, name: str) -> list[str] | None:
        """Addresses for ``name``, or None when the name does not exist (NXDOMAIN)."""
        n = _norm(name)
        if n in self.exact:
            return self.exact[n]
        labels = n.split(".")
        for i in range(1, len(labels)):
            suffix = ".".join(labels[i:])
            if suffix in self.wild:
                return self.wild[suffix]
        return None


class QueryLog:
    """Thread-safe JSON-lines query log; opened in append mode so tests may truncate it between cases."""

    def __init__(self, path: str | None) -> None:
        self._lock = threading.Lock()
        self._fh: TextIO | None = open(path, "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115

    def write(self, entry: dict[str, Any]) -> None:
        if self._fh is None:
            return
        with self._lock:
            self._fh.write(json.dumps(entry) + "\n")
            self._fh.flush()


class Resolver:
    def __init__(self, zone: Zone, ttl: int, log: QueryLog) -> None:
        self.zone = zone
        self.ttl = ttl
        self.log = log

    def answer(self, wire: bytes, proto: str, client: tuple[str, int]) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        q = query.question[0]
        qname = q.name.to_text()
        qtype = dns.rdatatype.to_text(q.rdtype)
        self.log.write({"name": _norm(qname), "type": qtype, "proto": proto, "client": client[0], "time": time.time()})
        ips = self.zone.lookup(qname)
        if ips is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif q.rdtype == dns.rdatatype.A and q.rdclass == dns.rdataclass.IN and ips:
            response.answer.append(dns.rrset.from_text_list(q.name, self.ttl, "IN", "A", ips))
        return response.to_wire()


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        out = self.server.resolver.answer(data, "udp", self.client_address)
        if out is not None:
            sock.sendto(out, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.request.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("eof")
            buf += chunk
        return buf

    def handle(self) -> None:
        self.request.settimeout(10)
        try:
            while True:  # RFC 7766: several queries may share a connection
                length = int.from_bytes(self._recv_exact(2), "big")
                out = self.server.resolver.answer(self._recv_exact(length), "tcp", self.client_address)
                if out is None:
                    return
                self.request.sendall(len(out).to_bytes(2, "big") + out)
        except (ConnectionError, TimeoutError, OSError):
            return


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], resolver: Resolver) -> None:
        self.resolver = resolver
        super().__init__(addr, _UDPHandler)


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], resolver: Resolver) -> None:
        self.resolver = resolver
        super().__init__(addr, _TCPHandler)


def load_zone(zone_file: str | None, records: list[str]) -> dict[str, list[str]]:
    """Default zone, overridden by the JSON file, overridden by ``name=ip[,ip]`` arguments."""
    zone: dict[str, list[str]] = {k: list(v) for k, v in DEFAULT_ZONE.items()}
    if zone_file:
        with open(zone_file, encoding="utf-8") as fh:
            for name, value in json.load(fh).items():
                zone[name] = [value] if isinstance(value, str) else list(value)
    for rec in records:
        name, _, ips = rec.partition("=")
        zone[name] = [ip for ip in ips.split(",") if ip]
    return zone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="198.51.100.53")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--zone-file", help="JSON object name -> ip or [ips]")
    parser.add_argument("--log", help="append one JSON line per query here")
    parser.add_argument("--ttl", type=int, default=30)
    parser.add_argument("records", nargs="*", metavar="NAME=IP[,IP]")
    args = parser.parse_args(argv)

    resolver = Resolver(Zone(load_zone(args.zone_file, args.records)), args.ttl, QueryLog(args.log))
    servers: list[socketserver.BaseServer] = [
        _UDPServer((args.listen, args.port), resolver),
        _TCPServer((args.listen, args.port), resolver),
    ]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("READY", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
