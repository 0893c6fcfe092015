"""The loaded programs and maps of one network namespace, pinned in bpffs so every process shares them.

See the package docstring for the packet path. Layout of the pin directory (one per network namespace, named by
the namespace's cookie, which the kernel never reuses, so two namespaces never share maps keyed by interface
index)::

    /run/cube-egress/bpf/net<netns cookie>/prog_cxe_tc_guard, prog_cxe_connect4, ..., map_cxe_ifaces, ...

The first attach in a namespace compiles (bcc, ~0.5 s) and pins; later attaches, ``verify`` and the gateway's
drop reader open the pins (milliseconds, no compiler). The last detach unpins everything and removes the
directory, so nothing is left behind. Changes are serialised across processes by a lock file in /run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import _build, _libbpf, _net
from ._layout import COUNT_KEY, IFNAME_LEN, ORIG, PEER_KEY, PORT_KEY, SANDBOX, SandboxValue, ip4, mac_bytes
from .reasons import Code

__all__ = [
    "DEFAULT_PORTS",
    "PIN_ROOT",
    "AttachError",
    "CgroupSandbox",
    "Enforcer",
    "OriginalDestination",
    "SandboxSpec",
    "cgroup2_root",
]

PIN_ROOT = os.environ.get("CUBE_EGRESS_BPF_ROOT", "/run/cube-egress/bpf")
"""A bpffs instance of our own, not /sys/fs/bpf: ``ip netns exec`` mounts a fresh /sys for the namespace, which
hides /sys/fs/bpf (and /sys/fs/cgroup) from a gateway started that way; /run stays shared."""
LOCK_DIR = "/run/cube-egress"
DEFAULT_PORTS = (80, 443)
"""TCP ports every sandbox's traffic on is redirected to the transparent listener (plus its policy's ports)."""

# enum bpf_attach_type (uapi/linux/bpf.h); stable numbers
ATTACH_TYPES: dict[str, int] = {
    "cxe_connect4": 10,  # BPF_CGROUP_INET4_CONNECT
    "cxe_connect6": 11,  # BPF_CGROUP_INET6_CONNECT
    "cxe_sendmsg4": 14,  # BPF_CGROUP_UDP4_SENDMSG
    "cxe_sendmsg6": 15,  # BPF_CGROUP_UDP6_SENDMSG
    "cxe_sockops": 3,  # BPF_CGROUP_SOCK_OPS
}
BPF_F_ALLOW_MULTI = 2

_MAP_SIZES: dict[str, tuple[int, int]] = {
    "cxe_ifaces": (4, SANDBOX.size),
    "cxe_cgroups": (8, SANDBOX.size),
    "cxe_ports": (PORT_KEY.size, 1),
    "cxe_counters": (COUNT_KEY.size, 8),
    "cxe_ratelimit": (COUNT_KEY.size, 16),
    "cxe_meta": (4, 8),
    "cxe_origdst": (8, ORIG.size),
    "cxe_origpeer": (PEER_KEY.size, ORIG.size),
    "cxe_events": (0, 0),
}


class AttachError(RuntimeError):
    """A sandbox could not be wired (bad settings, missing interface, kernel refusal); the message says which."""


@dataclass(frozen=True)
class SandboxSpec:
    """Settings of one sandbox, as written into the maps.

    ``ports`` are the extra TCP ports the sandbox's policy allows (80 and 443 always apply); TCP to any address
    on them must end at the gateway's transparent listener. A port of 0 means "the gateway has no such service".
    """

    sandbox_id: str
    ip: str
    gateway_ip: str
    mac: str = "00:00:00:00:00:00"
    transparent_port: int = 3129
    proxy_port: int = 3128
    dns_port: int = 53
    ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        raw = self.sandbox_id.encode()
        if not raw or len(raw) >= _build.ID_LEN or b"\0" in raw:
            raise ValueError(f"sandbox id must be 1..{_build.ID_LEN - 1} bytes without NUL: {self.sandbox_id!r}")
        for what, addr in (("ip", self.ip), ("gateway_ip", self.gateway_ip)):
            try:
                ipaddress.IPv4Address(addr)
            except ValueError:
                raise ValueError(f"{what} must be an IPv4 address: {addr!r}") from None
        mac_bytes(self.mac)
        for what, port in (
            ("transparent_port", self.transparent_port),
            ("proxy_port", self.proxy_port),
            ("dns_port", self.dns_port),
        ):
            if not 0 <= port <= 65535:
                raise ValueError(f"{what} out of range: {port}")
        for p in self.ports:
            if not 1 <= p <= 65535:
                raise ValueError(f"policy port out of range: {p}")
        if self.transparent_port == 0:
            raise ValueError("transparent_port is required (redirected TCP must end somewhere)")

    @property
    def redirect_ports(self) -> tuple[int, ...]:
        return tuple(sorted(set(DEFAULT_PORTS) | set(self.ports)))


@dataclass(frozen=True)
class CgroupSandbox:
    path: str
    cgroup_id: int
    value: SandboxValue


@dataclass(frozen=True)
class OriginalDestination:
    """Where a process sandbox's redirected connection was going (recorded at connect time)."""

    ip: str
    port: int
    slot: int
    cookie: int


