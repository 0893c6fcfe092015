"""Guest images: a kernel, an initramfs with busybox, the guest agent and /init, and optionally a root disk.

:func:`build_image` is content addressed: every input (kernel bytes, the module files taken, busybox, the agent's
source, compiler and flags, /init, the CA certificate, the rootfs listing or tarball hash, and this module's own
source) goes into a manifest whose SHA-256 is the image's digest, and the image lives in
``state_dir/images/<digest>/``. A build happens only when that directory is missing; it is made in a temporary
directory beside it and renamed into place, so a reader sees a complete image or none, and two concurrent builds
of the same inputs both succeed (the second rename loses and its copy is discarded).

Layout of an image directory: ``vmlinuz`` (copied, so a kernel upgrade on the host cannot pull it away),
``initrd.img`` (cpio newc, gzip), ``rootfs.qcow2`` (read-only ext4 base, only with ``rootfs=``) and
``manifest.json`` (the inputs, for ``cube-egress image build --json`` and for humans). Compiled agents are cached
in ``state_dir/cache/`` by source, compiler and flags, so images that differ only in their CA share one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ._errors import ImageError
from ._hostbin import HostFile, host_binary_files

__all__ = [
    "AGENT_CFLAGS",
    "BASE_CMDLINE",
    "BASE_MODULES",
    "ROOTFS_MODULES",
    "GuestImage",
    "build_agent",
    "build_image",
    "find_kernel",
    "overlay",
    "resolve_modules",
]

GUEST_DIR = Path(__file__).with_name("guest")
AGENT_SOURCE = GUEST_DIR / "agent.c"
INIT_SCRIPT = GUEST_DIR / "init.sh"

BASE_CMDLINE = "console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz=2100000 ipv6.disable=1"
"""Without tsc_early_khz, TCG boots hang at random after "Marking TSC unstable" (docs/runtime.md). Sandboxes have
no IPv6 (the guard drops every IPv6 frame), so the guest does not send any: no router solicitations or MLD reports
filling the drop reports with noise. A panic reboots at once (panic=-1) by a triple fault (reboot=t): the microvm
machine has no keyboard controller or ACPI reset to rely on, and QEMU runs with -no-reboot, so the VM ends and the
crash is noticed (without reboot=t the default method sometimes hangs there)."""

AGENT_CFLAGS = (
    "-static",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-D_FORTIFY_SOURCE=2",
    "-fstack-protector-strong",
    "-s",
)
AGENT_LIBS = ("-ljansson",)  # JSON headers: a well-tested parser beats a hand-written one on hostile input

BASE_MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_net",
    "net_failover",
    "failover",
    "virtio_console",
    "virtio_blk",
    "virtio_rng",  # optional device; with it the guest CRNG is seeded from the host at boot
)
ROOTFS_MODULES = ("ext4", "overlay")

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
_BOOT = Path("/boot")
_MODULES = Path("/lib/modules")


@dataclass(frozen=True)
class GuestImage:
    """A built image. ``cmdline`` is the base kernel command line; the VM adds ``cube.ip=`` and friends."""

    digest: str
    kernel: Path
    initrd: Path
    rootfs: Path | None
    cmdline: str
    kernel_version: str

    @property
    def path(self) -> Path:
        """The image's directory."""
        return self.initrd.parent


# -- inputs ----------------------------------------------------------------------------------------------------


def _version_key(v: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", v)]


def find_kernel(boot: Path = _BOOT) -> tuple[Path, str]:
    """The newest ``vmlinuz-*-cloud-amd64`` in ``boot`` (else the newest ``vmlinuz-*``) and its version."""
    found = sorted(boot.glob("vmlinuz-*"), key=lambda p: _version_key(p.name.removeprefix("vmlinuz-")))
    cloud = [p for p in found if p.name.endswith("-cloud-amd64")]
    if not found:
        raise ImageError(f"no kernel in {boot}: install linux-image-cloud-amd64 (scripts/setup.sh does)")
    pick = (cloud or found)[-1]
    return pick, pick.name.removeprefix("vmlinuz-")


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base).replace("-", "_")


