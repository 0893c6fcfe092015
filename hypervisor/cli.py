"""``cube-egress image build`` (the guest image), ``cube-egress vm ...`` (microVM sandboxes, one command per
process) and ``cube-egress demo``.

Exit codes: 0 success; 1 the image cannot be built (the message names the missing input); 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import orjson

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    """Add the ``image`` command to the top-level subparsers of ``cube-egress``."""
    img = sub.add_parser("image", help="build guest images for microVM sandboxes")
    isub = img.add_subparsers(dest="image_command", required=True)
    build = isub.add_parser(
        "build",
        help="build the guest image (kernel, initramfs with the agent, optional root disk); reused when unchanged",
    )
    build.add_argument(
        "--state-dir", type=Path, default=Path(".cube-egress"), help="images go to STATE_DIR/images/<digest>/"
    )
    build.add_argument(
        "--ca-cert", type=Path, help="PEM certificate the guest trusts (the gateway's CA; never a file with a key)"
    )
    build.add_argument("--rootfs", type=Path, help="directory or tar archive for the guest's read-only root disk")
    build.add_argument("--json", action="store_true", help="print the image as JSON")
    build.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    build.set_defaults(func=_cmd_build)

    _add_vm_parser(sub)

    demo = sub.add_parser(
        "demo",
        help="boot a microVM sandbox behind the guard and the gateway and show what its agent can and cannot do",
    )
    demo.add_argument(
        "--state-dir", type=Path, default=Path(".cube-egress"), help="the guest image is kept in STATE_DIR/images/"
    )
    demo.add_argument("--work-dir", type=Path, help="keep the demo's files (config, audit log, logs) here")
    demo.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    demo.set_defaults(func=_cmd_demo)


def _add_vm_parser(sub: Any) -> None:
    vm = sub.add_parser(
        "vm",
        help="microVM sandboxes: boot, exec, snapshot, restore, clone, ls, rm (VMs outlive the command)",
        description="Every VM started here is persistent: it runs until `vm rm`. Run state lives in "
        "/run/cube-egress/vms (or $CUBE_EGRESS_RUN_DIR/vms). Exit codes: 0 ok, 1 failed, 2 bad usage; "
        "`vm exec` exits with the guest command's status.",
    )
    vsub = vm.add_subparsers(dest="vm_command", required=True)

    def net_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ip", help="guest IPv4 address (with --gateway-ip): the VM gets a tap of its own")
        p.add_argument("--gateway-ip", help="the gateway's address on the tap: the guest's only route and DNS")
        p.add_argument("--prefix", type=int, default=24, help="guest network prefix length (default 24)")
        p.add_argument("--netns", help="`ip netns` namespace for the tap (where the gateway and the guard run)")
        p.add_argument(
            "--guard",
            action="store_true",
            help="attach the kernel guard (ebpf) to the tap; ports as in `sandbox attach`",
        )
        p.add_argument("--transparent-port", type=int, default=3129)
        p.add_argument("--proxy-port", type=int, default=3128)
        p.add_argument("--dns-port", type=int, default=53)
        p.add_argument("--sandbox-id", help="the sandbox id (default sb-<vm id>)")
        register_args(p)

    def register_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--register-socket",
            type=Path,
            help="register the sandbox with the gateway through this admin API socket (unregistered at `vm rm`)",
        )
        p.add_argument("--register-url", help="the admin API over TCP instead (with --token-file)")
        p.add_argument("--token-file", type=Path, help="bearer token file (0600) for --register-url")
        p.add_argument(
            "--policy", action="append", default=[], help="policy the registered sandbox gets (repeatable)"
        )

    boot = vsub.add_parser("boot", help="cold boot a guest and wait until its agent answers")
    boot.add_argument("--state-dir", type=Path, default=Path(".cube-egress"), help="where images are kept")
    boot.add_argument("--ca-cert", type=Path, help="CA certificate the guest trusts (the gateway's)")
    boot.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default 256)")
    boot.add_argument(
        "--template-ready", action="store_true", help="RAM in a shared file, so `vm snapshot --template` works"
    )
    boot.add_argument("--extra-binary", action="append", default=[], help="host program to copy in (e.g. curl)")
    net_args(boot)
    boot.set_defaults(func=_cmd_vm_boot)

    ex = vsub.add_parser("exec", help="run a command in the guest: `vm exec ID -- CMD ARG...`")
    ex.add_argument("id")
    ex.add_argument("--timeout", type=float, default=60.0, help="seconds before the command is killed")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    ex.set_defaults(func=_cmd_vm_exec)

    snap = vsub.add_parser("snapshot", help="write a snapshot (device state and memory) to a new directory")
    snap.add_argument("id")
    snap.add_argument("directory", type=Path)
    snap.add_argument(
        "--template",
        action="store_true",
        help="make a clone template (VM booted with --template-ready; the VM is consumed)",
    )
    snap.set_defaults(func=_cmd_vm_snapshot)

    rest = vsub.add_parser("restore", help="start a new VM from a snapshot directory")
    rest.add_argument("directory", type=Path)
    net_args(rest)
    rest.set_defaults(func=_cmd_vm_restore)

    clone = vsub.add_parser("clone", help="start N clones of a template, each with its own MAC, IP and sandbox id")
    clone.add_argument("directory", type=Path, help="a template made by `vm snapshot --template`")
    clone.add_argument("-n", type=int, default=1, help="how many clones")
    clone.add_argument("--subnet", help="lease guest addresses from this CIDR (with --gateway-ip)")
    clone.add_argument("--gateway-ip")
    clone.add_argument("--netns")
    clone.add_argument("--guard", action="store_true", help="attach the kernel guard to every clone's tap")
    clone.add_argument("--transparent-port", type=int, default=3129)
    clone.add_argument("--proxy-port", type=int, default=3128)
    clone.add_argument("--dns-port", type=int, default=53)
    register_args(clone)
    clone.set_defaults(func=_cmd_vm_clone)

    ls = vsub.add_parser("ls", help="list VMs")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_vm_ls)

    rm = vsub.add_parser("rm", help="destroy VMs (QEMU, tap, guard, files); also removes leftovers of crashed ones")
    rm.add_argument("ids", nargs="*")
    rm.add_argument("--all", action="store_true", help="every VM")
    rm.add_argument(
        "--template", type=Path, action="append", default=[], help="also remove this template (its RAM file too)"
    )
    rm.set_defaults(func=_cmd_vm_rm)


def _err(msg: str) -> int:
    print(f"cube-egress: {msg}", file=sys.stderr)
    return 1


def _guard_hook(args: argparse.Namespace) -> list[Any]:
    """The hooks a VM's tap gets: the kernel guard first, then the gateway registration."""
    from .net import EbpfGuard
    from .registration import GatewayRegistration

    hooks: list[Any] = []
    if args.guard:
        hooks.append(
            EbpfGuard(transparent_port=args.transparent_port, proxy_port=args.proxy_port, dns_port=args.dns_port)
        )
    if args.register_socket or args.register_url:
        if not args.policy:
            raise ValueError("registering a sandbox needs at least one --policy")
        hooks.append(
            GatewayRegistration(
                policies=args.policy,
                unix_socket=args.register_socket,
                url=args.register_url,
                token_file=args.token_file,
            )
        )
    return hooks


