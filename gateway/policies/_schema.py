"""The shape of a policy file (version 1), as plain DTOs.

Structure only: unknown keys, wrong types and unknown enum values are caught here by pydantic. What needs the whole
policy set to judge (host syntax, duplicate ids, dangling names, overlapping sandboxes) is checked in `_load`, which
turns these DTOs into the compiled model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..injectors import InjectorParams

__all__ = [
    "CorrelationDTO",
    "CredentialDTO",
    "CredentialLimitDTO",
    "LimitDTO",
    "PolicyDTO",
    "PolicyFileDTO",
    "RuleDTO",
    "SandboxDTO",
]


class _DTO(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleDTO(_DTO):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    action: Literal["allow", "deny"]
    mode: Literal["enforce", "report"] | None = None
    description: str | None = None
    hosts: list[str] | None = None
    cidrs: list[str] | None = None
    ports: list[int | str] | None = None
    schemes: list[Literal["http", "https", "tcp"]] | None = None
    methods: list[str] | None = None
    paths: list[str | dict[str, str]] | None = None
    headers: dict[str, str] | None = None
    credential: str | None = None
    allow_credential_over_http: bool = False


class PolicyDTO(_DTO):
    description: str | None = None
    rules: list[RuleDTO]


class LimitDTO(_DTO):
    """Usage limits of a sandbox (or of a credential, below). Strict integers: `"100"` or `1.5` are errors."""

    requests_per_minute: int | None = Field(default=None, ge=1, strict=True)
    bytes_per_session: int | None = Field(default=None, ge=1, strict=True)
    mode: Literal["enforce", "report"] = "enforce"


class CredentialLimitDTO(LimitDTO):
    # global: one budget shared by every sandbox using the credential; sandbox: each sandbox its own.
    scope: Literal["global", "sandbox"] = "global"


class CorrelationDTO(_DTO):
    """Agent correlation headers: copied into every audit record of a request and stripped before upstream."""

    headers: list[str] = Field(min_length=1)
    max_length: int = Field(default=128, ge=1, le=1024, strict=True)


class SandboxDTO(_DTO):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    labels: dict[str, str] = Field(default_factory=dict)
    sources: list[str] = Field(default_factory=list)
    token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    policies: list[str] = Field(min_length=1)
    default_mode: Literal["enforce", "report"] = "enforce"
    limits: LimitDTO | None = None


class CredentialDTO(_DTO):
    secret: str = Field(min_length=1)
    injector: InjectorParams
    description: str | None = None
    limits: CredentialLimitDTO | None = None


class PolicyFileDTO(_DTO):
    version: Literal[1]
    include: list[str] = Field(default_factory=list)
    credentials: dict[str, CredentialDTO] = Field(default_factory=dict)
    policies: dict[str, PolicyDTO] = Field(default_factory=dict)
    sandboxes: list[SandboxDTO] = Field(default_factory=list)
    correlation: CorrelationDTO | None = None
