"""AWS Signature V4: the sandbox signs with dummy keys; the gateway drops that signature and signs with the real ones.

botocore's own signer does the signing, so canonicalisation matches AWS exactly. Payloads: a request the sandbox
sent with `UNSIGNED-PAYLOAD` stays unsigned; an `aws-chunked` upload (per-chunk signatures made with the dummy
key, which cannot be re-signed chunk by chunk without re-framing) is de-chunked and signed as one payload.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from ..secrets import SecretBundle
from . import AwsSigV4Params
from ._apply import InjectionError, OutgoingRequest

__all__ = ["decode_aws_chunked", "resign"]

_SIGNING_HEADERS = ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")


def decode_aws_chunked(body: bytes) -> bytes:
    """`<hex size>;chunk-signature=<sig>CRLF<data>CRLF ... 0;...CRLF[trailers]CRLF` -> the data."""
    return decode_aws_chunked_with_trailers(body)[0]


def decode_aws_chunked_with_trailers(body: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """The data and the trailing headers (boto3 sends its checksum as a trailer, e.g. x-amz-checksum-crc32)."""
    out = bytearray()
    pos = 0
    while True:
        end = body.find(b"\r\n", pos)
        if end == -1:
            raise InjectionError("bad_request", "truncated aws-chunked body")
        size_text = body[pos:end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise InjectionError("bad_request", "malformed aws-chunked body") from None
        pos = end + 2
        if size == 0:
            trailers = []
            for line in body[pos:].split(b"\r\n"):
                name, sep, value = line.decode("latin-1").partition(":")
                if sep and not name.lower().startswith("x-amz-trailer-signature"):
                    trailers.append((name.strip(), value.strip()))
            return bytes(out), trailers
        if pos + size + 2 > len(body) or body[pos + size : pos + size + 2] != b"\r\n":
            raise InjectionError("bad_request", "malformed aws-chunked body")
        out += body[pos : pos + size]
        pos += size + 2


def resign(params: AwsSigV4Params, material: SecretBundle, req: OutgoingRequest) -> list[str]:
    try:
        access_key = material["access_key_id"].reveal()
        secret_key = material["secret_access_key"].reveal()
    except KeyError:
        raise InjectionError(
            "credential_invalid", "an aws_sigv4 secret needs the fields access_key_id and secret_access_key"
        ) from None
    token = material["session_token"].reveal() if "session_token" in material else None

    sent_payload_hash = (req.header("x-amz-content-sha256") or "").strip()
    encodings = [e.strip() for e in (req.header("content-encoding") or "").split(",") if e.strip()]
    if "aws-chunked" in encodings or sent_payload_hash.startswith("STREAMING-"):
        req.body, trailers = decode_aws_chunked_with_trailers(req.body)
        req.remove_header("x-amz-decoded-content-length")
        req.remove_header("transfer-encoding")
        # A checksum sent as a trailer becomes a header of the same name, so S3 still verifies the payload.
        for name, value in trailers:
            if name.lower().startswith("x-amz-checksum-"):
                req.set_header(name, value)
        rest = [e for e in encodings if e != "aws-chunked"]
        req.remove_header("content-encoding")
        if rest:
            req.headers.append(("Content-Encoding", ", ".join(rest)))
        req.remove_header("x-amz-trailer")
        sent_payload_hash = ""
    for name in _SIGNING_HEADERS:
        req.remove_header(name)
    req.remove_header("content-length")
    if req.body or req.method in ("PUT", "POST", "PATCH"):
        req.headers.append(("Content-Length", str(len(req.body))))

    url = f"{req.scheme}://{req.host}{req.path}"
    aws = AWSRequest(method=req.method, url=url, headers=dict(req.headers), data=req.body)
    unsigned = sent_payload_hash == "UNSIGNED-PAYLOAD"
    if params.service == "s3":
        aws.context["client_config"] = SimpleNamespace(s3={"payload_signing_enabled": not unsigned})
        signer: SigV4Auth = S3SigV4Auth(Credentials(access_key, secret_key, token), params.service, params.region)
    else:
        if not unsigned:
            aws.headers["X-Amz-Content-SHA256"] = hashlib.sha256(req.body).hexdigest()
        signer = SigV4Auth(Credentials(access_key, secret_key, token), params.service, params.region)
    signer.add_auth(aws)
    # Take the signing headers exactly as botocore wrote them; every other header was signed as it stands.
    req.headers.extend((k, v) for k, v in aws.headers.items() if k.lower() in _SIGNING_HEADERS)
    return [secret_key, *([token] if token else [])]
