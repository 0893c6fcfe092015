"""Running real gateways inside the hermetic world, and real clients (curl, requests, httpx) inside the sandbox."""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gateway.config import load_config
from gateway.server import Gateway
from tests.support.world import GATEWAY_INTERNET_IP, GATEWAY_SANDBOX_IP, World

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
E2E_POLICY = Path(__file__).parent / "fixtures" / "e2e.yaml"
PROXY_TOKEN = "s3cret-proxy-token"
EXPLICIT_PORT = 3128
TRANSPARENT_PORT = 8081


def write_config(
    directory: Path,
    mode: str,
    port: int,
    *,
    upstream_ca: Path | None,
    policies: list[Path],
    secrets: dict[str, Any] | None = None,
    dns: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "version": 1,
        "mode": mode,
        "listen": {"host": GATEWAY_SANDBOX_IP if mode == "explicit" else "0.0.0.0", "port": port},
        "policies": [str(p) for p in policies],
        "state_dir": str(directory / "state"),
        "resolver": {"nameservers": ["198.51.100.53"], "timeout_s": 2},
        "gateway_addresses": [GATEWAY_SANDBOX_IP, GATEWAY_INTERNET_IP],
    }
    if upstream_ca is not None:
        config["upstream_ca"] = str(upstream_ca)
    if secrets is not None:
        config["secrets"] = secrets
    if dns is not None:
        config["dns"] = dns  # e.g. {"listen": {"host": GATEWAY_SANDBOX_IP, "port": 53}}
    config.update(extra or {})
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class RunningGateway:
    mode: str
    port: int
    state_dir: Path
    ca_cert: Path
    trust_bundle: Path  # gateway CA + upstream CA: what a sandbox client trusts
    proc: subprocess.Popen[Any] | None = None
    log_path: Path | None = None
    _audit_offset: int = field(default=0)

    @property
    def proxy_url(self) -> str | None:
        return f"http://{GATEWAY_SANDBOX_IP}:{self.port}" if self.mode == "explicit" else None

    @property
    def audit_path(self) -> Path:
        return self.state_dir / "audit.jsonl"

    def mark(self) -> None:
        """Remember where the audit log ends, so a test reads only its own records."""
        self._audit_offset = self.audit_path.stat().st_size if self.audit_path.exists() else 0

    def records(self, **match: Any) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        with open(self.audit_path, "rb") as f:
            f.seek(self._audit_offset)
            lines = f.read().splitlines()
        out = [json.loads(line) for line in lines if line.strip()]
        return [r for r in out if all(r.get(k) == v for k, v in match.items())]

    def settled(self, count: int, **match: Any) -> list[dict[str, Any]]:
        """The matching records once there are `count` of them. A flow's record is written when the gateway has
        finished the response, which can be just after the client has read it; this waits for it (no timing
        assert: the deadline only bounds the wait)."""
        deadline = time.monotonic() + 10
        found = self.records(**match)
        while len(found) < count and time.monotonic() < deadline:
            time.sleep(0.02)
            found = self.records(**match)
        return found

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def _bundle(state_dir: Path, upstream_ca: Path) -> tuple[Path, Path]:
    ca_cert = state_dir / "ca" / "mitmproxy-ca-cert.pem"
    bundle = state_dir.parent / "trust-bundle.pem"
    bundle.write_bytes(ca_cert.read_bytes() + b"\n" + upstream_ca.read_bytes())
    return ca_cert, bundle


