"""QEMU plumbing for the VM lifecycle: one background event loop for QMP, process watching, the accelerator probe.

Why a background event loop and a synchronous API (rather than an async API with a sync wrapper): every caller we
have is synchronous (the CLI runs one command per process, tests, the warm pool's refill thread), while two things
must keep running when the caller is idle: watching each QEMU process (a pidfd) and its QMP stream (SHUTDOWN
events, the socket closing) so that a killed QEMU or a crashed guest turns the VM to FAILED at once. A sync wrapper
that runs ``loop.run_until_complete`` per call would watch nothing between calls, and would fail inside an already
running loop (the gateway's). So one daemon thread runs one loop for every VM of the process (50 clones share
it; no thread per VM), and the sync methods submit coroutines to it with ``run_coroutine_threadsafe``. Coroutine
code can call the sync API through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate

from ._errors import VMError

__all__ = [
    "Accel",
    "QMP",
    "probe_accel",
    "proc_start_time",
    "qemu_binary",
    "run",
    "spawn",
    "watch_exit",
]

class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="cube-egress-qmp", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()


_loop_lock = threading.Lock()
_loop_thread: _LoopThread | None = None


def _loop() -> _LoopThread:
    global _loop_thread
    with _loop_lock:
        if _loop_thread is None or not _loop_thread.thread.is_alive():
            _loop_thread = _LoopThread()
        return _loop_thread


def run[T](coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run ``coro`` on the shared loop and wait for it (``TimeoutError`` after ``timeout`` s, the coro cancelled)."""
    lt = _loop()
    if threading.current_thread() is lt.thread:
        coro.close()
        raise RuntimeError("the hypervisor's synchronous API was called from its own QMP loop thread")
    future = asyncio.run_coroutine_threadsafe(coro, lt.loop)
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise


def call_soon(fn: Callable[[], None]) -> None:
    lt = _loop()
    lt.loop.call_soon_threadsafe(fn)


def call_later(delay: float, fn: Callable[[], None]) -> None:
    lt = _loop()
    lt.loop.call_soon_threadsafe(lt.loop.call_later, delay, fn)


# -- processes -----------------------------------------------------------------------------------------------------


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if it is gone.

    Stored next to a pid in a VM record so a recycled pid is never mistaken for our QEMU.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses: the fields after it start at the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":  # a zombie has exited; only its exit status is left to reap
        return None
    return int(fields[19])


class _ExitWatch:
    def __init__(self, pid: int, callback: Callable[[], None]) -> None:
        self.pid = pid
        self._callback = callback
        self._fd: int | None = None
        self._done = threading.Event()

    def _start(self) -> None:
        try:
            self._fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._fire()
            return
        _loop().loop.add_reader(self._fd, self._fire)

    def _fire(self) -> None:
        self._close_fd()
        if not self._done.is_set():
            self._done.set()
            self._callback()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(Exception):
                _loop().loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def cancel(self) -> None:
        self._done.set()
        call_soon(self._close_fd)


def watch_exit(pid: int, callback: Callable[[], None]) -> _ExitWatch:
    """Call ``callback`` (on the loop thread) once when process ``pid`` exits; works for non-children too."""
    watch = _ExitWatch(pid, callback)
    call_soon(watch._start)
    return watch


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (reaped or a zombie); True when it did within ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        import select

        r, _, _ = select.select([fd], [], [], timeout)
        return bool(r)
    finally:
        os.close(fd)


