"""One QEMU ``microvm`` guest: boot, pause, snapshot, restore, destroy; records that outlive the process.

Lifecycle (``MicroVM.state``, a :class:`VMState`)::

    CREATED --boot()--> BOOTING --agent answers--> RUNNING <--pause()/resume()--> PAUSED
    (restore / clone / warm pool)  INCOMING --stream loaded, identity set--> RUNNING
    any --destroy()--> STOPPED          QEMU killed, guest crash, QMP lost --> FAILED (destroy() still cleans up)

Every method checks the state first and says what to do when it does not allow the call. ``destroy()`` is
idempotent and always runs every cleanup step (hooks down, QMP ``quit`` then SIGTERM then SIGKILL, reap, tap,
sockets, overlay, RAM file, run dir), reporting errors only after all of them ran.

Each VM lives in its own run dir (``<run root>/<id>/``, default run root ``/run/cube-egress/vms``, or
``$CUBE_EGRESS_RUN_DIR/vms``) holding ``vm.json`` (pid, sockets, tap, addresses, sandbox id, image digest, the
owner process), the QMP and agent sockets, ``console.log`` (the guest's serial console) and ``qemu.log`` (QEMU's
own output). :func:`list_vms` reads them, :meth:`MicroVM.attach` re-opens a running VM from another process
(a ``persistent=True`` VM outlives the process that booted it; others are destroyed at interpreter exit), and
:func:`cleanup_stale` removes what crashed runs left behind.

Snapshots (:meth:`MicroVM.snapshot`) are a directory: ``state`` (QEMU's migration stream: device state and, except
for templates, the guest RAM), ``snapshot.json`` (image digest, machine, machine args, memory size, accelerator,
the shared RAM file of a template) and ``disk.qcow2`` when the VM has a disk. A restore starts QEMU with the same
machine and ``-incoming defer``, loads the stream (``migrate-incoming exec:cat state``) and continues; no kernel is
needed, the guest's memory comes from the snapshot. QEMU 7.2 has no ``file:`` migration URI, hence ``exec:cat``.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _qemu
from ._errors import AgentError, HypervisorError, SnapshotError, VMError, VMStateError
from .net import NetSpec, SandboxHook, SandboxLink, configure_tap, create_tap, delete_tap, tap_up

if TYPE_CHECKING:
    from .agent import AgentClient, ExecResult
    from .image import GuestImage

__all__ = [
    "Machine",
    "MicroVM",
    "Snapshot",
    "VMRecord",
    "VMState",
    "cleanup_stale",
    "default_run_root",
    "list_vms",
]

log = logging.getLogger("cube_egress.hypervisor")

_FORMAT = 1
AGENT_PORT = "org.cube-egress.agent.0"
_QUIT_GRACE_S = 2.0
_TERM_GRACE_S = 3.0


def default_run_root() -> Path:
    return Path(os.environ.get("CUBE_EGRESS_RUN_DIR", "/run/cube-egress")) / "vms"


def shm_root() -> Path:
    """Where shared guest RAM files live (tmpfs: the pages are shared, not written to disk)."""
    # A fixed, root-owned directory (created 0700), not a temporary file: S108 does not apply.
    return Path(os.environ.get("CUBE_EGRESS_SHM_DIR", "/dev/shm/cube-egress"))  # noqa: S108


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: guest RAM and snapshot streams are the guest's memory."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


class VMState(enum.Enum):
    CREATED = "created"  # not started yet
    BOOTING = "booting"  # QEMU started, waiting for the guest agent
    RUNNING = "running"  # the agent answered; the guest runs
    PAUSED = "paused"  # vCPUs stopped (pause(), or during a snapshot)
    INCOMING = "incoming"  # QEMU waits for a migration stream (restore, clone, warm pool)
    STOPPED = "stopped"  # destroyed, or the guest powered off
    FAILED = "failed"  # QEMU died, the guest crashed or QMP was lost; destroy() cleans up


_HINTS = {
    VMState.CREATED: "boot() it first",
    VMState.BOOTING: "wait for boot() to return",
    VMState.RUNNING: "it is running",
    VMState.PAUSED: "resume() it first",
    VMState.INCOMING: "it is waiting for a snapshot stream (a warm-pool VM: take() it from the pool)",
    VMState.STOPPED: "it was destroyed or powered off; start another",
    VMState.FAILED: "it failed; destroy() it to clean up and start another",
}


@dataclass(frozen=True)
class Machine:
    """The virtual hardware: it must be identical between a VM and every VM restored from its snapshot.

    Devices, in this order (virtio-mmio slots follow the order): the ISA serial console (machine default), a
    virtio-serial bus with the agent port, a virtio-net NIC (always present: a tap backs it when the VM has a
    network, an unconnected hub port otherwise; taps are opened without vnet headers, so any snapshot restores
    with or without a network), a virtio-rng (host entropy: the CRNG is ready at boot, and keeps drawing fresh
    host entropy in every clone), and a virtio-blk disk when the image has a root file system.
    """

    memory_mb: int = 256
    accel: str = "tcg"
    cpus: int = 1
    disk: bool = False

    def __post_init__(self) -> None:
        if not 64 <= self.memory_mb <= 65536:
            raise ValueError(f"memory_mb={self.memory_mb}: use 64 to 65536")
        if self.accel not in ("kvm", "tcg"):
            raise ValueError(f"accel={self.accel!r}: 'kvm' or 'tcg'")
        if not 1 <= self.cpus <= 16:
            raise ValueError(f"cpus={self.cpus}: use 1 to 16")

    def args(self) -> list[str]:
        """The machine's arguments, free of per-VM paths (stored in snapshots and compared at restore)."""
        accel = _qemu.Accel("kvm" if self.accel == "kvm" else "tcg", "").qemu_args()
        out = [
            "-M", "microvm,memory-backend=mem", *accel, "-smp", str(self.cpus), "-m", f"{self.memory_mb}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-device", "virtio-serial-device",
            "-device", f"virtserialport,chardev=agent0,name={AGENT_PORT}",
            "-device", "virtio-net-device,netdev=n0",
            "-device", "virtio-rng-device",
        ]  # fmt: skip
        if self.disk:
            out += ["-device", "virtio-blk-device,drive=disk0"]
        return out


