"""Injectors: the closed set of ways a secret enters an allowed request.

Two phases, as in tokenizer's processors: the parameters of every injector are validated when a policy loads (this
module, pure, no secret needed), and only a valid credential ever reaches the request path. The registry is a
literal mapping; there is no plugin discovery, because code loaded into the process that holds credentials could
read them.

The request-time side of each injector (header, basic, query, placeholder, aws_sigv4, oauth2_client_credentials)
is the credentials issue's work; this module already fixes the names and parameters so policies written today stay
valid.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["INJECTOR_KINDS", "InjectorParams"]

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers the gateway itself owns: letting a credential overwrite them would break Host=SNI binding or framing.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "proxy-authorization"})


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeaderParams(_Params):
    """`header: Authorization`, `format: "Bearer {secret}"`: the sandbox's own copy of the header is removed first."""

    kind: Literal["header"]
    header: str
    format: str = "{secret}"

    @field_validator("header")
    @classmethod
    def _header_name(cls, v: str) -> str:
        if not _HEADER_NAME.match(v):
            raise ValueError(f"{v!r} is not a valid HTTP header name")
        if v.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{v!r} is managed by the gateway and cannot carry a credential")
        return v

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v.count("{secret}") != 1:
            raise ValueError("format must contain '{secret}' exactly once, e.g. 'Bearer {secret}'")
        return v


class BasicParams(_Params):
    """HTTP Basic: the password from the secret store; the username here, or the secret's `username` field."""

    kind: Literal["basic"]
    username: str | None = Field(default=None, min_length=1)


class QueryParams(_Params):
    kind: Literal["query"]
    param: str = Field(min_length=1)


class PlaceholderParams(_Params):
    """The sandbox carries an opaque placeholder; the gateway swaps in the secret where it finds it."""

    kind: Literal["placeholder"]
    placeholder: str = Field(min_length=8, pattern=r"^[A-Za-z0-9_.-]+$")
    in_body: bool = False


class AwsSigV4Params(_Params):
    kind: Literal["aws_sigv4"]
    region: str = Field(min_length=1)
    service: str = Field(min_length=1)


class OAuth2ClientCredentialsParams(_Params):
    kind: Literal["oauth2_client_credentials"]
    token_url: str = Field(pattern=r"^https://")
    scopes: list[str] = Field(default_factory=list)


InjectorParams = Annotated[
    HeaderParams | BasicParams | QueryParams | PlaceholderParams | AwsSigV4Params | OAuth2ClientCredentialsParams,
    Field(discriminator="kind"),
]

INJECTOR_KINDS: dict[str, type[_Params]] = {
    "header": HeaderParams,
    "basic": BasicParams,
    "query": QueryParams,
    "placeholder": PlaceholderParams,
    "aws_sigv4": AwsSigV4Params,
    "oauth2_client_credentials": OAuth2ClientCredentialsParams,
}
