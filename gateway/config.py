"""Gateway configuration: one YAML file (version 1), validated strictly like policies, or the embedded default.

The embedded default is what the README's run command uses: an explicit proxy on loopback, the example policies in
`policies/`, and a development secret file. Relative paths in a config file are relative to that file; in the
embedded default they are relative to the working directory.
"""

from __future__ import annotations

import glob
import ipaddress
import os
from collections.abc import Callable
from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .policies._yaml import YamlLoadError, load_yaml
from .secrets import VaultConfig

__all__ = ["ConfigError", "DnsConfig", "GatewayConfig", "load_config", "default_config"]


class ConfigError(ValueError):
    pass


class _C(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_C):
    host: str = "127.0.0.1"
    port: int = Field(default=3128, ge=1, le=65535)


class CAConfig(_C):
    """An existing CA to mint interception certificates with; otherwise one is generated in the state dir."""

    cert: str
    key: str


class ResolverConfig(_C):
    nameservers: list[str] = Field(default_factory=list)  # empty: the system's resolv.conf
    port: int = Field(default=53, ge=1, le=65535)
    timeout_s: float = Field(default=3.0, gt=0)
    # Static answers (like squid's hosts_file), e.g. for development; they are classified like any DNS answer.
    hosts: dict[str, list[str]] = Field(default_factory=dict)
    min_ttl_s: int = Field(default=5, ge=0)
    max_ttl_s: int = Field(default=300, ge=1)

    @model_validator(mode="after")
    def _ttl_order(self) -> ResolverConfig:
        if self.min_ttl_s > self.max_ttl_s:
            raise ValueError("min_ttl_s must not exceed max_ttl_s")
        return self


class DnsListenConfig(_C):
    host: str = "127.0.0.1"  # in production the gateway's address on the sandbox network
    port: int = Field(default=53, ge=1, le=65535)


class DnsConfig(_C):
    """The policy-aware DNS server for sandboxes (UDP and TCP); absent: the gateway serves no DNS."""

    listen: DnsListenConfig = DnsListenConfig()


class AuditConfig(_C):
    path: str | None = None  # default: <state_dir>/audit.jsonl


class SecretsConfig(_C):
    """Where credentials come from. `file` is for development only; production uses `vault` (Vault or OpenBao)."""

    backend: Literal["file", "vault"] = "file"
    path: str | None = None  # file backend
    vault: VaultConfig | None = None
    cache_ttl_s: float = Field(default=300.0, gt=0)
    refresh_ahead: float = Field(default=0.25, gt=0, lt=1)

    @model_validator(mode="after")
    def _backend_settings(self) -> SecretsConfig:
        if self.backend == "file" and not self.path:
            raise ValueError("the file secret backend needs 'path'")
        if self.backend == "vault" and self.vault is None:
            raise ValueError("the vault secret backend needs a 'vault:' section")
        return self


class EnforcementConfig(_C):
    """The kernel guard (ebpf/) is attached per sandbox with `cube-egress sandbox attach`; the gateway only reads
    its drop reports. One reader per network namespace, so this is opt-in."""

    report_drops: bool = False


class GatewayConfig(_C):
    version: Literal[1] = 1
    mode: Literal["explicit", "transparent"] = "explicit"
    listen: ListenConfig = ListenConfig()
    policies: list[str] = Field(min_length=1)
    state_dir: str = ".cube-egress"
    ca: CAConfig | None = None
    upstream_ca: str | None = None  # extra CA bundle trusted for upstreams, on top of the system trust store
    resolver: ResolverConfig = ResolverConfig()
    audit: AuditConfig = AuditConfig()
    secrets: SecretsConfig | None = None
    dns: DnsConfig | None = None
    enforcement: EnforcementConfig = EnforcementConfig()
    # Addresses of the gateway itself (besides the listen address): refused as destinations.
    gateway_addresses: list[str] = Field(default_factory=list)

    def policy_files(self) -> list[str]:
        out: list[str] = []
        for pattern in self.policies:
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches:
                raise ConfigError(f"policies: {pattern!r} matches no file")
            out.extend(matches)
        return out

    @property
    def audit_path(self) -> str:
        return self.audit.path or os.path.join(self.state_dir, "audit.jsonl")

    def own_addresses(self) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        addrs = {ipaddress.ip_address(a) for a in self.gateway_addresses}
        hosts = [self.listen.host] + ([self.dns.listen.host] if self.dns is not None else [])
        for host in hosts:
            try:
                listen = ipaddress.ip_address(host)
            except ValueError:
                continue
            if not listen.is_unspecified:
                addrs.add(listen)
        return frozenset(addrs)

    def own_ports(self) -> frozenset[int]:
        """Ports the gateway itself listens on (proxy, DNS): its own addresses on them are never a destination."""
        return frozenset({self.listen.port} | ({self.dns.listen.port} if self.dns is not None else set()))


def _rebase(cfg: GatewayConfig, base: str) -> GatewayConfig:
    def rel(p: str | None) -> str | None:
        return None if p is None else os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    return cfg.model_copy(
        update={
            "policies": [rel(p) for p in cfg.policies],
            "state_dir": rel(cfg.state_dir),
            "ca": None if cfg.ca is None else CAConfig(cert=rel(cfg.ca.cert) or "", key=rel(cfg.ca.key) or ""),
            "upstream_ca": rel(cfg.upstream_ca),
            "audit": AuditConfig(path=rel(cfg.audit.path)),
            "secrets": None if cfg.secrets is None else _rebase_secrets(cfg.secrets, rel),
        }
    )


def _rebase_secrets(secrets: SecretsConfig, rel: Callable[[str | None], str | None]) -> SecretsConfig:
    vault = secrets.vault
    if vault is not None:
        auth = vault.auth.model_copy(
            update={
                "path": rel(vault.auth.path),
                "role_id_file": rel(vault.auth.role_id_file),
                "secret_id_file": rel(vault.auth.secret_id_file),
            }
        )
        vault = vault.model_copy(update={"ca_file": rel(vault.ca_file), "auth": auth})
    return secrets.model_copy(update={"path": rel(secrets.path), "vault": vault})


def default_config() -> GatewayConfig:
    """The embedded default of the README's run command (development only: file secret store)."""
    return GatewayConfig(
        mode="explicit",
        listen=ListenConfig(host="127.0.0.1", port=3128),
        policies=["policies/*.yaml"],
        state_dir=".cube-egress",
        # The gateway's resolver does not read /etc/hosts; the development policy names `localhost`.
        resolver=ResolverConfig(hosts={"localhost": ["127.0.0.1"]}),
        secrets=SecretsConfig(backend="file", path="examples/dev-secrets.yaml"),
    )


def load_config(path: str) -> GatewayConfig:
    try:
        with open(path, encoding="utf-8") as f:
            doc = load_yaml(f.read(), path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
    except YamlLoadError as e:
        raise ConfigError(str(e)) from e
    try:
        cfg = GatewayConfig.model_validate(doc.value)
    except pydantic.ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{doc.key_at(loc)}: {msg} ({'.'.join(map(str, loc))})")
        raise ConfigError("\n".join(lines)) from e
    return _rebase(cfg, os.path.dirname(os.path.abspath(path)))
