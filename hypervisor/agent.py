"""Host side of the guest agent: the wire protocol and a synchronous client.

The agent (``hypervisor/guest/agent.c``) serves one byte channel: in a guest, the virtio-serial port
:data:`PORT_NAME`, which QEMU exposes on the host as a unix socket (:func:`qemu_agent_args`). Every frame::

    b"CXA" | version (1 byte) | payload length (4 bytes, big endian) | payload
    payload = compact JSON object, b"\\n", then the blobs whose lengths the header's "blobs" list gives

A request has ``id`` and ``op``; its reply echoes ``id`` with ``ok`` and the op's fields, or ``ok: false`` with
``error`` (a code: an errno name such as ``ENOENT``, or ``bad_magic``, ``bad_version``, ``too_large``,
``truncated``, ``bad_frame``, ``bad_json``, ``bad_request``, ``unknown_op``, ``disabled``, ``command_failed``) and
``detail``. A frame the agent cannot attribute to a request is answered with ``id: null``.

The guest is not trusted (sandboxed code runs as root in it and can replace the agent), so the client bounds every
frame it accepts (:data:`MAX_FRAME`), checks the type of every field it uses, and raises
:class:`~hypervisor.AgentProtocolError` for anything else; garbage before a frame is skipped (a restored guest may
have been mid-reply when its snapshot was taken). Every call has a deadline. After a timeout or a protocol error
the client is closed: connect again (the agent serves the next connection as if nothing happened).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import orjson

from ._errors import AgentError, AgentProtocolError, AgentTimeout

__all__ = [
    "MAX_FRAME",
    "PORT_NAME",
    "PROTOCOL",
    "AgentClient",
    "ExecResult",
    "Frame",
    "FrameDecoder",
    "Hello",
    "ReseedResult",
    "encode_frame",
    "qemu_agent_args",
]

log = logging.getLogger(__name__)

MAGIC = b"CXA"
PROTOCOL = 1
MAX_FRAME = 64 << 20
"""Largest payload either side sends or accepts (the agent has the same limit)."""
PORT_NAME = "org.cube-egress.agent.0"
_PREFIX = struct.Struct(">3sBI")
_CONNECT_ATTEMPT_S = 1.0  # a hello unanswered this long is sent again (QEMU queues it until the agent opens the port)


def qemu_agent_args(sock_path: str | os.PathLike[str], *, chardev_id: str = "agent0") -> list[str]:
    """The QEMU arguments that give a microvm guest the agent channel, served on the unix socket ``sock_path``."""
    return [
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"socket,id={chardev_id},path={os.fspath(sock_path)},server=on,wait=off",
        "-device",
        f"virtserialport,chardev={chardev_id},name={PORT_NAME}",
    ]


# -- framing -------------------------------------------------------------------------------------------------


def encode_frame(header: Mapping[str, Any], blobs: Sequence[bytes] = (), *, version: int = PROTOCOL) -> bytes:
    """One frame: the header (plus the blob lengths) as compact JSON, a newline, the blobs."""
    head = orjson.dumps({**header, "blobs": [len(b) for b in blobs]})
    payload_len = len(head) + 1 + sum(len(b) for b in blobs)
    if payload_len > MAX_FRAME:
        raise ValueError(f"frame of {payload_len} bytes exceeds the {MAX_FRAME}-byte limit")
    return b"".join([_PREFIX.pack(MAGIC, version, payload_len), head, b"\n", *blobs])


@dataclass(frozen=True)
class Frame:
    """A decoded frame: its JSON header and its blobs."""

    header: dict[str, Any]
    blobs: list[bytes]


class FrameDecoder:
    """Incremental decoder: feed bytes, take complete frames. Skips bytes before a magic (counted in ``skipped``);
    raises AgentProtocolError for a frame it cannot accept (oversize, other version, malformed payload)."""

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self.skipped = 0

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while True:
            start = self._buf.find(MAGIC)
            if start < 0:
                keep = 2 if self._buf.endswith(MAGIC[:2]) else 1 if self._buf.endswith(MAGIC[:1]) else 0
                self.skipped += len(self._buf) - keep
                del self._buf[: len(self._buf) - keep]
                return frames
            if start:
                self.skipped += start
                del self._buf[:start]
            if len(self._buf) < _PREFIX.size:
                return frames
            _, version, length = _PREFIX.unpack_from(self._buf)
            if version != PROTOCOL:
                raise AgentProtocolError(
                    "frame", f"agent speaks protocol version {version}, we speak {PROTOCOL}", code="bad_version"
                )
            if length > self._max:
                raise AgentProtocolError(
                    "frame", f"agent sent a {length}-byte frame (limit {self._max})", code="too_large"
                )
            end = _PREFIX.size + length
            if len(self._buf) < end:
                return frames
            payload = bytes(self._buf[_PREFIX.size : end])
            del self._buf[:end]
            frames.append(_parse_payload(payload))

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)


def _parse_payload(payload: bytes) -> Frame:
    nl = payload.find(b"\n")
    if nl < 0:
        raise AgentProtocolError("frame", "payload has no header line", code="bad_frame")
    try:
        header = orjson.loads(payload[:nl])
    except orjson.JSONDecodeError as e:
        raise AgentProtocolError("frame", f"header is not JSON: {e}", code="bad_json") from None
    if not isinstance(header, dict):
        raise AgentProtocolError("frame", "header is not a JSON object", code="bad_frame")
    lens = header.get("blobs", [])
    rest = len(payload) - nl - 1
    if (
        not isinstance(lens, list)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lens)
        or sum(lens) != rest
    ):
        raise AgentProtocolError("frame", f"blob lengths do not add up to the {rest} bytes sent", code="bad_frame")
    blobs, off = [], nl + 1
    for n in lens:
        blobs.append(payload[off : off + n])
        off += n
    return Frame(header, blobs)


# -- results -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecResult:
    """What a command did. ``exit_code`` is None when it was killed by ``signal`` (or never reaped)."""

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class Hello:
    """The agent's greeting. ``boot_id`` is the guest kernel's (a clone shares its template's)."""

    protocol: int
    agent: str
    boot_id: str
    uptime_s: float
    kernel: str
    system: bool
    ops: tuple[str, ...]


@dataclass(frozen=True)
class ReseedResult:
    bytes: int
    credited_bits: int
    reseeded: bool


def _field[T](op: str, h: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...]) -> T:
    v = h.get(key)
    # bool is an int subclass; a field typed int must not accept true/false
    if not isinstance(v, kind) or (isinstance(v, bool) and kind in (int, float)):
        raise AgentProtocolError(op, f"reply field {key!r} is {v!r}, expected {kind}", code="bad_reply")
    return v  # type: ignore[return-value]


