"""QEMU microvm sandboxes: boot, snapshot, restore, clone, warm pool; each guest on a tap of its own.

* :class:`MicroVM` (``vm.py``): one guest, a context manager with a run state (:class:`VMState`); cold boot to
  agent-ready, pause/resume, :meth:`~MicroVM.snapshot`, :meth:`~MicroVM.restore`, :meth:`~MicroVM.attach` from
  another process, ``destroy`` (idempotent, leaves nothing). :func:`list_vms` and :func:`cleanup_stale` read the
  per-VM run dirs.
* :class:`Template` and :class:`Clones` (``clone.py``): many guests from one, sharing its RAM copy-on-write,
  each with its own MAC, IP, RNG state, clock and sandbox id.
* :class:`WarmPool` (``pool.py``): QEMU processes started ahead, so a clone only loads state and continues.
* :mod:`~hypervisor.net`: :class:`NetSpec` (a guest's addresses and tap), :class:`Subnet` (hands them out),
  :class:`SandboxHook` (called with a :class:`SandboxLink` when a tap comes and goes; :class:`EbpfGuard` wires
  the kernel guard); :class:`GatewayRegistration` (``registration.py``) registers each VM's sandbox with the
  gateway's admin API while its tap exists.
* Images and the guest agent: :func:`~hypervisor.image.build_image`, :class:`~hypervisor.agent.AgentClient`.

QMP runs on one background event loop per process (see ``_qemu.py`` for why); the API is synchronous and
thread-safe. Errors: the tree in ``_errors.py``. Guide: docs/runtime.md.
"""

from __future__ import annotations

from ._errors import (
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    CloneError,
    HypervisorError,
    ImageError,
    SnapshotError,
    VMError,
    VMStateError,
)
from ._qemu import Accel, probe_accel
from .clone import Clones, Template
from .net import EbpfGuard, NetSpec, SandboxHook, SandboxLink, Subnet
from .pool import WarmPool
from .registration import GatewayRegistration
from .vm import Machine, MicroVM, Snapshot, VMRecord, VMState, cleanup_stale, list_vms

__all__ = [
    "Accel",
    "AgentError",
    "AgentProtocolError",
    "AgentTimeout",
    "CloneError",
    "Clones",
    "EbpfGuard",
    "GatewayRegistration",
    "HypervisorError",
    "ImageError",
    "Machine",
    "MicroVM",
    "NetSpec",
    "SandboxHook",
    "SandboxLink",
    "Snapshot",
    "SnapshotError",
    "Subnet",
    "Template",
    "VMError",
    "VMRecord",
    "VMState",
    "VMStateError",
    "WarmPool",
    "cleanup_stale",
    "list_vms",
    "probe_accel",
]
