"""`python -m bench secrets`: what injecting a credential from OpenBao costs an intercepted request.

Two gateways with the same `--rules` policy (1,000 by default) and the same bench rule (`bench.example.test`,
`GET` + path prefix, `schemes: [https]`), intercepted HTTPS through the same nginx and the same load as
`bench gateway`:

* `plain`: the rule carries no credential and the config has no `secrets:` section (the `bench gateway` setup).
* `injected`: the rule carries `credential: bench-api` (`secret: bench/api#token`, header injector
  `Authorization: Bearer {secret}`) and the config reads secrets from a real OpenBao dev server on loopback
  (`backend: vault`, token auth from `VAULT_TOKEN`, `cache_ttl_s: 300`).

OpenBao runs with a file audit device, so every request it serves is counted; the count is taken just before and
just after each `injected` load run (warm-up included), which gives Vault requests per proxied request (target: 0,
the gateway answers from its cache and refreshes in the background). Injection is checked end to end: nginx
answers 401 unless a request to the `injected` port carries exactly `Bearer <value>` and a request to the `plain`
port carries no Authorization header, and every audit record of the `injected` gateway must name the credential
with the fingerprint HMAC(gateway key, value).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets as pysecrets
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _compare, _policygen, _servers
from ._common import (
    BENCH_PATH,
    INTERCEPT_CA_ORG,
    UPSTREAM_HOST,
    Services,
    cpu_count,
    make_pki,
    percentile,
    rnd,
    wait_listening,
)
from ._load import LoadSpec

CREDENTIAL = "bench-api"
SECRET_PATH = "bench/api"
SECRET_FIELD = "token"
CACHE_TTL_S = 300.0
TARGET_VAULT_REQUESTS_PER_REQUEST = 0.0
_HEX32 = re.compile(r"[0-9a-f]{32}")


def _rules(upstream_port: int, credential: str | None) -> list[dict[str, Any]]:
    """`bench_rules` with the intercepted rule restricted to https (a credential is refused on a rule that allows
    plain http; the `plain` gateway gets the same restriction so that the two rules differ only by the credential)."""
    rules = _servers.bench_rules(upstream_port)
    rules[0]["schemes"] = ["https"]
    if credential is not None:
        rules[0]["credential"] = credential
    return rules


def _generated_secrets(n_rules: int) -> list[str]:
    """The secret paths the generated part of the policy names (its credential rules): written to OpenBao too, so
    the `injected` gateway starts without warnings and caches them, as a real deployment would."""
    doc, _spec = _policygen.generate(n_rules, extra_rules=_rules(1, None))
    return sorted({c["secret"] for c in doc.get("credentials", {}).values()})


def audit_summary(path: Path, *, port: int) -> dict[str, Any]:
    """The intercepted request records the gateway wrote for the bench name on `port`: how many, their credential,
    fingerprints and upstream statuses."""
    n = 0
    credentials: Counter[str | None] = Counter()
    fingerprints: Counter[str | None] = Counter()
    statuses: Counter[int | None] = Counter()
    try:
        with open(path, "rb") as f:
            for line in f:
                r = json.loads(line)
                if (
                    r.get("event") == "decision"
                    and r.get("host") == UPSTREAM_HOST
                    and r.get("port") == port
                    and r.get("phase") == "request"
                    and r.get("intercepted") is True
                ):
                    n += 1
                    credentials[r.get("credential")] += 1
                    fingerprints[r.get("credential_fingerprint")] += 1
                    statuses[r.get("upstream_status")] += 1
    except OSError:
        return {"records": -1, "credentials": credentials, "fingerprints": fingerprints, "statuses": statuses}
    return {"records": n, "credentials": credentials, "fingerprints": fingerprints, "statuses": statuses}


def _settled_records(path: Path, *, port: int, minimum: int, timeout: float = 5.0) -> int:
    """The record count once the gateway has written at least `minimum` and nothing more arrives: it writes a
    request's record after the response went out, so a count taken right after a request may miss it."""
    deadline = time.monotonic() + timeout
    last = int(audit_summary(path, port=port)["records"])
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = int(audit_summary(path, port=port)["records"])
        if now == last and now >= minimum:
            return now
        last = now
    return last


