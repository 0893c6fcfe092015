"""`cube-egress audit verify|pubkey`: check a ledger's chain and signatures; print the checkpoint public key.

Exit codes (as the rest of the CLI): 0 verified; 1 verification failed; 2 bad usage or an unreadable input.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ._chain import AuditKeyError, SigningKey, key_id, load_public_key, public_pem
from ._verify import VerifyReport, parse_anchor, verify_files

__all__ = ["add_parser"]

KEY_BASENAME = "audit-signing-key.pem"


def add_parser(sub: Any) -> None:
    """Register `audit` and its subcommands on the top-level subparsers of `cube-egress`."""
    audit = sub.add_parser("audit", help="verify the tamper-evident audit log; print its public key")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    verify = asub.add_parser(
        "verify",
        help="check the hash chain and the signed checkpoints of audit files (rotated files verify as one chain)",
    )
    verify.add_argument("files", nargs="+", help="audit files, e.g. .cube-egress/audit*.jsonl (any order)")
    verify.add_argument(
        "--pubkey",
        action="append",
        default=[],
        help="PEM public key the checkpoints must be signed with (`audit pubkey` prints it); repeatable",
    )
    verify.add_argument("--config", help="use the signing key of this gateway config (when no --pubkey)")
    verify.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="SEQ:HASH",
        help="a record known from elsewhere (a head kept by `--json`, a checkpoint a SIEM received); repeatable",
    )
    verify.add_argument("--json", action="store_true", help="one JSON object instead of text")
    verify.set_defaults(func=_cmd_verify)
    pubkey = asub.add_parser("pubkey", help="print the PEM public key the gateway signs checkpoints with")
    pubkey.add_argument("--config", help="gateway config file (default: the embedded development default)")
    pubkey.set_defaults(func=_cmd_pubkey)
    from ._export import add_export_parser  # `audit export` (OCSF, CEF, CSV, JSON lines)

    add_export_parser(asub)


def _err(msg: str) -> int:
    print(f"cube-egress: {msg}", file=sys.stderr)
    return 2


def _configured_key_path(config_path: str | None) -> str:
    from ..config import default_config, load_config

    config = load_config(config_path) if config_path else default_config()
    return config.audit_signing_key


def _keys(args: argparse.Namespace) -> tuple[list[Ed25519PublicKey], str | None]:
    """The public keys to check signatures with and where they came from (None: no key, nothing checked)."""
    if args.pubkey:
        return [load_public_key(p) for p in args.pubkey], "--pubkey"
    if args.config:
        path = _configured_key_path(args.config)
        return [SigningKey.load(path).public], f"the key of {args.config} ({path})"
    beside = os.path.join(os.path.dirname(os.path.abspath(args.files[0])), KEY_BASENAME)
    if os.path.exists(beside):
        # Weaker: whoever could edit the files may have replaced this key too. Said in the output.
        return [SigningKey.load(beside).public], f"{beside}, found next to the audit files (pin it with --pubkey)"
    return [], None


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..config import ConfigError

    try:
        anchors = [parse_anchor(a) for a in args.anchor]
        keys, source = _keys(args)
    except (ValueError, AuditKeyError, ConfigError, OSError) as e:
        return _err(str(e))
    for f in args.files:
        if not os.path.isfile(f):
            return _err(f"{f}: no such audit file")
    try:
        report = verify_files(args.files, keys, anchors)
    except OSError as e:
        return _err(f"cannot read audit files: {e}")
    if args.json:
        out = report.to_json()
        out["key_source"] = source
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_report(report, keys, source)
    return 0 if report.ok else 1


def _print_report(report: VerifyReport, keys: list[Ed25519PublicKey], source: str | None) -> None:
    if report.problem is not None:
        p = report.problem
        at = f" at seq {p.seq}" if p.seq is not None else ""
        print(f"FAILED: {p.kind}{at}: {p.detail}")
        if report.last_seq is not None:
            print(f"  verified before it: seq {report.first_seq}..{report.last_seq}")
        return
    span = f"seq {report.first_seq}..{report.last_seq}"
    signed = (
        f"signatures checked with key {', '.join(key_id(k) for k in keys)} from {source}"
        if report.signatures_checked
        else "signatures not checked"
    )
    print(
        f"OK: {len(report.files)} file(s), {report.records} records ({span}), {report.checkpoints} checkpoint(s); "
        f"{signed}"
    )
    print(f"  head: seq {report.last_seq} sha256 {report.head} (keep it elsewhere; later: --anchor SEQ:HASH)")
    for note in report.notes():
        print(f"  note: {note}")


def _cmd_pubkey(args: argparse.Namespace) -> int:
    from ..config import ConfigError

    try:
        path = _configured_key_path(args.config)
    except ConfigError as e:
        return _err(str(e))
    if not os.path.exists(path):
        return _err(f"{path}: no audit signing key yet (the gateway creates it when it first starts)")
    try:
        key = SigningKey.load(path)
    except AuditKeyError as e:
        return _err(str(e))
    sys.stdout.write(public_pem(key.public))
    return 0
