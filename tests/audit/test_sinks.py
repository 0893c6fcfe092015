"""Audit sinks: syslog (RFC 5424 over UDP and TCP) and the webhook, against real receivers on loopback.

The receivers are real servers (http.server, socketserver, a UDP socket) that parse what arrives; the lines come
from the real audit log (`AuditLog(..., sinks=[...])`). Waits are bounded polls for what must arrive, never timing
asserts. One test keeps its webhook receiver down for a real 60 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import json
import logging
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit import AuditLog, make_sinks
from gateway.audit._chain import line_hash
from gateway.audit._sinks import SyslogSinkConfig, WebhookSinkConfig, _Spool, syslog_message
from gateway.config import ConfigError, load_config
from tests.audit.test_export import RECORDS, iter_ocsf, parse_cef
from tests.support.world import World

LOOPBACK = "127.0.0.1"
EVENTS = ("decision", "security")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll for something that must happen (bounded); fails with `what` if it does not."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def decision(i: int, **extra: Any) -> dict[str, Any]:
    return {**RECORDS[0], "time": f"2025-03-01T10:{i // 3600 % 60:02d}:{i % 60:02d}Z", "bytes_in": i, **extra}


def audit_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def first_of_each(lines: list[bytes]) -> list[bytes]:
    """What a receiver keeps after dropping duplicates by the record's seq, in order of first arrival."""
    seen: set[int] = set()
    out = []
    for line in lines:
        seq = json.loads(line)["seq"]
        if seq not in seen:
            seen.add(seq)
            out.append(line)
    return out


# -- receivers -----------------------------------------------------------------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def in_netns(netns: str | None, make: Callable[[], Any]) -> Any:
    """Run `make` on a thread inside network namespace `netns` (setns is per thread): sockets it creates belong
    there, and serve from any thread afterwards."""
    if netns is None:
        return make()
    box: list[Any] = []

    def target() -> None:
        fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
        finally:
            os.close(fd)
        try:
            box.append(make())
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


class WebhookReceiver:
    """A SIEM's HTTP collector: keeps every POST (headers, body) and answers `respond(n, body)` (default 200).
    `stop()` closes its port (connections are refused, as when the collector is down); `start()` reopens it."""

    def __init__(self, respond: Callable[[int, bytes], int] | None = None, netns: str | None = None) -> None:
        self.posts: list[tuple[dict[str, str], bytes, int]] = []
        self.respond = respond or (lambda n, body: 200)
        self.host = LOOPBACK
        self.port = 0
        self.netns = netns
        self._server: http.server.ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def start(self, host: str = LOOPBACK) -> WebhookReceiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    status = receiver.respond(len(receiver.posts), body)
                    receiver.posts.append((dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.host = host
        self._server = in_netns(self.netns, lambda: http.server.ThreadingHTTPServer((host, self.port), Handler))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/ingest?channel=audit"

    def lines(self, accepted_only: bool = False) -> list[bytes]:
        with self._lock:
            bodies = [body for _, body, status in self.posts if status == 200 or not accepted_only]
        return [line for body in bodies for line in body.splitlines()]


class SyslogTcpReceiver:
    """RFC 6587 octet-counted frames over TCP; `stop()` also drops the connections it has."""

    def __init__(self, netns: str | None = None) -> None:
        self.frames: list[bytes] = []
        self.port = 0
        self.netns = netns
        self._server: socketserver.ThreadingTCPServer | None = None
        self._conns: list[socket.socket] = []

    def start(self, host: str = LOOPBACK) -> SyslogTcpReceiver:
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                receiver._conns.append(self.connection)
                while True:
                    length = b""
                    while (c := self.rfile.read(1)) not in (b" ", b""):
                        assert c.isdigit(), f"not octet counting: {length + c!r}"
                        length += c
                    if not c:
                        return
                    frame = self.rfile.read(int(length))
                    assert len(frame) == int(length), "truncated frame"
                    receiver.frames.append(frame)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True  # restart on the same port while old connections linger in TIME_WAIT
            daemon_threads = True

        self._server = in_netns(self.netns, lambda: Server((host, self.port), Handler))
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._conns.clear()


_RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) "
    rb"(?P<msgid>[!-~]{1,32}) (?P<sd>-|(?:\[[^\]]*\])+)(?: (?P<msg>.*))?$",
    re.S,
)


