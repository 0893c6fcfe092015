"""The admin API's OpenAPI 3.1 document, generated from the pydantic models the handlers answer with (so it stays
true: a field added to a model appears here; tests check that every route of the app is documented and fuzz the
live server against this document with schemathesis)."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import _models as M

__all__ = ["OPERATIONS", "openapi_document"]

_REF = "#/components/schemas/{model}"

_ERROR = "ErrorBody"

# (method, path, operationId, summary, request model, {status: (model name | None, description)}, parameters)
_Op = tuple[str, str, str, str, type[BaseModel] | None, dict[int, tuple[str | None, str]], list[dict[str, Any]]]

_ID_PARAM: dict[str, Any] = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": M.SANDBOX_ID_PATTERN, "minLength": 1, "maxLength": M.MAX_SANDBOX_ID},
}
_UNAUTHORIZED = (_ERROR, "no or a wrong bearer token (TCP without mTLS)")
_BAD_ID = (_ERROR, "the sandbox id is not valid")

OPERATIONS: list[_Op] = [
    ("get", "/v1/health", "health", "Liveness: the admin API answers.", None, {200: ("Health", "alive")}, []),
    (
        "get",
        "/v1/ready",
        "ready",
        "Readiness: policy loaded, proxy listening, every static credential servable.",
        None,
        {200: ("Readiness", "ready"), 503: ("Readiness", "not ready; the failing checks say why"), 401: _UNAUTHORIZED},
        [],
    ),
    (
        "get",
        "/v1/sandboxes",
        "listSandboxes",
        "Every sandbox the gateway knows, from policy files and registrations.",
        None,
        {200: ("SandboxList", "the sandboxes"), 401: _UNAUTHORIZED},
        [],
    ),
    (
        "get",
        "/v1/sandboxes/{id}",
        "getSandbox",
        "One sandbox.",
        None,
        {200: ("SandboxView", "the sandbox"), 404: (_ERROR, "no such sandbox"), 422: _BAD_ID, 401: _UNAUTHORIZED},
        [_ID_PARAM],
    ),
    (
        "put",
        "/v1/sandboxes/{id}",
        "registerSandbox",
        "Register a sandbox, or replace its registration. Judged like a sandbox in a policy file.",
        M.SandboxRegistration,
        {
            200: ("SandboxView", "the registration was replaced"),
            201: ("SandboxView", "registered"),
            400: (_ERROR, "the body is not JSON"),
            409: (_ERROR, "clashes with another sandbox (id of a policy file's sandbox, overlapping sources, token)"),
            413: (_ERROR, "the body is too large"),
            415: (_ERROR, "the body is not application/json"),
            422: (_ERROR, "invalid registration; every problem is listed"),
            401: _UNAUTHORIZED,
        },
        [_ID_PARAM],
    ),
    (
        "delete",
        "/v1/sandboxes/{id}",
        "unregisterSandbox",
        "Unregister a registered sandbox and revoke its dynamic-secret leases.",
        None,
        {
            200: ("UnregisterView", "unregistered"),
            404: (_ERROR, "no such sandbox"),
            409: (_ERROR, "the sandbox is defined in a policy file (edit the file and reload)"),
            422: _BAD_ID,
            401: _UNAUTHORIZED,
        },
        [_ID_PARAM],
    ),
    (
        "post",
        "/v1/policy/reload",
        "reloadPolicy",
        "Load the policy files again and swap them in whole; a broken file keeps the policy in force.",
        None,
        {
            200: ("ReloadView", "the new policy is in force"),
            422: (_ERROR, "the files (or a registration under them) are invalid; every error, the old policy stays"),
            401: _UNAUTHORIZED,
        },
        [],
    ),
    (
        "get",
        "/v1/policy",
        "getPolicy",
        "The policy in force: hash, files, rule ids, credential names and injector kinds (never values).",
        None,
        {200: ("PolicyView", "the policy"), 401: _UNAUTHORIZED},
        [],
    ),
    (
        "get",
        "/v1/decisions",
        "recentDecisions",
        "Recent decision records (a bounded in-memory ring), newest first.",
        None,
        {200: ("DecisionList", "the records"), 422: (_ERROR, "a query parameter is invalid"), 401: _UNAUTHORIZED},
        [
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            },
            {
                "name": "sandbox",
                "in": "query",
                "required": False,
                "schema": {
                    "type": "string",
                    "pattern": M.SANDBOX_ID_PATTERN,
                    "minLength": 1,
                    "maxLength": M.MAX_SANDBOX_ID,
                },
            },
            {
                "name": "verdict",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": ["allow", "deny"]},
            },
        ],
    ),
    (
        "get",
        "/metrics",
        "metrics",
        "Prometheus metrics (text exposition format).",
        None,
        {200: (None, "the metrics"), 401: _UNAUTHORIZED},
        [],
    ),
    (
        "get",
        "/v1/openapi.json",
        "openapi",
        "This document.",
        None,
        {200: (None, "the OpenAPI document"), 401: _UNAUTHORIZED},
        [],
    ),
]

_MODELS: list[type[BaseModel]] = [
    M.ErrorBody,
    M.Health,
    M.Readiness,
    M.SandboxList,
    M.SandboxView,
    M.SandboxRegistration,
    M.UnregisterView,
    M.ReloadView,
    M.PolicyView,
    M.DecisionList,
]


@functools.cache
def openapi_document() -> dict[str, Any]:
    _, top = models_json_schema(
        [(m, "validation" if m is M.SandboxRegistration else "serialization") for m in _MODELS], ref_template=_REF
    )
    paths: dict[str, dict[str, Any]] = {}
    for method, path, op_id, summary, body, responses, params in OPERATIONS:
        op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": {}}
        if params:
            op["parameters"] = params
        if body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": _REF.format(model=body.__name__)}}},
            }
        if path == "/v1/health":
            op["security"] = []  # liveness probes carry no credentials
        for status, (model, description) in responses.items():
            answer: dict[str, Any] = {"description": description}
            if model is not None:
                answer["content"] = {"application/json": {"schema": {"$ref": _REF.format(model=model)}}}
            elif op_id == "metrics":
                answer["content"] = {"text/plain": {"schema": {"type": "string"}}}
            else:
                answer["content"] = {"application/json": {"schema": {"type": "object"}}}
            if status == 401:
                answer["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
            op["responses"][str(status)] = answer
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cube-egress admin API",
            "version": "1",
            "description": "Register sandboxes, reload policies and watch the gateway. No answer ever carries a "
            "secret value or the CA key. See docs/admin-api.md.",
        },
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        # Over the Unix socket no token is needed; over TCP, a bearer token and/or a client certificate (mTLS).
        "security": [{"bearer": []}],
    }
