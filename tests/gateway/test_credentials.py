"""Credentials end to end: real OpenBao (AppRole), real PostgreSQL behind OpenBao's database engine, real clients and
SDKs in the sandbox, and upstreams that check what they received (a fake S3 that verifies SigV4 with the real keys,
OpenAI/Anthropic-compatible servers that demand the real key and echo it back, an OAuth2 token endpoint, an API that
accepts a request only if its credential logs in to PostgreSQL).

The sandbox only ever holds placeholders and dummy keys. The last test greps every byte the sandbox received, the
gateway logged and the audit recorded for every secret value used here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.gateway.harness import (
    InThreadGateway,
    RunningGateway,
    gateway_in_thread,
    gateway_process,
    hosts_for_sandbox,
    request,
)
from tests.support import openbao as openbao_mod
from tests.support import postgres as postgres_mod
from tests.support.apis import FakeApis, start_fake_apis
from tests.support.openbao import OpenBao
from tests.support.postgres import Postgres
from tests.support.world import World

pytestmark = [pytest.mark.netns, pytest.mark.gateway]

OPENAI_KEY = "sk-real-openai-e2e-7c1e9d0a4b3c5f2b"
ANTHROPIC_KEY = "sk-ant-real-e2e-2c3b4a5968778e1d"
S3_AK = "AKIACXEE2EREAL000001"
S3_SK = "cxeE2ERealSecret/0123456789abcdefghijklmn"
OAUTH = {"client_id": "cxe-e2e-client", "client_secret": "cxe-e2e-client-secret-0123", "expires_in": 4}
STATIC = {"token": "static-token-e2e-0123456789abcdef"}
BASIC = {"username": "svc-e2e", "password": "basic-password-e2e-0123456789"}
PLACEHOLDER_SECRET = 'ph-secret-e2e/"quote&amp-0123456789'
SB2_TOKEN = "sb2-proxy-token-e2e"
APIS_IP = "198.51.100.33"
NAMES = [
    "api.openai.com",
    "api.anthropic.com",
    "s3.example.test",
    "*.s3.example.test",
    "auth.example.test",
    "api.oauth.example.test",
    "db-check.example.test",
    "echo.apis.example.test",
]
ALL_SECRETS = [
    OPENAI_KEY,
    ANTHROPIC_KEY,
    S3_SK,
    OAUTH["client_secret"],
    STATIC["token"],
    BASIC["password"],
    PLACEHOLDER_SECRET,
]


def _policy(tmp: Path) -> Path:
    doc = {
        "version": 1,
        "credentials": {
            "openai": {
                "secret": "llm/openai#api_key",
                "injector": {"kind": "placeholder", "placeholder": "cex_ph_openai"},
            },
            "anthropic": {
                "secret": "llm/anthropic#api_key",
                "injector": {"kind": "placeholder", "placeholder": "cex_ph_anthropic"},
            },
            "echo-header": {"secret": "static/echo#token", "injector": {"kind": "header", "header": "X-Api-Key"}},
            "echo-basic": {"secret": "static/basic", "injector": {"kind": "basic"}},
            "echo-query": {"secret": "static/echo#token", "injector": {"kind": "query", "param": "api_key"}},
            "echo-ph": {
                "secret": "static/ph#value",
                "injector": {"kind": "placeholder", "placeholder": "cex_ph_echo", "in_body": True},
            },
            "s3": {"secret": "aws/s3", "injector": {"kind": "aws_sigv4", "region": "us-east-1", "service": "s3"}},
            "oauth": {
                "secret": "oauth/client",
                "injector": {"kind": "oauth2_client_credentials", "token_url": "https://auth.example.test/oauth/token"},
            },
            "db": {"secret": "dynamic:database/creds/app-ro", "injector": {"kind": "basic"}},
        },
        "policies": {
            "creds": {
                "rules": [
                    {
                        "id": "openai",
                        "action": "allow",
                        "hosts": ["api.openai.com"],
                        "paths": [{"prefix": "/v1/"}],
                        "credential": "openai",
                    },
                    {
                        "id": "anthropic",
                        "action": "allow",
                        "hosts": ["api.anthropic.com"],
                        "paths": [{"prefix": "/v1/"}],
                        "credential": "anthropic",
                    },
                    {
                        "id": "echo-header",
                        "action": "allow",
                        "hosts": ["echo.apis.example.test"],
                        "paths": ["/header/**"],
                        "credential": "echo-header",
                    },
                    {
                        "id": "echo-basic",
                        "action": "allow",
                        "hosts": ["echo.apis.example.test"],
                        "paths": ["/basic/**"],
                        "credential": "echo-basic",
                    },
                    {
                        "id": "echo-query",
                        "action": "allow",
                        "hosts": ["echo.apis.example.test"],
                        "paths": ["/query/**"],
                        "credential": "echo-query",
                    },
                    {
                        "id": "echo-ph",
                        "action": "allow",
                        "hosts": ["echo.apis.example.test"],
                        "paths": ["/ph/**"],
                        "credential": "echo-ph",
                    },
                    {
                        "id": "echo-plain",
                        "action": "allow",
                        "hosts": ["echo.apis.example.test"],
                        "paths": ["/plain/**"],
                    },
                    {
                        "id": "s3",
                        "action": "allow",
                        "hosts": ["s3.example.test", "*.s3.example.test"],
                        "credential": "s3",
                    },
                    {"id": "oauth-api", "action": "allow", "hosts": ["api.oauth.example.test"], "credential": "oauth"},
                    {
                        "id": "db",
                        "action": "allow",
                        "hosts": ["db-check.example.test"],
                        "paths": ["/check"],
                        "credential": "db",
                    },
                    {"id": "apis-address", "action": "allow", "cidrs": [f"{APIS_IP}/32"]},
                ]
            }
        },
        "sandboxes": [
            {"id": "sb", "sources": ["10.200.0.2/32"], "policies": ["creds"]},
            {"id": "sb2", "token_sha256": hashlib.sha256(SB2_TOKEN.encode()).hexdigest(), "policies": ["creds"]},
        ],
    }
    path = tmp / "creds.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class Env:
    bao: OpenBao
    pg: Postgres
    apis: FakeApis
    explicit: RunningGateway
    explicit_handle: InThreadGateway
    transparent: RunningGateway
    received: list[str] = field(default_factory=list)  # everything the sandbox saw, for the leak test


@pytest.fixture(scope="module")
def env(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    for reason in (openbao_mod.unavailable_reason(), postgres_mod.unavailable_reason()):
        if reason:
            pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("creds")
    with Postgres(world) as pg, OpenBao(world) as bao:
        bao.kv_put("secret", "llm/openai", {"api_key": OPENAI_KEY})
        bao.kv_put("secret", "llm/anthropic", {"api_key": ANTHROPIC_KEY})
        bao.kv_put("secret", "static/echo", STATIC)
        bao.kv_put("secret", "static/basic", BASIC)
        bao.kv_put("secret", "static/ph", {"value": PLACEHOLDER_SECRET})
        bao.kv_put("secret", "aws/s3", {"access_key_id": S3_AK, "secret_access_key": S3_SK})
        bao.kv_put("secret", "oauth/client", {"client_id": OAUTH["client_id"], "client_secret": OAUTH["client_secret"]})
        bao.enable_database(pg, "app-ro", default_ttl="2m", max_ttl="10m")
        role_id, secret_id = bao.approle(
            "cube-egress",
            'path "secret/data/*" { capabilities = ["read"] }\n'
            'path "database/creds/*" { capabilities = ["read"] }\n'
            'path "sys/leases/renew" { capabilities = ["update"] }\n'
            'path "sys/leases/revoke" { capabilities = ["update"] }\n',
            token_ttl="2m",
            token_max_ttl="10m",
        )
        secret_id_file = tmp / "secret-id"
        secret_id_file.write_text(secret_id)
        secret_id_file.chmod(0o600)
        secrets = {
            "backend": "vault",
            "vault": {
                "address": bao.addr,
                "auth": {"method": "approle", "role_id": role_id, "secret_id_file": str(secret_id_file)},
            },
            # Refreshed at half its life, a cached value always has >= 4 s left: more than stopping OpenBao takes,
            # so "cached values keep serving" is deterministic in the outage test.
            "cache_ttl_s": 8.0,
            "refresh_ahead": 0.5,
        }
        expected = {
            "openai_key": OPENAI_KEY,
            "anthropic_key": ANTHROPIC_KEY,
            "s3": {"access_key": S3_AK, "secret_key": S3_SK},
            "oauth": OAUTH,
            "pg": pg,
        }
        policy = _policy(tmp)
        with (
            start_fake_apis(world, NAMES, APIS_IP, expected) as apis,
            gateway_in_thread(
                world,
                tmp / "explicit",
                "explicit",
                3140,
                policies=[policy],
                secrets=secrets,
                log_file=tmp / "explicit.log",
            ) as (explicit, explicit_handle),
            gateway_process(
                world, tmp / "transparent", "transparent", port=8090, policies=[policy], secrets=secrets
            ) as transparent,
        ):
            hosts_for_sandbox(world, {name: APIS_IP for name in NAMES if not name.startswith("*")})
            yield Env(bao, pg, apis, explicit, explicit_handle, transparent)


def _sees(env: Env, text: str) -> str:
    env.received.append(text)
    return text


def _upstream_saw(env: Env, host: str, path_prefix: str) -> dict[str, object]:
    entries = [e for e in env.apis.requests(host=host) if str(e.get("path", "")).startswith(path_prefix)]
    assert entries, f"upstream saw nothing for {host}{path_prefix}"
    return entries[-1]


# -- static KV credentials with curl, requests and httpx ------------------------------------------------------------


@pytest.mark.parametrize("client", ["curl", "requests", "httpx"])
def test_header_basic_query_injection(world: World, env: Env, client: str) -> None:
    gw = env.explicit
    gw.mark()
    env.apis.clear_log()
    r = request(
        world,
        client,
        "GET",
        "https://echo.apis.example.test/header/x",
        gateway=gw,
        headers={"X-Api-Key": "sandbox-guess", "Accept-Encoding": "gzip"},
    )
    _sees(env, r.body)
    assert r.status == 200, r
    seen = _upstream_saw(env, "echo.apis.example.test", "/header/")
    assert FakeApis.header(seen, "x-api-key") == STATIC["token"]
    # A compressed echo would slip past the redactor: requests carrying a credential ask for no compression.
    assert FakeApis.header(seen, "accept-encoding") == "identity"
    assert STATIC["token"] not in r.body  # the echo came back redacted

    r = request(world, client, "GET", "https://echo.apis.example.test/basic/x", gateway=gw)
    _sees(env, r.body)
    seen = FakeApis.header(_upstream_saw(env, "echo.apis.example.test", "/basic/"), "authorization")
    assert seen == "Basic " + base64.b64encode(f"{BASIC['username']}:{BASIC['password']}".encode()).decode()
    assert BASIC["password"] not in r.body and (seen or "")[6:] not in r.body

    r = request(world, client, "GET", "https://echo.apis.example.test/query/x?api_key=guess&q=1", gateway=gw)
    _sees(env, r.body)
    assert str(_upstream_saw(env, "echo.apis.example.test", "/query/")["path"]).endswith(
        f"q=1&api_key={STATIC['token']}"
    )
    records = gw.records(event="decision", host="echo.apis.example.test")
    assert [r["credential"] for r in records] == ["echo-header", "echo-basic", "echo-query"]
    assert all(len(r["credential_fingerprint"]) == 32 and r["echo_redactions"] >= 1 for r in records)
    assert gw.records(event="security", kind="secret_echo")


@pytest.mark.parametrize("client", ["curl", "requests", "httpx"])
def test_placeholder_in_header_query_path_json_and_form(world: World, env: Env, client: str) -> None:
    gw = env.explicit
    env.apis.clear_log()
    r = request(
        world,
        client,
        "POST",
        "https://echo.apis.example.test/ph/cex_ph_echo/x?k=cex_ph_echo",
        gateway=gw,
        headers={"Authorization": "Bearer cex_ph_echo", "Content-Type": "application/json"},
        data=json.dumps({"key": "cex_ph_echo"}),
    )
    _sees(env, r.body)
    assert r.status == 200, r
    seen = _upstream_saw(env, "echo.apis.example.test", "/ph/")
    assert FakeApis.header(seen, "authorization") == f"Bearer {PLACEHOLDER_SECRET}"
    encoded = "ph-secret-e2e%2F%22quote%26amp-0123456789"
    assert seen["path"] == f"/ph/{encoded}/x?k={encoded}"
    assert json.loads(str(seen["body"]))["key"] == PLACEHOLDER_SECRET
    form = request(
        world,
        client,
        "POST",
        "https://echo.apis.example.test/ph/form",
        gateway=gw,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        data="a=1&token=cex_ph_echo",
    )
    _sees(env, form.body)
    assert _upstream_saw(env, "echo.apis.example.test", "/ph/form")["body"] == (
        "a=1&token=ph-secret-e2e%2F%22quote%26amp-0123456789"
    )


def test_placeholder_sent_where_it_is_not_bound_is_refused(world: World, env: Env) -> None:
    gw = env.explicit
    gw.mark()
    env.apis.clear_log()
    for url, headers, data in [
        ("https://echo.apis.example.test/plain/x", {"Authorization": "Bearer cex_ph_openai"}, None),
        ("https://echo.apis.example.test/plain/x?k=cex_ph_openai", {}, None),
        ("https://echo.apis.example.test/header/cex_ph_echo", {}, None),
        ("https://echo.apis.example.test/plain/x", {"Content-Type": "application/json"}, '{"k": "cex_ph_openai"}'),
    ]:
        r = request(world, "curl", "POST", url, gateway=gw, headers=headers, data=data)
        assert r.status == 403 and r.json()["reason"] == "credential_endpoint_mismatch", (url, r)
    assert not env.apis.requests(host="echo.apis.example.test")  # never forwarded
    assert len(gw.records(event="security", kind="credential_endpoint_mismatch")) == 4


# -- SigV4 re-signing with boto3 -------------------------------------------------------------------------------------

_BOTO = r"""
import io, json, sys
import boto3
from botocore.config import Config
proxy, ca, endpoint = json.loads(sys.argv[1])
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="cex-dummy", aws_secret_access_key="dummy-secret",
                  region_name="us-east-1", verify=ca,
                  config=Config(proxies={"https": proxy}, s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
out = {}
s3.create_bucket(Bucket="artifacts")
s3.put_object(Bucket="artifacts", Key="small.txt", Body=b"hello from the sandbox")
out["get"] = s3.get_object(Bucket="artifacts", Key="small.txt")["Body"].read().decode()
big = bytes(range(256)) * (6 * 4096)
s3.upload_fileobj(io.BytesIO(big), "artifacts", "big.bin")
out["big"] = len(s3.get_object(Bucket="artifacts", Key="big.bin")["Body"].read()) == len(big)
out["keys"] = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="artifacts").get("Contents", []))
print(json.dumps(out))
"""


def test_boto3_s3_through_sigv4_resigning(world: World, env: Env) -> None:
    gw = env.explicit
    args = json.dumps([gw.proxy_url, str(gw.trust_bundle), "https://s3.example.test"])
    proc = world.run("sandbox", [sys.executable, "-c", _BOTO, args], timeout=120)
    _sees(env, proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"get": "hello from the sandbox", "big": True, "keys": ["big.bin", "small.txt"]}
    # Without the gateway's re-signing the fake S3 refuses the sandbox's dummy signature (proved in
    # tests/test_support_services.py); here every request it received carried the real access key id.
    auths = [FakeApis.header(e, "authorization") or "" for e in env.apis.requests(host="s3.example.test")]
    assert auths and all(f"Credential={S3_AK}/" in a for a in auths)


# -- SDKs through transparent mode, streaming included -----------------------------------------------------------------

_SDKS = r"""
import json, ssl, sys
import httpx, openai, anthropic
ca, = json.loads(sys.argv[1])
out = {}
oa = openai.OpenAI(api_key="cex_ph_openai", http_client=httpx.Client(verify=ca, trust_env=False))
r = oa.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
out["openai"] = r.choices[0].message.content
chunks = oa.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
out["openai_stream"] = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
an_http = anthropic.DefaultHttpxClient(verify=ca, trust_env=False)
an = anthropic.Anthropic(api_key="cex_ph_anthropic", http_client=an_http)
m = an.messages.create(model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
out["anthropic"] = "".join(b.text for b in m.content if b.type == "text")
with an.messages.stream(model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as s:
    out["anthropic_stream"] = "".join(s.text_stream)
print(json.dumps(out))
"""


def test_openai_and_anthropic_sdks_transparent_with_placeholders(world: World, env: Env) -> None:
    gw = env.transparent
    gw.mark()
    proc = world.run("sandbox", [sys.executable, "-c", _SDKS, json.dumps([str(gw.trust_bundle)])], timeout=120)
    _sees(env, proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("openai", "openai_stream", "anthropic", "anthropic_stream"):
        assert out[name], name  # the upstream accepted the real key and answered
        assert OPENAI_KEY not in out[name] and ANTHROPIC_KEY not in out[name]
    # The echo services put the key into their answers; the sandbox got it overwritten.
    assert "*" * 10 in out["openai"] and "*" * 10 in out["openai_stream"]
    seen = [FakeApis.header(e, "authorization") for e in env.apis.requests(host="api.openai.com")]
    assert f"Bearer {OPENAI_KEY}" in seen
    records = gw.records(event="decision", host="api.openai.com")
    assert records and all(r["credential"] == "openai" and r["echo_redactions"] >= 1 for r in records)


# -- OAuth2 client credentials ----------------------------------------------------------------------------------------


def test_oauth2_tokens_are_cached_and_refreshed(world: World, env: Env) -> None:
    gw = env.explicit
    before = env.apis.oauth_stats()
    statuses = []
    for _ in range(3):
        statuses.append(request(world, "curl", "GET", "https://api.oauth.example.test/data", gateway=gw).status)
    mid = env.apis.oauth_stats()
    assert statuses == [200, 200, 200]
    assert mid["issued"] - before["issued"] <= 1  # one token served all three
    time.sleep(float(OAUTH["expires_in"]) + 1)  # past the token's lifetime: the next use gets a fresh one
    r = request(world, "curl", "GET", "https://api.oauth.example.test/data", gateway=gw)
    _sees(env, r.body)
    assert r.status == 200
    assert env.apis.oauth_stats()["issued"] > mid["issued"]


# -- dynamic database credentials, leased per sandbox ------------------------------------------------------------------


def _basic_user(entry: dict[str, object]) -> tuple[str, str]:
    value = FakeApis.header(entry, "authorization") or ""
    user, _, password = base64.b64decode(value.split()[1]).decode().partition(":")
    return user, password


def test_dynamic_db_credentials_per_sandbox_revoked_at_unregister(world: World, env: Env) -> None:
    gw = env.explicit
    env.apis.clear_log()
    first = request(world, "curl", "GET", "https://db-check.example.test/check", gateway=gw)
    again = request(world, "curl", "GET", "https://db-check.example.test/check", gateway=gw)
    other = request(
        world, "curl", "GET", "https://db-check.example.test/check", gateway=gw, proxy_user=f"agent:{SB2_TOKEN}"
    )
    assert (first.status, again.status, other.status) == (200, 200, 200), (first, other)
    entries = env.apis.requests(host="db-check.example.test")
    (u1, p1), (u1b, _), (u2, p2) = (_basic_user(e) for e in entries)
    assert u1 == u1b and u1 != u2  # one lease per sandbox, reused; never shared
    assert env.pg.can_login(u1, p1) and env.pg.can_login(u2, p2)
    leases = env.bao.leases("database/creds/app-ro")
    assert len(leases) >= 2
    revoked = env.explicit_handle.call(env.explicit_handle.gateway.unregister_sandbox("sb"))
    assert revoked == 1
    assert not env.pg.can_login(u1, p1)  # revoked in OpenBao, so PostgreSQL dropped the role
    assert env.pg.can_login(u2, p2)  # the other sandbox keeps its own
    refused = request(world, "curl", "GET", "https://db-check.example.test/check", gateway=gw)
    assert refused.status == 503 and refused.json()["reason"] == "secret_unavailable"
    env.explicit_handle.gateway.register_sandbox("sb")
    back = request(world, "curl", "GET", "https://db-check.example.test/check", gateway=gw)
    assert back.status == 200
    (u3, _) = _basic_user(env.apis.requests(host="db-check.example.test")[-1])
    assert u3 not in (u1, u2)


# -- OpenBao outage -------------------------------------------------------------------------------------------------


def test_openbao_outage_cached_then_fail_closed_then_recovers(world: World, env: Env) -> None:
    gw = env.explicit
    url = "https://echo.apis.example.test/header/outage"
    assert request(world, "curl", "GET", url, gateway=gw).status == 200
    env.bao.stop()
    try:
        # Cached values keep serving for their TTL ...
        assert request(world, "curl", "GET", url, gateway=gw).status == 200
        deadline = time.monotonic() + 20
        status = 200
        while status == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
            r = request(world, "curl", "GET", url, gateway=gw)
            status = r.status or 0
        # ... then requests that need them fail closed, with a reason.
        assert status == 503 and r.json() == {"rule": "echo-header", "reason": "secret_unavailable"}
        assert gw.records(event="security", kind="secret_unavailable")
    finally:
        env.bao.restart()
    deadline = time.monotonic() + 20
    status = 0
    while status != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
        status = request(world, "curl", "GET", url, gateway=gw).status or 0
    assert status == 200  # recovered without restarting the gateway


# -- the leak test: last, over everything this module captured -------------------------------------------------


def test_zz_no_secret_byte_anywhere(env: Env) -> None:
    haystacks = {
        "sandbox": "\n".join(env.received),
        "explicit audit": env.explicit.audit_path.read_text(),
        "transparent audit": env.transparent.audit_path.read_text(),
        "explicit log": env.explicit.log_text(),
        "transparent log": env.transparent.log_text(),
    }
    # Each haystack really holds what it should (a vacuous grep proves nothing).
    assert all(len(text) > 200 for text in haystacks.values()), {k: len(v) for k, v in haystacks.items()}
    assert '"credential":"openai"' in haystacks["transparent audit"]
    for name, text in haystacks.items():
        for secret in ALL_SECRETS:
            for form in (secret, base64.b64encode(secret.encode()).decode()):
                assert form not in text, f"{name} contains a secret"