def parse_syslog(frame: bytes) -> dict[str, Any]:
    """An RFC 5424 message (section 6 ABNF, headers strictly): its parts, MSG without the UTF-8 BOM."""
    m = _RFC5424.match(frame)
    assert m is not None, frame[:200]
    msg = m["msg"]
    assert msg is not None and msg.startswith(b"\xef\xbb\xbf"), "MSG is UTF-8 and so starts with the BOM"
    pri = int(m["pri"])
    return {
        "facility": pri // 8,
        "severity": pri % 8,
        "timestamp": m["ts"].decode(),
        "hostname": m["host"].decode(),
        "app": m["app"].decode(),
        "procid": m["procid"].decode(),
        "msgid": m["msgid"].decode(),
        "msg": msg[3:],
    }


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver().start()
    yield r
    r.stop()


def webhook(url: str, **kw: Any) -> WebhookSinkConfig:
    defaults: dict[str, Any] = {"flush_interval_s": 0.05, "backoff_initial_s": 0.1, "backoff_max_s": 1.0}
    return WebhookSinkConfig(type="webhook", url=url, name="siem", timeout_s=2, **{**defaults, **kw})


def spool_files(state: Path, name: str = "siem") -> list[Path]:
    return sorted((state / "sinks" / name).glob("*.jsonl"))


# -- webhook -------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_webhook_loses_nothing_while_its_receiver_is_down_for_60_s(tmp_path: Path, receiver: WebhookReceiver) -> None:
    state = tmp_path / "state"
    (sink,) = make_sinks([webhook(receiver.url, memory_records=50, batch_records=100, backoff_max_s=2.0)], str(state))
    log = AuditLog(str(state / "audit.jsonl"), durability="none", sinks=[sink])
    n = 0
    try:
        for _ in range(100):
            log.write(decision(n))
            n += 1
        wait_until(lambda: len(receiver.lines()) >= log.last_seq, 30, "the first records")

        receiver.stop()
        outage_end = time.monotonic() + 60
        spooled = False
        while time.monotonic() < outage_end:  # 60 s of traffic while the SIEM is down
            for _ in range(10):
                log.write(decision(n))
                n += 1
            spooled = spooled or bool(spool_files(state))
            assert sink.status()["memory"] <= 50  # type: ignore[attr-defined]
            time.sleep(0.5)
        assert spooled, "while the receiver was down, records went to the spool on disk"
        received_before = len(receiver.lines())

        receiver.start()
        for _ in range(100):
            log.write(decision(n))
            n += 1
        wait_until(lambda: len(first_of_each(receiver.lines())) >= log.last_seq, 60, "the spooled records")
    finally:
        log.close()  # closing checkpoint, then the sink flushes it
    assert n > 1300 and received_before < n
    written = audit_lines(state / "audit.jsonl")
    # Every line arrived, byte for byte, in the order of the log (once duplicates are dropped by seq).
    assert first_of_each(receiver.lines()) == written
    assert spool_files(state) == []
    status = sink.status()  # type: ignore[attr-defined]
    assert status["failures"] > 0 and status["dropped"] == 0


