"""MicroVM lifecycle against real QEMU (TCG) and the real guest image and agent.

One cold boot for the whole module (the ``booted`` fixture); everything else starts from its snapshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor import MicroVM, NetSpec, Snapshot, SnapshotError, VMError, VMState, VMStateError
from hypervisor._qemu import proc_start_time
from hypervisor.image import GuestImage
from hypervisor.vm import cleanup_stale, list_vms
from tests.hypervisor.conftest import RecordingHook, assert_gone, links, qemu_pids_under, wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]

COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /run/counter.tmp; mv /run/counter.tmp /run/counter; sleep 0.1; done"


BOOT_HOOK = RecordingHook()


@pytest.fixture(scope="module")
def booted(guest_image: GuestImage, vm_root: Path, module_netns: str) -> Iterator[MicroVM]:
    net = NetSpec(ip="10.65.0.2", gateway_ip="10.65.0.1", netns=module_netns)
    with MicroVM(guest_image, memory_mb=192, run_root=vm_root, net=net, hooks=[BOOT_HOOK]) as vm:
        vm.boot()
        yield vm


@pytest.fixture(scope="module")
def snapshot(booted: MicroVM, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """A snapshot of the booted guest with a counter process running in it and a marker file written."""
    agent = booted.agent
    agent.write_file("/run/marker", b"before the snapshot\x00\xff")
    agent.exec(["sh", "-c", f"setsid sh -c '{COUNTER}' </dev/null >/dev/null 2>&1 &"])
    wait_for(lambda: _counter(booted) >= 3, what="the counter to start")
    return booted.snapshot(tmp_path_factory.mktemp("snap") / "s")


def _counter(vm: MicroVM) -> int:
    try:
        return int(vm.agent.read_file("/run/counter"))
    except Exception:
        return 0


def test_boot_and_exec(booted: MicroVM, guest_image: GuestImage) -> None:
    assert booted.state is VMState.RUNNING
    r = booted.exec(["uname", "-r"])
    assert r.exit_code == 0 and r.stdout.decode().strip() == guest_image.kernel_version
    r = booted.exec(["sh", "-c", "cat; echo err >&2; exit 3"], stdin=b"in\x00put")
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"in\x00put", b"err\n")
    rec = {r.id: r for r in list_vms(booted.run_root)}[booted.id]
    assert rec.alive and rec.pid == booted.pid and rec.image_digest == guest_image.digest and not rec.persistent
    assert "cube-agent: serving" in booted.paths.console.read_text(errors="replace")  # the console log is written
    # The network came from the kernel command line; the hook saw the tap before the guest ran.
    assert [(x.sandbox_id, x.tap, x.ip) for x in BOOT_HOOK.up] == [  # type: ignore[attr-defined]
        (booted.sandbox_id, booted.tap, "10.65.0.2")
    ]
    out = booted.exec(["sh", "-c", "ip -o -4 addr show dev eth0; ip route; cat /sys/class/net/eth0/address"])
    assert "inet 10.65.0.2/24" in out.stdout.decode() and "default via 10.65.0.1" in out.stdout.decode()
    assert booted.mac is not None and booted.mac in out.stdout.decode()
    assert subprocess.run(["ip", "netns", "exec", booted.net.netns or "", "ping", "-c1", "-W5", "10.65.0.2"],
                          capture_output=True).returncode == 0


def test_snapshot_restore_keeps_guest_state(booted: MicroVM, snapshot: Snapshot, vm_root: Path) -> None:
    meta = json.loads(snapshot.meta_file.read_text())
    assert meta["image_digest"] == booted.image_digest and meta["memory_mb"] == 192 and meta["accel"] in ("tcg", "kvm")
    assert meta["machine_args"] and meta["shared_ram"] is None
    assert booted.state is VMState.RUNNING  # resumed after the snapshot
    at_snapshot = _counter(booted)
    with MicroVM.restore(snapshot, run_root=vm_root) as vm:
        assert vm.state is VMState.RUNNING and vm.pid != booted.pid
        assert vm.agent.read_file("/run/marker") == b"before the snapshot\x00\xff"
        first = _counter(vm)
        assert first >= 3
        wait_for(lambda: _counter(vm) > first + 3, what="the restored counter to advance")
        # The restored guest continues the snapshot's process; the original goes on independently.
        assert _counter(booted) >= at_snapshot
    assert_gone(vm)


def test_restore_with_network_then_destroy_leaves_nothing(snapshot: Snapshot, vm_root: Path, netns: str) -> None:
    hook = RecordingHook()
    net = NetSpec(ip="10.66.0.2", gateway_ip="10.66.0.1", prefix=24, netns=netns)
    vm = MicroVM.restore(snapshot, net=net, hooks=[hook], run_root=vm_root, sandbox_id="sb-restore")
    assert vm.tap in links(netns)
    assert [link.sandbox_id for link in hook.up] == ["sb-restore"]  # type: ignore[attr-defined]
    # The restored guest was given the new address, MAC and only route; the host reaches it through its tap.
    out = vm.exec(["sh", "-c", "ip -o -4 addr show dev eth0; ip route; cat /etc/resolv.conf "
                               "/sys/class/net/eth0/address"]).stdout.decode()
    assert "inet 10.66.0.2/24" in out and "default via 10.66.0.1" in out and "nameserver 10.66.0.1" in out
    assert vm.mac is not None and vm.mac in out
    assert subprocess.run(["ip", "netns", "exec", netns, "ping", "-c1", "-W5", "10.66.0.2"],
                          capture_output=True).returncode == 0
    pid = vm.pid
    vm.destroy()
    vm.destroy()  # idempotent
    assert_gone(vm)
    assert pid not in qemu_pids_under(vm_root)
    assert len(hook.down) == 1


def test_killed_qemu_is_detected_and_destroy_cleans_up(snapshot: Snapshot, vm_root: Path, netns: str) -> None:
    vm = MicroVM.restore(snapshot, net=NetSpec(ip="10.66.0.3", gateway_ip="10.66.0.1", netns=netns), run_root=vm_root)
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGKILL)
    wait_for(lambda: vm.state is VMState.FAILED, what="the VM to be marked failed")
    assert vm.failure is not None and "SIGKILL" in vm.failure
    with pytest.raises(VMStateError, match=r"failed.*destroy"):
        vm.exec(["true"])
    assert vm.tap in links(netns)  # still there until destroy
    vm.destroy()
    assert_gone(vm)


def test_guest_crash_is_detected(snapshot: Snapshot, vm_root: Path) -> None:
    vm = MicroVM.restore(snapshot, run_root=vm_root)
    assert vm.exec(["true"]).exit_code == 0  # the agent answers: the trigger below reaches the guest
    # A kernel panic: panic=-1 reboots at once, and QEMU runs with -no-reboot, so the process ends. The agent
    # dies with the guest before it can answer.
    with contextlib.suppress(Exception):
        vm.agent.exec(["sh", "-c", "echo c > /proc/sysrq-trigger"], timeout_s=5, timeout=5)
    try:
        wait_for(lambda: vm.state is VMState.FAILED, timeout=60, what="the crash to be noticed")
    except AssertionError as e:
        raise AssertionError(f"{e} (state {vm.state}); the guest's console:\n{vm.console_tail(40)}") from None
    assert vm.failure is not None and "guest" in vm.failure
    assert "sysrq" in vm.console_tail(200).lower()
    vm.destroy()
    assert_gone(vm)


def test_state_guards_and_bad_input(snapshot: Snapshot, vm_root: Path, tmp_path: Path) -> None:
    with MicroVM.restore(snapshot, run_root=vm_root) as vm:
        vm.pause()
        assert vm.state is VMState.PAUSED
        with pytest.raises(VMStateError, match="resume"):
            vm.exec(["true"])
        with pytest.raises(VMStateError):
            vm.pause()
        vm.resume()
        assert vm.exec(["true"]).exit_code == 0
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "x").write_text("x")
        with pytest.raises(SnapshotError, match="not empty"):
            vm.snapshot(tmp_path / "busy")
    with pytest.raises(VMStateError, match="destroyed"):
        vm.pause()
    with pytest.raises(SnapshotError, match=r"no snapshot\.json"):
        Snapshot.load(tmp_path)
    with pytest.raises(ValueError, match="gateway"):
        NetSpec(ip="10.1.0.2", gateway_ip="10.2.0.1")
    with pytest.raises(ValueError, match="multicast"):
        NetSpec(ip="10.1.0.2", gateway_ip="10.1.0.1", mac="01:00:5e:00:00:01")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_persistent_vm_is_attached_from_another_process(snapshot: Snapshot, vm_root: Path) -> None:
    vm = MicroVM.restore(snapshot, run_root=vm_root, persistent=True)
    vm.agent.write_file("/run/hello", b"from the first process")
    vm.release()
    out = _python(f"""
        from hypervisor import MicroVM
        vm = MicroVM.attach({vm.id!r}, run_root={str(vm_root)!r})
        print(vm.state.value, vm.agent.read_file("/run/hello").decode())
        vm.destroy()
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "running from the first process"
    # Gone (a zombie until reaped here: in this test, unlike with the CLI, the first process is its parent).
    assert vm.pid is not None and proc_start_time(vm.pid) is None and not vm.paths.run_dir.exists()
    assert vm._proc is not None and vm._proc.wait(timeout=10) is not None


def test_cleanup_stale_removes_what_a_dead_owner_left(snapshot: Snapshot, vm_root: Path, netns: str) -> None:
    # A process restores a VM (not persistent) and is killed before it can destroy it.
    out = _python(f"""
        import os, signal
        from hypervisor import MicroVM, NetSpec
        vm = MicroVM.restore({str(snapshot.directory)!r}, run_root={str(vm_root)!r},
                             net=NetSpec(ip="10.66.0.9", gateway_ip="10.66.0.1", netns={netns!r}))
        print(vm.id, vm.pid, vm.tap, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    vm_id, pid, tap = out.stdout.split()
    assert os.path.exists(f"/proc/{pid}") and tap in links(netns)  # left behind
    assert vm_id in cleanup_stale(vm_root)
    assert proc_start_time(int(pid)) is None  # killed (at most a zombie until init reaps it)
    assert tap not in links(netns)
    assert not (vm_root / vm_id).exists()


def test_attach_refuses_a_vm_that_is_gone(vm_root: Path) -> None:
    with pytest.raises(VMError, match="no VM"):
        MicroVM.attach("0123456789", run_root=vm_root)