@dataclass(frozen=True)
class Snapshot:
    """A snapshot directory: ``state`` (QEMU's stream), ``snapshot.json``, and ``disk.qcow2`` with a disk."""

    directory: Path
    image_digest: str
    machine: Machine
    created_at: float
    source_vm: str
    shared_ram: Path | None = None  # a template's RAM file: the stream then holds no RAM (x-ignore-shared)
    disk: Path | None = None

    @property
    def state_file(self) -> Path:
        return self.directory / "state"

    @property
    def meta_file(self) -> Path:
        return self.directory / "snapshot.json"

    def _write(self) -> None:
        doc = {
            "format": _FORMAT,
            "image_digest": self.image_digest,
            "machine": asdict(self.machine),
            "machine_args": self.machine.args(),
            "memory_mb": self.machine.memory_mb,
            "accel": self.machine.accel,
            "created_at": self.created_at,
            "source_vm": self.source_vm,
            "shared_ram": str(self.shared_ram) if self.shared_ram else None,
            "disk": self.disk.name if self.disk else None,
        }
        _write_json(self.meta_file, doc)

    @classmethod
    def load(cls, directory: Path | str) -> Snapshot:
        """Read and check a snapshot directory; SnapshotError says what is missing or does not match."""
        d = Path(directory)
        try:
            doc = json.loads((d / "snapshot.json").read_text())
        except FileNotFoundError:
            raise SnapshotError(f"{d}: no snapshot.json (not a snapshot directory)") from None
        except (OSError, ValueError) as e:
            raise SnapshotError(f"{d}/snapshot.json: unreadable ({e})") from e
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise SnapshotError(f"{d}: snapshot format {doc.get('format') if isinstance(doc, dict) else '?'!r} "
                                f"is not {_FORMAT}; take the snapshot again with this version")
        try:
            machine = Machine(**doc["machine"])
            snap = cls(
                directory=d,
                image_digest=str(doc["image_digest"]),
                machine=machine,
                created_at=float(doc["created_at"]),
                source_vm=str(doc["source_vm"]),
                shared_ram=Path(doc["shared_ram"]) if doc.get("shared_ram") else None,
                disk=d / doc["disk"] if doc.get("disk") else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"{d}/snapshot.json: malformed ({e})") from e
        if doc.get("machine_args") != machine.args():
            raise SnapshotError(f"{d}: taken with a different machine layout than this version builds; "
                                "take the snapshot again")
        for need in (snap.state_file, snap.shared_ram, snap.disk):
            if need is not None and not need.exists():
                raise SnapshotError(f"{d}: {need} is missing (the snapshot or its template was removed)")
        return snap

    def remove(self) -> None:
        """Delete the snapshot directory (a template's RAM file belongs to the template, see Template.remove)."""
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True)
class VMRecord:
    """A VM's ``vm.json``, as :func:`list_vms` finds it (``alive``: its QEMU process still runs)."""

    id: str
    run_dir: Path
    pid: int | None
    pid_start: int | None
    owner_pid: int
    owner_start: int | None
    persistent: bool
    kind: str  # boot | restore | clone | pool
    sandbox_id: str | None
    image_digest: str
    machine: Machine
    net: NetSpec | None
    ram_file: Path | None  # owned by this VM (removed with it)
    base_ram: Path | None  # a template's RAM file, mapped copy-on-write
    created_at: float
    alive: bool = False

    @property
    def owner_alive(self) -> bool:
        return self.owner_start is not None and _qemu.proc_start_time(self.owner_pid) == self.owner_start

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("alive")
        doc["format"] = _FORMAT
        doc["run_dir"] = str(self.run_dir)
        doc["ram_file"] = str(self.ram_file) if self.ram_file else None
        doc["base_ram"] = str(self.base_ram) if self.base_ram else None
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> VMRecord:
        net = doc.get("net")
        rec = cls(
            id=str(doc["id"]),
            run_dir=Path(doc["run_dir"]),
            pid=doc.get("pid"),
            pid_start=doc.get("pid_start"),
            owner_pid=int(doc["owner_pid"]),
            owner_start=doc.get("owner_start"),
            persistent=bool(doc["persistent"]),
            kind=str(doc["kind"]),
            sandbox_id=doc.get("sandbox_id"),
            image_digest=str(doc["image_digest"]),
            machine=Machine(**doc["machine"]),
            net=NetSpec(**net) if net else None,
            ram_file=Path(doc["ram_file"]) if doc.get("ram_file") else None,
            base_ram=Path(doc["base_ram"]) if doc.get("base_ram") else None,
            created_at=float(doc["created_at"]),
        )
        alive = rec.pid is not None and _qemu.proc_start_time(rec.pid) == rec.pid_start
        return cls(**{**rec.__dict__, "alive": alive})


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# Non-persistent VMs of this process, destroyed at interpreter exit.
_live: weakref.WeakSet[MicroVM] = weakref.WeakSet()


