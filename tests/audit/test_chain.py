"""The audit writer's chain: seq/prev on every record, signed checkpoints, rotation that keeps one chain, restarts
that continue it (cutting a torn line away and saying so), sinks and subscribers, and the durability modes."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import (
    AuditKeyError,
    AuditLog,
    AuditLogError,
    AuditWriteError,
    SigningKey,
    chain_files,
    load_public_key,
    read_records,
    verify_files,
)
from gateway.audit._chain import verify_signature


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def _all_lines(active: Path) -> list[bytes]:
    return [line for f in chain_files(str(active)) for line in f.read_bytes().splitlines()]


def _wait_for(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_every_record_links_to_the_previous_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(str(path)) as log:
        for i in range(5):
            log.decision(sandbox="s", n=i)
        log.security("host_mismatch", detail="x")
    raw = path.read_bytes().splitlines()
    records = [json.loads(x) for x in raw]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert records[0]["event"] == "header" and records[0]["prev"] == "0" * 64 and records[0]["previous_file"] is None
    for before, line, rec in zip(raw, raw[1:], records[1:], strict=False):
        assert rec["prev"] == hashlib.sha256(before).hexdigest(), line
    assert [r["event"] for r in records[1:-1]] == ["decision"] * 5 + ["security"]
    assert records[-1]["event"] == "checkpoint" and records[-1]["closes"] == "log"
    assert all(
        line == json.dumps(r, separators=(",", ":"), sort_keys=True).encode()
        for line, r in zip(raw, records, strict=True)
    )


def test_checkpoints_every_n_records_are_signed_with_the_state_key(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(str(path), checkpoint_records=3) as log:
        for i in range(7):
            log.decision(n=i)
    key_file = tmp_path / "audit-signing-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    public = load_public_key(str(key_file))
    records = _lines(path)
    checkpoints = [(i, r) for i, r in enumerate(records) if r["event"] == "checkpoint"]
    # header + 2 decisions, then every 3 records; the last one closes the log
    assert [r["seq"] for _, r in checkpoints] == [4, 8, 11]
    for i, cp in checkpoints:
        assert cp["file_records"] == i
        assert verify_signature(public, cp)
        assert not verify_signature(public, {**cp, "file_records": i + 1})
    assert checkpoints[-1][1]["closes"] == "log"
    other = SigningKey.load_or_create(str(tmp_path / "other.pem")).public
    assert not verify_signature(other, checkpoints[0][1])


def test_checkpoint_by_time_signs_a_quiet_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(str(path), checkpoint_interval_s=0.05) as log:
        log.decision(n=1)
        _wait_for(lambda: any(r["event"] == "checkpoint" for r in _lines(path)), "a timed checkpoint")
        n_checkpoints = log.stats()["checkpoints"]
        # nothing new to sign: no further checkpoints while idle
        time.sleep(0.3)
        assert log.stats()["checkpoints"] == n_checkpoints


def test_configured_signing_key_is_used(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(str(tmp_path / "keys" / "k.pem"))
    path = tmp_path / "log" / "audit.jsonl"
    with AuditLog(str(path), signing_key=key.path) as log:
        log.decision(n=1)
    assert not (path.parent / "audit-signing-key.pem").exists()
    cp = _lines(path)[-1]
    assert cp["key_id"] == key.key_id and verify_signature(key.public, cp)


def test_a_key_that_is_not_ed25519_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ec.pem").write_bytes(pem)
    with pytest.raises(AuditKeyError, match="must be Ed25519"):
        AuditLog(str(tmp_path / "audit.jsonl"), signing_key=str(tmp_path / "ec.pem"))
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(AuditKeyError, match="not an unencrypted PEM private key"):
        SigningKey.load(str(tmp_path / "junk.pem"))


def test_rotation_by_size_keeps_one_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(str(path), rotate_bytes=4096) as log:
        for i in range(120):
            log.decision(n=i, path="/v1/" + "x" * 60)
    files = chain_files(str(path))
    assert len(files) >= 3 and files[-1] == path
    for older, newer in itertools.pairwise(files):
        closing_line = older.read_bytes().splitlines()[-1]
        closing, header = json.loads(closing_line), _lines(newer)[0]
        assert closing["event"] == "checkpoint" and closing["closes"] == "file"
        assert header["event"] == "header" and header["previous_file"] == older.name
        assert header["prev"] == hashlib.sha256(closing_line).hexdigest() and header["seq"] == closing["seq"] + 1
        assert older.name.startswith(f"audit.{_lines(older)[0]['seq']:012d}.") and older.suffix == ".jsonl"
        assert older.stat().st_size < 4096 + 1024
    assert [r["n"] for r in read_records(reversed(files))] == list(range(120))
    report = verify_files(files, [load_public_key(str(tmp_path / "audit-signing-key.pem"))])
    assert report.ok and report.closed and report.first_seq == 1, report.problem


def test_rotation_by_time(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(str(path), rotate_interval_s=0.2) as log:
        log.decision(n=1)
        _wait_for(lambda: len(chain_files(str(path))) == 2, "a rotation by time")
        log.decision(n=2)
    # an idle log holding only its header is not rotated again
    assert len(chain_files(str(path))) == 2
    assert verify_files(chain_files(str(path))).ok


def test_restart_after_clean_shutdown_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(str(path)) as log:
        log.decision(n=1)
    with AuditLog(str(path)) as log:
        log.decision(n=2)
    records = _lines(path)
    assert [r["event"] for r in records] == ["header", "decision", "checkpoint", "decision", "checkpoint"]
    report = verify_files([path])
    assert report.ok and report.closed and report.recoveries == []


_CRASHING_WRITER = """
import os, sys
from gateway.audit import AuditLog
log = AuditLog(sys.argv[1], durability=sys.argv[2])
for i in range(int(sys.argv[3])):
    log.decision(n=i)
