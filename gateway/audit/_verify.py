"""Verifying an audit chain: one pass over one or more files, stopping at the first bad record.

What each kind of tampering looks like (the first bad seq is named in every case):
- edited: a record's hash no longer matches the `prev` of the record after it (or its own seq was changed while
  its link still holds); a changed checkpoint no longer matches its signature;
- deleted: the seq jumps forward and the missing seq appears nowhere later;
- reordered: the seq goes back, or jumps forward and the missing seq appears later;
- truncated: a rotated file ends before its closing checkpoint (the next file starts further on), or the chain
  ends before an anchor (`--anchor SEQ:HASH`, e.g. a checkpoint a SIEM received).
Cutting records off the end of the *last* file leaves no trace in the file itself: the records after the last
checkpoint are reported as unsigned, and only an external anchor proves they were there.

A torn final line (a crash in mid-write) is reported apart from tampering and does not fail verification.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import _fields as F
from ._chain import key_id, line_hash, order_files, read_lines, verify_signature

__all__ = ["Problem", "VerifyReport", "parse_anchor", "verify_files"]

KINDS = ("edited", "deleted", "reordered", "truncated", "bad_signature", "malformed")


@dataclass(frozen=True)
class Problem:
    kind: str  # one of KINDS
    seq: int | None  # the first bad sequence number
    detail: str
    file: str | None = None
    line: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "detail": self.detail, "file": self.file, "line": self.line}


@dataclass
class VerifyReport:
    files: list[str]
    records: int = 0  # every record (chain records included)
    first_seq: int | None = None
    last_seq: int | None = None
    head: str | None = None  # hash of the last record: an anchor to keep elsewhere
    checkpoints: int = 0
    last_checkpoint: int | None = None
    signatures_checked: bool = False
    key_ids: list[str] = field(default_factory=list)  # keys that signed the checkpoints
    torn_bytes: int = 0
    closed: bool = False  # ends with the checkpoint of a clean shutdown
    continues: bool = False  # ends with the checkpoint of a rotation: a later file was not given
    recoveries: list[int] = field(default_factory=list)  # seqs of recovery records (restarts after a crash)
    anchors_checked: int = 0
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def unsigned(self) -> int:
        """Records after the last checkpoint: nothing signed vouches for them."""
        if self.last_seq is None or self.first_seq is None:
            return 0
        if self.last_checkpoint is None:
            return self.last_seq - self.first_seq + 1
        return self.last_seq - self.last_checkpoint

    def notes(self) -> list[str]:
        out = []
        if self.first_seq is not None and self.first_seq > 1:
            out.append(f"the chain starts at seq {self.first_seq}: it continues a file that was not given")
        if not self.signatures_checked:
            out.append("signatures were NOT checked (no public key: pass --pubkey, or --config for the gateway's)")
        if self.unsigned:
            assert self.last_seq is not None
            out.append(
                f"{self.unsigned} record(s) after the last checkpoint (seq {self.last_seq - self.unsigned + 1}.."
                f"{self.last_seq}) are unsigned: cutting them off would leave no trace without an external anchor"
            )
        if self.torn_bytes:
            out.append(
                f"torn final line ({self.torn_bytes} bytes) after seq {self.last_seq}: a crash in mid-write, not "
                "tampering (the gateway cuts it away when it starts again)"
            )
        if self.continues:
            out.append("the last file given ends with a rotation: the chain continues in a file that was not given")
        elif not self.closed and self.last_seq is not None:
            out.append(
                "the log does not end with a clean shutdown: the gateway is running, crashed, or the end was cut"
            )
        if self.recoveries:
            out.append(
                f"restarted after a crash {len(self.recoveries)} time(s) (recovery records at seq "
                f"{', '.join(map(str, self.recoveries[:10]))}{'...' if len(self.recoveries) > 10 else ''})"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "files": self.files,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "head": {"seq": self.last_seq, "hash": self.head} if self.head else None,
            "checkpoints": self.checkpoints,
            "last_checkpoint": self.last_checkpoint,
            "signatures_checked": self.signatures_checked,
            "key_ids": self.key_ids,
            "unsigned": self.unsigned,
            "torn_bytes": self.torn_bytes,
            "closed": self.closed,
            "continues": self.continues,
            "recoveries": self.recoveries,
            "anchors_checked": self.anchors_checked,
            "problem": self.problem.to_json() if self.problem else None,
            "notes": self.notes(),
        }


def parse_anchor(text: str) -> tuple[int, str]:
    """`SEQ:HASH` (HASH: the record's full hex SHA-256, as `--json` reports a head) -> (seq, hash)."""
    seq, sep, digest = text.partition(":")
    digest = digest.strip().lower()
    if not sep or not seq.strip().isdigit() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"anchor {text!r} must be SEQ:HASH with the record's 64-hex SHA-256")
    return int(seq), digest


