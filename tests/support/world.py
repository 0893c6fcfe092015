"""A hermetic world of network namespaces for end-to-end tests of the egress gateway.

Why this exists: the gateway's whole job is to stop traffic, so its tests must prove that traffic which is *not*
proxied goes nowhere. That is only believable when the sandbox physically has no other path, and when a failed
block can never send a packet off the machine. Hence::

    [sandbox ns] 10.200.0.2 --veth-- 10.200.0.1 [gateway ns] 198.51.100.1 --veth-- 198.51.100.254 [internet ns]
                                                 ip_forward=0                        .10 A   .11 B   .20 evil
                                                                                     .53 DNS 203.0.113.7 lit (lo)

* Only 10.x (inside the namespaces) and documentation ranges are used; no veth, route or address touches the root
  namespace, so nothing can leak to the real network even if every block fails.
* The gateway namespace never forwards (``ip_forward=0``): sandbox traffic reaches the internet only if a process in
  the gateway namespace proxies it. Fail closed.
* The internet namespace has no route back to 10.200.0.0/24, a second guarantee against accidental forwarding.
* Every namespace gets its own ``/etc/netns/<ns>/{resolv.conf,hosts}`` so no process in the world consults the
  machine's real resolver or hosts file.
* Upstream HTTP(S) servers (``upstream_server.py``) echo what arrived as JSON; the DNS server (``dns_server.py``)
  logs every query. Both are real servers in the internet namespace, so tests assert facts observed on the far
  side of the gateway.

Lifecycle: ``World`` is a context manager (also closed by ``atexit`` and on SIGTERM); names carry a per-run prefix
``cxe<pid><letter>`` so :func:`cleanup_stale` can remove leftovers of crashed runs without touching live ones.

Pytest: add ``from tests.support.world import world  # noqa: F401`` to ``tests/conftest.py`` for a session-scoped
``world`` fixture that skips when not root or without ``ip netns``.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import functools
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
import trustme

from .dns_server import DEFAULT_ZONE

__all__ = [
    "DNS_IP",
    "GATEWAY_INTERNET_IP",
    "GATEWAY_SANDBOX_IP",
    "INTERNET_ROUTER_IP",
    "NAME_PREFIX",
    "SANDBOX_IP",
    "UPSTREAM_IPS",
    "UPSTREAM_TLS_NAMES",
    "Role",
    "World",
    "WorldError",
    "child_env",
    "cleanup_stale",
    "netns_unavailable_reason",
    "world",
]

Role = Literal["sandbox", "gateway", "internet"]
ROLES: tuple[Role, ...] = ("sandbox", "gateway", "internet")
_ROLE_SUFFIX: dict[Role, str] = {"sandbox": "sb", "gateway": "gw", "internet": "in"}

NAME_PREFIX = "cxe"
"""Every namespace, interface, nft table, /etc/netns dir and temp dir of a world starts with this."""

SANDBOX_IP = "10.200.0.2"
GATEWAY_SANDBOX_IP = "10.200.0.1"
GATEWAY_INTERNET_IP = "198.51.100.1"
INTERNET_ROUTER_IP = "198.51.100.254"
DNS_IP = "198.51.100.53"
LIT_NET = "203.0.113.0/24"
UPSTREAM_IPS: dict[str, str] = {
    "A": "198.51.100.10",
    "B": "198.51.100.11",
    "evil": "198.51.100.20",
    "lit": "203.0.113.7",
}
"""Upstream server label (as echoed in the JSON ``server`` field) -> address."""

UPSTREAM_TLS_NAMES: tuple[str, ...] = (
    "api.example.test",
    "other.example.test",
    "*.wild.example.test",
    "evil.example.test",
)
"""DNS names in every upstream certificate (plus an IP SAN for the server's own address)."""

UPSTREAM_TLS_PORTS = (443, 8443)
UPSTREAM_PLAIN_PORTS = (80,)

_SUPPORT_DIR = Path(__file__).resolve().parent
_UPSTREAM_SCRIPT = _SUPPORT_DIR / "upstream_server.py"
_DNS_SCRIPT = _SUPPORT_DIR / "dns_server.py"
_NETNS_ETC = Path("/etc/netns")

_STALE_RE = re.compile(rf"^{NAME_PREFIX}(\d+)[a-z]([-_].*)?$")

_ENV_STRIP_EXACT = {
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "NIX_SSL_CERT_FILE",
    "AWS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "HTTPX_SSL_CERT_FILE",
}
_ENV_STRIP_LOWER = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy", "socks_proxy"}


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for every process in the world.

    CA-bundle and proxy variables are removed: some machines point ``CURL_CA_BUNDLE``/``SSL_CERT_FILE`` at the
    system bundle (which silently overrides a test's own CA choice) or set ``https_proxy`` (which would route a
    client around the gateway under test). Tests must name their CA and proxy explicitly.
    """
    env = {k: v for k, v in os.environ.items() if k not in _ENV_STRIP_EXACT and k.lower() not in _ENV_STRIP_LOWER}
    if extra:
        env.update(extra)
    return env


class WorldError(RuntimeError):
    """A world setup/teardown step failed; carries the command and its output so the failure explains itself."""

    def __init__(self, message: str, argv: Sequence[str] | None = None, output: str = "") -> None:
        detail = message
        if argv is not None:
            detail += f"\n  command: {' '.join(argv)}"
        if output:
            detail += f"\n  output: {output.strip()[-2000:]}"
        super().__init__(detail)
        self.argv = list(argv) if argv is not None else None
        self.output = output


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


# ---------------------------------------------------------------------------------------------------------------
# host-level helpers


def _host(argv: Sequence[str], *, check: bool = True, input: str | None = None, timeout: float = 20) -> str:
    """Run a root-namespace command (``ip``, ``nft``); raise WorldError with its output on failure."""
    proc = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=timeout, env=child_env(), check=False
    )
    if check and proc.returncode != 0:
        raise WorldError(f"command failed (rc={proc.returncode})", argv, proc.stdout + proc.stderr)
    return proc.stdout


def _list_netns() -> list[str]:
    out = _host(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = _host(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pids(pids: Sequence[int], grace: float = 2.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL what is left (soft-then-hard shutdown)."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    remaining = list(pids)
    while remaining and time.monotonic() < deadline:
        remaining = [p for p in remaining if _pid_alive(p) and not _is_zombie(p)]
        if remaining:
            time.sleep(0.02)
    for pid in remaining:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _delete_netns(ns: str) -> None:
    """Kill every process inside ``ns`` first: ``ip netns del`` only unmounts, a live process keeps the ns alive."""
    _kill_pids(_netns_pids(ns))
    _host(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(_NETNS_ETC / ns, ignore_errors=True)


def _owner_is_gone(name: str, force: bool) -> bool:
    m = _STALE_RE.match(name)
    if not m:
        return False
    if force:
        return True
    pid = int(m.group(1))
    if pid == os.getpid():
        with _LIVE_LOCK:
            live_prefixes = [w.prefix for w in _LIVE]
        return not any(name.startswith(p) for p in live_prefixes)
    return not _pid_alive(pid)


def cleanup_stale(force: bool = False) -> list[str]:
    """Remove leftovers of crashed runs: namespaces, /etc/netns dirs, root links and temp dirs named ``cxe*``.

    Only things whose owning process (the pid in the name) is gone are removed, so a concurrent test run on the
    same machine is left alone; ``force=True`` removes every ``cxe*`` leftover. Returns what was removed.
    """
    removed: list[str] = []
    for ns in _list_netns():
        if _owner_is_gone(ns, force):
            _delete_netns(ns)
            removed.append(f"netns:{ns}")
    if _NETNS_ETC.is_dir():
        for d in _NETNS_ETC.iterdir():
            if _owner_is_gone(d.name, force):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"etc:{d}")
    # Worlds never create links in the root namespace; this only catches a half-done veth from an older version.
    for line in _host(["ip", "-o", "link", "show"], check=False).splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            ifname = parts[1].strip().split("@", 1)[0]
            if _owner_is_gone(ifname, force):
                _host(["ip", "link", "del", ifname], check=False)
                removed.append(f"link:{ifname}")
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob(f"{NAME_PREFIX}*"):
        if d.is_dir() and _owner_is_gone(d.name, force):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(f"tmp:{d}")
    return removed


def netns_unavailable_reason() -> str | None:
    """Why the world cannot be built here (for ``pytest.skip``), or None when it can."""
    base = "needs root and network namespaces (ip netns)"
    if os.geteuid() != 0:
        return f"{base}: not running as root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{base}: `{tool}` not found"
    probe = f"{NAME_PREFIX}{os.getpid()}z-probe"
    try:
        _host(["ip", "netns", "add", probe], timeout=10)
    except (WorldError, OSError, subprocess.TimeoutExpired) as exc:
        return f"{base}: {exc}"
    finally:
        _host(["ip", "netns", "del", probe], check=False)
    return None


# ---------------------------------------------------------------------------------------------------------------
# process-wide safety net: close every live world at exit and on SIGTERM

_LIVE: set[World] = set()
_LIVE_LOCK = threading.Lock()
_COUNTER = itertools.count()


def _close_all_live() -> None:
    with _LIVE_LOCK:
        worlds = list(_LIVE)
    for w in worlds:
        with contextlib.suppress(Exception):
            w.close()


def _on_sigterm(signum: int, _frame: Any) -> None:
    # Turn SIGTERM into SystemExit so context managers unwind and atexit runs (the default action skips both).
    raise SystemExit(128 + signum)


@functools.cache
def _install_safety_net() -> None:
    """Once per process: close live worlds at exit; turn default-action SIGTERM/SIGHUP into SystemExit."""
    atexit.register(_close_all_live)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _on_sigterm)


# ---------------------------------------------------------------------------------------------------------------


class World:
    """Three namespaces (sandbox, gateway, internet) with upstream HTTP(S) and DNS servers; see module docstring.

    Use as ``with World() as w: ...``. After start, these attributes are set:

    * ``prefix``: unique name prefix of this run (``cxe<pid><letter>``)
    * ``gw_sandbox_if`` / ``gw_internet_if``: gateway-ns interface names towards the sandbox / internet
    * ``sandbox_if`` / ``internet_if``: the peer interfaces in the sandbox / internet namespaces
    * ``sandbox_ip``, ``gateway_ip`` (sandbox side), ``gateway_internet_ip``, ``gateway_resolver`` (the DNS server)
    * ``upstream_ips``: ``{"A": ..., "B": ..., "evil": ..., "lit": ...}``
    * ``upstream_ca``: the trustme CA; ``upstream_ca_pem``: path of its certificate (PEM)
    * ``dns_zone``: the records the DNS server answers (change them with :meth:`add_dns` / :meth:`remove_dns`);
      ``dns_zone_file``: the JSON file the server re-reads when it changes; ``dns_log``: its JSON-lines query log
    * ``workdir``: private temp dir (certs, logs), removed at close
    """

    def __init__(
        self,
        *,
        ipv6: bool = False,
        extra_dns: Mapping[str, str | Sequence[str]] | None = None,
        clean_stale: bool = True,
    ) -> None:
        """``ipv6=True`` leaves IPv6 enabled (link-local only) in all namespaces; by default it is disabled so no
        test silently passes over an address family the gateway does not police. ``extra_dns`` adds or overrides
        A records (``name -> ip or [ips]``; ``*.suffix`` for wildcards)."""
        self.ipv6 = ipv6
        self.clean_stale = clean_stale
        n = next(_COUNTER)
        self.prefix = f"{NAME_PREFIX}{os.getpid()}{chr(ord('a') + n % 26)}"
        self._ns: dict[Role, str] = {role: f"{self.prefix}-{_ROLE_SUFFIX[role]}" for role in ROLES}
        self.sandbox_if = f"{self.prefix}-sg"
        self.gw_sandbox_if = f"{self.prefix}-gs"
        self.gw_internet_if = f"{self.prefix}-gi"
        self.internet_if = f"{self.prefix}-ig"
        self.redirect_table = f"{self.prefix}_redirect".replace("-", "_")
        self.sandbox_ip = SANDBOX_IP
        self.gateway_ip = GATEWAY_SANDBOX_IP
        self.gateway_internet_ip = GATEWAY_INTERNET_IP
        self.internet_router_ip = INTERNET_ROUTER_IP
        self.gateway_resolver = DNS_IP
        self.upstream_ips: dict[str, str] = dict(UPSTREAM_IPS)
        self.dns_zone: dict[str, list[str]] = {name: list(ips) for name, ips in DEFAULT_ZONE.items()}
        for name, value in (extra_dns or {}).items():
            self.dns_zone[name] = [value] if isinstance(value, str) else list(value)
        self.upstream_ca = trustme.CA()
        self.workdir = Path()
        self.upstream_ca_pem = Path()
        self.dns_log = Path()
        self.dns_zone_file = Path()
        self._state = _State.NEW
        self._created_ns: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()
        self.timings: dict[str, float] = {}

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def __enter__(self) -> World:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<World {self.prefix} {self._state.value}>"

    def start(self) -> None:
        """Build namespaces, links, addresses, routes, then start the servers. Cleans up fully if any step fails."""
        if self._state is not _State.NEW:
            raise WorldError(f"world {self.prefix} is {self._state.value}; a World can be started once")
        _install_safety_net()
        t0 = time.monotonic()
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._state = _State.RUNNING
        try:
            if self.clean_stale:
                cleanup_stale()
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
            self._build_network()
            self.timings["network"] = time.monotonic() - t0
            self._start_servers()
        except BaseException:
            self.close()
            raise
        self.timings["start"] = time.monotonic() - t0

    def close(self) -> None:
        """Kill every process in the world, delete the nft table, namespaces, /etc/netns dirs and the workdir.

        Idempotent and safe on a half-built world. Every step runs even if an earlier one failed; afterwards a
        WorldError is raised only if one of this world's namespaces still exists.
        """
        with self._lock:
            if self._state is _State.CLOSED:
                return
            self._state = _State.CLOSED
        t0 = time.monotonic()
        errors: list[str] = []

        def step(what: str, fn: Callable[..., object], *args: object) -> None:
            try:
                fn(*args)
            except Exception as exc:  # teardown must go on; the leftover check below reports what matters
                errors.append(f"{what}: {exc}")

        for proc in self._procs:
            step(f"stop {proc.args!r}", self._stop_proc, proc)
        if self._ns["gateway"] in self._created_ns:
            step("delete nft table", self._nft, self._nft_delete_script(), False)
        for ns in reversed(self._created_ns):
            step(f"delete netns {ns}", _delete_netns, ns)
        for ns in self._created_ns:  # only ours: a name clash must not delete another world's files
            shutil.rmtree(_NETNS_ETC / ns, ignore_errors=True)
        with contextlib.suppress(OSError):
            if _NETNS_ETC.is_dir() and not any(_NETNS_ETC.iterdir()):
                _NETNS_ETC.rmdir()  # only when empty: other tools may keep entries there
        if self.workdir != Path() and self.workdir.is_dir():
            shutil.rmtree(self.workdir, ignore_errors=True)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        self.timings["close"] = time.monotonic() - t0
        leftover = sorted(set(self._created_ns) & set(_list_netns()))
        if leftover:
            raise WorldError(f"namespaces left after close: {leftover}; errors: {errors}")

    @property
    def processes(self) -> tuple[subprocess.Popen[Any], ...]:
        """Every process started with :meth:`popen` (including the world's own servers), oldest first."""
        return tuple(self._procs)

    def stop(self, proc: subprocess.Popen[Any], grace: float = 2) -> int | None:
        """Stop a process from :meth:`popen` early (e.g. to restart a gateway): SIGTERM to its process group, then
        SIGKILL after ``grace`` seconds. Returns its exit status."""
        self._stop_proc(proc, grace)
        return proc.returncode

    @staticmethod
    def _stop_proc(proc: subprocess.Popen[Any], grace: float = 2) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)

    # -- setup ----------------------------------------------------------------------------------------------------

    def _build_network(self) -> None:
        sb, gw, inet = (self._ns[r] for r in ROLES)
        for ns in (sb, gw, inet):
            _host(["ip", "netns", "add", ns])
            self._created_ns.append(ns)

        self._write_etc(sb, nameserver=GATEWAY_SANDBOX_IP)
        self._write_etc(gw, nameserver=DNS_IP)
        self._write_etc(inet, nameserver=DNS_IP)

        v6 = "0" if self.ipv6 else "1"
        sysctls = [
            f"net.ipv6.conf.all.disable_ipv6={v6}",
            f"net.ipv6.conf.default.disable_ipv6={v6}",
            f"net.ipv6.conf.lo.disable_ipv6={v6}",
        ]
        for ns in (sb, gw, inet):
            extra = ["net.ipv4.ip_forward=0"]
            self._run_ns(ns, ["sysctl", "-q", "-e", "-w", *sysctls, *extra], check=True)

        # Both veth ends are created directly inside their namespaces: no interface ever exists in the root ns.
        _host(f"ip -n {sb} link add {self.sandbox_if} type veth peer name {self.gw_sandbox_if} netns {gw}".split())
        _host(f"ip -n {gw} link add {self.gw_internet_if} type veth peer name {self.internet_if} netns {inet}".split())

        self._ip_batch(
            sb,
            [
                "link set lo up",
                f"addr add {SANDBOX_IP}/24 dev {self.sandbox_if}",
                f"link set {self.sandbox_if} up",
                f"route add default via {GATEWAY_SANDBOX_IP} dev {self.sandbox_if}",
            ],
        )
        self._ip_batch(
            gw,
            [
                "link set lo up",
                f"addr add {GATEWAY_SANDBOX_IP}/24 dev {self.gw_sandbox_if}",
                f"addr add {GATEWAY_INTERNET_IP}/24 dev {self.gw_internet_if}",
                f"link set {self.gw_sandbox_if} up",
                f"link set {self.gw_internet_if} up",
                f"route add {LIT_NET} via {INTERNET_ROUTER_IP} dev {self.gw_internet_if}",
            ],
        )
        inet_cmds = [
            "link set lo up",
            f"addr add {INTERNET_ROUTER_IP}/24 dev {self.internet_if}",
            f"link set {self.internet_if} up",
            f"addr add {UPSTREAM_IPS['lit']}/32 dev lo",
        ]
        inet_cmds += [
            f"addr add {ip}/32 dev {self.internet_if}" for label, ip in UPSTREAM_IPS.items() if label != "lit"
        ]
        inet_cmds.append(f"addr add {DNS_IP}/32 dev {self.internet_if}")
        self._ip_batch(inet, inet_cmds)

    def _write_etc(self, ns: str, nameserver: str) -> None:
        """Per-namespace resolv.conf/hosts (bind-mounted by ``ip netns exec``) so nothing reads the host's files.

        Short resolver timeouts keep a test that hits a blocked/absent DNS server from hanging for 10+ seconds.
        """
        d = _NETNS_ETC / ns
        d.mkdir(parents=True, exist_ok=True)
        (d / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:2\n")
        (d / "hosts").write_text("127.0.0.1\tlocalhost\n")

    def _ip_batch(self, ns: str, commands: Sequence[str]) -> None:
        _host(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")

    def _nft(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run_ns(self._ns["gateway"], ["nft", "-f", "-"], input=script, check=check)

    def _nft_delete_script(self) -> str:
        # "add" first makes the delete succeed whether or not the table exists, in one transaction.
        return f"add table ip {self.redirect_table}\ndelete table ip {self.redirect_table}\n"

    def _start_servers(self) -> None:
        self.upstream_ca_pem = self.workdir / "upstream-ca.pem"
        self.upstream_ca.cert_pem.write_to_path(str(self.upstream_ca_pem))
        serve_args: list[str] = []
        for label, ip in UPSTREAM_IPS.items():
            pem = self.workdir / f"upstream-{label}.pem"
            self.upstream_ca.issue_cert(*UPSTREAM_TLS_NAMES, ip).private_key_and_cert_chain_pem.write_to_path(str(pem))
            serve_args += ["--serve", f"{label},{ip},{pem},{pem}"]

        zone_file = self.dns_zone_file = self.workdir / "zone.json"
        zone_file.write_text(json.dumps(self.dns_zone))
        self.dns_log = self.workdir / "dns-queries.jsonl"
        self.dns_log.touch()

        tls_ports = ",".join(map(str, UPSTREAM_TLS_PORTS))
        plain_ports = ",".join(map(str, UPSTREAM_PLAIN_PORTS))
        servers = {
            "upstream": [sys.executable, str(_UPSTREAM_SCRIPT), "--tls-ports", tls_ports, "--plain-ports", plain_ports],
            "dns": [sys.executable, str(_DNS_SCRIPT), "--listen", DNS_IP, "--zone-file", str(zone_file)],
        }
        servers["upstream"] += serve_args
        servers["dns"] += ["--log", str(self.dns_log)]
        # Both interpreters start in parallel; only then wait for each READY line.
        started = {name: self._spawn_server(name, argv) for name, argv in servers.items()}
        for name, proc in started.items():
            self._wait_ready(name, proc, servers[name])

    def _spawn_server(self, name: str, argv: list[str]) -> subprocess.Popen[str]:
        stderr_path = self.workdir / f"{name}.stderr"
        with open(stderr_path, "w") as err:
            return self.popen("internet", argv, stdout=subprocess.PIPE, stderr=err, text=True)

    def _wait_ready(self, name: str, proc: subprocess.Popen[str], argv: Sequence[str], timeout: float = 15) -> None:
        """Wait for the server's READY line (printed after every socket is bound and listening)."""
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                err = (self.workdir / f"{name}.stderr").read_text(errors="replace")
                raise WorldError(f"{name} server did not become ready (rc={proc.poll()})", argv, err)
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
            if ready:
                line = proc.stdout.readline()
                if line.strip() == "READY":
                    return
                if not line:  # EOF: the process is exiting; poll() above reports it on the next round
                    time.sleep(0.01)

    # -- running things in the world --------------------------------------------------------------------------

    def ns_name(self, role: Role) -> str:
        """The ``ip netns`` name of a role (for tools that take it directly, e.g. ``ip -n``)."""
        try:
            return self._ns[role]
        except KeyError:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}") from None

    def _check_running(self) -> None:
        if self._state is not _State.RUNNING:
            raise WorldError(f"world {self.prefix} is {self._state.value}; start it (use `with World() as w`) first")

    def run(
        self,
        ns_role: Role,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = False,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside a namespace and capture its output.

        Text mode decodes UTF-8 with replacement so binary bodies never raise; pass ``text=False`` for bytes.
        ``subprocess.TimeoutExpired`` propagates (the child is killed). ``check=True`` raises WorldError with
        the output on a non-zero exit.
        """
        self._check_running()
        return self._run_ns(self.ns_name(ns_role), argv, timeout=timeout, check=check, input=input, env=env, text=text)

    def _run_ns(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = False,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess[Any]:
        full = ["ip", "netns", "exec", ns, *argv]
        kwargs: dict[str, Any] = {"encoding": "utf-8", "errors": "replace"} if text else {}
        if isinstance(input, str) and not text:
            input = input.encode()
        proc = subprocess.run(
            full, input=input, capture_output=True, timeout=timeout, env=child_env(env), check=False, **kwargs
        )
        if check and proc.returncode != 0:
            out = proc.stdout + proc.stderr
            raise WorldError(
                f"command failed in {ns} (rc={proc.returncode})",
                full,
                out if isinstance(out, str) else out.decode(errors="replace"),
            )
        return proc

    def popen(self, ns_role: Role, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a long-running process in a namespace; the world kills it (and its process group) at close.

        Defaults: own session (so teardown can kill children too) and the stripped :func:`child_env`; pass
        ``env=`` to add variables.
        """
        self._check_running()
        kw.setdefault("start_new_session", True)
        kw["env"] = child_env(kw.get("env"))
        proc: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", self.ns_name(ns_role), *argv], **kw)
        self._procs.append(proc)
        return proc

    def wait_listening(self, ns_role: Role, port: int, host: str = "127.0.0.1", timeout: float = 10) -> None:
        """Block until something accepts TCP connections on ``host:port`` in a namespace (e.g. a gateway you just
        started with :meth:`popen`). One interpreter start, then a tight connect loop inside the namespace."""
        code = (
            "import socket,sys,time\n"
            f"d=time.monotonic()+{timeout}\n"
            "while True:\n"
            "    try:\n"
            f"        socket.create_connection(({host!r},{port}),timeout=0.5).close(); sys.exit(0)\n"
            "    except OSError:\n"
            "        if time.monotonic()>d: sys.exit(1)\n"
            "        time.sleep(0.02)\n"
        )
        proc = self.python(ns_role, code, timeout=timeout + 10)
        if proc.returncode != 0:
            raise WorldError(f"nothing listening on {host}:{port} in {ns_role} after {timeout}s")

    def curl(
        self,
        args: Sequence[str],
        proxy: str | None = None,
        timeout: float = 10,
        connect_timeout: float = 3,
    ) -> subprocess.CompletedProcess[str]:
        """Run curl in the sandbox: ``curl -q -sS --connect-timeout 3 -m <timeout> [--proxy P | --noproxy '*'] ARGS``.

        ``-q`` ignores any ``~/.curlrc``; without ``proxy`` no proxy is used at all. Pass ``--cacert`` (e.g. the
        gateway's CA) yourself: no CA-bundle variable reaches curl. Blocked connections fail within
        ``connect_timeout`` (curl exit 28) because dropped packets produce no error of their own.
        """
        argv = ["curl", "-q", "-sS", "--connect-timeout", str(min(connect_timeout, timeout)), "-m", str(timeout)]
        argv += ["--proxy", proxy] if proxy else ["--noproxy", "*"]
        argv += list(args)
        return self.run("sandbox", argv, timeout=timeout + 10)

    def python(self, ns_role: Role, code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet with this interpreter (so requests/httpx/dnspython are importable) in a namespace."""
        return self.run(ns_role, [sys.executable, "-c", code], timeout=timeout)

    def sandbox_python(self, code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """:meth:`python` in the sandbox: what an agent's own HTTP client would do."""
        return self.python("sandbox", code, timeout=timeout)

    # -- transparent mode --------------------------------------------------------------------------------------

    def add_redirect(self, port: int, ports: Sequence[int] = (80, 443)) -> None:
        """Redirect TCP ``ports`` arriving from the sandbox to ``port`` on the gateway (transparent mode).

        The destination becomes 10.200.0.1:<port>; the listener on 0.0.0.0:<port> recovers the original
        destination with SO_ORIGINAL_DST. Replaces any earlier redirect atomically (one nft transaction).
        """
        self._check_running()
        dports = ", ".join(str(int(p)) for p in ports)
        t = self.redirect_table
        self._nft(
            f"add table ip {t}\n"
            f"delete table ip {t}\n"
            f"table ip {t} {{\n"
            "  chain prerouting {\n"
            "    type nat hook prerouting priority dstnat; policy accept;\n"
            f'    iifname "{self.gw_sandbox_if}" tcp dport {{ {dports} }} redirect to :{int(port)}\n'
            "  }\n"
            "}\n"
        )

    def remove_redirect(self) -> None:
        """Remove the transparent-mode redirect (no error if none is installed)."""
        self._check_running()
        self._nft(self._nft_delete_script())

    # -- DNS zone and observation -----------------------------------------------------------------------------

    def add_dns(self, records: Mapping[str, str | Sequence[str]]) -> None:
        """Add or override A records at runtime (``name -> ip or [ips]``; ``*.suffix`` for wildcards).

        The zone file is replaced atomically and the DNS server compares its bytes on every query, so the next
        query answers from the new zone (no restart, no wait). Resolvers that cached an earlier answer (TTL 30 s)
        are not affected: add names before first resolving them. Tests on a shared world should undo this with
        :meth:`remove_dns`.
        """
        self._check_running()
        with self._lock:
            for name, value in records.items():
                self.dns_zone[name] = [value] if isinstance(value, str) else list(value)
            self._write_zone()

    def remove_dns(self, *names: str) -> None:
        """Remove records added with ``extra_dns`` / :meth:`add_dns` (names of the built-in zone revert to it)."""
        self._check_running()
        with self._lock:
            for name in names:
                self.dns_zone.pop(name, None)
            for name, ips in DEFAULT_ZONE.items():
                self.dns_zone.setdefault(name, list(ips))
            self._write_zone()

    def _write_zone(self) -> None:
        tmp = self.dns_zone_file.with_name(f".{self.dns_zone_file.name}.tmp")
        tmp.write_text(json.dumps(self.dns_zone))
        os.replace(tmp, self.dns_zone_file)  # rename: the server never reads a half-written file

    # -- DNS observation ---------------------------------------------------------------------------------------

    def dns_queries(self) -> list[dict[str, Any]]:
        """Queries the DNS server has seen since start / the last :meth:`clear_dns_log`: dicts with ``name``
        (lower-case, no trailing dot), ``type`` ("A", "AAAA", ...), ``proto`` ("udp"/"tcp"), ``client``, ``time``."""
        lines = self.dns_log.read_text().splitlines() if self.dns_log.is_file() else []
        return [json.loads(line) for line in lines if line.strip()]

    def clear_dns_log(self) -> None:
        """Truncate the query log (the server appends with O_APPEND, so truncating under it is safe)."""
        with open(self.dns_log, "w"):
            pass


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    """Session-wide hermetic world; skipped unless root with working ``ip netns``.

    Tests sharing it must undo what they change (e.g. ``remove_redirect()``, kill what they ``popen``), or use
    their own ``with World() as w:`` when they need a pristine one (~1 s).
    """
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with World() as w:
        yield w
