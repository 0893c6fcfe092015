"""Echo-style upstream HTTP(S) servers for the hermetic test world.

Run as a standalone script inside the ``internet`` namespace (``ip netns exec <ns> python upstream_server.py ...``)
so it needs nothing but the standard library. One process serves every address/port given with ``--serve`` using
threads, which keeps world start-up to a single interpreter launch.

Every response (except ``/bytes/N``) is a JSON document describing exactly what arrived, so end-to-end tests can
assert what the gateway forwarded (method, raw request target, headers in order, body digest, SNI, peer address)
rather than trusting the gateway's own logs.

Endpoints (any method, including unknown ones):

* ``/bytes/N``            -> ``N`` bytes of ``application/octet-stream`` (deterministic pattern)
* ``/status/N``           -> status ``N`` with the JSON echo as body (no body for 1xx/204/304/HEAD)
* ``/redirect?to=URL``    -> ``302`` with ``Location: URL``
* anything else          -> ``200`` with the JSON echo

Prints ``READY`` on stdout once every listening socket is bound, so the parent can wait for that line instead of
polling ports.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import signal
import socket
import socketserver
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

MAX_BYTES = 512 * 1024 * 1024
"""Upper bound for ``/bytes/N`` so a typo cannot exhaust memory; data is streamed in chunks anyway."""

_CHUNK = 64 * 1024


class EchoHandler(BaseHTTPRequestHandler):
    """Answers any method with a JSON description of the request it received."""

    protocol_version = "HTTP/1.1"  # keep-alive by default; we always send Content-Length
    server_version = "cxe-upstream/1"
    sys_version = ""

    server: EchoServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log; tests read the JSON echo instead."""

    def __getattr__(self, name: str) -> Any:
        """Route every ``do_<METHOD>`` lookup (GET, POST, PROPFIND, ...) to the single generic handler."""
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def setup(self) -> None:
        """Complete the TLS handshake in the worker thread (not the accept loop) so a slow client blocks nobody."""
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(30)
            try:
                sock.do_handshake()
            except (OSError, ssl.SSLError):
                self.close_connection = True
        else:
            sock.settimeout(30)
        super().setup()

    def handle(self) -> None:
        """Like the base implementation but tolerant of clients that vanish or fail TLS mid-connection."""
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError, OSError):
            super().handle()

    def _read_body(self) -> bytes:
        """Read a Content-Length or chunked request body so keep-alive framing stays correct."""
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            chunks: list[bytes] = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("eof in chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until blank line
                    while True:
                        trailer = self.rfile.readline(65537)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)  # CRLF after chunk data
            return b"".join(chunks)
        length = self.headers.get("Content-Length")
        if length:
            return self.rfile.read(int(length))
        return b""

    def _raw_target(self) -> str:
        """The request target exactly as sent; ``self.path`` is normalised by http.server (e.g. leading ``//``)."""
        words = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n").split(" ")
        return words[1] if len(words) >= 2 else self.path

    def _describe(self, body: bytes) -> dict[str, Any]:
        """Build the JSON echo. Extra keys beyond the documented ones are for diagnostics (SNI, peer, port)."""
        sock = self.request
        sni = getattr(sock, "cxe_sni", None) if isinstance(sock, ssl.SSLSocket) else None
        return {
            "server": self.server.label,
            "method": self.command,
            "path": self._raw_target(),
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "http_version": self.request_version,
            "tls": isinstance(sock, ssl.SSLSocket),
            "sni": sni,
            "local": [self.server.server_address[0], self.server.server_address[1]],
            "client": [self.client_address[0], self.client_address[1]],
        }

    def _send(self, status: int, body: bytes, content_type: str, extra: list[tuple[str, str]] | None = None) -> None:
        self.send_response(status)
        for name, value in extra or []:
            self.send_header(name, value)
        no_body = self.command == "HEAD" or status < 200 or status in (204, 304)
        if status not in (204,) and not (100 <= status < 200):
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not no_body:
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._read_body()
        desc = self._describe(body)
        payload = json.dumps(desc).encode()
        target = urlsplit(self.path)
        parts = [p for p in target.path.split("/") if p]

        if len(parts) == 2 and parts[0] == "bytes" and parts[1].isdigit():
            n = min(int(parts[1]), MAX_BYTES)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if self.command != "HEAD":
                pattern = (bytes(range(256)) * (_CHUNK // 256))[:_CHUNK]
                remaining = n
                while remaining > 0:
                    piece = pattern[: min(_CHUNK, remaining)]
                    self.wfile.write(piece)
                    remaining -= len(piece)
            return
        if len(parts) == 2 and parts[0] == "status" and parts[1].isdigit():
            self._send(int(parts[1]), payload, "application/json")
            return
        if parts == ["redirect"]:
            to = parse_qs(target.query).get("to", ["/"])[0]
            self._send(302, payload, "application/json", [("Location", to)])
            return
        self._send(200, payload, "application/json")


class TLSThreadingServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Threaded TCP server that optionally wraps accepted sockets in TLS (handshake deferred to the worker).
    Shared with fake_apis.py."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    ssl_ctx: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        if self.ssl_ctx is not None:
            sock = self.ssl_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class EchoServer(TLSThreadingServer):
    def __init__(self, address: tuple[str, int], label: str, ssl_ctx: ssl.SSLContext | None) -> None:
        self.label = label
        self.ssl_ctx = ssl_ctx
        super().__init__(address, EchoHandler)


def make_server_context(cert: str, key: str) -> ssl.SSLContext:
    """Server TLS context that records the client's SNI on the socket for the echo."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])

    def on_sni(sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        with contextlib.suppress(AttributeError):
            sslobj.cxe_sni = server_name

    ctx.sni_callback = on_sni
    return ctx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--serve",
        action="append",
        required=True,
        metavar="LABEL,IP,CERT,KEY",
        help="serve LABEL on IP: HTTPS on the TLS ports with CERT/KEY, plain HTTP on the plain ports",
    )
    parser.add_argument("--tls-ports", default="443,8443")
    parser.add_argument("--plain-ports", default="80")
    args = parser.parse_args(argv)

    tls_ports = [int(p) for p in args.tls_ports.split(",") if p]
    plain_ports = [int(p) for p in args.plain_ports.split(",") if p]
    servers: list[EchoServer] = []
    for spec in args.serve:
        label, ip, cert, key = spec.split(",", 3)
        ctx = make_server_context(cert, key)
        servers.extend(EchoServer((ip, port), label, ctx) for port in tls_ports)
        servers.extend(EchoServer((ip, port), label, None) for port in plain_ports)

    for srv in servers:
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("READY", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
