"""Guest images: content addressing, what the initramfs holds, root disks and overlays, and one real boot.

The boot (marked ``qemu``) runs plain qemu-system-x86_64 (microvm, TCG) on the image, talks to the real agent over
the virtio-serial port, and checks the guest from the inside. It is the only boot here (TCG boots take seconds).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import ssl
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import trustme

from hypervisor._errors import AgentError, ImageError
from hypervisor.agent import AgentClient, qemu_agent_args
from hypervisor.image import GuestImage, _mke2fs_reads_tarballs, build_image, find_kernel, overlay


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    try:
        kernel, _ = find_kernel()
    except ImageError as e:
        pytest.skip(f"no guest kernel: {e}")
    if not os.access(kernel, os.R_OK):
        pytest.skip(f"cannot read {kernel} (Debian installs kernels mode 0600: run as root)")


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA(organization_name="cube-egress test CA").cert_pem.write_to_path(str(path))
    return path


def _der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def _cpio_list(initrd: Path) -> dict[str, str]:
    """name -> `ls -l` mode string, listed by GNU cpio (an independent reader of our writer's output)."""
    data = subprocess.run(["gzip", "-dc", str(initrd)], capture_output=True, check=True).stdout
    out = subprocess.run(["cpio", "-itv", "--quiet"], input=data, capture_output=True, check=True).stdout.decode()
    entries = {}
    for line in out.splitlines():
        fields = line.split()
        name = fields[-3] if fields[-2] == "->" else fields[-1]
        entries[name] = fields[0]
    return entries


def _cpio_read(initrd: Path, name: str) -> bytes:
    data = subprocess.run(["gzip", "-dc", str(initrd)], capture_output=True, check=True).stdout
    return subprocess.run(
        ["cpio", "-i", "--quiet", "--to-stdout", name], input=data, capture_output=True, check=True
    ).stdout


def test_build_is_content_addressed(state_dir: Path, ca_pem: Path, tmp_path: Path) -> None:
    said: list[str] = []
    first = build_image(state_dir, ca_cert=ca_pem, progress=said.append)
    assert any(m.startswith(f"building image {first.digest[:12]}") for m in said)
    assert first.initrd.parent == state_dir / "images" / first.digest
    assert first.cmdline == "console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz=2100000 ipv6.disable=1"
    assert first.rootfs is None
    before = first.initrd.stat()

    said.clear()
    again = build_image(state_dir, ca_cert=ca_pem, progress=said.append)
    assert again == first
    assert said == [f"image {first.digest[:12]} is up to date"]
    after = first.initrd.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    other_ca = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    changed = build_image(state_dir, ca_cert=other_ca)
    without = build_image(state_dir)
    assert len({first.digest, changed.digest, without.digest}) == 3
    assert first.initrd.is_file()  # the earlier image stays
    manifest = orjson.loads((changed.initrd.parent / "manifest.json").read_bytes())
    assert manifest["digest"] == changed.digest
    assert manifest["kernel"]["version"] == changed.kernel_version
    assert not [p for p in (state_dir / "images").iterdir() if p.name.startswith(".")]  # no build leftovers


def test_cli_image_build(state_dir: Path, ca_pem: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["image", "build", "--state-dir", str(state_dir), "--ca-cert", str(ca_pem), "--json", "-q"]) == 0
    out = orjson.loads(capsys.readouterr().out)
    image = build_image(state_dir, ca_cert=ca_pem)
    assert out["digest"] == image.digest
    assert out["initrd"] == str(image.initrd)
    assert main(["image", "build", "--state-dir", str(state_dir), "--ca-cert", str(state_dir / "missing.pem")]) == 1
    assert "cannot read the CA certificate" in capsys.readouterr().err


def test_a_ca_file_with_a_private_key_is_refused(state_dir: Path, tmp_path: Path) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca-and-key.pem"
    bundle.write_bytes(ca.cert_pem.bytes() + ca.private_key_pem.bytes())
    listing = sorted(os.listdir(state_dir / "images")) if (state_dir / "images").exists() else []
    with pytest.raises(ImageError, match="private key"):
        build_image(state_dir, ca_cert=bundle)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ImageError, match="no PEM certificate"):
        build_image(state_dir, ca_cert=garbage)
    assert (sorted(os.listdir(state_dir / "images")) if (state_dir / "images").exists() else []) == listing


