"""``cube-egress image build`` (the guest image for the microVM runtime) and ``cube-egress demo``.

Exit codes: 0 success; 1 the image cannot be built (the message names the missing input); 2 bad usage.
"""

from __future__ import annotations

import argparse
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