@atexit.register
def _destroy_live_at_exit() -> None:
    for vm in list(_live):
        if not vm.persistent:
            with contextlib.suppress(Exception):
                vm.destroy()


@dataclass
class _Paths:
    run_dir: Path
    record: Path = field(init=False)
    qmp: Path = field(init=False)
    agent: Path = field(init=False)
    console: Path = field(init=False)
    qemu_log: Path = field(init=False)
    disk: Path = field(init=False)

    def __post_init__(self) -> None:
        d = self.run_dir
        self.record, self.qmp, self.agent = d / "vm.json", d / "qmp.sock", d / "agent.sock"
        self.console, self.qemu_log, self.disk = d / "console.log", d / "qemu.log", d / "disk.qcow2"


class MicroVM:
    """One microVM guest (a context manager: ``destroy()`` on exit). See the module docstring for the states.

    ``net`` gives the VM a tap (see :mod:`hypervisor.net`); ``hooks`` are called with its :class:`SandboxLink`
    after the tap exists and before the guest runs, and before the tap goes. ``shared_memory=True`` backs the
    guest RAM with a shared file in /dev/shm, which a :class:`~hypervisor.clone.Template` needs.
    ``tcg_cache_mb`` caps TCG's translation cache (memory per VM against CPU spent retranslating).
    """

    ram_file: Path | None  # shared RAM this VM owns (shared_memory=True)
    base_ram: Path | None  # a template's RAM this VM maps copy-on-write (a clone)
    _image: GuestImage | None

    def __init__(
        self,
        image: GuestImage,
        *,
        memory_mb: int = 256,
        net: NetSpec | None = None,
        sandbox_id: str | None = None,
        hooks: Sequence[SandboxHook] = (),
        shared_memory: bool = False,
        persistent: bool = False,
        run_root: Path | str | None = None,
        accel: _qemu.Accel | None = None,
        tcg_cache_mb: int | None = None,
        cmdline: str = "",
        agent_timeout: float = 30.0,
    ) -> None:
        accel = accel or _qemu.probe_accel(image.kernel)
        machine = Machine(memory_mb=memory_mb, accel=accel.name, disk=image.rootfs is not None)
        self._init(
            machine=machine,
            image_digest=image.digest,
            kind="boot",
            net=net,
            sandbox_id=sandbox_id,
            hooks=hooks,
            persistent=persistent,
            run_root=run_root,
            tcg_cache_mb=tcg_cache_mb,
            agent_timeout=agent_timeout,
        )
        self._image = image
        self._cmdline = cmdline
        if shared_memory:
            self.ram_file = shm_root() / "vms" / f"{self.id}.ram"

    def _init(
        self,
        *,
        machine: Machine,
        image_digest: str,
        kind: str,
        net: NetSpec | None,
        sandbox_id: str | None,
        hooks: Sequence[SandboxHook],
        persistent: bool,
        run_root: Path | str | None,
        tcg_cache_mb: int | None,
        agent_timeout: float,
        vm_id: str | None = None,
    ) -> None:
        self.id = vm_id or secrets.token_hex(5)
        self.machine = machine
        self.image_digest = image_digest
        self.kind = kind
        self.net = net.for_vm(self.id) if net is not None else None
        self.sandbox_id = sandbox_id or f"sb-{self.id}"
        self.hooks = tuple(hooks)
        if self.hooks and self.net is None:
            raise ValueError("sandbox hooks need a network (pass net=NetSpec(...)): they are called with its tap")
        self.persistent = persistent
        self.run_root = Path(run_root) if run_root is not None else default_run_root()
        self.paths = _Paths(self.run_root / self.id)
        self.tcg_cache_mb = tcg_cache_mb
        self.agent_timeout = agent_timeout
        self.ram_file = None
        self.base_ram = None
        self.created_at = time.time()
        self.failure: str | None = None
        self._image = None
        self._cmdline = ""
        self._state = VMState.CREATED
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self._pid_start: int | None = None
        self._qmp: _qemu.QMP | None = None
        self._watch: Any = None
        self._agent: AgentClient | None = None
        self._agent_lock = threading.Lock()
        self._hooks_up: list[SandboxHook] = []
        self._tap_created = False
        self._destroyed = False
        self._stopping = False
        self._shutdown_reason: str | None = None
        self._on_destroyed: list[Callable[[], None]] = []  # e.g. give a leased address back

    # -- public state ------------------------------------------------------------------------------------------

    @property
    def state(self) -> VMState:
        return self._state

    @property
    def shared_memory(self) -> bool:
        return self.ram_file is not None

    @property
    def ip(self) -> str | None:
        return self.net.ip if self.net else None

    @property
    def mac(self) -> str | None:
        return self.net.mac if self.net else None

    @property
    def tap(self) -> str | None:
        return self.net.tap if self.net else None

    @property
    def link(self) -> SandboxLink | None:
        n = self.net
        if n is None or n.tap is None or n.mac is None:
            return None
        return SandboxLink(self.sandbox_id, self.id, n.tap, n.netns, n.ip, n.mac, n.gateway_ip, n.prefix)

    def __repr__(self) -> str:
        return f"<MicroVM {self.id} {self._state.value} pid={self.pid} sandbox={self.sandbox_id}>"

    def __enter__(self) -> MicroVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def console_tail(self, lines: int = 30) -> str:
        """The last lines of the guest console (and of QEMU's own messages), for error reports."""
        out = _qemu.tail(self.paths.console, lines)
        q = _qemu.tail(self.paths.qemu_log, 5)
        return out + (f"\n[qemu] {q}" if q else "")

    def _require(self, op: str, *states: VMState) -> None:
        s = self._state
        if s not in states:
            allowed = ", ".join(x.value for x in states)
            why = f" ({self.failure})" if s is VMState.FAILED and self.failure else ""
            raise VMStateError(
                f"cannot {op}: the VM is {s.value}{why}; {op} needs {allowed}: {_HINTS[s]}",
                vm_id=self.id,
                state=s.value,
            )

    def _error(self, message: str, cause: BaseException | None = None, *, console: bool = True) -> VMError:
        err = VMError(message, vm_id=self.id, console=self.console_tail() if console else "")
        if cause is not None:
            err.__cause__ = cause
        return err

    # -- boot ----------------------------------------------------------------------------------------------------

    def boot(self, timeout: float = 120.0) -> MicroVM:
        """Cold boot to agent-ready (the guest agent answers ``hello``). On failure the VM is destroyed and the
        error carries the console tail."""
        with self._lock:
            self._require("boot", VMState.CREATED)
            self._state = VMState.BOOTING
        image = self._image
        assert image is not None, "boot() needs a VM created from an image"
        try:
            self._setup_run_dir()
            if image.rootfs is not None:
                from .image import overlay

                overlay(image, self.paths.disk)
            net_args = self.net.kernel_args() if self.net else ""
            cmdline = " ".join(x for x in (image.cmdline, net_args, self._cmdline) if x)
            self._start_qemu(
                ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline],
                incoming=False,
            )
            self._connect_agent(deadline=time.monotonic() + timeout)
        except BaseException as e:
            self._fail_start("boot failed", e)
        with self._lock:
            if self._state is VMState.BOOTING:
                self._state = VMState.RUNNING
        self._write_record()
        return self

    def _fail_start(self, what: str, e: BaseException) -> None:
        console = self.console_tail()
        failure = self.failure
        with contextlib.suppress(Exception):
            self._teardown()
        with self._lock:
            self._state = VMState.FAILED
            self.failure = failure or f"{what}: {e}"
        if isinstance(e, KeyboardInterrupt):
            raise e
        detail = f"{what}: {e}" + (f" ({failure})" if failure and failure not in str(e) else "")
        if isinstance(e, VMError) and not isinstance(e, VMStateError):
            detail = f"{what}: {e.message}" + (f" ({failure})" if failure and failure not in e.message else "")
        raise VMError(detail, vm_id=self.id, console=console) from e

    def _setup_run_dir(self) -> None:
        self.paths.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.paths.run_dir.mkdir(mode=0o700)
        if self.ram_file is not None:
            private_dir(self.ram_file.parent)
        _live.add(self)
        self._write_record()

    def _record(self) -> VMRecord:
        return VMRecord(
            id=self.id,
            run_dir=self.paths.run_dir,
            pid=self.pid,
            pid_start=self._pid_start,
            owner_pid=os.getpid(),
            owner_start=_qemu.proc_start_time(os.getpid()),
            persistent=self.persistent,
            kind=self.kind,
            sandbox_id=self.sandbox_id,
            image_digest=self.image_digest,
            machine=self.machine,
            net=self.net,
            ram_file=self.ram_file,
            base_ram=self.base_ram,
            created_at=self.created_at,
        )

    def _write_record(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # the run dir is gone once destroyed
            _write_json(self.paths.record, self._record().to_json())

    def _memory_args(self) -> list[str]:
        size = f"size={self.machine.memory_mb}M"
        if self.base_ram is not None:  # a clone: the template's RAM, copy-on-write
            return ["-object", f"memory-backend-file,id=mem,{size},mem-path={self.base_ram},share=off"]
        if self.ram_file is not None:
            return ["-object", f"memory-backend-file,id=mem,{size},mem-path={self.ram_file},share=on"]
        return ["-object", f"memory-backend-ram,id=mem,{size}"]

    def _argv(self, boot_args: list[str], incoming: bool) -> list[str]:
        p = self.paths
        argv = [_qemu.qemu_binary(), "-name", f"cxe-{self.id}", *self.machine.args()]
        if self.machine.accel == "tcg" and self.tcg_cache_mb:
            i = argv.index("-accel")
            argv[i + 1] = f"tcg,tb-size={self.tcg_cache_mb}"
        argv += self._memory_args()
        argv += ["-chardev", f"socket,id=agent0,path={p.agent},server=on,wait=off"]
        argv += ["-chardev", f"file,id=con0,path={p.console},append=on", "-serial", "chardev:con0"]
        if self.net is not None:
            # vnet_hdr=off: the NIC's saved state then never depends on the backend (a stream saved with vnet_hdr
            # cannot load behind a hub port, so a snapshot taken with a tap could not be restored without one).
            argv += ["-netdev", f"tap,id=n0,ifname={self.net.tap},script=no,downscript=no,vnet_hdr=off"]
            i = argv.index("virtio-net-device,netdev=n0")
            argv[i] += f",mac={self.net.mac}"
        else:
            argv += ["-netdev", "hubport,id=n0,hubid=0"]  # a NIC with nothing behind it
        if self.machine.disk:
            argv += ["-drive", f"file={p.disk},if=none,id=disk0,format=qcow2"]
        argv += ["-qmp", f"unix:{p.qmp},server=on,wait=off"]
        if incoming:
            argv += ["-incoming", "defer", "-S"]
        argv += boot_args
        if self.net is not None and self.net.netns:
            argv = ["ip", "netns", "exec", self.net.netns, *argv]
        return argv

    def _start_qemu(self, boot_args: list[str], *, incoming: bool) -> None:
        """Create the tap, start QEMU, watch it, connect QMP (and, when incoming, wait for a stream)."""
        if self.net is not None:
            assert self.net.tap is not None
            create_tap(self.net.tap, self.net.netns)
            self._tap_created = True
            if not incoming:  # a cold boot runs the guest at once: wire the tap first (incoming: before `cont`)
                self._wire_tap()
        argv = self._argv(boot_args, incoming)
        with open(self.paths.qemu_log, "ab") as qlog:
            try:
                # A session of its own: a Ctrl-C meant for the caller's terminal does not kill the guests.
                self._proc = _qemu.spawn(
                    argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                    cwd=self.paths.run_dir, start_new_session=True, close_fds=True,
                )  # fmt: skip
            except OSError as e:
                raise VMError(f"cannot start {argv[0]}: {e}") from e
        self.pid = self._proc.pid
        self._pid_start = _qemu.proc_start_time(self.pid)
        self._watch = _qemu.watch_exit(self.pid, self._on_exit)
        self._write_record()
        self._qmp = _qemu.QMP(str(self.paths.qmp), f"vm-{self.id}", on_event=self._on_event, on_lost=self._on_lost)
        self._qmp.connect(timeout=30.0, alive=self._process_alive)
        if incoming:
            with self._lock:
                self._state = VMState.INCOMING

    # -- watching ------------------------------------------------------------------------------------------------

    def _process_alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self.pid is not None and _qemu.proc_start_time(self.pid) == self._pid_start

    def _exit_detail(self) -> str:
        code = self._proc.poll() if self._proc is not None else None
        reason = self._shutdown_reason
        if reason and reason not in ("host-qmp-quit",):
            return f"QEMU exited after a {reason} (the guest crashed, rebooted or powered off)"
        if code is None:
            return "QEMU exited"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return f"QEMU was killed by {name}"
        return f"QEMU exited with status {code}"

    def _on_exit(self) -> None:
        """Loop thread: the QEMU process is gone. The QMP stream may still hold its last events (a SHUTDOWN with
        the reason): when it is connected, its end concludes (it comes right after), with a fallback timer."""
        with self._lock:
            if self._stopping or self._state in (VMState.STOPPED, VMState.FAILED):
                return
        if self._qmp is not None and self._qmp.connected:
            _qemu.call_later(0.5, self._conclude)
        else:
            self._conclude()

    def _on_lost(self) -> None:
        """Loop thread: the QMP connection closed without us asking (every event before it has been seen)."""
        if self._process_alive():
            _qemu.call_later(0.2, self._conclude)  # the exit is usually a moment behind
        else:
            self._conclude()

    def _conclude(self) -> None:
        with self._lock:
            if self._stopping or self._state in (VMState.STOPPED, VMState.FAILED):
                return
            if self._process_alive():
                self._state, self.failure = VMState.FAILED, "the QMP connection was lost"
            elif self._shutdown_reason == "guest-shutdown":
                self._state, self.failure = VMState.STOPPED, "the guest powered off"
            else:
                self._state, self.failure = VMState.FAILED, self._exit_detail()
        log.warning("vm %s: %s", self.id, self.failure)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "SHUTDOWN":
            data = event.get("data") or {}
            self._shutdown_reason = str(data.get("reason") or "shutdown")

    def _qmpc(self) -> _qemu.QMP:
        if self._qmp is None or not self._qmp.connected:
            raise VMError("no QMP connection to QEMU", vm_id=self.id)
        return self._qmp

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a raw QMP command (an escape hatch for inspection: ``vm.qmp("query-status")``)."""
        self._require(f"run QMP {command}", VMState.RUNNING, VMState.PAUSED, VMState.INCOMING, VMState.BOOTING)
        try:
            return self._qmpc().execute(command, arguments or None)
        except VMError as e:
            raise self._error(e.message, e, console=False) from e

    # -- agent ---------------------------------------------------------------------------------------------------

    def _connect_agent(self, deadline: float) -> AgentClient:
        """Connect to the guest agent (hello answered), checking between tries that QEMU still runs."""
        from .agent import AgentClient

        last: BaseException | None = None
        while True:
            if self._state is VMState.FAILED or not self._process_alive():
                raise self._error(f"the VM died before its agent answered: {self.failure or self._exit_detail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._error(f"the guest agent did not answer in time ({last})", last)
            try:
                client = AgentClient.connect(str(self.paths.agent), timeout=min(remaining, 2.0))
            except AgentError as e:
                last = e
                continue
            with self._agent_lock:
                old, self._agent = self._agent, client
            if old is not None:
                with contextlib.suppress(Exception):
                    old.close()
            return client

    @property
    def agent(self) -> AgentClient:
        """The guest agent's client (connected on first use; one request at a time)."""
        self._require("talk to the agent", VMState.RUNNING)
        with self._agent_lock:
            client = self._agent
        if client is None:
            client = self._connect_agent(time.monotonic() + self.agent_timeout)
        return client

    def exec(self, argv: Sequence[str], **kwargs: Any) -> ExecResult:
        """Run a program in the guest through the agent (see ``AgentClient.exec``)."""
        return self.agent.exec(list(argv), **kwargs)

    # -- pause, resume, snapshot -----------------------------------------------------------------------------------

    def pause(self) -> None:
        with self._lock:
            self._require("pause", VMState.RUNNING)
            self._qmp_or_fail("stop")
            self._state = VMState.PAUSED

    def resume(self) -> None:
        with self._lock:
            self._require("resume", VMState.PAUSED)
            self._qmp_or_fail("cont")
            self._state = VMState.RUNNING

    def _qmp_or_fail(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        try:
            return self._qmpc().execute(cmd, args, timeout=timeout)
        except VMError as e:
            raise self._error(e.message, e, console=not self._process_alive()) from e

    def _migrate_out(self, state_file: Path, *, ignore_shared: bool, timeout: float) -> None:
        self._qmp_or_fail("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": ignore_shared},
        ]})  # fmt: skip
        # The default bandwidth cap (128 MiB/s) would make a 256 MiB snapshot take seconds for nothing.
        self._qmp_or_fail("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        self._qmp_or_fail("migrate", {"uri": f"exec:cat > {shlex.quote(str(state_file))}"})
        try:
            done = self._qmpc().poll(
                "query-migrate",
                lambda a: a.get("status") in ("completed", "failed", "cancelled"),
                timeout=timeout,
                what="writing the snapshot",
            )
        except VMError as e:
            raise self._error(e.message, e) from e
        if done.get("status") != "completed":
            raise SnapshotError(f"snapshot failed: {done.get('error-desc') or done.get('status')}", vm_id=self.id)

    def snapshot(self, directory: Path | str, *, resume: bool = True, timeout: float = 120.0) -> Snapshot:
        """Write a snapshot into ``directory`` (new or empty). The guest is paused while it is written and
        resumed afterwards when it was running and ``resume`` is true. The stream includes the guest RAM."""
        d = Path(directory)
        with self._lock:
            self._require("snapshot", VMState.RUNNING, VMState.PAUSED)
            was_running = self._state is VMState.RUNNING
            private_dir(d)
            if any(d.iterdir()):
                raise SnapshotError(f"{d} is not empty: a snapshot needs a directory of its own", vm_id=self.id)
            if was_running:
                self.pause()
            try:
                self._migrate_out(d / "state", ignore_shared=False, timeout=timeout)
                snap = Snapshot(
                    directory=d,
                    image_digest=self.image_digest,
                    machine=self.machine,
                    created_at=time.time(),
                    source_vm=self.id,
                    disk=self._copy_disk(d),
                )
                snap._write()
            except BaseException:
                shutil.rmtree(d, ignore_errors=True)
                raise
            finally:
                if was_running and resume and self._state is VMState.PAUSED:
                    self.resume()
        return snap

    def _copy_disk(self, d: Path) -> Path | None:
        """The disk overlay as it is now (the migration flushed it), next to the stream."""
        if not self.machine.disk:
            return None
        shutil.copyfile(self.paths.disk, d / "disk.qcow2")
        return d / "disk.qcow2"

    # -- restore -----------------------------------------------------------------------------------------------

    @classmethod
    def restore(
        cls,
        snapshot: Snapshot | Path | str,
        *,
        net: NetSpec | None = None,
        sandbox_id: str | None = None,
        hooks: Sequence[SandboxHook] = (),
        persistent: bool = False,
        run_root: Path | str | None = None,
        tcg_cache_mb: int | None = None,
        timeout: float = 60.0,
    ) -> MicroVM:
        """A new VM continuing ``snapshot``: same machine, the stream loaded, then its own identity before it
        runs anything new: the RNG reseeded, the wall clock set, and (with ``net``) its address, MAC and route.
        """
        snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot.load(snapshot)
        vm = cls._incoming(
            snap,
            kind="restore",
            net=net,
            sandbox_id=sandbox_id,
            hooks=hooks,
            persistent=persistent,
            run_root=run_root,
            tcg_cache_mb=tcg_cache_mb,
        )
        vm._finish_incoming(snap, timeout=timeout)
        return vm

    @classmethod
    def _incoming(
        cls,
        snap: Snapshot,
        *,
        kind: str,
        net: NetSpec | None,
        sandbox_id: str | None,
        hooks: Sequence[SandboxHook],
        persistent: bool,
        run_root: Path | str | None,
        tcg_cache_mb: int | None,
    ) -> MicroVM:
        """Start QEMU for ``snap`` and leave it waiting for the stream (state INCOMING); the warm pool's step 1."""
        vm = cls.__new__(cls)
        vm._init(
            machine=snap.machine,
            image_digest=snap.image_digest,
            kind=kind,
            net=net,
            sandbox_id=sandbox_id,
            hooks=hooks,
            persistent=persistent,
            run_root=run_root,
            tcg_cache_mb=tcg_cache_mb,
            agent_timeout=30.0,
        )
        vm.base_ram = snap.shared_ram
        try:
            vm._setup_run_dir()
            if snap.disk is not None:
                _qcow2_overlay(snap.disk, vm.paths.disk)
            vm._start_qemu([], incoming=True)
            if snap.shared_ram is not None:
                vm._qmp_or_fail("migrate-set-capabilities", {"capabilities": [
                    {"capability": "x-ignore-shared", "state": True},
                ]})  # fmt: skip
        except BaseException as e:
            vm._fail_start("starting QEMU for the snapshot failed", e)
        return vm

    def _finish_incoming(
        self, snap: Snapshot, *, timeout: float = 60.0, sandbox_id: str | None = None, go_live: bool = True
    ) -> None:
        """Load the stream, wire the network, continue, and give the guest its identity (the pool's step 2).

        ``go_live=False`` (a warm pool resuming ahead): load, continue and reseed only; the tap stays unwired and
        down, the guest has no address, and :meth:`_go_live` finishes the job when the VM is taken.
        """
        try:
            with self._lock:
                self._require("load a snapshot", VMState.INCOMING)
            if sandbox_id is not None:
                self.sandbox_id = sandbox_id
            deadline = time.monotonic() + timeout
            uri = f"exec:cat {shlex.quote(str(snap.state_file))}"
            self._qmp_or_fail("migrate-incoming", {"uri": uri})
            status = self._qmpc().poll(
                "query-status",
                lambda a: a.get("status") != "inmigrate",
                timeout=timeout,
                what="loading the snapshot",
            )
            if status.get("status") != "paused":
                raise SnapshotError(f"loading the snapshot ended in state {status.get('status')!r}")
            if go_live:
                self._wire_tap()
            with self._lock:
                self._qmp_or_fail("cont")
                self._state = VMState.BOOTING
            agent = self._connect_agent(deadline)
            agent.reseed()  # first: nothing may draw from the template's CRNG state
            if go_live:
                self._apply_identity(agent)
            with self._lock:
                if self._state is VMState.BOOTING:
                    self._state = VMState.RUNNING
            self._write_record()
        except BaseException as e:
            self._fail_start("restoring the snapshot failed", e)

    def _go_live(self, *, sandbox_id: str | None = None) -> None:
        """A VM resumed ahead (``_finish_incoming(go_live=False)``): wire its tap, then its identity."""
        try:
            with self._lock:
                self._require("hand out", VMState.RUNNING)
            if sandbox_id is not None:
                self.sandbox_id = sandbox_id
            self._wire_tap()
            agent = self.agent
            agent.reseed()  # again: its pool time left it unique, but it is about to be someone's sandbox
            self._apply_identity(agent)
            self._write_record()
        except BaseException as e:
            self._fail_start("handing out the VM failed", e)

    def _apply_identity(self, agent: AgentClient) -> None:
        agent.set_time()
        if self.net is not None:
            n = self.net
            agent.net_config(f"{n.ip}/{n.prefix}", gateway=n.gateway_ip, dns=[n.dns or n.gateway_ip], mac=n.mac)

    def _wire_tap(self) -> None:
        """The host side of the tap (gateway address), the hooks (guard, registration), and only then the link up
        with the route to the guest: a guest already running (a pool resumed ahead) is guarded from its first
        frame."""
        link = self.link
        if link is None:
            return
        configure_tap(link.tap, link.netns, gateway_ip=link.gateway_ip)
        for hook in self.hooks:
            hook.sandbox_up(link)
            self._hooks_up.append(hook)
        tap_up(link.tap, link.netns, guest_ip=link.ip)

    # -- attach (another process) ------------------------------------------------------------------------------

    @classmethod
    def attach(
        cls, vm_id: str, *, run_root: Path | str | None = None, hooks: Sequence[SandboxHook] = ()
    ) -> MicroVM:
        """Re-open a running VM from its run dir record (e.g. one a CLI command booted with persistent=True).

        QEMU serves one QMP client at a time: attach fails if another process holds this VM's monitor. ``hooks``
        are the ones to call ``sandbox_down`` on at destroy (hooks do not survive the process that booted).
        """
        root = Path(run_root) if run_root is not None else default_run_root()
        rec = _read_record(root / vm_id)
        if rec is None:
            raise VMError(f"no VM {vm_id!r} under {root} (see list_vms())")
        if not rec.alive:
            raise VMError(f"vm {vm_id}: its QEMU (pid {rec.pid}) is not running; cleanup_stale() removes its "
                          "leftovers")
        vm = cls.__new__(cls)
        vm._init(
            machine=rec.machine,
            image_digest=rec.image_digest,
            kind=rec.kind,
            net=None,
            sandbox_id=rec.sandbox_id,
            hooks=(),
            persistent=rec.persistent,
            run_root=root,
            tcg_cache_mb=None,
            agent_timeout=30.0,
            vm_id=rec.id,
        )
        vm.net, vm.hooks = rec.net, tuple(hooks)
        vm._hooks_up = list(vm.hooks)
        vm.ram_file, vm.base_ram, vm.created_at = rec.ram_file, rec.base_ram, rec.created_at
        vm.pid, vm._pid_start = rec.pid, rec.pid_start
        vm._tap_created = rec.net is not None
        vm._watch = _qemu.watch_exit(rec.pid or 0, vm._on_exit)
        vm._qmp = _qemu.QMP(str(vm.paths.qmp), f"vm-{vm.id}", on_event=vm._on_event, on_lost=vm._on_lost)
        vm._qmp.connect(timeout=5.0, alive=vm._process_alive)
        status = vm._qmpc().execute("query-status").get("status")
        vm._state = {
            "running": VMState.RUNNING,
            "paused": VMState.PAUSED,
            "postmigrate": VMState.PAUSED,
            "inmigrate": VMState.INCOMING,
            "prelaunch": VMState.INCOMING,
        }.get(status, VMState.FAILED)
        if vm._state is VMState.FAILED:
            vm.failure = f"QEMU reports run state {status!r}"
        _live.add(vm)
        return vm

    def release(self) -> None:
        """Let go of the VM without stopping it: close QMP and the agent connection so another process can
        :meth:`attach` (QEMU serves one client per socket). For ``persistent=True`` VMs; this object is then done.
        """
        with self._lock:
            self._require("release", VMState.RUNNING, VMState.PAUSED)
            if not self.persistent:
                raise VMStateError("only a persistent VM can be released (others die with their process)",
                                   vm_id=self.id, state=self._state.value)
            self._stopping = True  # the closing QMP socket is not a failure
            self._destroyed = True  # destroy() on this object no longer applies: attach() and destroy that
            self._state = VMState.STOPPED
            self.failure = "released to other processes (MicroVM.attach)"
        with self._agent_lock:
            agent, self._agent = self._agent, None
        if agent is not None:
            agent.close()
        if self._qmp is not None:
            self._qmp.close()
        if self._watch is not None:
            self._watch.cancel()
        _live.discard(self)

    # -- destroy -------------------------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Stop the guest and remove everything it had (idempotent; every step runs, errors reported after)."""
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
            self._stopping = True
        errors = self._teardown()
        with self._lock:
            self._state = VMState.STOPPED
        _live.discard(self)
        if errors:
            raise VMError("destroy finished with errors: " + "; ".join(errors), vm_id=self.id)

    def _teardown(self) -> list[str]:
        self._stopping = True
        self._destroyed = True
        errors: list[str] = []

        def step(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:
                errors.append(f"{what}: {e}")

        link = self.link
        for hook in reversed(self._hooks_up):
            if link is not None:
                step(f"hook {type(hook).__name__}.sandbox_down", hook.sandbox_down, link)
        self._hooks_up.clear()
        with self._agent_lock:
            agent, self._agent = self._agent, None
        if agent is not None:
            step("closing the agent", agent.close)
        step("stopping QEMU", self._stop_process)
        if self._qmp is not None:
            step("closing QMP", self._qmp.close)
        if self._watch is not None:
            self._watch.cancel()
        if self._tap_created and self.net is not None and self.net.tap:
            step(f"removing tap {self.net.tap}", delete_tap, self.net.tap, self.net.netns)
        if self.ram_file is not None:
            step("removing the RAM file", _qemu.unlink_all, [self.ram_file])
        step("removing the run dir", shutil.rmtree, self.paths.run_dir, True)
        for fn in self._on_destroyed:
            step("release", fn)
        self._on_destroyed.clear()
        _live.discard(self)
        return errors

    def _stop_process(self) -> None:
        if self.pid is None:
            return
        if self._process_alive() and self._qmp is not None and self._qmp.connected:
            with contextlib.suppress(VMError):
                self._qmp.execute("quit", timeout=_QUIT_GRACE_S)
            self._wait_gone(_QUIT_GRACE_S)
        for sig, grace in ((signal.SIGTERM, _TERM_GRACE_S), (signal.SIGKILL, 10.0)):
            if not self._process_alive():
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            self._wait_gone(grace)
        if self._process_alive():
            raise VMError(f"QEMU pid {self.pid} survived SIGKILL", vm_id=self.id)
        if self._proc is not None:
            self._proc.wait(timeout=5)

    def _wait_gone(self, timeout: float) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=timeout)
        elif self.pid is not None:
            _qemu.wait_pid_gone(self.pid, timeout)


def _qcow2_overlay(backing: Path, path: Path) -> None:
    out = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise VMError(f"qemu-img create (overlay of {backing}) failed: {out.stderr.strip()}")


# -- records -------------------------------------------------------------------------------------------------------


def _read_record(run_dir: Path) -> VMRecord | None:
    try:
        doc = json.loads((run_dir / "vm.json").read_text())
        return VMRecord.from_json(doc)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_vms(run_root: Path | str | None = None) -> list[VMRecord]:
    """Every VM with a run dir under ``run_root`` (alive or not), oldest first."""
    root = Path(run_root) if run_root is not None else default_run_root()
    try:
        dirs = [d for d in root.iterdir() if d.is_dir()]
    except FileNotFoundError:
        return []
    records = [r for r in (_read_record(d) for d in dirs) if r is not None]
    return sorted(records, key=lambda r: r.created_at)


def cleanup_stale(run_root: Path | str | None = None, *, force: bool = False) -> list[str]:
    """Remove what crashed runs left: VMs whose QEMU is gone, and non-persistent VMs whose owner process is gone
    (their QEMU is killed). With ``force``, every VM under ``run_root`` not held by this process goes too.
    Returns the ids removed. A run dir without a readable record is removed once it is older than 10 s."""
    root = Path(run_root) if run_root is not None else default_run_root()
    removed: list[str] = []
    try:
        dirs = [d for d in root.iterdir() if d.is_dir()]
    except FileNotFoundError:
        return []
    live_here = {vm.id for vm in list(_live)}
    for d in dirs:
        if d.name in live_here:
            continue
        rec = _read_record(d)
        if rec is None:
            # A run dir whose record was never written (a crash right at creation) is older than a few seconds.
            if time.time() - d.stat().st_mtime > 10:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
            continue
        if rec.alive and (rec.persistent or rec.owner_alive) and not force:
            continue
        if rec.alive and rec.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGKILL)
            _qemu.wait_pid_gone(rec.pid, 10.0)
        if rec.net is not None and rec.net.tap:
            with contextlib.suppress(HypervisorError):
                delete_tap(rec.net.tap, rec.net.netns)
        if rec.ram_file is not None:
            _qemu.unlink_all([rec.ram_file])
        shutil.rmtree(d, ignore_errors=True)
        removed.append(rec.id)
    return removed
