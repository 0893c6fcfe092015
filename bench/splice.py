"""`python -m bench splice`: spliced connections through the gateway vs. intercepted ones, and vs. squid.

An allowed host whose rule has no request conditions and no credential is spliced: the gateway checks the CONNECT
(identity, policy, its own DNS answer) and then relays the TLS bytes without terminating them. The client trusts
only the bench upstream CA for the spliced, squid and direct runs, so a run that was intercepted by mistake fails
its handshake; it trusts only the interception CA for the intercepted run. squid 5 (`squid -N`, our own instance)
does CONNECT with an equivalent allowlist (dstdomain, port, loopback source, hosts_file). Two references without
targets: bare mitmproxy passing the same name through (`ignore_hosts`: what mitmproxy's relay costs without our
addon), and a direct run (no proxy: what the client and nginx do alone on this machine).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import _compare, _servers
from ._common import (
    BENCH_PATH,
    INTERCEPT_CA_ORG,
    LOOPBACK,
    SPLICE_HOST,
    UPSTREAM_CA_ORG,
    UPSTREAM_HOST,
    Services,
    cpu_count,
    make_pki,
    rnd,
)
from ._load import LoadSpec
from .gateway import count_audit

TARGET_VS_INTERCEPTED = 10.0
TARGET_VS_SQUID = 0.7


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    pki = make_pki(workdir / "pki")
    services = Services(workdir)
    try:
        nginx = _servers.start_nginx(services, workdir, pki)
        gateway = _servers.start_gateway(services, workdir, pki, nginx.port, args.rules)
        squid = _servers.start_squid(services, pki, nginx.port)
        mitm = _servers.start_mitmproxy(services, workdir, pki, passthrough=(SPLICE_HOST,))

        def spec(host: str, cafile: Path, proxy_port: int | None) -> LoadSpec:
            return LoadSpec(
                host=host,
                port=nginx.port,
                path=BENCH_PATH,
                cafile=str(cafile),
                proxy=(LOOPBACK, proxy_port) if proxy_port is not None else None,
                connections=args.connections,
                duration=args.duration,
                warmup=args.warmup_s,
                procs=args.client_procs,
            )

        spliced = _compare.Peer(
            "spliced", spec(SPLICE_HOST, pki.upstream_ca, gateway.port), gateway.svc, UPSTREAM_CA_ORG
        )
        squid_peer = _compare.Peer("squid", spec(SPLICE_HOST, pki.upstream_ca, squid.port), squid.svc, UPSTREAM_CA_ORG)
        intercepted = _compare.Peer(
            "intercepted", spec(UPSTREAM_HOST, pki.intercept_ca_cert, gateway.port), gateway.svc, INTERCEPT_CA_ORG
        )
        passthrough = _compare.Peer(
            "mitm_passthrough", spec(SPLICE_HOST, pki.upstream_ca, mitm.port), mitm.svc, UPSTREAM_CA_ORG
        )
        direct = _compare.Peer("direct", spec(SPLICE_HOST, pki.upstream_ca, None), None, UPSTREAM_CA_ORG)
        peers = [spliced, squid_peer, intercepted, passthrough, direct]
        print(
            f"HTTPS GET {BENCH_PATH} to nginx on {LOOPBACK}:{nginx.port}: spliced through the gateway "
            f"({SPLICE_HOST}), intercepted through the gateway ({UPSTREAM_HOST}), CONNECT through squid, passed "
            f"through by bare mitmproxy (ignore_hosts), and direct; "
            f"{args.connections} keep-alive connections, one request in flight each; {args.rounds} rounds x "
            f"{args.duration:g}s measured (+{args.warmup_s:g}s warm-up) per peer, alternating order; gateway policy "
            f"{args.rules} rules; {cpu_count()} CPUs shared by client ({args.client_procs} process), proxy and nginx",
            flush=True,
        )
        for p in peers:
            _compare.preflight(p)
        audit = _servers.gateway_audit(workdir)
        before = count_audit(audit, host=SPLICE_HOST, intercepted=False, phase="connection")
        leaked_before = count_audit(audit, host=SPLICE_HOST, intercepted=True, phase="request")
        _compare.run_rounds(peers, args.rounds)
        audited = count_audit(audit, host=SPLICE_HOST, intercepted=False, phase="connection") - before
        leaked = count_audit(audit, host=SPLICE_HOST, intercepted=True, phase="request") - leaked_before
    finally:
        services.close()

    _compare.summary(peers, "HTTPS keep-alive: spliced, squid CONNECT, intercepted, mitmproxy passthrough, direct")

    def ratio(a: _compare.Peer, b: _compare.Peer) -> float | None:
        return a.rps / b.rps if a.error is None and b.error is None and b.rps else None

    vs_intercepted = ratio(spliced, intercepted)
    vs_squid = ratio(spliced, squid_peer)
    vs_passthrough = ratio(spliced, passthrough)
    vs_direct = ratio(spliced, direct)
    connections = args.connections * len(spliced.results) + spliced.reconnects
    if spliced.error is None:
        print(
            f"\ngateway audited {audited} spliced connections for the {connections} the client opened, and {leaked} "
            f"intercepted requests for {SPLICE_HOST} (must be 0)"
        )

    def show(value: float | None, target: float | None = None) -> str:
        if value is None:
            return "NOT MEASURED (a peer failed)"
        return f"{value:.3f}" + ("" if target is None else " met" if value >= target else " MISSED")

    print(
        f"targets: spliced/intercepted >= {TARGET_VS_INTERCEPTED:g}: {show(vs_intercepted, TARGET_VS_INTERCEPTED)}; "
        f"spliced/squid >= {TARGET_VS_SQUID}: {show(vs_squid, TARGET_VS_SQUID)}; references: "
        f"spliced/mitmproxy-passthrough {show(vs_passthrough)}, spliced/direct {show(vs_direct)}"
    )
    spliced_confirmed = spliced.error is None and not leaked and audited == connections
    if spliced.error is None and not spliced_confirmed:
        print(f"WARNING: splice not confirmed by the audit ({audited} spliced connections, {leaked} intercepted)")
    out: dict[str, Any] = _compare.run_header("splice", args)
    for p in peers:
        out.update(_compare.figures(p))
    out["ratio_rps_spliced_vs_intercepted"] = rnd(vs_intercepted) if vs_intercepted is not None else None
    out["ratio_rps_spliced_vs_squid"] = rnd(vs_squid) if vs_squid is not None else None
    out["ratio_rps_spliced_vs_mitm_passthrough"] = rnd(vs_passthrough) if vs_passthrough is not None else None
    out["ratio_rps_spliced_vs_direct"] = rnd(vs_direct) if vs_direct is not None else None
    out["spliced_confirmed_by_audit"] = spliced_confirmed
    out["target_vs_intercepted"] = TARGET_VS_INTERCEPTED
    out["target_vs_squid"] = TARGET_VS_SQUID
    out["meets_targets"] = (
        spliced_confirmed
        and vs_intercepted is not None
        and vs_squid is not None
        and vs_intercepted >= TARGET_VS_INTERCEPTED
        and vs_squid >= TARGET_VS_SQUID
    )
    return out