def _opt_int(op: str, h: Mapping[str, Any], key: str) -> int | None:
    v = h.get(key)
    if v is None:
        return None
    return _field(op, h, key, int)


# -- client --------------------------------------------------------------------------------------------------


class AgentClient:
    """A connection to one guest agent. One request at a time; every call has a deadline (``timeout`` seconds,
    default ``call_timeout``); failures raise :class:`AgentError` subclasses carrying the op and the detail."""

    def __init__(self, sock: socket.socket, *, call_timeout: float = 30.0) -> None:
        self._sock: socket.socket | None = sock
        self._decoder = FrameDecoder()
        self._ids = itertools.count(1)
        self.call_timeout = call_timeout

    @classmethod
    def connect(
        cls, sock_path: str | os.PathLike[str], *, timeout: float = 30.0, call_timeout: float = 30.0
    ) -> AgentClient:
        """Connect to the agent behind ``sock_path`` (QEMU's chardev socket, or an agent's ``--listen`` socket),
        retrying until the socket accepts and the agent answers ``hello``, for at most ``timeout`` seconds."""
        path = os.fspath(sock_path)
        if len(os.fsencode(path)) >= 108:
            raise AgentError("connect", f"socket path is longer than 107 bytes: {path}", code="bad_path")
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentTimeout("connect", f"no answer from the agent at {path} within {timeout:g}s ({last})")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.settimeout(left)
                s.connect(path)
            except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as e:
                s.close()
                last = f"socket: {e.strerror or e}"
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                continue
            except OSError as e:
                s.close()
                raise AgentError("connect", f"cannot connect to {path}: {e}", code="connect_failed") from e
            client = cls(s, call_timeout=call_timeout)
            try:
                client._greet(deadline)
                return client
            except AgentTimeout as e:
                client.close()
                last = e.detail
            except AgentError as e:
                client.close()
                if isinstance(e, AgentProtocolError) and e.code in ("closed", "bad_reply"):
                    last = e.detail  # the socket went away or carried leftovers: try a fresh connection
                    time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                    continue
                raise

    def _greet(self, deadline: float) -> None:
        # Resent every _CONNECT_ATTEMPT_S: QEMU queues bytes until the guest opens its port, and a restored guest
        # may still hold half a frame from before its snapshot (the agent then answers with a null-id error).
        sent: set[int] = set()
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise AgentTimeout("connect", "the agent did not answer hello")
            rid = self._send("hello", {}, (), deadline)
            sent.add(rid)
            try:
                frame = self._receive("hello", sent, min(deadline, now + _CONNECT_ATTEMPT_S), tolerate_null=True)
            except AgentTimeout:
                continue
            self._check("hello", frame)
            return

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.call_timeout if timeout is None else timeout)

    def _send(self, op: str, fields: Mapping[str, Any], blobs: Sequence[bytes], deadline: float) -> int:
        sock = self._require()
        rid = next(self._ids)
        try:
            data = encode_frame({"id": rid, "op": op, **fields}, blobs)
        except ValueError as e:
            raise AgentError(op, str(e), code="too_large") from None
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(data)
        except TimeoutError:
            self.close()
            raise AgentTimeout(op, "the agent did not take the request before the deadline") from None
        except OSError as e:
            self.close()
            raise AgentProtocolError(op, f"channel closed while sending: {e}", code="closed") from None
        return rid

    def _receive(self, op: str, ids: set[int], deadline: float, *, tolerate_null: bool = False) -> Frame:
        sock = self._require()
        agent_said: str | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if tolerate_null:
                    raise AgentTimeout(op, "no reply before the deadline")
                self.close()
                if agent_said:
                    raise AgentProtocolError(op, f"no reply; the agent reported {agent_said}", code="no_reply")
                raise AgentTimeout(op, "no reply before the deadline")
            try:
                sock.settimeout(left)
                data = sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as e:
                self.close()
                raise AgentProtocolError(op, f"channel closed while waiting: {e}", code="closed") from None
            if not data:
                self.close()
                raise AgentProtocolError(op, "the agent channel closed before the reply", code="closed")
            try:
                frames = self._decoder.feed(data)
            except AgentProtocolError:
                self.close()
                raise
            for f in frames:
                rid = f.header.get("id")
                if isinstance(rid, int) and rid in ids:
                    return f
                if rid is None and f.header.get("ok") is False:
                    # The agent could not parse something: leftovers from before a restore, or our own request.
                    agent_said = f"{f.header.get('error')}: {f.header.get('detail')}"
                    log.debug("agent: %s", agent_said)
                else:
                    log.debug("agent: dropping a reply to id %r (stale)", rid)

    @staticmethod
    def _check(op: str, f: Frame) -> dict[str, Any]:
        h = f.header
        if h.get("ok") is True:
            return h
        if h.get("ok") is False:
            code = h.get("error")
            detail = h.get("detail")
            raise AgentError(
                op,
                detail if isinstance(detail, str) else "(no detail)",
                code=code if isinstance(code, str) else "error",
            )
        raise AgentProtocolError(op, "reply has no boolean 'ok'", code="bad_reply")

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise AgentProtocolError("call", "the client is closed; connect again", code="closed")
        return self._sock

    def call(
        self,
        op: str,
        fields: Mapping[str, Any] | None = None,
        blobs: Sequence[bytes] = (),
        *,
        timeout: float | None = None,
    ) -> Frame:
        """Send one request and return its successful reply (header and blobs); raise AgentError otherwise."""
        deadline = self._deadline(timeout)
        rid = self._send(op, fields or {}, blobs, deadline)
        frame = self._receive(op, {rid}, deadline)
        self._check(op, frame)
        return frame

    # -- ops ---------------------------------------------------------------------------------------------------

    def hello(self, *, timeout: float | None = None) -> Hello:
        h = self.call("hello", timeout=timeout).header
        ops = _field("hello", h, "ops", list)
        return Hello(
            protocol=_field("hello", h, "protocol", int),
            agent=_field("hello", h, "agent", str),
            boot_id=_field("hello", h, "boot_id", str),
            uptime_s=float(_field("hello", h, "uptime_s", (int, float))),
            kernel=_field("hello", h, "kernel", str),
            system=_field("hello", h, "system", bool),
            ops=tuple(str(o) for o in ops),
        )

    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float = 30,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the guest (PATH search, no shell) with the agent's environment plus ``env``. The agent
        kills the process group at ``timeout_s``; the call's own deadline is ``timeout_s`` plus ``timeout``
        (default ``call_timeout``) for the transfers."""
        if isinstance(argv, str | bytes) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty sequence of str")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        fields: dict[str, Any] = {"argv": list(argv), "timeout_s": timeout_s}
        if env is not None:
            fields["env"] = dict(env)
        if cwd is not None:
            fields["cwd"] = cwd
        extra = self.call_timeout if timeout is None else timeout
        f = self.call("exec", fields, [stdin] if stdin else [], timeout=timeout_s + extra)
        if len(f.blobs) != 2:
            raise AgentProtocolError("exec", "reply needs stdout and stderr blobs", code="bad_reply")
        h = f.header
        return ExecResult(
            exit_code=_opt_int("exec", h, "exit_code"),
            signal=_opt_int("exec", h, "signal"),
            stdout=f.blobs[0],
            stderr=f.blobs[1],
            timed_out=_field("exec", h, "timed_out", bool),
            stdout_truncated=_field("exec", h, "stdout_truncated", bool),
            stderr_truncated=_field("exec", h, "stderr_truncated", bool),
        )

    def read_file_and_mode(self, path: str, *, timeout: float | None = None) -> tuple[bytes, int]:
        """A regular file's bytes and permission bits (at most 48 MiB)."""
        f = self.call("read_file", {"path": path}, timeout=timeout)
        if len(f.blobs) != 1:
            raise AgentProtocolError("read_file", "reply needs one blob", code="bad_reply")
        return f.blobs[0], _field("read_file", f.header, "mode", int)

    def read_file(self, path: str, *, timeout: float | None = None) -> bytes:
        return self.read_file_and_mode(path, timeout=timeout)[0]

    def write_file(self, path: str, data: bytes, mode: int = 0o644, *, timeout: float | None = None) -> None:
        """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, rename)."""
        if not 0 <= mode <= 0o7777:
            raise ValueError("mode must be in [0, 0o7777]")
        self.call("write_file", {"path": path, "mode": mode}, [bytes(data)], timeout=timeout)

    def set_time(self, epoch_ns: int | None = None, *, timeout: float | None = None) -> None:
        """Set the guest's wall clock (default: the host's, now). A restored or cloned guest's clock is stale."""
        ns = time.time_ns() if epoch_ns is None else epoch_ns
        if ns < 0:
            raise ValueError("epoch_ns must be non-negative")
        self.call("set_time", {"epoch_ns": ns}, timeout=timeout)

    def reseed(self, entropy: bytes | None = None, *, timeout: float | None = None) -> ReseedResult:
        """Mix ``entropy`` (default 64 bytes from os.urandom) into the guest's pool, credit it and reseed the CRNG
        now. A clone starts with its template's CRNG state; reseed each clone before it does anything else."""
        data = os.urandom(64) if entropy is None else bytes(entropy)
        h = self.call("reseed", {}, [data], timeout=timeout).header
        return ReseedResult(
            bytes=_field("reseed", h, "bytes", int),
            credited_bits=_field("reseed", h, "credited_bits", int),
            reseeded=_field("reseed", h, "reseeded", bool),
        )

    def net_config(
        self,
        address: str,
        *,
        gateway: str | None = None,
        dns: Sequence[str] | None = None,
        interface: str = "eth0",
        mac: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Reconfigure an interface: down, MAC (if given), flush, ``address`` (IPv4 ADDRESS/PREFIX), up, default
        route via ``gateway`` (if given), and /etc/resolv.conf with ``dns`` (if given)."""
        ipaddress.IPv4Interface(address)  # ValueError for a bad one, before it reaches the guest
        if "/" not in address:
            raise ValueError("address must be ADDRESS/PREFIX")
        fields: dict[str, Any] = {"interface": interface, "address": address}
        if gateway is not None:
            fields["gateway"] = str(ipaddress.IPv4Address(gateway))
        if dns is not None:
            fields["dns"] = [str(ipaddress.IPv4Address(d)) for d in dns]
        if mac is not None:
            fields["mac"] = mac
        self.call("net_config", fields, timeout=timeout)

    def shutdown(self, *, timeout: float | None = None) -> None:
        """Power the guest off (the agent answers first). The client is closed afterwards."""
        try:
            self.call("shutdown", timeout=timeout)
        finally:
            self.close()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