def test_initramfs_contents(state_dir: Path, ca_pem: Path) -> None:
    image = build_image(state_dir, ca_cert=ca_pem)
    entries = _cpio_list(image.initrd)
    assert entries["init"].startswith("-rwxr-xr-x")
    assert entries["bin/busybox"].startswith("-rwxr-xr-x")
    assert entries["usr/sbin/cube-agent"].startswith("-rwxr-xr-x")
    assert entries["bin/sh"].startswith("l")  # applet links
    assert entries["sbin/ip"].startswith("l")
    assert entries["dev/console"].startswith("c")  # the kernel opens it for init before devtmpfs exists
    order = _cpio_read(image.initrd, "lib/modules/cube/load-order").decode().split()
    for m in order:
        assert f"lib/modules/cube/{m}" in entries
    names = [m.removesuffix(".ko") for m in order]
    for needed in (
        "virtio",
        "virtio_ring",
        "virtio_mmio",
        "virtio_net",
        "net_failover",
        "failover",
        "virtio_console",
        "virtio_blk",
    ):
        assert needed in names
    # dependencies load first
    assert names.index("virtio_ring") < names.index("virtio") < names.index("virtio_mmio")
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")
    assert "overlay" not in names  # only with a root disk
    bundle = _cpio_read(image.initrd, "etc/ssl/certs/ca-certificates.crt")
    assert _der(bundle) == _der(ca_pem.read_bytes())
    assert _cpio_read(image.initrd, "usr/local/share/ca-certificates/cube-egress.crt") == bundle
    assert f"digest={image.digest}" in _cpio_read(image.initrd, "etc/cube-egress/image").decode()


def test_extra_binaries_come_with_their_libraries(state_dir: Path, tmp_path: Path) -> None:
    dash = shutil.which("dash")
    if dash is None:
        pytest.skip("needs dash (a small dynamically linked program; Debian always has it)")
    image = build_image(state_dir, extra_binaries=("dash",))
    assert image.digest != build_image(state_dir).digest
    entries = _cpio_list(image.initrd)
    assert entries["usr/bin/dash"].startswith("-rwxr-xr-x")
    assert _cpio_read(image.initrd, "usr/bin/dash") == Path(dash).read_bytes()
    ldd = subprocess.run(["ldd", dash], capture_output=True, text=True, check=True).stdout
    libs = [w for w in ldd.split() if w.startswith("/")]
    assert any("libc.so" in p for p in libs) and any("ld-linux" in p for p in libs)
    for lib in libs:
        assert lib.lstrip("/") in entries, lib
        assert entries[os.path.dirname(lib.lstrip("/"))].startswith("d")  # parents exist in the archive
    with pytest.raises(ImageError, match="root disk"):
        build_image(state_dir, extra_binaries=("dash",), rootfs=tmp_path)
    with pytest.raises(ImageError, match="not found"):
        build_image(state_dir, extra_binaries=("cube-egress-no-such-program",))


def test_tarball_root_disk_keeps_owners_and_modes(state_dir: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0 and not _mke2fs_reads_tarballs():
        pytest.skip("a root disk from a tarball needs root with mkfs.ext4 < 1.47.1")
    tar_path = tmp_path / "root.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        for name, data, mode, uid in [
            ("etc/marker", b"from the tarball\n", 0o644, 0),
            ("usr/bin/tool", b"#!/bin/sh\n", 0o4755, 1234),
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), mode, uid, uid
            tf.addfile(info, io.BytesIO(data))
    image = build_image(state_dir, rootfs=tar_path)
    assert image.rootfs is not None
    assert image.rootfs.stat().st_mode & 0o777 == 0o444
    assert "cube.root=/dev/vda" in image.cmdline.split()
    assert build_image(state_dir, rootfs=tar_path).digest == image.digest

    raw = tmp_path / "root.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image.rootfs), str(raw)], check=True)
    cat = subprocess.run(["debugfs", "-R", "cat /etc/marker", str(raw)], capture_output=True, check=True)
    assert cat.stdout == b"from the tarball\n"
    st = subprocess.run(["debugfs", "-R", "stat /usr/bin/tool", str(raw)], capture_output=True, check=True)
    text = st.stdout.decode()
    assert "User:  1234" in text
    assert "Mode:  04755" in text


def test_overlay_is_backed_by_the_base(state_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "marker").write_text("dir\n")
    image = build_image(state_dir, rootfs=root)
    assert image.rootfs is not None
    ov = overlay(image, tmp_path / "vm1.qcow2")
    info = orjson.loads(
        subprocess.run(["qemu-img", "info", "--output=json", str(ov)], capture_output=True, check=True).stdout
    )
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(image.rootfs.resolve())
    assert info["backing-filename-format"] == "qcow2"
    with pytest.raises(ImageError, match="no root disk"):
        overlay(build_image(state_dir), tmp_path / "vm2.qcow2")


# -- one real boot -----------------------------------------------------------------------------------------------


def _rootfs_with_busybox(root: Path) -> Path:
    """A tiny root: busybox with its applets, a trust store to append to, a marker."""
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            (root / "bin" / a).symlink_to("busybox")
    (root / "etc" / "ssl" / "certs").mkdir(parents=True)
    (root / "etc" / "ssl" / "certs" / "ca-certificates.crt").write_text("# the root disk's own bundle\n")
    (root / "etc" / "marker").write_text("from the root disk\n")
    return root


