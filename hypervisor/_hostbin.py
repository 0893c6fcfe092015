"""Host binaries for the guest: a program and every shared library the dynamic loader would map for it.

The guest initramfs has only busybox-static and our agent. For a realistic agent workload (a real `curl` speaking
TLS through the gateway, with the gateway's CA in the guest trust store) we copy host programs into the image
together with their libraries, as initramfs generators (dracut, mkinitramfs) do. `ldd` is the loader's own
answer to "what would be mapped", so it is used rather than parsing ELF dynamic sections ourselves.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._errors import ImageError

__all__ = ["HostFile", "host_binary_files", "total_size"]

# "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
_LDD_LINE = re.compile(r"^\s*(?:(?P<name>\S+)\s+=>\s+)?(?P<path>/\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_MISSING = re.compile(r"^\s*(?P<name>\S+)\s+=>\s+not found\s*$")


@dataclass(frozen=True)
class HostFile:
    """A file to copy from the host (`source`) to the same absolute path in the guest (`guest_path`)."""

    source: str
    guest_path: str


def _resolve_program(name: str) -> str:
    path = name if os.sep in name else shutil.which(name)
    if path is None or not os.path.isfile(path):
        raise ImageError(f"extra binary {name!r}: not found on this host (install it, or give an absolute path)")
    return os.path.realpath(path)


def _shared_libraries(program: str) -> list[str]:
    try:
        out = subprocess.run(["ldd", program], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ImageError(f"cannot list the libraries of {program}: {e}") from e
    if out.returncode != 0:
        if "not a dynamic executable" in (out.stdout + out.stderr):
            return []  # static: nothing else to copy
        raise ImageError(f"ldd {program} failed: {out.stderr.strip() or out.stdout.strip()}")
    libs: list[str] = []
    for line in out.stdout.splitlines():
        if _LDD_MISSING.match(line):
            raise ImageError(f"{program}: library {line.split()[0]} is not installed on this host")
        m = _LDD_LINE.match(line)
        if m:
            libs.append(m.group("path"))
    return libs


def host_binary_files(programs: Sequence[str]) -> list[HostFile]:
    """Every file to copy for `programs`: each program (to /usr/bin/<name>) and its libraries (same path).

    Symlinked libraries are copied as the file they point to, under the name the loader looks for. The result is
    sorted and free of duplicates, so an image digest over it is stable.
    """
    files: dict[str, str] = {}
    for name in programs:
        program = _resolve_program(name)
        files[f"/usr/bin/{os.path.basename(name)}"] = program
        for lib in _shared_libraries(program):
            files.setdefault(lib, os.path.realpath(lib))
            # The loader is found by its PT_INTERP path (e.g. /lib64/ld-linux-x86-64.so.2), which ldd prints.
    return [HostFile(source=src, guest_path=dst) for dst, src in sorted(files.items())]


def total_size(files: Iterable[HostFile]) -> int:
    return sum(os.path.getsize(f.source) for f in files)
