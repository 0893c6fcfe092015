"""Secret backends: a closed registry of where credentials come from.

    file    a local YAML/JSON file; development only (the README's run command)
    vault   HashiCorp Vault or OpenBao through hvac: KV v1/v2 and dynamic engines (leases), token / token file /
            AppRole auth, namespaces, TLS with a CA file; the gateway renews its own token

hvac is synchronous: every call runs in a worker thread so the proxy's event loop never blocks on Vault.
Third-party errors are translated here into SecretNotFound / SecretUnavailable (see _errors).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import hvac
import hvac.exceptions
import requests
import yaml
from pydantic import BaseModel, ConfigDict, Field

from ..policies import SecretRef
from ._errors import SecretNotFound, SecretUnavailable
from ._value import SecretBundle, SecretValue

__all__ = [
    "BACKENDS",
    "FileBackend",
    "Fetched",
    "SecretBackend",
    "SecretRef",
    "VaultBackend",
    "VaultConfig",
]

log = logging.getLogger("cube_egress.secrets")


@dataclass(frozen=True, slots=True)
class Fetched:
    bundle: SecretBundle
    ttl_s: float | None  # lease duration for dynamic secrets; None: the store's cache TTL applies
    renewable: bool = False


class SecretBackend(Protocol):
    kind: ClassVar[str]

    async def read(self, ref: SecretRef) -> Fetched: ...

    async def lease(self, ref: SecretRef) -> Fetched: ...

    async def renew(self, lease_id: str, increment_s: int) -> float: ...

    async def revoke(self, lease_id: str) -> None: ...

    async def maintain(self) -> None: ...

    async def close(self) -> None: ...


def _bundle(name: str, data: Any, lease_id: str | None = None) -> SecretBundle:
    if isinstance(data, str):
        return SecretBundle(name, {"value": SecretValue(data, name)}, lease_id)
    if isinstance(data, dict) and data and all(isinstance(k, str) for k in data):
        return SecretBundle(name, {k: SecretValue(str(v), f"{name}#{k}") for k, v in data.items()}, lease_id)
    raise SecretNotFound(f"secret {name!r} is not a string or a mapping of fields")


def _select(ref: SecretRef, bundle: SecretBundle) -> SecretBundle:
    if ref.field is None:
        return bundle
    if ref.field not in bundle:
        raise SecretNotFound(f"secret {ref.path!r} has no field {ref.field!r} (it has {sorted(bundle)})")
    return SecretBundle(str(ref), {ref.field: bundle[ref.field]})


class FileBackend:
    """Secrets from a local file (YAML or JSON): `path: value` or `path: {field: value}`. Development only.

    Re-read when the file changes, so editing it needs no restart."""

    kind: ClassVar[str] = "file"

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime = -1.0
        self._data: dict[str, Any] = {}

    def _load(self) -> dict[str, Any]:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as e:
            raise SecretUnavailable(f"secret file {self.path!r}: {e.strerror}") from None
        if mtime != self._mtime:
            try:
                with open(self.path, encoding="utf-8") as f:
                    data = yaml.safe_load(f) or {}
            except (OSError, yaml.YAMLError) as e:
                # The message of a YAML error may quote the file's content: keep only its position.
                raise SecretUnavailable(f"secret file {self.path!r} cannot be read ({type(e).__name__})") from None
            if not isinstance(data, dict):
                raise SecretUnavailable(f"secret file {self.path!r} must be a mapping")
            self._data, self._mtime = data, mtime
        return self._data

    async def read(self, ref: SecretRef) -> Fetched:
        data = self._load()
        if ref.path not in data:
            raise SecretNotFound(f"secret {ref.path!r} is not in {self.path!r}")
        return Fetched(_select(ref, _bundle(ref.path, data[ref.path])), None)

    async def lease(self, ref: SecretRef) -> Fetched:
        raise SecretNotFound(f"the file backend has no dynamic secrets ({ref})")

    async def renew(self, lease_id: str, increment_s: int) -> float:
        raise SecretNotFound("the file backend has no leases")

    async def revoke(self, lease_id: str) -> None:
        return None

    async def maintain(self) -> None:
        return None

    async def close(self) -> None:
        return None


class _C(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VaultAuth(_C):
    """How the gateway logs in. Secrets for the login itself come from files or the environment, never the config."""

    method: Literal["token", "token_file", "approle"] = "token"
    token_env: str = "VAULT_TOKEN"  # noqa: S105 (a variable name) -- method token: the variable holding it (BAO_TOKEN is read as a fallback)
    path: str | None = None  # method token_file
    role_id: str | None = None  # method approle
    role_id_file: str | None = None
    secret_id_file: str | None = None
    secret_id_env: str | None = None
    mount: str = "approle"


class VaultConfig(_C):
    address: str = Field(pattern=r"^https?://")
    namespace: str | None = None
    ca_file: str | None = None
    auth: VaultAuth = VaultAuth()
    kv_mount: str = "secret"
    kv_version: Literal[1, 2] = 2
    timeout_s: float = Field(default=5.0, gt=0)


def _read_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise SecretUnavailable(f"cannot read the Vault {what} file {path!r}: {e.strerror}") from None


class VaultBackend:
    kind: ClassVar[str] = "vault"

    def __init__(self, config: VaultConfig) -> None:
        self.config = config
        verify: bool | str = config.ca_file or True
        self._client = hvac.Client(
            url=config.address, namespace=config.namespace, verify=verify, timeout=config.timeout_s
        )
        # hvac picks up VAULT_TOKEN or ~/.vault-token by itself; the configured login decides, nothing ambient.
        self._client.token = None
        self._token_expires: float | None = None  # monotonic; None: not logged in or no expiry
        self._token_renewable = False
        self._login_lock = asyncio.Lock()
        self.calls = 0  # every request made to Vault: the secrets bench reports this per proxied request

    async def _call(self, fn: Any, *args: Any, relogin: bool = True, **kwargs: Any) -> Any:
        self.calls += 1
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except hvac.exceptions.InvalidPath as e:
            raise SecretNotFound("no such secret path") from e
        except hvac.exceptions.Forbidden as e:
            # Our token may have been revoked or lost (a restarted server): then, and only then, log in again
            # once and retry. A policy that simply lacks the path stays a refusal (no new token per request).
            if relogin and self.config.auth.method != "token" and not await self._token_valid():
                self._client.token = None
                async with self._login_lock:
                    await self._login()
                return await self._call(fn, *args, relogin=False, **kwargs)
            raise SecretUnavailable("Vault refused the request (permission denied)") from e
        except (hvac.exceptions.VaultError, requests.RequestException, OSError) as e:
            raise SecretUnavailable(f"Vault unreachable or failing ({type(e).__name__})") from e

    async def _token_valid(self) -> bool:
        try:
            await self._call(self._client.auth.token.lookup_self, relogin=False)
        except SecretUnavailable:
            return False
        return True

    async def _ensure_login(self) -> None:
        if self._client.token and (self._token_expires is None or self._token_expires > time.monotonic() + 5):
            return
        async with self._login_lock:
            if self._client.token and (self._token_expires is None or self._token_expires > time.monotonic() + 5):
                return
            await self._login()

    async def _login(self) -> None:
        auth = self.config.auth
        if auth.method == "token":
            token = os.environ.get(auth.token_env) or os.environ.get("BAO_TOKEN")
            if not token:
                raise SecretUnavailable(f"no Vault token: set {auth.token_env}")
            self._client.token = token
        elif auth.method == "token_file":
            if not auth.path:
                raise SecretUnavailable("vault auth token_file needs 'path'")
            self._client.token = _read_file(auth.path, "token")
        else:
            role_id = auth.role_id or (_read_file(auth.role_id_file, "role id") if auth.role_id_file else None)
            secret_id = (
                _read_file(auth.secret_id_file, "secret id")
                if auth.secret_id_file
                else (os.environ.get(auth.secret_id_env) if auth.secret_id_env else None)
            )
            if not role_id or not secret_id:
                raise SecretUnavailable("vault auth approle needs a role id and a secret id (file or env)")
            result = await self._call(
                self._client.auth.approle.login,
                role_id=role_id,
                secret_id=secret_id,
                mount_point=auth.mount,
                relogin=False,
            )
            self._client.token = result["auth"]["client_token"]
        info = await self._call(self._client.auth.token.lookup_self, relogin=False)
        ttl = int(info["data"].get("ttl") or 0)
        self._token_expires = time.monotonic() + ttl if ttl > 0 else None
        self._token_renewable = bool(info["data"].get("renewable"))
        self._ttl = float(ttl)
        log.info("logged in to Vault (%s auth), token ttl %s", auth.method, f"{ttl}s" if ttl else "none")

    async def maintain(self) -> None:
        """Renew the gateway's own token at two thirds of its life; log in again when it cannot be renewed."""
        if self._token_expires is None or not self._client.token:
            return
        remaining = self._token_expires - time.monotonic()
        if remaining > 0 and remaining > self._ttl_hint() / 3:
            return
        try:
            if self._token_renewable:
                result = await self._call(self._client.auth.token.renew_self)
                ttl = int(result["auth"].get("lease_duration") or 0)
                self._token_expires = time.monotonic() + ttl if ttl > 0 else None
                self._ttl = float(ttl)
                return
        except SecretUnavailable as e:
            log.warning("Vault token renewal failed: %s", e)
        self._client.token = None
        await self._ensure_login()

    _ttl: float = 0.0

    def _ttl_hint(self) -> float:
        return self._ttl or 60.0

    async def read(self, ref: SecretRef) -> Fetched:
        await self._ensure_login()
        kv = self._client.secrets.kv
        if self.config.kv_version == 2:
            result = await self._call(
                kv.v2.read_secret_version,
                path=ref.path,
                mount_point=self.config.kv_mount,
                raise_on_deleted_version=True,
            )
            data = result["data"]["data"]
        else:
            result = await self._call(kv.v1.read_secret, path=ref.path, mount_point=self.config.kv_mount)
            data = result["data"]
        return Fetched(_select(ref, _bundle(ref.path, data)), None)

    async def lease(self, ref: SecretRef) -> Fetched:
        await self._ensure_login()
        result = await self._call(self._client.read, ref.path)
        if not result or "data" not in result:
            raise SecretNotFound(f"dynamic secret {ref.path!r} returned nothing")
        lease_id = result.get("lease_id") or None
        bundle = _bundle(ref.path, result["data"], lease_id)
        return Fetched(bundle, float(result.get("lease_duration") or 0) or None, bool(result.get("renewable")))

    async def renew(self, lease_id: str, increment_s: int) -> float:
        await self._ensure_login()
        result = await self._call(self._client.sys.renew_lease, lease_id=lease_id, increment=increment_s)
        return float(result.get("lease_duration") or 0)

    async def revoke(self, lease_id: str) -> None:
        await self._ensure_login()
        await self._call(self._client.sys.revoke_lease, lease_id=lease_id)

    async def close(self) -> None:
        self._client.adapter.close()


BACKENDS: dict[str, type[FileBackend] | type[VaultBackend]] = {"file": FileBackend, "vault": VaultBackend}
