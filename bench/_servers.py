"""The processes a load benchmark runs: the nginx upstream, the gateway, bare mitmproxy and squid.

Each is our own instance on loopback with a config in the benchmark's temp dir (never a system service), started
through `Services` so it is stopped at the end whatever happens.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import sys
import tempfile
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


def _need(binary: str) -> str:
    candidates = (f"/usr/sbin/{binary}", f"/sbin/{binary}")
    path = shutil.which(binary) or next((p for p in candidates if os.path.exists(p)), None)
    if path is None:
        raise BenchError(f"{binary} is not installed (bash scripts/setup.sh installs it)")
    return path


# -- nginx: the upstream ---------------------------------------------------------------------------------------


def start_nginx(services: Services, workdir: Path, pki: BenchPKI) -> Running:
    """One single-process nginx serving UPSTREAM_BODY over TLS for both bench names (far faster than a proxy)."""
    nginx = _need("nginx")
    root = workdir / "nginx"
    root.mkdir()
    port = free_port()
    body = UPSTREAM_BODY.replace("\\", "\\\\").replace('"', '\\"')
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
    keepalive_timeout 120s;
    server {{
        listen {LOOPBACK}:{port} ssl;
        server_name {UPSTREAM_HOST} {SPLICE_HOST};
        ssl_certificate {pki.upstream_cert};
        ssl_certificate_key {pki.upstream_cert};
        location / {{
            default_type application/json;
            return 200 "{body}";
        }}
    }}
}}
"""
    )
    svc = services.start("nginx", [nginx, "-e", str(root / "error.log"), "-p", str(root), "-c", str(conf)])
    wait_listening(svc, port)
    return Running(svc, port)


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


def start_gateway(services: Services, workdir: Path, pki: BenchPKI, upstream_port: int, n_rules: int) -> Running:
    root = workdir / "gateway"
    root.mkdir()
    doc, _spec = _policygen.generate(n_rules, extra_rules=bench_rules(upstream_port))
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
    cfg = root / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    exe = VENV_BIN / "cube-egress"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "gateway.cli"]
    svc = services.start("gateway", [*argv, "run", "--config", str(cfg)], cwd=REPO, stop_signal=signal.SIGINT)
    wait_listening(svc, port, timeout=120)  # loading a large policy takes a while
    return Running(svc, port)


def gateway_audit(workdir: Path) -> Path:
    return workdir / "gateway" / "state" / "audit.jsonl"


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
