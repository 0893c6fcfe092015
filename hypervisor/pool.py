"""A warm pool of clones-to-be: QEMU processes already started for a template, waiting for its stream.

Starting QEMU (exec, device model, memory mapping, the QMP handshake) and creating a tap is most of a clone's
start-up cost. A :class:`WarmPool` pays it ahead: it keeps ``size`` processes started with the template's machine
and ``-incoming defer`` (state INCOMING), each with its tap created, its address leased and QMP connected with the
migration capability set. :meth:`WarmPool.take` only loads the stream, wires the tap (route, hooks), continues the
guest and gives it its identity (RNG, clock, network, sandbox id); a background thread starts a replacement at
once. When the pool is empty, ``take`` starts a process itself (counted in ``misses``).

``resume_ahead=True`` goes one step further: waiting guests are also loaded, continued, reseeded and connected
to (their tap stays down and unwired, their NIC has no address, nothing of a user runs), so ``take`` is left with
the tap, the hooks and the identity. It costs an idle guest's CPU per waiting VM; it pays under TCG, where a fresh
process must first translate every guest code path it runs (100-200 ms of a plain take). Under TCG it also runs
``ip`` once in each waiting guest, so the translation of the agent's ``net_config`` path is warm too.

Waiting processes belong to this process: ``close()`` (or leaving the ``with`` block) kills them, and if this
process dies without closing, :func:`~hypervisor.vm.cleanup_stale` removes them (they are never persistent).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from ._errors import VMError
from .clone import CLONE_TCG_CACHE_MB, Template, _releaser
from .net import SandboxHook, Subnet
from .vm import MicroVM, VMState

__all__ = ["WarmPool"]

log = logging.getLogger("cube_egress.hypervisor")

_RETRY_S = 1.0  # after a failed start, before the next one (a broken host must not spin the refill thread)


class WarmPool:
    """Keeps ``size`` started-and-waiting clones of ``template``; :meth:`take` turns one into a running clone.

    A context manager: :meth:`start` on enter, :meth:`close` on exit. Thread-safe.
    """

    def __init__(
        self,
        template: Template,
        size: int,
        *,
        net: Subnet | None = None,
        hooks: Sequence[SandboxHook] = (),
        run_root: Path | str | None = None,
        tcg_cache_mb: int | None = CLONE_TCG_CACHE_MB,
        resume_ahead: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError("a warm pool needs size >= 1")
        self.template = template
        self.size = size
        self.net = net
        self.hooks = tuple(hooks)
        self.run_root = run_root
        self.tcg_cache_mb = tcg_cache_mb
        self.resume_ahead = resume_ahead
        self._ready: collections.deque[MicroVM] = collections.deque()
        self._starting = 0
        self._taking = 0  # takes in progress: the refill waits for them (both need the CPU; the take is urgent)
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.hits = 0  # takes served by a waiting process
        self.misses = 0  # takes that had to start their own
        self.started = 0  # processes the refill thread started
        self.start_failures = 0
        self.last_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<WarmPool {self.waiting}/{self.size} waiting, hits={self.hits} misses={self.misses}>"

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._ready)

    def start(self) -> WarmPool:
        with self._cond:
            if self._closed:
                raise VMError("this warm pool is closed; make a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._refill, name="cxe-warm-pool", daemon=True)
                self._thread.start()
        return self

    def __enter__(self) -> WarmPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_full(self, timeout: float = 60.0) -> bool:
        """Wait until ``size`` processes wait (True), or ``timeout`` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed or len(self._ready) >= self.size, timeout)

    def _spawn(self) -> MicroVM:
        spec = self.net.lease() if self.net is not None else None
        release = _releaser(self.net, spec.ip) if self.net is not None and spec is not None else None
        try:
            vm = MicroVM._incoming(
                self.template.snapshot,
                kind="pool",
                net=spec,
                sandbox_id=None,
                hooks=self.hooks,
                persistent=False,
                run_root=self.run_root,
                tcg_cache_mb=self.tcg_cache_mb,
            )
        except BaseException:
            if release is not None:
                release()
            raise
        if release is not None:
            vm._on_destroyed.append(release)
        if self.resume_ahead:
            vm._finish_incoming(self.template.snapshot, go_live=False)
            if vm.machine.accel == "tcg":
                vm.agent.exec(["ip", "-o", "addr", "show"], timeout_s=30)  # translate fork/exec and `ip` now
        return vm

    def _refill(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._closed or (len(self._ready) + self._starting < self.size and self._taking == 0)
                )
                if self._closed:
                    return
                self._starting += 1
            vm: MicroVM | None = None
            failed = False
            try:
                vm = self._spawn()
                self.started += 1
            except Exception as e:
                failed = True
                self.start_failures += 1
                self.last_error = e
                log.warning("warm pool: starting a process failed: %s", e)
            with self._cond:
                self._starting -= 1
                if vm is not None and not self._closed:
                    self._ready.append(vm)
                    vm = None
                self._cond.notify_all()
            if vm is not None:  # closed while it started
                with contextlib.suppress(Exception):
                    vm.destroy()
            if failed:
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, _RETRY_S)

    def take(self, *, sandbox_id: str | None = None, timeout: float = 60.0) -> MicroVM:
        """A running clone with its own identity (and ``sandbox_id``), from a waiting process when there is one."""
        dead: list[MicroVM] = []
        vm: MicroVM | None = None
        with self._cond:
            if self._closed:
                raise VMError("this warm pool is closed")
            self._taking += 1
            while self._ready:
                candidate = self._ready.popleft()
                if candidate.state is (VMState.RUNNING if self.resume_ahead else VMState.INCOMING):
                    vm = candidate
                    break
                dead.append(candidate)  # its QEMU died while waiting
            self._cond.notify_all()
        try:
            for d in dead:
                with contextlib.suppress(Exception):
                    d.destroy()
            if vm is None:
                self.misses += 1
                vm = self._spawn()
            else:
                self.hits += 1
            vm.kind = "clone"
            if vm.state is VMState.RUNNING:  # resumed ahead
                vm._go_live(sandbox_id=sandbox_id)
            else:
                vm._finish_incoming(self.template.snapshot, timeout=timeout, sandbox_id=sandbox_id)
            return vm
        finally:
            with self._cond:
                self._taking -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Stop refilling and kill every waiting process (idempotent). Clones already taken are not touched."""
        with self._cond:
            self._closed = True
            waiting = list(self._ready)
            self._ready.clear()
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)
        for vm in waiting:
            with contextlib.suppress(Exception):
                vm.destroy()
