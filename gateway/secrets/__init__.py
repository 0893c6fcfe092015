"""Secret backends and the store the request path reads from. Nothing here imports mitmproxy.

SecretValue / SecretBundle     values that print as their names
SecretRef                      `path[#field]` or `dynamic:path`
BACKENDS                       closed registry: file (development), vault (Vault / OpenBao via hvac)
SecretStore                    cache, background refresh, per-sandbox leases, fail closed
"""

from __future__ import annotations

from ._backends import BACKENDS, Fetched, FileBackend, SecretBackend, SecretRef, VaultAuth, VaultBackend, VaultConfig
from ._errors import SecretError, SecretNotFound, SecretUnavailable
from ._store import SecretStore
from ._value import SecretBundle, SecretValue

__all__ = [
    "BACKENDS",
    "Fetched",
    "FileBackend",
    "SecretBackend",
    "SecretBundle",
    "SecretError",
    "SecretNotFound",
    "SecretRef",
    "SecretStore",
    "SecretUnavailable",
    "SecretValue",
    "VaultAuth",
    "VaultBackend",
    "VaultConfig",
]
