"""The errors of the ``hypervisor`` package, in one tree::

    HypervisorError                 every error this package raises on purpose
    ├── ImageError                  a guest image cannot be built (missing kernel, compiler, bad rootfs...)
    ├── VMError                     a VM operation failed (``vm_id``, ``console``: the tail of its console log)
    │   ├── VMStateError            the operation is not allowed in the VM's current state (``state``)
    │   ├── SnapshotError           a snapshot or template is unusable (missing files, wrong format, mismatch)
    │   └── CloneError              every clone of a batch failed (``failures``: one error per clone)
    └── AgentError                  the guest agent answered with an error (``op``, ``detail``, ``code``)
        ├── AgentProtocolError      the channel broke the protocol (bad magic/version, malformed reply, EOF)
        └── AgentTimeout            no answer before the call's deadline (or the agent never came up)

Messages say what failed and what to do; ``AgentError`` carries the op and the guest's detail so callers can
branch on ``code`` (an errno name such as ``ENOENT``, or a protocol code such as ``bad_request``).
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "AgentProtocolError",
    "AgentTimeout",
    "CloneError",
    "HypervisorError",
    "ImageError",
    "SnapshotError",
    "VMError",
    "VMStateError",
]


class HypervisorError(Exception):
    """Base of every error the hypervisor package raises on purpose."""


class ImageError(HypervisorError):
    """Building a guest image failed; the message names the missing input or failing step."""


class AgentError(HypervisorError):
    """A guest agent call failed. ``op`` is the request's op, ``detail`` the reason, ``code`` a short token."""

    def __init__(self, op: str, detail: str, *, code: str = "error") -> None:
        self.op = op
        self.detail = detail
        self.code = code
        # the agent's details usually start with the op already
        text = detail if detail.startswith(f"{op}:") else f"{op}: {detail}"
        super().__init__(f"guest agent {text} ({code})")


class AgentProtocolError(AgentError):
    """The agent channel did not speak the protocol (wrong magic or version, malformed frame, channel closed)."""


class AgentTimeout(AgentError):
    """The agent did not answer before the deadline; the channel is closed, reconnect to go on."""


class VMError(HypervisorError):
    """A VM operation failed. ``vm_id`` names the VM, ``console`` holds the tail of its console log (or "")."""

    def __init__(self, message: str, *, vm_id: str | None = None, console: str = "") -> None:
        self.vm_id = vm_id
        self.console = console
        self.message = message
        text = f"vm {vm_id}: {message}" if vm_id else message
        if console:
            text += "\n--- console (last lines) ---\n" + console
        super().__init__(text)


class VMStateError(VMError):
    """The VM is not in a state that allows the operation; the message says which states do and what to do."""

    def __init__(self, message: str, *, vm_id: str | None = None, state: str = "") -> None:
        self.state = state
        super().__init__(message, vm_id=vm_id)


class SnapshotError(VMError):
    """A snapshot or template cannot be written or used (missing or foreign files, unknown format, mismatch)."""


class CloneError(VMError):
    """No clone of a batch could be started; ``failures`` holds each clone's error, in order."""

    def __init__(self, message: str, failures: list[BaseException]) -> None:
        self.failures = failures
        super().__init__(message + "".join(f"\n  - {f}" for f in failures[:8]))
