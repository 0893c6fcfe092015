"""Templates, clones and the warm pool against real QEMU (TCG), the real image and the real agent.

One cold boot for the module (the template); every VM here is a clone of it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor import (
    CloneError,
    EbpfGuard,
    MicroVM,
    SnapshotError,
    Subnet,
    Template,
    VMError,
    VMState,
    WarmPool,
)
from hypervisor._qemu import proc_start_time
from hypervisor.image import GuestImage
from hypervisor.vm import private_dir, shm_root
from tests.hypervisor.conftest import RecordingHook, assert_gone, links, qemu_pids_under, registered_sandboxes

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]

STALE_CLOCK_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09: the template's clock, far from now


@pytest.fixture(scope="module")
def template(guest_image: GuestImage, vm_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    def prepare(vm: MicroVM) -> None:
        vm.agent.set_time(STALE_CLOCK_NS)  # a clone that shows "now" had its clock set

    tpl = Template.create(guest_image, tmp_path_factory.mktemp("tpl") / "t", memory_mb=192, prepare=prepare,
                          run_root=vm_root)
    with tpl:
        yield tpl
    assert not tpl.ram_file.exists() and not tpl.directory.exists()


def test_template_holds_no_ram_in_its_stream(template: Template) -> None:
    # x-ignore-shared: the guest RAM stays in the shared file; the stream is device state only.
    assert template.ram_file.stat().st_size == 192 << 20
    assert template.snapshot.state_file.stat().st_size < 4 << 20
    with pytest.raises(SnapshotError, match="not a template"):
        Template(template.snapshot.__class__(**{**template.snapshot.__dict__, "shared_ram": None}))


def test_clone_four_with_distinct_identities(template: Template, vm_root: Path, netns: str) -> None:
    hook = RecordingHook()
    subnet = Subnet("10.67.0.0/24", "10.67.0.1", netns=netns)
    with template.clone(4, net=subnet, hooks=[hook], run_root=vm_root) as clones:
        assert len(clones) == 4 and not clones.failures
        assert len({vm.mac for vm in clones}) == 4
        assert len({vm.ip for vm in clones}) == 4
        assert len({vm.sandbox_id for vm in clones}) == 4
        assert len({vm.tap for vm in clones}) == 4 and {vm.tap for vm in clones} <= links(netns)
        assert sorted(x.sandbox_id for x in hook.up) == sorted(vm.sandbox_id for vm in clones)  # type: ignore[attr-defined]
        randoms, boot_ids = set(), set()
        for vm in clones:
            assert vm.state is VMState.RUNNING and vm.kind == "clone"
            r = vm.exec(["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1; ip -o -4 addr show dev eth0; "
                                     "cat /sys/class/net/eth0/address; ip route; date +%s"])
            out = r.stdout.decode()
            randoms.add(out.splitlines()[0] + out.splitlines()[1])
            assert f"inet {vm.ip}/24" in out and vm.mac in out and "default via 10.67.0.1" in out  # type: ignore[operator]
            guest_now = int(out.split()[-1])
            assert abs(guest_now - time.time()) < 120, "the clone's clock was not set"
            boot_ids.add(vm.agent.hello().boot_id)
            ping = ["ip", "netns", "exec", netns, "ping", "-c1", "-W5", vm.ip or ""]
            assert subprocess.run(ping, capture_output=True).returncode == 0, f"no answer from {vm.ip} on {vm.tap}"
        assert len(randoms) == 4, "clones produced the same random bytes: the RNG was not reseeded"
        assert len(boot_ids) == 1  # one guest kernel boot, four copies of it
    for vm in clones:
        assert_gone(vm)
    assert len(hook.down) == 4
    assert not links(netns) - {"lo"}


def test_partial_clone_failure_returns_the_others_and_cleans_up(
    template: Template, vm_root: Path, netns: str
) -> None:
    before = set(qemu_pids_under(vm_root))
    hook = RecordingHook(refuse={"sb-refused"})  # e.g. the gateway refusing a registration
    subnet = Subnet("10.68.0.0/29", "10.68.0.1", netns=netns)
    clones = template.clone(3, net=subnet, hooks=[hook], sandbox_ids=["sb-a", "sb-refused", "sb-c"],
                            run_root=vm_root)
    try:
        assert sorted(vm.sandbox_id for vm in clones) == ["sb-a", "sb-c"]
        assert len(clones.failures) == 1 and "registration refused for sb-refused" in str(clones.failures[0])
        # Only the two live clones have a process, a tap and a run dir; the failed one's address is free again.
        assert set(qemu_pids_under(vm_root)) - before == {vm.pid for vm in clones}
        assert links(netns) - {"lo"} == {vm.tap for vm in clones}
        assert {d.name for d in vm_root.iterdir()} >= {vm.id for vm in clones}
        assert len([d for d in vm_root.iterdir() if d.name not in {v.id for v in clones}]) == 0
        # The refused clone's address went back: of the /29's six hosts, the gateway and two clones hold three.
        assert len([subnet.lease() for _ in range(3)]) == 3
        with pytest.raises(VMError, match="no free guest address"):
            subnet.lease()
    finally:
        clones.destroy()
    # Every clone failing is an error that names each failure; nothing is left.
    with pytest.raises(CloneError, match="all 2 clones") as e:
        template.clone(2, net=subnet, hooks=[RecordingHook(refuse={"*"})], run_root=vm_root)
    assert len(e.value.failures) == 2
    assert set(qemu_pids_under(vm_root)) == before
    assert links(netns) == {"lo"}


def test_warm_pool_hands_out_clones_and_refills(template: Template, vm_root: Path) -> None:
    with WarmPool(template, 2, run_root=vm_root) as pool:
        assert pool.wait_full(60)
        waiting = [vm.pid for vm in pool._ready]
        taken = []
        for i in range(3):  # one more than the pool holds: the refill thread must have replaced one
            pool.wait_full(60)
            vm = pool.take(sandbox_id=f"sb-pool-{i}")
            taken.append(vm)
            assert vm.state is VMState.RUNNING and vm.sandbox_id == f"sb-pool-{i}"
            assert vm.exec(["echo", "ok"]).stdout == b"ok\n"
        assert pool.hits == 3 and pool.misses == 0 and pool.started >= 4
        assert {vm.pid for vm in taken[:2]} == set(waiting)
        assert pool.wait_full(60) and pool.waiting == 2
        still_waiting = [vm.pid for vm in pool._ready]
    # close() killed the waiting processes and left the taken clones alone.
    for pid in still_waiting:
        assert pid is not None and proc_start_time(pid) is None
    for vm in taken:
        assert vm.state is VMState.RUNNING
        vm.destroy()
        assert_gone(vm)
    assert qemu_pids_under(vm_root) == []


def test_warm_pool_resumed_ahead_gives_network_identity_on_take(
    template: Template, vm_root: Path, netns: str
) -> None:
    subnet = Subnet("10.70.0.0/24", "10.70.0.1", netns=netns)
    hook = RecordingHook()
    with WarmPool(template, 1, net=subnet, hooks=[hook], run_root=vm_root, resume_ahead=True) as pool:
        assert pool.wait_full(60)
        [waiting] = list(pool._ready)
        assert waiting.state is VMState.RUNNING and not hook.up  # running, but not wired: no hook, no address
        assert "inet " not in waiting.exec(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout.decode()
        vm = pool.take(sandbox_id="sb-ahead")
    try:
        assert vm is waiting and [x.sandbox_id for x in hook.up] == ["sb-ahead"]  # type: ignore[attr-defined]
        out = vm.exec(["sh", "-c", "ip -o -4 addr show dev eth0; cat /sys/class/net/eth0/address"]).stdout.decode()
        assert f"inet {vm.ip}/24" in out and (vm.mac or "?") in out
        ping = ["ip", "netns", "exec", netns, "ping", "-c1", "-W5", vm.ip or ""]
        assert subprocess.run(ping, capture_output=True).returncode == 0
    finally:
        vm.destroy()
    assert_gone(vm)
    assert links(netns) == {"lo"}


def test_clone_with_the_kernel_guard(template: Template, vm_root: Path, netns: str) -> None:
    ebpf = pytest.importorskip("ebpf")
    reason = ebpf.unavailable_reason()
    if reason:
        pytest.skip(f"kernel enforcement unavailable: {reason}")
    subnet = Subnet("10.69.0.0/24", "10.69.0.1", netns=netns)
    [vm] = template.clone(1, net=subnet, hooks=[EbpfGuard(proxy_port=0, dns_port=53)], run_root=vm_root,
                          sandbox_ids=["sb-guarded"])
    try:
        with ebpf.Enforcer.open(netns, create=False) as enf:
            [value] = enf.interfaces().values()
            assert (value.sandbox_id, value.ifname, value.sandbox_ip, value.mac, value.gateway_ip) == (
                "sb-guarded", vm.tap, vm.ip, vm.mac, "10.69.0.1")
        # ICMP echo to the gateway passes; to anything else it is dropped by the guard.
        assert vm.exec(["ping", "-c1", "-W3", "10.69.0.1"]).exit_code == 0
        assert vm.exec(["ping", "-c1", "-W1", "10.69.0.77"]).exit_code != 0
    finally:
        vm.destroy()
    with pytest.raises(FileNotFoundError):
        ebpf.Enforcer.open(netns, create=False)  # the last detach unpinned everything


def test_clones_register_with_the_gateway_under_their_own_sandbox_ids(
    template: Template, vm_root: Path, netns: str, admin_gateway: Path
) -> None:
    from hypervisor.registration import GatewayRegistration

    registration = GatewayRegistration(policies=["agents"], unix_socket=admin_gateway, labels={"pool": "t"})
    subnet = Subnet("10.79.0.0/24", "10.79.0.1", netns=netns)
    clones = template.clone(2, net=subnet, hooks=[registration], sandbox_ids=["agent-a", "agent-b"], run_root=vm_root)
    try:
        registered = registered_sandboxes(admin_gateway)
        assert set(registered) == {"agent-a", "agent-b"}
        for vm in clones:
            sb = registered[vm.sandbox_id]
            assert sb["sources"] == [f"{vm.ip}/32"]
            assert sb["policies"] == ["agents"]
            assert sb["labels"] == {"pool": "t", "vm": vm.id}
    finally:
        clones.destroy()
    assert registered_sandboxes(admin_gateway) == {}  # unregistered before each tap went

    # A registration the gateway refuses (no such policy) aborts that clone's start, with the gateway's reason.
    refused = GatewayRegistration(policies=["no-such-policy"], unix_socket=admin_gateway)
    with pytest.raises(CloneError, match="no-such-policy"):
        template.clone(1, net=subnet, hooks=[refused], run_root=vm_root)
    assert qemu_pids_under(vm_root) == [] and not any(n.startswith("cxe") for n in links(netns))
    assert registered_sandboxes(admin_gateway) == {}


def test_clone_refuses_a_removed_template(template: Template, tmp_path: Path) -> None:
    fake = Template(template.snapshot.__class__(**{**template.snapshot.__dict__,
                                                   "shared_ram": tmp_path / "gone.ram"}))
    with pytest.raises(SnapshotError, match="gone"):
        fake.clone(1)


def test_remove_dir_deletes_only_a_template_ram_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A template that no longer loads (older format) can still be removed, and a snapshot.json naming a file
    # outside the shared-memory templates folder never gets that file deleted.
    monkeypatch.setenv("CUBE_EGRESS_SHM_DIR", str(tmp_path / "shm"))
    ram = private_dir(shm_root() / "templates") / "t.ram"
    ram.write_bytes(b"\0" * 4096)
    outside = tmp_path / "precious"
    outside.write_text("keep me")
    for i, target in enumerate((ram, outside)):
        d = tmp_path / f"t{i}"
        d.mkdir()
        (d / "snapshot.json").write_text(json.dumps({"format": 0, "shared_ram": str(target)}))
        Template.remove_dir(d)
        assert not d.exists()
    assert not ram.exists() and outside.read_text() == "keep me"
