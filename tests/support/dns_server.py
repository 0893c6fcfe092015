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

With ``--zone-file`` the file is re-read whenever its content changes (checked on every query; it is tiny), so a
test can add names at runtime by atomically replacing the file (``World.add_dns``): the very next query sees the new
zone, with no signal, sleep or race. A file that fails to parse keeps the previous zone in force.

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
from pathlib import Path
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


class ZoneSource:
    """The zone in force: defaults + zone file + command-line records, rebuilt when the file's bytes change.

    Comparing bytes rather than mtimes is deliberate: file timestamps are coarse (a jiffy), so two rewrites in quick
    succession could share an mtime and the second would be missed.
    """

    def __init__(self, zone_file: str | None, records: list[str]) -> None:
        self._zone_file = zone_file
        self._records = records
        self._lock = threading.Lock()
        self._raw: bytes | None = Path(zone_file).read_bytes() if zone_file else None
        self._zone = Zone(load_zone(zone_file, records, raw=self._raw))

    def current(self) -> Zone:
        if not self._zone_file:
            return self._zone
        try:
            raw = Path(self._zone_file).read_bytes()
        except OSError:
            return self._zone
        with self._lock:
            if raw != self._raw:
                try:
                    self._zone = Zone(load_zone(self._zone_file, self._records, raw=raw))
                    self._raw = raw
                except (ValueError, TypeError, AttributeError):  # a bad file: keep the last good zone
                    pass
            return self._zone


class Resolver:
    def __init__(self, zone: Zone | ZoneSource, ttl: int, log: QueryLog) -> None:
        self._source = zone if isinstance(zone, ZoneSource) else None
        self._zone = zone if isinstance(zone, Zone) else None
        self.ttl = ttl
        self.log = log

    @property
    def zone(self) -> Zone:
        if self._source is not None:
            return self._source.current()
        assert self._zone is not None
        return self._zone

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


def load_zone(zone_file: str | None, records: list[str], raw: bytes | None = None) -> dict[str, list[str]]:
    """Default zone, overridden by the JSON file (or its already-read bytes ``raw``), overridden by ``name=ip[,ip]``
    arguments."""
    zone: dict[str, list[str]] = {k: list(v) for k, v in DEFAULT_ZONE.items()}
    if zone_file:
        if raw is None:
            with open(zone_file, "rb") as fh:
                raw = fh.read()
        for name, value in json.loads(raw).items():
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

    resolver = Resolver(ZoneSource(args.zone_file, args.records), args.ttl, QueryLog(args.log))
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
