"""``cube-egress sandbox attach|detach|verify``: wire a sandbox to the kernel enforcement from the command line.

Exit codes: 0 success; 1 enforcement unavailable, or ``verify`` found the interface unguarded; 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser"]


def _err(msg: str) -> None:
    print(f"cube-egress: {msg}", file=sys.stderr)


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ip", help="the sandbox's IPv4 address (its source address)")
    p.add_argument("--mac", help="the sandbox's MAC (the sandbox side of the tap/veth)")
    p.add_argument("--id", dest="sandbox_id", required=True, help="sandbox id (as in the policy's sandboxes)")
    p.add_argument("--gateway-ip", help="the gateway's address towards the sandbox (default: the interface's)")
    p.add_argument("--transparent-port", type=int, default=3129, help="gateway transparent listener (3129)")
    p.add_argument("--proxy-port", type=int, default=3128, help="gateway explicit proxy port (3128; 0: none)")
    p.add_argument("--dns-port", type=int, default=53, help="gateway resolver port (53; 0: none)")
    p.add_argument(
        "--port",
        dest="ports",
        type=int,
        action="append",
        default=[],
        help="extra TCP port the sandbox's policy allows (redirected like 80/443); repeatable",
    )
    p.add_argument(
        "--no-redirect",
        action="store_true",
        help="do not install the nft redirect of marked TCP (you install your own)",
    )


def add_parser(sub: Any) -> None:
    """Add the ``sandbox`` command to the top-level subparsers of ``cube-egress``."""
    sb = sub.add_parser("sandbox", help="attach, detach and verify kernel enforcement for a sandbox")
    ssub = sb.add_subparsers(dest="sandbox_command", required=True)

    att = ssub.add_parser("attach", help="guard a sandbox interface (tc) or cgroup (connect/sendmsg)")
    target = att.add_mutually_exclusive_group(required=True)
    target.add_argument("--iface", help="host side of the sandbox's tap or veth")
    target.add_argument("--cgroup", help="cgroup v2 directory of a process sandbox")
    _spec_args(att)
    att.add_argument("--netns", help="network namespace (ip netns name) of the interface")
    att.add_argument(
        "--enforcer",
        choices=("ebpf", "nftables"),
        default="ebpf",
        help="ebpf (default); nftables is an explicit, reduced fallback",
    )
    att.set_defaults(func=_cmd_attach)

    det = ssub.add_parser("detach", help="remove everything attach installed")
    dtarget = det.add_mutually_exclusive_group(required=True)
    dtarget.add_argument("--iface")
    dtarget.add_argument("--cgroup")
    det.add_argument("--netns")
    det.add_argument("--enforcer", choices=("ebpf", "nftables"), default="ebpf")
    det.set_defaults(func=_cmd_detach)

    ver = ssub.add_parser("verify", help="show what is attached to an interface and its counters")
    ver.add_argument("iface")
    ver.add_argument("--netns")
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=_cmd_verify)


def _cmd_attach(args: argparse.Namespace) -> int:
    import ebpf
    from ebpf import _nftguard

    from . import _net

    try:
        if args.iface:
            if not args.ip or not args.mac:
                _err("--iface needs --ip and --mac")
                return 2
            gateway_ip = args.gateway_ip
            if gateway_ip is None:
                info = _net.iface_info(args.netns, args.iface)
                if info is None or not info.ipv4:
                    _err(f"{args.iface}: no such interface or no IPv4 address; pass --gateway-ip")
                    return 2
                gateway_ip = info.ipv4[0]
            spec = ebpf.SandboxSpec(
                args.sandbox_id,
                ip=args.ip,
                gateway_ip=gateway_ip,
                mac=args.mac,
                transparent_port=args.transparent_port,
                proxy_port=args.proxy_port,
                dns_port=args.dns_port,
                ports=tuple(args.ports),
            )
        else:
            if not args.gateway_ip:
                _err("--cgroup needs --gateway-ip")
                return 2
            spec = ebpf.SandboxSpec(
                args.sandbox_id,
                ip=args.ip or args.gateway_ip,
                gateway_ip=args.gateway_ip,
                transparent_port=args.transparent_port,
                proxy_port=args.proxy_port,
                dns_port=args.dns_port,
                ports=tuple(args.ports),
            )
    except ValueError as e:
        _err(str(e))
        return 2

    if args.enforcer == "nftables":
        print(f"cube-egress: {_nftguard.WARNING}", file=sys.stderr)
        if args.cgroup:
            _err("the nftables fallback cannot enforce on a cgroup")
            return 1
        try:
            _nftguard.attach(args.netns, args.iface, spec)
        except _net.NetError as e:
            _err(str(e))
            return 1
        print(f"attached {args.iface} (sandbox {spec.sandbox_id}) with the NFTABLES FALLBACK")
        return 0

    try:
        with ebpf.Enforcer.open(args.netns) as enf:
            if args.iface:
                value = enf.attach_interface(args.iface, spec, redirect=not args.no_redirect)
                where = args.iface
            else:
                value = enf.attach_cgroup(args.cgroup, spec).value
                where = args.cgroup
    except ebpf.EnforcementUnavailable as e:
        _err(f"kernel enforcement is unavailable: {e}")
        _err(
            "nothing was attached. If this kernel cannot run BPF programs, choose the reduced fallback "
            "explicitly with --enforcer nftables."
        )
        return 1
    except (ebpf.AttachError, _net.NetError, OSError) as e:
        _err(str(e))
        return 1
    print(
        f"attached {where} (sandbox {value.sandbox_id}, slot {value.slot}) with ebpf; redirected TCP ports "
        f"{', '.join(map(str, spec.redirect_ports))} -> {spec.gateway_ip}:{spec.transparent_port}"
    )
    return 0


def _cmd_detach(args: argparse.Namespace) -> int:
    import ebpf
    from ebpf import _nftguard

    from . import _net

    try:
        if args.enforcer == "nftables":
            removed = _nftguard.detach(args.netns, args.iface) if args.iface else False
        elif args.iface:
            removed = ebpf.detach_sandbox(args.iface, netns=args.netns)
        else:
            try:
                with ebpf.Enforcer.open(args.netns, create=False) as enf:
                    removed = enf.detach_cgroup(args.cgroup)
            except FileNotFoundError:
                removed = False
    except (ebpf.AttachError, _net.NetError, OSError) as e:
        _err(str(e))
        return 1
    print(f"detached {args.iface or args.cgroup}" if removed else f"{args.iface or args.cgroup}: nothing attached")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import ebpf
    from ebpf import _nftguard

    from . import _net

    report: dict[str, Any] = {"interface": args.iface, "netns": args.netns}
    filters = _net.ingress_filters(args.netns, args.iface)
    if filters is None:
        _err(f"no interface {args.iface!r}")
        return 2
    clsact, flist = filters
    ours = [f for f in flist if str(f.get("name") or "").startswith("cxe_")]
    report["clsact"] = clsact
    report["filters"] = flist
    report["redirect_table"] = (
        _net.nft_table(args.iface) if _net.nft_table_exists(args.netns, _net.nft_table(args.iface)) else None
    )
    report["forward_drop_unredirected"] = _net.nft_unredirected(args.netns)
    sandbox: dict[str, Any] | None = None
    counts: dict[str, int] = {}
    try:
        with ebpf.Enforcer.open(args.netns, create=False) as enf:
            report["pin_dir"] = enf.pin_dir
            for v in enf.interfaces().values():
                if v.ifname == args.iface:
                    sandbox = {
                        "id": v.sandbox_id,
                        "slot": v.slot,
                        "ip": v.sandbox_ip,
                        "mac": v.mac,
                        "gateway_ip": v.gateway_ip,
                        "transparent_port": v.transparent_port,
                        "proxy_port": v.proxy_port,
                        "dns_port": v.dns_port,
                    }
                    counts = {c.label: n for c, n in sorted(enf.counters(v.slot).get(v.slot, {}).items())}
    except FileNotFoundError:
        report["pin_dir"] = None
    fallback = _nftguard.counters(args.netns, args.iface)
    report["sandbox"] = sandbox
    report["counters"] = counts
    report["nftables_fallback"] = fallback
    guarded = bool(ours and sandbox and all(f["direct_action"] and f["prio"] == _net.FILTER_PRIO for f in ours))
    report["enforcer"] = "ebpf" if guarded else ("nftables (FALLBACK)" if fallback is not None else None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"interface {args.iface}" + (f" (netns {args.netns})" if args.netns else ""))
        print(f"  enforcer:    {report['enforcer'] or 'NONE: this interface is not guarded'}")
        print(f"  clsact:      {'yes' if clsact else 'no'}")
        for f in flist:
            print(
                f"  filter:      ingress prio {f['prio']} handle {f['handle']:#x} {f['kind']} {f['name'] or ''}"
                f"{' direct-action' if f['direct_action'] else ''}"
            )
        if sandbox:
            print(f"  sandbox:     {sandbox['id']} (slot {sandbox['slot']}) ip {sandbox['ip']} mac {sandbox['mac']}")
            print(
                f"  gateway:     {sandbox['gateway_ip']} transparent :{sandbox['transparent_port']} proxy "
                f":{sandbox['proxy_port']} dns :{sandbox['dns_port']}"
            )
        print(
            f"  redirect:    nft table {report['redirect_table'] or 'MISSING'}; unredirected forward drops: "
            f"{report['forward_drop_unredirected']}"
        )
        if report.get("pin_dir"):
            print(f"  pinned:      {report['pin_dir']}")
        for label, n in counts.items():
            print(f"  {'drop' if ebpf.Code[label.upper()].is_drop else 'pass'} {label:<14} {n}")
        for label, n in (fallback or {}).items():
            print(f"  nft drop {label:<14} {n}")
    return 0 if report["enforcer"] else 1
