"""The admin API (docs/admin-api.md): register and unregister sandboxes, reload policies atomically, recent
decisions, health and readiness, Prometheus metrics, and its OpenAPI document.

    AdminServer(gateway, config)     # started and stopped by gateway.server.Gateway.run
    build_app(gateway, recent, token) -> aiohttp.web.Application
    openapi_document() -> dict       # OpenAPI 3.1, generated from the response and request models

Errors:

    ValueError
    └── AdminAuthError      unsafe TCP credentials (token file readable by others, too short; bad TLS files)
    RuntimeError
    └── AdminStartError     cannot listen (socket path served by another gateway, port taken)
"""

from __future__ import annotations

from ._app import AdminServer, AdminStartError, GatewayControl, RecentDecisions, build_app
from ._auth import AdminAuthError
from ._openapi import openapi_document

__all__ = [
    "AdminAuthError",
    "AdminServer",
    "AdminStartError",
    "GatewayControl",
    "RecentDecisions",
    "build_app",
    "openapi_document",
]
