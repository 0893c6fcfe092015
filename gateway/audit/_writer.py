"""The audit log: one canonical JSON line per decision, security event and admin change, in a signed hash chain.

Lines are built from plain values (no mitmproxy objects), serialised with orjson with sorted keys so that the same
record always has the same bytes, and appended with a single write() each so concurrent readers never see half a
line. Secret values never reach this module: records name a credential, they never carry one.

Every record gets `seq` and `prev` (see `_chain`); every `checkpoint_records` records or `checkpoint_interval_s`
seconds, at rotation and at a clean shutdown, a checkpoint signed with the gateway's Ed25519 key follows.

Durability (`Durability`): every record is written to the file at once in every mode (so a process crash, even
`kill -9`, loses nothing and readers see records immediately); what differs is fsync. `none` never fsyncs;
`batched` has a writer thread fsync whatever was written, at most every `batch_ms`; `strict` does the same without
waiting, and `await durable(seq)` returns once an fsync that covers `seq` has completed: one fsync covers every
record written while the previous one ran (group commit). The addon awaits it before a response goes out.

Errors: `AuditLogError` (the file cannot be opened or continued) at start; `AuditWriteError` from `durable()` once
a write or fsync has failed (the log stops there: a chain with a hole would not verify). `write()` never raises
for I/O: it is called from every corner of the gateway, and in `strict` mode `durable()` is what refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any, Protocol

import orjson

from . import _fields as F
from ._chain import SigningKey, checkpoint_payload, encode, line_hash, rotated_files, rotated_name

__all__ = [
    "AuditLog",
    "AuditLogError",
    "AuditSink",
    "AuditWriteError",
    "Durability",
    "redact_path",
]

log = logging.getLogger("cube_egress.audit")

_REDACTED = "REDACTED"


_PARAM_NAME = re.compile(r"^[A-Za-z0-9_.\-\[\]]{1,40}$")


def redact_path(path: str) -> str:
    """Keep the path and the names of query parameters; replace every value (tokens often travel there).

    A "name" that does not look like one (too long, odd characters, or a bare `?token` with no `=`) is itself
    replaced: the secret may be the whole query.
    """
    bare, sep, query = path.partition("?")
    if not sep:
        return bare
    parts = []
    for item in query.split("&"):
        name, eq, _ = item.partition("=")
        parts.append(f"{name}={_REDACTED}" if eq and _PARAM_NAME.match(name) else _REDACTED)
    return bare + "?" + "&".join(parts)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _stamp(when: dt.datetime) -> str:
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


class Durability(StrEnum):
    NONE = "none"  # write(), never fsync (the page cache survives a process crash, not a power loss)
    BATCHED = "batched"  # write(), fsync by a writer thread at most every batch_ms
    STRICT = "strict"  # as batched without the wait; responses wait for `durable(seq)`


class AuditLogError(ValueError):
    """The audit file's content cannot be continued (the message says what to do). A ValueError, like a bad
    config: the gateway refuses to start with it (an unreadable file is an OSError)."""


class AuditWriteError(RuntimeError):
    """A record could not be made durable: the disk failed, or the log was closed first."""


class AuditSink(Protocol):
    """Somewhere records go besides the file (syslog, a webhook: gateway/audit/_sinks.py).

    `submit` gets each record's exact line (no newline) and its fields, in seq order, once the line is in the
    file (and, with durability batched or strict, on disk): a sink never holds a record the local chain lacks.
    It is called from the log's writer thread and must not block (the sink owns its queue and thread).
    """

    def submit(self, line: bytes, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


Subscriber = Callable[[Mapping[str, Any]], None]
_Waiter = tuple[int, asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class AuditLog:
    """Append-only, hash-chained JSON-lines file. `path=None` keeps nothing but the chain state in memory (for
    `policy explain` and tests); it still numbers records and calls subscribers."""

    def __init__(
        self,
        path: str | None,
        *,
        durability: Durability | str = Durability.BATCHED,
        signing_key: str | None = None,
        checkpoint_records: int = 1000,
        checkpoint_interval_s: float = 10.0,
        rotate_bytes: int | None = None,
        rotate_interval_s: float | None = None,
        batch_ms: float = 5.0,
        sinks: Sequence[AuditSink] = (),
    ) -> None:
        if checkpoint_records < 1 or checkpoint_interval_s <= 0 or batch_ms < 0:
            raise ValueError("checkpoint_records >= 1, checkpoint_interval_s > 0 and batch_ms >= 0 are required")
        if rotate_bytes is not None and rotate_bytes < 4096:
            raise ValueError("rotate_bytes must be at least 4096")
        if rotate_interval_s is not None and rotate_interval_s <= 0:
            raise ValueError("rotate_interval_s must be positive")
        self.path = path
        self.durability = Durability(durability)
        self._checkpoint_records = checkpoint_records
        self._checkpoint_interval = checkpoint_interval_s
        self._rotate_bytes = rotate_bytes
        self._rotate_interval = rotate_interval_s
        self._batch_s = batch_ms / 1000
        self._sinks = list(sinks)
        self._subscribers: list[Subscriber] = []
        self._cond = threading.Condition(threading.Lock())
        self._fd: int | None = None
        self._key: SigningKey | None = None
        # chain state
        self._seq = 0
        self._head = F.GENESIS
        self._file_first_seq = 1
        self._file_records = 0
        self._file_bytes = 0
        self._file_started = _now()
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        # durability state
        self._synced_seq = 0
        self._syncing = False
        self._last_sync = 0.0
        self._waiters: list[_Waiter] = []
        self._unsynced_for_sinks: list[tuple[bytes, dict[str, Any]]] = []
        self._close_after_sync: list[int] = []
        self._error: BaseException | None = None
        self._closed = False
        # figures (stats())
        self._records = 0
        self._fsyncs = 0
        self._checkpoints = 0
        self._rotations = 0
        self._dropped = 0
        self._thread: threading.Thread | None = None
        if path is not None:
            keyfile = signing_key or os.path.join(os.path.dirname(os.path.abspath(path)), "audit-signing-key.pem")
            self._key = SigningKey.load_or_create(keyfile)
            self._open()
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    # -- public surface -------------------------------------------------------------------------------------

    @property
    def key(self) -> SigningKey | None:
        return self._key

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def durable_seq(self) -> int:
        """Every record up to this seq has been fsynced (always 0 with durability `none`)."""
        return self._synced_seq

    @property
    def holds_responses(self) -> bool:
        """True when responses must wait for `durable()` (durability `strict` on a real file)."""
        return self.durability is Durability.STRICT and self.path is not None

    @property
    def records_written(self) -> int:
        return self._records

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "records": self._records,
                "last_seq": self._seq,
                "durable_seq": self._synced_seq,
                "fsyncs": self._fsyncs,
                "checkpoints": self._checkpoints,
                "rotations": self._rotations,
                "dropped": self._dropped,
                "durability": str(self.durability),
                "error": None if self._error is None else str(self._error),
            }

    def subscribe(self, fn: Subscriber) -> None:
        """Call `fn(record)` synchronously after each record is appended (chain records included). It must be
        cheap; an exception in it is logged and changes nothing else."""
        self._subscribers.append(fn)

    def write(self, record: Mapping[str, Any]) -> int:
        """Append one record; returns its seq (0 when the log is closed and the record was dropped)."""
        assert F.SEQ not in record and F.PREV not in record, "seq and prev belong to the log"
        appended: list[dict[str, Any]] = []
        with self._cond:
            if self._closed:
                self._dropped += 1
                if self._dropped == 1:
                    log.warning("audit log already closed: dropping records (first: %s)", record.get(F.EVENT))
                return 0
            before = self._seq
            seq = self._append_locked(record, appended)
            if self._fd is not None:
                if self._since_checkpoint >= self._checkpoint_records:
                    self._checkpoint_locked(None, appended)
                if self._rotate_bytes is not None and self._file_bytes >= self._rotate_bytes:
                    self._rotate_locked(appended)
                if self.durability is Durability.STRICT or (
                    self.durability is Durability.BATCHED and before == self._synced_seq
                ):
                    self._cond.notify()
        self._notify(appended)
        return seq

    def decision(self, **fields: Any) -> None:
        self.write({F.EVENT: F.EVENT_DECISION, **fields})

    def security(self, kind: str, **fields: Any) -> None:
        assert kind in F.SECURITY_KINDS, kind
        self.write({F.EVENT: F.EVENT_SECURITY, F.KIND: kind, **fields})

    def admin(self, action: str, via: str, peer: str | None = None, **fields: Any) -> int:
        """A change of the policy in force (one of `F.ADMIN_ACTIONS`) made `via` one of `F.ADMIN_VIAS` (the admin
        API names its `peer`); returns its seq."""
        assert action in F.ADMIN_ACTIONS, action
        assert via in F.ADMIN_VIAS, via
        who = {F.VIA: via} if peer is None else {F.VIA: via, F.PEER: peer}
        return self.write({F.EVENT: F.EVENT_ADMIN, F.ACTION: action, **who, **fields})

    async def durable(self, seq: int) -> None:
        """Return once record `seq` is on disk (fsynced). Immediate with durability `none` (nothing is ever
        fsynced then) and for an in-memory log. Raises AuditWriteError if the log failed or closed first."""
        if self._error is not None:
            raise AuditWriteError(f"audit log failed: {self._error}")
        if self.path is None or self.durability is Durability.NONE or seq <= self._synced_seq:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if seq <= self._synced_seq:
                return
            if self._error is not None:
                raise AuditWriteError(f"audit log failed: {self._error}")
            if self._closed and self._thread is None:
                raise AuditWriteError(f"audit log closed before record {seq} was on disk")
            self._waiters.append((seq, loop, fut))
            self._cond.notify()
        await fut

    def close(self) -> None:
        """Write the closing checkpoint, fsync, and stop the writer thread; later writes are dropped."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        appended: list[dict[str, Any]] = []
        with self._cond:
            self._thread = None
            if self._fd is not None:
                if self._error is None:
                    self._checkpoint_locked("log", appended)
                    try:
                        os.fdatasync(self._fd)
                        self._fsyncs += 1
                        self._synced_to_locked(self._seq)
                    except OSError as e:
                        self._fail_locked(e)
                os.close(self._fd)
                self._fd = None
            for fd in self._close_after_sync:
                os.close(fd)
            self._close_after_sync.clear()
            self._fail_waiters_locked(AuditWriteError("audit log closed"))
        self._notify(appended)
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                log.exception("audit sink %r failed to close", sink)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- appending (all under self._cond) -------------------------------------------------------------------

    def _append_locked(self, record: Mapping[str, Any], appended: list[dict[str, Any]], sign: bool = False) -> int:
        if self._error is not None:
            self._dropped += 1
            return self._seq
        seq = self._seq + 1
        full: dict[str, Any] = {F.TIME: _stamp(_now()), **record, F.SEQ: seq, F.PREV: self._head}
        if sign:
            assert self._key is not None
            full[F.SIGNATURE] = self._key.sign(checkpoint_payload(full))
        line = encode(full)
        if self._fd is not None:
            try:
                _write_all(self._fd, line + b"\n")
            except OSError as e:
                # A partial line may be in the file now; nothing may follow it (docs/audit.md, "Durability").
                self._fail_locked(e)
                self._dropped += 1
                return self._seq
        self._seq = seq
        self._head = line_hash(line)
        self._records += 1
        self._file_records += 1
        self._file_bytes += len(line) + 1
        self._since_checkpoint += 1
        if self._sinks:
            if self._fd is None or self.durability is Durability.NONE:
                self._submit((line, full))
            else:
                self._unsynced_for_sinks.append((line, full))
        appended.append(full)
        return seq

    def _checkpoint_locked(self, closes: str | None, appended: list[dict[str, Any]]) -> None:
        record = {
            F.EVENT: F.EVENT_CHECKPOINT,
            F.KEY_ID: self._key.key_id if self._key else None,
            F.FILE_RECORDS: self._file_records,
            F.CLOSES: closes,
        }
        self._append_locked(record, appended, sign=True)
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._checkpoints += 1

    def _header_locked(self, previous_file: str | None, appended: list[dict[str, Any]]) -> None:
        self._file_first_seq = self._seq + 1
        self._file_records = 0
        self._file_bytes = 0
        self._file_started = _now()
        record = {
            F.EVENT: F.EVENT_HEADER,
            F.FORMAT: 1,
            F.PREVIOUS_FILE: previous_file,
            F.KEY_ID: self._key.key_id if self._key else None,
        }
        self._append_locked(record, appended)

    def _rotate_locked(self, appended: list[dict[str, Any]]) -> None:
        """Close the file with a checkpoint, make it durable, rename it, start the next file with a header."""
        assert self.path is not None and self._fd is not None
        if self._error is not None:
            return
        self._checkpoint_locked("file", appended)
        old = self._fd
        rotated = rotated_name(self.path, self._file_first_seq, _now())
        try:
            # The closing checkpoint is on disk before the next file can claim to follow it.
            os.fdatasync(old)
            self._fsyncs += 1
            os.rename(self.path, rotated)
            self._fd = _open_append(self.path)
            _fsync_dir(self.path)
        except OSError as e:
            self._fail_locked(e)
            return
        self._synced_to_locked(self._seq)
        if self._syncing:
            self._close_after_sync.append(old)  # the writer thread is fsyncing it right now
        else:
            os.close(old)
        self._rotations += 1
        self._header_locked(os.path.basename(rotated), appended)
        log.info("audit log rotated to %s", rotated)

    # -- durability (writer thread) -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            appended: list[dict[str, Any]] = []
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    wake = self._timers_locked(now, appended)
                    if appended:
                        break  # notify subscribers outside the lock, then come back
                    dirty = self._seq > self._synced_seq and self._fd is not None and self._error is None
                    if dirty and self.durability is not Durability.NONE:
                        # strict (or anyone waiting): now; batched: once batch_ms have passed since the last fsync
                        hurry = self.durability is Durability.STRICT or bool(self._waiters)
                        ready_at = now if hurry else self._last_sync + self._batch_s
                        if ready_at <= now:
                            break
                        wake = min(wake, ready_at)
                    self._cond.wait(max(0.0, wake - now))
                if appended:
                    target, fd = 0, None
                else:
                    target, fd = self._seq, self._fd
                    self._syncing = True
            self._notify(appended)
            if fd is None:
                continue
            error: OSError | None = None
            try:
                os.fdatasync(fd)
            except OSError as e:
                error = e
            with self._cond:
                self._syncing = False
                self._fsyncs += 1
                self._last_sync = time.monotonic()
                for old in self._close_after_sync:
                    os.close(old)
                self._close_after_sync.clear()
                if error is not None:
                    self._fail_locked(error)
                else:
                    self._synced_to_locked(target)
                self._cond.notify_all()

    def _timers_locked(self, now: float, appended: list[dict[str, Any]]) -> float:
        """Checkpoint and rotate by time; returns when to look again."""
        if self._fd is None or self._error is not None:
            return now + 3600
        if self._since_checkpoint and now - self._last_checkpoint >= self._checkpoint_interval:
            self._checkpoint_locked(None, appended)
        # With nothing to sign yet, look again within a second: write() does not wake this thread for that.
        idle = now + min(self._checkpoint_interval, 1.0)
        wake = self._last_checkpoint + self._checkpoint_interval if self._since_checkpoint else idle
        if self._rotate_interval is not None:
            left = self._file_started.timestamp() + self._rotate_interval - time.time()
            if left <= 0 and self._file_records > 1:  # a file holding only its header is not worth closing
                self._rotate_locked(appended)
                left = self._rotate_interval
            wake = min(wake, now + left if left > 0 else idle)
        return wake

    def _synced_to_locked(self, seq: int) -> None:
        if seq > self._synced_seq:
            self._synced_seq = seq
        if self._waiters:
            ready = [w for w in self._waiters if w[0] <= self._synced_seq]
            if ready:
                self._waiters = [w for w in self._waiters if w[0] > self._synced_seq]
                _settle(ready, None)
        if self._unsynced_for_sinks:
            n = 0
            for item in self._unsynced_for_sinks:
                if item[1][F.SEQ] > self._synced_seq:
                    break
                self._submit(item)
                n += 1
            del self._unsynced_for_sinks[:n]

    def _fail_locked(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
            log.error("audit log %s failed, no further records are written: %s", self.path, error)
        self._fail_waiters_locked(AuditWriteError(f"audit log failed: {error}"))

    def _fail_waiters_locked(self, error: AuditWriteError) -> None:
        waiters, self._waiters = self._waiters, []
        _settle(waiters, error)

    def _submit(self, item: tuple[bytes, dict[str, Any]]) -> None:
        for sink in self._sinks:
            try:
                sink.submit(*item)
            except Exception:
                log.exception("audit sink %r failed", sink)

    def _notify(self, appended: Iterable[dict[str, Any]]) -> None:
        for record in appended:
            for fn in self._subscribers:
                try:
                    fn(record)
                except Exception:
                    log.exception("audit subscriber %r failed", fn)

    # -- opening and recovery -------------------------------------------------------------------------------

    def _open(self) -> None:
        """Continue the chain from the last complete record on disk (active file, else the newest rotated file);
        cut away a torn last line and say so in a `recovery` record."""
        assert self.path is not None
        path = self.path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torn = b""
        last: dict[str, Any] | None = None
        if os.path.exists(path) and os.path.getsize(path) > 0:
            first_line = _first_line(path)
            if first_line is not None and _seq_of(first_line) is None:
                aside = _legacy_name(path)
                os.rename(path, aside)
                log.warning("audit: %s predates the hash chain; moved to %s, a new chain starts", path, aside)
            else:
                last_line, torn = _tail(path)
                if torn:
                    os.truncate(path, os.path.getsize(path) - len(torn))
                if last_line is not None:
                    last = _parse_last(path, last_line)
                    assert first_line is not None
                    self._file_first_seq = _seq_of(first_line) or 1
                    self._file_started = _time_of(first_line) or _now()
        appended: list[dict[str, Any]] = []
        self._fd = _open_append(path)
        if last is not None:
            self._seq, self._head = int(last[F.SEQ]), last["_hash"]
            self._file_records = self._seq - self._file_first_seq + 1
            self._file_bytes = os.path.getsize(path)
        else:
            # A new file: continue the newest rotated file's chain, if any.
            previous = None
            rotated = rotated_files(path)
            if rotated:
                line, _ = _tail(str(rotated[-1]))
                if line is None:
                    raise AuditLogError(f"{rotated[-1]}: rotated audit file has no complete record")
                prev_last = _parse_last(str(rotated[-1]), line)
                self._seq, self._head = int(prev_last[F.SEQ]), prev_last["_hash"]
                previous = rotated[-1].name
                if prev_last.get(F.CLOSES) is None:
                    last = prev_last  # the file was not closed: recovery below
            self._header_locked(previous, appended)
            _fsync_dir(path)
        unclean = last is not None and not (
            last.get(F.EVENT) == F.EVENT_CHECKPOINT and last.get(F.CLOSES) in ("log", "file")
        )
        if torn or unclean:
            self._append_locked(
                {
                    F.EVENT: F.EVENT_RECOVERY,
                    F.LAST_SEQ: int(last[F.SEQ]) if last else self._seq,
                    F.TORN_BYTES: len(torn),
                    F.TORN_SHA256: line_hash(torn) if torn else None,
                    F.DETAIL: "the previous run did not shut down cleanly"
                    + (f"; a torn last line of {len(torn)} bytes was cut away" if torn else ""),
                },
                appended,
            )
            log.warning("audit: continuing %s after an unclean shutdown (seq %d)", path, self._seq)
        os.fdatasync(self._fd)
        self._synced_to_locked(self._seq)
        self._last_sync = time.monotonic()


def _settle(waiters: Sequence[_Waiter], error: BaseException | None) -> None:
    """Complete waiting futures on their own loops (one call per loop, not per waiter)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for _, loop, fut in waiters:
        by_loop.setdefault(loop, []).append(fut)
    for loop, futs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(_complete, futs, error)


def _complete(futs: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for fut in futs:
        if not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(path: str) -> bytes | None:
    with open(path, "rb") as f:
        line = f.readline(1 << 20)
    return line.rstrip(b"\n") if line.endswith(b"\n") else None


def _tail(path: str) -> tuple[bytes | None, bytes]:
    """(the last complete line or None, the bytes after the last newline)."""
    size = os.path.getsize(path)
    chunk = 1 << 16
    with open(path, "rb") as f:
        while True:
            start = max(0, size - chunk)
            f.seek(start)
            data = f.read(size - start)
            body, sep, torn = data.rpartition(b"\n")
            if not sep:
                if start == 0:
                    return None, data
                chunk *= 4
                continue
            line_start = body.rfind(b"\n")
            if line_start == -1 and start > 0:
                chunk *= 4
                continue
            return body[line_start + 1 :], torn


def _parse_last(path: str, line: bytes) -> dict[str, Any]:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get(F.SEQ), int):
        raise AuditLogError(
            f"{path}: the last complete line is not an audit record, so the chain cannot be continued; run "
            "`cube-egress audit verify` on it, then move it aside to start a new chain"
        )
    record["_hash"] = line_hash(line)
    return record


def _seq_of(line: bytes) -> int | None:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    seq = record.get(F.SEQ) if isinstance(record, dict) else None
    return seq if isinstance(seq, int) else None


def _time_of(line: bytes) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(orjson.loads(line)[F.TIME])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _legacy_name(path: str) -> str:
    stem, suffix = os.path.splitext(path)
    return f"{stem}.legacy-{_now().strftime('%Y%m%dT%H%M%SZ')}{suffix}"
