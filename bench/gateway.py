"""`python -m bench gateway`: intercepted HTTPS through the gateway vs. through bare mitmproxy.

Both proxies run as their own processes with the same mitmproxy, the same interception CA and the same options
(regular/explicit mode, lazy connection strategy, upstream TLS verified against the bench CA); the gateway adds
its addon and a policy of `--rules` rules (1,000 by default), one of which allows the bench upstream with a
method/path condition, so every connection is intercepted and every request decided and audited. The upstream is
nginx (TLS, keep-alive, a small static body), much faster than either proxy. The client keeps `--connections`
keep-alive connections busy (one request in flight each) and trusts only the interception CA.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import _compare, _servers
from ._common import (
    BENCH_PATH,
    INTERCEPT_CA_ORG,
    UPSTREAM_HOST,
    Services,
    cpu_count,
    make_pki,
    percentile,
    rnd,
)
from ._load import LoadSpec

TARGET_RATIO = 0.90


def count_audit(path: Path, *, host: str, intercepted: bool, phase: str) -> int:
    """Decision records the gateway wrote for `host` (what it decided, intercepted or spliced)."""
    n = 0
    try:
        with open(path, "rb") as f:
            for line in f:
                r = json.loads(line)
                if (
                    r.get("event") == "decision"
                    and r.get("host") == host
                    and r.get("phase") == phase
                    and bool(r.get("intercepted")) is intercepted
                    and r.get("verdict") == "allow"
                ):
                    n += 1
    except OSError:
        return -1
    return n


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    pki = make_pki(workdir / "pki")
    services = Services(workdir)
    try:
        nginx = _servers.start_nginx(services, workdir, pki)
        gateway = _servers.start_gateway(services, workdir, pki, nginx.port, args.rules)
        mitm = _servers.start_mitmproxy(services, workdir, pki)

        def spec(proxy_port: int) -> LoadSpec:
            return _compare.proxied_spec(args, str(pki.intercept_ca_cert), nginx.port, proxy_port)

        peers = [
            _compare.Peer("gateway", spec(gateway.port), gateway.svc, INTERCEPT_CA_ORG),
            _compare.Peer("mitmproxy", spec(mitm.port), mitm.svc, INTERCEPT_CA_ORG),
        ]
        print(
            f"intercepted HTTPS GET https://{UPSTREAM_HOST}:{nginx.port}{BENCH_PATH} through an explicit proxy "
            f"(CONNECT, TLS to the client and to nginx); {args.connections} keep-alive connections, one request in "
            f"flight each; {args.rounds} rounds x {args.duration:g}s measured (+{args.warmup_s:g}s warm-up) per "
            f"peer, alternating order; gateway policy {args.rules} rules; {cpu_count()} CPUs shared by client "
            f"({args.client_procs} process), proxy and nginx",
            flush=True,
        )
        for p in peers:
            _compare.preflight(p)
        audit = _servers.gateway_audit(workdir)
        before = count_audit(audit, host=UPSTREAM_HOST, intercepted=True, phase="request")
        _compare.run_rounds(peers, args.rounds)
        audited = count_audit(audit, host=UPSTREAM_HOST, intercepted=True, phase="request") - before
    finally:
        services.close()

    gw, base = peers
    _compare.summary(peers, "intercepted HTTPS, keep-alive")
    ok = gw.error is None and base.error is None
    ratio = gw.rps / base.rps if ok and base.rps else 0.0
    if gw.error is None:
        print(
            f"\ngateway audited {audited:,} intercepted requests for the {gw.total:,} responses the client got "
            f"through it ({'all' if audited == gw.total else 'MISMATCH'})"
        )
    verdict = "met" if ok and ratio >= TARGET_RATIO else "MISSED" if ok else "NOT MEASURED (a peer failed)"
    print(f"target: gateway/mitmproxy req/s >= {TARGET_RATIO} (got {ratio:.3f}): {verdict}")
    out: dict[str, Any] = _compare.run_header("gateway", args)
    out.update(_compare.figures(gw))
    out.update(_compare.figures(base))
    if ok:
        out["ratio_rps_gateway_vs_mitmproxy"] = rnd(ratio)
        out["ratio_p50_gateway_vs_mitmproxy"] = rnd(percentile(gw.latencies(), 50) / percentile(base.latencies(), 50))
        out["gateway_audited_all"] = audited == gw.total
    out["target_ratio"] = TARGET_RATIO
    out["meets_target"] = ok and ratio >= TARGET_RATIO
    return out