def test_webhook_retries_until_accepted_and_the_receiver_deduplicates(tmp_path: Path) -> None:
    # The first three POSTs are read and then answered 503: the same lines come again (at least once).
    receiver = WebhookReceiver(respond=lambda n, body: 503 if n < 3 else 200).start()
    try:
        state = tmp_path / "state"
        (sink,) = make_sinks([webhook(receiver.url, batch_records=7)], str(state))
        with AuditLog(str(state / "audit.jsonl"), durability="none", sinks=[sink]) as log:
            for i in range(30):
                log.write(decision(i))
            wait_until(lambda: len(receiver.lines(accepted_only=True)) >= log.last_seq, 20, "every line accepted")
        lines = audit_lines(state / "audit.jsonl")
        assert receiver.lines(accepted_only=True) == lines  # what was accepted: each line once, in order
        assert first_of_each(receiver.lines()) == lines
        assert len(receiver.lines()) > len(lines)  # retries did resend
        headers = [h for h, _, _ in receiver.posts]
        assert headers[0]["X-Cube-Egress-Batch"] == headers[1]["X-Cube-Egress-Batch"]  # same batch, same id
        assert headers[0]["Content-Type"] == "application/x-ndjson"
        assert int(headers[-1]["X-Cube-Egress-Records"]) == len(receiver.posts[-1][1].splitlines())
    finally:
        receiver.stop()


def test_close_keeps_the_backlog_and_the_next_start_sends_it_first(tmp_path: Path) -> None:
    state = tmp_path / "state"
    receiver = WebhookReceiver()
    receiver.start()
    url = receiver.url
    receiver.stop()  # down from the start
    (sink,) = make_sinks([webhook(url, close_timeout_s=0.5)], str(state))
    lines = [json.dumps({"seq": i, "event": "decision"}).encode() for i in range(1, 31)]
    for line in lines[:20]:
        sink.submit(line, {})
    wait_until(lambda: bool(spool_files(state)), 10, "the first failure to spill the queue")
    for line in lines[20:25]:
        sink.submit(line, {})
    sink.close()
    assert spool_files(state), "close() persisted the backlog"
    assert sum(len(p.read_bytes().splitlines()) for p in spool_files(state)) == 25

    receiver.start()
    (again,) = make_sinks([webhook(url)], str(state))
    for line in lines[25:]:
        again.submit(line, {})
    wait_until(lambda: len(receiver.lines()) >= 30, 20, "backlog and new lines")
    again.close()
    assert receiver.lines() == lines  # the backlog first, then the new lines; nothing twice
    assert spool_files(state) == []
    receiver.stop()


_CRASHER = """
import json, sys, time
from gateway.audit import make_sinks
from gateway.audit._sinks import WebhookSinkConfig
url, state, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = WebhookSinkConfig(type="webhook", url=url, name="siem", backoff_initial_s=0.1, memory_records=1000)
(sink,) = make_sinks([cfg], state)
for i in range(1, n + 1):
    sink.submit(json.dumps({"seq": i, "event": "decision"}).encode(), {})
while sink.status()["memory"]:
    time.sleep(0.02)
print("spooled", flush=True)
time.sleep(60)
"""


def test_a_crash_while_the_receiver_is_down_loses_nothing(tmp_path: Path) -> None:
    receiver = WebhookReceiver()
    receiver.start()
    url = receiver.url
    receiver.stop()
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, url, str(state), "40"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "spooled"
    finally:
        proc.send_signal(signal.SIGKILL)  # no close(): a crash
        proc.wait(10)
    receiver.start()
    (sink,) = make_sinks([webhook(url)], str(state))
    wait_until(lambda: len(receiver.lines()) >= 40, 20, "the spool of the crashed process")
    sink.close()
    assert [json.loads(x)["seq"] for x in receiver.lines()] == list(range(1, 41))
    receiver.stop()


def test_413_halves_the_batch(tmp_path: Path) -> None:
    receiver = WebhookReceiver(respond=lambda n, body: 413 if len(body.splitlines()) > 8 else 200).start()
    try:
        (sink,) = make_sinks([webhook(receiver.url, batch_records=64, flush_interval_s=0.5)], str(tmp_path))
        lines = [json.dumps({"seq": i}).encode() for i in range(1, 101)]
        for line in lines:
            sink.submit(line, {})
        wait_until(lambda: len(receiver.lines(accepted_only=True)) >= 100, 20, "every line in smaller batches")
        sink.close()
        assert receiver.lines(accepted_only=True) == lines
    finally:
        receiver.stop()


