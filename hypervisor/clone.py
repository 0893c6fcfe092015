"""Templates and clones: many guests from one booted guest, sharing its memory copy-on-write.

A template is made from a VM booted with ``shared_memory=True``, whose guest RAM is a file in /dev/shm mapped
``share=on``. :meth:`Template.from_vm` stops the guest and writes its device state with the migration capability
``x-ignore-shared``, so the stream holds no RAM (tens of kB): the RAM *is* the file, which the template keeps. The
VM is destroyed; nothing may write to that file again.

A clone is a new QEMU mapping the same file ``share=off`` (a private, copy-on-write mapping: pages are shared with
every other clone until one writes them), started with ``-incoming defer``; the capability is set again, the state
loaded (``migrate-incoming exec:cat state``), and the guest continues where the template stopped. Before
``clone()`` hands it out, each clone gets its own identity, so no two clones share anything an attacker or a
protocol could tell apart:

* its own tap, MAC and IP (host side: the tap, its /32 route; guest side: the agent's ``net_config``);
* its RNG reseeded with fresh host entropy (``AgentClient.reseed``: all clones start with the template's CRNG);
* its wall clock set (``AgentClient.set_time``: the template's clock stopped when it was made);
* its own sandbox id, given to the hooks (kernel guard, gateway registration) before the guest runs.

``clone(n)`` starts the clones in parallel; the ones that fail are destroyed (tap, process, files) and reported in
``Clones.failures`` while the others are returned; only when every one fails does it raise :class:`CloneError`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import CloneError, SnapshotError
from .net import NetSpec, SandboxHook, Subnet
from .vm import MicroVM, Snapshot, VMState, private_dir, shm_root

if TYPE_CHECKING:
    from .image import GuestImage

__all__ = ["CLONE_TCG_CACHE_MB", "Clones", "Template"]

CLONE_TCG_CACHE_MB = 32
"""TCG translation cache per clone (MiB): a cap on what a busy clone's cache can grow to (the default allows up to
1 GiB per process). Every clone translates the guest code it runs again, in its own process: an idle clone that
served its identity calls holds ~11 MiB of it. Below ~16 MiB the cache thrashes (an ``exec`` of ``true`` takes
~0.2 s instead of ~15 ms). Under KVM there is no such cache."""


class Clones(list[MicroVM]):
    """The clones that started (a list), plus ``failures``: the error of each clone that did not."""

    def __init__(self, vms: Sequence[MicroVM] = (), failures: Sequence[BaseException] = ()) -> None:
        super().__init__(vms)
        self.failures: list[BaseException] = list(failures)

    def destroy(self) -> None:
        """Destroy every clone (each one's errors are collected; the first is raised after all ran)."""
        first: BaseException | None = None
        for vm in self:
            try:
                vm.destroy()
            except Exception as e:
                first = first or e
        if first is not None:
            raise first

    def __enter__(self) -> Clones:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class Template:
    """A frozen guest to clone from: ``snapshot`` (device state) plus its shared RAM file.

    A context manager: :meth:`remove` on exit. Clones already running keep working after ``remove`` (their
    mapping holds the pages), new clones cannot be made.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        if snapshot.shared_ram is None:
            raise SnapshotError(f"{snapshot.directory} is a plain snapshot, not a template (no shared RAM file); "
                                "restore it with MicroVM.restore, or make a template with Template.from_vm")
        self.snapshot = snapshot

    @property
    def directory(self) -> Path:
        return self.snapshot.directory

    @property
    def ram_file(self) -> Path:
        assert self.snapshot.shared_ram is not None
        return self.snapshot.shared_ram

    def __repr__(self) -> str:
        return f"<Template {self.directory} ram={self.ram_file}>"

    def __enter__(self) -> Template:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @classmethod
    def load(cls, directory: Path | str) -> Template:
        return cls(Snapshot.load(directory))

    @classmethod
    def from_vm(cls, vm: MicroVM, directory: Path | str, *, timeout: float = 60.0) -> Template:
        """Freeze ``vm`` (booted with ``shared_memory=True``) into a template in ``directory``; ``vm`` is
        destroyed (its RAM file now belongs to the template)."""
        if not vm.shared_memory:
            raise SnapshotError("a template needs a VM booted with shared_memory=True (its RAM in a shared file)",
                                vm_id=vm.id)
        vm._require("make a template", VMState.RUNNING, VMState.PAUSED)
        d = private_dir(Path(directory))
        if any(d.iterdir()):
            raise SnapshotError(f"{d} is not empty: a template needs a directory of its own", vm_id=vm.id)
        ram = private_dir(shm_root() / "templates") / f"{secrets.token_hex(5)}.ram"
        try:
            if vm.state is VMState.RUNNING:
                vm.pause()
            vm._migrate_out(d / "state", ignore_shared=True, timeout=timeout)
            disk = vm._copy_disk(d)
            assert vm.ram_file is not None
            os.rename(vm.ram_file, ram)  # same tmpfs; QEMU's mapping follows the inode
            vm.ram_file = None
            snap = Snapshot(
                directory=d,
                image_digest=vm.image_digest,
                machine=vm.machine,
                created_at=time.time(),
                source_vm=vm.id,
                shared_ram=ram,
                disk=disk,
            )
            snap._write()
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            if vm.ram_file is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ram)
            vm.destroy()
            raise
        vm.destroy()  # quits QEMU; the RAM file is no longer the VM's, so it stays
        return cls(snap)

    @classmethod
    def create(
        cls,
        image: GuestImage,
        directory: Path | str,
        *,
        memory_mb: int = 256,
        prepare: Callable[[MicroVM], None] | None = None,
        run_root: Path | str | None = None,
        boot_timeout: float = 120.0,
    ) -> Template:
        """Cold boot ``image``, run ``prepare(vm)`` (install, warm caches...), and freeze it into a template."""
        vm = MicroVM(image, memory_mb=memory_mb, shared_memory=True, run_root=run_root)
        with vm:
            vm.boot(timeout=boot_timeout)
            if prepare is not None:
                prepare(vm)
            return cls.from_vm(vm, directory)

    def remove(self) -> None:
        """Delete the template's RAM file and directory (idempotent)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ram_file)
        shutil.rmtree(self.directory, ignore_errors=True)

    @staticmethod
    def remove_dir(directory: Path | str) -> None:
        """Delete a template directory and its RAM file even when it no longer loads (an older format, a
        missing file). Only a RAM file under the shared-memory root is deleted, whatever the JSON says."""
        d = Path(directory)
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            ram = Path(json.loads((d / "snapshot.json").read_text()).get("shared_ram") or "")
            if ram.resolve().parent == (shm_root() / "templates").resolve():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ram)
        shutil.rmtree(d, ignore_errors=True)

    def clone(
        self,
        n: int = 1,
        *,
        net: Subnet | Sequence[NetSpec] | None = None,
        sandbox_ids: Sequence[str] | None = None,
        hooks: Sequence[SandboxHook] = (),
        persistent: bool = False,
        run_root: Path | str | None = None,
        tcg_cache_mb: int | None = CLONE_TCG_CACHE_MB,
        timeout: float = 60.0,
        parallel: int | None = None,
    ) -> Clones:
        """Start ``n`` clones, each with its own identity (see the module docstring), in parallel.

        ``net``: a :class:`Subnet` to lease each clone's address from, or one :class:`NetSpec` per clone, or
        None (no network). ``sandbox_ids``: one per clone (default ``sb-<vm id>``).
        """
        if n < 1:
            raise ValueError("n must be at least 1")
        if not self.ram_file.exists():
            raise SnapshotError(f"template RAM {self.ram_file} is gone (the template was removed)")
        if sandbox_ids is not None and len(sandbox_ids) != n:
            raise ValueError(f"sandbox_ids has {len(sandbox_ids)} entries for {n} clones")
        if isinstance(net, Sequence) and len(net) != n:
            raise ValueError(f"net has {len(net)} NetSpecs for {n} clones")

        def one(i: int) -> MicroVM:
            spec: NetSpec | None
            release: Callable[[], None] | None = None
            if isinstance(net, Subnet):
                spec = net.lease()
                release = _releaser(net, spec.ip)
            elif net is not None:
                spec = net[i]
            else:
                spec = None
            try:
                vm = MicroVM._incoming(
                    self.snapshot,
                    kind="clone",
                    net=spec,
                    sandbox_id=sandbox_ids[i] if sandbox_ids is not None else None,
                    hooks=hooks,
                    persistent=persistent,
                    run_root=run_root,
                    tcg_cache_mb=tcg_cache_mb,
                )
            except BaseException:
                if release is not None:
                    release()
                raise
            if release is not None:
                vm._on_destroyed.append(release)
            vm._finish_incoming(self.snapshot, timeout=timeout)
            return vm

        workers = parallel or min(n, max(2, (os.cpu_count() or 2) * 2))
        results: list[MicroVM | None] = [None] * n
        failures: list[BaseException] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxe-clone") as ex:
            futures = {ex.submit(one, i): i for i in range(n)}
            for fut in concurrent.futures.as_completed(futures):
                try:
                    results[futures[fut]] = fut.result()
                except Exception as e:
                    failures.append(e)
        vms = [vm for vm in results if vm is not None]
        if not vms:
            raise CloneError(f"all {n} clones of {self.directory} failed", failures)
        return Clones(vms, failures)


def _releaser(subnet: Subnet, ip: str) -> Callable[[], None]:
    done = False

    def release() -> None:
        nonlocal done
        if not done:
            done = True
            subnet.release(ip)

    return release
