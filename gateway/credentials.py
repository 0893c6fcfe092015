"""The credential broker: from a rule's credential reference to the material an injector needs.

It owns the secret store (Vault/OpenBao or the dev file) and the OAuth2 token cache, and the gateway's HMAC key
for audit fingerprints. It is I/O, so it lives outside the pure policy core; it never imports mitmproxy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets as pysecrets
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx

from .config import SecretsConfig
from .injectors import OAuth2ClientCredentialsParams
from .policies import CompiledPolicy, CredentialRef, normalize_host, parse_ip_literal
from .resolver import Resolver
from .secrets import (
    Fetched,
    FileBackend,
    SecretBackend,
    SecretBundle,
    SecretError,
    SecretRef,
    SecretStore,
    SecretUnavailable,
    SecretValue,
    VaultBackend,
)

__all__ = ["CredentialBroker", "load_hmac_key"]

log = logging.getLogger("cube_egress.credentials")


def load_hmac_key(state_dir: str) -> bytes:
    """The gateway's fingerprint key (32 random bytes, 0600), created on first run."""
    path = Path(state_dir) / "fingerprint.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        key = pysecrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key


@dataclass(slots=True)
class _Token:
    value: SecretValue
    obtained_at: float
    expires_at: float


class _OAuth2Tokens:
    """Client-credentials tokens, cached per credential and refreshed ahead of expiry (in the background, while
    the current token keeps serving)."""

    def __init__(self, store: SecretStore, trust: str | bool, resolver: Resolver | None) -> None:
        self._store = store
        self._resolver = resolver
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._refreshing: dict[str, asyncio.Task[_Token]] = {}
        # httpx wants an SSLContext for a CA file (a path is deprecated); True keeps its default verification.
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=trust) if isinstance(trust, str) else trust
        self._client = httpx.AsyncClient(verify=verify, timeout=10.0, follow_redirects=False, trust_env=False)
        self.fetches = 0

    async def token(self, cred: CredentialRef, params: OAuth2ClientCredentialsParams, sandbox_id: str) -> SecretValue:
        # Client credentials leased per sandbox give tokens per sandbox; static ones may share a token.
        key = f"{cred.name}@{sandbox_id}" if SecretRef.parse(cred.secret).dynamic else cred.name
        now = time.monotonic()
        current = self._tokens.get(key)
        if current is not None and current.expires_at > now:
            lifetime = current.expires_at - current.obtained_at
            if now > current.obtained_at + lifetime * 0.75 and key not in self._refreshing:
                task = asyncio.get_running_loop().create_task(self._fetch(cred, params, sandbox_id, key))
                self._refreshing[key] = task
                name = key

                def done(t: asyncio.Task[_Token]) -> None:
                    self._refreshing.pop(name, None)
                    if not t.cancelled() and t.exception() is not None:
                        log.warning("refreshing the OAuth2 token of %s failed: %s", name, t.exception())

                task.add_done_callback(done)
            return current.value
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            current = self._tokens.get(key)
            if current is not None and current.expires_at > time.monotonic():
                return current.value
            return (await self._fetch(cred, params, sandbox_id, key)).value

    async def _fetch(
        self, cred: CredentialRef, params: OAuth2ClientCredentialsParams, sandbox_id: str, key: str
    ) -> _Token:
        client = await self._store.get(SecretRef.parse(cred.secret), sandbox_id)
        try:
            client_id, client_secret = client["client_id"].reveal(), client["client_secret"].reveal()
        except KeyError:
            raise SecretUnavailable(f"{cred.secret!r} needs the fields client_id and client_secret") from None
        form = {"grant_type": "client_credentials"}
        if params.scopes:
            form["scope"] = " ".join(params.scopes)
        self.fetches += 1
        url = httpx.URL(params.token_url)
        extensions: dict[str, str] = {}
        headers: dict[str, str] = {}
        if self._resolver is not None and parse_ip_literal(url.host) is None:
            # Resolve with the gateway's own resolver (the one policy decisions use) and dial that address; the
            # name stays the TLS server name and Host, so certificate verification is unchanged.
            resolution = await self._resolver.resolve(normalize_host(url.host))
            if not resolution.addresses:
                raise SecretUnavailable(f"token endpoint {url.host!r} does not resolve")
            headers["Host"] = url.netloc.decode("ascii")
            extensions["sni_hostname"] = url.host
            url = url.copy_with(host=str(resolution.addresses[0]))
        try:
            response = await self._client.post(
                url, data=form, auth=(client_id, client_secret), headers=headers, extensions=extensions
            )
        except httpx.HTTPError as e:
            raise SecretUnavailable(f"token endpoint unreachable ({type(e).__name__})") from None
        if response.status_code != 200:
            raise SecretUnavailable(f"token endpoint answered {response.status_code}")
        try:
            body = response.json()
            access = str(body["access_token"])
            expires_in = float(body.get("expires_in") or 300)
        except (ValueError, KeyError, TypeError):
            raise SecretUnavailable("token endpoint answered without an access_token") from None
        now = time.monotonic()
        token = _Token(SecretValue(access, f"{cred.name}#access_token"), now, now + max(expires_in - 1.0, 1.0))
        self._tokens[key] = token
        return token

    async def close(self) -> None:
        for task in list(self._refreshing.values()):
            task.cancel()
        await self._client.aclose()


