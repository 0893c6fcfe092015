"""Fake third-party APIs for credential-injection tests: OpenAI, Anthropic, S3, an OAuth2 server, a DB check, echo.

Run as a standalone script with the project's venv interpreter inside the ``internet`` namespace (like
``upstream_server.py``; start it with :func:`tests.support.apis.start_fake_apis`). One threaded process serves
HTTPS (one certificate for all names) on every ``--listen IP:PORT`` and plain HTTP on every ``--plain IP:PORT``,
and picks the behaviour by the request's ``Host`` header (port stripped, case-insensitive, ``*.suffix`` rules):

=========================  ===============  =========================================================================
host (default map)         service          behaviour
=========================  ===============  =========================================================================
api.openai.com             ``openai``       ``POST /v1/chat/completions`` (JSON or SSE), ``GET /v1/models[/ID]``;
                                            ``Authorization: Bearer <openai_key>`` or 401 (OpenAI's error JSON)
api.anthropic.com          ``anthropic``    ``POST /v1/messages`` (JSON or SSE), ``GET /v1/models``;
                                            ``x-api-key: <anthropic_key>`` (or ``Authorization: Bearer``, as the
                                            2.x SDK sends it) + ``anthropic-version``, else 401 / 400
s3.example.test,           ``s3``           in-memory S3 (path- and virtual-hosted style): Put/Get/Head/Delete
\\*.s3.example.test                          object, ListObjects(V2), ListBuckets, CreateBucket, multipart upload;
                                            every request's SigV4 signature is recomputed with the *real* secret
                                            (botocore's canonicalisation) -> 403 ``SignatureDoesNotMatch`` if wrong
auth.example.test          ``oauth``        ``POST /oauth/token`` (client_credentials; Basic or form client auth),
                                            ``GET /stats``, ``POST /admin/expire`` (expire every token now)
api.oauth.example.test     ``oauth_api``    any path: 200 JSON echo iff ``Authorization: Bearer <valid token>``
db-check.example.test      ``dbcheck``      ``GET /check`` with HTTP Basic user:password -> 200 iff that user can
                                            log in to the PostgreSQL named in the config (psql), else 401
anything else              ``echo``         200 JSON echo of method/path/headers/body (like upstream_server.py)
=========================  ===============  =========================================================================

The model endpoints are *echo services*: the reply text is a JSON dump of the request as received (method, path,
every header, body), so it deliberately contains the credential the gateway injected. That is what the gateway's
response redaction must catch. Streaming replies (``"stream": true``) additionally split the credential across
two writes (two HTTP chunks, two TLS records) in the middle of one SSE event, so a redactor that only scans each
chunk on its own misses it. With the request header ``X-Fake-Stream-Split: deltas`` the credential is instead split
across two SSE *events* (two content deltas), which only an SSE-aware redactor can catch; ``none`` disables
splitting.

Config (``--config FILE``, JSON; every key optional)::

    {"openai_key": "sk-real", "anthropic_key": "sk-ant-real",
     "s3": {"access_key": "AKIA...", "secret_key": "...", "region": "us-east-1"},
     "oauth": {"client_id": "cid", "client_secret": "csecret", "expires_in": 3},
     "pg": {"host": "198.51.100.40", "port": 5432, "database": "app"},
     "hosts": {"my.host.test": "openai"}, "stream_delay": 0.02}

An absent ``openai_key``/``anthropic_key`` accepts any non-empty key; an absent ``s3`` section accepts no S3
request; ``region`` absent accepts any region in the credential scope.

Every request is appended, *before* its response is sent (so a client that has its answer can read the line), as
one JSON line to ``--log``: ``time, service, method, host, path, headers, body_len, body_sha256, body (first 64 KiB,
UTF-8 with replacement), status, client, tls, sni`` plus ``auth_error`` when S3 auth failed.

Prints ``READY`` on stdout once every listening socket is bound.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import Message
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

try:  # imported as tests.support.fake_apis (the helpers below) or run as a script from this folder
    from .upstream_server import TLSThreadingServer, make_server_context
except ImportError:
    from upstream_server import TLSThreadingServer, make_server_context  # type: ignore[no-redef]

DEFAULT_HOSTS: dict[str, str] = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "s3.example.test": "s3",
    "*.s3.example.test": "s3",
    "auth.example.test": "oauth",
    "api.oauth.example.test": "oauth_api",
    "db-check.example.test": "dbcheck",
}
SERVICES = ("openai", "anthropic", "s3", "oauth", "oauth_api", "dbcheck", "echo")

_BODY_LOG_LIMIT = 64 * 1024
_S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# shared state


class RequestLog:
    """Thread-safe JSON-lines request log (append mode: tests may truncate it between cases)."""

    def __init__(self, path: str | None) -> None:
        self._lock = threading.Lock()
        self._fh = open(path, "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115

    def write(self, entry: dict[str, Any]) -> None:
        if self._fh is None:
            return
        line = json.dumps(entry)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()


class OAuthState:
    """Issued client-credentials tokens and counters. Validity is checked against the monotonic clock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counter = 0
        self.tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.stats: dict[str, int] = {
            "token_requests": 0,
            "issued": 0,
            "token_rejected": 0,
            "resource_ok": 0,
            "resource_rejected": 0,
            "expired_by_admin": 0,
        }

    def issue(self, expires_in: float) -> tuple[str, int]:
        with self.lock:
            self.counter += 1
            # tok-<n> as a prefix keeps tokens ordered/readable; the random tail keeps "tok-1" from being a
            # substring of "tok-12" (tests search responses and logs for tokens).
            token = f"tok-{self.counter}-{secrets.token_hex(6)}"
            self.tokens[token] = time.monotonic() + expires_in
            self.stats["issued"] += 1
            return token, self.counter

    def valid(self, token: str) -> bool:
        with self.lock:
            exp = self.tokens.get(token)
            return exp is not None and time.monotonic() < exp

    def expire_all(self) -> int:
        with self.lock:
            now = time.monotonic()
            n = sum(1 for exp in self.tokens.values() if exp > now)
            self.tokens = dict.fromkeys(self.tokens, 0.0)
            self.stats["expired_by_admin"] += n
            return n

    def bump(self, key: str) -> None:
        with self.lock:
            self.stats[key] += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            now = time.monotonic()
            return {**self.stats, "active": sum(1 for e in self.tokens.values() if e > now), "counter": self.counter}


