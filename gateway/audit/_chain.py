"""The hash chain and its checkpoints: pure functions over record lines, the signing key, and the files of a chain.

A record's *line* is its canonical JSON (orjson, sorted keys) without the trailing newline; its hash is the hex
SHA-256 of that line. Every record carries `seq` and `prev` (the previous line's hash), so an edit, a deletion or
a reordering anywhere before the last record shows up as a broken link. Checkpoints are records too; their
signature covers a domain-separated canonical encoding of every other field (see `checkpoint_payload`), and since
their `prev` is the chain head, one signature vouches for every record before it.

Nothing here imports mitmproxy or knows about the gateway: the writer, `audit verify` and the readers share it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import _fields as F

__all__ = [
    "AuditKeyError",
    "SigningKey",
    "chain_files",
    "checkpoint_payload",
    "encode",
    "key_id",
    "line_hash",
    "load_public_key",
    "read_lines",
    "read_records",
    "rotated_name",
    "verify_signature",
]

FORMAT_VERSION = 1
_PAYLOAD_DOMAIN = b"cube-egress audit checkpoint v1\n"


class AuditKeyError(ValueError):
    """A signing or public key file is missing, unreadable or not an Ed25519 key; the message says which."""


def encode(record: Mapping[str, Any]) -> bytes:
    """The canonical line of a record (no newline): the bytes that are hashed, signed and written."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def checkpoint_payload(record: Mapping[str, Any]) -> bytes:
    """What a checkpoint's signature covers: every field but the signature, canonically encoded, behind a domain
    tag (so no other message the key might ever sign can be mistaken for a checkpoint)."""
    body = {k: v for k, v in record.items() if k != F.SIGNATURE}
    return _PAYLOAD_DOMAIN + encode(body)


# -- keys ------------------------------------------------------------------------------------------------------


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode()


class SigningKey:
    """The gateway's Ed25519 checkpoint key: a PKCS#8 PEM file, 0600, generated on first use when missing."""

    def __init__(self, private: Ed25519PrivateKey, path: str | None = None) -> None:
        self._private = private
        self.path = path
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r}, path={self.path!r})"

    @classmethod
    def load(cls, path: str) -> SigningKey:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise AuditKeyError(f"{path}: cannot read the audit signing key: {e.strerror}") from e
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise AuditKeyError(f"{path}: not an unencrypted PEM private key ({e})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditKeyError(f"{path}: the audit signing key must be Ed25519, not {type(key).__name__}")
        return cls(key, path)

    @classmethod
    def load_or_create(cls, path: str) -> SigningKey:
        """Load the key, or generate one (O_EXCL, 0600: two processes racing cannot both write it)."""
        if os.path.exists(path):
            return cls.load(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return cls.load(path)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        return cls(private, path)

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self._private.sign(payload)).decode()

    def public_pem(self) -> str:
        return public_pem(self.public)


def load_public_key(path: str) -> Ed25519PublicKey:
    """A PEM public key (what `cube-egress audit pubkey` prints) or, for convenience, the private key file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AuditKeyError(f"{path}: cannot read the public key: {e.strerror}") from e
    key: Any
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise AuditKeyError(f"{path}: not a PEM Ed25519 public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(f"{path}: the audit key must be Ed25519, not {type(key).__name__}")
    return key


def verify_signature(public: Ed25519PublicKey, record: Mapping[str, Any]) -> bool:
    sig = record.get(F.SIGNATURE)
    if not isinstance(sig, str):
        return False
    try:
        public.verify(base64.b64decode(sig, validate=True), checkpoint_payload(record))
    except (InvalidSignature, ValueError):
        return False
    return True


# -- files -----------------------------------------------------------------------------------------------------

_ROTATED = re.compile(r"^(?P<stem>.+)\.(?P<seq>\d{12,})\.(?P<ts>\d{8}T\d{6}Z)(?P<suffix>\.[^.]+)?$")


def rotated_name(active: str, first_seq: int, when: dt.datetime) -> str:
    """`audit.jsonl` -> `audit.000000000001.20250102T030405Z.jsonl`: the first seq it holds and when it was closed.
    Zero-padded, so a shell glob lists rotated files in chain order (and before the active file)."""
    base = os.path.basename(active)
    stem, suffix = os.path.splitext(base)
    return os.path.join(os.path.dirname(active), f"{stem}.{first_seq:012d}.{when.strftime('%Y%m%dT%H%M%SZ')}{suffix}")


def rotated_files(active: str) -> list[Path]:
    """The rotated files of the chain whose active file is `active`, oldest first."""
    directory = Path(os.path.dirname(os.path.abspath(active)))
    stem, suffix = os.path.splitext(os.path.basename(active))
    found: list[tuple[int, str, Path]] = []
    if not directory.is_dir():
        return []
    for entry in directory.iterdir():
        m = _ROTATED.match(entry.name)
        if m and m["stem"] == stem and (m["suffix"] or "") == suffix and entry.is_file():
            found.append((int(m["seq"]), m["ts"], entry))
    return [p for _, _, p in sorted(found)]


def chain_files(active: str) -> list[Path]:
    """Every file of one chain, in order: the rotated files, then the active file if it exists."""
    out = rotated_files(active)
    if os.path.exists(active):
        out.append(Path(active))
    return out


@dataclass(frozen=True)
class FileLines:
    """The complete lines of one audit file, and the partial last line (no newline) a crash may leave."""

    path: Path
    lines: list[bytes]
    torn: bytes


def read_lines(path: str | Path) -> FileLines:
    data = Path(path).read_bytes()
    body, sep, torn = data.rpartition(b"\n")
    if not sep:
        return FileLines(Path(path), [], data)
    return FileLines(Path(path), body.split(b"\n"), torn)


def first_seq(path: str | Path) -> int | None:
    """The seq of a file's first record (its header), or None when it has none."""
    try:
        with open(path, "rb") as f:
            line = f.readline(1 << 20)
    except OSError:
        return None
    if not line.endswith(b"\n"):
        return None
    try:
        seq = orjson.loads(line).get(F.SEQ)
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return seq if isinstance(seq, int) else None


def order_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files of one chain in chain order (by the seq of their header); unreadable ones keep their place last."""
    keyed = [(first_seq(p), i, Path(p)) for i, p in enumerate(paths)]
    return [p for _, _, p in sorted(keyed, key=lambda t: (t[0] is None, t[0] or 0, t[1]))]


def iter_all(paths: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Every record of the files (chain records included), in chain order. A torn final line is skipped; a line
    that is not JSON raises ValueError naming file and line (use `audit verify` to find out what happened)."""
    for path in order_files(paths):
        fl = read_lines(path)
        for n, line in enumerate(fl.lines, 1):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not an audit record (run `cube-egress audit verify`)") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: not an audit record (run `cube-egress audit verify`)")
            yield record


def read_records(paths: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """The decision, security and admin records of one or more audit files, in chain order (headers, checkpoints and
    recovery records left out). Tolerates a torn final line; it does not verify the chain (`verify_files` does).
    """
    for record in iter_all(paths):
        if record.get(F.EVENT) not in F.CHAIN_EVENTS:
            yield record
