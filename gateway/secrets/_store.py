"""The secret store: what the request path asks for credentials, so that it (almost) never talks to Vault.

Static secrets are cached for `cache_ttl_s` and refreshed in the background before they expire, so in steady state
a request makes no backend call. When the backend is down, cached values serve until their TTL runs out; after
that the request fails closed (SecretUnavailable -> 503) until the backend answers again, which the next request
or background round notices by itself.

Dynamic secrets are leased per sandbox: the first use by sandbox S creates S's own lease, which is renewed while
S is registered and revoked when S is unregistered (or replaced when it cannot be renewed any longer). Leases are
never shared between sandboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ._backends import Fetched, SecretBackend, SecretRef
from ._errors import SecretError, SecretNotFound, SecretUnavailable
from ._value import SecretBundle

__all__ = ["SecretStore"]

log = logging.getLogger("cube_egress.secrets")


@dataclass(slots=True)
class _Entry:
    bundle: SecretBundle
    fetched_at: float
    expires_at: float  # after this the value is not served any more
    refresh_at: float  # when the background task fetches it again
    renewable: bool = False
    lease_id: str | None = None
    failures: int = 0
    duration: float = 0.0  # the lease duration asked for at each renewal (so renewals do not shrink)


@dataclass(slots=True)
class _Stats:
    backend_reads: int = 0
    cache_hits: int = 0
    refresh_failures: int = 0
    leases_created: int = 0
    leases_revoked: int = 0
    by_ref: dict[str, int] = field(default_factory=dict)


class SecretStore:
    def __init__(
        self,
        backend: SecretBackend,
        *,
        cache_ttl_s: float = 300.0,
        refresh_ahead: float = 0.25,
        tick_s: float = 1.0,
    ) -> None:
        self.backend = backend
        self.cache_ttl_s = cache_ttl_s
        self.refresh_ahead = refresh_ahead
        self.tick_s = tick_s
        self._now = time.monotonic
        self._static: dict[SecretRef, _Entry] = {}
        self._leases: dict[tuple[str, SecretRef], _Entry] = {}
        self._locks: dict[object, asyncio.Lock] = {}
        self._task: asyncio.Task[None] | None = None
        self._unregistered: set[str] = set()
        self._down_until: dict[SecretRef, float] = {}
        self.outage_backoff_s = 1.0
        self.stats = _Stats()
        # Told of every backend failure as (backend kind, error kind): the gateway counts them in its metrics.
        self.on_error: Callable[[str, str], None] | None = None

    def _failed(self, kind: str) -> None:
        if self.on_error is not None:
            self.on_error(getattr(self.backend, "kind", "unknown"), kind)

    # -- request path ---------------------------------------------------------------------------------------------

    async def get(self, ref: SecretRef, sandbox_id: str) -> SecretBundle:
        """The current value of `ref` for `sandbox_id` (dynamic secrets are per sandbox). Raises SecretError."""
        if ref.dynamic:
            return await self._get_lease(ref, sandbox_id)
        entry = self._static.get(ref)
        now = self._now()
        if entry is not None and entry.expires_at > now:
            self.stats.cache_hits += 1
            return entry.bundle
        self._fail_fast(ref)
        async with self._lock(ref):
            entry = self._static.get(ref)
            if entry is not None and entry.expires_at > self._now():
                return entry.bundle
            self._fail_fast(ref)
            try:
                entry = await self._fetch_static(ref)
            except SecretUnavailable:
                # While the backend is down, later requests fail at once instead of each waiting for a timeout.
                self._down_until[ref] = self._now() + self.outage_backoff_s
                raise
            self._down_until.pop(ref, None)
            return entry.bundle

    def _fail_fast(self, ref: SecretRef) -> None:
        until = self._down_until.get(ref)
        if until is not None and until > self._now():
            raise SecretUnavailable(f"secret {ref} is unavailable (backend down; retrying shortly)")

    async def _fetch_static(self, ref: SecretRef) -> _Entry:
        fetched = await self._backend_call(self.backend.read(ref), ref)
        now = self._now()
        ttl = self.cache_ttl_s
        entry = _Entry(fetched.bundle, now, now + ttl, now + ttl * (1 - self.refresh_ahead))
        self._static[ref] = entry
        return entry

    async def _get_lease(self, ref: SecretRef, sandbox_id: str) -> SecretBundle:
        if sandbox_id in self._unregistered:
            raise SecretUnavailable(f"sandbox {sandbox_id!r} is unregistered; its leases are revoked")
        key = (sandbox_id, ref)
        entry = self._leases.get(key)
        if entry is not None and entry.expires_at > self._now():
            self.stats.cache_hits += 1
            return entry.bundle
        async with self._lock(key):
            entry = self._leases.get(key)
            if entry is not None and entry.expires_at > self._now():
                return entry.bundle
            if entry is not None and entry.lease_id:
                await self._revoke_quietly(entry.lease_id)
            fetched = await self._backend_call(self.backend.lease(ref), ref)
            entry = self._lease_entry(fetched)
            self._leases[key] = entry
            self.stats.leases_created += 1
            log.info("leased %s for sandbox %s (%.0fs)", ref, sandbox_id, entry.expires_at - entry.fetched_at)
            return entry.bundle

    def _lease_entry(self, fetched: Fetched) -> _Entry:
        now = self._now()
        duration = fetched.ttl_s or self.cache_ttl_s
        # Renew at two thirds of the lease; stop serving a little before Vault revokes it.
        margin = min(5.0, duration * 0.1)
        return _Entry(
            fetched.bundle,
            now,
            now + duration - margin,
            now + duration * 2 / 3,
            renewable=fetched.renewable,
            lease_id=fetched.bundle.lease_id,
            duration=duration,
        )

    async def _backend_call(self, call: object, ref: SecretRef) -> Fetched:
        self.stats.backend_reads += 1
        self.stats.by_ref[str(ref)] = self.stats.by_ref.get(str(ref), 0) + 1
        try:
            result: Fetched = await call  # type: ignore[misc]
        except SecretNotFound:
            self._failed("not_found")
            raise
        except SecretError:
            self._failed("unavailable")
            raise
        except Exception as e:  # a backend bug must not leak details or crash the hook: fail closed
            self._failed("internal")
            raise SecretUnavailable(f"secret backend error ({type(e).__name__})") from None
        return result

    def _lock(self, key: object) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    # -- sandboxes ------------------------------------------------------------------------------------------------

    def register(self, sandbox_id: str) -> None:
        self._unregistered.discard(sandbox_id)

    async def unregister(self, sandbox_id: str) -> int:
        """Revoke every lease the sandbox holds; returns how many. Later requests for it get no new lease."""
        self._unregistered.add(sandbox_id)
        revoked = 0
        for key in [k for k in self._leases if k[0] == sandbox_id]:
            entry = self._leases.pop(key)
            if entry.lease_id and await self._revoke_quietly(entry.lease_id):
                revoked += 1
        return revoked

    async def _revoke_quietly(self, lease_id: str) -> bool:
        try:
            await self.backend.revoke(lease_id)
        except SecretError as e:
            self._failed("revoke")
            log.warning("could not revoke lease %s: %s", lease_id.rsplit("/", 1)[-1], e)
            return False
        self.stats.leases_revoked += 1
        return True

    # -- background -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="secret-store")

    async def close(self, revoke_leases: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if revoke_leases:
            for sandbox_id in {k[0] for k in self._leases}:
                await self.unregister(sandbox_id)
        await self.backend.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
            except Exception:  # keep the refresher alive whatever happens; the request path fails closed anyway
                log.exception("secret refresh round failed")

    async def tick(self) -> None:
        """One background round: renew the gateway's own token, refresh static values, renew leases."""
        with contextlib.suppress(SecretError):
            await self.backend.maintain()
        now = self._now()
        for ref, entry in list(self._static.items()):
            if entry.refresh_at <= now:
                try:
                    await self._fetch_static(ref)
                except SecretError as e:
                    entry.failures += 1
                    self.stats.refresh_failures += 1
                    # Try again soon; the old value keeps serving until its expiry.
                    entry.refresh_at = now + min(5.0 * entry.failures, 30.0)
                    left = entry.expires_at - now
                    log.warning(
                        "refreshing %s failed (%s); %s",
                        ref,
                        e,
                        f"cached value valid for {left:.0f}s" if left > 0 else "no valid cached value",
                    )
        for key, entry in list(self._leases.items()):
            if entry.refresh_at > now or not entry.lease_id:
                continue
            if entry.renewable:
                try:
                    duration = await self.backend.renew(entry.lease_id, int(entry.duration) or 60)
                except SecretError as e:
                    self._failed("renew")
                    entry.failures += 1
                    entry.refresh_at = now + min(5.0 * entry.failures, 30.0)
                    log.warning("renewing the lease of %s for %s failed: %s", key[1], key[0], e)
                    continue
                if duration > 0:
                    margin = min(5.0, duration * 0.1)
                    entry.fetched_at, entry.expires_at = now, now + duration - margin
                    entry.refresh_at = now + duration * 2 / 3
                    continue
            # Not renewable (or at its max TTL): let it run out; the next use after expiry leases a new one.
            entry.refresh_at = entry.expires_at