def _netspec(args: argparse.Namespace) -> Any:
    from .net import NetSpec

    if args.ip is None and args.gateway_ip is None:
        if args.guard:
            raise ValueError("--guard needs a network (--ip and --gateway-ip)")
        return None
    if args.ip is None or args.gateway_ip is None:
        raise ValueError("give both --ip and --gateway-ip (or neither: no network)")
    return NetSpec(ip=args.ip, gateway_ip=args.gateway_ip, prefix=args.prefix, netns=args.netns)


def _describe(vm: Any) -> dict[str, Any]:
    return {
        "id": vm.id,
        "state": vm.state.value,
        "sandbox_id": vm.sandbox_id,
        "pid": vm.pid,
        "ip": vm.ip,
        "mac": vm.mac,
        "tap": vm.tap,
        "kind": vm.kind,
    }


def _print_vm(vm: Any) -> None:
    d = _describe(vm)
    print("  ".join(f"{k}={v}" for k, v in d.items() if v is not None))


_HOOKS_FILE = "cli-hooks.json"  # beside vm.json: how this CLI wired the VM, so `vm rm` can unwire it


def _release(vm: Any, args: argparse.Namespace | None = None) -> None:
    """Hand the VM over to later commands (they re-open it with MicroVM.attach); remember its hooks' settings,
    since hooks do not outlive the process that ran them."""
    if args is not None and vm.net is not None:
        doc = {
            "guard": bool(getattr(args, "guard", False)),
            "register": None
            if not (getattr(args, "register_socket", None) or getattr(args, "register_url", None))
            else {
                "unix_socket": str(args.register_socket) if args.register_socket else None,
                "url": args.register_url,
                "token_file": str(args.token_file) if args.token_file else None,
                "policies": list(args.policy),
            },
        }
        (vm.paths.run_dir / _HOOKS_FILE).write_text(json.dumps(doc))
    vm.release()


