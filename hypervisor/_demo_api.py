"""The demo's stand-in for a public API: an HTTPS server that answers every request with what it received.

`cube-egress demo` runs it inside the demo's "internet" network namespace, on a documentation address, because
no real API can be reached from here. It echoes the request headers on purpose: an upstream that reflects the
request is the classic way a sandbox could read back a credential the gateway injected, and the demo shows the
gateway redacting that echo. It also says whether the Authorization header it received was the expected one,
compared by an HMAC fingerprint so that the expected value never has to be printed.

Run as `python -m hypervisor._demo_api --listen ADDR:PORT --cert CERT --key KEY --expect-sha256 HEX`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _EchoHandler(BaseHTTPRequestHandler):
    server_version = "demo-api/1"
    expect_sha256: str | None = None

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 1 << 20)) if length else b""
        auth = self.headers.get("Authorization", "")
        seen = hashlib.sha256(auth.encode()).hexdigest() if auth else None
        doc = {
            "host": self.headers.get("Host"),
            "method": self.command,
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body_bytes": len(body),
            "authorized": bool(seen and self.expect_sha256 and hmac.compare_digest(seen, self.expect_sha256)),
        }
        out = json.dumps(doc, indent=1).encode()
        self.send_response(200 if doc["authorized"] else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"demo-api {self.address_string()} {format % args}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hypervisor._demo_api")
    p.add_argument("--listen", required=True, help="ADDR:PORT")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--expect-sha256", help="sha256 hex of the Authorization header value the API accepts")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    _EchoHandler.expect_sha256 = args.expect_sha256
    server = ThreadingHTTPServer((host, int(port)), _EchoHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("listening", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
