"""The policy in force: the policy files' compiled policy plus the sandboxes registered at run time.

Sandboxes come from two places: policy files (reviewed, in a repository) and registrations (the admin API, the VM
runtime cloning a sandbox). A registration is judged by the same checks as a sandbox in a file (`add_sandboxes`),
may never replace a file-defined sandbox, and is persisted to `<state_dir>/sandboxes.json` (written to a temporary
file and renamed, so a crash leaves the old or the new file, never half of one) so a restart keeps it.

Every change (reload, register, unregister) builds a whole new `CompiledPolicy` from the last good file policy and
the registered set, and publishes it with one assignment; a change that fails leaves everything as it was. A reload
re-applies the registered set, so it never drops a registration: a reload under which a registration is no longer
valid (its policy was removed, a file now defines its id or overlaps its sources) fails as a whole, listing why.

Thread-safe: the admin API calls in from the event loop, the VM runtime may call from its own threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import pydantic

from .audit import fields as F
from .config import ConfigError
from .metrics import GatewayMetrics
from .policies import CompiledPolicy, PolicyError, PolicyIssue, SandboxDTO, add_sandboxes, load_policy
from .policies._yaml import Position

__all__ = ["PolicyRegistry", "RegistryError", "ReloadResult", "registration_fields", "reload_fields"]

log = logging.getLogger("cube_egress.gateway")

_VERSION = 1


class RegistryError(ValueError):
    """The persisted registrations cannot be read (a corrupt or hand-edited sandboxes.json)."""


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    policy_hash: str  # of the policy in force afterwards (the old one when the reload failed)
    rule_count: int
    issues: tuple[PolicyIssue, ...] = ()


def registration_fields(spec: SandboxDTO) -> dict[str, Any]:
    """What an admin audit record says about a registration: everything it gives the sandbox, the token only as
    `has_token` (a token hash would let whoever reads the ledger try guesses offline)."""
    return {
        F.SANDBOX: spec.id,
        F.SOURCES: list(spec.sources),
        F.POLICIES: list(spec.policies),
        F.LABELS: dict(spec.labels),
        F.DEFAULT_MODE: spec.default_mode,
        F.LIMITS: None if spec.limits is None else spec.limits.model_dump(mode="json", exclude_none=True),
        F.HAS_TOKEN: spec.token_sha256 is not None,
    }


def reload_fields(old_hash: str, result: ReloadResult, sandboxes: int) -> dict[str, Any]:
    """What an admin audit record says about a reload. A failure names where its first errors are, not what they
    say: a message may quote the file's text."""
    fields: dict[str, Any] = {
        F.OLD_POLICY_HASH: old_hash,
        F.POLICY_HASH: result.policy_hash,
        F.RULE_COUNT: result.rule_count,
        F.SANDBOXES: sandboxes,
    }
    if not result.ok:
        fields[F.ERRORS] = len(result.issues)
        fields[F.ERROR_LOCATIONS] = [str(i.position) for i in result.issues[: F.MAX_ERROR_LOCATIONS]]
    return fields


def _read(path: str) -> dict[str, SandboxDTO]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise RegistryError(f"{path}: cannot read registered sandboxes: {e.strerror}") from e
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise RegistryError(f"{path}: not JSON ({e}); fix or remove the file") from e
    if not isinstance(doc, dict) or doc.get("version") != _VERSION or not isinstance(doc.get("sandboxes"), list):
        raise RegistryError(f"{path}: expected {{'version': {_VERSION}, 'sandboxes': [...]}}")
    out: dict[str, SandboxDTO] = {}
    for i, item in enumerate(doc["sandboxes"]):
        try:
            dto = SandboxDTO.model_validate(item)
        except pydantic.ValidationError as e:
            raise RegistryError(f"{path}:{i + 2}: sandbox {i}: {e.errors()[0]['msg']}") from e
        out[dto.id] = dto
    return out


def _write(path: str, specs: Mapping[str, SandboxDTO]) -> None:
    """One sandbox per line (line i+2 holds the i-th, by id), so errors about them can name file:line:col."""
    lines = [orjson.dumps(specs[k].model_dump(mode="json")) for k in sorted(specs)]
    body = b'{"version": 1, "sandboxes": [\n' + b",\n".join(lines) + (b"\n" if lines else b"") + b"]}\n"
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".sandboxes-", dir=directory)  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself survives a crash
    finally:
        os.close(dfd)


