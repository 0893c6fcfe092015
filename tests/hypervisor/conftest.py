"""Shared fixtures for the VM tests: the guest image (built once, cached across runs), a run root of their own,
a throwaway network namespace, and a leak check that looks at /proc, `ip link` and the file system.

The image cache (``$CUBE_EGRESS_TEST_IMAGES``, default /var/tmp/cube-egress-test-images) survives runs: the image
is content addressed, so a cached one is exactly what ``build_image`` would build now.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hypervisor.image import GuestImage, build_image
from hypervisor.vm import MicroVM, VMState, cleanup_stale, list_vms

IMAGE_CACHE = Path(os.environ.get("CUBE_EGRESS_TEST_IMAGES", "/var/tmp/cube-egress-test-images"))


def vm_unavailable_reason() -> str | None:
    """Why VM tests cannot run here (a missing capability), or None."""
    if os.geteuid() != 0:
        return "needs root (taps, network namespaces, /run)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (scripts/setup.sh installs qemu-system-x86)"
    kernels = [k for k in glob.glob("/boot/vmlinuz-*") if os.access(k, os.R_OK)]
    if not kernels:
        return "no readable guest kernel /boot/vmlinuz-* (install linux-image-cloud-amd64)"
    return None


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    reason = vm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return build_image(IMAGE_CACHE)


@pytest.fixture(scope="session")
def vm_root() -> Iterator[Path]:
    """A run root of the tests' own (short: socket paths must stay under 108 bytes); emptied at the end."""
    if os.geteuid() != 0:
        pytest.skip("needs root (taps, network namespaces, /run)")
    root = Path(tempfile.mkdtemp(prefix="cxe-test-vms-", dir="/run"))
    yield root
    cleanup_stale(root, force=True)
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    name = f"cxevm-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace, deleted afterwards (with anything still inside)."""
    with _netns() as name:
        yield name


@pytest.fixture(scope="module")
def module_netns() -> Iterator[str]:
    with _netns() as name:
        yield name


def links(netns: str | None) -> set[str]:
    """Interface names in ``netns`` (the caller's namespace when None), from `ip link`."""
    argv = ["ip", "-o", "link", "show"] if netns is None else ["ip", "-n", netns, "-o", "link", "show"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def qemu_pids_under(root: Path) -> list[int]:
    """QEMU processes whose command line names a path under ``root`` (i.e. VMs of that run root)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and any(str(root).encode() in a for a in argv):
            found.append(int(d))
    return found


def assert_gone(vm: MicroVM) -> None:
    """Nothing of ``vm`` is left: process, tap, sockets, run dir, RAM file, record."""
    assert vm.state is VMState.STOPPED, vm
    assert vm.pid is not None
    assert not os.path.exists(f"/proc/{vm.pid}"), f"QEMU pid {vm.pid} is still there"
    if vm.net is not None:
        assert vm.net.tap not in links(vm.net.netns), f"tap {vm.net.tap} is still there"
    for p in (vm.paths.qmp, vm.paths.agent, vm.paths.record, vm.paths.console, vm.paths.run_dir):
        assert not p.exists(), f"{p} is still there"
    if vm.ram_file is not None:
        assert not vm.ram_file.exists()
    assert vm.id not in {r.id for r in list_vms(vm.run_root)}


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll until ``predicate()`` (a deadline for a state to be reached, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class RecordingHook:
    """A sandbox hook that records its calls and can refuse some sandboxes (as a gateway registration would)."""

    def __init__(self, refuse: set[str] | None = None) -> None:
        self.up: list[object] = []
        self.down: list[object] = []
        self.refuse = refuse or set()

    def sandbox_up(self, link: object) -> None:
        sandbox_id = getattr(link, "sandbox_id", "")
        if sandbox_id in self.refuse or "*" in self.refuse:
            raise RuntimeError(f"registration refused for {sandbox_id}")
        self.up.append(link)

    def sandbox_down(self, link: object) -> None:
        self.down.append(link)


@pytest.fixture
def recording_hook() -> type[RecordingHook]:
    return RecordingHook


@pytest.fixture
def admin_gateway(tmp_path: Path) -> Iterator[Path]:
    """A real gateway process (explicit proxy on loopback) whose admin API listens on a Unix socket."""
    (tmp_path / "policy.yaml").write_text(
        "version: 1\npolicies:\n  agents:\n    rules:\n"
        "      - {id: pkg, action: allow, hosts: [pkg.example.test]}\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = tmp_path / "state" / "admin.sock"
    (tmp_path / "gateway.yaml").write_text(
        f"version: 1\nlisten: {{host: 127.0.0.1, port: {port}}}\npolicies: [policy.yaml]\nstate_dir: state\n"
        f"admin: {{unix_socket: {sock}}}\n"
    )
    log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(tmp_path / "gateway.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            assert time.monotonic() < deadline, "the gateway's admin socket did not appear"
            time.sleep(0.1)
        yield sock
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
        assert os.path.exists(tmp_path / "gateway.log")


def registered_sandboxes(sock: Path) -> dict[str, dict[str, object]]:
    import httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://admin") as c:
        r = c.get("/v1/sandboxes")
        assert r.status_code == 200, r.text
        body = r.json()
    items = body["sandboxes"] if isinstance(body, dict) else body
    return {sb["id"]: sb for sb in items if sb.get("origin") == "api"}
