"""The `cube-egress vm ...` commands and `cube-egress demo`, run as a user would: one process per command.

Each `vm` command is its own process, so these tests also prove that a VM outlives the command that booted it and
that later commands re-open it from its run dir. One cold boot for the vm commands (the rest are a template and
its clones), one for the demo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.vm import cleanup_stale

from .conftest import IMAGE_CACHE, links, qemu_pids_under, registered_sandboxes, vm_unavailable_reason

pytestmark = [pytest.mark.qemu]


@pytest.fixture
def cli_env() -> Iterator[dict[str, str]]:
    reason = vm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    run_dir = Path(tempfile.mkdtemp(prefix="cxe-cli-", dir="/run"))
    env = {**os.environ, "CUBE_EGRESS_RUN_DIR": str(run_dir)}
    try:
        yield env
    finally:
        cleanup_stale(run_dir / "vms", force=True)
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)


def cube(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], env=env, capture_output=True, timeout=timeout, check=False
    )


def ls(env: dict[str, str]) -> list[dict[str, Any]]:
    r = cube(env, "vm", "ls", "--json")
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, Any]] = json.loads(r.stdout)
    return rows


def test_vm_commands_boot_exec_template_clone_rm(
    cli_env: dict[str, str], module_netns: str, tmp_path: Path, admin_gateway: Path
) -> None:
    env = cli_env
    boot = cube(
        env, "vm", "boot", "--state-dir", str(IMAGE_CACHE), "--template-ready",
        "--ip", "10.77.0.2", "--gateway-ip", "10.77.0.1", "--netns", module_netns, "--sandbox-id", "cli-base",
    )
    assert boot.returncode == 0, boot.stderr.decode()
    [base] = ls(env)
    assert base["alive"] and base["sandbox_id"] == "cli-base" and base["ip"] == "10.77.0.2"
    assert base["tap"] in links(module_netns)

    # exec passes the guest command's status and bytes through, in a process other than the one that booted it.
    r = cube(env, "vm", "exec", base["id"], "--", "sh", "-c", "printf 'a\\000b'; echo oops >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"a\x00b", b"oops\n")
    assert cube(env, "vm", "exec", base["id"]).returncode == 2  # no command: usage error
    missing = cube(env, "vm", "exec", "no-such-vm", "--", "true")
    assert missing.returncode == 1 and b"no VM 'no-such-vm'" in missing.stderr

    template = tmp_path / "template"
    r = cube(env, "vm", "snapshot", base["id"], str(template), "--template")
    assert r.returncode == 0, r.stderr.decode()
    assert ls(env) == []  # the template consumed the VM
    ram = next(line for line in r.stdout.decode().split() if line.startswith("/dev/shm"))
    ram_file = Path(ram.rstrip(");"))
    assert ram_file.exists()

    r = cube(
        env, "vm", "clone", str(template), "-n", "2",
        "--subnet", "10.77.0.0/24", "--gateway-ip", "10.77.0.1", "--netns", module_netns,
        "--register-socket", str(admin_gateway), "--policy", "agents",
    )
    assert r.returncode == 0, r.stderr.decode()
    clones = ls(env)
    registered = registered_sandboxes(admin_gateway)  # each clone's sandbox, by its own id and address
    expected = {c["sandbox_id"]: [f"{c['ip']}/32"] for c in clones}
    assert {sb: reg["sources"] for sb, reg in registered.items()} == expected
    assert len(clones) == 2 and all(c["alive"] and c["kind"] == "clone" for c in clones)
    assert len({c["ip"] for c in clones}) == 2 and len({c["sandbox_id"] for c in clones}) == 2
    randoms = set()
    for c in clones:
        out = cube(env, "vm", "exec", c["id"], "--", "head", "-c", "16", "/dev/urandom")
        assert out.returncode == 0 and len(out.stdout) == 16
        randoms.add(out.stdout)
        addr = cube(env, "vm", "exec", c["id"], "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0")
        assert f"{c['ip']}/24" in addr.stdout.decode()
    assert len(randoms) == 2  # each clone's RNG was reseeded

    r = cube(env, "vm", "rm", "--all", "--template", str(template))
    assert r.returncode == 0, r.stderr.decode()
    assert ls(env) == []
    assert registered_sandboxes(admin_gateway) == {}  # `vm rm` unregistered them (another process than clone)
    assert qemu_pids_under(Path(env["CUBE_EGRESS_RUN_DIR"])) == []
    assert not any(c["tap"] in links(module_netns) for c in clones)
    assert not ram_file.exists() and not template.exists()


def test_demo_runs_as_the_readme_says(cli_env: dict[str, str], tmp_path: Path) -> None:
    import ebpf

    reason = ebpf.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the demo needs the kernel guard: {reason}")
    r = cube(cli_env, "demo", "--state-dir", str(IMAGE_CACHE), "--work-dir", str(tmp_path / "demo"), timeout=420)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "demo passed: 6/6 steps as expected" in out
    assert "secret in the audit log or the gateway's logs: no" in out
    assert "\nOK: " in out  # cube-egress audit verify on the demo's audit log
    audit = (tmp_path / "demo" / "state" / "audit.jsonl").read_text()
    records = [json.loads(line) for line in audit.splitlines()]
    kinds = {(r.get("event"), r.get("kind"), r.get("reason")) for r in records if r.get("sandbox") == "demo-agent"}
    assert ("security", "packet_dropped", "quic") in kinds
    assert ("security", "packet_dropped", "tcp_port") in kinds
    assert any(r.get("credential") == "demo-api" and r.get("verdict") == "allow" for r in records)
    # The demo's namespaces and its VM are gone.
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cxd" not in netns
    assert qemu_pids_under(Path(cli_env["CUBE_EGRESS_RUN_DIR"])) == []
