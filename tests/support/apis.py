"""Start :mod:`tests.support.fake_apis` in the world and observe what it received.

Usage::

    apis = start_fake_apis(
        world,
        ["api.openai.com", "api.anthropic.com", "s3.example.test", "*.s3.example.test", "auth.example.test",
         "api.oauth.example.test", "db-check.example.test"],
        "198.51.100.30",
        {"openai_key": "sk-real", "s3": {"access_key": AK, "secret_key": SK}, "oauth": {...}, "pg": {...}},
    )
    try:
        ...  # clients trust world.upstream_ca_pem; names resolve via the world's DNS (added here)
        assert apis.requests(host="api.openai.com")[-1]["headers"] ...
    finally:
        apis.stop()

or ``with start_fake_apis(...) as apis:``. ``expected`` is the server's JSON config (see the fake_apis docstring);
``expected["pg"]`` may be a :class:`~tests.support.postgres.Postgres` and is turned into its address.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .netns import NetnsThread, ensure_internet_ip, remove_internet_ip

if TYPE_CHECKING:
    from .world import World

__all__ = ["FakeApis", "add_dns", "remove_dns", "start_fake_apis"]

_SCRIPT = Path(__file__).resolve().parent / "fake_apis.py"


def add_dns(world: World, records: Mapping[str, str | Sequence[str]]) -> None:
    """Add/override A records in the running world's DNS server (effective from the next query)."""
    world.add_dns(records)


def remove_dns(world: World, names: Iterable[str]) -> None:
    """Remove records added with :func:`add_dns`."""
    world.remove_dns(*names)


class FakeApis:
    """A running fake_apis process. Attributes: ``ip``, ``names``, ``ports`` (TLS), ``plain_ports``, ``cert_path``
    (key + chain PEM, issued by ``world.upstream_ca``), ``config_path``, ``log_path``, ``proc``."""

    def __init__(
        self,
        world: World,
        names: Sequence[str],
        ip: str,
        ports: Sequence[int],
        plain_ports: Sequence[int],
        workdir: Path,
    ) -> None:
        self.world = world
        self.names = list(names)
        self.ip = ip
        self.ports = list(ports)
        self.plain_ports = list(plain_ports)
        self.workdir = workdir
        self.cert_path = workdir / "cert.pem"
        self.config_path = workdir / "config.json"
        self.log_path = workdir / "requests.jsonl"
        self.stderr_path = workdir / "stderr.log"
        self.proc: subprocess.Popen[str] | None = None
        self._added_ip = False
        self._dns_names: list[str] = []
        self._thread: NetnsThread | None = None

    def __enter__(self) -> FakeApis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation ----------------------------------------------------------------------------------------------

    def requests(
        self, *, host: str | None = None, path: str | None = None, service: str | None = None
    ) -> list[dict[str, Any]]:
        """Logged requests, oldest first, optionally filtered by host, path prefix or service name. Each has
        ``service, method, host, path, headers ([[name, value]...] as received), body_len, body_sha256, body, status,
        client, tls, sni, time`` (see fake_apis). Lines are written before the response is sent."""
        if not self.log_path.is_file():
            return []
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            if host is not None and entry["host"] != host.lower():
                continue
            if path is not None and not entry["path"].startswith(path):
                continue
            if service is not None and entry["service"] != service:
                continue
            out.append(entry)
        return out

    @staticmethod
    def header(entry: Mapping[str, Any], name: str) -> str | None:
        """First value of header ``name`` (case-insensitive) in a logged request, or None."""
        for k, v in entry["headers"]:
            if k.lower() == name.lower():
                return str(v)
        return None

    def clear_log(self) -> None:
        with open(self.log_path, "w"):
            pass

    def url(self, name: str, path: str = "/", port: int | None = None) -> str:
        port = port or self.ports[0]
        return f"https://{name}{'' if port == 443 else f':{port}'}{path}"

    # -- OAuth control (direct, from the internet namespace: bypasses any gateway) --------------------------------

    def _admin(self, method: str, path: str, host: str = "auth.example.test") -> dict[str, Any]:
        if self._thread is None:
            self._thread = NetnsThread(self.world, "internet")
        return self._thread.call(
            _https_json, self.ip, self.ports[0], host, method, path, str(self.world.upstream_ca_pem)
        )

    def oauth_stats(self, host: str = "auth.example.test") -> dict[str, Any]:
        """``GET /stats`` of the OAuth server: ``issued``, ``token_requests``, ``token_rejected``, ``resource_ok``,
        ``resource_rejected``, ``active``... (this request itself is logged as well)."""
        return self._admin("GET", "/stats", host)

    def oauth_expire_all(self, host: str = "auth.example.test") -> int:
        """Expire every issued token now: a deterministic way to test refresh without waiting ``expires_in``."""
        return int(self._admin("POST", "/admin/expire", host)["expired"])

    # -- lifecycle ----------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the server; remove the DNS names and the address it added. Idempotent."""
        if self._thread is not None:
            self._thread.close()
            self._thread = None
        if self.proc is not None:
            self.world.stop(self.proc)
            self.proc = None
        if self._dns_names:
            with contextlib.suppress(Exception):
                self.world.remove_dns(*self._dns_names)
            self._dns_names = []
        if self._added_ip:
            remove_internet_ip(self.world, self.ip)
            self._added_ip = False