def resolve_modules(moddir: Path, names: Iterable[str]) -> list[Path]:
    """The module files to load for ``names``, dependencies first; names built into the kernel are skipped."""
    try:
        dep_text = (moddir / "modules.dep").read_text()
    except OSError as e:
        raise ImageError(
            f"cannot read {moddir}/modules.dep ({e.strerror}): is the kernel's module tree installed?"
        ) from None
    builtin: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        builtin = {_module_name(line) for line in (moddir / "modules.builtin").read_text().split()}
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in dep_text.splitlines():
        target, sep, rest = line.partition(":")
        if sep:
            deps[_module_name(target)] = (target, [_module_name(d) for d in rest.split()])
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name not in deps:
            raise ImageError(
                f"kernel module {name} (needed by {' <- '.join(chain) or 'the image'}) is neither "
                f"in {moddir}/modules.dep nor built in"
            )
        seen.add(name)
        for d in deps[name][1]:
            visit(d, (name, *chain))
        order.append(moddir / deps[name][0])

    for n in names:
        visit(n.replace("-", "_"), ())
    return order


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable with no program interpreter (PT_INTERP): it runs without a dynamic loader."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        phoff = int.from_bytes(head[32:40], "little")
        phentsize = int.from_bytes(head[54:56], "little")
        phnum = int.from_bytes(head[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(int.from_bytes(table[i : i + 4], "little") != 3 for i in range(0, len(table), phentsize))


def _find_busybox() -> Path:
    for p in BUSYBOX_CANDIDATES:
        if p.is_file() and _is_static_elf(p):
            return p
    raise ImageError("no statically linked busybox: install busybox-static (scripts/setup.sh does)")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except PermissionError:
        raise ImageError(f"cannot read {path}: run as root (Debian installs kernels mode 0600)") from None
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}") from None
    return h.hexdigest()


def _normalise_ca(ca_cert: Path) -> bytes:
    """The certificates in a PEM file, re-encoded. A file with a private key is refused: the CA's key must never
    be copied into a sandbox (pass mitmproxy-ca-cert.pem, not mitmproxy-ca.pem)."""
    try:
        text = ca_cert.read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ImageError(f"cannot read the CA certificate {ca_cert}: {e}") from None
    if "PRIVATE KEY" in text:
        raise ImageError(f"{ca_cert} contains a private key; pass the CA certificate alone (mitmproxy-ca-cert.pem)")
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", text, re.S)
    if not blocks:
        raise ImageError(f"{ca_cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    out = []
    for b in blocks:
        try:
            der = base64.b64decode("".join(b.split()), validate=True)
        except binascii.Error:
            raise ImageError(f"{ca_cert}: a certificate block is not valid base64") from None
        if len(der) < 64 or der[0] != 0x30:  # DER SEQUENCE
            raise ImageError(f"{ca_cert}: a certificate block is not a DER certificate")
        lines = [base64.b64encode(der)[i : i + 64].decode() for i in range(0, len(base64.b64encode(der)), 64)]
        out.append("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n")
    return "".join(out).encode()


def _compiler_identity() -> dict[str, str]:
    """What else shapes the agent binary: the compiler and the static libraries it links."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageError("gcc is not installed: install gcc libc6-dev libjansson-dev (scripts/setup.sh does)")
    ident = {"gcc": subprocess.run([gcc, "-dumpfullversion"], capture_output=True, text=True).stdout.strip()}
    for lib in ("libc.a", "libjansson.a"):
        out = subprocess.run([gcc, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
        if not out or not os.path.isabs(out) or not os.path.exists(out):
            pkg = "libjansson-dev" if "jansson" in lib else "libc6-dev"
            raise ImageError(f"the static library {lib} is missing: install {pkg} (scripts/setup.sh does)")
        ident[lib] = _sha256_file(Path(out))
    return ident


def _rootfs_identity(rootfs: Path) -> dict[str, Any]:
    if rootfs.is_dir():
        h = hashlib.sha256()
        count = 0
        for entry in _walk(rootfs):
            st = entry.lstat()
            rel = entry.relative_to(rootfs).as_posix()
            link = os.readlink(entry) if stat.S_ISLNK(st.st_mode) else ""
            h.update(
                f"{rel}\0{st.st_mode:o}\0{st.st_uid}:{st.st_gid}\0{st.st_size}\0{st.st_mtime_ns}\0{link}\n".encode(
                    "utf-8", "surrogateescape"
                )
            )
            count += 1
        return {"kind": "directory", "path": str(rootfs), "listing_sha256": h.hexdigest(), "entries": count}
    if rootfs.is_file():
        if not tarfile.is_tarfile(rootfs):
            raise ImageError(f"rootfs {rootfs} is neither a directory nor a tar archive")
        return {"kind": "tarball", "path": str(rootfs), "sha256": _sha256_file(rootfs)}
    raise ImageError(f"rootfs {rootfs} does not exist")


def _walk(top: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            yield base / name


# -- building --------------------------------------------------------------------------------------------------


def build_agent(out: Path, *, build_id: str = "dev") -> Path:
    """Compile the guest agent (static) to ``out``; ``build_id`` is what ``hello`` reports after the version."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageError("gcc is not installed: install gcc libc6-dev libjansson-dev (scripts/setup.sh does)")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", build_id):
        raise ValueError("build_id: 1-64 of [A-Za-z0-9._-]")
    cmd = [gcc, *AGENT_CFLAGS, f'-DCXA_BUILD="{build_id}"', str(AGENT_SOURCE), "-o", str(out), *AGENT_LIBS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"compiling the guest agent failed:\n{proc.stderr.strip()[-4000:]}")
    return out


class _Cpio:
    """A cpio "newc" archive, the initramfs format, written without touching the host's filesystem: entries are
    root-owned with mtime 0, so the same inputs give the same bytes, and device nodes need no privileges."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        if name in self._names:
            raise ImageError(f"initramfs: duplicate entry {name}")
        self._names.add(name)
        raw = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self._out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        self._pad()
        self._out.write(data)
        self._pad()
        self._ino += 1

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def parents(self, name: str) -> None:
        """Directory entries for every missing parent of ``name`` (the kernel's unpacker creates none)."""
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if not self.has(d):
                self.dir(d)

    def has(self, name: str) -> bool:
        return name.strip("/") in self._names

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)  # busybox insmod takes plain .ko files
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        raise ImageError(f"{path}: zstd-compressed modules are not supported (no zstd in the standard library)")
    return data


def _initramfs(
    *,
    busybox: Path,
    agent: Path,
    modules: list[Path],
    ca_pem: bytes | None,
    extra: Sequence[HostFile],
    digest: str,
    cmdline: str,
) -> bytes:
    c = _Cpio()
    for d in (
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "usr/local",
        "usr/local/share",
        "dev",
        "proc",
        "sys",
        "run",
        "etc",
        "etc/ssl",
        "etc/ssl/certs",
        "etc/cube-egress",
        "lib",
        "lib/modules",
        "lib/modules/cube",
        "mnt",
    ):
        c.dir(d)
    c.dir("tmp", 0o1777)
    c.dir("root", 0o700)
    # The kernel opens /dev/console for init before /init can mount devtmpfs.
    c.chardev("dev/console", 5, 1, 0o600)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    # Host programs and their libraries before the applet links, so a program wins over an applet of its name.
    for f in extra:
        c.parents(f.guest_path)
        c.file(f.guest_path, Path(f.source).read_bytes(), 0o755)
    listing = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        raise ImageError(f"{busybox} --list-full failed: {listing.stderr.strip()}")
    for applet in sorted(set(listing.stdout.split())):  # "bin/sh", "sbin/ip", ...: where Debian links them
        if "/" in applet and not applet.startswith("/") and ".." not in applet and not c.has(applet):
            c.symlink(applet, "/bin/busybox")
    c.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    c.file("usr/sbin/cube-agent", agent.read_bytes(), 0o755)
    order = []
    for m in modules:
        name = _module_name(m.name) + ".ko"
        c.file(f"lib/modules/cube/{name}", _module_bytes(m))
        order.append(name)
    c.file("lib/modules/cube/load-order", "".join(f"{n}\n" for n in order).encode())
    c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    c.file("etc/group", b"root:x:0:\n")
    c.file("etc/hosts", b"127.0.0.1\tlocalhost\n")
    c.file("etc/cube-egress/image", f"digest={digest}\ncmdline={cmdline}\n".encode())
    if ca_pem is not None:
        c.dir("usr/local/share/ca-certificates")
        c.file("usr/local/share/ca-certificates/cube-egress.crt", ca_pem)
        # The initramfs has no other trust store: the bundle is the gateway's CA (a rootfs gets it appended).
        c.file("etc/ssl/certs/ca-certificates.crt", ca_pem)
    return gzip.compress(c.finish(), compresslevel=6, mtime=0)


def _mke2fs_reads_tarballs() -> bool:
    proc = subprocess.run(["mkfs.ext4", "-V"], capture_output=True, text=True)
    m = re.search(r"mke2fs (\d+)\.(\d+)(?:\.(\d+))?", proc.stdout + proc.stderr)
    return m is not None and (int(m[1]), int(m[2]), int(m[3] or 0)) >= (1, 47, 1)


def _build_rootfs(src: Path, kind: str, work: Path, out: Path) -> None:
    """An ext4 filesystem made from ``src`` (directory or tarball, ownership kept) as a qcow2 file, read-only."""
    for tool in ("mkfs.ext4", "qemu-img"):
        if shutil.which(tool) is None:
            pkg = "e2fsprogs" if tool == "mkfs.ext4" else "qemu-utils"
            raise ImageError(f"{tool} is not installed: install {pkg} (scripts/setup.sh does)")
    if kind == "tarball" and not _mke2fs_reads_tarballs():
        # e2fsprogs < 1.47.1 (Debian 12) populates only from a directory: unpack with GNU tar, which keeps owners,
        # modes and device nodes only for root, and defers links that point outside the tree until the end.
        if os.geteuid() != 0:
            raise ImageError(
                "a root disk from a tarball needs root here (mkfs.ext4 < 1.47.1 cannot read "
                "tarballs, and unpacking keeps owners only for root); unpack it and pass the directory"
            )
        unpacked = work / "rootfs"
        unpacked.mkdir()
        untar = subprocess.run(
            ["tar", "-xpf", str(src), "-C", str(unpacked), "--numeric-owner"], capture_output=True, text=True
        )
        if untar.returncode != 0:
            raise ImageError(f"unpacking {src} failed: {untar.stderr.strip()[-2000:]}")
        src, kind = unpacked, "directory"
    if kind == "directory":
        sizes = [p.lstat().st_size for p in _walk(src)]
        total, count = sum(sizes), len(sizes)
    else:
        with tarfile.open(src) as tf:
            members = tf.getmembers()
        total, count = sum(m.size for m in members), len(members)
    # Room for metadata and per-file block rounding; the guest mounts it read-only, so no slack for growth.
    size_mib = max(16, (total * 5 // 4 + count * 4096) // (1 << 20) + 16)
    raw = work / "rootfs.ext4"
    mkfs = subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "cube-rootfs",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-N",
            str(count + 1024),
            "-E",
            "root_owner=0:0",
            "-d",
            str(src),
            str(raw),
            f"{size_mib}M",
        ],
        capture_output=True,
        text=True,
    )
    if mkfs.returncode != 0:
        raise ImageError(f"mkfs.ext4 -d {src} failed: {mkfs.stderr.strip()[-2000:]}")
    if src.parent == work:
        shutil.rmtree(src)
    conv = subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], capture_output=True, text=True
    )
    raw.unlink()
    if conv.returncode != 0:
        raise ImageError(f"qemu-img convert failed: {conv.stderr.strip()}")
    out.chmod(0o444)