def _saved_hooks(run_dir: Path) -> list[Any]:
    """The hooks to run `sandbox_down` on when removing a VM this CLI started (guard, registration)."""
    from .net import EbpfGuard
    from .registration import GatewayRegistration

    try:
        doc = json.loads((run_dir / _HOOKS_FILE).read_text())
    except (OSError, ValueError):
        return []
    hooks: list[Any] = []
    if doc.get("guard") and _guard_possible():
        hooks.append(EbpfGuard())
    reg = doc.get("register")
    if reg:
        hooks.append(
            GatewayRegistration(
                policies=reg["policies"], unix_socket=reg["unix_socket"], url=reg["url"], token_file=reg["token_file"]
            )
        )
    return hooks


def _cmd_vm_boot(args: argparse.Namespace) -> int:
    from ._errors import HypervisorError
    from .image import build_image
    from .vm import MicroVM

    try:
        net = _netspec(args)
        image = build_image(
            args.state_dir,
            ca_cert=args.ca_cert,
            extra_binaries=tuple(args.extra_binary),
            progress=lambda m: print(f"cube-egress: {m}", file=sys.stderr),
        )
        vm = MicroVM(
            image,
            memory_mb=args.memory,
            net=net,
            sandbox_id=args.sandbox_id,
            hooks=_guard_hook(args),
            shared_memory=args.template_ready,
            persistent=True,
        )
        vm.boot()
    except (HypervisorError, ValueError) as e:
        return _err(str(e))
    _print_vm(vm)
    _release(vm, args)
    return 0


def _attach(vm_id: str) -> Any:
    from .vm import MicroVM

    return MicroVM.attach(vm_id)


def _cmd_vm_exec(args: argparse.Namespace) -> int:
    from ._errors import HypervisorError

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("cube-egress: vm exec: give the command after `--`", file=sys.stderr)
        return 2
    try:
        vm = _attach(args.id)
    except HypervisorError as e:
        return _err(str(e))
    try:
        result = vm.exec(argv, timeout_s=args.timeout)
    except HypervisorError as e:
        return _err(str(e))
    finally:
        with contextlib.suppress(HypervisorError):
            _release(vm)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    if result.timed_out:
        print(f"cube-egress: vm exec: killed after {args.timeout:g} s", file=sys.stderr)
        return 124
    return int(result.exit_code) if result.exit_code is not None else 128 + int(result.signal or 0)


def _cmd_vm_snapshot(args: argparse.Namespace) -> int:
    from ._errors import HypervisorError
    from .clone import Template

    try:
        vm = _attach(args.id)
    except HypervisorError as e:
        return _err(str(e))
    try:
        if args.template:
            template = Template.from_vm(vm, args.directory)
            print(f"template {template.directory} (RAM {template.ram_file}); vm {args.id} is consumed")
            return 0
        snap = vm.snapshot(args.directory)
        print(f"snapshot {snap.directory} of vm {vm.id} (still running)")
        _release(vm)
        return 0
    except HypervisorError as e:
        with contextlib.suppress(HypervisorError):
            _release(vm)
        return _err(str(e))


def _cmd_vm_restore(args: argparse.Namespace) -> int:
    from ._errors import HypervisorError
    from .vm import MicroVM

    try:
        vm = MicroVM.restore(
            args.directory,
            net=_netspec(args),
            sandbox_id=args.sandbox_id,
            hooks=_guard_hook(args),
            persistent=True,
        )
    except (HypervisorError, ValueError) as e:
        return _err(str(e))
    _print_vm(vm)
    _release(vm, args)
    return 0