def start_fake_apis(
    world: World,
    names: Sequence[str],
    ip: str,
    expected: Mapping[str, Any],
    *,
    ports: Sequence[int] = (443,),
    plain_ports: Sequence[int] = (),
    dns: bool = True,
    timeout: float = 20,
) -> FakeApis:
    """Issue a certificate for ``names`` (+ the IP) from ``world.upstream_ca``, give ``ip`` to the internet
    namespace (if new), write ``expected`` as the server config, start fake_apis there with the venv interpreter,
    wait for its READY line (every socket bound), and, with ``dns=True``, point ``names`` at ``ip`` in the world's
    DNS. Returns the handle; :meth:`FakeApis.stop` undoes all of it (the world's close also kills the process).
    """
    workdir = world.workdir / f"fake-apis-{ip}-{time.monotonic_ns()}"
    workdir.mkdir(parents=True)
    apis = FakeApis(world, names, ip, ports, plain_ports, workdir)
    try:
        apis._added_ip = ensure_internet_ip(world, ip)
        world.upstream_ca.issue_cert(*names, ip).private_key_and_cert_chain_pem.write_to_path(str(apis.cert_path))
        config = dict(expected)
        pg = config.get("pg")
        if pg is not None and not isinstance(pg, Mapping):  # a Postgres handle
            config["pg"] = {"host": pg.ip, "port": pg.port, "database": pg.database, "psql": str(pg.bindir / "psql")}
        apis.config_path.write_text(json.dumps(config))
        apis.log_path.touch()
        argv = [sys.executable, str(_SCRIPT), "--config", str(apis.config_path), "--log", str(apis.log_path)]
        if ports:
            argv += ["--cert", str(apis.cert_path)]
        argv += [x for p in ports for x in ("--listen", f"{ip}:{p}")]
        argv += [x for p in plain_ports for x in ("--plain", f"{ip}:{p}")]
        with open(apis.stderr_path, "w") as err:
            apis.proc = world.popen("internet", argv, stdout=subprocess.PIPE, stderr=err, text=True)
        _wait_ready(apis.proc, apis.stderr_path, argv, timeout)
        if dns:
            world.add_dns(dict.fromkeys(names, ip))
            apis._dns_names = list(names)
    except BaseException:
        apis.stop()
        raise
    return apis


def _wait_ready(proc: subprocess.Popen[str], stderr_path: Path, argv: Sequence[str], timeout: float) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            err = stderr_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"fake_apis did not become ready (rc={proc.poll()}): {' '.join(argv)}\n{err}")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if ready:
            line = proc.stdout.readline()
            if line.strip() == "READY":
                return
            if not line:
                time.sleep(0.01)


def _https_json(ip: str, port: int, host: str, method: str, path: str, cafile: str) -> dict[str, Any]:
    """One HTTPS request to ``ip`` presenting ``host`` as SNI and Host (runs in a namespace thread, where names
    cannot be resolved, so the connection is made to the address and the name is only used for TLS and HTTP)."""
    ctx = ssl.create_default_context(cafile=cafile)
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    conn.sock = ctx.wrap_socket(socket.create_connection((ip, port), timeout=10), server_hostname=host)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.status >= 400:
        raise RuntimeError(f"{method} https://{host}{path} -> {resp.status}: {data[:300]!r}")
    return dict(json.loads(data))
