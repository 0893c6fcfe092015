"""The admin API's request and response bodies. The OpenAPI document is generated from these (`_openapi.py`), and
every handler builds its answer through them, so the document and the server cannot drift apart.

No model has a field that could carry a secret value: credentials appear by name and injector kind, a sandbox's
proxy token only as `has_token`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, create_model

from ..policies import SandboxDTO

__all__ = [
    "SANDBOX_ID_PATTERN",
    "CheckView",
    "CredentialView",
    "DecisionList",
    "ErrorBody",
    "Health",
    "IssueView",
    "PolicyView",
    "Readiness",
    "ReloadView",
    "SandboxList",
    "SandboxRegistration",
    "SandboxView",
    "UnregisterView",
]

SANDBOX_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"  # SandboxDTO's id pattern
MAX_SANDBOX_ID = 128


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IssueView(_Out):
    location: str = Field(description="file:line:col, or the request that caused it")
    message: str
    rule: str | None = None
    hint: str | None = None


class ErrorBody(_Out):
    error: str = Field(description="a short machine-readable code")
    detail: str = Field(description="what went wrong and what to do")
    issues: list[IssueView] = Field(default_factory=list, description="every problem found, when there are several")


class Health(_Out):
    status: Literal["ok"] = "ok"


class CheckView(_Out):
    name: Literal["policy", "proxy", "secrets"]
    ok: bool
    detail: str


class Readiness(_Out):
    ready: bool
    checks: list[CheckView]


# What a registration may carry: a sandbox as a policy file states it (the same DTO, so the same structure checks),
# minus its id (the URL names it), plus an optional plain proxy token that the gateway hashes and forgets.
_registration_fields: dict[str, Any] = {
    name: (field.annotation, field) for name, field in SandboxDTO.model_fields.items() if name != "id"
}
SandboxRegistration: type[BaseModel] = create_model(
    "SandboxRegistration",
    __config__=ConfigDict(extra="forbid", frozen=True),
    __doc__="A sandbox to register: the shape of a policy file's sandbox entry, without 'id' (the URL names it).",
    token=(
        SecretStr | None,
        Field(
            default=None,
            min_length=16,
            max_length=512,
            description="a plain proxy token for the sandbox; hashed at once, never stored or returned",
        ),
    ),
    **_registration_fields,
)


class SandboxView(_Out):
    id: str
    origin: Literal["file", "api"] = Field(description="a policy file, or a registration (admin API / runtime)")
    labels: dict[str, str]
    sources: list[str]
    policies: list[str]
    default_mode: Literal["enforce", "report"]
    has_token: bool = Field(description="whether a proxy token identifies it (the token is never shown)")


class SandboxList(_Out):
    sandboxes: list[SandboxView]


class UnregisterView(_Out):
    id: str
    leases_revoked: int = Field(description="dynamic-secret leases of the sandbox revoked at the backend")


class ReloadView(_Out):
    policy_hash: str
    rule_count: int
    sandboxes: int


class CredentialView(_Out):
    name: str
    injector: str = Field(description="the injector kind; never the secret or its value")


class PolicyView(_Out):
    policy_hash: str
    files: list[str]
    rule_count: int
    policies: dict[str, list[str]] = Field(description="policy name -> its rule ids")
    credentials: list[CredentialView]
    sandboxes: int


class DecisionList(_Out):
    decisions: list[dict[str, Any]] = Field(
        description="recent decision audit records, newest first (docs/architecture.md, the audit record)"
    )
