"""The gateway's own resolver: the gateway dials only addresses it resolved itself and then checked.

A sandbox's idea of where a name points (its /etc/hosts, `curl --resolve`, a DNS server it picked) never decides
where the gateway connects. Answers are cached for their TTL (clamped), so the address a transparent connection
is checked against is the same one the gateway would dial.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from .config import ResolverConfig
from .policies import IPAddress, normalize_host, parse_ip_literal

__all__ = ["Resolution", "Resolver"]

_CACHE_SIZE = 16_384


@dataclass(frozen=True, slots=True)
class Resolution:
    name: str
    addresses: tuple[IPAddress, ...]  # empty: the name does not exist or has no A record
    error: str | None = None


class Resolver:
    def __init__(self, config: ResolverConfig) -> None:
        self._config = config
        self._static = {
            normalize_host(name): tuple(ipaddress.ip_address(a) for a in addrs) for name, addrs in config.hosts.items()
        }
        if config.nameservers:
            self._dns = dns.asyncresolver.Resolver(configure=False)
            self._dns.nameservers = list(config.nameservers)
        else:
            self._dns = dns.asyncresolver.Resolver()
        self._dns.port = config.port
        self._dns.lifetime = config.timeout_s
        self._cache: dict[str, tuple[float, Resolution]] = {}
        self._inflight: dict[str, asyncio.Future[Resolution]] = {}

    async def resolve(self, name: str) -> Resolution:
        """IPv4 addresses for a normalised name (IP literals resolve to themselves)."""
        literal = parse_ip_literal(name)
        if literal is not None:
            return Resolution(name, (literal,))
        if name in self._static:
            return Resolution(name, self._static[name])
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._inflight.get(name)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Resolution] = asyncio.get_running_loop().create_future()
        self._inflight[name] = fut
        try:
            res, ttl = await self._query(name)
            if len(self._cache) >= _CACHE_SIZE:
                # Bounded: names are sandbox-controlled. Drop expired entries, then the oldest eighth.
                for key in [k for k, (exp, _) in self._cache.items() if exp <= now] or list(
                    itertools.islice(self._cache, _CACHE_SIZE // 8)
                ):
                    del self._cache[key]
            self._cache[name] = (now + ttl, res)
            fut.set_result(res)
            return res
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters get it, nobody else warns
            raise
        finally:
            del self._inflight[name]

    def expires_in(self, resolution: Resolution) -> float | None:
        """Seconds this cached answer has left (None when it is not a cached answer: static or an IP literal)."""
        hit = self._cache.get(resolution.name)
        if hit is None or hit[1] is not resolution:
            return None
        return hit[0] - time.monotonic()

    def cached(self, name: str) -> Resolution | None:
        hit = self._cache.get(name)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    async def _query(self, name: str) -> tuple[Resolution, float]:
        cfg = self._config
        try:
            answer = await self._dns.resolve(name, dns.rdatatype.A, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return Resolution(name, (), "no such name"), float(cfg.min_ttl_s)
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as e:
            # Not cached: the next request asks again instead of failing for a whole TTL.
            return Resolution(name, (), f"resolver failed: {type(e).__name__}"), 0.0
        addrs = tuple(ipaddress.ip_address(r.address) for r in answer)
        ttl = min(max(answer.rrset.ttl if answer.rrset is not None else 0, cfg.min_ttl_s), cfg.max_ttl_s)
        return Resolution(name, addrs), float(ttl)