def _non2xx(statuses: Counter[int | None]) -> int:
    return sum(c for s, c in statuses.items() if s is None or not 200 <= s < 300)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    pki = make_pki(workdir / "pki")
    services = Services(workdir)
    root_token = f"bench-root-{pysecrets.token_hex(8)}"
    value = f"cxe-bench-{pysecrets.token_hex(16)}"  # the secret the gateway injects; nginx demands exactly it
    vault_windows: dict[str, list[str]] = {"plain": [], "injected": []}
    try:
        bao = _servers.start_openbao(services, workdir, root_token)
        bao.kv_put(SECRET_PATH, {SECRET_FIELD: value})
        for path in _generated_secrets(args.rules):
            bao.kv_put(path, {"value": f"cxe-bench-{pysecrets.token_hex(16)}"})
        nginx = _servers.start_nginx(services, workdir, pki, bearer=value)
        assert nginx.auth_port is not None
        plain_gw = _servers.start_gateway(
            services, workdir, pki, nginx.port, args.rules, name="gateway-plain", rules=_rules(nginx.port, None),
            wait=False,
        )  # fmt: skip
        vault_before_start = len(bao.audited_requests())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        env["VAULT_TOKEN"] = root_token
        injected_gw = _servers.start_gateway(
            services,
            workdir,
            pki,
            nginx.auth_port,
            args.rules,
            name="gateway-injected",
            rules=_rules(nginx.auth_port, CREDENTIAL),
            credentials={
                CREDENTIAL: {
                    "secret": f"{SECRET_PATH}#{SECRET_FIELD}",
                    "injector": {"kind": "header", "header": "Authorization", "format": "Bearer {secret}"},
                }
            },
            secrets={
                "backend": "vault",
                "vault": {"address": bao.address, "auth": {"method": "token"}},
                "cache_ttl_s": CACHE_TTL_S,
            },
            env=env,
        )
        wait_listening(plain_gw.svc, plain_gw.port, timeout=120)
        vault_at_start = bao.audited_requests()[vault_before_start:]

        def spec(proxy_port: int, upstream_port: int) -> LoadSpec:
            return _compare.proxied_spec(args, str(pki.intercept_ca_cert), upstream_port, proxy_port)

        peers = [
            _compare.Peer("plain", spec(plain_gw.port, nginx.port), plain_gw.svc, INTERCEPT_CA_ORG),
            _compare.Peer("injected", spec(injected_gw.port, nginx.auth_port), injected_gw.svc, INTERCEPT_CA_ORG),
        ]
        print(
            f"intercepted HTTPS GET https://{UPSTREAM_HOST}{BENCH_PATH} through two gateways with the same "
            f"{args.rules}-rule policy: 'plain' (the bench rule without credential) and 'injected' (the rule with "
            f"credential {CREDENTIAL}: {SECRET_PATH}#{SECRET_FIELD} from OpenBao as 'Authorization: Bearer', "
            f"cache_ttl_s {CACHE_TTL_S:g}); nginx answers 401 unless the header is exactly what each should get; "
            f"{args.connections} keep-alive connections, one request in flight each; {args.rounds} rounds x "
            f"{args.duration:g}s measured (+{args.warmup_s:g}s warm-up) per peer, alternating order; {cpu_count()} "
            f"CPUs shared by client ({args.client_procs} process), gateway, nginx and OpenBao",
            flush=True,
        )
        print(
            f"OpenBao served {len(vault_at_start)} requests while the injected gateway started "
            f"({', '.join(f'{p} x{c}' for p, c in sorted(Counter(vault_at_start).items())) or 'none'})",
            flush=True,
        )
        for p in peers:
            _compare.preflight(p)

        @contextlib.contextmanager
        def count_vault(peer: _compare.Peer) -> Iterator[None]:
            before = len(bao.audited_requests())
            try:
                yield
            finally:
                vault_windows[peer.name] += bao.audited_requests()[before:]

        audits = {
            "plain": _servers.gateway_audit(workdir, "gateway-plain"),
            "injected": _servers.gateway_audit(workdir, "gateway-injected"),
        }
        ports = {"plain": nginx.port, "injected": nginx.auth_port}
        before = {name: _settled_records(audits[name], port=ports[name], minimum=1) for name in audits}  # preflight
        _compare.run_rounds(peers, args.rounds, around=count_vault)
    finally:
        services.close()
    # Counted once the gateways have stopped, so every record of the last run is written.
    after = {name: audit_summary(audits[name], port=ports[name]) for name in audits}
    key_file = _servers.gateway_state(workdir, "gateway-injected") / "fingerprint.key"
    key = key_file.read_bytes() if key_file.is_file() else b""

    plain, injected = peers
    _compare.summary(peers, "intercepted HTTPS, keep-alive: without and with credential injection")
    ok = plain.error is None and injected.error is None
    ratio = injected.rps / plain.rps if ok and plain.rps else 0.0

    # Vault requests during the injected runs, per response the client got through that gateway in them.
    vault_requests = len(vault_windows["injected"])
    per_request = vault_requests / injected.total if injected.total else float("nan")
    print(
        f"\nOpenBao requests during the injected runs: {vault_requests} for {injected.total:,} proxied requests "
        f"({per_request:.6f} per request)"
        + (f": {dict(Counter(vault_windows['injected']))}" if vault_requests else "")
        + f"; during the plain runs: {len(vault_windows['plain'])}"
    )

    # Injection really happened, and only where it should.
    expected_fp = hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]
    inj, pla = after["injected"], after["plain"]
    problems: list[str] = []
    inj_with_cred = inj["credentials"][CREDENTIAL]
    inj_fp_ok = inj["fingerprints"][expected_fp]
    if not _HEX32.fullmatch(expected_fp) or inj["records"] <= 0:
        problems.append("no audit records from the injected gateway")
    if inj_with_cred != inj["records"]:
        problems.append(f"{inj['records'] - inj_with_cred} injected-gateway records without credential {CREDENTIAL}")
    if inj_fp_ok != inj["records"]:
        problems.append(
            f"{inj['records'] - inj_fp_ok} injected-gateway records without the expected fingerprint "
            f"(seen: {sorted(str(k) for k in inj['fingerprints'])[:3]})"
        )
    if pla["credentials"][None] != pla["records"] or pla["fingerprints"][None] != pla["records"]:
        problems.append("plain-gateway records name a credential or fingerprint")
    non2xx = {"plain": _non2xx(pla["statuses"]), "injected": _non2xx(inj["statuses"])}
    for name, n in non2xx.items():
        if n:
            problems.append(f"{n} non-2xx upstream answers through the {name} gateway (nginx's header check)")
    audited = {name: after[name]["records"] - before[name] for name in after}
    for p in peers:
        if p.error is None and audited[p.name] != p.total:
            problems.append(f"{p.name}: {audited[p.name]} audit records for {p.total} responses")
    print(
        f"injected gateway audit: {inj['records']:,} request records, {inj_with_cred:,} name {CREDENTIAL}, "
        f"{inj_fp_ok:,} carry fingerprint {expected_fp} (= HMAC of the value with the gateway key), "
        f"{non2xx['injected']} non-2xx upstream answers; plain gateway: {pla['records']:,} records, "
        f"{non2xx['plain']} non-2xx"
    )
    print("injection verified" if not problems else "injection NOT verified: " + "; ".join(problems))
    met = ok and not problems and per_request <= TARGET_VAULT_REQUESTS_PER_REQUEST
    verdict = "met" if met else "MISSED" if ok and not problems else "NOT MEASURED"
    print(
        f"injection cost: injected/plain req/s {ratio:.3f}; target: Vault requests per proxied request "
        f"<= {TARGET_VAULT_REQUESTS_PER_REQUEST:g} (got {per_request:.6f}): {verdict}"
    )

    out: dict[str, Any] = {**_compare.run_header("secrets", args), "cache_ttl_s": CACHE_TTL_S}
    out.update(_compare.figures(plain))
    out.update(_compare.figures(injected))
    if ok:
        out["ratio_rps_injected_vs_plain"] = rnd(ratio)
        out["ratio_p50_injected_vs_plain"] = rnd(
            percentile(injected.latencies(), 50) / percentile(plain.latencies(), 50)
        )
        out["ratio_p99_injected_vs_plain"] = rnd(
            percentile(injected.latencies(), 99) / percentile(plain.latencies(), 99)
        )
    out["vault_requests_at_gateway_start"] = len(vault_at_start)
    out["vault_requests_injected_runs"] = vault_requests
    out["vault_requests_plain_runs"] = len(vault_windows["plain"])
    out["injected_proxied_requests"] = injected.total
    out["vault_requests_per_request"] = rnd(per_request, 6)
    out["injected_audit_records"] = inj["records"]
    out["injected_audit_with_credential"] = inj_with_cred
    out["injected_audit_fingerprint_ok"] = inj_fp_ok
    out["injected_upstream_non2xx"] = non2xx["injected"]
    out["plain_upstream_non2xx"] = non2xx["plain"]
    out["injection_verified"] = not problems
    if problems and ok:
        out["injection_error"] = problems[0]
    out["target_vault_requests_per_request"] = TARGET_VAULT_REQUESTS_PER_REQUEST
    out["meets_target"] = met
    return out
