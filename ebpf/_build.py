"""Compiling and loading the BPF programs with bcc, and saying precisely why that cannot work on this machine."""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from . import reasons

__all__ = [
    "CONSTANTS",
    "MARK",
    "PROGRAMS",
    "Compiled",
    "EnforcementUnavailable",
    "compile_and_load",
    "source",
    "source_hash",
    "unavailable_reason",
]

SOURCE_FILE = Path(__file__).with_name("guard.bpf.c")

MARK = 0x43584501
"""skb->mark the tc program sets on TCP it lets through for the transparent listener ("CXE" 01). The nft
redirect takes exactly these packets; the nft forward rule drops any that were not redirected."""

ID_LEN = 64
"""Bytes reserved for a sandbox id in maps and events (ids are at most ID_LEN - 1 bytes of UTF-8)."""

CONSTANTS: dict[str, int] = {
    "CXE_MARK": MARK,
    "CXE_ID_LEN": ID_LEN,
    "CXE_MAX_SANDBOXES": 4096,
    "CXE_MAX_PORTS": 65536,
    "CXE_MAX_COUNTERS": 16384,
    "CXE_MAX_ORIGDST": 65536,
    "CXE_RINGBUF_PAGES": 64,  # 256 KiB of drop reports
    "CXE_EVENTS_PER_SEC": 50,  # per (sandbox, reason); counters stay exact
    "CXE_MAX_CG_DEPTH": 16,
}

# program name -> (bcc program type name, attach type name or None). Names are the kernel's program names
# (at most 15 bytes), all prefixed cxe_ so bpftool shows what is ours.
PROGRAMS: dict[str, tuple[str, str | None]] = {
    "cxe_tc_guard": ("SCHED_CLS", None),
    "cxe_connect4": ("CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),
    "cxe_sendmsg4": ("CGROUP_SOCK_ADDR", "CGROUP_UDP4_SENDMSG"),
    "cxe_connect6": ("CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT"),
    "cxe_sendmsg6": ("CGROUP_SOCK_ADDR", "CGROUP_UDP6_SENDMSG"),
    "cxe_sockops": ("SOCK_OPS", "CGROUP_SOCK_OPS"),
}

MAPS = (
    "cxe_ifaces",
    "cxe_cgroups",
    "cxe_ports",
    "cxe_counters",
    "cxe_ratelimit",
    "cxe_meta",
    "cxe_origdst",
    "cxe_origpeer",
    "cxe_events",
)


class EnforcementUnavailable(RuntimeError):
    """The kernel programs cannot be compiled or loaded here; the message says which part is missing."""


def source() -> str:
    """The complete C text bcc compiles: generated constants and code enum, then guard.bpf.c."""
    head = [f"#define {k} {v}" for k, v in CONSTANTS.items()]
    head.append("#define CXE_HTONL_FFFF " + ("0xFFFF0000" if _little_endian() else "0x0000FFFF"))
    return "\n".join(head) + "\n" + reasons.c_enum() + SOURCE_FILE.read_text()


def _little_endian() -> bool:
    import sys

    return sys.byteorder == "little"


@cache
def source_hash() -> int:
    """64-bit hash of the compiled source: pinned objects from another version are never mixed with this one."""
    return int.from_bytes(hashlib.sha256(source().encode()).digest()[:8], "little")


def _import_bcc() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # bcc 0.26 has invalid escapes that 3.12 warns about
        return importlib.import_module("bcc")


def unavailable_reason() -> str | None:
    """None when this machine can compile and load the programs; otherwise what is missing and how to fix it.

    Cheap checks first (root, bcc importable, kernel headers), then one real compile and load.
    """
    if os.geteuid() != 0:
        return "loading BPF programs needs root (CAP_BPF and CAP_NET_ADMIN)"
    try:
        _import_bcc()
    except ImportError as e:
        return (
            f"bcc is not importable ({e}); install python3-bpfcc (Debian) and run scripts/setup.sh, which links "
            "it into the virtualenv"
        )
    missing = _headers_problem()
    if missing:
        return missing
    try:
        compiled = compile_and_load()
    except EnforcementUnavailable as e:
        return str(e)
    compiled.close()
    return None


def _headers_problem() -> str | None:
    release = platform.release()
    build = Path("/lib/modules") / release / "build"
    if not (build / "include").is_dir():
        return (
            f"no kernel headers for {release} at {build}: install linux-headers-amd64 and link "
            f"{build} to /usr/src/linux-headers-<version>-amd64 (scripts/setup.sh does this)"
        )
    return None


@dataclass
class Compiled:
    """Loaded programs and maps (file descriptors owned by the bcc module until :meth:`close`)."""

    bpf: Any
    prog_fds: dict[str, int]
    map_fds: dict[str, int]

    def close(self) -> None:
        self.bpf.cleanup()


def compile_and_load() -> Compiled:
    """Compile guard.bpf.c with bcc and load every program (~0.5 s). Raises EnforcementUnavailable with the
    compiler's or verifier's message when the kernel cannot run them."""
    missing = _headers_problem()
    if missing:
        raise EnforcementUnavailable(missing)
    bcc = _import_bcc()
    try:
        b = bcc.BPF(text=source().encode(), cflags=["-Wno-unused-function"])
    except Exception as e:  # bcc raises bare Exception on compile errors
        raise EnforcementUnavailable(
            f"bcc could not compile the enforcement programs on kernel {platform.release()}: {e}"
        ) from e
    prog_fds: dict[str, int] = {}
    try:
        for name, (ptype, atype) in PROGRAMS.items():
            kw: dict[str, Any] = {}
            if atype is not None:
                kw["attach_type"] = getattr(bcc.BPFAttachType, atype)
            fn = b.load_func(name.encode(), getattr(bcc.BPF, ptype), **kw)
            prog_fds[name] = fn.fd
        map_fds = {name: b[name.encode()].map_fd for name in MAPS}
    except Exception as e:
        b.cleanup()
        raise EnforcementUnavailable(f"the kernel {platform.release()} refused the enforcement programs: {e}") from e
    return Compiled(b, prog_fds, map_fds)