_PR_SET_THP_DISABLE = 41
_PR_GET_THP_DISABLE = 42
_spawn_lock = threading.Lock()


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` with transparent huge pages disabled for the child.

    QEMU asks for huge pages (MADV_HUGEPAGE) on TCG's translation cache, so the first translated block of a clone
    costs 2 MiB, and an idle clone carries ~10 MiB of mostly empty huge pages. PR_SET_THP_DISABLE is inherited
    across fork and execve; it is set on this process only around the fork (under a lock) and put back, which
    changes nothing for this process but which allocations may use huge pages during those milliseconds.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with _spawn_lock:
        before = libc.prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0)
        changed = before == 0 and libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
        try:
            return subprocess.Popen(argv, **kwargs)
        finally:
            if changed:
                libc.prctl(_PR_SET_THP_DISABLE, 0, 0, 0, 0)


def qemu_binary() -> str:
    path = os.environ.get("CUBE_EGRESS_QEMU") or shutil.which("qemu-system-x86_64")
    if not path:
        raise VMError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86; scripts/setup.sh)")
    return path


# -- QMP -------------------------------------------------------------------------------------------------------------


class QMP:
    """A synchronous face over one ``qemu.qmp.QMPClient`` that lives on the shared loop.

    ``on_event`` is called (on the loop thread) with every QMP event; ``on_lost`` once when the connection ends
    without :meth:`close` having been called (QEMU exited or crashed).
    """

    def __init__(
        self,
        path: str,
        name: str,
        *,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.name = name
        self._on_event = on_event
        self._on_lost = on_lost
        self._client: QMPClient | None = None
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    def connect(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Connect, retrying while the socket is not there yet, until ``timeout`` or ``alive()`` turns false.

        QEMU serves one QMP client at a time: a socket that accepts but never greets means another process holds
        the monitor, which times out here with that explanation.
        """
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            if not alive():
                raise VMError(f"QEMU exited before its QMP socket answered ({self.path})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not os.path.exists(self.path):
                time.sleep(0.002)
                continue
            try:
                run(self._connect(), timeout=max(0.05, remaining))
                return
            except TimeoutError as e:
                detail = f"the socket accepted but QEMU did not greet within {timeout:.0f}s (another process may " \
                         "hold this monitor: QEMU serves one client at a time)"
                raise VMError(f"QMP {self.path}: {detail}") from e
            except (ConnectError, OSError) as e:
                last = e
                time.sleep(0.005)
        raise VMError(f"QMP {self.path}: no connection within {timeout:.1f}s ({last})")

    async def _connect(self) -> None:
        client = QMPClient(self.name)
        try:
            await client.connect(self.path)
        except BaseException:
            with contextlib.suppress(Exception):
                await client.disconnect()
            raise
        self._client = client
        self._closing = False
        self._tasks = [
            asyncio.create_task(self._pump_events(client)),
            asyncio.create_task(self._watch_runstate(client)),
        ]

    async def _pump_events(self, client: QMPClient) -> None:
        with client.listener() as listener:
            async for event in listener:
                if self._on_event is not None:
                    try:
                        self._on_event(dict(event))
                    except Exception:  # a callback bug must not stop the watcher
                        import logging

                        logging.getLogger("cube_egress.hypervisor").exception("QMP event callback failed")

    async def _watch_runstate(self, client: QMPClient) -> None:
        state = client.runstate
        while state == Runstate.RUNNING:
            state = await client.runstate_changed()
        # DISCONNECTING: collect the reader's EOFError here so asyncio never reports it as "never retrieved".
        with contextlib.suppress(Exception):
            await client.disconnect()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if not self._closing and self._on_lost is not None:
            self._on_lost()

    def execute(self, cmd: str, args: dict[str, Any] | None = None, *, timeout: float = 30.0) -> Any:
        client = self._client
        if client is None or client.runstate != Runstate.RUNNING:
            raise VMError(f"QMP {cmd}: not connected to QEMU (it exited, or another process holds its monitor)")
        try:
            return run(client.execute(cmd, args), timeout)
        except ExecuteError as e:
            raise VMError(f"QMP {cmd} failed: {e} ({e.error_class})") from e
        except ExecInterruptedError as e:
            raise VMError(f"QMP {cmd}: QEMU closed the monitor before answering (it exited)") from e
        except TimeoutError as e:
            raise VMError(f"QMP {cmd}: no answer within {timeout:.1f}s") from e
        except QMPError as e:
            raise VMError(f"QMP {cmd}: {e}") from e

    def poll(
        self,
        cmd: str,
        done: Callable[[Any], bool],
        *,
        timeout: float,
        interval: float = 0.002,
        what: str = "",
    ) -> Any:
        """Run ``cmd`` until ``done(answer)``; the whole poll is one round trip to the loop thread."""
        client = self._client
        if client is None:
            raise VMError(f"QMP {cmd}: not connected")

        async def _poll() -> Any:
            while True:
                answer = await client.execute(cmd)
                if done(answer):
                    return answer
                await asyncio.sleep(interval)

        try:
            return run(_poll(), timeout)
        except TimeoutError as e:
            raise VMError(f"{what or cmd}: not done within {timeout:.1f}s") from e
        except ExecInterruptedError as e:
            raise VMError(f"{what or cmd}: QEMU exited") from e
        except QMPError as e:
            raise VMError(f"{what or cmd}: {e}") from e

    def close(self) -> None:
        """Disconnect (idempotent); ``on_lost`` is not called for a close we asked for."""
        self._closing = True
        client, self._client = self._client, None
        if client is None:
            return

        async def _close() -> None:
            with contextlib.suppress(Exception):
                await client.disconnect()
            for task in self._tasks:
                task.cancel()

        with contextlib.suppress(Exception):
            run(_close(), 5.0)


# -- accelerator -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accel:
    """The accelerator QEMU runs guests with, and why it was chosen."""

    name: Literal["kvm", "tcg"]
    reason: str

    def qemu_args(self, *, tb_size_mb: int | None = None) -> list[str]:
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        # TCG's translation cache is 1 GiB of lazily touched memory by default; a cap bounds an idle clone's
        # private memory (the cache refills by retranslating when full, which costs CPU, not correctness).
        opts = f"tcg,tb-size={tb_size_mb}" if tb_size_mb else "tcg"
        return ["-accel", opts, "-cpu", "max"]


_PROBE_TIMEOUT_S = 20.0  # a working KVM reaches the guest kernel's root-mount panic in well under a second
_CPU_FLAGS = re.compile(r"^flags\s*:(.*)$", re.M)


def _accel_cache_path() -> Path:
    return Path(os.environ.get("CUBE_EGRESS_RUN_DIR", "/run/cube-egress")) / "accel.json"


def _cheap_kvm_verdict() -> str | None:
    """Why KVM cannot run a stock guest kernel here, without booting anything; None when only a boot can tell."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    try:
        with open("/proc/cpuinfo") as f:
            m = _CPU_FLAGS.search(f.read())
    except OSError:
        return None
    flags = set(m.group(1).split()) if m else set()
    if not flags & {"vmx", "svm"}:
        # /dev/kvm without hardware virtualisation: a paravirtual KVM (PVM) that runs only PVM-enabled kernels.
        return "/dev/kvm exists but the CPU has no vmx/svm (a paravirtual KVM host: stock kernels cannot run)"
    return None


def _boot_probe(kernel: Path, qemu: str) -> str | None:
    """Boot ``kernel`` without a root file system under KVM: it must reach its root-mount panic and exit."""
    argv = [
        qemu, "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "128", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
        "-append", "console=ttyS0 panic=-1 tsc_early_khz=2100000",
    ]  # fmt: skip
    try:
        out = subprocess.run(argv, capture_output=True, timeout=_PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"a KVM test boot did not finish within {_PROBE_TIMEOUT_S:.0f}s"
    text = out.stdout.decode(errors="replace")
    if "Kernel panic" in text or "VFS:" in text:
        return None
    tail = (text + out.stderr.decode(errors="replace")).strip().splitlines()[-3:]
    return f"a KVM test boot failed (exit {out.returncode}): {' | '.join(tail)}"


def probe_accel(kernel: Path) -> Accel:
    """KVM when it can really boot ``kernel``, else TCG; cached per (QEMU, kernel, host kernel) until reboot.

    ``CUBE_EGRESS_ACCEL=kvm|tcg`` forces the choice. The cache lives under /run (tmpfs), so a reboot into a host
    with a different KVM probes again.
    """
    forced = os.environ.get("CUBE_EGRESS_ACCEL")
    if forced in ("kvm", "tcg"):
        return Accel("kvm" if forced == "kvm" else "tcg", "forced by CUBE_EGRESS_ACCEL")
    if forced:
        raise VMError(f"CUBE_EGRESS_ACCEL={forced!r}: use 'kvm' or 'tcg'")
    qemu = qemu_binary()
    st_q, st_k = os.stat(qemu), os.stat(kernel)
    key = f"{os.path.realpath(qemu)}:{st_q.st_mtime_ns}:{kernel}:{st_k.st_mtime_ns}:{st_k.st_size}:{os.uname().release}"
    cache = _accel_cache_path()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        doc = json.loads(cache.read_text())
        if doc["key"] == key and doc["name"] in ("kvm", "tcg"):
            return Accel("kvm" if doc["name"] == "kvm" else "tcg", str(doc["reason"]))
    why_not = _cheap_kvm_verdict()
    if why_not is None:
        why_not = _boot_probe(kernel, qemu)
    accel = Accel("kvm", "a KVM test boot reached the guest kernel") if why_not is None else Accel("tcg", why_not)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "name": accel.name, "reason": accel.reason}))
        os.replace(tmp, cache)
    return accel


def tail(path: Path | str, lines: int = 20, max_bytes: int = 8192) -> str:
    """The last ``lines`` lines of a log file (for error messages); empty when it does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])


def unlink_all(paths: Iterable[Path | str]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
