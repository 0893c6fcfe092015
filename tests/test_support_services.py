"""Self-checks of the test services in tests/support: OpenBao, PostgreSQL, the fake third-party APIs, runtime DNS.

These prove the *instruments* before gateway tests rely on them: a fake S3 that accepted any signature, or an echo
service that never split the key across writes, would make the gateway's tests pass for the wrong reason. Every
client here talks to the services directly from the gateway namespace; no gateway is involved.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import socket
import ssl
import textwrap
import time
from collections.abc import Iterator
from email.message import Message
from typing import Any

import pytest

from tests.support import openbao as openbao_mod
from tests.support import postgres as postgres_mod
from tests.support.apis import FakeApis, start_fake_apis
from tests.support.fake_apis import verify_sigv4
from tests.support.netns import NetnsThread
from tests.support.openbao import OpenBao, OpenBaoError
from tests.support.postgres import Postgres
from tests.support.world import DNS_IP, World

OPENAI_KEY = "sk-real-openai-5f2b7c1e9d0a4b3c"
ANTHROPIC_KEY = "sk-ant-real-8e1d2c3b4a596877"
S3_AK = "AKIACXEREALKEY000001"
S3_SK = "cxeRealSecret/0123456789abcdefghijklmnopqr"
OAUTH = {"client_id": "cxe-client", "client_secret": "cxe-client-secret", "expires_in": 30}
APIS_IP = "198.51.100.30"
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


# ---------------------------------------------------------------------------------------------------------------
# The SigV4 verifier against AWS's published examples (pure: no namespaces). This is what makes "the fake S3 says
# the signature is right" trustworthy: the verifier reproduces AWS's own numbers.

_AWS_SK = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
_AWS_CFG = {"access_key": "AKIAIOSFODNN7EXAMPLE", "secret_key": _AWS_SK}


def _msg(pairs: list[tuple[str, str]]) -> Message:
    m = Message()
    for k, v in pairs:
        m[k] = v
    return m


def test_sigv4_verifier_matches_aws_get_object_example() -> None:
    # "Example: GET Object" from the AWS SigV4 for S3 documentation (header-based auth).
    sig = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    auth = (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
        f"SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature={sig}"
    )
    headers = [
        ("Host", "examplebucket.s3.amazonaws.com"),
        ("Range", "bytes=0-9"),
        ("x-amz-content-sha256", hashlib.sha256(b"").hexdigest()),
        ("x-amz-date", "20130524T000000Z"),
        ("Authorization", auth),
    ]
    ok = verify_sigv4("GET", "examplebucket.s3.amazonaws.com", "/test.txt", _msg(headers), b"", _AWS_CFG)
    assert ok.error == "", ok.message
    wrong = verify_sigv4(
        "GET", "examplebucket.s3.amazonaws.com", "/test.txt", _msg(headers), b"", {**_AWS_CFG, "secret_key": "x"}
    )
    assert wrong.error == "SignatureDoesNotMatch"
    assert "CanonicalRequest" in wrong.details  # like S3, the error explains what was signed


def test_sigv4_verifier_checks_every_signed_chunk() -> None:
    # "Example: PUT Object" with STREAMING-AWS4-HMAC-SHA256-PAYLOAD (seed + 3 chunk signatures) from the AWS docs.
    sigs = [
        "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
        "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
        "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
    ]
    body = (
        f"10000;chunk-signature={sigs[0]}\r\n".encode()
        + b"a" * 65536
        + f"\r\n400;chunk-signature={sigs[1]}\r\n".encode()
        + b"a" * 1024
        + f"\r\n0;chunk-signature={sigs[2]}\r\n\r\n".encode()
    )
    assert len(body) == 66824
    auth = (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders="
        "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
        "x-amz-storage-class,Signature=4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
    )
    headers = [
        ("Host", "s3.amazonaws.com"),
        ("x-amz-date", "20130524T000000Z"),
        ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
        ("Authorization", auth),
        ("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
        ("Content-Encoding", "aws-chunked"),
        ("x-amz-decoded-content-length", "66560"),
        ("Content-Length", "66824"),
    ]
    target = "/examplebucket/chunkObject.txt"
    ok = verify_sigv4("PUT", "s3.amazonaws.com", target, _msg(headers), body, _AWS_CFG)
    assert ok.error == "", ok.message
    assert ok.payload == b"a" * 66560
    tampered = body.replace(b"a" * 8, b"b" * 8, 1)
    bad = verify_sigv4("PUT", "s3.amazonaws.com", target, _msg(headers), tampered, _AWS_CFG)
    assert bad.error == "SignatureDoesNotMatch"
    assert "chunk signature" in bad.message


# ---------------------------------------------------------------------------------------------------------------
# fixtures (module scope: each service starts once for this file)


@pytest.fixture(scope="module")
def pg(world: World) -> Iterator[Postgres]:
    reason = postgres_mod.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Postgres(world) as server:
        yield server


@pytest.fixture(scope="module")
def bao(world: World) -> Iterator[OpenBao]:
    reason = openbao_mod.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with OpenBao(world) as server:
        yield server


@pytest.fixture(scope="module")
def apis(world: World, pg: Postgres) -> Iterator[FakeApis]:
    expected = {
        "openai_key": OPENAI_KEY,
        "anthropic_key": ANTHROPIC_KEY,
        "s3": {"access_key": S3_AK, "secret_key": S3_SK},
        "oauth": OAUTH,
        "pg": pg,
        "stream_delay": 0.01,
    }
    with start_fake_apis(world, NAMES, APIS_IP, expected) as handle:
        yield handle


@pytest.fixture(scope="module")
def gw_thread(world: World) -> Iterator[NetnsThread]:
    with NetnsThread(world, "gateway") as t:
        yield t


def _py(world: World, code: str, timeout: float = 60) -> str:
    """Run a snippet in the gateway namespace (names resolve through the world's DNS); fail with its stderr."""
    res = world.python("gateway", textwrap.dedent(code), timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return str(res.stdout)


def _https(
    ip: str,
    host: str,
    ca: str,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """HTTPS to ``ip`` presenting ``host`` (for use inside a NetnsThread: no DNS there)."""
    ctx = ssl.create_default_context(cafile=ca)
    conn = http.client.HTTPSConnection(host, 443, context=ctx, timeout=10)
    conn.sock = ctx.wrap_socket(socket.create_connection((ip, 443), timeout=10), server_hostname=host)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _raw_chunks(ip: str, host: str, ca: str, path: str, headers: dict[str, str], body: bytes) -> list[bytes]:
    """Send one request and return the response body's HTTP chunks exactly as framed on the wire."""
    ctx = ssl.create_default_context(cafile=ca)
    with ctx.wrap_socket(socket.create_connection((ip, 443), timeout=10), server_hostname=host) as s:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(head.encode() + b"\r\n" + body)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    status_headers, _, rest = raw.partition(b"\r\n\r\n")
    assert b" 200 " in status_headers.split(b"\r\n", 1)[0], status_headers
    assert b"transfer-encoding: chunked" in status_headers.lower()
    chunks: list[bytes] = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        rest = rest[size + 2 :]


# ---------------------------------------------------------------------------------------------------------------
# runtime DNS


@pytest.mark.netns
def test_dns_names_can_be_added_and_removed_at_runtime(world: World, gw_thread: NetnsThread) -> None:
    import dns.message
    import dns.query
    import dns.rcode

    def ask(name: str) -> tuple[int, list[str]]:
        q = dns.message.make_query(name, "A")
        r = gw_thread.call(dns.query.udp, q, DNS_IP, 2)
        return r.rcode(), [item.address for rrset in r.answer for item in rrset]

    name = "runtime-added.example.test"
    assert ask(name)[0] == dns.rcode.NXDOMAIN
    world.add_dns({name: "198.51.100.77"})
    try:
        assert ask(name) == (dns.rcode.NOERROR, ["198.51.100.77"])
        world.add_dns({name: ["198.51.100.78", "198.51.100.79"]})
        assert sorted(ask(name)[1]) == ["198.51.100.78", "198.51.100.79"]
    finally:
        world.remove_dns(name)
    assert ask(name)[0] == dns.rcode.NXDOMAIN
    assert ask("api.example.test") == (dns.rcode.NOERROR, ["198.51.100.10"])  # the built-in zone is untouched


# ---------------------------------------------------------------------------------------------------------------
# OpenBao


@pytest.mark.netns
def test_openbao_kv_v2_kv_v1_and_approle(bao: OpenBao) -> None:
    assert bao.kv_put("secret", "selfcheck/openai", {"api_key": "sk-one"}) == 1
    assert bao.kv_put("secret", "selfcheck/openai", {"api_key": "sk-two"}) == 2
    assert bao.kv_get("secret", "selfcheck/openai") == {"api_key": "sk-two"}
    bao.enable_kv1("kv1selfcheck")
    assert bao.kv_put("kv1selfcheck", "svc/db", {"password": "pw"}) is None
    assert bao.kv_get("kv1selfcheck", "svc/db") == {"password": "pw"}

    hcl = 'path "secret/data/selfcheck/*" { capabilities = ["read"] }'
    role_id, secret_id = bao.approle("selfcheck-gw", hcl, token_ttl="2m", token_max_ttl="5m")
    auth = bao.approle_login(role_id, secret_id)
    assert "selfcheck-gw" in auth["policies"]
    assert auth["lease_duration"] == 120
    token = auth["client_token"]
    assert bao.kv_get("secret", "selfcheck/openai", token=token) == {"api_key": "sk-two"}
    with pytest.raises(OpenBaoError) as denied:
        bao.kv_get("kv1selfcheck", "svc/db", token=token)
    assert denied.value.status == 403
    with pytest.raises(OpenBaoError) as bad_login:
        bao.approle_login(role_id, "not-the-secret-id")
    assert bad_login.value.status in (400, 403)

    # The real CLI in the gateway namespace sees the same server.
    out = bao.bao("kv", "get", "-format=json", "secret/selfcheck/openai", token=token).stdout
    assert json.loads(out)["data"]["data"] == {"api_key": "sk-two"}


@pytest.mark.netns
def test_openbao_outage_and_recovery_replays_configuration(world: World) -> None:
    with OpenBao(world) as b:
        port = b.port
        b.kv_put("secret", "svc", {"k": "v1"})
        role_id, secret_id = b.approle("replay", 'path "secret/data/*" { capabilities = ["read"] }')
        fixed = b.create_token(["replay"], ttl="1h")
        old_login = b.approle_login(role_id, secret_id)["client_token"]

        b.stop()
        with pytest.raises(OpenBaoError) as down:
            b.kv_get("secret", "svc")
        assert down.value.status == 0  # connection refused: what a client sees during an outage

        b.start()
        assert b.port == port
        assert b.kv_get("secret", "svc") == {"k": "v1"}
        new_login = b.approle_login(role_id, secret_id)["client_token"]  # same role-id / secret-id still work
        assert b.kv_get("secret", "svc", token=new_login) == {"k": "v1"}
        assert b.kv_get("secret", "svc", token=fixed) == {"k": "v1"}
        with pytest.raises(OpenBaoError) as forgotten:
            b.lookup_token(old_login)  # tokens obtained by logging in died with the old server
        assert forgotten.value.status == 403


@pytest.mark.netns
def test_dynamic_database_credentials_log_in_until_revoked(bao: OpenBao, pg: Postgres) -> None:
    bao.enable_database(pg, "selfcheck-ro", default_ttl="1m", max_ttl="10m")
    creds = bao.db_creds("selfcheck-ro")
    assert creds["username"].startswith("v-") and creds["password"]
    assert creds["lease_duration"] == 60
    assert creds["lease_id"] in bao.leases("database/creds/selfcheck-ro")
    assert pg.can_login(creds["username"], creds["password"])
    assert not pg.can_login(creds["username"], "wrong-password")

    bao.bao("lease", "revoke", "-sync", creds["lease_id"])
    assert creds["lease_id"] not in bao.leases("database/creds/selfcheck-ro")
    assert not pg.can_login(creds["username"], creds["password"])
    assert creds["username"] not in pg.roles()

    second = bao.db_creds("selfcheck-ro")
    assert pg.can_login(second["username"], second["password"])
    bao.revoke_prefix("database/creds/selfcheck-ro")
    assert bao.leases("database/creds/selfcheck-ro") == []
    assert not pg.can_login(second["username"], second["password"])


# ---------------------------------------------------------------------------------------------------------------
# fake APIs


@pytest.mark.netns
def test_fake_s3_accepts_real_signatures_and_rejects_dummy_ones(world: World, apis: FakeApis) -> None:
    apis.clear_log()
    out = _py(
        world,
        f"""
        import io, os, boto3, botocore.config, botocore.exceptions
        from boto3.s3.transfer import TransferConfig

        def client(ak, sk, style):
            cfg = botocore.config.Config(s3={{"addressing_style": style}}, retries={{"max_attempts": 1}})
            return boto3.client("s3", endpoint_url="https://s3.example.test", aws_access_key_id=ak,
                                aws_secret_access_key=sk, region_name="us-east-1",
                                verify={str(world.upstream_ca_pem)!r}, config=cfg)

        for style in ("path", "virtual"):
            c = client({S3_AK!r}, {S3_SK!r}, style)
            c.put_object(Bucket="bkt-" + style, Key="dir/hello.txt", Body=b"hello")
            assert c.get_object(Bucket="bkt-" + style, Key="dir/hello.txt")["Body"].read() == b"hello"
            keys = [o["Key"] for o in c.list_objects_v2(Bucket="bkt-" + style, Prefix="dir/")["Contents"]]
            assert keys == ["dir/hello.txt"], keys
        c = client({S3_AK!r}, {S3_SK!r}, "path")
        big = os.urandom(6 * 1024 * 1024)
        c.upload_fileobj(io.BytesIO(big), "bkt-path", "big-single")
        multi = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
        c.upload_fileobj(io.BytesIO(big + big), "bkt-path", "big-multipart", Config=multi)
        assert c.get_object(Bucket="bkt-path", Key="big-single")["Body"].read() == big
        assert c.get_object(Bucket="bkt-path", Key="big-multipart")["Body"].read() == big + big

        for ak, sk in (("AKIADUMMYDUMMYDUMMY0", "dummy-secret"), ({S3_AK!r}, "wrong-secret")):
            try:
                client(ak, sk, "path").get_object(Bucket="bkt-path", Key="dir/hello.txt")
            except botocore.exceptions.ClientError as e:
                print(e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])
            else:
                raise AssertionError("accepted a wrong signature")
        """,
    )
    assert out.split("\n")[:2] == ["SignatureDoesNotMatch 403", "SignatureDoesNotMatch 403"]
    log = apis.requests(service="s3")
    assert {e["host"] for e in log} == {"s3.example.test", "bkt-virtual.s3.example.test"}
    parts = [e for e in log if e["path"].startswith("/bkt-path/big-multipart?") and "partNumber=" in e["path"]]
    assert len(parts) == 3 and all(e["status"] == 200 for e in parts)  # 12 MiB in 5 MiB parts
    rejected = [e for e in log if e["status"] == 403]
    assert len(rejected) == 2 and all(e["auth_error"] for e in rejected)
    # What boto3 sends today (the gateway's re-signer must handle it): aws-chunked with an unsigned trailer.
    put = next(e for e in log if e["method"] == "PUT" and e["path"] == "/bkt-path/big-single")
    assert FakeApis.header(put, "x-amz-content-sha256") in ("STREAMING-UNSIGNED-PAYLOAD-TRAILER", "UNSIGNED-PAYLOAD")


@pytest.mark.netns
def test_fake_openai_with_the_sdk(world: World, apis: FakeApis) -> None:
    out = _py(
        world,
        f"""
        import ssl, httpx, openai
        ctx = ssl.create_default_context(cafile={str(world.upstream_ca_pem)!r})
        def client(key):
            return openai.OpenAI(api_key=key, max_retries=0, http_client=httpx.Client(verify=ctx))
        msgs = [{{"role": "user", "content": "hello"}}]
        r = client({OPENAI_KEY!r}).chat.completions.create(model="gpt-4o-mini", messages=msgs)
        assert {OPENAI_KEY!r} in r.choices[0].message.content   # the echo carries the key back
        assert r.choices[0].finish_reason == "stop" and r.usage.total_tokens > 0
        s = client({OPENAI_KEY!r}).chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True,
                                                            stream_options={{"include_usage": True}})
        chunks = list(s)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert {OPENAI_KEY!r} in text and len(chunks) >= 5, len(chunks)
        assert [m.id for m in client({OPENAI_KEY!r}).models.list()]
        try:
            client("sk-dummy-key-for-the-sandbox").chat.completions.create(model="gpt-4o-mini", messages=msgs)
        except openai.AuthenticationError as e:
            print("rejected", e.status_code, e.code)
        """,
    )
    assert out.strip() == "rejected 401 invalid_api_key"


@pytest.mark.netns
def test_fake_anthropic_with_the_sdk(world: World, apis: FakeApis) -> None:
    out = _py(
        world,
        f"""
        import ssl, anthropic
        ctx = ssl.create_default_context(cafile={str(world.upstream_ca_pem)!r})
        def client(key):
            http_client = anthropic.DefaultHttpxClient(verify=ctx)  # the 2.x SDK uses httpx2, not httpx
            return anthropic.Anthropic(api_key=key, max_retries=0, http_client=http_client)
        msgs = [{{"role": "user", "content": "hello"}}]
        m = client({ANTHROPIC_KEY!r}).messages.create(model="claude-fake-1", max_tokens=64, messages=msgs)
        assert m.type == "message" and m.stop_reason == "end_turn"
        assert {ANTHROPIC_KEY!r} in m.content[0].text
        with client({ANTHROPIC_KEY!r}).messages.stream(model="claude-fake-1", max_tokens=64, messages=msgs) as st:
            text = "".join(st.text_stream)
            final = st.get_final_message()
        assert {ANTHROPIC_KEY!r} in text and final.stop_reason == "end_turn"
        try:
            client("sk-ant-dummy").messages.create(model="claude-fake-1", max_tokens=8, messages=msgs)
        except anthropic.AuthenticationError as e:
            print("rejected", e.status_code)
        """,
    )
    assert out.strip() == "rejected 401"


@pytest.mark.netns
def test_streams_split_the_credential_across_writes(world: World, apis: FakeApis, gw_thread: NetnsThread) -> None:
    ca = str(world.upstream_ca_pem)
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": []}).encode()
    auth = {"Authorization": f"Bearer {OPENAI_KEY}", "Content-Type": "application/json"}
    chunks = gw_thread.call(_raw_chunks, APIS_IP, "api.openai.com", ca, "/v1/chat/completions", auth, body)
    joined = b"".join(chunks)
    key = OPENAI_KEY.encode()
    assert key in joined
    assert not any(key in c for c in chunks)  # only a stream-aware redactor can see it
    assert joined.rstrip().endswith(b"data: [DONE]")

    # "deltas": split across two SSE events; each event alone is valid JSON without the key.
    chunks = gw_thread.call(
        _raw_chunks,
        APIS_IP,
        "api.openai.com",
        ca,
        "/v1/chat/completions",
        {**auth, "X-Fake-Stream-Split": "deltas"},
        body,
    )
    events = [e for e in b"".join(chunks).split(b"\n\n") if e.startswith(b"data: {")]
    assert not any(key in e for e in events)
    text = "".join(
        json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events if b'"choices": [{' in e
    )
    assert OPENAI_KEY in text

    # Anthropic with x-api-key (the header form older SDKs and curl use) streams the same way.
    a_headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01", "Content-Type": "application/json"}
    a_body = json.dumps({"model": "claude-fake-1", "max_tokens": 8, "stream": True, "messages": []}).encode()
    chunks = gw_thread.call(_raw_chunks, APIS_IP, "api.anthropic.com", ca, "/v1/messages", a_headers, a_body)
    assert ANTHROPIC_KEY.encode() in b"".join(chunks)
    assert not any(ANTHROPIC_KEY.encode() in c for c in chunks)
    names = [line[7:] for line in b"".join(chunks).split(b"\n") if line.startswith(b"event: ")]
    assert names[0] == b"message_start" and names[-1] == b"message_stop"


@pytest.mark.netns
def test_oauth_token_endpoint_issues_and_expires_tokens(world: World, apis: FakeApis, gw_thread: NetnsThread) -> None:
    ca = str(world.upstream_ca_pem)
    before = apis.oauth_stats()

    def token_request(headers: dict[str, str], form: str) -> tuple[int, dict[str, Any]]:
        h = {"Content-Type": "application/x-www-form-urlencoded", **headers}
        status, _, body = gw_thread.call(
            _https, APIS_IP, "auth.example.test", ca, "POST", "/oauth/token", h, form.encode()
        )
        return status, json.loads(body)

    def resource(token: str | None) -> int:
        h = {"Authorization": f"Bearer {token}"} if token else {}
        return gw_thread.call(_https, APIS_IP, "api.oauth.example.test", ca, "GET", "/v1/things", h)[0]

    basic = base64.b64encode(f"{OAUTH['client_id']}:{OAUTH['client_secret']}".encode()).decode()
    status, tok = token_request({"Authorization": f"Basic {basic}"}, "grant_type=client_credentials")
    assert status == 200 and tok["token_type"] == "Bearer" and tok["expires_in"] == OAUTH["expires_in"]
    assert tok["access_token"].startswith("tok-")
    form = f"grant_type=client_credentials&client_id={OAUTH['client_id']}&client_secret={OAUTH['client_secret']}"
    status, tok2 = token_request({}, form)
    assert status == 200 and tok2["access_token"] != tok["access_token"]
    status, err = token_request({}, "grant_type=client_credentials&client_id=cxe-client&client_secret=nope")
    assert status == 401 and err["error"] == "invalid_client"

    assert resource(tok["access_token"]) == 200
    assert resource(None) == 401
    assert resource("tok-forged") == 401
    assert apis.oauth_expire_all() >= 2
    assert resource(tok["access_token"]) == 401
    after = apis.oauth_stats()
    assert after["issued"] - before["issued"] == 2
    assert after["token_rejected"] - before["token_rejected"] == 1
    assert after["resource_ok"] - before["resource_ok"] == 1


@pytest.mark.netns
def test_oauth_tokens_expire_by_time(world: World, gw_thread: NetnsThread) -> None:
    # A separate instance with a 1 s lifetime: the real expiry path (no admin shortcut).
    cfg = {"oauth": {"client_id": "c", "client_secret": "s", "expires_in": 1}}
    with start_fake_apis(world, ["auth.example.test", "api.oauth.example.test"], "198.51.100.32", cfg, dns=False) as a:
        ca = str(world.upstream_ca_pem)
        form = b"grant_type=client_credentials&client_id=c&client_secret=s"
        h = {"Content-Type": "application/x-www-form-urlencoded"}
        _, _, body = gw_thread.call(_https, a.ip, "auth.example.test", ca, "POST", "/oauth/token", h, form)
        token = json.loads(body)["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        assert gw_thread.call(_https, a.ip, "api.oauth.example.test", ca, "GET", "/", auth)[0] == 200
        time.sleep(1.2)
        assert gw_thread.call(_https, a.ip, "api.oauth.example.test", ca, "GET", "/", auth)[0] == 401


@pytest.mark.netns
def test_db_check_and_echo_and_request_log(world: World, apis: FakeApis, pg: Postgres, gw_thread: NetnsThread) -> None:
    ca = str(world.upstream_ca_pem)

    def check(user: str | None, password: str = "") -> int:
        h = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()} if user else {}
        return gw_thread.call(_https, APIS_IP, "db-check.example.test", ca, "GET", "/check", h)[0]

    assert check(pg.admin_user, pg.admin_password) == 200
    assert check(pg.admin_user, "wrong") == 401
    assert check(None) == 401

    apis.clear_log()
    status, _, body = gw_thread.call(
        _https, APIS_IP, "echo.apis.example.test", ca, "PUT", "/any/path?q=1", {"X-Test": "yes"}, b"payload"
    )
    assert status == 200
    echo = json.loads(body)
    assert echo["service"] == "echo" and echo["method"] == "PUT" and echo["path"] == "/any/path?q=1"
    assert echo["body"] == "payload"
    (entry,) = apis.requests(host="echo.apis.example.test")
    assert entry["status"] == 200 and entry["body_len"] == 7 and entry["sni"] == "echo.apis.example.test"
    assert FakeApis.header(entry, "x-test") == "yes"