class PolicyRegistry:
    """Owns the file policy, the registered sandboxes and the policy in force (see module docstring)."""

    def __init__(
        self,
        policy_files: Callable[[], list[str]],
        state_dir: str,
        metrics: GatewayMetrics,
        publish: Callable[[CompiledPolicy], None],
        file_policy: CompiledPolicy | None = None,
    ) -> None:
        """Raises PolicyError (files or persisted registrations invalid) or RegistryError (file unreadable)."""
        self._policy_files = policy_files
        self.path = os.path.join(state_dir, "sandboxes.json")
        self._metrics = metrics
        self._publish = publish
        self._lock = threading.Lock()
        self._specs = _read(self.path)
        self._file_policy = file_policy or load_policy(policy_files())
        self._policy = self._compose(self._file_policy, self._specs)
        self._changed(publish=False)  # the gateway reads `policy` once it is constructed

    # -- reading --------------------------------------------------------------------------------------------

    @property
    def policy(self) -> CompiledPolicy:
        return self._policy

    @property
    def file_policy(self) -> CompiledPolicy:
        return self._file_policy

    @property
    def registered(self) -> Mapping[str, SandboxDTO]:
        return dict(self._specs)

    # -- changing -------------------------------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """Load the policy files again and re-apply the registrations; a failure keeps the policy in force."""
        with self._lock:
            try:
                files = load_policy(self._policy_files())
                new = self._compose(files, self._specs)
            except (PolicyError, ConfigError) as e:
                issues = e.issues if isinstance(e, PolicyError) else (PolicyIssue(Position("config", 1, 1), str(e)),)
                old = self._policy
                log.error("policy reload failed, keeping %s:\n%s", old.policy_hash[:12], e)
                self._metrics.policy_reloads_total.labels("error").inc()
                return ReloadResult(False, old.policy_hash, old.rule_count, tuple(issues))
            self._file_policy = files
            self._policy = new
            self._changed()
            self._metrics.policy_reloads_total.labels("ok").inc()
            log.info("policy reloaded: %s (%d rules)", new.policy_hash[:12], new.rule_count)
            return ReloadResult(True, new.policy_hash, new.rule_count)

    def register(self, spec: SandboxDTO, where: str = "registration") -> bool:
        """Add or replace a registered sandbox; True when it is new. Raises PolicyError (SandboxConflict for a
        clash with another sandbox) listing every problem; nothing changes then."""
        with self._lock:
            candidate = {**self._specs, spec.id: spec}
            new = self._compose(self._file_policy, candidate, new_id=spec.id, where=where)
            _write(self.path, candidate)  # persisted before it takes effect: a crash never forgets a live one
            created = spec.id not in self._specs
            self._specs = candidate
            self._policy = new
            self._changed()
            log.info("sandbox %s %s", spec.id, "registered" if created else "registration replaced")
            return created

    def unregister(self, sandbox_id: str) -> bool:
        """Remove a registered sandbox; False when there is none of that id (file-defined ones cannot be)."""
        with self._lock:
            if sandbox_id not in self._specs:
                return False
            candidate = {k: v for k, v in self._specs.items() if k != sandbox_id}
            new = self._compose(self._file_policy, candidate)
            _write(self.path, candidate)
            self._specs = candidate
            self._policy = new
            self._changed()
            log.info("sandbox %s unregistered", sandbox_id)
            return True

    # -- internals ------------------------------------------------------------------------------------------

    def _compose(
        self,
        files: CompiledPolicy,
        specs: Mapping[str, SandboxDTO],
        *,
        new_id: str | None = None,
        where: str = "registration",
    ) -> CompiledPolicy:
        if not specs:
            return files
        # Positions are where each registration sits in sandboxes.json (one per line, by id); the one being
        # registered right now is named by its request instead.
        extra = [
            (specs[k], Position(where, 1, 1) if k == new_id else Position(self.path, i + 2, 1))
            for i, k in enumerate(sorted(specs))
        ]
        return add_sandboxes(files, extra)

    def _changed(self, publish: bool = True) -> None:
        if publish:
            self._publish(self._policy)
        self._metrics.set_policy(self._policy.policy_hash, len(self._file_policy.sandboxes), len(self._specs))
