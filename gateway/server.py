"""Assembling and running the gateway: mitmproxy embedded in-process with a curated set of addons.

We do not use mitmproxy's DumpMaster: its default addons include an onboarding app that serves the CA, scripting,
replay and rewriting features that have no place in a process that holds credentials. Only the addons the proxy
needs to function are loaded, and ours first among the ones that see flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import threading
from pathlib import Path

import certifi
from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig
from mitmproxy.certs import CertStore
from mitmproxy.master import Master

from .addon import EgressAddon, GatewayState
from .admin import AdminServer, AdminStartError
from .audit import AuditLog, make_sinks
from .audit import fields as F
from .config import GatewayConfig
from .credentials import CredentialBroker
from .dns import DnsServer
from .enforcement import report_drops
from .metrics import GatewayMetrics
from .policies import CompiledPolicy, PolicyIssue, SandboxConflict, SandboxDTO
from .policies._yaml import Position
from .registry import PolicyRegistry, ReloadResult, registration_fields, reload_fields
from .resolver import Resolver

__all__ = ["Gateway", "GatewayStartError", "ensure_ca"]


class GatewayStartError(RuntimeError):
    """The gateway could not start serving (e.g. its listen address is taken)."""


log = logging.getLogger("cube_egress.gateway")

CA_BASENAME = "mitmproxy"


def ensure_ca(config: GatewayConfig) -> Path:
    """Make sure the interception CA exists in the state dir; returns the confdir mitmproxy reads.

    Generated on first run (the key file is 0600), or assembled from the configured cert and key. The private key
    is never copied anywhere else and no endpoint serves it.
    """
    confdir = Path(config.state_dir) / "ca"
    confdir.mkdir(parents=True, exist_ok=True)
    os.chmod(confdir, 0o700)
    key_pem = confdir / f"{CA_BASENAME}-ca.pem"
    cert_pem = confdir / f"{CA_BASENAME}-ca-cert.pem"
    if config.ca is not None:
        cert = Path(config.ca.cert).read_bytes()
        key = Path(config.ca.key).read_bytes()
        fd = os.open(key_pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n" + cert)
        cert_pem.write_bytes(cert)
    elif not key_pem.exists():
        CertStore.create_store(confdir, CA_BASENAME, 2048, organization="cube-egress", cn="cube-egress CA")
        # PKCS#12 bundles also hold the key and nothing here needs them.
        for extra in confdir.glob(f"{CA_BASENAME}-ca*.p12"):
            extra.unlink()
    os.chmod(key_pem, 0o600)
    return confdir


def _system_trust_file() -> str:
    """The system's CA bundle (Debian: /etc/ssl/certs/ca-certificates.crt), or certifi's where there is none."""
    default = ssl.get_default_verify_paths().cafile
    if default and os.path.exists(default):
        return default
    for candidate in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        if os.path.exists(candidate):
            return candidate
    return certifi.where()


def _upstream_bundle(config: GatewayConfig) -> str:
    """What upstream certificates are verified against: the system trust store plus the optional extra CA.

    mitmproxy takes a single file, so the two are concatenated into the state dir."""
    system = _system_trust_file()
    if config.upstream_ca is None:
        return system
    bundle = Path(config.state_dir) / "upstream-trust.pem"
    bundle.write_bytes(Path(system).read_bytes() + b"\n" + Path(config.upstream_ca).read_bytes())
    return str(bundle)


def _open_audit(config: GatewayConfig) -> AuditLog:
    a = config.audit
    return AuditLog(
        config.audit_path,
        durability=a.durability,
        signing_key=config.audit_signing_key,
        checkpoint_records=a.checkpoint_records,
        checkpoint_interval_s=a.checkpoint_interval_s,
        rotate_bytes=a.rotate_bytes,
        rotate_interval_s=a.rotate_interval_s,
        batch_ms=a.batch_ms,
        sinks=make_sinks(a.sinks, config.state_dir),  # syslog / webhook copies (gateway/audit/_sinks.py)
    )


class Gateway:
    def __init__(self, config: GatewayConfig, policy: CompiledPolicy | None = None) -> None:
        self.config = config
        os.makedirs(config.state_dir, exist_ok=True)
        self.confdir = ensure_ca(config)
        self.ca_cert_path = str(self.confdir / f"{CA_BASENAME}-ca-cert.pem")
        self.audit = _open_audit(config)
        self.metrics = GatewayMetrics()
        self.audit.subscribe(self.metrics.observe_audit_record)
        # The file policy plus run-time sandbox registrations (admin API, VM runtime), persisted in the state dir.
        self.policies = PolicyRegistry(config.policy_files, config.state_dir, self.metrics, self._publish, policy)
        # A change and its admin audit record happen under one lock, so the ledger has changes in the order they
        # took effect. An unregistration is recorded once its leases are revoked; until then its id cannot be
        # registered again (the records of one sandbox stay in order).
        self._changes = threading.Lock()
        self._leaving: set[str] = set()
        own = config.own_addresses()
        resolver = Resolver(config.resolver)
        self.broker = CredentialBroker(config.secrets, config.state_dir, _upstream_bundle(config), resolver)
        self.broker.store.on_error = self.metrics.count_secret_error
        self.state = GatewayState(
            policy=self.policies.policy,
            resolver=resolver,
            audit=self.audit,
            transparent=config.mode == "transparent",
            gateway_addresses=own,
            gateway_ports=config.own_ports(),
            broker=self.broker,
            metrics=self.metrics,
        )
        self.addon = EgressAddon(self.state)
        self.dns: DnsServer | None = None
        if config.dns is not None:
            self.dns = DnsServer(
                config.dns.listen.host,
                config.dns.listen.port,
                policy=lambda: self.state.policy,  # read at every query, so a reload applies at once
                resolver=resolver,
                audit=self.audit,
                gateway_addresses=own,
                gateway_ports=self.state.gateway_ports,
                static_ttl_s=config.resolver.min_ttl_s,
            )
        self.master: Master | None = None
        self.ready = asyncio.Event()
        # Checks the admin credentials now (a token file others can read refuses the start); listens in run().
        self.admin = AdminServer(self, config) if config.admin.enabled else None

    def _publish(self, policy: CompiledPolicy) -> None:
        self.state.policy = policy  # one assignment: the addon and DNS read it per connection/query

    # Changes of the policy in force. Each writes one `admin` audit record (docs/audit.md) saying who made it:
    # `via` one of F.ADMIN_VIAS, and for the admin API its `peer` ("unix" or the TCP client's "ip:port").

    def reload_policy(self, *, via: str = F.VIA_PYTHON, peer: str | None = None) -> ReloadResult:
        """Load the policy files again and swap them in whole, with the registered sandboxes re-applied; a broken
        file keeps the old policy. The result lists every error (SIGHUP ignores it; the admin API answers it)."""
        with self._changes:
            old = self.policies.policy.policy_hash
            result = self.policies.reload()
            action = "policy_reloaded" if result.ok else "policy_reload_failed"
            sandboxes = len(self.policies.policy.sandboxes)
            self.audit.admin(action, via, peer, **reload_fields(old, result, sandboxes))
        return result

    def add_sandbox(
        self, spec: SandboxDTO, where: str = "registration", *, via: str = F.VIA_PYTHON, peer: str | None = None
    ) -> bool:
        """Register (or replace) a run-time sandbox; True when new. Raises PolicyError (SandboxConflict for a clash
        with another sandbox) listing every problem; then nothing changed. Thread-safe."""
        with self._changes:
            if spec.id in self._leaving:
                issue = f"sandbox {spec.id!r} is being unregistered; register it again once that has finished"
                raise SandboxConflict([PolicyIssue(Position(where, 1, 1), issue)])
            created = self.policies.register(spec, where)
            self.register_sandbox(spec.id)  # it may lease dynamic secrets (again)
            action = "sandbox_registered" if created else "sandbox_replaced"
            fields = {F.POLICY_HASH: self.policies.policy.policy_hash, **registration_fields(spec)}
            self.audit.admin(action, via, peer, **fields)
        return created

    async def remove_sandbox(self, sandbox_id: str, *, via: str = F.VIA_PYTHON, peer: str | None = None) -> int:
        """Unregister a run-time sandbox and revoke its dynamic-secret leases (returns how many). Raises LookupError
        when no registration has this id (a policy file's sandbox is removed by editing the file)."""
        with self._changes:
            spec = self.policies.registered.get(sandbox_id)
            if spec is None or not self.policies.unregister(sandbox_id):
                raise LookupError(sandbox_id)
            self._leaving.add(sandbox_id)
        revoked: int | None = None  # stays None when the revocation fails: the record says so
        try:
            revoked = await self.unregister_sandbox(sandbox_id)
        finally:
            with self._changes:
                self._leaving.discard(sandbox_id)
                fields = {F.POLICY_HASH: self.policies.policy.policy_hash, F.LEASES_REVOKED: revoked}
                self.audit.admin("sandbox_unregistered", via, peer, **fields, **registration_fields(spec))
        return revoked

    def _options(self) -> options.Options:
        return options.Options()

    async def run(self) -> None:
        # The admin API listens first (before mitmproxy's Master exists, which installs process-wide log handlers
        # that only its own run() removes), and stops last.
        if self.admin is not None:
            try:
                await self.admin.start()
            except AdminStartError as e:
                self.audit.close()  # nothing was served: end the log with its clean-shutdown checkpoint
                raise GatewayStartError(str(e)) from e
        try:
            await self._serve()
        finally:
            if self.admin is not None:
                await self.admin.stop()

    async def _serve(self) -> None:
        opts = self._options()
        master = Master(opts, event_loop=asyncio.get_running_loop(), with_termlog=False)
        master.addons.add(
            core.Core(),
            disable_h2c.DisableH2C(),
            self.addon,
            proxyserver.Proxyserver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
        )
        opts.update(
            mode=["transparent" if self.state.transparent else "regular"],
            listen_host=self.config.listen.host,
            listen_port=self.config.listen.port,
            confdir=str(self.confdir),
            # Dial only after our checks (SNI, Host) have run; the eager default connects at CONNECT time.
            connection_strategy="lazy",
            # Upstream TLS is always verified; no policy or config key can turn this off.
            ssl_insecure=False,
            ssl_verify_upstream_trusted_ca=_upstream_bundle(self.config),
        )
        self.master = master
        self.broker.start()
        for problem in await self.broker.check_policy(self.state.policy):
            log.warning("%s (requests that need it will get 503 until it is available)", problem)
        loop = asyncio.get_running_loop()
        # Not possible outside the main thread (tests embed the gateway in a thread).
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, lambda: self.reload_policy(via=F.VIA_SIGHUP))
        run: asyncio.Future[None] | None = None
        drops: asyncio.Task[None] | None = None
        if self.config.enforcement.report_drops:
            drops = asyncio.create_task(report_drops(self.audit, metrics=self.metrics), name="kernel-drop-reports")
        try:
            if self.dns is not None:
                try:
                    await self.dns.start()
                except OSError as e:
                    raise GatewayStartError(f"cannot listen for DNS on {self.dns.host}:{self.dns.port}: {e}") from e
            run = asyncio.ensure_future(master.run())
            await self._wait_listening(run)
            self.ready.set()
            await run
        finally:
            # mitmproxy leaves its listening sockets open when run() returns; close them so the port is free.
            ps = master.addons.get("proxyserver")
            if ps is not None and run is not None:
                await ps.servers.update([])
            if self.dns is not None:
                await self.dns.stop()
            if drops is not None:
                drops.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await drops
            try:
                await self.broker.close()
            finally:
                # Last, after every flow: this writes the checkpoint that marks a clean shutdown.
                self.audit.close()
                log.info("audit log closed: %s", json.dumps(self.audit.stats(), sort_keys=True))

    async def _wait_listening(self, run: asyncio.Future[None]) -> None:
        """Return once the proxy listens; raise GatewayStartError if it cannot (mitmproxy itself would only log
        the failure and keep running without a listener)."""
        while True:
            ps = self.master.addons.get("proxyserver") if self.master else None
            servers = list(ps.servers) if ps is not None else []
            failed = [s for s in servers if s.last_exception is not None]
            if failed:
                self.master.shutdown()  # type: ignore[union-attr]
                with contextlib.suppress(Exception):
                    await run
                raise GatewayStartError(f"cannot listen: {failed[0].last_exception}")
            if servers and all(s.is_running for s in servers):
                return
            if run.done():
                run.result()
                raise GatewayStartError("the proxy stopped before it was listening")
            await asyncio.sleep(0.02)

    def listen_addresses(self) -> list[tuple[str, int]]:
        if self.master is None:
            return []
        ps = self.master.addons.get("proxyserver")
        if ps is None:
            return []
        out = []
        for server in ps.servers:
            out.extend(server.listen_addrs)
        return out

    async def unregister_sandbox(self, sandbox_id: str) -> int:
        """Revoke the sandbox's dynamic-secret leases (returns how many); it gets no new ones until registered.
        Its usage-limit session ends too: its byte budgets start again at its next registration."""
        self.state.meter.end_session(sandbox_id)
        return await self.broker.store.unregister(sandbox_id)

    def register_sandbox(self, sandbox_id: str) -> None:
        self.broker.store.register(sandbox_id)

    def shutdown(self) -> None:
        if self.master is not None:
            self.master.shutdown()  # run() closes the audit log once the last flow is done
        else:
            self.audit.close()
