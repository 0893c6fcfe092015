"""A throw-away PostgreSQL server inside the hermetic world (for OpenBao's dynamic database credentials).

Debian's PostgreSQL binaries (``apt-get install postgresql``; ``/usr/lib/postgresql/<ver>/bin``) are run by hand:
``initdb`` into a private temp dir, then ``postgres`` as the ``postgres`` user in the internet namespace, listening
on one documentation address. Nothing of the system cluster (``pg_ctlcluster``, ``/var/run/postgresql``) is used or
touched: the unix socket lives in the data dir, so a system PostgreSQL on port 5432 does not conflict.

Auth: TCP connections need a password (``scram-sha-256``), so :meth:`Postgres.can_login` really proves that a
user/password pair is valid; the unix socket is ``trust`` for the fixture's own superuser setup.

Usage::

    with Postgres(world) as pg:          # 198.51.100.40:5432, superuser vaultadmin, database app
        pg.can_login("vaultadmin", pg.admin_password)   # True
        pg.sql("SELECT 1")

The temp dir is named ``<world prefix>-pg-*`` so ``cleanup_stale`` removes it after a crash.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .netns import ensure_internet_ip, remove_internet_ip

if TYPE_CHECKING:
    from .world import Role, World

__all__ = ["DEFAULT_PG_IP", "Postgres", "PostgresError", "pg_bindir"]

DEFAULT_PG_IP = "198.51.100.40"


class PostgresError(RuntimeError):
    """Setting up or talking to the test PostgreSQL failed; the message carries the server log tail."""


def pg_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` that has a server (``postgres`` + ``initdb``), or None."""
    found = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        p = Path(d)
        if (p / "postgres").is_file() and (p / "initdb").is_file():
            with contextlib.suppress(ValueError):
                found.append((int(p.parent.name.split(".")[0]), p))
    return max(found)[1] if found else None


def unavailable_reason() -> str | None:
    """Why :class:`Postgres` cannot run here (for ``pytest.skip``), or None."""
    if pg_bindir() is None:
        return "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no `postgres` system user (installed by the Debian postgresql package)"
    if shutil.which("setpriv") is None:
        return "`setpriv` (util-linux) not found"
    return None


