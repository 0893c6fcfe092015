"""Request-time injection: pure functions that put a secret into a plain request value.

The addon copies a flow's request into an `OutgoingRequest`, calls `apply`, and writes the result back. Each
injector first removes whatever the sandbox itself put where the credential goes (its own Authorization header,
query parameter, signature), so a sandbox can neither override nor observe the real value. `apply` returns the
exact strings it inserted: the response side redacts those (and their encodings) if an upstream echoes them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, quote_plus

from ..secrets import SecretBundle, SecretValue
from . import (
    AwsSigV4Params,
    BasicParams,
    HeaderParams,
    InjectorParams,
    OAuth2ClientCredentialsParams,
    PlaceholderParams,
    QueryParams,
)

__all__ = ["InjectionError", "OutgoingRequest", "apply", "find_placeholders"]

# Characters that would let a secret value rewrite the request around it (header splitting).
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x1f\x7f]")


class InjectionError(Exception):
    """The credential cannot be applied to this request; `reason` is a stable code for the 4xx/5xx answer."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class OutgoingRequest:
    scheme: str
    host: str  # the Host header as sent (what a signature covers)
    method: str
    path: str  # path and query, as sent
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)

    def remove_header(self, name: str) -> None:
        lname = name.lower()
        self.headers = [(k, v) for k, v in self.headers if k.lower() != lname]

    def set_header(self, name: str, value: str) -> None:
        if _UNSAFE_IN_HEADER.search(value):
            raise InjectionError("credential_invalid", "the credential contains control characters")
        self.remove_header(name)
        self.headers.append((name, value))


def find_placeholders(placeholders: Mapping[str, str], req: OutgoingRequest) -> set[str]:
    """The credential names whose placeholders appear anywhere in the request (path, query, headers, body)."""
    found: set[str] = set()
    if not placeholders:
        return found
    header_text = "\n".join(f"{k}: {v}" for k, v in req.headers)
    for token, name in placeholders.items():
        if token in req.path or token in header_text or token.encode() in req.body:
            found.add(name)
    return found


def apply(params: InjectorParams, material: SecretBundle, req: OutgoingRequest) -> list[str]:
    """Inject; returns the secret-bearing strings that were inserted (for echo redaction)."""
    try:
        return _apply(params, material, req)
    except KeyError as e:
        raise InjectionError(
            "credential_invalid", f"secret {material.name!r} has no field {e.args[0]!r} (it has {sorted(material)})"
        ) from None


def _apply(params: InjectorParams, material: SecretBundle, req: OutgoingRequest) -> list[str]:
    if isinstance(params, HeaderParams):
        value = material.single(None).reveal()
        req.set_header(params.header, params.format.replace("{secret}", value))
        return [value]
    if isinstance(params, BasicParams):
        username = params.username or (material["username"].reveal() if "username" in material else "")
        password = (material["password"] if "password" in material else material.single(None)).reveal()
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        req.set_header("Authorization", f"Basic {token}")
        return [password, token]
    if isinstance(params, QueryParams):
        value = material.single(None).reveal()
        req.path = _set_query_param(req.path, params.param, quote(value, safe=""))
        return [value]
    if isinstance(params, PlaceholderParams):
        return _apply_placeholder(params, material.single(None), req)
    if isinstance(params, AwsSigV4Params):
        from ._sigv4 import resign

        return resign(params, material, req)
    if isinstance(params, OAuth2ClientCredentialsParams):
        token = material["access_token"].reveal()
        req.set_header("Authorization", f"Bearer {token}")
        return [token]
    raise InjectionError("credential_invalid", f"unknown injector {params!r}")


def _set_query_param(path: str, name: str, encoded_value: str) -> str:
    bare, sep, query = path.partition("?")
    kept = [p for p in query.split("&") if p and p.partition("=")[0] != name] if sep else []
    kept.append(f"{name}={encoded_value}")
    return bare + "?" + "&".join(kept)


def _apply_placeholder(params: PlaceholderParams, secret: SecretValue, req: OutgoingRequest) -> list[str]:
    token = params.placeholder
    value = secret.reveal()
    inserted: list[str] = []
    if token in req.path:
        encoded = quote(value, safe="")
        req.path = req.path.replace(token, encoded)
        inserted += [value, encoded]
    new_headers = []
    for k, v in req.headers:
        if token in v:
            v = v.replace(token, value)
            if _UNSAFE_IN_HEADER.search(v):
                raise InjectionError("credential_invalid", "the credential contains control characters")
            inserted.append(value)
        new_headers.append((k, v))
    req.headers = new_headers
    if params.in_body and token.encode() in req.body:
        ctype = (req.header("content-type") or "").split(";", 1)[0].strip().lower()
        if ctype == "application/json" or ctype.endswith("+json"):
            encoded = json.dumps(value)[1:-1]  # the string's inside, escaped for a JSON string literal
        elif ctype == "application/x-www-form-urlencoded":
            encoded = quote_plus(value)
        else:
            encoded = value
        # bytes.replace is a single left-to-right pass: inserted text is never scanned again.
        req.body = req.body.replace(token.encode(), encoded.encode())
        inserted += [value, encoded]
    return inserted


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
