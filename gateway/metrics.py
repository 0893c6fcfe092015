"""Prometheus metrics of one gateway, in a registry of its own.

Each `GatewayMetrics` owns a `prometheus_client.CollectorRegistry` (never the process-global default: tests run
several gateways per process, and a second registration of the same name in one registry is an error). The admin
API serves `exposition()` at `/metrics`.

Cardinality is bounded by construction: labels are closed enums (verdict, mode, reason, phase, result, drop
reason) or names the policy bounds (rule ids, credential names, limit names). Nothing is labelled by host, path,
sandbox address or sandbox id. As a second line, every label fed from outside a closed enum goes through
`_Bounded`, which folds values past a fixed number of distinct ones into `other` (a policy with thousands of
rules still fits; a bug that feeds request data into a label cannot blow up the registry).

Decisions are counted from the audit log (`AuditLog.subscribe(metrics.observe_audit_record)`), so every decision
that is audited is counted exactly once and the addon needs no counting code of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .audit import fields as F

__all__ = ["GatewayMetrics", "OTHER"]

OTHER: Final = "other"  # the label value a value past a label's bound is folded into
_NONE: Final = ""  # the label value for "no rule" / "no credential" (Prometheus reads an empty label as absent)

# The policy core decides in microseconds; the buckets resolve that range.
_DECISION_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2)
_REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_VERDICTS = frozenset({"allow", "deny"})
_MODES = frozenset({"enforce", "report"})
_PHASES = frozenset({"connection", "request", F.PHASE_DNS})


class _Bounded:
    """Passes through at most `limit` distinct values; any later new value becomes `other`. Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        text = _NONE if value is None else str(value)
        if text in self._seen:
            return text
        with self._lock:
            if len(self._seen) >= self.limit:
                return OTHER
            self._seen.add(text)
        return text


def _closed(value: object, allowed: frozenset[str]) -> str:
    text = _NONE if value is None else str(value)
    return text if text in allowed else OTHER


class GatewayMetrics:
    """The gateway's metrics. Attributes are prometheus_client metrics; the `observe_*`/`count_*` helpers apply
    the label bounds and are what callers should use."""

    def __init__(self, *, max_label_values: int = 2000) -> None:
        from .policies import Reason  # the closed set of decision reasons

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._reasons = frozenset(str(x) for x in Reason)
        self._rule = _Bounded(max_label_values)
        self._credential = _Bounded(max_label_values)
        self._limit = _Bounded(max_label_values)
        self._small = _Bounded(64)  # backend names, error kinds, drop reasons, scopes: small closed-ish sets

        self.decisions_total = Counter(
            "cube_egress_decisions",
            "Audited decisions, by verdict, enforcement mode, rule id ('' when no rule), reason and phase.",
            ["verdict", "mode", "rule", "reason", "phase"],
            registry=r,
        )
        self.injections_total = Counter(
            "cube_egress_injections",
            "Requests a credential was injected into, by credential name.",
            ["credential"],
            registry=r,
        )
        self.secret_backend_errors_total = Counter(
            "cube_egress_secret_backend_errors",
            "Secret backend failures seen on the request path or by the refresher, by backend and kind.",
            ["backend", "kind"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "cube_egress_decision_seconds",
            "Time spent in the policy core per decision (CompiledPolicy.decide).",
            buckets=_DECISION_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "cube_egress_upstream_seconds",
            "Intercepted requests: from the request fully read from the sandbox to the upstream's response headers "
            "(dialling, TLS and the upstream's own time).",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "cube_egress_request_seconds",
            "Intercepted requests: from the first request byte to the last response byte.",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.usage_limited_total = Counter(
            "cube_egress_usage_limited",
            "Requests refused with 429 by a usage limit, by the limit's scope, credential and limit name.",
            ["sandbox_scope", "credential", "limit"],
            registry=r,
        )
        self.kernel_drops_total = Counter(
            "cube_egress_kernel_drops",
            "Packets and connect()/sendmsg() calls dropped by the kernel guard (where attached), by reason.",
            ["reason"],
            registry=r,
        )
        self.sandboxes_registered = Gauge(
            "cube_egress_sandboxes",
            "Sandboxes the gateway knows, by origin (policy file or admin API registration).",
            ["origin"],
            registry=r,
        )
        self.policy_reloads_total = Counter(
            "cube_egress_policy_reloads", "Policy reloads, by result (ok or error).", ["result"], registry=r
        )
        self.policy_info = Gauge(
            "cube_egress_policy_info", "The policy in force: 1 for its hash.", ["hash"], registry=r
        )
        self.admin_requests_total = Counter(
            "cube_egress_admin_requests",
            "Admin API requests, by route template and status code.",
            ["route", "status"],
            registry=r,
        )
        for result in ("ok", "error"):
            self.policy_reloads_total.labels(result)  # exported as 0 from the start
        for origin in ("file", "api"):
            self.sandboxes_registered.labels(origin).set(0)

    # -- feeding --------------------------------------------------------------------------------------------

    def observe_audit_record(self, record: Mapping[str, Any]) -> None:
        """An `AuditLog.subscribe` callback: count decision records (security events are not decisions)."""
        if record.get(F.EVENT) != F.EVENT_DECISION:
            return
        reason = _NONE if record.get(F.REASON) is None else str(record.get(F.REASON))
        self.decisions_total.labels(
            _closed(record.get(F.VERDICT), _VERDICTS),
            _closed(record.get(F.MODE, "enforce"), _MODES),
            self._rule(record.get(F.RULE)),
            reason if reason in self._reasons else OTHER,
            _closed(record.get(F.PHASE), _PHASES),
        ).inc()

    def count_injection(self, credential: str) -> None:
        self.injections_total.labels(self._credential(credential)).inc()

    def count_secret_error(self, backend: str, kind: str) -> None:
        self.secret_backend_errors_total.labels(self._small(backend), self._small(kind)).inc()

    def count_usage_limited(self, scope: str, credential: str | None, limit: str) -> None:
        self.usage_limited_total.labels(self._small(scope), self._credential(credential), self._limit(limit)).inc()

    def count_kernel_drop(self, reason: str, count: int = 1) -> None:
        self.kernel_drops_total.labels(self._small(reason)).inc(count)

    def count_admin_request(self, route: str, status: int) -> None:
        # Route templates are the API's own (a closed set); status codes are few.
        self.admin_requests_total.labels(self._small(route), str(status)).inc()

    def set_policy(self, policy_hash: str, file_sandboxes: int, api_sandboxes: int) -> None:
        """The policy in force changed (start, reload, registration): replace its info series whole."""
        self.policy_info.clear()
        self.policy_info.labels(policy_hash).set(1)
        self.sandboxes_registered.labels("file").set(file_sandboxes)
        self.sandboxes_registered.labels("api").set(api_sandboxes)

    # -- reading --------------------------------------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
