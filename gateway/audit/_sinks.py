"""Audit sinks: every audit line also goes to a SIEM, over syslog (RFC 5424, UDP or TCP) or an HTTP webhook.

The audit file itself is the first sink and always on; these are extra copies. `make_sinks(configs, state_dir)`
builds them from `audit.sinks` in the gateway config; `AuditLog` calls `submit(line, record)` for every line it
appends (checkpoints included) once the line is in the file, and `close()` at shutdown.

Each sink owns a `_Spool` and a thread. `submit` never blocks on the network: the line goes to a bounded
in-memory queue, or, when that is full or the receiver is failing, to segment files in the sink's spool directory
(`<state_dir>/sinks/<name>/`). The thread delivers in order, in batches; a failed delivery moves the memory queue to
disk (so a crash while the receiver is down loses nothing either) and is retried with exponential backoff and
jitter; the spool is replayed in order once the receiver is back, then the sink returns to memory. `close()`
delivers what it can within `close_timeout_s` and writes the rest to the spool, which the next start delivers
first. Delivery is at least once: a receiver removes duplicates by the record's id (its `seq`, or the SHA-256 of its
line, which is also the OCSF `metadata.uid`); each webhook batch also carries an id (`X-Cube-Egress-Batch`). What is
lost: lines beyond `spool_max_bytes` (counted and logged), and over UDP whatever the network drops (use TCP).

Formats (`format`): `jsonl` the audit line itself (byte for byte, so a receiver can check the hash chain), `ocsf`
the OCSF event (`_ocsf`; ledger records are skipped), `cef` the CEF line (`_cef`; ledger records are skipped).
Nothing secret is sent: records carry none, and the webhook's Authorization value (read from a file) is never
logged, nor is the webhook URL beyond its host and port.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import random
import re
import select
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import _fields as F
from ._cef import to_cef
from ._ocsf import ExportError, Severity, is_event, judge, to_ocsf
from ._writer import AuditSink

__all__ = [
    "SinkConfig",
    "SyslogSinkConfig",
    "WebhookSinkConfig",
    "make_sinks",
    "rebase_sinks",
    "syslog_message",
]

log = logging.getLogger("cube_egress.audit.sinks")


class _NoSinkRequests(logging.Filter):
    """httpx logs every request's full URL at INFO; a SIEM URL may carry a token in its query. Not from a sink's
    thread, then (the sink logs failures itself, with host and port only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.threadName or not record.threadName.startswith(_THREAD_PREFIX)


_THREAD_PREFIX = "audit-sink-"
logging.getLogger("httpx").addFilter(_NoSinkRequests())

SinkFormat = Literal["jsonl", "ocsf", "cef"]


# -- configuration -----------------------------------------------------------------------------------------------


class _SinkBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # the spool directory
    format: SinkFormat = "jsonl"
    memory_records: int = Field(default=10_000, ge=1)  # the in-memory queue; beyond it lines go to the spool
    spool_max_bytes: int = Field(default=1 << 30, ge=1 << 16)  # beyond it new lines are dropped (and counted)
    batch_records: int = Field(default=500, ge=1)
    batch_bytes: int = Field(default=1 << 20, ge=1024)
    flush_interval_s: float = Field(default=1.0, ge=0)  # how long a batch may wait to fill up
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    close_timeout_s: float = Field(default=5.0, ge=0)  # at shutdown: deliver for this long, then spool the rest
    timeout_s: float = Field(default=10.0, gt=0)  # one delivery attempt (connect + send)


class SyslogSinkConfig(_SinkBase):
    """RFC 5424 messages over UDP (RFC 5426: one per datagram) or TCP (RFC 6587 octet counting)."""

    type: Literal["syslog"]
    host: str = Field(min_length=1)
    port: int = Field(default=514, ge=1, le=65535)
    transport: Literal["udp", "tcp"] = "udp"
    facility: Literal[
        "kern", "user", "daemon", "auth", "syslog", "authpriv", "local0", "local1", "local2", "local3", "local4",
        "local5", "local6", "local7",
    ] = "local0"  # fmt: skip
    hostname: str | None = None  # the HOSTNAME field; default this machine's name
    app_name: str = "cube-egress"
    flush_interval_s: float = Field(default=0.0, ge=0)  # syslog lines go out as they come

    def default_name(self) -> str:
        return f"syslog-{self.transport}-{self.host}-{self.port}"


class WebhookSinkConfig(_SinkBase):
    """Batches POSTed as newline-delimited JSON (`jsonl`, `ocsf`) or CEF lines (`cef`)."""

    type: Literal["webhook"]
    url: str
    headers: dict[str, str] = Field(default_factory=dict)  # extra request headers (never logged)
    authorization_file: str | None = None  # the Authorization header's value, e.g. "Bearer ..." or "Splunk ..."
    ca_file: str | None = None  # CA bundle for an https receiver (default: the system's)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("webhook url must be http:// or https:// with a host")
        if parts.username or parts.password:
            raise ValueError("webhook url must not carry credentials; use authorization_file")
        return url

    def default_name(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        return f"webhook-{parts.hostname}-{parts.port or (443 if parts.scheme == 'https' else 80)}"


SinkConfig = Annotated[SyslogSinkConfig | WebhookSinkConfig, Field(discriminator="type")]


def rebase_sinks(sinks: Sequence[SyslogSinkConfig | WebhookSinkConfig], rel: Any) -> list[Any]:
    """The sinks with their file paths made relative to the config file (gateway.config._rebase)."""
    out: list[Any] = []
    for s in sinks:
        if isinstance(s, WebhookSinkConfig):
            s = s.model_copy(update={"authorization_file": rel(s.authorization_file), "ca_file": rel(s.ca_file)})
        out.append(s)
    return out


def make_sinks(configs: Sequence[SyslogSinkConfig | WebhookSinkConfig], state_dir: str) -> list[AuditSink]:
    """The configured sinks, started, each spooling under `<state_dir>/sinks/<name>/`. Raises ValueError for a
    configuration that cannot work (two sinks with one name, an unreadable or world-readable authorization file)."""
    names = [c.name or _safe_name(c.default_name()) for c in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"audit sinks: two sinks named {', '.join(dupes)}; give each a distinct 'name'")
    sinks: list[AuditSink] = []
    try:
        for config, name in zip(configs, names, strict=True):
            spool = os.path.join(state_dir, "sinks", name)
            if isinstance(config, SyslogSinkConfig):
                sinks.append(SyslogSink(config, name, spool))
            else:
                sinks.append(WebhookSink(config, name, spool))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64]


# -- the spool -----------------------------------------------------------------------------------------------------

_SEGMENT = re.compile(r"^(\d{20})\.jsonl$")
_FIRST_SEGMENT = 10**15  # numbers count up for appends and down for the memory queue spilled in front


class _Spool:
    """A FIFO of lines: memory first, then numbered segment files, order preserved across both and restarts.

    Invariants (under `cond`): lines in `_mem` are older than any on disk; once anything is on disk (a segment, or
    `_replay`, the head segment being delivered) new lines go to disk too, until the disk part is drained. So the
    order is always `_mem`, `_replay`, `_segments`. Only the sink's thread takes and acknowledges."""

    def __init__(self, directory: str, memory_records: int, max_bytes: int, segment_records: int = 1000) -> None:
        self.dir = directory
        self.cond = threading.Condition(threading.Lock())
        self._memory_records = memory_records
        self._max_bytes = max_bytes
        self._segment_records = segment_records
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._segments: collections.deque[int] = collections.deque()
        self._disk_bytes = 0
        for entry in sorted(os.listdir(directory)):
            m = _SEGMENT.match(entry)
            if m:
                self._segments.append(int(m[1]))
                self._disk_bytes += os.path.getsize(os.path.join(directory, entry))
            elif entry.endswith(".tmp"):
                os.unlink(os.path.join(directory, entry))  # a spill that did not finish; its lines were in memory
        self._next = (self._segments[-1] + 1) if self._segments else _FIRST_SEGMENT
        self._mem: collections.deque[bytes] = collections.deque()
        self._replay: collections.deque[bytes] = collections.deque()
        self._replay_no: int | None = None
        self._tail: int | None = None
        self._tail_records = 0
        self._taken_from: collections.deque[bytes] | None = None
        self.closed = False
        self.dropped = 0
        self.spilled = 0

    def _path(self, no: int) -> str:
        return os.path.join(self.dir, f"{no:020d}.jsonl")

    @property
    def on_disk(self) -> bool:
        return bool(self._segments) or bool(self._replay)

    def has_lines(self) -> bool:
        return bool(self._mem) or self.on_disk

    def memory_full(self, n: int) -> bool:
        return len(self._mem) >= n

    def stats(self) -> dict[str, int]:
        return {"memory": len(self._mem), "spool_bytes": self._disk_bytes, "dropped": self.dropped}

    def put(self, line: bytes) -> None:
        with self.cond:
            if not self.closed and not self.on_disk and len(self._mem) < self._memory_records:
                self._mem.append(line)
            else:
                self._append_disk(line)
                if self.closed:
                    self._close_tail(sync=True)  # a late line: on disk for the next start, no fd left open
            self.cond.notify()

    def _append_disk(self, line: bytes) -> None:
        data = line + b"\n"
        if self._disk_bytes + len(data) > self._max_bytes:
            self._drop(f"spool {self.dir} is full ({self._max_bytes} bytes)")
            return
        try:
            if self._tail is None or self._tail_records >= self._segment_records:
                self._close_tail()
                no, self._next = self._next, self._next + 1
                self._tail = os.open(self._path(no), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                self._segments.append(no)
                self._tail_records = 0
            _write_all(self._tail, data)
        except OSError as e:
            self._drop(f"cannot write spool {self.dir}: {e.strerror}")
            return
        self._tail_records += 1
        self._disk_bytes += len(data)
        self.spilled += 1

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 10_000 == 0:
            log.error("audit sink: %s; %d line(s) dropped so far", why, self.dropped)

    def _close_tail(self, sync: bool = False) -> None:
        if self._tail is not None:
            with contextlib.suppress(OSError):
                if sync:
                    os.fsync(self._tail)
            os.close(self._tail)
            self._tail = None

    def peek(self, max_records: int, max_bytes: int) -> list[bytes]:
        """The oldest lines (at least one if any), without removing them. Holds `cond`."""
        if self._mem:
            source = self._mem
        else:
            while not self._replay and self._segments:
                self._load_head()
            source = self._replay
        out: list[bytes] = []
        size = 0
        for line in source:
            if out and (len(out) >= max_records or size + len(line) + 1 > max_bytes):
                break
            out.append(line)
            size += len(line) + 1
        self._taken_from = source
        return out

    def _load_head(self) -> None:
        no = self._segments.popleft()
        if no == self._next - 1:
            self._close_tail()  # the open tail: appends go to a new segment from now on, this one is read as it is
        path = self._path(no)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            log.error("audit sink: cannot read spool segment %s (%s); skipped", path, e.strerror)
            return
        # A crash while appending may leave a partial last line: it is no record and is dropped with the segment.
        lines = data.split(b"\n")[:-1]
        if not lines:
            self._unlink(no, len(data))
            return
        self._replay = collections.deque(lines)
        self._replay_no = no

    def _unlink(self, no: int, size: int | None = None) -> None:
        path = self._path(no)
        try:
            size = os.path.getsize(path) if size is None else size
            os.unlink(path)
        except OSError:
            return
        self._disk_bytes -= size

    def ack(self, n: int) -> None:
        """The first `n` lines of the last peek were delivered."""
        with self.cond:
            if self.closed or self._taken_from is None:
                return  # persisted already: they will be delivered again (at least once)
            for _ in range(min(n, len(self._taken_from))):
                self._taken_from.popleft()
            if self._taken_from is self._replay and not self._replay and self._replay_no is not None:
                self._unlink(self._replay_no)
                self._replay_no = None
            self._taken_from = None

    def spill(self) -> None:
        """Move the memory queue to disk, in front of whatever is there (the receiver is failing: a crash now
        must not lose these lines, and new lines queue behind them on disk)."""
        with self.cond:
            self._spill_memory()

    def _spill_memory(self) -> None:
        if not self._mem:
            return
        assert not self._replay, "memory lines are older than the spool; both cannot be pending"
        no = (self._segments[0] if self._segments else self._next) - 1
        data = b"".join(line + b"\n" for line in self._mem)
        try:
            _write_file(self._path(no), data)
        except OSError as e:
            log.error("audit sink: cannot spill to %s (%s); keeping %d line(s) in memory", self.dir, e, len(self._mem))
            return
        self._segments.appendleft(no)
        self._disk_bytes += len(data)
        self.spilled += len(self._mem)
        self._mem.clear()
        self._taken_from = None

    def persist(self) -> None:
        """At close: everything not yet delivered is on disk, in order, for the next start."""
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self._taken_from = None
            self._spill_memory()
            if self._replay_no is not None:
                data = b"".join(line + b"\n" for line in self._replay)
                try:
                    if data:
                        _write_file(self._path(self._replay_no), data)  # what is left of the head segment
                        self._segments.appendleft(self._replay_no)
                    else:
                        self._unlink(self._replay_no)
                except OSError as e:
                    # The whole segment stays: its delivered lines go out again (at least once).
                    log.error("audit sink: cannot rewrite spool segment in %s (%s)", self.dir, e)
                    self._segments.appendleft(self._replay_no)
                self._replay.clear()
                self._replay_no = None
            self._close_tail(sync=True)
            self._disk_bytes = sum(os.path.getsize(self._path(no)) for no in self._segments)
            self.cond.notify_all()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_file(path: str, data: bytes) -> None:
    """Replace `path` with `data`, durably (write, fsync, rename): a crash leaves the old file or the new one."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- delivery ------------------------------------------------------------------------------------------------------


class _DeliveryFailed(Exception):
    """One delivery attempt failed; the message says why (never a URL, header or body)."""


@dataclass
class SinkStats:
    delivered: int = 0
    batches: int = 0
    failures: int = 0
    skipped: int = 0  # lines the format has no rendering for (ledger records in ocsf/cef) or cannot render


def render(line: bytes, record: Mapping[str, Any], fmt: SinkFormat) -> bytes | None:
    """What a sink sends for one audit line: the line itself, its OCSF event or its CEF line (None: nothing)."""
    if fmt == "jsonl":
        return line
    if fmt == "ocsf":
        event = to_ocsf(record)
        return None if event is None else orjson.dumps(event)
    text = to_cef(record)
    return None if text is None else text.encode()


class _QueuedSink:
    """The thread that delivers a spool in order; subclasses send one batch (`_send`)."""

    def __init__(self, config: SyslogSinkConfig | WebhookSinkConfig, name: str, spool_dir: str) -> None:
        self.name = name
        self.config = config
        self.stats = SinkStats()
        self._spool = _Spool(spool_dir, config.memory_records, config.spool_max_bytes)
        self._closing = False
        self._closing_event = threading.Event()  # wakes the thread from a backoff wait (new lines must not)
        self._deadline = 0.0
        self._batch_limit = config.batch_records
        self._thread = threading.Thread(target=self._run, name=_THREAD_PREFIX + name, daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- AuditSink --------------------------------------------------------------------------------------------

    def submit(self, line: bytes, record: Mapping[str, Any]) -> None:
        self._spool.put(line.rstrip(b"\n"))

    def close(self) -> None:
        with self._spool.cond:
            if self._closing:
                return
            self._closing = True
            self._deadline = time.monotonic() + self.config.close_timeout_s
            self._spool.cond.notify_all()
        self._closing_event.set()
        self._thread.join(self.config.close_timeout_s + 1.0)
        self._spool.persist()
        self._close_transport()
        left = self._spool.stats()["spool_bytes"]
        if left:
            log.warning("audit sink %s: %d bytes not delivered, kept in %s for the next start", self.name, left,
                        self._spool.dir)  # fmt: skip

    def __enter__(self) -> _QueuedSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> dict[str, Any]:
        with self._spool.cond:
            return {"name": self.name, "type": self.config.type, **vars(self.stats), **self._spool.stats()}

    # -- the thread -------------------------------------------------------------------------------------------

    def _next_batch(self) -> list[bytes] | None:
        spool, cfg = self._spool, self.config
        fill_until: float | None = None
        with spool.cond:
            while True:
                now = time.monotonic()
                if spool.closed or (self._closing and (now >= self._deadline or not spool.has_lines())):
                    return None
                if spool.has_lines():
                    full = spool.on_disk or spool.memory_full(self._batch_limit)
                    if full or self._closing or cfg.flush_interval_s == 0:
                        break
                    fill_until = fill_until or now + cfg.flush_interval_s
                    if now >= fill_until:
                        break
                    spool.cond.wait(fill_until - now)
                else:
                    fill_until = None
                    spool.cond.wait(5.0)
            return spool.peek(self._batch_limit, cfg.batch_bytes)

    def _run(self) -> None:
        cfg = self.config
        backoff = cfg.backoff_initial_s
        failing_since: float | None = None
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            timeout = cfg.timeout_s
            if self._closing:
                timeout = max(0.1, min(timeout, self._deadline - time.monotonic()))
            try:
                self._deliver(batch, timeout)
            except Exception as e:
                # _DeliveryFailed says why; anything else is a bug or a closed client, named by its type only
                # (an exception's text may quote the URL).
                why = str(e) if isinstance(e, _DeliveryFailed) else type(e).__name__
                self.stats.failures += 1
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("audit sink %s: delivery failed (%s); spooling to %s and retrying with backoff",
                                self.name, why, self._spool.dir)  # fmt: skip
                self._spool.spill()
                if self._closing:
                    return  # shutting down: no retries, close() keeps the rest on disk
                # Exponential backoff with jitter, so that many gateways do not retry against a SIEM in step.
                self._closing_event.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, cfg.backoff_max_s)
                continue
            self._spool.ack(len(batch))
            self.stats.delivered += len(batch)
            self.stats.batches += 1
            backoff = cfg.backoff_initial_s
            if failing_since is not None:
                log.info("audit sink %s: delivering again after %.0f s", self.name, time.monotonic() - failing_since)
                failing_since = None

    def _deliver(self, batch: list[bytes], timeout: float) -> None:
        items: list[tuple[bytes, Mapping[str, Any]]] = []
        for line in batch:
            try:
                record = orjson.loads(line)
                body = render(line, record, self.config.format)
            except (ExportError, orjson.JSONDecodeError) as e:
                # A line that cannot be rendered must not hold up the queue for ever.
                log.error("audit sink %s: skipped a line that cannot be rendered as %s (%s)", self.name,
                          self.config.format, e)  # fmt: skip
                body = None
            if body is None:
                self.stats.skipped += 1
                continue
            items.append((body, record))
        if items:
            self._send(batch, items, timeout)

    def _send(self, batch: list[bytes], items: list[tuple[bytes, Mapping[str, Any]]], timeout: float) -> None:
        """Send the rendered lines (body, record) of `batch`; raise _DeliveryFailed unless they were accepted."""
        raise NotImplementedError

    def _close_transport(self) -> None:
        pass


# -- webhook ---------------------------------------------------------------------------------------------------------

_CONTENT_TYPE = {"jsonl": "application/x-ndjson", "ocsf": "application/x-ndjson", "cef": "text/plain; charset=utf-8"}


class WebhookSink(_QueuedSink):
    """POST batches to a SIEM's HTTP collector. 2xx is delivered; anything else (or no answer) is retried, since
    the alternative is losing records; 413 also halves the batch size."""

    config: WebhookSinkConfig

    def __init__(self, config: WebhookSinkConfig, name: str, spool_dir: str) -> None:
        if config.authorization_file is not None:
            _read_authorization(config.authorization_file)  # fail at start, not at the first batch
        # The system's trust store (or ca_file), not certifi's; no proxy from the environment (audit must not
        # take a path the operator did not configure).
        tls = ssl.create_default_context(cafile=config.ca_file)
        self._client = httpx.Client(verify=tls, follow_redirects=False, trust_env=False)
        parts = urllib.parse.urlsplit(config.url)
        self._where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        super().__init__(config, name, spool_dir)

    def _send(self, batch: list[bytes], items: list[tuple[bytes, Mapping[str, Any]]], timeout: float) -> None:
        cfg = self.config
        headers = {
            **cfg.headers,
            "Content-Type": _CONTENT_TYPE[cfg.format],
            # The same batch gets the same id on every retry; records also carry their own ids.
            "X-Cube-Egress-Batch": hashlib.sha256(b"\n".join(batch)).hexdigest()[:32],
            "X-Cube-Egress-Records": str(len(items)),
        }
        if cfg.authorization_file is not None:
            try:
                headers["Authorization"] = _read_authorization(cfg.authorization_file)
            except ValueError as e:
                raise _DeliveryFailed(str(e)) from None
        try:
            body = b"".join(b + b"\n" for b, _ in items)
            response = self._client.post(cfg.url, content=body, headers=headers, timeout=timeout)
        except httpx.HTTPError as e:
            raise _DeliveryFailed(f"{type(e).__name__} from {self._where}") from None
        if response.status_code == 413 and len(batch) > 1:
            self._batch_limit = max(1, len(batch) // 2)
            raise _DeliveryFailed(f"HTTP 413 from {self._where}; batches now at most {self._batch_limit} records")
        if not 200 <= response.status_code < 300:
            raise _DeliveryFailed(f"HTTP {response.status_code} from {self._where}")

    def _close_transport(self) -> None:
        self._client.close()


def _read_authorization(path: str) -> str:
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as e:
        raise ValueError(f"webhook authorization_file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"webhook authorization_file {path} must not be readable by group or others (chmod 600)")
    if not value or "\n" in value:
        raise ValueError(f"webhook authorization_file {path} must hold one line, the Authorization header's value")
    return value


# -- syslog ----------------------------------------------------------------------------------------------------------

_FACILITY = {
    "kern": 0, "user": 1, "daemon": 3, "auth": 4, "syslog": 5, "authpriv": 10,
    "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20, "local5": 21, "local6": 22, "local7": 23,
}  # fmt: skip
# OCSF severity -> syslog severity (6 informational, 5 notice, 4 warning, 3 error).
_SYSLOG_SEVERITY = {Severity.INFORMATIONAL: 6, Severity.LOW: 5, Severity.MEDIUM: 4, Severity.HIGH: 3}
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$")
_BOM = b"\xef\xbb\xbf"
# RFC 5426 (UDP): what fits one IPv4 datagram; a longer message is truncated there (TCP has no limit).
_UDP_MAX = 65507


def _header_token(value: str | None, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, at most `limit` octets, NILVALUE when empty."""
    text = "".join(c if 33 <= ord(c) <= 126 else "_" for c in (value or ""))[:limit]
    return text or "-"


def syslog_message(
    record: Mapping[str, Any], msg: bytes, *, facility: str, hostname: str, app_name: str, procid: int
) -> bytes:
    """One RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG`. MSGID is the record's
    event (decision, security, checkpoint, ...); the timestamp is the record's own; MSG is UTF-8, so it starts with
    the BOM (RFC 5424 section 6.4)."""
    severity = _SYSLOG_SEVERITY[judge(record)[0]] if is_event(record) else 6
    pri = _FACILITY[facility] * 8 + severity
    stamp = record.get(F.TIME)
    timestamp = stamp if isinstance(stamp, str) and _RFC3339.match(stamp) else "-"
    header = " ".join(
        [
            f"<{pri}>1",
            timestamp,
            _header_token(hostname, 255),
            _header_token(app_name, 48),
            str(procid),
            _header_token(str(record.get(F.EVENT) or ""), 32),
            "-",  # no STRUCTURED-DATA: the whole record is in MSG
        ]
    )
    return header.encode("ascii") + b" " + _BOM + msg


class SyslogSink(_QueuedSink):
    """RFC 5424 over UDP or TCP. TCP frames are octet-counted (`LEN SP MSG`, RFC 6587) on one kept connection;
    before each batch a connection the receiver has closed is noticed and replaced, so a receiver restart loses
    nothing that was sent after it. UDP cannot tell: use TCP where every record must arrive."""

    config: SyslogSinkConfig

    def __init__(self, config: SyslogSinkConfig, name: str, spool_dir: str) -> None:
        self._sock: socket.socket | None = None
        self._hostname = config.hostname or socket.gethostname()
        self._procid = os.getpid()
        super().__init__(config, name, spool_dir)

    def _connect(self, timeout: float) -> socket.socket:
        cfg = self.config
        kind = socket.SOCK_DGRAM if cfg.transport == "udp" else socket.SOCK_STREAM
        try:
            family, type_, proto, _, addr = socket.getaddrinfo(cfg.host, cfg.port, type=kind)[0]
            sock = socket.socket(family, type_, proto)
        except OSError as e:
            raise _DeliveryFailed(f"cannot resolve {cfg.host}: {e.strerror}") from None
        sock.settimeout(timeout)
        try:
            sock.connect(addr)  # UDP too: a connected socket reports ICMP port unreachable as ECONNREFUSED
        except OSError as e:
            sock.close()
            why = e.strerror or type(e).__name__
            raise _DeliveryFailed(f"cannot connect to {cfg.host}:{cfg.port}: {why}") from None
        return sock

    def _send(self, batch: list[bytes], items: list[tuple[bytes, Mapping[str, Any]]], timeout: float) -> None:
        cfg = self.config
        messages = [
            syslog_message(record, body, facility=cfg.facility, hostname=self._hostname, app_name=cfg.app_name,
                           procid=self._procid)
            for body, record in items
        ]  # fmt: skip
        if self._sock is not None and cfg.transport == "tcp" and _peer_closed(self._sock):
            self._close_transport()
        if self._sock is None:
            self._sock = self._connect(timeout)
        self._sock.settimeout(timeout)
        try:
            if cfg.transport == "tcp":
                self._sock.sendall(b"".join(b"%d " % len(m) + m for m in messages))
            else:
                for m in messages:
                    self._sock.send(m[:_UDP_MAX])
        except OSError as e:
            self._close_transport()
            why = e.strerror or type(e).__name__
            raise _DeliveryFailed(f"{cfg.transport} to {cfg.host}:{cfg.port}: {why}") from None

    def _close_transport(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _peer_closed(sock: socket.socket) -> bool:
    """A syslog receiver never sends: a readable socket means it closed (EOF) or reset the connection."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