def test_spool_is_bounded_and_counts_what_it_drops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    receiver = WebhookReceiver()
    receiver.start()
    url = receiver.url
    receiver.stop()
    (sink,) = make_sinks(
        [webhook(url, memory_records=10, spool_max_bytes=65536, close_timeout_s=0.2)], str(tmp_path)
    )
    line = json.dumps({"seq": 1, "pad": "x" * 1000}).encode()
    with caplog.at_level(logging.ERROR, logger="cube_egress.audit.sinks"):
        for _ in range(200):  # ~200 kB into a 64 kB spool
            sink.submit(line, {})
        sink.close()
    status = sink.status()  # type: ignore[attr-defined]
    assert status["dropped"] > 100
    assert sum(p.stat().st_size for p in spool_files(tmp_path)) <= 65536 + 10 * len(line) + 10
    assert "is full" in caplog.text


def test_authorization_comes_from_a_private_file_and_is_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = "Bearer siem-token-s3cret-0123"
    auth = tmp_path / "siem.token"
    auth.write_text(token + "\n")
    auth.chmod(0o600)
    receiver = WebhookReceiver(respond=lambda n, body: 401 if n == 0 else 200).start()
    try:
        cfg = webhook(receiver.url, authorization_file=str(auth), headers={"X-Tenant": "t1"})
        with caplog.at_level(logging.DEBUG):
            (sink,) = make_sinks([cfg], str(tmp_path / "state"))
            sink.submit(b'{"seq":1}', {})
            wait_until(lambda: len(receiver.lines(accepted_only=True)) == 1, 10, "the line")
            sink.close()
        headers = receiver.posts[-1][0]
        assert headers["Authorization"] == token and headers["X-Tenant"] == "t1"
        assert "HTTP 401" in caplog.text  # the failure is logged ...
        assert "s3cret" not in caplog.text and "channel=audit" not in caplog.text  # ... without token or URL
    finally:
        receiver.stop()
    auth.chmod(0o640)
    with pytest.raises(ValueError, match="must not be readable by group or others"):
        make_sinks([webhook("http://127.0.0.1:9/", authorization_file=str(auth))], str(tmp_path / "s2"))