class S3Object:
    __slots__ = ("checksums", "content_type", "data", "etag", "last_modified", "metadata")

    def __init__(self, data: bytes, content_type: str, metadata: dict[str, str], checksums: dict[str, str]) -> None:
        self.data = data
        self.content_type = content_type
        self.metadata = metadata
        self.checksums = checksums
        self.etag = f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'
        self.last_modified = time.time()


class S3Store:
    """Buckets exist implicitly (any name works); objects and multipart uploads are kept in memory."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buckets: dict[str, dict[str, S3Object]] = {}
        self.uploads: dict[str, tuple[str, str, str, dict[int, bytes]]] = {}  # id -> bucket, key, ctype, parts


class ServerState:
    def __init__(self, config: dict[str, Any], log: RequestLog) -> None:
        self.config = config
        self.log = log
        self.hosts = {**DEFAULT_HOSTS, **{k.lower(): v for k, v in (config.get("hosts") or {}).items()}}
        for host, service in self.hosts.items():
            if service not in SERVICES:
                raise ValueError(f"unknown service {service!r} for host {host!r}; expected one of {SERVICES}")
        self.oauth = OAuthState()
        self.s3 = S3Store()
        self.stream_delay = float(config.get("stream_delay", 0.02))

    def route(self, host: str) -> tuple[str, str]:
        """``(service, wildcard_label)``: the label is the part a ``*.suffix`` rule matched (the S3 bucket)."""
        if host in self.hosts:
            return self.hosts[host], ""
        labels = host.split(".")
        for i in range(1, len(labels)):
            rule = "*." + ".".join(labels[i:])
            if rule in self.hosts:
                return self.hosts[rule], ".".join(labels[:i])
        return "echo", ""


# ---------------------------------------------------------------------------------------------------------------
# the handler


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cxe-fake-apis/1"
    sys_version = ""

    server: FakeServer
    _body: bytes = b""  # the request body as read (transfer framing removed), set first thing per request
    _service: str = "echo"

    # -- plumbing -----------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the stderr access log: the JSON-lines log is the record."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def setup(self) -> None:
        """TLS handshake in the worker thread, so a stuck client blocks nobody else."""
        self.request.settimeout(60)
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.do_handshake()
            except (OSError, ssl.SSLError):
                self.close_connection = True
        super().setup()

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError, OSError):
            super().handle()

    @property
    def state(self) -> ServerState:
        return self.server.state

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("eof in chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(3)
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length else b""

    def _raw_target(self) -> str:
        words = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n").split(" ")
        return words[1] if len(words) >= 2 else self.path

    def _host(self) -> str:
        host = (self.headers.get("Host") or "").strip().lower()
        if host.startswith("["):
            return host.split("]", 1)[0] + "]"
        return host.rsplit(":", 1)[0] if ":" in host else host

    def _header_list(self) -> list[list[str]]:
        return [[k, v] for k, v in self.headers.items()]

    def _log(self, status: int, **extra: Any) -> None:
        body = self._body
        sock = self.request
        entry = {
            "time": time.time(),
            "service": self._service,
            "method": self.command,
            "host": self._host(),
            "path": self._raw_target(),
            "headers": self._header_list(),
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body": body[:_BODY_LOG_LIMIT].decode("utf-8", "replace"),
            "status": status,
            "client": list(self.client_address[:2]),
            "tls": isinstance(sock, ssl.SSLSocket),
            "sni": getattr(sock, "cxe_sni", None) if isinstance(sock, ssl.SSLSocket) else None,
            **extra,
        }
        self.state.log.write(entry)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: list[tuple[str, str]] | None = None,
        **log_extra: Any,
    ) -> None:
        self._log(status, **log_extra)
        self.send_response(status)
        for k, v in headers or []:
            self.send_header(k, v)
        if status != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: list[tuple[str, str]] | None = None, **log_extra: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers, **log_extra)

    def _start_stream(
        self, content_type: str = "text/event-stream", headers: list[tuple[str, str]] | None = None
    ) -> None:
        self._log(200, streamed=True)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in headers or []:
            self.send_header(k, v)
        self.end_headers()

    def _write_chunk(self, data: bytes) -> None:
        """One HTTP chunk in one socket write (one TLS record): the unit a streaming proxy sees."""
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _pause(self) -> None:
        if self.state.stream_delay > 0:
            time.sleep(self.state.stream_delay)

    def _write_split(self, event: bytes, secret: str) -> None:
        """Write one SSE event in two chunks, cut in the middle of ``secret`` (whole if it does not occur)."""
        needle = secret.encode() if secret else b""
        at = event.find(needle) if needle else -1
        if at < 0 or len(needle) < 2:
            self._write_chunk(event)
            return
        cut = at + len(needle) // 2
        self._write_chunk(event[:cut])
        self._pause()
        self._write_chunk(event[cut:])

    def _echo_doc(self) -> dict[str, Any]:
        return {
            "method": self.command,
            "path": self._raw_target(),
            "headers": self._header_list(),
            "body": self._body.decode("utf-8", "replace"),
        }

    # -- dispatch -----------------------------------------------------------------------------------------------

    def _handle(self) -> None:
        self._body, self._service = b"", "echo"
        self._body = self._read_body()
        self._service, label = self.state.route(self._host())
        try:
            getattr(self, f"_svc_{self._service}")(label)
        except (ConnectionError, TimeoutError, ssl.SSLError, BrokenPipeError):
            self.close_connection = True
        except Exception as exc:  # a bug here must show up as a 500 in the test, not a hung connection
            with contextlib.suppress(Exception):
                self._json(500, {"error": f"fake_apis internal error: {type(exc).__name__}: {exc}"})
            self.close_connection = True

    def _svc_echo(self, _label: str) -> None:
        doc = self._echo_doc()
        doc.update({"service": "echo", "body_len": len(self._body), "host": self._host()})
        self._json(200, doc)

    # -- OpenAI -------------------------------------------------------------------------------------------------

    def _svc_openai(self, _label: str) -> None:
        expected = self.state.config.get("openai_key")
        auth = self.headers.get("Authorization", "")
        key = auth[7:] if auth.startswith("Bearer ") else ""
        if not key or (expected is not None and key != expected):
            masked = f"{key[:3]}{'*' * max(len(key) - 7, 0)}{key[-4:]}" if len(key) > 8 else "***"
            msg = (
                "You didn't provide an API key."
                if not key
                else f"Incorrect API key provided: {masked}. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
            err = {"message": msg, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
            self._json(401, {"error": err}, [("x-request-id", _rid())])
            return
        path = urlsplit(self._raw_target()).path
        if self.command == "GET" and path == "/v1/models":
            models = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "cxe"} for m in _MODELS]
            self._json(200, {"object": "list", "data": models})
            return
        if self.command == "GET" and path.startswith("/v1/models/"):
            self._json(200, {"id": path.rsplit("/", 1)[1], "object": "model", "created": 1700000000, "owned_by": "cxe"})
            return
        if self.command == "POST" and path == "/v1/chat/completions":
            try:
                req = json.loads(self._body or b"{}")
            except ValueError:
                err = {"message": "We could not parse the JSON body of your request.", "type": "invalid_request_error"}
                self._json(400, {"error": {**err, "param": None, "code": None}})
                return
            self._openai_chat(req if isinstance(req, dict) else {}, key)
            return
        err = {"message": f"Invalid URL ({self.command} {path})", "type": "invalid_request_error"}
        self._json(404, {"error": {**err, "param": None, "code": None}})

    def _openai_chat(self, req: dict[str, Any], key: str) -> None:
        model = str(req.get("model") or "gpt-4o-mini")
        text = json.dumps(self._echo_doc())
        cid = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        usage = {"prompt_tokens": len(self._body) // 4, "completion_tokens": len(text) // 4}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not req.get("stream"):
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            body = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage,
                "system_fingerprint": "fp_cxe",
            }
            self._json(200, body, [("x-request-id", _rid())])
            return

        def chunk(delta: dict[str, Any], finish: str | None = None, with_usage: bool = False) -> bytes:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_cxe",
                "choices": []
                if with_usage
                else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if with_usage:
                obj["usage"] = usage
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        self._start_stream(headers=[("x-request-id", _rid())])
        self._write_chunk(chunk({"role": "assistant", "content": "", "refusal": None}))
        self._pause()
        self._write_chunk(chunk({"content": "echo: "}))
        self._pause()
        self._stream_secret_text(text, key, lambda t: chunk({"content": t}))
        self._pause()
        self._write_chunk(chunk({}, finish="stop"))
        if (req.get("stream_options") or {}).get("include_usage"):
            self._write_chunk(chunk({}, with_usage=True))
        self._write_chunk(b"data: [DONE]\n\n")
        self._end_stream()

    def _stream_secret_text(self, text: str, secret: str, event: Any) -> None:
        """Send ``text`` (which contains ``secret``) as SSE events, split per ``X-Fake-Stream-Split``."""
        mode = (self.headers.get("X-Fake-Stream-Split") or "bytes").lower()
        at = text.find(secret) if secret else -1
        if mode == "deltas" and at >= 0 and len(secret) >= 2:
            cut = at + len(secret) // 2
            self._write_chunk(event(text[:cut]))
            self._pause()
            self._write_chunk(event(text[cut:]))
        elif mode == "none":
            self._write_chunk(event(text))
        else:
            self._write_split(event(text), secret)

    # -- Anthropic ----------------------------------------------------------------------------------------------

    def _anthropic_error(self, status: int, etype: str, message: str) -> None:
        body = {"type": "error", "error": {"type": etype, "message": message}, "request_id": f"req_{_rid()}"}
        self._json(status, body, [("request-id", f"req_{_rid()}")])

    def _svc_anthropic(self, _label: str) -> None:
        expected = self.state.config.get("anthropic_key")
        # Older SDKs (and curl examples) send x-api-key; the 2.x Python SDK sends the same key as a Bearer token.
        # Both are accepted and both are checked, so a gateway must inject whichever form the client used.
        auth = self.headers.get("Authorization", "")
        key = self.headers.get("x-api-key", "") or (auth[7:] if auth.startswith("Bearer ") else "")
        if not key or (expected is not None and key != expected):
            self._anthropic_error(401, "authentication_error", "invalid x-api-key")
            return
        if not self.headers.get("anthropic-version"):
            self._anthropic_error(400, "invalid_request_error", "anthropic-version: header is required")
            return
        path = urlsplit(self._raw_target()).path
        if self.command == "GET" and path == "/v1/models":
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in _CLAUDE
            ]
            self._json(200, {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]})
            return
        if self.command != "POST" or path != "/v1/messages":
            self._anthropic_error(404, "not_found_error", f"Not found: {self.command} {path}")
            return
        try:
            req = json.loads(self._body or b"{}")
        except ValueError:
            self._anthropic_error(400, "invalid_request_error", "request body is not valid JSON")
            return
        req = req if isinstance(req, dict) else {}
        model = str(req.get("model") or _CLAUDE[0])
        text = json.dumps(self._echo_doc())
        mid = f"msg_{secrets.token_hex(12)}"
        in_tokens, out_tokens = len(self._body) // 4, len(text) // 4
        message: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": in_tokens, "output_tokens": out_tokens},
        }
        if not req.get("stream"):
            self._json(200, message, [("request-id", f"req_{_rid()}")])
            return

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: ".encode() + json.dumps(data).encode() + b"\n\n"

        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": in_tokens, "output_tokens": 1},
        }
        self._start_stream(headers=[("request-id", f"req_{_rid()}")])
        self._write_chunk(event("message_start", {"type": "message_start", "message": start}))
        self._write_chunk(
            event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
        )
        self._write_chunk(event("ping", {"type": "ping"}))
        self._pause()

        def delta(t: str) -> bytes:
            body = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}
            return event("content_block_delta", body)

        self._write_chunk(delta("echo: "))
        self._pause()
        self._stream_secret_text(text, key, delta)
        self._pause()
        self._write_chunk(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        self._write_chunk(
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": out_tokens},
                },
            )
        )
        self._write_chunk(event("message_stop", {"type": "message_stop"}))
        self._end_stream()

    # -- OAuth2 -------------------------------------------------------------------------------------------------

    def _svc_oauth(self, _label: str) -> None:
        cfg = self.state.config.get("oauth") or {}
        path = urlsplit(self._raw_target()).path
        st = self.state.oauth
        if self.command == "GET" and path == "/stats":
            self._json(200, st.snapshot())
            return
        if self.command == "POST" and path == "/admin/expire":
            self._json(200, {"expired": st.expire_all()})
            return
        if path != "/oauth/token" or self.command != "POST":
            self._json(404, {"error": "not_found"})
            return
        st.bump("token_requests")
        form = {k: v[0] for k, v in parse_qs(self._body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        cid, csecret = form.get("client_id", ""), form.get("client_secret", "")
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, pw = "", ""
            cid, csecret = unquote_plus(user), unquote_plus(pw)  # RFC 6749 2.3.1: form-encoded, then Basic
        if form.get("grant_type") != "client_credentials":
            st.bump("token_rejected")
            self._json(400, {"error": "unsupported_grant_type"})
            return
        want_id, want_secret = cfg.get("client_id"), cfg.get("client_secret")
        if not cid or (want_id is not None and cid != want_id) or (want_secret is not None and csecret != want_secret):
            st.bump("token_rejected")
            self._json(
                401,
                {"error": "invalid_client", "error_description": "client authentication failed"},
                [("WWW-Authenticate", 'Basic realm="oauth"')],
            )
            return
        expires_in = float(cfg.get("expires_in", 3))
        token, _n = st.issue(expires_in)
        body: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expires_in": int(expires_in)}
        if form.get("scope"):
            body["scope"] = form["scope"]
        self._json(200, body, [("Cache-Control", "no-store"), ("Pragma", "no-cache")])

    def _svc_oauth_api(self, _label: str) -> None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        st = self.state.oauth
        if not token or not st.valid(token):
            st.bump("resource_rejected")
            err = 'Bearer error="invalid_token"' if token else 'Bearer realm="api"'
            self._json(401, {"error": "invalid_token"}, [("WWW-Authenticate", err)])
            return
        st.bump("resource_ok")
        doc = self._echo_doc()
        doc.update({"service": "oauth_api", "token_ok": True})
        self._json(200, doc)

    # -- DB check -----------------------------------------------------------------------------------------------

    def _svc_dbcheck(self, _label: str) -> None:
        path = urlsplit(self._raw_target()).path
        if path != "/check":
            self._json(404, {"error": "not_found"})
            return
        auth = self.headers.get("Authorization", "")
        user = pw = ""
        if auth.lower().startswith("basic "):
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                user, _, pw = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
        if not user:
            self._json(401, {"ok": False, "error": "basic auth required"}, [("WWW-Authenticate", 'Basic realm="db"')])
            return
        ok, detail = _pg_login(self.state.config.get("pg") or {}, user, pw)
        self._json(200 if ok else 401, {"ok": ok, "user": user, "detail": detail})

    # -- S3 -----------------------------------------------------------------------------------------------------

    def _s3_error(self, status: int, code: str, message: str, **extra: str) -> None:
        fields = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in extra.items())
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>{fields}"
            f"<RequestId>{_rid()}</RequestId></Error>"
        ).encode()
        log_extra = {"s3_error": code, "auth_error": message} if status == 403 else {"s3_error": code}
        self._send(status, xml, "application/xml", [("x-amz-request-id", _rid())], **log_extra)

    def _s3_ok(self, status: int, body: bytes = b"", ctype: str = "application/xml", headers: Any = None) -> None:
        self._send(status, body, ctype, [("x-amz-request-id", _rid()), *(headers or [])])

    def _svc_s3(self, vhost_bucket: str) -> None:
        cfg = self.state.config.get("s3")
        if not cfg:
            self._s3_error(403, "AccessDenied", "this fake S3 has no credentials configured")
            return
        verdict = verify_sigv4(self.command, self._host(), self._raw_target(), self.headers, self._body, cfg)
        if verdict.error:
            self._s3_error(verdict.status, verdict.error, verdict.message, **verdict.details)
            return
        body = verdict.payload
        target = urlsplit(self._raw_target())
        query = parse_qs(target.query, keep_blank_values=True)
        segs = target.path.lstrip("/")
        if vhost_bucket:
            bucket, key = vhost_bucket, unquote(segs)
        else:
            b, _, k = segs.partition("/")
            bucket, key = unquote(b), unquote(k)
        store = self.state.s3
        m = self.command
        if not bucket:
            if m == "GET":
                self._s3_ok(200, _xml_list_buckets(store))
                return
            self._s3_error(405, "MethodNotAllowed", "bucket required")
            return
        if not key:
            self._s3_bucket_op(m, bucket, query, body)
            return
        if m == "POST" and "uploads" in query:
            upload_id = secrets.token_hex(16)
            with store.lock:
                ctype = self.headers.get("Content-Type", "binary/octet-stream")
                store.uploads[upload_id] = (bucket, key, ctype, {})
            xml = _xml(
                "InitiateMultipartUploadResult",
                f"<Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}</Key><UploadId>{upload_id}</UploadId>",
            )
            self._s3_ok(200, xml)
            return
        if "uploadId" in query:
            self._s3_multipart(m, bucket, key, query, body, verdict.checksums)
            return
        if m == "PUT":
            meta = {k[11:]: v for k, v in self.headers.items() if k.lower().startswith("x-amz-meta-")}
            obj = S3Object(body, self.headers.get("Content-Type", "binary/octet-stream"), meta, verdict.checksums)
            with store.lock:
                store.buckets.setdefault(bucket, {})[key] = obj
            self._s3_ok(200, headers=[("ETag", obj.etag), *verdict.checksums.items()])
            return
        if m in ("GET", "HEAD"):
            with store.lock:
                found = store.buckets.get(bucket, {}).get(key)
            if found is None:
                self._s3_error(404, "NoSuchKey", "The specified key does not exist.", Key=key)
                return
            self._s3_get(found)
            return
        if m == "DELETE":
            with store.lock:
                store.buckets.get(bucket, {}).pop(key, None)
            self._s3_ok(204)
            return
        self._s3_error(405, "MethodNotAllowed", f"{m} not supported on objects")

    def _s3_bucket_op(self, m: str, bucket: str, query: dict[str, list[str]], body: bytes) -> None:
        store = self.state.s3
        if m == "PUT":
            with store.lock:
                store.buckets.setdefault(bucket, {})
            self._s3_ok(200, headers=[("Location", f"/{bucket}")])
        elif m == "HEAD":
            self._s3_ok(200, headers=[("x-amz-bucket-region", "us-east-1")])
        elif m == "GET" and "location" in query:
            self._s3_ok(200, _xml("LocationConstraint", ""))
        elif m == "GET":
            self._s3_ok(200, _xml_list_objects(store, bucket, query))
        elif m == "DELETE":
            with store.lock:
                store.buckets.pop(bucket, None)
            self._s3_ok(204)
        else:
            self._s3_error(405, "MethodNotAllowed", f"{m} not supported on buckets")

    def _s3_multipart(
        self, m: str, bucket: str, key: str, query: dict[str, list[str]], body: bytes, checksums: dict[str, str]
    ) -> None:
        store = self.state.s3
        upload_id = query["uploadId"][0]
        with store.lock:
            upload = store.uploads.get(upload_id)
        if upload is None or upload[:2] != (bucket, key):
            self._s3_error(404, "NoSuchUpload", "The specified upload does not exist.", UploadId=upload_id)
            return
        parts = upload[3]
        if m == "PUT":
            n = int(query.get("partNumber", ["0"])[0])
            with store.lock:
                parts[n] = body
            etag = f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'
            self._s3_ok(200, headers=[("ETag", etag), *checksums.items()])
        elif m == "DELETE":
            with store.lock:
                store.uploads.pop(upload_id, None)
            self._s3_ok(204)
        elif m == "POST":
            try:
                wanted = [
                    int(e.text or "0") for e in ElementTree.fromstring(body).iter() if e.tag.endswith("PartNumber")
                ]
            except ElementTree.ParseError:
                self._s3_error(400, "MalformedXML", "CompleteMultipartUpload body is not valid XML")
                return
            missing = [n for n in wanted if n not in parts]
            if missing:
                self._s3_error(400, "InvalidPart", f"parts not uploaded: {missing}")
                return
            data = b"".join(parts[n] for n in wanted)
            obj = S3Object(data, upload[2], {}, {})
            md5s = b"".join(hashlib.md5(parts[n], usedforsecurity=False).digest() for n in wanted)
            obj.etag = f'"{hashlib.md5(md5s, usedforsecurity=False).hexdigest()}-{len(wanted)}"'
            with store.lock:
                store.buckets.setdefault(bucket, {})[key] = obj
                store.uploads.pop(upload_id, None)
            inner = (
                f"<Location>/{escape(bucket)}/{escape(key)}</Location><Bucket>{escape(bucket)}</Bucket>"
                f"<Key>{escape(key)}</Key><ETag>{escape(obj.etag)}</ETag>"
            )
            self._s3_ok(200, _xml("CompleteMultipartUploadResult", inner))
        else:
            self._s3_error(405, "MethodNotAllowed", f"{m} not supported on uploads")

    def _s3_get(self, obj: S3Object) -> None:
        data = obj.data
        headers = [
            ("ETag", obj.etag),
            ("Last-Modified", formatdate(obj.last_modified, usegmt=True)),
            ("Accept-Ranges", "bytes"),
            *((f"x-amz-meta-{k}", v) for k, v in obj.metadata.items()),
        ]
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if rng and (rng.group(1) or rng.group(2)):
            size = len(data)
            if rng.group(1):
                start = int(rng.group(1))
                end = min(int(rng.group(2)), size - 1) if rng.group(2) else size - 1
            else:
                start, end = max(size - int(rng.group(2)), 0), size - 1
            if start >= size or start > end:
                self._s3_error(416, "InvalidRange", "The requested range is not satisfiable")
                return
            headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
            self._s3_ok(206, data[start : end + 1], obj.content_type, headers)
            return
        self._s3_ok(200, data, obj.content_type, headers)


_MODELS = ("gpt-4o-mini", "gpt-4o", "o3-mini")
_CLAUDE = ("claude-fake-1", "claude-fake-2")


def _rid() -> str:
    return secrets.token_hex(8)


def _pg_login(pg: dict[str, Any], user: str, password: str) -> tuple[bool, str]:
    """Try a password login with psql (short connect timeout); ``(ok, last line of psql's stderr)``."""
    psql = pg.get("psql") or shutil.which("psql") or "psql"
    if not pg.get("host"):
        return False, "no pg configured"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PGPASSWORD": password,
        "PGCONNECT_TIMEOUT": str(pg.get("connect_timeout", 3)),
        "PGSSLMODE": "disable",
    }
    argv = [psql, "-X", "-w", "-A", "-t", "-h", str(pg["host"]), "-p", str(pg.get("port", 5432))]
    argv += ["-U", user, "-d", str(pg.get("database", "app")), "-c", "SELECT current_user"]
    try:
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    lines = (res.stderr or res.stdout).strip().splitlines()
    return res.returncode == 0, lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------------------------