class CredentialBroker:
    def __init__(
        self,
        config: SecretsConfig | None,
        state_dir: str,
        trust_file: str | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        backend: SecretBackend
        if config is None:
            backend = _NoSecrets()
        elif config.backend == "file":
            assert config.path is not None
            backend = FileBackend(config.path)
        else:
            assert config.vault is not None
            backend = VaultBackend(config.vault)
        self.backend = backend
        self.store = SecretStore(
            backend,
            cache_ttl_s=config.cache_ttl_s if config else 300.0,
            refresh_ahead=config.refresh_ahead if config else 0.25,
        )
        self.hmac_key = load_hmac_key(state_dir)
        self.oauth2 = _OAuth2Tokens(self.store, trust_file or True, resolver)
        self.dev_only = isinstance(backend, FileBackend)

    def start(self) -> None:
        self.store.start()

    async def close(self) -> None:
        await self.oauth2.close()
        await self.store.close()

    async def material(self, cred: CredentialRef, sandbox_id: str) -> SecretBundle:
        """What the credential's injector needs, for this sandbox. Raises SecretError (-> 503, fail closed)."""
        if isinstance(cred.injector, OAuth2ClientCredentialsParams):
            token = await self.oauth2.token(cred, cred.injector, sandbox_id)
            return SecretBundle(cred.name, {"access_token": token})
        return await self.store.get(SecretRef.parse(cred.secret), sandbox_id)

    async def check_policy(self, policy: CompiledPolicy) -> list[str]:
        """Fetch every static secret the policy names once (warming the cache); returns the problems found."""
        problems = []
        seen: set[str] = set()
        for rules in policy.rules_by_policy.values():
            for rule in rules:
                cred = rule.credential
                if cred is None or cred.secret in seen or cred.secret.startswith("dynamic:"):
                    continue
                seen.add(cred.secret)
                try:
                    await self.store.get(SecretRef.parse(cred.secret), "-")
                except SecretError as e:
                    problems.append(f"credential {cred.name!r}: {e}")
        return problems


class _NoSecrets:
    """No secret backend configured: any credential use fails closed with a clear reason."""

    kind: ClassVar[str] = "none"

    async def read(self, ref: SecretRef) -> Fetched:
        raise SecretUnavailable("no secret backend is configured (config 'secrets:')")

    async def lease(self, ref: SecretRef) -> Fetched:
        raise SecretUnavailable("no secret backend is configured (config 'secrets:')")

    async def renew(self, lease_id: str, increment_s: int) -> float:
        raise SecretUnavailable("no secret backend is configured")

    async def revoke(self, lease_id: str) -> None:
        return None

    async def maintain(self) -> None:
        return None

    async def close(self) -> None:
        return None