@dataclass(frozen=True)
class _Entry:
    file_index: int
    path: Path
    lineno: int
    line: bytes
    record: dict[str, Any] | None
    last_in_file: bool


def _entries(files: Sequence[Path], torn: dict[int, int]) -> Iterator[_Entry]:
    for i, path in enumerate(files):
        fl = read_lines(path)
        torn[i] = len(fl.torn)
        for n, line in enumerate(fl.lines, 1):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            yield _Entry(i, path, n, line, record if isinstance(record, dict) else None, n == len(fl.lines))


def verify_files(
    paths: Iterable[str | Path],
    public_keys: Sequence[Ed25519PublicKey] = (),
    anchors: Sequence[tuple[int, str]] = (),
) -> VerifyReport:
    files = order_files(paths)
    report = VerifyReport([str(p) for p in files])
    keys: Mapping[str, Ed25519PublicKey] = {key_id(k): k for k in public_keys}
    report.signatures_checked = bool(keys)
    wanted = dict(anchors)
    torn: dict[int, int] = {}
    stream = _entries(files, torn)
    prev_hash: str | None = None
    expected: int | None = None
    last: _Entry | None = None

    def fail(kind: str, seq: int | None, detail: str, at: _Entry | None) -> VerifyReport:
        report.problem = Problem(kind, seq, detail, str(at.path) if at else None, at.lineno if at else None)
        return report

    for e in stream:
        rec = e.record
        where = f"{e.path.name}:{e.lineno}"
        if rec is None or not isinstance(rec.get(F.SEQ), int) or not isinstance(rec.get(F.PREV), str):
            return fail("edited", expected, f"{where} is not an audit record (not JSON, or no seq/prev)", e)
        seq: int = rec[F.SEQ]
        if expected is None:
            report.first_seq = seq
            if seq == 1 and rec[F.PREV] != F.GENESIS:
                return fail("edited", 1, f"{where}: seq 1 does not start from the genesis hash", e)
        elif seq != expected:
            if rec[F.PREV] == prev_hash:
                return fail("edited", expected, f"{where}: the record after seq {expected - 1} says seq {seq}", e)
            if seq < expected:
                return fail("reordered", seq, f"{where}: seq {seq} comes after seq {expected - 1}", e)
            if any(x.record is not None and x.record.get(F.SEQ) == expected for x in stream):
                return fail("reordered", expected, f"{where}: seq {seq} comes where seq {expected} belongs", e)
            if last is not None and last.file_index != e.file_index:
                return fail(
                    "truncated",
                    expected,
                    f"{last.path.name} ends at seq {expected - 1} but {e.path.name} starts at seq {seq}: "
                    f"records {expected}..{seq - 1} are missing (the file was cut short)",
                    e,
                )
            missing = f"seq {expected}" if seq == expected + 1 else f"seqs {expected}..{seq - 1}"
            return fail("deleted", expected, f"{where}: {missing} missing (seq {seq} follows seq {expected - 1})", e)
        elif prev_hash is not None and rec[F.PREV] != prev_hash:
            return fail(
                "edited",
                seq - 1,
                f"{where}: the hash of seq {seq - 1} does not match what seq {seq} records (seq {seq - 1} was "
                f"changed, or the link in seq {seq})",
                e,
            )
        event = rec.get(F.EVENT)
        if (e.lineno == 1) != (event == F.EVENT_HEADER):
            what = "does not start with a header" if e.lineno == 1 else "has a header in the middle"
            return fail("malformed", seq, f"{where}: the file {what}", e)
        if event == F.EVENT_CHECKPOINT:
            if rec.get(F.FILE_RECORDS) != e.lineno - 1:
                return fail(
                    "edited",
                    seq,
                    f"{where}: checkpoint counts {rec.get(F.FILE_RECORDS)} records before it in the "
                    f"file, there are {e.lineno - 1}",
                    e,
                )
            if keys:
                kid = rec.get(F.KEY_ID)
                key = keys.get(kid) if isinstance(kid, str) else None
                if key is None:
                    return fail("bad_signature", seq, f"{where}: checkpoint signed by key {kid}, not a given key", e)
                if not verify_signature(key, rec):
                    return fail(
                        "bad_signature",
                        seq,
                        f"{where}: the checkpoint's signature does not verify: it, or records before it, were changed",
                        e,
                    )
            if isinstance(rec.get(F.KEY_ID), str) and rec[F.KEY_ID] not in report.key_ids:
                report.key_ids.append(rec[F.KEY_ID])
            if rec.get(F.CLOSES) == "file" and not e.last_in_file:
                return fail("malformed", seq, f"{where}: a rotation checkpoint must be the file's last record", e)
            report.checkpoints += 1
            report.last_checkpoint = seq
        elif event == F.EVENT_RECOVERY:
            report.recoveries.append(seq)
        if (
            e.last_in_file
            and e.file_index < len(files) - 1
            and not (event == F.EVENT_CHECKPOINT and rec.get(F.CLOSES) == "file")
        ):
            nxt = next(stream, None)
            nxt_seq = nxt.record.get(F.SEQ) if nxt is not None and nxt.record is not None else None
            return fail(
                "truncated",
                seq + 1,
                f"{e.path.name} ends at seq {seq} without its closing checkpoint"
                + (f" ({nxt.path.name} starts at seq {nxt_seq})" if nxt is not None else ""),
                e,
            )
        if torn.get(e.file_index) and e.last_in_file and e.file_index < len(files) - 1:
            return fail("malformed", seq + 1, f"{e.path.name} has a torn line but is not the last file", e)
        digest = line_hash(e.line)
        if seq in wanted:
            if wanted.pop(seq) != digest:
                return fail("edited", seq, f"{where}: seq {seq} does not match its anchor", e)
            report.anchors_checked += 1
        prev_hash = digest
        expected = seq + 1
        report.records += 1
        report.last_seq = seq
        report.head = digest
        last = e
    report.torn_bytes = torn.get(len(files) - 1, 0) if files else 0
    if last is not None and last.record is not None:
        closes = last.record.get(F.CLOSES) if last.record.get(F.EVENT) == F.EVENT_CHECKPOINT else None
        report.closed = closes == "log"
        report.continues = closes == "file"
    if wanted:
        seq = min(wanted)
        if report.first_seq is not None and seq < report.first_seq:
            detail = f"anchored seq {seq} precedes the first file given (seq {report.first_seq})"
            return fail("deleted", seq, detail, None)
        detail = f"the chain ends at seq {report.last_seq}, before anchored seq {seq}: records were cut off the end"
        return fail("truncated", (report.last_seq or 0) + 1, detail, None)
    if report.records == 0 and report.problem is None:
        return fail("malformed", None, "no audit records in the files given", None)
    return report