# S3 XML


def _xml(root: str, inner: str) -> bytes:
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{_S3_NS}">{inner}</{root}>'.encode()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _xml_list_buckets(store: S3Store) -> bytes:
    with store.lock:
        names = sorted(store.buckets)
    items = "".join(f"<Bucket><Name>{escape(n)}</Name><CreationDate>{_iso(0)}</CreationDate></Bucket>" for n in names)
    return _xml("ListAllMyBucketsResult", f"<Owner><ID>cxe</ID></Owner><Buckets>{items}</Buckets>")


def _xml_list_objects(store: S3Store, bucket: str, query: dict[str, list[str]]) -> bytes:
    """ListObjects (V1 and V2): prefix, delimiter (common prefixes), max-keys; no pagination beyond max-keys."""
    prefix = query.get("prefix", [""])[0]
    delimiter = query.get("delimiter", [""])[0]
    max_keys = int(query.get("max-keys", ["1000"])[0] or 1000)
    v2 = query.get("list-type", [""])[0] == "2"
    with store.lock:
        objs = sorted((k, o) for k, o in store.buckets.get(bucket, {}).items() if k.startswith(prefix))
    contents: list[str] = []
    common: list[str] = []
    for key, obj in objs:
        if delimiter:
            rest = key[len(prefix) :]
            if delimiter in rest:
                cp = prefix + rest.split(delimiter, 1)[0] + delimiter
                if cp not in common:
                    common.append(cp)
                continue
        contents.append(
            f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(obj.last_modified)}</LastModified>"
            f"<ETag>{escape(obj.etag)}</ETag><Size>{len(obj.data)}</Size><StorageClass>STANDARD</StorageClass>"
            "</Contents>"
        )
    truncated = len(contents) > max_keys
    contents = contents[:max_keys]
    inner = f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix><MaxKeys>{max_keys}</MaxKeys>"
    if delimiter:
        inner += f"<Delimiter>{escape(delimiter)}</Delimiter>"
    inner += f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
    inner += f"<KeyCount>{len(contents) + len(common)}</KeyCount>" if v2 else "<Marker></Marker>"
    inner += "".join(contents)
    inner += "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in common)
    return _xml("ListBucketResult", inner)


