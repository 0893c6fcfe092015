"""A real gateway in this process (on loopback, no namespaces needed) with its admin API on a Unix socket and on TCP
with a bearer token, a local echo upstream, and real clients (httpx) for both the admin API and the proxy."""

from __future__ import annotations

import asyncio
import base64
import http.client
import logging
import os
import shutil
import socket
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from gateway.config import load_config
from gateway.server import Gateway
from tests.support.upstream_server import EchoServer

T = TypeVar("T")
POLICY = Path(__file__).parent / "fixtures" / "policy.yaml"
SECRET_VALUE = "sekret-admin-test-value-4711"  # the injected credential: must never appear in an admin answer
ADMIN_TOKEN = "admin-token-0123456789abcdef"
SANDBOX_TOKEN = "sandbox-token-abcdef0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalGateway:
    gateway: Gateway
    loop: asyncio.AbstractEventLoop
    tmp: Path
    policy_path: Path
    proxy_port: int
    admin_port: int | None
    socket_path: Path
    upstream_port: int
    log_path: Path

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def unix(self) -> httpx.Client:
        """An admin client on the Unix socket (no token)."""
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://admin", timeout=10
        )

    def tcp(self, token: str | None = ADMIN_TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.Client(base_url=self.admin_url, headers=headers, timeout=10, trust_env=False)

    def upstream(self, path: str) -> str:
        return f"http://upstream.test:{self.upstream_port}{path}"

    def proxy(
        self, url: str, *, token: str | None = None, source: str = "127.0.0.1", method: str = "GET"
    ) -> httpx.Response:
        """One request through the gateway as a sandbox: identified by its source address or a proxy token.
        (http.client: httpx and httpcore do not bind a proxy connection to a local address.)"""
        headers = {"Host": httpx.URL(url).netloc.decode()}
        if token:
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(f"sb:{token}".encode()).decode()
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy_port, timeout=10, source_address=(source, 0))
        try:
            conn.request(method, url, headers=headers)  # absolute-form target: a plain proxy request
            r = conn.getresponse()
            return httpx.Response(r.status, headers=r.getheaders(), content=r.read())
        finally:
            conn.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_config(tmp: Path, *, admin: dict[str, Any] | None = None, policy: Path | None = None) -> tuple[Path, int]:
    """Config, policy copy (tests edit it), secret file and admin token file (0600) in `tmp`."""
    tmp.mkdir(parents=True, exist_ok=True)
    policy_path = tmp / "policy.yaml"
    if not policy_path.exists():
        shutil.copy(policy or POLICY, policy_path)
    secrets = tmp / "secrets.yaml"
    secrets.write_text(yaml.safe_dump({"local/key": SECRET_VALUE}))
    token_file = tmp / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    os.chmod(token_file, 0o600)
    port = free_port()
    config = {
        "version": 1,
        "mode": "explicit",
        "listen": {"host": "127.0.0.1", "port": port},
        "policies": [str(policy_path)],
        "state_dir": str(tmp / "state"),
        "resolver": {"hosts": {"upstream.test": ["127.0.0.1"]}},
        "secrets": {"backend": "file", "path": str(secrets)},
        "admin": admin
        if admin is not None
        else {
            "unix_socket": str(tmp / "state" / "admin.sock"),
            "tcp": {"host": "127.0.0.1", "port": free_port()},
            "token_file": str(token_file),
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


@contextmanager
def local_gateway(tmp: Path, *, admin: dict[str, Any] | None = None) -> Iterator[LocalGateway]:
    """One gateway at a time per process (mitmproxy keeps its options process-wide)."""
    cfg_path, port = write_config(tmp, admin=admin)
    config = load_config(str(cfg_path))
    log_path = tmp / "gateway.log"
    handler = logging.FileHandler(log_path)
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("cube_egress", "mitmproxy", "aiohttp")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    upstream = EchoServer(("127.0.0.1", 0), "local", None)
    threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    gw = Gateway(config)
    started = threading.Event()
    failure: list[BaseException] = []
    loop_box: list[asyncio.AbstractEventLoop] = []

    def target() -> None:
        async def main() -> None:
            loop_box.append(asyncio.get_running_loop())
            task = asyncio.create_task(gw.run())
            ready = asyncio.create_task(gw.ready.wait())
            await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                ready.cancel()
                task.result()
            started.set()
            await task

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced to the test
            failure.append(e)
            started.set()

    thread = threading.Thread(target=target, name="admin-test-gateway", daemon=True)
    thread.start()
    try:
        if not started.wait(30):
            raise RuntimeError("the gateway did not start within 30 s")
        if failure:
            raise failure[0]
        yield LocalGateway(
            gateway=gw,
            loop=loop_box[0],
            tmp=tmp,
            policy_path=tmp / "policy.yaml",
            proxy_port=port,
            admin_port=config.admin.tcp.port if config.admin.tcp else None,
            socket_path=Path(config.admin_socket or "/nonexistent"),
            upstream_port=upstream.server_address[1],
            log_path=log_path,
        )
    finally:
        if loop_box and thread.is_alive():
            loop_box[0].call_soon_threadsafe(gw.shutdown)
        thread.join(15)
        upstream.shutdown()
        upstream.server_close()
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    with local_gateway(tmp_path_factory.mktemp("admin")) as g:
        yield g