Booted = tuple[GuestImage, AgentClient, Path, list["subprocess.Popen[bytes]"]]


@pytest.fixture
def booted(state_dir: Path, ca_pem: Path, tmp_path: Path) -> Iterator[Booted]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86_64 (TCG; install qemu-system-x86)")
    image = build_image(state_dir, ca_cert=ca_pem, rootfs=_rootfs_with_busybox(tmp_path / "root"))
    assert image.rootfs is not None
    disk = overlay(image, tmp_path / "disk.qcow2")
    sock = tmp_path / "agent.sock"
    serial = tmp_path / "serial.log"
    append = f"{image.cmdline} cube.ip=192.0.2.15/24 cube.gw=192.0.2.1 cube.dns=192.0.2.53"
    cmd = [
        "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-nodefaults", "-no-user-config", "-nographic",
        "-serial", f"file:{serial}", "-m", "256",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
        *qemu_agent_args(sock),
        "-drive", f"file={disk},format=qcow2,if=none,id=root0", "-device", "virtio-blk-device,drive=root0",
        # a NIC on a hub with no other port: eth0 exists, and nothing it sends goes anywhere
        "-netdev", "hubport,id=n0,hubid=0", "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
        "-device", "virtio-rng-device",
    ]  # fmt: skip
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc: list[subprocess.Popen[bytes]] = [qemu]
    try:
        client = AgentClient.connect(sock, timeout=90)
    except Exception:
        qemu.kill()
        raise AssertionError(f"the guest agent never answered; serial console:\n{serial.read_text()[-3000:]}") from None
    try:
        yield image, client, sock, proc
    finally:
        client.close()
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait(timeout=30)


@pytest.mark.qemu
def test_boot_the_image_and_use_the_agent(booted: Booted, ca_pem: Path) -> None:
    image, c, sock, proc = booted
    hello = c.hello()
    assert hello.system is True
    assert hello.kernel == image.kernel_version
    r = c.exec(["uname", "-r"])
    assert r.ok, r
    assert r.stdout.decode().strip() == image.kernel_version

    # the root disk is the root (under a tmpfs overlay), and the gateway CA joined its trust store
    assert c.read_file("/etc/marker") == b"from the root disk\n"
    bundle = c.read_file("/etc/ssl/certs/ca-certificates.crt")
    assert bundle.startswith(b"# the root disk's own bundle\n")
    assert _der(bundle[bundle.index(b"-----BEGIN") :]) == _der(ca_pem.read_bytes())
    assert _der(c.read_file("/usr/local/share/ca-certificates/cube-egress.crt")) == _der(ca_pem.read_bytes())

    # binary round trip
    blob = os.urandom(256 << 10) + b"\x00\xff"
    c.write_file("/root/blob.bin", blob, mode=0o600)
    assert c.read_file_and_mode("/root/blob.bin") == (blob, 0o600)
    assert c.exec(["sha256sum", "/root/blob.bin"]).stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()

    # network seeded from the kernel command line, then changed by net_config
    def net() -> str:
        out = c.exec(["sh", "-c", "ip -4 addr show dev eth0; ip link show dev eth0; ip route; cat /etc/resolv.conf"])
        return out.stdout.decode()

    seeded = net()
    assert "inet 192.0.2.15/24" in seeded
    assert "default via 192.0.2.1 dev eth0" in seeded
    assert "nameserver 192.0.2.53" in seeded
    c.net_config(
        "198.51.100.7/24", gateway="198.51.100.1", dns=["198.51.100.53", "203.0.113.53"], mac="52:54:00:aa:bb:cc"
    )
    changed = net()
    assert "inet 198.51.100.7/24" in changed and "192.0.2.15" not in changed
    assert "link/ether 52:54:00:aa:bb:cc" in changed
    assert "default via 198.51.100.1 dev eth0" in changed and "192.0.2.1" not in changed
    assert "nameserver 198.51.100.53\nnameserver 203.0.113.53\n" in changed
    with pytest.raises(AgentError) as e:
        c.net_config("198.51.100.7/24", interface="eth9")
    assert e.value.code == "ENODEV"

    # clock and entropy, as after a restore or a clone
    c.set_time(4_000_000_000 * 10**9)
    assert int(c.exec(["date", "+%s"]).stdout) >= 4_000_000_000
    c.set_time()
    assert abs(int(c.exec(["date", "+%s"]).stdout) - time.time()) < 600
    seeded_rng = c.reseed()
    assert seeded_rng.reseeded and seeded_rng.credited_bits == 512

    # the host side goes away and comes back (as at every restore): the virtio port serves the new connection
    boot_id = hello.boot_id
    c.close()
    with AgentClient.connect(sock, timeout=60) as again:
        assert again.hello().boot_id == boot_id
        again.shutdown()
    # poweroff through ACPI ends QEMU by itself
    qemu = proc[0]
    assert qemu.wait(timeout=60) == 0
