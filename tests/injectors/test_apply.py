"""Injectors on plain request values: what goes in, what the sandbox's own copy becomes, what is reported."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given
from hypothesis import strategies as st

from gateway.injectors import (
    AwsSigV4Params,
    BasicParams,
    HeaderParams,
    OAuth2ClientCredentialsParams,
    PlaceholderParams,
    QueryParams,
)
from gateway.injectors._apply import InjectionError, OutgoingRequest, apply, find_placeholders
from gateway.injectors._echo import EchoRedactor, needles_for
from gateway.injectors._sigv4 import decode_aws_chunked
from gateway.secrets import SecretBundle, SecretValue

SECRET = "real-secret-0123456789"


def bundle(**fields: str) -> SecretBundle:
    return SecretBundle("t", {k: SecretValue(v, f"t#{k}") for k, v in fields.items()})


def req(path: str = "/v1/x", headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> OutgoingRequest:
    return OutgoingRequest("https", "api.example.test", "POST", path, list(headers or []), body)


def test_header_replaces_the_sandboxs_own_value() -> None:
    r = req(headers=[("authorization", "Bearer sandbox-guess"), ("Accept", "*/*"), ("Authorization", "x")])
    inserted = apply(
        HeaderParams(kind="header", header="Authorization", format="Bearer {secret}"), bundle(value=SECRET), r
    )
    assert [v for k, v in r.headers if k.lower() == "authorization"] == [f"Bearer {SECRET}"]
    assert ("Accept", "*/*") in r.headers and inserted == [SECRET]


def test_header_refuses_control_characters() -> None:
    with pytest.raises(InjectionError):
        apply(HeaderParams(kind="header", header="X-Key"), bundle(value="abc\r\nInjected: 1"), req())


def test_basic_with_username_from_policy_or_secret() -> None:
    r = req()
    apply(BasicParams(kind="basic", username="svc"), bundle(value=SECRET), r)
    assert r.header("authorization") == "Basic " + base64.b64encode(f"svc:{SECRET}".encode()).decode()
    r = req()
    apply(BasicParams(kind="basic"), bundle(username="dbuser", password=SECRET), r)
    assert base64.b64decode(r.header("authorization").split()[1]).decode() == f"dbuser:{SECRET}"  # type: ignore[union-attr]


def test_query_param_replaces_every_sandbox_copy() -> None:
    r = req("/search?key=guess&q=1&key=again")
    apply(QueryParams(kind="query", param="key"), bundle(value="a b&c"), r)
    assert r.path == "/search?q=1&key=a%20b%26c"


def test_placeholder_in_headers_query_path_json_and_form() -> None:
    params = PlaceholderParams(kind="placeholder", placeholder="cex_ph_openai", in_body=True)
    secret = 'va"l/ue&x'
    r = req(
        "/v1/cex_ph_openai/x?k=cex_ph_openai",
        [("Authorization", "Bearer cex_ph_openai"), ("Content-Type", "application/json")],
        json.dumps({"key": "cex_ph_openai", "n": 1}).encode(),
    )
    apply(params, bundle(value=secret), r)
    assert r.header("authorization") == f"Bearer {secret}"
    assert r.path == "/v1/va%22l%2Fue%26x/x?k=va%22l%2Fue%26x"
    assert json.loads(r.body)["key"] == secret
    form = req(headers=[("Content-Type", "application/x-www-form-urlencoded")], body=b"a=1&token=cex_ph_openai")
    apply(params, bundle(value=secret), form)
    assert form.body == b"a=1&token=va%22l%2Fue%26x"


def test_placeholder_body_only_when_opted_in_and_never_rescanned() -> None:
    r = req(headers=[("Content-Type", "text/plain")], body=b"cex_ph_openai")
    apply(PlaceholderParams(kind="placeholder", placeholder="cex_ph_openai"), bundle(value=SECRET), r)
    assert r.body == b"cex_ph_openai"
    # A secret that itself contains the placeholder is inserted once, not expanded again.
    r = req(headers=[("X-K", "cex_ph_openai cex_ph_openai")])
    apply(PlaceholderParams(kind="placeholder", placeholder="cex_ph_openai"), bundle(value="Zcex_ph_openaiZ"), r)
    assert r.header("x-k") == "Zcex_ph_openaiZ Zcex_ph_openaiZ"


def test_find_placeholders_in_any_position() -> None:
    placeholders = {"cex_ph_openai": "openai", "cex_ph_github": "github"}
    assert find_placeholders(placeholders, req("/x?k=cex_ph_github")) == {"github"}
    assert find_placeholders(placeholders, req(headers=[("X", "cex_ph_openai")])) == {"openai"}
    assert find_placeholders(placeholders, req(body=b'{"k": "cex_ph_github"}')) == {"github"}
    assert find_placeholders(placeholders, req()) == set()


def test_oauth2_bearer() -> None:
    r = req(headers=[("Authorization", "Bearer guess")])
    params = OAuth2ClientCredentialsParams(kind="oauth2_client_credentials", token_url="https://auth.example.test/t")
    apply(params, bundle(access_token="tok-1"), r)
    assert r.header("authorization") == "Bearer tok-1"


def _verify_s3(r: OutgoingRequest, access: str, secret: str) -> bool:
    """Recompute the signature the way S3 would, from what the request now carries."""
    headers = {k: v for k, v in r.headers}
    amz_date = headers["X-Amz-Date"]
    aws = AWSRequest(
        method=r.method,
        url=f"https://{r.host}{r.path}",
        headers={k: v for k, v in headers.items() if k != "Authorization"},
        data=r.body,
    )
    aws.context["timestamp"] = amz_date
    signer = S3SigV4Auth(Credentials(access, secret), "s3", "us-east-1")
    canonical = signer.canonical_request(aws)
    string_to_sign = signer.string_to_sign(aws, canonical)
    expected = signer.signature(string_to_sign, aws)
    return (
        headers["Authorization"].endswith(f"Signature={expected}")
        and f"Credential={access}/" in headers["Authorization"]
    )


def test_sigv4_resigns_with_real_keys() -> None:
    body = b"hello world"
    dummy = AWSRequest(
        method="PUT", url="https://s3.example.test/bucket/key", data=body, headers={"Host": "s3.example.test"}
    )
    S3SigV4Auth(Credentials("AKIDDUMMY", "dummy-secret"), "s3", "us-east-1").add_auth(dummy)
    r = OutgoingRequest("https", "s3.example.test", "PUT", "/bucket/key", list(dummy.headers.items()), body)
    inserted = apply(
        AwsSigV4Params(kind="aws_sigv4", region="us-east-1", service="s3"),
        bundle(access_key_id="AKIDREAL", secret_access_key="real-secret-key"),
        r,
    )
    assert inserted == ["real-secret-key"]
    assert _verify_s3(r, "AKIDREAL", "real-secret-key")
    assert not _verify_s3(r, "AKIDDUMMY", "dummy-secret")
    assert [k for k, _ in r.headers].count("Authorization") == 1
    assert dict(r.headers)["X-Amz-Content-SHA256"] == hashlib.sha256(body).hexdigest()


def test_sigv4_keeps_unsigned_payload_and_dechunks_aws_chunked() -> None:
    r = OutgoingRequest(
        "https",
        "s3.example.test",
        "PUT",
        "/b/k",
        [("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD"), ("Authorization", "AWS4-HMAC-SHA256 dummy")],
        b"data",
    )
    apply(
        AwsSigV4Params(kind="aws_sigv4", region="us-east-1", service="s3"),
        bundle(access_key_id="AKIDREAL", secret_access_key="real-secret-key"),
        r,
    )
    assert dict(r.headers)["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
    assert _verify_s3(r, "AKIDREAL", "real-secret-key")
    chunked = b"5;chunk-signature=abc\r\nhello\r\n6;chunk-signature=def\r\n world\r\n0;chunk-signature=0\r\n\r\n"
    assert decode_aws_chunked(chunked) == b"hello world"
    r = OutgoingRequest(
        "https",
        "s3.example.test",
        "PUT",
        "/b/k",
        [
            ("Content-Encoding", "aws-chunked"),
            ("X-Amz-Content-SHA256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
            ("X-Amz-Decoded-Content-Length", "11"),
        ],
        chunked,
    )
    apply(
        AwsSigV4Params(kind="aws_sigv4", region="us-east-1", service="s3"),
        bundle(access_key_id="AKIDREAL", secret_access_key="real-secret-key"),
        r,
    )
    assert r.body == b"hello world" and r.header("content-encoding") is None and r.header("content-length") == "11"
    assert _verify_s3(r, "AKIDREAL", "real-secret-key")
    with pytest.raises(InjectionError):
        decode_aws_chunked(b"zz;x\r\n")


@given(
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=8, max_size=40),
    st.binary(max_size=60),
    st.binary(max_size=60),
    st.lists(st.integers(min_value=1, max_value=200), max_size=6),
)
def test_echo_redactor_never_lets_a_secret_through_whatever_the_chunking(
    secret: str, before: bytes, after: bytes, cuts: list[int]
) -> None:
    payload = before + secret.encode() + after + base64.b64encode(before[:2] + secret.encode())
    redactor = EchoRedactor(needles_for([secret]))
    out = b""
    pos = 0
    # mitmproxy passes non-empty chunks and one b"" at the end of the body.
    for c in sorted(set(cuts)):
        if pos < c <= len(payload):
            out += redactor(payload[pos:c])
            pos = c
    out += redactor(payload[pos:]) + redactor(b"")
    assert len(out) == len(payload)
    assert secret.encode() not in out
    assert redactor.hits >= 1


def test_a_multi_field_secret_without_value_is_a_credential_error() -> None:
    with pytest.raises(InjectionError) as e:
        apply(HeaderParams(kind="header", header="X-Key"), bundle(username="u", password="p" * 10), req())
    assert e.value.reason == "credential_invalid" and "p" * 10 not in str(e.value)


def test_aws_chunked_trailer_checksum_becomes_a_header() -> None:
    body = b"5\r\nhello\r\n0\r\nx-amz-checksum-crc32:NhCmhg==\r\n\r\n"
    r = OutgoingRequest(
        "https",
        "s3.example.test",
        "PUT",
        "/b/k",
        [
            ("Content-Encoding", "aws-chunked"),
            ("Transfer-Encoding", "chunked"),
            ("X-Amz-Content-SHA256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"),
            ("X-Amz-Trailer", "x-amz-checksum-crc32"),
        ],
        body,
    )
    apply(
        AwsSigV4Params(kind="aws_sigv4", region="us-east-1", service="s3"),
        bundle(access_key_id="AKIDREAL", secret_access_key="real-secret-key"),
        r,
    )
    assert r.body == b"hello"
    assert r.header("x-amz-checksum-crc32") == "NhCmhg==" and r.header("transfer-encoding") is None
    assert r.header("x-amz-trailer") is None and r.header("content-length") == "5"
    assert _verify_s3(r, "AKIDREAL", "real-secret-key")
