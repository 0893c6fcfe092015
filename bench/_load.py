"""A small closed-loop HTTPS load generator: N keep-alive connections, each with one request in flight.

Why not `hey`: it hard-codes `InsecureSkipVerify`, so it cannot show which certificate a client was given (the
point of the splice benchmark), and its per-request tracing costs more CPU than this loop on a 2-core machine
(measured directly against nginx: hey ~14k req/s, this loop ~30k req/s with one process), which matters when the
client shares the cores with the proxy it measures.

Each worker process (spawned, one by default) opens its connections, through an HTTP proxy with CONNECT or
directly, and does the TLS handshake verifying the server certificate against exactly one CA file (so a spliced
connection *must* present the upstream's certificate and an intercepted one the interception CA's). Then every
connection sends `GET path` again as soon as the previous response is complete. Requests completing in the
measured window (after a warm-up) are counted and their latency (send to last byte) recorded. A response that is
not `200` is an error; a connection that closes is reopened (counted). Every wait is bounded.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import selectors
import socket
import ssl
import time
import traceback
from array import array
from dataclasses import dataclass, field
from typing import Any

from ._common import BenchError, percentile

_STALL_S = 10.0  # no byte on any connection for this long: the run is broken


@dataclass(frozen=True)
class LoadSpec:
    host: str  # request target name: SNI, CONNECT authority and Host header
    port: int
    path: str
    cafile: str  # the only CA the client trusts for this run
    proxy: tuple[str, int] | None = None  # explicit proxy (CONNECT); None: connect to `address` directly
    address: str = "127.0.0.1"  # direct runs only
    connections: int = 20
    duration: float = 8.0
    warmup: float = 1.5
    procs: int = 1


@dataclass
class LoadResult:
    spec: LoadSpec
    requests: int  # 200s completed in the measured window
    total: int  # every response, warm-up and drain included (what the proxy saw)
    errors: int
    reconnects: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    issuers: list[str]
    error_samples: list[str]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


def _request_bytes(spec: LoadSpec) -> bytes:
    return (
        f"GET {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\nUser-Agent: cube-egress-bench/1\r\n"
        "Accept: */*\r\n\r\n"
    ).encode()


def _issuer(tls: ssl.SSLSocket) -> str:
    """The organisation (else common name) of the CA that signed the server certificate the client verified."""
    cert: Any = tls.getpeercert()
    names = {key: value for rdn in cert.get("issuer", ()) for key, value in rdn}
    return str(names.get("organizationName") or names.get("commonName") or "?")


def _open(spec: LoadSpec, ctx: ssl.SSLContext, timeout: float = 10.0) -> ssl.SSLSocket:
    if spec.proxy is not None:
        sock = socket.create_connection(spec.proxy, timeout=timeout)
        authority = f"{spec.host}:{spec.port}"
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                sock.close()
                raise ConnectionError("proxy closed the connection during CONNECT")
            head += chunk
            if len(head) > 65536:
                sock.close()
                raise ConnectionError("oversized CONNECT response")
        status = head.split(b"\r\n", 1)[0]
        if status.split(b" ")[1:2] != [b"200"]:
            sock.close()
            raise ConnectionError(f"CONNECT refused: {status.decode(errors='replace')} {head[-200:]!r}")
    else:
        sock = socket.create_connection((spec.address, spec.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls = ctx.wrap_socket(sock, server_hostname=spec.host)  # handshake (blocking, with the timeout above)
    tls.setblocking(False)
    return tls


class _Conn:
    __slots__ = ("buf", "sock", "t0")

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buf = b""
        self.t0 = 0


def _parse(buf: bytes) -> tuple[int, int, bool] | None:
    """(status, total length, close) of the complete response at the start of `buf`; None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower()
    status = int(head[9:12])
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        if b"\r\ntransfer-encoding: chunked" in head:
            # e.g. the gateway with audit durability strict, which holds back a body's end until its record is
            # on disk (bench audit)
            chunked = _chunked_end(buf, end + 4)
            return None if chunked is None else (status, chunked, b"\r\nconnection: close" in head)
        raise ValueError(f"response without Content-Length: {buf[:200]!r}")
    j = head.find(b"\r\n", i + 17)
    length = int(head[i + 17 : j if j >= 0 else len(head)])
    total = end + 4 + length
    if len(buf) < total:
        return None
    return status, total, b"\r\nconnection: close" in head


def _chunked_end(buf: bytes, pos: int) -> int | None:
    """Where a chunked body starting at `pos` ends (after its last chunk and trailers); None if incomplete."""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            trailers_end = buf.find(b"\r\n", pos)
            while trailers_end > pos:  # a trailer line; the body ends at the empty line
                pos = trailers_end + 2
                trailers_end = buf.find(b"\r\n", pos)
            return None if trailers_end < 0 else trailers_end + 2
        pos += size + 2
        if pos > len(buf):
            return None


