"""Running the same load against several peers in alternating rounds, and summarising what each achieved."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from ._common import (
    BENCH_PATH,
    LOOPBACK,
    UPSTREAM_HOST,
    BenchError,
    Service,
    cpu_count,
    cpu_seconds,
    percentile,
    print_table,
    rnd,
)
from ._load import LoadResult, LoadSpec, probe, run_load


def proxied_spec(args: Any, cafile: str, upstream_port: int, proxy_port: int) -> LoadSpec:
    """The closed-loop HTTPS load every proxy bench runs: the bench host and path through an explicit proxy on
    loopback, sized by the common command-line options."""
    return LoadSpec(
        host=UPSTREAM_HOST,
        port=upstream_port,
        path=BENCH_PATH,
        cafile=cafile,
        proxy=(LOOPBACK, proxy_port),
        connections=args.connections,
        duration=args.duration,
        warmup=args.warmup_s,
        procs=args.client_procs,
    )


def run_header(name: str, args: Any) -> dict[str, Any]:
    """The first fields of a proxy bench's results: what ran and on how many CPUs."""
    return {
        "bench": name,
        "rules": args.rules,
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup_s,
        "rounds": args.rounds,
        "cpus": cpu_count(),
    }


@dataclass
class Peer:
    name: str
    spec: LoadSpec
    service: Service | None  # the proxy whose CPU time is charged to this peer (None: direct)
    expect_issuer: str  # organisation of the CA that must have signed the certificate the client saw
    results: list[LoadResult] = field(default_factory=list)
    cpu_s: float = 0.0
    error: str | None = None  # the run that failed (the peer is skipped in later rounds)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.results)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def total(self) -> int:
        return sum(r.total for r in self.results)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.results)

    @property
    def reconnects(self) -> int:
        return sum(r.reconnects for r in self.results)

    def latencies(self) -> list[float]:
        return sorted(v for r in self.results for v in r.latencies_ms)

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.total * 1e6 if self.total and self.service is not None else math.nan


def preflight(peer: Peer) -> None:
    """One verified request: right status, right certificate issuer, the upstream's body."""
    try:
        status, issuer, body = probe(peer.spec)
    except Exception as e:
        detail = f"\n{peer.service.tail()}" if peer.service is not None else ""
        raise BenchError(f"{peer.name}: preflight request failed: {type(e).__name__}: {e}{detail}") from e
    if status != 200 or b"cube-egress-bench" not in body:
        raise BenchError(f"{peer.name}: preflight got status {status}: {body[:200]!r}")
    if issuer != peer.expect_issuer:
        raise BenchError(f"{peer.name}: certificate issued by {issuer!r}, expected {peer.expect_issuer!r}")


def run_rounds(
    peers: list[Peer], rounds: int, around: Callable[[Peer], AbstractContextManager[object]] | None = None
) -> None:
    """Every peer once per round; odd rounds in reverse order, so slow drift (thermal, caches) hits all alike.

    A peer whose run fails (stalls, refuses, dies) is reported as failed and skipped from then on; the others
    still run, so one broken peer does not hide the figures of the rest. `around(peer)`, if given, is entered
    just before each of that peer's load runs and left just after it (e.g. to count what a backend served).
    """
    for r in range(rounds):
        order = peers if r % 2 == 0 else list(reversed(peers))
        for peer in order:
            if peer.error is not None:
                continue
            try:
                with around(peer) if around is not None else contextlib.nullcontext():
                    _run_once(peer, r)
            except BenchError as e:
                peer.error = str(e).strip().splitlines()[0]
                print(f"  round {r + 1} {peer.name:<12} FAILED: {peer.error}", flush=True)
                if peer.service is not None:
                    tail = peer.service.tail(8)
                    if tail:
                        print("    " + tail.replace("\n", "\n    "), flush=True)


def _run_once(peer: Peer, r: int) -> None:
    if peer.service is not None:
        peer.service.check_alive()
    before = cpu_seconds(peer.service.proc.pid) if peer.service is not None else 0.0
    result = run_load(peer.spec)
    if peer.service is not None:
        peer.cpu_s += cpu_seconds(peer.service.proc.pid) - before
    bad = [i for i in result.issuers if i != peer.expect_issuer]
    if bad:
        raise BenchError(f"{peer.name}: certificates issued by {bad}, expected {peer.expect_issuer!r}")
    if result.requests == 0:
        raise BenchError(f"{peer.name}: no successful request ({result.error_samples})")
    peer.results.append(result)
    print(
        f"  round {r + 1} {peer.name:<12} {result.rps:>9,.0f} req/s  p50 {result.pct(50):7.2f} ms  "
        f"p99 {result.pct(99):7.2f} ms  errors {result.errors}  reconnects {result.reconnects}",
        flush=True,
    )


def summary(peers: list[Peer], title: str) -> None:
    rows: list[tuple[Any, ...]] = []
    for p in peers:
        if p.error is not None:
            rows.append((p.name, "FAILED", "", "", "", "", "", "", "", p.error[:60]))
            continue
        lat = p.latencies()
        rows.append(
            (
                p.name,
                p.rps,
                percentile(lat, 50),
                percentile(lat, 90),
                percentile(lat, 99),
                p.requests,
                p.errors,
                p.reconnects,
                p.cpu_us_per_request,
                p.expect_issuer,
            )
        )
    print_table(
        [
            "peer",
            "req/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "requests",
            "errors",
            "reconn",
            "proxy CPU us/req",
            "cert issuer",
        ],
        rows,
        title=title,
    )


def figures(peer: Peer) -> dict[str, Any]:
    if peer.error is not None:
        return {f"{peer.name}_error": peer.error}
    lat = peer.latencies()
    return {
        f"{peer.name}_rps": rnd(peer.rps, 1),
        f"{peer.name}_p50_ms": rnd(percentile(lat, 50)),
        f"{peer.name}_p99_ms": rnd(percentile(lat, 99)),
        f"{peer.name}_errors": peer.errors,
        f"{peer.name}_cpu_us_per_req": rnd(peer.cpu_us_per_request, 1),
    }