def cgroup2_root() -> str:
    """Mount point of the cgroup v2 hierarchy (``/sys/fs/cgroup`` or, on hybrid systems, ``.../unified``)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return left.split(" ")[4]
    raise AttachError("no cgroup v2 hierarchy is mounted")


def _ensure_bpffs(root: str) -> None:
    """Mount a bpffs at ``root`` unless one is there (it stays mounted, empty, after the last detach)."""
    os.makedirs(root, exist_ok=True)
    real = os.path.realpath(root)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[1] == real and parts[2] == "bpf":
                return
    import subprocess

    proc = subprocess.run(["mount", "-t", "bpf", "cube-egress-bpf", real], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AttachError(f"no bpffs at {real} and mounting one failed: {proc.stderr.strip()}")


@dataclass
class Enforcer:
    """Shared kernel state of one network namespace. Use :meth:`open`; close with :meth:`close` (or ``with``).

    Closing only drops this process's file descriptors; what stays attached stays enforced. Unpinning happens
    when the last sandbox is detached.
    """

    netns: str | None
    pin_dir: str
    lock_path: str
    prog_fds: dict[str, int] = field(default_factory=dict)
    maps: dict[str, _libbpf.Map] = field(default_factory=dict)
    compiled_now: bool = False

    # -- opening ---------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, netns: str | None = None, *, create: bool = True, pin_root: str = PIN_ROOT) -> Enforcer:
        """Open the namespace's pinned programs and maps; with ``create``, compile and pin them when absent.

        Raises FileNotFoundError when nothing is pinned and ``create`` is false, and
        :class:`~ebpf._build.EnforcementUnavailable` when the kernel cannot run the programs.
        """
        if os.geteuid() != 0:
            raise PermissionError(errno.EPERM, "kernel enforcement needs root")
        key = _net.netns_key(netns)
        os.makedirs(LOCK_DIR, exist_ok=True)
        self = cls(netns, f"{pin_root}/{key}", f"{LOCK_DIR}/{key}.lock")
        with self.locked():
            self._open_locked(create)
        return self

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise changes to the pins and maps across processes."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _pin(self, kind: str, name: str) -> str:
        return f"{self.pin_dir}/{kind}_{name}"

    def _open_locked(self, create: bool) -> None:
        self._close_fds()
        state = self._pinned_state()
        if state == "ok":
            self._open_pins()
            return
        if not create:
            raise FileNotFoundError(errno.ENOENT, f"no cube-egress programs pinned in {self.pin_dir}")
        if state in ("partial", "stale"):
            if self._has_pinned_sandboxes():
                raise AttachError(
                    f"{self.pin_dir} holds {'incomplete' if state == 'partial' else 'another version of'} the "
                    "enforcement programs while sandboxes are attached; detach them (cube-egress sandbox detach) "
                    "or remove the directory by hand"
                )
            self._unpin_all()
        _ensure_bpffs(os.path.dirname(self.pin_dir))
        compiled = _build.compile_and_load()
        try:
            os.makedirs(self.pin_dir, exist_ok=True)
            for name, fd in compiled.prog_fds.items():
                _libbpf.obj_pin(fd, self._pin("prog", name))
            for name, fd in compiled.map_fds.items():
                _libbpf.obj_pin(fd, self._pin("map", name))
        except BaseException:
            compiled.close()
            self._unpin_all()
            raise
        compiled.close()
        self._open_pins()
        self.maps["cxe_meta"].update(struct.pack("<I", 0), struct.pack("<Q", _build.source_hash()))
        self.compiled_now = True

    def _pinned_state(self) -> str:
        if not os.path.isdir(self.pin_dir):
            return "absent"
        expected = {f"prog_{n}" for n in _build.PROGRAMS} | {f"map_{n}" for n in _build.MAPS}
        present = set(os.listdir(self.pin_dir))
        if not expected <= present:
            return "partial" if present else "absent"
        try:
            fd = _libbpf.obj_get(self._pin("map", "cxe_meta"))
        except OSError:
            return "partial"
        meta = _libbpf.Map(fd, 4, 8)
        try:
            raw = meta.lookup(struct.pack("<I", 0))
        finally:
            meta.close()
        if raw is None or struct.unpack("<Q", raw)[0] != _build.source_hash():
            return "stale"
        return "ok"

    def _has_pinned_sandboxes(self) -> bool:
        for name in ("cxe_ifaces", "cxe_cgroups"):
            try:
                fd = _libbpf.obj_get(self._pin("map", name))
            except OSError:
                continue
            m = _libbpf.Map(fd, 4 if name == "cxe_ifaces" else 8, SANDBOX.size)
            try:
                if next(m.keys(), None) is not None:
                    return True
            finally:
                m.close()
        return False

    def _open_pins(self) -> None:
        for name in _build.PROGRAMS:
            self.prog_fds[name] = _libbpf.obj_get(self._pin("prog", name))
        for name in _build.MAPS:
            fd = _libbpf.obj_get(self._pin("map", name))
            key_size, value_size = _MAP_SIZES[name]
            if name != "cxe_events":
                _, _, ks, vs = _libbpf.map_info(fd)
                if (ks, vs) != (key_size, value_size):
                    os.close(fd)
                    raise AttachError(
                        f"pinned map {name} has key/value size {ks}/{vs}, this version expects {key_size}/{value_size}"
                    )
            self.maps[name] = _libbpf.Map(fd, key_size, value_size, percpu=name == "cxe_counters")

    def _unpin_all(self) -> None:
        if os.path.isdir(self.pin_dir):
            for entry in os.listdir(self.pin_dir):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.pin_dir, entry))
            with contextlib.suppress(OSError):
                os.rmdir(self.pin_dir)

    def _close_fds(self) -> None:
        for fd in self.prog_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        for m in self.maps.values():
            with contextlib.suppress(OSError):
                m.close()
        self.prog_fds.clear()
        self.maps.clear()

    def close(self) -> None:
        self._close_fds()

    def __enter__(self) -> Enforcer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return bool(self.maps)

    # -- sandboxes -------------------------------------------------------------------------------------------

    def interfaces(self) -> dict[int, SandboxValue]:
        """Attached interface sandboxes: ifindex -> settings."""
        return {struct.unpack("<I", k)[0]: SandboxValue.unpack(v) for k, v in self.maps["cxe_ifaces"].items()}

    def cgroups(self) -> dict[int, SandboxValue]:
        """Attached cgroup sandboxes: cgroup id -> settings."""
        return {struct.unpack("<Q", k)[0]: SandboxValue.unpack(v) for k, v in self.maps["cxe_cgroups"].items()}

    def _free_slot(self) -> int:
        used = {v.slot for v in self.interfaces().values()} | {v.slot for v in self.cgroups().values()}
        slot = 1
        while slot in used:
            slot += 1
        return slot

    def _write_sandbox(self, spec: SandboxSpec, slot: int, fresh: bool, ifname: str = "") -> SandboxValue:
        ports = self.maps["cxe_ports"]
        if fresh:
            self._forget_slot(slot)
        else:
            for k in list(ports.keys()):
                if PORT_KEY.unpack(k)[0] == slot:
                    ports.delete(k)
        for p in spec.redirect_ports:
            ports.update(PORT_KEY.pack(slot, p, 0), b"\x01")
        return SandboxValue(
            slot=slot,
            sandbox_ip=spec.ip,
            gateway_ip=spec.gateway_ip,
            proxy_port=spec.proxy_port,
            transparent_port=spec.transparent_port,
            dns_port=spec.dns_port,
            mac=spec.mac,
            flags=0,
            sandbox_id=spec.sandbox_id,
            ifname=ifname,
        )

    def _forget_slot(self, slot: int) -> None:
        """Delete the ports, counters and rate-limit state of a slot (a detached or re-used one)."""
        for name, unpack in (
            ("cxe_ports", PORT_KEY.unpack),
            ("cxe_counters", COUNT_KEY.unpack),
            ("cxe_ratelimit", COUNT_KEY.unpack),
        ):
            m = self.maps[name]
            for k in list(m.keys()):
                if unpack(k)[0] == slot:
                    m.delete(k)

    def attach_interface(self, ifname: str, spec: SandboxSpec, *, redirect: bool = True) -> SandboxValue:
        """Guard the host side of a sandbox's tap/veth: settings, nft redirect, then the tc filter.

        Attaching the same interface again replaces its settings (same slot, counters kept).
        """
        if len(ifname.encode()) >= IFNAME_LEN:
            raise AttachError(f"interface name too long: {ifname!r}")
        with self.locked():
            self._open_locked(create=True)
            info = _net.iface_info(self.netns, ifname)
            if info is None:
                raise AttachError(
                    f"no interface {ifname!r}" + (f" in network namespace {self.netns!r}" if self.netns else "")
                )
            if spec.mac == "00:00:00:00:00:00":
                raise AttachError("an interface sandbox needs its MAC address (the sandbox side of the link)")
            self._collect_vanished()
            key = struct.pack("<I", info.index)
            old = self.maps["cxe_ifaces"].lookup(key)
            stale = [i for i, v in self.interfaces().items() if v.ifname == ifname and i != info.index]
            for i in stale:  # same name, new index (the interface was re-created): drop the old entry
                self._drop_interface_entry(i)
            prev = SandboxValue.unpack(old) if old is not None else None
            slot = prev.slot if prev is not None and prev.ifname == ifname else self._free_slot()
            value = self._write_sandbox(spec, slot, fresh=prev is None or prev.slot != slot, ifname=ifname)
            try:
                _net.nft_install_guard(self.netns, _build.MARK)
                if redirect:
                    _net.nft_install(self.netns, ifname, spec.transparent_port, _build.MARK)
                self.maps["cxe_ifaces"].update(key, value.pack())
                _net.attach_filter(self.netns, ifname, self.prog_fds["cxe_tc_guard"], "cxe_tc_guard")
            except BaseException:
                if prev is None:
                    self._detach_interface_locked(ifname)
                raise
            return value

    def _collect_vanished(self) -> None:
        """Forget interfaces and cgroups that no longer exist (a VM's tap or a process sandbox's cgroup removed
        without a detach): their programs went with them, and their entries would otherwise keep the pins alive."""
        present = _net.links(self.netns)
        for ifindex, v in self.interfaces().items():
            if present.get(ifindex) != v.ifname:
                self._drop_interface_entry(ifindex)
        cgroups = self.cgroups()
        if not cgroups:
            return
        try:
            root = cgroup2_root()
        except AttachError:
            return  # cgroupfs not visible here (e.g. under `ip netns exec`): cannot tell, keep everything
        alive = {os.stat(root).st_ino}
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                with contextlib.suppress(OSError):
                    alive.add(os.stat(os.path.join(dirpath, d), follow_symlinks=False).st_ino)
        for cgid, v in cgroups.items():
            if cgid not in alive:  # the cgroup was removed, and its programs with it
                self.maps["cxe_cgroups"].delete(struct.pack("<Q", cgid))
                self._forget_slot(v.slot)

    def _drop_interface_entry(self, ifindex: int) -> None:
        key = struct.pack("<I", ifindex)
        raw = self.maps["cxe_ifaces"].lookup(key)
        if raw is not None:
            self.maps["cxe_ifaces"].delete(key)
            self._forget_slot(SandboxValue.unpack(raw).slot)

    def _detach_interface_locked(self, ifname: str) -> bool:
        removed = _net.detach_filter(self.netns, ifname, "cxe_")
        for ifindex, v in self.interfaces().items():
            if v.ifname == ifname:
                self._drop_interface_entry(ifindex)
                removed = True
        _net.nft_remove(self.netns, ifname)
        return removed

    def detach_interface(self, ifname: str) -> bool:
        """Remove the filter (and clsact when it was ours alone), settings, counters and nft table of an interface.

        True when something was attached. The last detach in the namespace unpins everything.
        """
        with self.locked():
            if self._pinned_state() != "ok":
                # Nothing of ours is pinned; still remove a filter or table a crashed run may have left.
                removed = _net.detach_filter(self.netns, ifname, "cxe_")
                _net.nft_remove(self.netns, ifname)
                return removed
            if not self.maps:
                self._open_pins()
            removed = self._detach_interface_locked(ifname)
            self._collect_vanished()
            self._unpin_if_unused()
            return removed

    def attach_cgroup(self, cgroup: str, spec: SandboxSpec) -> CgroupSandbox:
        """Attach connect4/sendmsg4/connect6/sendmsg6/sockops to a cgroup v2 directory (and its descendants).

        Processes in it can then only reach the gateway: TCP to a redirected port is rewritten to the
        transparent listener (original destination recorded by socket cookie), everything else is refused.
        """
        path = os.path.realpath(cgroup)
        if not os.path.isdir(path):
            raise AttachError(f"no cgroup directory {cgroup!r}")
        cgid = os.stat(path).st_ino  # cgroup v2: the kernfs inode number is the cgroup id
        with self.locked():
            self._open_locked(create=True)
            self._collect_vanished()
            key = struct.pack("<Q", cgid)
            old = self.maps["cxe_cgroups"].lookup(key)
            prev = SandboxValue.unpack(old) if old is not None else None
            slot = prev.slot if prev is not None else self._free_slot()
            value = self._write_sandbox(spec, slot, fresh=prev is None)
            self.maps["cxe_cgroups"].update(key, value.pack())
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for name, atype in ATTACH_TYPES.items():
                    prog_id = _libbpf.prog_info(self.prog_fds[name])[0]
                    if prog_id in _libbpf.prog_query(dfd, atype):
                        continue  # attached before: harmless (the kernel refuses the same program twice)
                    try:
                        _libbpf.prog_attach(self.prog_fds[name], dfd, atype, BPF_F_ALLOW_MULTI)
                    except OSError as e:
                        raise AttachError(f"attaching {name} to {path}: {e}") from e
            except BaseException:
                if prev is None:
                    self._detach_cgroup_locked(path)
                raise
            finally:
                os.close(dfd)
            return CgroupSandbox(path, cgid, value)

    def _detach_cgroup_locked(self, path: str) -> bool:
        removed = False
        if os.path.isdir(path):
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for name, atype in ATTACH_TYPES.items():
                    try:
                        _libbpf.prog_detach(self.prog_fds[name], dfd, atype)
                        removed = True
                    except OSError as e:
                        if e.errno not in (errno.ENOENT, errno.EINVAL):
                            raise
            finally:
                os.close(dfd)
            key = struct.pack("<Q", os.stat(path).st_ino)
            raw = self.maps["cxe_cgroups"].lookup(key)
            if raw is not None:
                self.maps["cxe_cgroups"].delete(key)
                self._forget_slot(SandboxValue.unpack(raw).slot)
                removed = True
        return removed

    def detach_cgroup(self, cgroup: str) -> bool:
        path = os.path.realpath(cgroup)
        with self.locked():
            if self._pinned_state() != "ok":
                return False
            if not self.maps:
                self._open_pins()
            removed = self._detach_cgroup_locked(path)
            self._collect_vanished()
            self._unpin_if_unused()
            return removed

    def forget_cgroup_id(self, cgroup_id: int) -> None:
        """Drop the settings of a cgroup that no longer exists (its programs went with it)."""
        with self.locked():
            if not self.maps:
                return
            key = struct.pack("<Q", cgroup_id)
            raw = self.maps["cxe_cgroups"].lookup(key)
            if raw is not None:
                self.maps["cxe_cgroups"].delete(key)
                self._forget_slot(SandboxValue.unpack(raw).slot)
            self._unpin_if_unused()

    def _unpin_if_unused(self) -> None:
        if self.interfaces() or self.cgroups():
            return
        self._close_fds()
        self._unpin_all()
        _net.nft_remove_guard(self.netns)

    # -- observation ------------------------------------------------------------------------------------------

    def counters(self, slot: int | None = None) -> dict[int, dict[Code, int]]:
        """Packet/call counts by slot and code (summed over CPUs); only ``slot`` when given."""
        out: dict[int, dict[Code, int]] = {}
        m = self.maps["cxe_counters"]
        for k in list(m.keys()):
            s, code = COUNT_KEY.unpack(k)
            if slot is not None and s != slot:
                continue
            values = m.lookup_percpu(k)
            if values is None:
                continue
            total = sum(struct.unpack("<Q", v)[0] for v in values)
            try:
                c = Code(code)
            except ValueError:
                continue
            out.setdefault(s, {})[c] = total
        return out

    def original_destination(
        self, *, cookie: int | None = None, peer: tuple[str, int] | None = None
    ) -> OriginalDestination | None:
        """Where a redirected connection of a process sandbox was going: by the client socket's cookie, or by the
        client's address as the gateway sees it (``peer`` of the accepted connection)."""
        if cookie is not None:
            raw = self.maps["cxe_origdst"].lookup(struct.pack("<Q", cookie))
        elif peer is not None:
            raw = self.maps["cxe_origpeer"].lookup(PEER_KEY.pack(ip4(peer[0]), peer[1], 0))
        else:
            raise TypeError("pass cookie= or peer=")
        if raw is None:
            return None
        daddr, dport, _, slot, _, ck = ORIG.unpack(raw)
        return OriginalDestination(socket.inet_ntoa(daddr), dport, slot, ck)

    def pinned_objects(self) -> list[str]:
        return sorted(os.listdir(self.pin_dir)) if os.path.isdir(self.pin_dir) else []