class Postgres:
    """PostgreSQL in a world namespace; see the module docstring.

    Attributes after start: ``ip``, ``port``, ``database`` (``app``), ``admin_user`` (``vaultadmin``, a superuser
    with CREATEROLE, as OpenBao's database engine needs), ``admin_password``, ``datadir``, ``log_path``.
    """

    def __init__(
        self,
        world: World,
        role: Role = "internet",
        ip: str = DEFAULT_PG_IP,
        *,
        port: int = 5432,
        database: str = "app",
        admin_user: str = "vaultadmin",
        admin_password: str | None = None,
    ) -> None:
        self.world = world
        self.role: Role = role
        self.ip = ip
        self.port = port
        self.database = database
        self.admin_user = admin_user
        self.admin_password = admin_password or f"pg-admin-{secrets.token_hex(8)}"
        self.bindir = pg_bindir() or Path("/nonexistent")
        self.rootdir = Path()
        self.datadir = Path()
        self.log_path = Path()
        self.timings: dict[str, float] = {}
        self._proc: subprocess.Popen[Any] | None = None
        self._added_ip = False

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def __enter__(self) -> Postgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """initdb, start the server, wait until it accepts TCP logins, create the admin user and database."""
        reason = unavailable_reason()
        if reason:
            raise PostgresError(reason)
        t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        self.timings["start"] = time.monotonic() - t0

    def _start(self) -> None:
        if self.role == "internet":
            self._added_ip = ensure_internet_ip(self.world, self.ip)
        pg = pwd.getpwnam("postgres")
        # Outside world.workdir on purpose: that dir is 0700 root, and the server runs as `postgres`.
        self.rootdir = Path(tempfile.mkdtemp(prefix=f"{self.world.prefix}-pg-"))
        os.chmod(self.rootdir, 0o700)
        self.datadir = self.rootdir / "data"
        self.log_path = self.rootdir / "server.log"
        pwfile = self.rootdir / "pw"
        pwfile.write_text(secrets.token_hex(16) + "\n")  # the `postgres` superuser's password; never used over TCP
        self.log_path.touch()
        for p in (self.rootdir, pwfile, self.log_path):
            os.chown(p, pg.pw_uid, pg.pw_gid)

        self._as_postgres(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--pwfile",
                str(pwfile),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",  # a test database: durability is irrelevant, start-up time is not
            ]
        )
        pwfile.unlink()
        # Only what the tests need: trust on the private unix socket (fixture setup), passwords on TCP from anywhere
        # in the world (OpenBao in the gateway namespace, psql from db-check).
        (self.datadir / "pg_hba.conf").write_text("local all all trust\nhost all all 0.0.0.0/0 scram-sha-256\n")
        argv = [
            *self._setpriv(),
            str(self.bindir / "postgres"),
            "-D",
            str(self.datadir),
            "-c",
            f"listen_addresses={self.ip}",
            "-c",
            f"port={self.port}",
            "-c",
            f"unix_socket_directories={self.rootdir}",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=50",
            "-c",
            "shared_buffers=16MB",
            "-c",
            "password_encryption=scram-sha-256",
            "-c",
            "log_connections=on",
        ]
        with open(self.log_path, "ab") as log:
            self._proc = self.world.popen(self.role, argv, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()
        # Via the unix socket (trust): the role OpenBao uses to create and drop its dynamic users.
        pw = self.admin_password.replace("'", "''")
        self.sql(f"CREATE ROLE \"{self.admin_user}\" WITH LOGIN SUPERUSER CREATEROLE PASSWORD '{pw}'")
        self.sql(f'CREATE DATABASE "{self.database}" OWNER "{self.admin_user}"')

    def _setpriv(self) -> list[str]:
        # setpriv execs (no fork, unlike runuser/su), so the pid world.popen returns is the postmaster itself and
        # signals reach it directly. PostgreSQL refuses to run as root.
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]

    def _as_postgres(self, argv: list[str], timeout: float = 60) -> str:
        proc = subprocess.run(
            [*self._setpriv(), *argv], capture_output=True, text=True, timeout=timeout, check=False, cwd=self.rootdir
        )
        if proc.returncode != 0:
            raise PostgresError(f"{argv[0]} failed (rc={proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def _wait_ready(self, timeout: float = 30) -> None:
        """pg_isready over TCP inside the namespace, retried in one shell (one process start, not one per try)."""
        isready = self.bindir / "pg_isready"
        script = (
            f"for i in $(seq 1 {int(timeout * 20)}); do "
            f"{isready} -q -h {self.ip} -p {self.port} -d postgres -t 1 && exit 0; sleep 0.05; done; exit 1"
        )
        res = self.world.run(self.role, ["sh", "-c", script], timeout=timeout + 10)
        if res.returncode != 0 or not self.running:
            raise PostgresError(f"PostgreSQL did not become ready on {self.ip}:{self.port}\n{self.log_tail()}")

    def stop(self, timeout: float = 10) -> None:
        """Fast shutdown (SIGINT: disconnect clients, then exit cleanly); SIGKILL the group if that hangs.

        Not SIGTERM: that is PostgreSQL's *smart* shutdown, which waits for every client (e.g. OpenBao's pooled
        connections) to go away first.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.world.stop(proc, grace=1)
        self._proc = None

    def close(self) -> None:
        """Stop the server, remove its files and the address it added. Idempotent."""
        with contextlib.suppress(Exception):
            self.stop()
        if self._added_ip:
            remove_internet_ip(self.world, self.ip)
            self._added_ip = False
        if self.rootdir != Path() and self.rootdir.is_dir():
            shutil.rmtree(self.rootdir, ignore_errors=True)

    # -- talking to it ------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Admin connection URL (what OpenBao's ``connection_url`` is built from, with the password inline)."""
        return f"postgresql://{self.admin_user}:{self.admin_password}@{self.ip}:{self.port}/{self.database}"

    def sql(self, query: str, database: str | None = None) -> str:
        """Run SQL as the ``postgres`` superuser over the private unix socket; return psql's unaligned output."""
        argv = [
            str(self.bindir / "psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.rootdir),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database or "postgres",
            "-c",
            query,
        ]
        return self._as_postgres(argv).strip()

    def can_login(self, user: str, password: str, *, database: str | None = None, timeout: int = 3) -> bool:
        """True iff ``user``/``password`` can open a TCP session (password auth) on the server, checked from the
        server's own namespace with a short connect timeout."""
        return self.login_check(user, password, database=database, timeout=timeout).returncode == 0

    def login_check(
        self, user: str, password: str, *, database: str | None = None, timeout: int = 3
    ) -> subprocess.CompletedProcess[str]:
        """Like :meth:`can_login` but returns psql's result (its stderr says *why* a login failed)."""
        env = {"PGPASSWORD": password, "PGCONNECT_TIMEOUT": str(timeout), "PGSSLMODE": "disable"}
        argv = [
            str(self.bindir / "psql"),
            "-X",
            "-w",  # never prompt: a missing/wrong password must fail, not hang
            "-A",
            "-t",
            "-h",
            self.ip,
            "-p",
            str(self.port),
            "-U",
            user,
            "-d",
            database or self.database,
            "-c",
            "SELECT current_user",
        ]
        return self.world.run(self.role, argv, env=env, timeout=timeout + 10)

    def roles(self) -> list[str]:
        """Login roles that currently exist (e.g. to see OpenBao's dynamic users come and go)."""
        out = self.sql("SELECT rolname FROM pg_roles WHERE rolcanlogin ORDER BY 1")
        return [line for line in out.splitlines() if line]

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