def _cached_agent(state_dir: Path, identity: dict[str, Any], tmp: Path, say: Callable[[str], None]) -> Path:
    """The agent binary for these inputs, compiled once per source/compiler/flags (images differing only in, say,
    the CA certificate share it): ``state_dir/cache/cube-agent-<key>``."""
    key = hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
    cached = state_dir / "cache" / f"cube-agent-{key}"
    if not cached.is_file():
        say("compiling the guest agent")
        cached.parent.mkdir(parents=True, exist_ok=True)
        built = build_agent(tmp / "cube-agent", build_id=identity["source_sha256"][:12])
        os.replace(built, cached)  # atomic: a concurrent build sees the old state or a complete binary
    return cached


def _image_from_dir(path: Path, digest: str) -> GuestImage | None:
    try:
        manifest = orjson.loads((path / "manifest.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    rootfs = path / "rootfs.qcow2" if manifest.get("rootfs") else None
    for p in (path / "vmlinuz", path / "initrd.img", rootfs):
        if p is not None and not p.is_file():
            return None
    return GuestImage(
        digest=digest,
        kernel=path / "vmlinuz",
        initrd=path / "initrd.img",
        rootfs=rootfs,
        cmdline=str(manifest["cmdline"]),
        kernel_version=str(manifest["kernel"]["version"]),
    )


def build_image(
    state_dir: Path,
    *,
    ca_cert: Path | None = None,
    rootfs: Path | None = None,
    extra_binaries: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> GuestImage:
    """The image for these inputs, built only if ``state_dir/images/<digest>/`` does not hold it yet.

    ``ca_cert``: PEM certificate(s) the guest trusts (the gateway's CA). ``rootfs``: a directory or tar archive
    that becomes the guest's root (read-only ext4 under a tmpfs overlay); without it the guest runs from the
    initramfs (busybox only). ``extra_binaries``: host programs (names on PATH or absolute paths) copied to
    ``/usr/bin/<name>`` in the initramfs with every library ``ldd`` lists for them, e.g. ``("curl",)``; for
    initramfs-only images (a root disk brings its own programs). Raises :class:`~hypervisor.ImageError` naming
    the missing input or failing step.
    """
    say = progress or (lambda _msg: None)
    state_dir = Path(state_dir).absolute()  # QEMU gets these paths; they must not depend on a later chdir
    kernel, version = find_kernel()
    moddir = _MODULES / version
    names = BASE_MODULES + (ROOTFS_MODULES if rootfs is not None else ())
    modules = resolve_modules(moddir, names)
    busybox = _find_busybox()
    ca_pem = _normalise_ca(Path(ca_cert)) if ca_cert is not None else None
    rootfs_id = _rootfs_identity(Path(rootfs).resolve()) if rootfs is not None else None
    cmdline = BASE_CMDLINE + (" cube.root=/dev/vda" if rootfs is not None else "")
    if extra_binaries and rootfs is not None:
        raise ImageError("extra_binaries go into the initramfs, which a root disk replaces: put them in the rootfs")
    if isinstance(extra_binaries, str):
        raise ImageError("extra_binaries is a sequence of program names, not one string")
    extra = host_binary_files(list(extra_binaries))
    agent_src = AGENT_SOURCE.read_bytes()
    manifest: dict[str, Any] = {
        "format": 1,
        "builder_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "kernel": {"path": str(kernel), "version": version, "sha256": _sha256_file(kernel)},
        "modules": {str(m.relative_to(moddir)): _sha256_file(m) for m in modules},
        "busybox": {"path": str(busybox), "sha256": _sha256_file(busybox)},
        "agent": {
            "source_sha256": hashlib.sha256(agent_src).hexdigest(),
            "cflags": list(AGENT_CFLAGS),
            "libs": list(AGENT_LIBS),
            **_compiler_identity(),
        },
        "init_sha256": hashlib.sha256(INIT_SCRIPT.read_bytes()).hexdigest(),
        "ca_sha256": hashlib.sha256(ca_pem).hexdigest() if ca_pem is not None else None,
        "rootfs": rootfs_id,
        "extra_files": {f.guest_path: _sha256_file(Path(f.source)) for f in extra},
        "extra_sources": {f.guest_path: f.source for f in extra},
        "cmdline": cmdline,
    }
    # Paths are recorded for humans but are not inputs: the same bytes elsewhere are the same image.
    keyed = {
        **manifest,
        "kernel": {k: v for k, v in manifest["kernel"].items() if k != "path"},
        "busybox": manifest["busybox"]["sha256"],
        "rootfs": {k: v for k, v in rootfs_id.items() if k != "path"} if rootfs_id else None,
        "extra_sources": None,
    }
    digest = hashlib.sha256(orjson.dumps(keyed, option=orjson.OPT_SORT_KEYS)).hexdigest()
    images = state_dir / "images"
    final = images / digest
    existing = _image_from_dir(final, digest)
    if existing is not None:
        say(f"image {digest[:12]} is up to date")
        return existing
    if final.exists():  # incomplete or damaged: build it again
        shutil.rmtree(final)

    images.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=images))
    try:
        say(f"building image {digest[:12]} (kernel {version})")
        agent = _cached_agent(state_dir, manifest["agent"], tmp, say)
        say(f"writing the initramfs ({len(modules)} modules)")
        (tmp / "initrd.img").write_bytes(
            _initramfs(
                busybox=busybox,
                agent=agent,
                modules=modules,
                ca_pem=ca_pem,
                extra=extra,
                digest=digest,
                cmdline=cmdline,
            )
        )
        shutil.copyfile(kernel, tmp / "vmlinuz")
        if rootfs is not None and rootfs_id is not None:
            say(f"building the root disk from {rootfs}")
            _build_rootfs(Path(rootfs), rootfs_id["kind"], tmp, tmp / "rootfs.qcow2")
        (tmp / "manifest.json").write_bytes(orjson.dumps({**manifest, "digest": digest}, option=orjson.OPT_INDENT_2))
        tmp.chmod(0o755)
        try:
            tmp.rename(final)
        except OSError:
            if _image_from_dir(final, digest) is None:
                raise
            say("another build finished first; using it")
    except OSError as e:
        raise ImageError(f"building image {digest[:12]} failed: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    image = _image_from_dir(final, digest)
    if image is None:
        raise ImageError(f"image {final} is incomplete after the build")
    say(f"image {digest[:12]} ready in {final}")
    return image


def overlay(image: GuestImage, path: Path) -> Path:
    """Create a qcow2 overlay at ``path`` whose backing file is the image's root disk (one per VM)."""
    if image.rootfs is None:
        raise ImageError(f"image {image.digest[:12]} has no root disk (build it with rootfs=)")
    path = Path(path)
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.rootfs.resolve()), str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ImageError(f"qemu-img create {path} failed: {proc.stderr.strip()}")
    return path
