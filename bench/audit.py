"""`python -m bench audit`: what the audit ledger costs the gateway, by durability mode.

Four gateways with the same `--rules` policy (1,000 by default), the same bench rule and the same nginx upstream,
under the load of `bench gateway` (intercepted HTTPS, `--connections` keep-alive connections, one request in
flight each), differing only in their `audit:` section:

* `noaudit`: the baseline. `python -m bench._gateway_noaudit`: the real gateway with every record discarded at the
  door (no line built, hashed, written or fsynced). Bench-only: the product has no switch for this.
* `none`: the chain (seq, prev, checkpoints every 1,000 records, Ed25519-signed) written with write(), never fsynced.
* `batched`: the same, plus an fsync by the writer thread at most every `batch_ms` (5 ms, the default).
* `strict`: the same, fsync as soon as there is something to fsync, and every response waits until its record
  is on disk (group commit: one fsync covers every record written while the previous one ran).

Ratios are req/s against `noaudit`, measured in the same run (rounds alternate the order of the peers). Each
audited gateway is stopped cleanly at the end; it logs its audit figures (records, fsyncs), which give fsyncs per
request, and its chain is verified (`verify_files`, signatures checked with its key).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gateway.audit import SigningKey, chain_files, verify_files

from . import _compare, _servers
from ._common import BENCH_PATH, INTERCEPT_CA_ORG, UPSTREAM_HOST, Services, cpu_count, make_pki, rnd
from ._load import LoadSpec
from .gateway import count_audit

MODES = ("strict", "batched", "none")
NOAUDIT_MODULE = "bench._gateway_noaudit"
_STATS_MARK = "audit log closed: "


def _audit_stats(log: Path) -> dict[str, Any] | None:
    """The figures a gateway logs when it closes its audit log (gateway/server.py)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        _, mark, rest = line.partition(_STATS_MARK)
        if mark:
            stats: dict[str, Any] = json.loads(rest)
            return stats
    return None


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    pki = make_pki(workdir / "pki")
    services = Services(workdir)
    stats: dict[str, dict[str, Any] | None] = {}
    served: dict[str, int] = {}
    chains: dict[str, str] = {}
    try:
        nginx = _servers.start_nginx(services, workdir, pki)
        gateways = {
            mode: _servers.start_gateway(
                services, workdir, pki, nginx.port, args.rules, name=mode, audit={"durability": mode}
            )
            for mode in MODES
        }
        gateways["noaudit"] = _servers.start_gateway(
            services, workdir, pki, nginx.port, args.rules, name="noaudit", module=NOAUDIT_MODULE
        )

        def spec(port: int) -> LoadSpec:
            return _compare.proxied_spec(args, str(pki.intercept_ca_cert), nginx.port, port)

        peers = [_compare.Peer(n, spec(g.port), g.svc, INTERCEPT_CA_ORG) for n, g in gateways.items()]
        print(
            f"intercepted HTTPS GET https://{UPSTREAM_HOST}:{nginx.port}{BENCH_PATH} through four gateways that "
            f"differ only in audit durability (strict, batched, none; noaudit discards records); "
            f"{args.connections} keep-alive connections, one request in flight each; {args.rounds} rounds x "
            f"{args.duration:g}s measured (+{args.warmup_s:g}s warm-up) per peer, alternating order; policy "
            f"{args.rules} rules; {cpu_count()} CPUs shared by client, gateways and nginx",
            flush=True,
        )
        for p in peers:
            _compare.preflight(p)
        _compare.run_rounds(peers, args.rounds)
        for mode in MODES:
            svc = gateways[mode].svc
            services.stop(svc, timeout=30)  # SIGINT: a clean shutdown logs the audit figures
            stats[mode] = _audit_stats(svc.log)
            audit_file = _servers.gateway_audit(workdir, mode)
            served[mode] = count_audit(audit_file, host=UPSTREAM_HOST, intercepted=True, phase="request")
            key = SigningKey.load(str(_servers.gateway_state(workdir, mode) / "audit-signing-key.pem"))
            report = verify_files(chain_files(str(audit_file)), [key.public])
            chains[mode] = "ok" if report.ok and report.closed else f"FAILED: {report.problem}"
    finally:
        services.close()

    by_name = {p.name: p for p in peers}
    base = by_name["noaudit"]
    _compare.summary(peers, "intercepted HTTPS, keep-alive, by audit durability")
    out: dict[str, Any] = _compare.run_header("audit", args)
    for p in peers:
        out.update(_compare.figures(p))
    print("\naudit figures (whole run, warm-up and preflight included)")
    for mode in MODES:
        peer, st = by_name[mode], stats.get(mode)
        if peer.error is None and base.error is None and base.rps:
            out[f"ratio_rps_{mode}_vs_noaudit"] = rnd(peer.rps / base.rps)
        n = served.get(mode, 0)
        if st is not None and n > 0:
            out[f"{mode}_fsyncs_per_request"] = rnd(st["fsyncs"] / n, 4)
            out[f"{mode}_records_per_request"] = rnd(st["records"] / n, 3)
        else:
            out[f"{mode}_stats_error"] = "no audit figures in the gateway's log"
        out[f"{mode}_chain"] = chains.get(mode, "not verified")
        ratio = out.get(f"ratio_rps_{mode}_vs_noaudit")
        print(
            f"  {mode:<8} req/s vs noaudit {ratio if ratio is not None else '-'}; "
            f"fsyncs/request {out.get(f'{mode}_fsyncs_per_request', '-')}; "
            f"records {st['records'] if st else '-'} for {n} requests served; chain {out[f'{mode}_chain']}"
        )
        if not chains.get(mode, "").startswith("ok"):
            out[f"{mode}_chain_error"] = out[f"{mode}_chain"]
    return out