# ---------------------------------------------------------------------------------------------------------------
# SigV4 verification


class Verdict:
    """Outcome of :func:`verify_sigv4`: ``error`` is an S3 error code ("" when the request is authentic)."""

    def __init__(self) -> None:
        self.status = 403
        self.error = ""
        self.message = ""
        self.details: dict[str, str] = {}
        self.payload = b""  # the decoded object bytes (aws-chunked framing removed)
        self.checksums: dict[str, str] = {}  # x-amz-checksum-* that arrived (header or trailer), verified if known

    def fail(self, code: str, message: str, status: int = 403, **details: str) -> Verdict:
        self.error, self.message, self.status, self.details = code, message, status, details
        return self


_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+)\s*,\s*SignedHeaders=(?P<sh>[^,\s]+)\s*,\s*"
    r"Signature=(?P<sig>[0-9a-f]{64})\s*$"
)


def _signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    k = hmac.new(f"AWS4{secret}".encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return k


def verify_sigv4(method: str, host: str, target: str, received: Message, body: bytes, cfg: dict[str, Any]) -> Verdict:
    """Recompute the request's SigV4 signature with the real secret key and compare (constant time).

    The canonical request and string-to-sign come from botocore's own ``S3SigV4Auth`` on an ``AWSRequest`` rebuilt
    from exactly what arrived (raw target, the headers named in SignedHeaders with their received values), so the
    check matches what AWS computes for any well-formed client, including a gateway that re-signs. aws-chunked
    bodies are decoded; signed chunks (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]``) have every chunk signature
    verified; a hex ``x-amz-content-sha256`` must match the body; CRC32/SHA1/SHA256 checksums (header or trailer)
    and Content-MD5 are verified.
    """
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.compat import HTTPHeaders
    from botocore.credentials import Credentials

    v = Verdict()
    access_key, secret_key = str(cfg.get("access_key", "")), str(cfg.get("secret_key", ""))
    auth = received.get("Authorization", "")
    if not auth:
        return v.fail("SignatureDoesNotMatch", "no Authorization header (anonymous requests are not accepted)")
    m = _AUTH_RE.match(auth.strip())
    if not m:
        return v.fail("SignatureDoesNotMatch", f"malformed or non-SigV4 Authorization header: {auth[:60]!r}")
    cred = m.group("cred").split("/")
    if len(cred) != 5 or cred[3] != "s3" or cred[4] != "aws4_request":
        return v.fail("SignatureDoesNotMatch", f"bad credential scope {m.group('cred')!r}")
    akid, date, region = cred[0], cred[1], cred[2]
    if not hmac.compare_digest(akid, access_key):
        return v.fail(
            "SignatureDoesNotMatch",
            f"The AWS Access Key Id you provided does not exist in our records ({akid!r} is not the real key id).",
            AWSAccessKeyId=akid,
        )
    if cfg.get("region") and region != cfg["region"]:
        return v.fail("AuthorizationHeaderMalformed", f"region {region!r} is wrong; expecting {cfg['region']!r}", 400)
    amz_date = received.get("X-Amz-Date", "")
    if not amz_date or amz_date[:8] != date:
        return v.fail("SignatureDoesNotMatch", f"X-Amz-Date {amz_date!r} missing or not matching scope date {date}")
    content_sha = received.get("X-Amz-Content-SHA256", "")
    if not content_sha:
        return v.fail("InvalidRequest", "Missing required header for this request: x-amz-content-sha256", 400)

    signed = m.group("sh").split(";")
    headers = HTTPHeaders()
    for name in signed:
        values = received.get_all(name) or []
        if not values:
            return v.fail("SignatureDoesNotMatch", f"signed header {name!r} is absent from the request")
        for value in values:
            headers[name] = value

    class _Signer(S3SigV4Auth):  # type: ignore[misc]
        def headers_to_sign(self, request: Any) -> Any:
            # Exactly the client's SignedHeaders (botocore's own list would drop e.g. user-agent if signed).
            return request.headers

    if target.startswith(("http://", "https://")):  # absolute-form target (from a proxy): keep path and query
        target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
    request = AWSRequest(method=method, url=f"https://{host or 'localhost'}{target}")
    request.headers = headers
    request.context["timestamp"] = amz_date
    signer = _Signer(Credentials(access_key, secret_key), "s3", region)
    canonical = signer.canonical_request(request)
    string_to_sign = signer.string_to_sign(request, canonical)
    expected = signer.signature(string_to_sign, request)
    if not hmac.compare_digest(expected, m.group("sig")):
        return v.fail(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. "
            "Check your key and signing method.",
            AWSAccessKeyId=akid,
            StringToSign=string_to_sign,
            CanonicalRequest=canonical,
        )

    # The headers are authentic; now the payload they vouch for.
    raw = body
    scope = f"{date}/{region}/s3/aws4_request"
    key = _signing_key(secret_key, date, region, "s3")
    trailers: dict[str, str] = {}
    if content_sha.startswith("STREAMING-"):
        try:
            payload, trailers = _decode_aws_chunked(raw, content_sha, key, amz_date, scope, m.group("sig"))
        except ValueError as exc:
            return v.fail("SignatureDoesNotMatch" if "signature" in str(exc) else "IncompleteBody", str(exc))
        decoded_len = received.get("x-amz-decoded-content-length")
        if decoded_len is not None and int(decoded_len) != len(payload):
            return v.fail("IncompleteBody", f"decoded length {len(payload)} != x-amz-decoded-content-length", 400)
    elif content_sha == "UNSIGNED-PAYLOAD":
        payload = raw
    else:
        if not re.fullmatch(r"[0-9a-f]{64}", content_sha):
            return v.fail("InvalidArgument", f"x-amz-content-sha256 {content_sha!r} is not valid", 400)
        if hashlib.sha256(raw).hexdigest() != content_sha:
            return v.fail("XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' does not match", 400)
        payload = raw
    checks = {k.lower(): val for k, val in received.items() if k.lower().startswith("x-amz-checksum-")}
    checks.pop("x-amz-checksum-algorithm", None)
    checks.pop("x-amz-checksum-type", None)
    checks.update({k: val for k, val in trailers.items() if k.startswith("x-amz-checksum-")})
    for name, value in checks.items():
        actual = _checksum(name[len("x-amz-checksum-") :], payload)
        if actual is not None and actual != value:
            return v.fail("BadDigest", f"{name} {value} does not match the payload ({actual})", 400)
    md5 = received.get("Content-MD5")
    if md5 and base64.b64encode(hashlib.md5(payload, usedforsecurity=False).digest()).decode() != md5:
        return v.fail("BadDigest", "Content-MD5 does not match the payload", 400)
    v.payload = payload
    v.checksums = checks
    return v


def _checksum(algorithm: str, data: bytes) -> str | None:
    """Base64 checksum as S3 writes it, for the algorithms the standard library has (None: not verifiable)."""
    if algorithm == "crc32":
        return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    if algorithm in ("sha1", "sha256"):
        return base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    return None


def _decode_aws_chunked(
    raw: bytes, mode: str, key: bytes, amz_date: str, scope: str, seed_sig: str
) -> tuple[bytes, dict[str, str]]:
    """Decode ``Content-Encoding: aws-chunked`` and check chunk (and trailer) signatures when the mode signs them.

    Raises ValueError("... signature ...") for a bad signature, ValueError for broken framing.
    """
    signed = mode.startswith("STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    out: list[bytes] = []
    prev = seed_sig
    pos = 0
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("aws-chunked: missing chunk header")
        header = raw[pos:eol].decode("ascii", "replace")
        size_s, _, ext = header.partition(";")
        try:
            size = int(size_s.strip(), 16)
        except ValueError as exc:
            raise ValueError(f"aws-chunked: bad chunk size {size_s!r}") from exc
        data = raw[eol + 2 : eol + 2 + size]
        if len(data) != size:
            raise ValueError("aws-chunked: truncated chunk")
        if signed:
            got = ext.partition("chunk-signature=")[2].strip()
            sts = "\n".join(
                ["AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, prev, _EMPTY_SHA256, hashlib.sha256(data).hexdigest()]
            )
            want = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(got, want):
                raise ValueError(f"aws-chunked: chunk signature mismatch at offset {pos}")
            prev = want
        pos = eol + 2 + size
        if size == 0:
            break
        out.append(data)
        if raw[pos : pos + 2] != b"\r\n":
            raise ValueError("aws-chunked: missing CRLF after chunk")
        pos += 2
    # Trailers ("name:value\r\n")*, then a blank line; "\r\n" right after a zero chunk means none.
    trailers: dict[str, str] = {}
    trailer_sig = ""
    signed_part = b""
    for line in raw[pos:].split(b"\r\n"):
        if not line:
            continue
        name, _, value = line.decode("ascii", "replace").partition(":")
        name = name.strip().lower()
        if name == "x-amz-trailer-signature":
            trailer_sig = value.strip()
        else:
            trailers[name] = value.strip()
            signed_part += f"{name}:{value.strip()}\n".encode()
    if signed and mode.endswith("-TRAILER") and trailers:
        sts = "\n".join(["AWS4-HMAC-SHA256-TRAILER", amz_date, scope, prev, hashlib.sha256(signed_part).hexdigest()])
        want = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(trailer_sig, want):
            raise ValueError("aws-chunked: trailer signature mismatch")
    return b"".join(out), trailers


# ---------------------------------------------------------------------------------------------------------------
# server


class FakeServer(TLSThreadingServer):
    def __init__(self, address: tuple[str, int], state: ServerState, ssl_ctx: ssl.SSLContext | None) -> None:
        self.state = state
        self.ssl_ctx = ssl_ctx
        super().__init__(address, Handler)


def _addr(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host.strip("[]"), int(port)


def _iter_listeners(args: argparse.Namespace, state: ServerState) -> Iterator[FakeServer]:
    ctx = make_server_context(args.cert, args.key or args.cert) if args.listen else None
    for spec in args.listen or []:
        yield FakeServer(_addr(spec), state, ctx)
    for spec in args.plain or []:
        yield FakeServer(_addr(spec), state, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", action="append", metavar="IP:PORT", help="serve HTTPS here (repeatable)")
    parser.add_argument("--plain", action="append", metavar="IP:PORT", help="serve plain HTTP here (repeatable)")
    parser.add_argument("--cert", help="PEM certificate chain (may also hold the key)")
    parser.add_argument("--key", help="PEM private key (default: --cert)")
    parser.add_argument("--config", help="JSON config (keys, S3 credentials, OAuth client, pg, host map)")
    parser.add_argument("--log", help="append one JSON line per request here")
    parser.add_argument("--openai-key", help="overrides config openai_key")
    parser.add_argument("--anthropic-key", help="overrides config anthropic_key")
    parser.add_argument("--s3-access-key", help="overrides config s3.access_key (the real key id)")
    parser.add_argument("--s3-secret-key", help="overrides config s3.secret_key (the real secret)")
    parser.add_argument("--oauth-expires-in", type=float, help="overrides config oauth.expires_in (seconds)")
    args = parser.parse_args(argv)
    if not args.listen and not args.plain:
        parser.error("give at least one --listen or --plain address")
    if args.listen and not args.cert:
        parser.error("--listen needs --cert")

    config: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as fh:
            config = json.load(fh)
    if args.openai_key:
        config["openai_key"] = args.openai_key
    if args.anthropic_key:
        config["anthropic_key"] = args.anthropic_key
    if args.s3_access_key or args.s3_secret_key:
        s3 = config.setdefault("s3", {})
        s3.update({k: v for k, v in (("access_key", args.s3_access_key), ("secret_key", args.s3_secret_key)) if v})
    if args.oauth_expires_in is not None:
        config.setdefault("oauth", {})["expires_in"] = args.oauth_expires_in
    if config.get("s3"):
        import botocore.auth  # noqa: F401  (fail at start, not on the first S3 request, if botocore is missing)

    state = ServerState(config, RequestLog(args.log))
    servers = list(_iter_listeners(args, state))
    for srv in servers:
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("READY", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
