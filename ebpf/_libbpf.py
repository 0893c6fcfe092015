"""The few libbpf calls the runtime needs (pins, map elements, cgroup attach, ring buffer), through ctypes.

bcc is needed only to compile; every later step (another process attaching a sandbox, `verify`, the gateway
reading drop reports) works on pinned objects through Debian's libbpf (libbpf1, a dependency of iproute2).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from collections.abc import Callable, Iterator
from functools import cache

__all__ = [
    "BpfError",
    "Map",
    "RingBuffer",
    "lib",
    "map_info",
    "obj_get",
    "obj_pin",
    "possible_cpus",
    "prog_attach",
    "prog_detach",
    "prog_info",
    "prog_query",
]


class BpfError(OSError):
    pass


def _err(what: str, rc: int) -> BpfError:
    code = -rc if rc < 0 else ctypes.get_errno() or errno.EIO
    return BpfError(code, f"{what}: {os.strerror(code)}")


class _ProgInfo(ctypes.Structure):
    # struct bpf_prog_info, the prefix we read (the kernel fills at most info_len bytes).
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class _MapInfo(ctypes.Structure):
    # struct bpf_map_info, the prefix we read.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


_RB_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


@cache
def lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        so = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise BpfError(errno.ENOENT, f"libbpf not found ({e}); install libbpf1") from e
    so.bpf_obj_get.argtypes = [ctypes.c_char_p]
    so.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    so.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    so.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
    so.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
    so.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    so.bpf_prog_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
    so.bpf_prog_detach2.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    so.bpf_prog_query.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
    ]
    so.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    so.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    so.ring_buffer__new.argtypes = [ctypes.c_int, _RB_CB, ctypes.c_void_p, ctypes.c_void_p]
    so.ring_buffer__new.restype = ctypes.c_void_p
    so.ring_buffer__consume.argtypes = [ctypes.c_void_p]
    so.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
    so.ring_buffer__free.argtypes = [ctypes.c_void_p]
    so.ring_buffer__epoll_fd.argtypes = [ctypes.c_void_p]
    return so


def obj_get(path: str) -> int:
    """Open a pinned program or map; raises FileNotFoundError when nothing is pinned there."""
    fd = int(lib().bpf_obj_get(path.encode()))
    if fd < 0:
        e = _err(f"bpf_obj_get({path})", fd)
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, f"nothing pinned at {path}")
        raise e
    return fd


def obj_pin(fd: int, path: str) -> None:
    rc = int(lib().bpf_obj_pin(fd, path.encode()))
    if rc < 0:
        raise _err(f"bpf_obj_pin({path})", rc)


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int) -> None:
    rc = int(lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags))
    if rc < 0:
        raise _err("bpf_prog_attach", rc)


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    rc = int(lib().bpf_prog_detach2(prog_fd, target_fd, attach_type))
    if rc < 0:
        raise _err("bpf_prog_detach2", rc)


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to a cgroup for one attach type."""
    ids = (ctypes.c_uint32 * 64)()
    cnt = ctypes.c_uint32(64)
    flags = ctypes.c_uint32(0)
    rc = int(lib().bpf_prog_query(target_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(cnt)))
    if rc < 0:
        raise _err("bpf_prog_query", rc)
    return list(ids[: cnt.value])


def prog_info(fd: int) -> tuple[int, str, str]:
    """(id, name, tag hex) of a loaded program."""
    info = _ProgInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    rc = int(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)))
    if rc < 0:
        raise _err("bpf_obj_get_info_by_fd", rc)
    return int(info.id), info.name.decode(errors="replace"), bytes(info.tag).hex()


def map_info(fd: int) -> tuple[int, str, int, int]:
    """(id, name, key size, value size) of a map."""
    info = _MapInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    rc = int(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)))
    if rc < 0:
        raise _err("bpf_obj_get_info_by_fd", rc)
    return int(info.id), info.name.decode(errors="replace"), int(info.key_size), int(info.value_size)


def prog_fd_by_id(prog_id: int) -> int:
    fd = int(lib().bpf_prog_get_fd_by_id(prog_id))
    if fd < 0:
        raise _err(f"bpf_prog_get_fd_by_id({prog_id})", fd)
    return fd


@cache
def possible_cpus() -> int:
    """Number of possible CPUs (the value count of a per-CPU map)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += (int(hi) if hi else int(lo)) - int(lo) + 1
    return total


class Map:
    """One map by fd, with fixed-size bytes keys and values (``value_size`` is per CPU for per-CPU maps)."""

    def __init__(self, fd: int, key_size: int, value_size: int, percpu: bool = False) -> None:
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.percpu = percpu
        self._stride = (value_size + 7) & ~7
        self._buf_size = self._stride * possible_cpus() if percpu else value_size

    def lookup(self, key: bytes) -> bytes | None:
        assert len(key) == self.key_size, (len(key), self.key_size)
        buf = ctypes.create_string_buffer(self._buf_size)
        rc = int(lib().bpf_map_lookup_elem(self.fd, key, buf))
        if rc < 0:
            e = _err("bpf_map_lookup_elem", rc)
            if e.errno == errno.ENOENT:
                return None
            raise e
        return buf.raw

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        raw = self.lookup(key)
        if raw is None:
            return None
        return [raw[i : i + self.value_size] for i in range(0, len(raw), self._stride)]

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        assert len(key) == self.key_size, (len(key), self.key_size)
        if self.percpu and len(value) == self.value_size:
            value = (value + bytes(self._stride - self.value_size)) * possible_cpus()
        assert len(value) == self._buf_size, (len(value), self._buf_size)
        rc = int(lib().bpf_map_update_elem(self.fd, key, value, flags))
        if rc < 0:
            raise _err("bpf_map_update_elem", rc)

    def delete(self, key: bytes) -> bool:
        rc = int(lib().bpf_map_delete_elem(self.fd, key))
        if rc < 0:
            e = _err("bpf_map_delete_elem", rc)
            if e.errno == errno.ENOENT:
                return False
            raise e
        return True

    def keys(self) -> Iterator[bytes]:
        cur: bytes | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            rc = int(lib().bpf_map_get_next_key(self.fd, cur, nxt))
            if rc < 0:
                return
            cur = nxt.raw
            yield cur

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RingBuffer:
    """A BPF ring buffer map read with libbpf: :meth:`consume` never blocks; :meth:`fileno` is pollable."""

    def __init__(self, map_fd: int, on_record: Callable[[bytes], None]) -> None:
        self._on_record = on_record

        def cb(_ctx: int | None, data: int | None, size: int) -> int:
            if data:
                try:
                    self._on_record(ctypes.string_at(data, size))
                except Exception:  # an exception cannot cross into C; report it and go on
                    logging.getLogger("cube_egress.ebpf").exception("bad drop report")
            return 0

        self._cb = _RB_CB(cb)  # keep a reference: libbpf calls it
        ptr = lib().ring_buffer__new(map_fd, self._cb, None, None)
        if not ptr:
            raise _err("ring_buffer__new", -(ctypes.get_errno() or errno.EIO))
        self._rb: int | None = int(ptr)

    def fileno(self) -> int:
        assert self._rb is not None
        return int(lib().ring_buffer__epoll_fd(self._rb))

    def consume(self) -> int:
        assert self._rb is not None
        return int(lib().ring_buffer__consume(self._rb))

    def poll(self, timeout_ms: int) -> int:
        assert self._rb is not None
        return int(lib().ring_buffer__poll(self._rb, timeout_ms))

    def close(self) -> None:
        if self._rb is not None:
            lib().ring_buffer__free(self._rb)
            self._rb = None