@contextmanager
def gateway_process(
    world: World,
    tmp: Path,
    mode: str,
    *,
    upstream_ca: bool = True,
    port: int | None = None,
    policies: list[Path] | None = None,
    secrets: dict[str, Any] | None = None,
    dns: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    redirect: bool = True,
) -> Iterator[RunningGateway]:
    """`cube-egress run --config` as a real process in the gateway namespace (what an operator runs)."""
    port = port or (EXPLICIT_PORT if mode == "explicit" else TRANSPARENT_PORT)
    cfg = write_config(
        tmp,
        mode,
        port,
        upstream_ca=world.upstream_ca_pem if upstream_ca else None,
        policies=policies or [E2E_POLICY],
        secrets=secrets,
        dns=dns,
        extra=extra,
    )
    log_path = tmp / "gateway.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed below)
    exe = str(Path(sys.executable).with_name("cube-egress"))
    proc = world.popen("gateway", [exe, "run", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        world.wait_listening("gateway", port, host=GATEWAY_SANDBOX_IP, timeout=30)
        if mode == "transparent" and redirect:
            world.add_redirect(port)
        state_dir = tmp / "state"
        ca_cert, bundle = _bundle(state_dir, world.upstream_ca_pem)
        yield RunningGateway(mode, port, state_dir, ca_cert, bundle, proc=proc, log_path=log_path)
    finally:
        if mode == "transparent" and redirect:
            world.remove_redirect()
        world.stop(proc)
        log.close()


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


@contextmanager
def gateway_in_thread(
    world: World,
    tmp: Path,
    mode: str,
    port: int,
    *,
    policies: list[Path] | None = None,
    secrets: dict[str, Any] | None = None,
    log_file: Path | None = None,
) -> Iterator[tuple[RunningGateway, InThreadGateway]]:
    """The gateway in this test process, on a thread moved into the gateway namespace (setns is per thread), so a
    test can reach into it, e.g. to make a hook raise. Sockets it opens belong to the gateway namespace.

    Only one at a time: mitmproxy keeps its options in a process-wide `ctx`, so two masters in one process would
    read each other's settings (the CA among them). Use `gateway_process` for a second gateway."""
    cfg = write_config(
        tmp, mode, port, upstream_ca=world.upstream_ca_pem, policies=policies or [E2E_POLICY], secrets=secrets
    )
    handler: logging.Handler | None = None
    if log_file is not None:
        # Everything the gateway logs, kept for the leak test.
        handler = logging.FileHandler(log_file)
        handler.setLevel(logging.DEBUG)
        for name in ("cube_egress", "mitmproxy"):
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).setLevel(logging.DEBUG)
    gw = Gateway(load_config(str(cfg)))
    started = threading.Event()
    failure: list[BaseException] = []
    loop_box: list[asyncio.AbstractEventLoop] = []

    def target() -> None:
        fd = os.open(f"/var/run/netns/{world.ns_name('gateway')}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
        finally:
            os.close(fd)

        async def main() -> None:
            loop_box.append(asyncio.get_running_loop())
            task = asyncio.create_task(gw.run())
            await gw.ready.wait()
            started.set()
            await task

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced to the test below
            failure.append(e)
            started.set()

    thread = threading.Thread(target=target, name=f"gateway-{mode}", daemon=True)
    thread.start()
    started.wait(30)
    if failure:
        raise failure[0]
    if mode == "transparent":
        world.add_redirect(port)
    try:
        ca_cert, bundle = _bundle(tmp / "state", world.upstream_ca_pem)
        yield (
            RunningGateway(mode, port, tmp / "state", ca_cert, bundle, log_path=log_file),
            InThreadGateway(gw, loop_box[0]),
        )
    finally:
        if mode == "transparent":
            world.remove_redirect()
        loop_box[0].call_soon_threadsafe(gw.shutdown)
        thread.join(15)
        if handler is not None:
            for name in ("cube_egress", "mitmproxy"):
                logging.getLogger(name).removeHandler(handler)
            handler.close()


@dataclass
class InThreadGateway:
    gateway: Gateway
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the gateway's own event loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


def hosts_for_sandbox(world: World, entries: dict[str, str]) -> None:
    """What the sandbox's resolver would answer (policy-aware sandbox DNS is not part of the gateway yet)."""
    path = Path("/etc/netns") / world.ns_name("sandbox") / "hosts"
    lines = ["127.0.0.1\tlocalhost"] + [f"{ip}\t{name}" for name, ip in entries.items()]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Result:
    status: int | None  # None: the request failed before an HTTP response (refused CONNECT, TLS error, ...)
    body: str
    error: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


CLIENTS = ("curl", "requests", "httpx")

_PY_CLIENT = r"""
import json, sys
client, method, url, proxy, ca, headers, data = json.loads(sys.argv[1])
out = {"status": None, "body": "", "error": ""}
try:
    if client == "requests":
        import requests
        proxies = {"http": proxy, "https": proxy} if proxy else {"http": None, "https": None}
        s = requests.Session(); s.trust_env = False
        r = s.request(method, url, headers=headers, data=data, proxies=proxies, verify=ca, timeout=10,
                      allow_redirects=False)
        out.update(status=r.status_code, body=r.text)
    else:
        import httpx
        with httpx.Client(proxy=proxy, verify=ca, trust_env=False, timeout=10) as c:
            r = c.request(method, url, headers=headers, content=data)
            out.update(status=r.status_code, body=r.text)
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def request(
    world: World,
    client: str,
    method: str,
    url: str,
    *,
    gateway: RunningGateway,
    ca: Path | None = None,
    headers: dict[str, str] | None = None,
    data: str | None = None,
    proxy_user: str | None = None,
    extra_curl: list[str] | None = None,
) -> Result:
    """One request from inside the sandbox with a real client, through the gateway in its mode."""
    ca = ca or gateway.trust_bundle
    proxy = gateway.proxy_url
    if proxy and proxy_user:
        proxy = proxy.replace("http://", f"http://{proxy_user}@")
    headers = headers or {}
    if client == "curl":
        args = ["-X", method, "--cacert", str(ca), "-o", "-", "-w", "\n%{http_code}"]
        for k, v in headers.items():
            args += ["-H", f"{k}: {v}"]
        if data is not None:
            args += ["--data-binary", data]
        args += extra_curl or []
        args.append(url)
        proc = world.curl(args, proxy=proxy, timeout=10)
        body, _, code = proc.stdout.rpartition("\n")
        status = int(code) if code.strip().isdigit() and int(code) != 0 else None
        return Result(status, body, proc.stderr.strip())
    payload = json.dumps([client, method, url, proxy, str(ca), headers, data])
    proc = world.run("sandbox", [sys.executable, "-c", _PY_CLIENT, payload], timeout=30)
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return Result(None, "", proc.stderr)
    return Result(out["status"], out["body"], out["error"])


def have_curl() -> bool:
    return shutil.which("curl") is not None