def _cmd_vm_clone(args: argparse.Namespace) -> int:
    from ._errors import HypervisorError
    from .clone import Template
    from .net import Subnet
    from .vm import list_vms

    try:
        subnet = None
        if args.subnet or args.gateway_ip:
            if not (args.subnet and args.gateway_ip):
                raise ValueError("give both --subnet and --gateway-ip (or neither: no network)")
            taken = [r.net.ip for r in list_vms() if r.alive and r.net is not None]
            subnet = Subnet(args.subnet, args.gateway_ip, netns=args.netns, exclude=taken)
        elif args.guard:
            raise ValueError("--guard needs a network (--subnet and --gateway-ip)")
        clones = Template.load(args.directory).clone(
            args.n, net=subnet, hooks=_guard_hook(args), persistent=True
        )
    except (HypervisorError, ValueError) as e:
        return _err(str(e))
    for vm in clones:
        _print_vm(vm)
        _release(vm, args)
    for failure in clones.failures:
        print(f"cube-egress: a clone failed: {failure}", file=sys.stderr)
    return 0 if not clones.failures else 1


def _cmd_vm_ls(args: argparse.Namespace) -> int:
    from .vm import list_vms

    rows = []
    for r in list_vms():
        rows.append(
            {
                "id": r.id,
                "alive": r.alive,
                "kind": r.kind,
                "sandbox_id": r.sandbox_id,
                "pid": r.pid,
                "ip": r.net.ip if r.net else None,
                "tap": r.net.tap if r.net else None,
                "netns": r.net.netns if r.net else None,
                "memory_mb": r.machine.memory_mb,
                "persistent": r.persistent,
            }
        )
    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    cols = ["id", "alive", "kind", "sandbox_id", "pid", "ip", "tap", "netns", "memory_mb"]
    table = [cols] + [["-" if row[c] is None else str(row[c]) for c in cols] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _cmd_vm_rm(args: argparse.Namespace) -> int:
    from ._errors import HypervisorError
    from .clone import Template
    from .vm import MicroVM, cleanup_stale, list_vms

    records = {r.id: r for r in list_vms()}
    ids = list(records) if args.all else args.ids
    if not ids and not args.template:
        print("cube-egress: vm rm: give VM ids, --all or --template DIR", file=sys.stderr)
        return 2
    failed = 0
    for directory in args.template:
        try:
            Template.load(directory).remove()
            print(f"removed template {directory}")
        except (HypervisorError, OSError) as e:
            failed += _err(f"template {directory}: {e}")
    for vm_id in ids:
        rec = records.get(vm_id)
        if rec is None:
            failed += _err(f"no VM {vm_id!r} (see `cube-egress vm ls`)")
            continue
        if not rec.alive:
            continue  # cleanup_stale below removes what is left of it
        try:
            # The guard is detached and the sandbox unregistered before the tap goes, as at a destroy in-process.
            MicroVM.attach(vm_id, hooks=_saved_hooks(rec.run_dir)).destroy()
            print(f"removed {vm_id}")
        except HypervisorError as e:
            failed += _err(f"{vm_id}: {e}")
    for gone in cleanup_stale():
        print(f"removed leftovers of {gone}")
    return 1 if failed else 0


def _guard_possible() -> bool:
    try:
        import ebpf
    except ImportError:
        return False
    return ebpf.unavailable_reason() is None


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._errors import HypervisorError
    from .demo import DemoError, run_demo

    try:
        return run_demo(image_dir=args.state_dir, work_dir=args.work_dir, keep=args.keep)
    except (DemoError, HypervisorError) as e:
        print(f"cube-egress demo: {e}", file=sys.stderr)
        return 1


def _cmd_build(args: argparse.Namespace) -> int:
    from ._errors import ImageError
    from .image import build_image

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"cube-egress: {msg}", file=sys.stderr)

    try:
        image = build_image(args.state_dir, ca_cert=args.ca_cert, rootfs=args.rootfs, progress=progress)
    except ImageError as e:
        print(f"cube-egress: {e}", file=sys.stderr)
        return 1
    out = {
        "digest": image.digest,
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "rootfs": str(image.rootfs) if image.rootfs else None,
        "cmdline": image.cmdline,
        "kernel_version": image.kernel_version,
    }
    if args.json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for key, value in out.items():
            print(f"{key + ':':16}{value if value is not None else '(none)'}")
    return 0