with open(sys.argv[1], "ab") as f:
    f.write(sys.argv[4].encode())  # what a write cut short by a crash leaves behind
os._exit(0)  # no close(): no closing checkpoint, as after kill -9
"""


def _crash(path: Path, durability: str, n: int, torn: str) -> None:
    subprocess.run([sys.executable, "-c", _CRASHING_WRITER, str(path), durability, str(n), torn], check=True)


@pytest.mark.parametrize("torn", ['{"event":"decision","n":99,"pr', ""])
def test_restart_after_a_crash_cuts_the_torn_line_and_records_the_recovery(tmp_path: Path, torn: str) -> None:
    path = tmp_path / "audit.jsonl"
    _crash(path, "batched", 10, torn)
    before = verify_files([path])
    assert before.ok and before.torn_bytes == len(torn) and not before.closed and before.last_seq == 11
    with AuditLog(str(path)) as log:
        log.decision(n=10)
    records = _lines(path)
    recovery = records[12 - 1]
    assert recovery["event"] == "recovery" and recovery["seq"] == 12 and recovery["last_seq"] == 11
    assert recovery["torn_bytes"] == len(torn)
    assert recovery["torn_sha256"] == (hashlib.sha256(torn.encode()).hexdigest() if torn else None)
    assert [r["n"] for r in read_records([path])] == list(range(11))
    report = verify_files([path])
    assert report.ok and report.closed and report.recoveries == [12] and report.torn_bytes == 0


def test_a_last_line_that_is_no_record_refuses_to_continue(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(str(path)) as log:
        log.decision(n=1)
    with open(path, "ab") as f:
        f.write(b"this is not json\n")
    with pytest.raises(AuditLogError, match="audit verify"):
        AuditLog(str(path))


def test_a_log_from_before_the_chain_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event":"decision","time":"2025-01-01T00:00:00Z"}\n')
    with AuditLog(str(path)) as log:
        log.decision(n=1)
    (legacy,) = tmp_path.glob("audit.legacy-*.jsonl")
    assert legacy.read_text().startswith('{"event":"decision"')
    assert _lines(path)[0]["seq"] == 1 and verify_files([path]).ok


def test_subscribers_get_every_record_and_a_failing_one_changes_nothing(tmp_path: Path) -> None:
    seen: list[Mapping[str, Any]] = []

    def broken(record: Mapping[str, Any]) -> None:
        raise RuntimeError("subscriber bug")

    with AuditLog(str(tmp_path / "audit.jsonl"), checkpoint_records=2) as log:
        log.subscribe(broken)
        log.subscribe(seen.append)
        for i in range(3):
            log.decision(n=i)
    assert [r["event"] for r in seen] == ["decision", "checkpoint", "decision", "decision", "checkpoint", "checkpoint"]
    assert [r["seq"] for r in seen] == list(range(2, 8))
    assert verify_files([tmp_path / "audit.jsonl"]).ok


class _Sink:
    def __init__(self, log_box: list[AuditLog]) -> None:
        self.items: list[tuple[bytes, int, int]] = []
        self.closed = False
        self._log = log_box

    def submit(self, line: bytes, record: Mapping[str, Any]) -> None:
        # (line, its seq, what the log had fsynced when the sink got it)
        self.items.append((line, int(record["seq"]), self._log[0].durable_seq if self._log else -1))

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("durability", ["batched", "strict", "none"])
def test_sinks_get_each_line_in_order_once_it_is_in_the_file(tmp_path: Path, durability: str) -> None:
    box: list[AuditLog] = []
    sink = _Sink(box)
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), durability=durability, sinks=[sink], checkpoint_records=4)
    box.append(log)
    for i in range(10):
        log.decision(n=i)
    log.close()
    assert sink.closed
    file_lines = path.read_bytes().splitlines()
    assert [line for line, _, _ in sink.items] == file_lines
    if durability != "none":
        # (-1: the header, submitted while the log was still being constructed)
        assert all(seq <= synced or (synced == -1 and seq == 1) for _, seq, synced in sink.items), sink.items


def test_strict_durable_returns_after_an_fsync_covering_the_record_and_groups_commits(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"), durability="strict")

    async def main() -> list[int]:
        seqs = [log.write({"event": "decision", "n": i}) for i in range(200)]
        await asyncio.gather(*(log.durable(s) for s in seqs))
        return seqs

    seqs = asyncio.run(main())
    assert log.durable_seq >= seqs[-1]
    stats = log.stats()
    # one fsync covers every record written while the previous one ran: far fewer fsyncs than records
    assert 1 <= stats["fsyncs"] < 50, stats
    log.close()


def test_none_never_fsyncs_while_running(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"), durability="none")
    for i in range(50):
        log.decision(n=i)
    asyncio.run(log.durable(log.last_seq))  # returns at once: nothing is ever fsynced in this mode
    assert log.stats()["fsyncs"] == 0 and log.durable_seq == 1  # only opening synced the header
    log.close()
    assert verify_files([tmp_path / "audit.jsonl"]).ok


def test_a_failed_write_stops_the_log_and_strict_waiters_are_refused(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"), durability="strict")
    log.decision(n=1)
    asyncio.run(log.durable(log.last_seq))
    # /dev/full: every write fails with ENOSPC, as on a full disk (swapped under the log's lock: the writer thread
    # must not be fsyncing the old descriptor meanwhile)
    with log._cond:
        while log._syncing:
            log._cond.wait()
        os.close(log._fd)  # type: ignore[arg-type]
        log._fd = os.open("/dev/full", os.O_WRONLY)
    seq = log.write({"event": "decision", "n": 2})

    async def wait() -> None:
        await log.durable(seq + 1)

    with pytest.raises(AuditWriteError, match="No space left"):
        asyncio.run(wait())
    assert log.stats()["dropped"] == 1 and "No space left" in str(log.stats()["error"])
    log.decision(n=3)  # never raises: the gateway keeps serving in batched/none, strict refuses in durable()
    assert log.stats()["dropped"] == 2
    log.close()


def test_records_after_close_are_dropped_not_appended(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.decision(n=1)
    log.close()
    log.decision(n=2)
    log.close()
    assert [r["event"] for r in _lines(path)] == ["header", "decision", "checkpoint"]
    assert log.stats()["dropped"] == 1


def test_in_memory_log_numbers_records(tmp_path: Path) -> None:
    log = AuditLog(None)
    seen: list[int] = []
    log.subscribe(lambda r: seen.append(int(r["seq"])))
    log.decision(n=1)
    log.decision(n=2)
    assert seen == [1, 2] and log.key is None and not log.holds_responses
    asyncio.run(log.durable(2))
    log.close()
