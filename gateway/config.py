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

from .audit._sinks import SinkConfig, rebase_sinks
from .policies._yaml import YamlLoadError, load_yaml
from .secrets import VaultConfig

__all__ = ["AdminConfig", "ConfigError", "DnsConfig", "GatewayConfig", "load_config", "default_config"]


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
    """The hash-chained audit log (docs/audit.md)."""

    path: str | None = None  # default: <state_dir>/audit.jsonl
    # none: write, never fsync; batched: fsync every batch_ms; strict: a response waits until its record is fsynced
    durability: Literal["none", "batched", "strict"] = "batched"
    batch_ms: float = Field(default=5.0, ge=0, le=1000)
    signing_key: str | None = None  # Ed25519 PKCS#8 PEM; default <state_dir>/audit-signing-key.pem (generated)
    checkpoint_records: int = Field(default=1000, ge=1)
    checkpoint_interval_s: float = Field(default=10.0, gt=0)
    rotate_bytes: int | None = Field(default=128 * 1024 * 1024, ge=4096)  # null: no rotation by size
    rotate_interval_s: float | None = Field(default=None, gt=0)  # e.g. 86400 for a file a day
    sinks: list[SinkConfig] = Field(default_factory=list)  # copies to a SIEM: syslog, webhook (docs/audit.md, Sinks)


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


class AdminTcpConfig(_C):
    host: str = "127.0.0.1"  # an IP literal: it is added to the gateway's own addresses (never a destination)
    port: int = Field(ge=1, le=65535)

    @model_validator(mode="after")
    def _ip_literal(self) -> AdminTcpConfig:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(f"admin tcp host {self.host!r} must be an IP address, not a name") from None
        return self


class AdminTlsConfig(_C):
    """mTLS: the admin API's certificate and key, and the CA its clients' certificates must chain to."""

    cert: str
    key: str
    client_ca: str


class AdminConfig(_C):
    """The admin API (docs/admin-api.md): a Unix socket (0600) by default; TCP needs a token file or mTLS."""

    enabled: bool = True
    unix_socket: str | None = None  # default <state_dir>/admin.sock when there is no 'tcp'
    tcp: AdminTcpConfig | None = None
    token_file: str | None = None  # bearer token for TCP; the file must not be group/world readable
    tls: AdminTlsConfig | None = None

    @model_validator(mode="after")
    def _auth(self) -> AdminConfig:
        if self.tcp is not None and self.token_file is None and self.tls is None:
            raise ValueError("admin 'tcp' needs 'token_file' or 'tls' (client certificates): it is never open")
        if self.tcp is None and (self.token_file is not None or self.tls is not None):
            raise ValueError("admin 'token_file' and 'tls' apply to 'tcp' only")
        return self


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
    admin: AdminConfig = AdminConfig()
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

    @property
    def audit_signing_key(self) -> str:
        return self.audit.signing_key or os.path.join(self.state_dir, "audit-signing-key.pem")

    @property
    def admin_socket(self) -> str | None:
        """The admin API's Unix socket path, or None when it serves TCP only (or is disabled)."""
        if not self.admin.enabled or (self.admin.tcp is not None and self.admin.unix_socket is None):
            return None
        return self.admin.unix_socket or os.path.join(self.state_dir, "admin.sock")

    def own_addresses(self) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        addrs = {ipaddress.ip_address(a) for a in self.gateway_addresses}
        hosts = [self.listen.host] + ([self.dns.listen.host] if self.dns is not None else [])
        if self.admin.enabled and self.admin.tcp is not None:
            hosts.append(self.admin.tcp.host)  # so no rule can make the admin API a sandbox's destination
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
        admin = {self.admin.tcp.port} if self.admin.enabled and self.admin.tcp is not None else set()
        return frozenset({self.listen.port} | ({self.dns.listen.port} if self.dns is not None else set()) | admin)


def _rebase(cfg: GatewayConfig, base: str) -> GatewayConfig:
    def rel(p: str | None) -> str | None:
        return None if p is None else os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    return cfg.model_copy(
        update={
            "policies": [rel(p) for p in cfg.policies],
            "state_dir": rel(cfg.state_dir),
            "ca": None if cfg.ca is None else CAConfig(cert=rel(cfg.ca.cert) or "", key=rel(cfg.ca.key) or ""),
            "upstream_ca": rel(cfg.upstream_ca),
            "audit": cfg.audit.model_copy(
                update={
                    "path": rel(cfg.audit.path),
                    "signing_key": rel(cfg.audit.signing_key),
                    "sinks": rebase_sinks(cfg.audit.sinks, rel),
                }
            ),
            "secrets": None if cfg.secrets is None else _rebase_secrets(cfg.secrets, rel),
            "admin": cfg.admin.model_copy(
                update={
                    "unix_socket": rel(cfg.admin.unix_socket),
                    "token_file": rel(cfg.admin.token_file),
                    "tls": None
                    if cfg.admin.tls is None
                    else AdminTlsConfig(
                        cert=rel(cfg.admin.tls.cert) or "",
                        key=rel(cfg.admin.tls.key) or "",
                        client_ca=rel(cfg.admin.tls.client_ca) or "",
                    ),
                }
            ),
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
