"""The admin API against a real gateway: auth, registration, atomic reload, recent decisions, readiness, and the
invariants (no secret in any answer, a sandbox cannot reach the admin API)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.admin.conftest import ADMIN_TOKEN, SANDBOX_TOKEN, SECRET_VALUE, LocalGateway
from tests.gateway.harness import gateway_process
from tests.support.world import World

pytestmark = pytest.mark.gateway


@pytest.fixture
def policy_file(gw: LocalGateway) -> Iterator[Path]:
    """The gateway's policy file, restored (and reloaded) after a test that edits it."""
    original = gw.policy_path.read_bytes()
    yield gw.policy_path
    gw.policy_path.write_bytes(original)
    with gw.unix() as c:
        assert c.post("/v1/policy/reload").status_code == 200


@pytest.fixture
def registered(gw: LocalGateway) -> Iterator[list[str]]:
    """Ids a test registered; unregistered afterwards so tests stay independent."""
    ids: list[str] = []
    yield ids
    with gw.unix() as c:
        for sandbox_id in ids:
            c.delete(f"/v1/sandboxes/{sandbox_id}")


# -- transport and auth -----------------------------------------------------------------------------------------


def test_unix_socket_is_0600_and_needs_no_token(gw: LocalGateway) -> None:
    mode = os.stat(gw.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert os.stat(gw.socket_path).st_uid == os.getuid()
    with gw.unix() as c:
        r = c.get("/v1/sandboxes")
    assert r.status_code == 200
    assert [s["id"] for s in r.json()["sandboxes"]] == ["file-sb"]


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789", ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1]])
def test_tcp_without_the_token_is_401(gw: LocalGateway, token: str | None) -> None:
    with gw.tcp(token) as c:
        for method, path in [
            ("GET", "/v1/sandboxes"),
            ("GET", "/v1/policy"),
            ("GET", "/metrics"),
            ("GET", "/v1/openapi.json"),
            ("POST", "/v1/policy/reload"),
            ("PUT", "/v1/sandboxes/x"),
            ("DELETE", "/v1/sandboxes/file-sb"),
            ("GET", "/v1/decisions"),
            ("GET", "/v1/ready"),
        ]:
            r = c.request(method, path, json={"policies": ["local"], "sources": ["127.0.0.9/32"]})
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert r.json()["error"] == "unauthorized"
    with gw.unix() as c:
        assert "x" not in {s["id"] for s in c.get("/v1/sandboxes").json()["sandboxes"]}  # the PUT did nothing


def test_tcp_with_the_token(gw: LocalGateway) -> None:
    with gw.tcp() as c:
        assert c.get("/v1/sandboxes").status_code == 200
        assert c.get("/v1/openapi.json").json()["openapi"].startswith("3.1")
    with gw.tcp(None) as c:
        assert c.get("/v1/health").json() == {"status": "ok"}  # liveness needs no token
    assert ADMIN_TOKEN not in gw.log_text()


def test_errors_are_json(gw: LocalGateway) -> None:
    with gw.unix() as c:
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        r = c.patch("/v1/sandboxes/file-sb")
        assert r.status_code == 405 and "PUT" in r.headers["Allow"]
        assert set(r.json()) == {"error", "detail", "issues"}


# -- registration -------------------------------------------------------------------------------------------------


def test_register_with_token_then_unregister(gw: LocalGateway, registered: list[str]) -> None:
    url = f"http://127.0.0.1:{gw.upstream_port}/plain"
    assert gw.proxy(url, token=SANDBOX_TOKEN).status_code == 407  # nobody has this token yet
    registered.append("api-sb")
    with gw.unix() as c:
        r = c.put(
            "/v1/sandboxes/api-sb", json={"policies": ["local"], "labels": {"vm": "clone-1"}, "token": SANDBOX_TOKEN}
        )
        assert r.status_code == 201, r.text
        assert r.json() == {
            "id": "api-sb",
            "origin": "api",
            "labels": {"vm": "clone-1"},
            "sources": [],
            "policies": ["local"],
            "default_mode": "enforce",
            "has_token": True,
        }
        resp = gw.proxy(url, token=SANDBOX_TOKEN)
        assert resp.status_code == 200 and resp.json()["path"] == "/plain"
        records = c.get("/v1/decisions", params={"sandbox": "api-sb", "limit": 1}).json()["decisions"]
        assert records[0]["rule"] == "local-any" and records[0]["verdict"] == "allow"
        # The plain token is hashed and forgotten: not in the answer, not on disk, not in the log.
        listing = c.get("/v1/sandboxes").text
        assert SANDBOX_TOKEN not in listing and hashlib.sha256(SANDBOX_TOKEN.encode()).hexdigest() not in listing
        persisted = (gw.tmp / "state" / "sandboxes.json").read_text()
        assert SANDBOX_TOKEN not in persisted
        assert hashlib.sha256(SANDBOX_TOKEN.encode()).hexdigest() in persisted
        assert stat.S_IMODE(os.stat(gw.tmp / "state" / "sandboxes.json").st_mode) == 0o600

        # PUT again replaces the registration (200), here with another default mode.
        r = c.put(
            "/v1/sandboxes/api-sb", json={"policies": ["local"], "token": SANDBOX_TOKEN, "default_mode": "report"}
        )
        assert r.status_code == 200 and r.json()["default_mode"] == "report"

        r = c.delete("/v1/sandboxes/api-sb")
        assert r.status_code == 200 and r.json() == {"id": "api-sb", "leases_revoked": 0}
        assert c.get("/v1/sandboxes/api-sb").status_code == 404
        assert c.delete("/v1/sandboxes/api-sb").status_code == 404
    assert gw.proxy(url, token=SANDBOX_TOKEN).status_code == 407
    assert SANDBOX_TOKEN not in gw.log_text()


def test_register_by_source_address(gw: LocalGateway, registered: list[str]) -> None:
    url = f"http://127.0.0.1:{gw.upstream_port}/from-source"
    assert gw.proxy(url, source="127.0.0.2").status_code == 403  # unknown sandbox
    registered.append("src-sb")
    with gw.unix() as c:
        r = c.put("/v1/sandboxes/src-sb", json={"policies": ["local"], "sources": ["127.0.0.2/32"]})
        assert r.status_code == 201, r.text
    r = gw.proxy(url, source="127.0.0.2")
    assert r.status_code == 200, r.text
    with gw.unix() as c:
        records = c.get("/v1/decisions", params={"sandbox": "src-sb"}).json()["decisions"]
    assert records and all(rec["sandbox"] == "src-sb" for rec in records)

    # Unregistering takes effect at once, even on a connection the sandbox keeps open.
    conn = http.client.HTTPConnection("127.0.0.1", gw.proxy_port, timeout=10, source_address=("127.0.0.2", 0))
    try:
        conn.request("GET", url)
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        with gw.unix() as c:
            assert c.delete("/v1/sandboxes/src-sb").status_code == 200
        conn.request("GET", url)
        second = conn.getresponse()
        assert second.status == 403 and json.loads(second.read())["reason"] == "unknown_sandbox"
    finally:
        conn.close()


def test_registration_errors_are_all_listed(gw: LocalGateway) -> None:
    with gw.unix() as c:
        r = c.put(
            "/v1/sandboxes/bad-sb",
            json={"policies": ["lcoal", "nope"], "sources": ["127.0.0.5/8", "not-a-cidr"]},
        )
        assert r.status_code == 422
        body = r.json()
        messages = [i["message"] for i in body["issues"]]
        assert len(messages) == 4, messages
        assert any("unknown policy 'lcoal'" in m for m in messages)
        assert any(i["hint"] == "did you mean 'local'?" for i in body["issues"])
        assert any("'not-a-cidr' is not a CIDR" in m for m in messages)
        assert any("'127.0.0.5/8' is not a CIDR" in m for m in messages)

        r = c.put("/v1/sandboxes/bad-sb", json={"policies": ["local"]})
        assert r.status_code == 422 and "no 'sources' and no token" in r.json()["issues"][0]["message"]

        # Structure: unknown keys, wrong types, a short token; every problem at once, never echoing the input.
        r = c.put("/v1/sandboxes/bad-sb", json={"policies": [], "colour": "red", "token": "short-tok"})
        assert r.status_code == 422
        locations = {i["location"] for i in r.json()["issues"]}
        assert locations == {"body.policies", "body.colour", "body.token"}
        assert "short-tok" not in r.text

        assert (
            c.put(
                "/v1/sandboxes/bad-sb", content=b"{not json", headers={"Content-Type": "application/json"}
            ).status_code
            == 400
        )
        assert c.put("/v1/sandboxes/bad-sb", content=b"policies=local").status_code == 415
        big = {"policies": ["local"], "labels": {f"k{i}": "v" * 100 for i in range(1000)}, "sources": ["127.0.0.5/32"]}
        assert c.put("/v1/sandboxes/bad-sb", json=big).status_code == 413
        assert c.put("/v1/sandboxes/-bad", json={"policies": ["local"], "sources": ["127.0.0.5/32"]}).status_code == 422
        r = c.put(
            "/v1/sandboxes/bad-sb",
            json={"policies": ["local"], "token": SANDBOX_TOKEN, "token_sha256": "0" * 64},
        )
        assert r.status_code == 422
        assert c.get("/v1/sandboxes/bad-sb").status_code == 404  # nothing was registered by any of these


def test_registration_conflicts_are_409(gw: LocalGateway, registered: list[str]) -> None:
    with gw.unix() as c:
        # The id of a policy file's sandbox: a registration can never replace it.
        r = c.put("/v1/sandboxes/file-sb", json={"policies": ["local"], "sources": ["127.0.0.7/32"]})
        assert r.status_code == 409
        assert "defined in a policy file" in r.json()["issues"][0]["message"]
        assert c.get("/v1/sandboxes/file-sb").json()["sources"] == ["127.0.0.1/32"]
        # Sources overlapping a file sandbox's, or another registration's.
        r = c.put("/v1/sandboxes/overlap", json={"policies": ["local"], "sources": ["127.0.0.0/30"]})
        assert r.status_code == 409 and "overlap" in r.json()["issues"][0]["message"]
        registered.append("first")
        assert (
            c.put("/v1/sandboxes/first", json={"policies": ["local"], "sources": ["127.0.1.0/24"]}).status_code == 201
        )
        r = c.put("/v1/sandboxes/second", json={"policies": ["local"], "sources": ["127.0.1.128/25"]})
        assert r.status_code == 409
        # The same proxy token as another sandbox.
        registered.append("tok-a")
        assert c.put("/v1/sandboxes/tok-a", json={"policies": ["local"], "token": SANDBOX_TOKEN}).status_code == 201
        assert c.put("/v1/sandboxes/tok-b", json={"policies": ["local"], "token": SANDBOX_TOKEN}).status_code == 409
        # A policy file's sandbox is not unregistered through the API.
        r = c.delete("/v1/sandboxes/file-sb")
        assert r.status_code == 409 and r.json()["error"] == "defined_in_file"


# -- reload -------------------------------------------------------------------------------------------------------


def test_reload_with_a_broken_file_keeps_the_old_policy(gw: LocalGateway, policy_file: Path) -> None:
    url = gw.upstream("/inject/reload")
    with gw.unix() as c:
        old = c.get("/v1/policy").json()
        r = c.post("/v1/policy/reload")
        assert r.status_code == 200 and r.json()["policy_hash"] == old["policy_hash"]

        # Two independent errors: both are answered, each with file:line:col.
        text = policy_file.read_text()
        broken = text.replace("cidrs: [127.0.0.0/8]", "cidrs: [127.0.0.0/33]", 1).replace(
            "policies: [local, quiet]", "policies: [local, quiet, nope]"
        )
        assert broken != text
        policy_file.write_text(broken)
        r = c.post("/v1/policy/reload")
        assert r.status_code == 422
        body = r.json()
        assert body["error"] == "invalid_policy" and old["policy_hash"][:12] in body["detail"]
        assert len(body["issues"]) == 2, body
        for issue in body["issues"]:
            file, line, col = issue["location"].rsplit(":", 2)
            assert file == str(policy_file) and int(line) > 0 and int(col) > 0
        assert {i["rule"] for i in body["issues"]} == {"local-any", None}

        # The old policy still serves traffic, and audits under the old hash.
        resp = gw.proxy(url)
        assert resp.status_code == 200
        assert resp.json()["path"] == "/inject/reload"
        latest = c.get("/v1/decisions", params={"limit": 1}).json()["decisions"][0]
        assert latest["policy_hash"] == old["policy_hash"] and latest["rule"] == "local-inject"
        # Injected (the echo upstream reflected it and the gateway redacted the echo).
        assert latest["credential"] == "local-key" and latest["echo_redactions"] >= 1
        assert c.get("/v1/policy").json()["policy_hash"] == old["policy_hash"]

        # A fixed file that changes something is swapped in whole.
        deny_inject = (
            "  quiet:\n    rules:\n      - id: quiet-deny-inject\n        action: deny\n"
            '        hosts: [upstream.test]\n        ports: ["1-65535"]\n        schemes: [http]\n'
            '        paths: ["/inject/**"]\n'
        )
        policy_file.write_text(text.replace("  quiet:\n    rules:\n", deny_inject))
        r = c.post("/v1/policy/reload")
        assert r.status_code == 200, r.text
        new_hash = r.json()["policy_hash"]
        assert new_hash != old["policy_hash"] and r.json()["rule_count"] == 5
        resp = gw.proxy(url)
        assert resp.status_code == 403 and resp.json()["rule"] == "quiet-deny-inject"


def test_reload_keeps_registrations_and_refuses_to_break_them(
    gw: LocalGateway, policy_file: Path, registered: list[str]
) -> None:
    registered.append("keep-me")
    with gw.unix() as c:
        assert (
            c.put("/v1/sandboxes/keep-me", json={"policies": ["quiet"], "sources": ["127.0.0.3/32"]}).status_code == 201
        )
        assert c.post("/v1/policy/reload").status_code == 200
        assert c.get("/v1/sandboxes/keep-me").json()["origin"] == "api"

        # Removing the policy the registration names: the reload fails, naming the registration's file:line.
        text = policy_file.read_text()
        without_quiet = text[: text.index("  quiet:")] + text[text.index("sandboxes:") :]
        policy_file.write_text(without_quiet.replace("policies: [local, quiet]", "policies: [local]"))
        r = c.post("/v1/policy/reload")
        assert r.status_code == 422
        [issue] = r.json()["issues"]
        assert issue["location"].startswith(str(gw.tmp / "state" / "sandboxes.json") + ":")
        assert "unknown policy 'quiet'" in issue["message"]
        assert c.get("/v1/sandboxes/keep-me").status_code == 200
        assert c.get("/v1/policy").json()["policies"].get("quiet") == ["quiet-deny-forbidden"]


# -- reading --------------------------------------------------------------------------------------------------------


def test_policy_view_names_credentials_never_values(gw: LocalGateway) -> None:
    with gw.unix() as c:
        view = c.get("/v1/policy").json()
    assert view["credentials"] == [
        {"name": "local-key", "injector": "header"},
        {"name": "missing-key", "injector": "header"},
    ]
    assert view["policies"]["local"] == ["local-inject", "local-missing", "local-any"]
    assert view["rule_count"] == 4 and view["files"] == [str(gw.policy_path)]


def test_no_answer_carries_a_secret_or_the_ca_key(gw: LocalGateway, registered: list[str]) -> None:
    assert gw.proxy(gw.upstream("/inject/leak")).status_code == 200  # the secret is in use (and cached)
    ca_key = (gw.tmp / "state" / "ca" / "mitmproxy-ca.pem").read_text()
    key_lines = [ln for ln in ca_key.splitlines() if ln and not ln.startswith("-----")][:3]
    registered.append("leak-sb")
    bodies = []
    with gw.unix() as c:
        bodies.append(c.put("/v1/sandboxes/leak-sb", json={"policies": ["local"], "token": SANDBOX_TOKEN}).text)
        for path in [
            "/v1/health",
            "/v1/ready",
            "/v1/sandboxes",
            "/v1/sandboxes/leak-sb",
            "/v1/policy",
            "/v1/decisions?limit=1000",
            "/metrics",
            "/v1/openapi.json",
        ]:
            bodies.append(c.get(path).text)
        bodies.append(c.post("/v1/policy/reload").text)
    everything = "\n".join(bodies)
    assert "local-key" in everything  # the credential is named...
    for needle in [SECRET_VALUE, SANDBOX_TOKEN, ADMIN_TOKEN, "PRIVATE KEY", *key_lines]:
        assert needle not in everything  # ...but no value, token or key is ever answered


def test_recent_decisions_filters(gw: LocalGateway) -> None:
    base = f"http://127.0.0.1:{gw.upstream_port}"
    assert gw.proxy(f"{base}/forbidden/x").status_code == 403
    assert gw.proxy(f"{base}/ok").status_code == 200
    with gw.unix() as c:
        newest = c.get("/v1/decisions", params={"limit": 2}).json()["decisions"]
        assert [d["path"] for d in newest] == ["/ok", "/forbidden/x"]  # newest first
        denies = c.get("/v1/decisions", params={"verdict": "deny"}).json()["decisions"]
        assert denies and all(d["verdict"] == "deny" for d in denies)
        assert denies[0]["rule"] == "quiet-deny-forbidden" and denies[0]["reason"] == "denied_by_rule"
        assert c.get("/v1/decisions", params={"sandbox": "nobody"}).json()["decisions"] == []
        for bad in [{"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"verdict": "maybe"}, {"sandbox": "-x"}]:
            r = c.get("/v1/decisions", params=bad)
            assert r.status_code == 422, bad
            assert r.json()["issues"][0]["location"] == f"query.{next(iter(bad))}"


def test_readiness_names_the_credential_it_cannot_serve(gw: LocalGateway) -> None:
    with gw.unix() as c:
        r = c.get("/v1/ready")
        assert r.status_code == 503
        checks = {ch["name"]: ch for ch in r.json()["checks"]}
        assert checks["policy"]["ok"] and checks["proxy"]["ok"]
        assert not checks["secrets"]["ok"] and "'missing-key'" in checks["secrets"]["detail"]
        secrets = gw.tmp / "secrets.yaml"
        original = secrets.read_text()
        secrets.write_text(original + "local/missing: another-secret-value-0000\n")
        try:
            r = c.get("/v1/ready")
            assert r.status_code == 200 and r.json()["ready"] is True
            assert "another-secret-value" not in r.text
        finally:
            secrets.write_text(original)


# -- a sandbox cannot reach the admin API -------------------------------------------------------------------------


def test_a_sandbox_cannot_reach_the_admin_api_through_the_proxy(gw: LocalGateway) -> None:
    # The rule allows any loopback port (the upstream answers), but the admin port is the gateway's own.
    assert gw.proxy(f"http://127.0.0.1:{gw.upstream_port}/").status_code == 200
    r = gw.proxy(f"http://127.0.0.1:{gw.admin_port}/v1/sandboxes")
    assert r.status_code == 403
    assert r.json() == {"rule": None, "reason": "gateway_loop"}
    # Nor through a name that resolves to it, on a path a rule allows (local-inject: upstream.test /inject/**).
    r = gw.proxy(f"http://upstream.test:{gw.admin_port}/inject/v1/sandboxes")
    assert r.status_code == 403 and r.json()["reason"] == "gateway_loop"
    with gw.unix() as c:
        latest = c.get("/v1/decisions", params={"limit": 1}).json()["decisions"][0]
    assert latest["reason"] == "gateway_loop" and latest["port"] == gw.admin_port


def test_openapi_document_covers_every_route(gw: LocalGateway) -> None:
    with gw.unix() as c:
        doc = c.get("/v1/openapi.json").json()
    app = gw.gateway.admin.app  # type: ignore[union-attr]
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    assert json.dumps(doc).count("$ref") > 10


@pytest.mark.netns
def test_admin_api_is_unreachable_from_a_sandbox_namespace(world: World, tmp_path: Path) -> None:
    """In the hermetic world: the admin API on the gateway namespace's loopback answers there, and nothing of it is
    reachable from the sandbox namespace, directly or through the proxy."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN)
    token_file.chmod(0o600)
    admin = {"tcp": {"host": "127.0.0.1", "port": 9180}, "token_file": str(token_file)}
    with gateway_process(world, tmp_path, "explicit", port=3140, extra={"admin": admin}) as gw_proc:
        probe = (
            "import urllib.request\n"
            "req = urllib.request.Request('http://127.0.0.1:9180/v1/sandboxes', "
            f"headers={{'Authorization': 'Bearer {ADMIN_TOKEN}'}})\n"
            "print(urllib.request.urlopen(req, timeout=5).status)\n"
        )
        assert world.python("gateway", probe).stdout.strip() == "200"  # it is there...
        for url in ("http://10.200.0.1:9180/v1/health", "http://127.0.0.1:9180/v1/health"):
            direct = world.curl(["-o", "/dev/null", "-w", "%{http_code}", url])
            assert direct.returncode != 0 and direct.stdout in ("", "000"), url  # ...but not from the sandbox
        proxied = world.curl(["-w", "\n%{http_code}", "http://127.0.0.1:9180/v1/health"], proxy=gw_proc.proxy_url)
        body, _, code = proxied.stdout.rpartition("\n")
        assert code == "403" and '"reason"' in body
        assert not any(r.get("upstream_address") for r in gw_proc.records(event="decision"))
