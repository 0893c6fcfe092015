"""Self-checks of the hermetic network world the end-to-end tests stand on.

If these fail, no gateway test result means anything: a "blocked" verdict could come from a broken world, and an
"allowed" one could have bypassed the gateway. So they prove the world's guarantees directly: the sandbox has no
path out without a proxy, the upstreams and DNS behave as documented, nothing touches the root namespace, and
teardown leaves nothing behind even when the owning process is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.world import (
    DNS_IP,
    GATEWAY_SANDBOX_IP,
    UPSTREAM_IPS,
    World,
    WorldError,
    child_env,
    cleanup_stale,
    netns_unavailable_reason,
)

pytestmark = pytest.mark.netns

REPO_ROOT = Path(__file__).resolve().parents[1]


def _gw_curl(world: World, url: str, *extra: str, resolve_ip: str | None = None) -> dict[str, Any]:
    """curl from the gateway namespace (which, unlike the sandbox, has a route to the internet namespace)."""
    argv = ["curl", "-q", "-sS", "--noproxy", "*", "--connect-timeout", "3", "-m", "10"]
    argv += ["--cacert", str(world.upstream_ca_pem)]
    if resolve_ip is not None:
        host = url.split("://", 1)[1].split("/", 1)[0]
        name, _, port = host.partition(":")
        argv += ["--resolve", f"{name}:{port or ('443' if url.startswith('https') else '80')}:{resolve_ip}"]
    proc = world.run("gateway", [*argv, *extra, url], check=True)
    echo: dict[str, Any] = json.loads(proc.stdout)
    return echo


def _own_world_needed() -> None:
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":", 2)[1].strip() for line in out.splitlines())


def _netns_with(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


# -- isolation ----------------------------------------------------------------------------------------------------


def test_sandbox_cannot_reach_upstream_without_gateway(world: World) -> None:
    start = time.monotonic()
    proc = world.curl(["--cacert", str(world.upstream_ca_pem), "https://198.51.100.10/"], connect_timeout=2)
    elapsed = time.monotonic() - start
    assert proc.returncode == 28, proc  # connect timeout: packets are dropped, nothing answers
    assert proc.stdout == ""
    assert elapsed < 6


def test_sandbox_cannot_reach_anything_directly(world: World) -> None:
    # Every upstream and port at once, in parallel, so the check stays quick.
    targets = [(ip, port) for ip in [*UPSTREAM_IPS.values(), DNS_IP] for port in (80, 443, 8443, 53)]
    code = textwrap.dedent(
        f"""
        import concurrent.futures, json, socket
        def probe(t):
            try:
                socket.create_connection(tuple(t), timeout=1.5).close()
                return "connected"
            except OSError as exc:
                return type(exc).__name__
        with concurrent.futures.ThreadPoolExecutor(32) as ex:
            print(json.dumps(list(ex.map(probe, {targets!r}))))
        """
    )
    proc = world.sandbox_python(code, timeout=20)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert "connected" not in results
    assert set(results) <= {"TimeoutError", "OSError", "ConnectionRefusedError"}


def test_sandbox_routes_only_via_gateway(world: World) -> None:
    routes = world.run("sandbox", ["ip", "-4", "route", "show", "table", "all"], check=True).stdout
    non_local = [r for r in routes.splitlines() if r and not r.startswith(("local ", "broadcast "))]
    assert sorted(non_local) == sorted(
        [
            f"default via {GATEWAY_SANDBOX_IP} dev {world.sandbox_if} ",
            f"10.200.0.0/24 dev {world.sandbox_if} proto kernel scope link src {world.sandbox_ip} ",
        ]
    ), routes
    assert world.run("sandbox", ["ip", "-6", "route", "show", "table", "all"]).stdout.strip() == ""
    resolv = world.run("sandbox", ["cat", "/etc/resolv.conf"], check=True).stdout
    assert f"nameserver {GATEWAY_SANDBOX_IP}" in resolv
    links = world.run("sandbox", ["ip", "-o", "link"], check=True).stdout
    assert sorted(line.split(":", 2)[1].strip().split("@")[0] for line in links.splitlines()) == sorted(
        ["lo", world.sandbox_if]
    )


def test_gateway_does_not_forward_and_internet_has_no_way_back(world: World) -> None:
    fwd = world.run("gateway", ["sysctl", "-n", "net.ipv4.ip_forward"], check=True).stdout.strip()
    assert fwd == "0"
    route = world.run("internet", ["ip", "-4", "route", "get", world.sandbox_ip])
    assert route.returncode != 0  # "Network is unreachable": replies to 10.200.0.0/24 could not even leave
    gw_routes = world.run("gateway", ["ip", "-4", "route"], check=True).stdout
    assert "default" not in gw_routes
    assert f"203.0.113.0/24 via {world.internet_router_ip}" in gw_routes


def test_ipv6_disabled_everywhere(world: World) -> None:
    for role in ("sandbox", "gateway", "internet"):
        val = world.run(role, ["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"]).stdout.strip()
        assert val in ("1", ""), role  # "" when the kernel has no IPv6 at all
        assert "inet6" not in world.run(role, ["ip", "addr"], check=True).stdout


# -- upstream servers ---------------------------------------------------------------------------------------------


def test_gateway_reaches_upstream_a_over_verified_https(world: World) -> None:
    echo = _gw_curl(world, "https://api.example.test/hello?x=1", resolve_ip=UPSTREAM_IPS["A"])
    assert echo["server"] == "A"
    assert echo["method"] == "GET"
    assert echo["path"] == "/hello?x=1"
    assert echo["sni"] == "api.example.test"
    assert ["Host", "api.example.test"] in echo["headers"]
    assert echo["client"][0] == world.gateway_internet_ip


@pytest.mark.parametrize(
    ("label", "name"),
    [
        ("A", "api.example.test"),
        ("B", "other.example.test"),
        ("evil", "evil.example.test"),
        ("lit", "x.wild.example.test"),
    ],
)
@pytest.mark.parametrize("port", [443, 8443, 80])
def test_every_upstream_serves_every_port(world: World, label: str, name: str, port: int) -> None:
    scheme = "http" if port == 80 else "https"
    echo = _gw_curl(world, f"{scheme}://{name}:{port}/p", resolve_ip=UPSTREAM_IPS[label])
    assert echo["server"] == label
    assert echo["local"] == [UPSTREAM_IPS[label], port]
    assert echo["tls"] is (port != 80)


def test_upstream_cert_has_ip_san_and_rejects_other_names(world: World) -> None:
    ip = UPSTREAM_IPS["B"]
    assert _gw_curl(world, f"https://{ip}/")["server"] == "B"
    bad = world.run(
        "gateway",
        [
            "curl",
            "-q",
            "-sS",
            "--cacert",
            str(world.upstream_ca_pem),
            "--resolve",
            f"nope.test:443:{ip}",
            "https://nope.test/",
        ],
    )
    assert bad.returncode == 60, bad  # peer certificate cannot be authenticated with given CA / name mismatch


def test_upstream_echo_describes_bodies_methods_and_specials(world: World) -> None:
    ip = UPSTREAM_IPS["A"]
    url = "https://api.example.test"
    body = b"x" * 100_000
    echo = _gw_curl(world, f"{url}/up", "-X", "PUT", "--data-binary", "x" * 100_000, resolve_ip=ip)
    assert (echo["method"], echo["body_len"]) == ("PUT", len(body))
    chunked = _gw_curl(world, f"{url}/c", "-H", "Transfer-Encoding: chunked", "--data-binary", "hello", resolve_ip=ip)
    assert (chunked["method"], chunked["body_len"]) == ("POST", 5)
    for method in ("DELETE", "PATCH", "OPTIONS", "PROPFIND"):
        assert _gw_curl(world, f"{url}/m", "-X", method, resolve_ip=ip)["method"] == method

    def status_and_headers(*args: str) -> str:
        proc = world.run(
            "gateway",
            [
                "curl",
                "-q",
                "-sS",
                "-o",
                "/dev/null",
                "-D",
                "-",
                "--cacert",
                str(world.upstream_ca_pem),
                "--resolve",
                f"api.example.test:443:{ip}",
                *args,
            ],
            check=True,
        )
        return str(proc.stdout)

    assert status_and_headers(f"{url}/status/418").startswith("HTTP/1.1 418")
    redirect = status_and_headers(f"{url}/redirect?to=https://other.example.test/x")
    assert redirect.startswith("HTTP/1.1 302")
    assert "Location: https://other.example.test/x" in redirect
    assert "Content-Length: 12345" in status_and_headers(f"{url}/bytes/12345")
    head = world.run(
        "gateway",
        [
            "curl",
            "-q",
            "-sS",
            "-I",
            "--cacert",
            str(world.upstream_ca_pem),
            "--resolve",
            f"api.example.test:443:{ip}",
            f"{url}/h",
        ],
        check=True,
    )
    assert head.stdout.startswith("HTTP/1.1 200")

    raw = world.run(
        "gateway",
        [
            "curl",
            "-q",
            "-sS",
            "--cacert",
            str(world.upstream_ca_pem),
            "--resolve",
            f"api.example.test:443:{ip}",
            f"{url}/bytes/300",
        ],
        text=False,
        check=True,
    )
    assert raw.stdout == bytes(range(256)) + bytes(range(44))


def test_upstream_keeps_connections_alive(world: World) -> None:
    proc = world.run(
        "gateway",
        [
            "curl",
            "-q",
            "-sS",
            "--cacert",
            str(world.upstream_ca_pem),
            "--resolve",
            f"api.example.test:443:{UPSTREAM_IPS['A']}",
            "https://api.example.test/1",
            "https://api.example.test/2",
        ],
        check=True,
    )
    first, second = (json.loads(part) for part in proc.stdout.replace("}{", "}\n{").splitlines())
    assert first["client"] == second["client"]  # same source port: one TCP connection served both requests
    assert [first["path"], second["path"]] == ["/1", "/2"]


def test_upstream_path_is_raw_request_target(world: World) -> None:
    echo = _gw_curl(world, "http://api.example.test//a/../b?q=%2F", "--path-as-is", resolve_ip=UPSTREAM_IPS["A"])
    assert echo["path"] == "//a/../b?q=%2F"


# -- DNS ----------------------------------------------------------------------------------------------------------

_DNS_PROBE = textwrap.dedent(
    """
    import json, dns.message, dns.query, dns.rcode, dns.rdatatype
    out = []
    for name, rtype, tcp in QUERIES:
        q = dns.message.make_query(name, rtype)
        r = (dns.query.tcp if tcp else dns.query.udp)(q, "198.51.100.53", timeout=2)
        out.append({
            "name": name, "type": rtype, "rcode": dns.rcode.to_text(r.rcode()),
            "ips": sorted(rd.address for rrset in r.answer for rd in rrset),
            "ttls": sorted({rrset.ttl for rrset in r.answer}),
        })
    print(json.dumps(out))
    """
)


def test_dns_answers_as_specified(world: World) -> None:
    queries = [
        ("api.example.test", "A", False),
        ("other.example.test", "A", False),
        ("evil.example.test", "A", False),
        ("foo.wild.example.test", "A", False),
        ("a.b.wild.example.test", "A", False),
        ("private.example.test", "A", False),
        ("meta.example.test", "A", False),
        ("loop.example.test", "A", False),
        ("API.Example.Test", "A", True),
        ("api.example.test", "AAAA", False),
        ("unknown.example.test", "A", False),
        ("wild.example.test", "A", False),
    ]
    world.clear_dns_log()
    proc = world.python("gateway", f"QUERIES = {queries!r}\n{_DNS_PROBE}", timeout=30)
    assert proc.returncode == 0, proc.stderr
    got = {(r["name"], r["type"]): r for r in json.loads(proc.stdout)}

    expected_a = {
        "api.example.test": "198.51.100.10",
        "other.example.test": "198.51.100.11",
        "evil.example.test": "198.51.100.20",
        "foo.wild.example.test": "198.51.100.11",
        "a.b.wild.example.test": "198.51.100.11",
        "private.example.test": "10.9.9.9",
        "meta.example.test": "169.254.169.254",
        "loop.example.test": "127.0.0.1",
        "API.Example.Test": "198.51.100.10",
    }
    for name, ip in expected_a.items():
        answer = got[(name, "A")]
        assert (answer["rcode"], answer["ips"], answer["ttls"]) == ("NOERROR", [ip], [30]), answer
    assert (got[("api.example.test", "AAAA")]["rcode"], got[("api.example.test", "AAAA")]["ips"]) == ("NOERROR", [])
    assert got[("unknown.example.test", "A")]["rcode"] == "NXDOMAIN"
    assert got[("wild.example.test", "A")]["rcode"] == "NXDOMAIN"

    logged = world.dns_queries()
    assert [(q["name"], q["type"]) for q in logged] == [(n.lower(), t) for n, t, _ in queries]
    assert {q["client"] for q in logged} == {world.gateway_internet_ip}
    assert [q["proto"] for q in logged if q["name"] == "api.example.test" and q["type"] == "A"] == ["udp", "tcp"]


def test_gateway_system_resolver_uses_world_dns(world: World) -> None:
    # /etc/netns/<gw>/resolv.conf points the gateway's libc resolver at the world's DNS server, never the host's.
    code = "import socket; print(socket.gethostbyname('api.example.test'))"
    proc = world.python("gateway", code)
    assert proc.stdout.strip() == UPSTREAM_IPS["A"], proc.stderr


# -- transparent-mode plumbing ------------------------------------------------------------------------------------

_ORIG_DST_LISTENER = textwrap.dedent(
    """
    import socket, struct, sys
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", PORT))
    srv.listen()
    while True:
        conn, _ = srv.accept()
        try:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
        except OSError:  # ENOENT: not redirected (e.g. wait_listening's probe on 127.0.0.1)
            conn.close()
            continue
        port, ip = struct.unpack("!2xH4s8x", raw)
        conn.sendall(f"{socket.inet_ntoa(ip)}:{port}\\n".encode())
        conn.close()
    """
)


def test_redirect_delivers_sandbox_tcp_to_gateway_with_original_destination(world: World) -> None:
    port = 18080
    listener = world.popen("gateway", [sys.executable, "-c", _ORIG_DST_LISTENER.replace("PORT", str(port))])
    try:
        world.wait_listening("gateway", port)
        world.add_redirect(port)
        code = textwrap.dedent(
            """
            import socket
            for target in [("198.51.100.10", 443), ("203.0.113.7", 80), ("198.51.100.99", 443)]:
                with socket.create_connection(target, timeout=3) as s:
                    print(s.recv(100).decode().strip())
            """
        )
        proc = world.sandbox_python(code, timeout=20)
        assert proc.stdout.split() == ["198.51.100.10:443", "203.0.113.7:80", "198.51.100.99:443"], proc.stderr

        table = world.run("gateway", ["nft", "list", "table", "ip", world.redirect_table], check=True).stdout
        assert f'iifname "{world.gw_sandbox_if}"' in table
        # Only 80/443 are redirected; 8443 still has no path at all.
        blocked = world.sandbox_python(
            "import socket\ntry:\n    socket.create_connection(('198.51.100.10', 8443), timeout=1.5)\n"
            "    print('connected')\nexcept OSError as e:\n    print(type(e).__name__)"
        )
        assert blocked.stdout.strip() == "TimeoutError"
    finally:
        world.remove_redirect()
        world.stop(listener)
    assert world.run("gateway", ["nft", "list", "table", "ip", world.redirect_table]).returncode != 0
    assert world.curl(["http://198.51.100.10/"], connect_timeout=1.5).returncode == 28


# -- lifecycle ----------------------------------------------------------------------------------------------------


def test_world_leaves_root_namespace_untouched_and_tears_down_completely() -> None:
    _own_world_needed()
    links_before = _root_links()
    root_tables_before = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    with World() as w:
        names = [w.ns_name(role) for role in ("sandbox", "gateway", "internet")]
        assert _root_links() == links_before
        assert sorted(_netns_with(w.prefix)) == sorted(names)
        assert all(Path("/etc/netns", ns).is_dir() for ns in names)
        w.add_redirect(15000)
        assert w.redirect_table in w.run("gateway", ["nft", "list", "tables"], check=True).stdout
        server_pids = [p.pid for p in w.processes]
        assert len(server_pids) == 2  # upstream + DNS
        workdir = w.workdir
        assert workdir.is_dir()
    assert _netns_with(w.prefix) == []
    assert not any(Path("/etc/netns", ns).exists() for ns in names)
    assert not workdir.exists()
    assert _root_links() == links_before
    assert subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout == root_tables_before
    assert not [pid for pid in server_pids if Path(f"/proc/{pid}").exists()]  # killed and reaped
    with pytest.raises(WorldError, match="closed"):
        w.run("sandbox", ["true"])


_CHILD = textwrap.dedent(
    """
    import sys, time
    from tests.support.world import World
    w = World().__enter__()
    print(w.prefix, flush=True)
    time.sleep(60)
    """
)


def _spawn_world_owner() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        cwd=REPO_ROOT,
        env=child_env({"PYTHONPATH": str(REPO_ROOT)}),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    prefix = proc.stdout.readline().strip()
    assert prefix.startswith("cxe"), prefix
    assert len(_netns_with(prefix)) == 3
    return proc, prefix


def test_sigterm_of_owner_tears_world_down() -> None:
    _own_world_needed()
    proc, prefix = _spawn_world_owner()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert _netns_with(prefix) == []
    assert not list(Path("/etc/netns").glob(f"{prefix}*"))


def test_cleanup_stale_removes_leftovers_of_killed_owner() -> None:
    _own_world_needed()
    proc, prefix = _spawn_world_owner()
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait(timeout=10)
    assert len(_netns_with(prefix)) == 3
    removed = cleanup_stale()
    assert {f"netns:{prefix}-{suffix}" for suffix in ("sb", "gw", "in")} <= set(removed)
    assert _netns_with(prefix) == []
    assert not list(Path("/etc/netns").glob(f"{prefix}*"))


def test_cleanup_stale_spares_live_worlds(world: World) -> None:
    cleanup_stale()
    assert world.run("sandbox", ["true"]).returncode == 0
    assert len(_netns_with(world.prefix)) == 3


def test_child_env_strips_ca_and_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CURL_CA_BUNDLE", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "HTTPS_PROXY", "http_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "/nope")
    monkeypatch.setenv("KEEP_ME", "1")
    env = child_env({"EXTRA": "2"})
    assert not {"CURL_CA_BUNDLE", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "HTTPS_PROXY", "http_proxy", "NO_PROXY"} & set(
        env
    )
    assert env["KEEP_ME"] == "1"
    assert env["EXTRA"] == "2"
    assert os.environ["CURL_CA_BUNDLE"] == "/nope"  # the test process itself is untouched