def _worker(spec: LoadSpec, n_conns: int, ready: Any, start_at: Any, out: Any) -> None:
    try:
        out.put(_work(spec, n_conns, ready, start_at))
    except BenchError as e:
        out.put({"fatal": str(e)})
    except BaseException as e:
        out.put({"fatal": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"})


def _work(spec: LoadSpec, n_conns: int, ready: Any, start_at: Any) -> dict[str, Any]:
    # Only `cafile` is trusted: given a cafile, create_default_context loads no system store.
    ctx = ssl.create_default_context(cafile=spec.cafile)
    request = _request_bytes(spec)
    sel = selectors.DefaultSelector()
    conns = []
    issuers = []
    for _ in range(n_conns):
        tls = _open(spec, ctx)
        issuers.append(_issuer(tls))
        c = _Conn(tls)
        sel.register(tls, selectors.EVENT_READ, c)
        conns.append(c)
    ready.release()
    while start_at.value == 0.0:
        time.sleep(0.002)
    pc = time.perf_counter
    t_start = start_at.value + spec.warmup
    t_end = t_start + spec.duration
    # perf_counter and monotonic share CLOCK_MONOTONIC on Linux, so the window is the same in every worker.
    lat = array("q")
    requests = errors = reconnects = total = 0
    error_samples: list[str] = []
    for c in conns:
        c.t0 = int(pc() * 1e9)
        c.sock.send(request)
    active = len(conns)
    last_progress = pc()
    while active:
        events = sel.select(1.0)
        now = pc()
        if not events:
            if now - last_progress > _STALL_S:
                raise BenchError(
                    f"stalled: no response for {_STALL_S:.0f}s with {active} requests outstanding, after {total} "
                    f"responses on {len(conns)} connections"
                )
            continue
        last_progress = now
        for key, _ in events:
            c = key.data
            done = False
            closed = False
            while True:
                try:
                    data = c.sock.recv(65536)
                except ssl.SSLWantReadError:
                    break
                except (OSError, ssl.SSLError) as e:
                    closed = True
                    if len(error_samples) < 5:
                        error_samples.append(f"recv: {e}")
                    break
                if not data:
                    closed = True
                    break
                c.buf += data
                try:
                    parsed = _parse(c.buf)
                except ValueError as e:
                    errors += 1
                    if len(error_samples) < 5:
                        error_samples.append(str(e))
                    closed = True
                    break
                if parsed is not None:
                    status, length, close = parsed
                    c.buf = c.buf[length:]
                    total += 1
                    done = True
                    closed = close
                    t = pc()
                    if t_start <= t < t_end:
                        if status == 200:
                            requests += 1
                            lat.append(int(t * 1e9) - c.t0)
                        else:
                            errors += 1
                            if len(error_samples) < 5:
                                error_samples.append(f"status {status}")
                    break
            if not (done or closed):
                continue
            now = pc()
            if closed:
                sel.unregister(c.sock)
                c.sock.close()
                if not done:
                    errors += 1
                if now < t_end:
                    reconnects += 1
                    if reconnects > 200:
                        raise BenchError(f"too many reconnects; errors: {error_samples}")
                    c.sock = _open(spec, ctx)
                    c.buf = b""
                    sel.register(c.sock, selectors.EVENT_READ, c)
                else:
                    active -= 1
                    continue
            if now < t_end:
                c.t0 = int(now * 1e9)
                c.sock.send(request)
            else:
                sel.unregister(c.sock)
                c.sock.close()
                active -= 1
    sel.close()
    return {
        "requests": requests,
        "total": total,
        "errors": errors,
        "reconnects": reconnects,
        "lat": lat.tobytes(),
        "issuers": issuers,
        "error_samples": error_samples,
    }


def run_load(spec: LoadSpec) -> LoadResult:
    """Run one load; raises BenchError if a worker fails (nothing is left running either way)."""
    ctx = mp.get_context("spawn")
    ready = ctx.Semaphore(0)
    start_at = ctx.Value("d", 0.0)
    out = ctx.Queue()
    procs = min(spec.procs, spec.connections)
    per = [spec.connections // procs + (1 if i < spec.connections % procs else 0) for i in range(procs)]
    workers = [ctx.Process(target=_worker, args=(spec, n, ready, start_at, out), daemon=True) for n in per]
    results: list[dict[str, Any]] = []
    try:
        for w in workers:
            w.start()
        deadline = time.monotonic() + 60
        for _ in workers:
            while not ready.acquire(timeout=0.2):
                if time.monotonic() > deadline or any(w.exitcode is not None for w in workers):
                    try:  # a worker that failed to connect says why
                        msg = out.get(timeout=2)
                    except queue.Empty:
                        msg = {}
                    raise BenchError(f"load workers did not get ready: {msg.get('fatal', 'timeout')}")
        start_at.value = time.monotonic() + 0.05
        limit = spec.warmup + spec.duration + _STALL_S + 30
        for _ in workers:
            r = out.get(timeout=limit)
            if "fatal" in r:
                raise BenchError(r["fatal"])
            results.append(r)
    finally:
        for w in workers:
            if w.pid is None:
                continue  # never started
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        out.close()
    lat = array("q")
    for r in results:
        lat.frombytes(r["lat"])
    return LoadResult(
        spec=spec,
        requests=sum(r["requests"] for r in results),
        total=sum(r["total"] for r in results),
        errors=sum(r["errors"] for r in results),
        reconnects=sum(r["reconnects"] for r in results),
        seconds=spec.duration,
        latencies_ms=sorted(v / 1e6 for v in lat),
        issuers=sorted({i for r in results for i in r["issuers"]}),
        error_samples=[s for r in results for s in r["error_samples"]][:5],
    )


def probe(spec: LoadSpec, timeout: float = 15.0) -> tuple[int, str, bytes]:
    """One verified request over a fresh connection: (status, certificate issuer, body). Raises on failure."""
    ctx = ssl.create_default_context(cafile=spec.cafile)
    tls = _open(spec, ctx, timeout)
    try:
        issuer = _issuer(tls)
        tls.setblocking(True)
        tls.settimeout(timeout)
        tls.sendall(_request_bytes(spec))
        buf = b""
        while (parsed := _parse(buf)) is None:
            chunk = tls.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a complete response: {buf[:200]!r}")
            buf += chunk
        status, length, _close = parsed
        return status, issuer, buf[buf.find(b"\r\n\r\n") + 4 : length]
    finally:
        tls.close()