# -- the spool, as a model -------------------------------------------------------------------------------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(1, 7)),
        st.tuples(st.just("deliver"), st.integers(1, 5)),
        st.tuples(st.just("fail"), st.just(0)),
        st.tuples(st.just("restart"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_spool_delivers_in_order_exactly_once_across_failures_and_restarts(ops: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        spool = _Spool(d, memory_records=3, max_bytes=1 << 20, segment_records=2)
        put: list[bytes] = []
        delivered: list[bytes] = []
        for op, k in [*ops, ("restart", 0), ("deliver", 10**6)]:
            if op == "put":
                for _ in range(k):
                    line = b"%d" % len(put)
                    put.append(line)
                    spool.put(line)
            elif op in ("deliver", "fail"):
                with spool.cond:
                    batch = spool.peek(k if op == "deliver" else 3, 1 << 20)
                # The head of the queue is always the oldest line not yet delivered.
                assert batch == put[len(delivered) : len(delivered) + len(batch)]
                if op == "deliver":
                    spool.ack(len(batch))
                    delivered.extend(batch)
                else:
                    spool.spill()
            else:
                spool.persist()
                spool = _Spool(d, memory_records=3, max_bytes=1 << 20, segment_records=2)
        while True:
            with spool.cond:
                batch = spool.peek(100, 1 << 20)
            if not batch:
                break
            spool.ack(len(batch))
            delivered.extend(batch)
        assert delivered == put
        assert [p for p in os.listdir(d) if p.endswith(".jsonl")] == []


# -- syslog ----------------------------------------------------------------------------------------------------------


def test_syslog_udp_one_rfc5424_message_per_record(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind((LOOPBACK, 0))
        server.settimeout(10)
        cfg = SyslogSinkConfig(
            type="syslog", host=LOOPBACK, port=server.getsockname()[1], transport="udp", hostname="gw-1"
        )
        (sink,) = make_sinks([cfg], str(tmp_path))
        with AuditLog(str(tmp_path / "audit.jsonl"), durability="none", sinks=[sink]) as log:
            for record in RECORDS:
                log.write(record)
        lines = audit_lines(tmp_path / "audit.jsonl")
        messages = [parse_syslog(server.recv(65535)) for _ in lines]
    assert [m["msg"] for m in messages] == lines  # MSG is the audit line itself
    for m, line in zip(messages, lines, strict=True):
        record = json.loads(line)
        assert m["facility"] == 16 and m["hostname"] == "gw-1" and m["app"] == "cube-egress"
        assert m["msgid"] == record["event"] and m["timestamp"] == record["time"] and m["procid"] == str(os.getpid())
    by_event = {json.loads(m["msg"]).get("kind") or json.loads(m["msg"])["event"]: m["severity"] for m in messages}
    assert by_event["header"] == 6 and by_event["host_mismatch"] == 4 and by_event["secret_echo"] == 3


def test_syslog_tcp_octet_counting_survives_a_receiver_restart(tmp_path: Path) -> None:
    receiver = SyslogTcpReceiver().start()
    cfg = SyslogSinkConfig(
        type="syslog", host=LOOPBACK, port=receiver.port, transport="tcp", format="cef", backoff_initial_s=0.1,
        backoff_max_s=0.5,
    )  # fmt: skip
    (sink,) = make_sinks([cfg], str(tmp_path))
    log = AuditLog(str(tmp_path / "audit.jsonl"), durability="none", sinks=[sink])
    try:
        for i in range(20):
            log.write(decision(i, detail=f"line one\nline two = {i} | x"))
        wait_until(lambda: len(receiver.frames) >= 20, 10, "the first frames")
        receiver.stop()  # drops the connection: the sink must notice before it writes into it
        time.sleep(0.2)  # let the FIN arrive (not an assertion: without it the test only gets stricter)
        for i in range(20, 40):
            log.write(decision(i))
        wait_until(lambda: sink.status()["failures"] > 0, 10, "a failed attempt")  # type: ignore[attr-defined]
        receiver.start()
        for i in range(40, 50):
            log.write(decision(i))
        wait_until(lambda: len(receiver.frames) >= 50, 20, "every frame")
    finally:
        log.close()
        receiver.stop()
    events = [r for r in map(json.loads, audit_lines(tmp_path / "audit.jsonl")) if r["event"] == "decision"]
    messages = [parse_syslog(f) for f in receiver.frames]
    cef = [parse_cef(m["msg"].decode()) for m in messages]
    assert [int(ext["in"]) for _, ext in cef] == [r["bytes_in"] for r in events] == list(range(50))
    assert cef[0][1]["msg"] == "line one\nline two = 0 | x"
    assert [int(ext["externalId"]) for _, ext in cef] == [r["seq"] for r in events]  # CEF skips chain records


def test_syslog_message_fields_are_sanitised() -> None:
    record = {"event": "decision", "time": "not a time", "verdict": "deny", "mode": "enforce"}
    msg = syslog_message(record, b"{}", facility="auth", hostname="my host\u00e9", app_name="", procid=7)
    parsed = parse_syslog(msg)
    assert (parsed["facility"], parsed["severity"]) == (4, 5)
    assert parsed["timestamp"] == "-" and parsed["hostname"] == "my_host_" and parsed["app"] == "-"


# -- configuration -------------------------------------------------------------------------------------------------


def test_sinks_in_the_gateway_config(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "gateway.yaml"
    path.write_text(
        "version: 1\npolicies: [p.yaml]\naudit:\n  sinks:\n"
        "    - {type: syslog, host: 192.0.2.10, transport: tcp, port: 6514, format: cef}\n"
        "    - {type: webhook, url: 'https://siem.example/ingest', authorization_file: siem.token, format: ocsf}\n"
    )
    config = load_config(str(path))
    syslog, hook = config.audit.sinks
    assert isinstance(syslog, SyslogSinkConfig) and syslog.transport == "tcp" and syslog.format == "cef"
    assert isinstance(hook, WebhookSinkConfig) and hook.authorization_file == str(tmp_path / "conf" / "siem.token")
    path.write_text("version: 1\npolicies: [p.yaml]\naudit:\n  sinks:\n    - {type: webhook, url: ftp://x/}\n")
    with pytest.raises(ConfigError, match="http:// or https://"):
        load_config(str(path))
    path.write_text("version: 1\npolicies: [p.yaml]\naudit:\n  sinks:\n    - {type: kafka, host: x}\n")
    with pytest.raises(ConfigError, match=r"gateway\.yaml:5"):
        load_config(str(path))
    with pytest.raises(ValueError, match="two sinks named"):
        make_sinks([syslog, syslog], str(tmp_path))


# -- the whole gateway -------------------------------------------------------------------------------------------------


@pytest.mark.netns
@pytest.mark.gateway
def test_gateway_sends_every_audit_line_to_its_sinks(world: World, tmp_path: Path) -> None:
    """A real gateway with a webhook (every line, byte for byte) and a TCP syslog sink (OCSF events) to receivers
    in its own namespace; after a clean shutdown both hold what the audit log holds, and its OCSF export
    validates."""
    from tests.gateway.harness import gateway_process, request
    from tests.support.world import GATEWAY_INTERNET_IP

    netns = world.ns_name("gateway")
    hook = WebhookReceiver(netns=netns).start(GATEWAY_INTERNET_IP)
    syslog = SyslogTcpReceiver(netns=netns).start(GATEWAY_INTERNET_IP)
    sinks = [
        {"type": "webhook", "url": hook.url, "name": "siem", "flush_interval_s": 0.1},
        {"type": "syslog", "host": GATEWAY_INTERNET_IP, "port": syslog.port, "transport": "tcp", "format": "ocsf"},
    ]
    try:
        with gateway_process(world, tmp_path, "explicit", port=3137, extra={"audit": {"sinks": sinks}}) as gw:
            assert request(world, "curl", "GET", "https://api.example.test/allowed/x", gateway=gw).status == 200
            assert request(world, "curl", "GET", "https://api.example.test/admin/x", gateway=gw).status == 403
            assert request(world, "curl", "GET", "http://nowhere.example.test/", gateway=gw).status == 403
            wait_until(lambda: len(hook.lines()) >= len(audit_lines(gw.audit_path)), 20, "the records at the webhook")
        lines = audit_lines(gw.audit_path)
        assert json.loads(lines[-1])["event"] == "checkpoint"  # a clean shutdown, sinks closed after it
        assert hook.lines() == lines
        ocsf = list(iter_ocsf([parse_syslog(f)["msg"].decode() for f in syslog.frames]))
        events = [json.loads(x) for x in lines if json.loads(x)["event"] in EVENTS]
        assert [e["metadata"]["uid"] for e in ocsf] == [line_hash(x) for x in lines if json.loads(x)["event"] in EVENTS]
        assert len(ocsf) == len(events) >= 3
        exported = subprocess.run(
            [str(Path(sys.executable).with_name("cube-egress")), "audit", "export", "--format", "ocsf",
             str(gw.audit_path)],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        assert list(iter_ocsf(exported)) == ocsf
    finally:
        hook.stop()
        syslog.stop()

