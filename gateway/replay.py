"""Policy replay: re-decide recorded requests under a proposed policy and show what would change.

    report = replay(records, policy)        # records: audit record dicts (gateway.audit.read_records)
    render_text(report) / report.as_dict()
    run(audit_files, policy_files, ...)     # `cube-egress policy replay`; returns the exit code

What is replayed: decision records of requests (phase "request") and of connections that were spliced, tunnelled
or refused before any request (phase "connection"). Each is rebuilt into RequestFacts (scheme, host, port, and for
a request its method and path) and decided under the proposed policy for the recorded sandbox id.

What replay cannot know, and how it says so:
- Headers. Records carry none (except the agent correlation headers, which are used). A decision that a rule
  with header conditions could change, under the proposed policy, is marked *inexact*: with the real headers it may
  come out otherwise.
- Query values. The audit writer redacts them; decisions never read them (paths match without the query).
- What happened after the policy: address checks, credentials, upstream errors. Records refused for such reasons
  (address_refused, secret_unavailable, host_mismatch...) are skipped and counted by reason. A request refused by a
  usage limit is compared by its policy decision (the allowing rule it carries): replay does not re-count usage.
- DNS queries of sandboxes (phase "dns") are not replayed; they are counted as skipped.

Every replayed record lands in one of: newly denied (it passed, it would be refused), newly allowed (it was
refused, it would pass), changed (passes or not as before, but another rule, reason, mode or connection handling),
unchanged. Requests that differ only in their query string and have the same outcomes are grouped, with a count.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from .audit import fields as F
from .policies import (
    CORRELATION_INVALID,
    CompiledPolicy,
    Decision,
    HostError,
    Identity,
    Mode,
    PolicyError,
    Reason,
    RequestFacts,
    Scheme,
    Verdict,
    load_policy,
    normalize_host,
)

__all__ = ["Change", "DiffEntry", "Outcome", "ReplayReport", "replay", "render_text", "run"]

# Reasons that are the policy's own answer: only these can be compared with a re-decision.
_POLICY_REASONS = frozenset(
    {
        Reason.ALLOWED_BY_RULE,
        Reason.DENIED_BY_RULE,
        Reason.NO_MATCHING_RULE,
        Reason.IP_LITERAL_NOT_ALLOWED,
        Reason.AMBIGUOUS_PATH,
        Reason.UNKNOWN_SANDBOX,
        Reason.USAGE_LIMIT_EXCEEDED,  # compared by the policy decision underneath (its rule allowed the request)
    }
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Change(enum.StrEnum):
    NEWLY_DENIED = "newly_denied"
    NEWLY_ALLOWED = "newly_allowed"
    CHANGED = "changed"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One side of the comparison: a decision as it reads in a record."""

    verdict: str
    mode: str
    rule: str | None
    reason: str
    handling: str | None = None  # connections only: refused | spliced | intercepted | tunnel

    @property
    def passes(self) -> bool:
        return not (self.verdict == Verdict.DENY and self.mode == Mode.ENFORCE)

    def __str__(self) -> str:
        mode = " (report)" if self.mode == Mode.REPORT else ""
        text = f"{self.verdict}{mode} {self.rule or '-'} {self.reason}"
        return f"{text} [{self.handling}]" if self.handling else text

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"verdict": self.verdict, "mode": self.mode, "rule": self.rule, "reason": self.reason}
        if self.handling is not None:
            out["handling"] = self.handling
        return out


@dataclass(frozen=True, slots=True)
class _Request:
    sandbox: str | None
    phase: str
    scheme: str
    host: str
    port: int
    method: str | None
    path: str | None

    def __str__(self) -> str:
        port = "" if _DEFAULT_PORTS.get(self.scheme) == self.port else f":{self.port}"
        if self.phase == "connection":
            return f"{self.sandbox or '-'} connection {self.scheme}://{self.host}{port}"
        return f"{self.sandbox or '-'} {self.method} {self.scheme}://{self.host}{port}{self.path}"


@dataclass(slots=True)
class DiffEntry:
    request: _Request
    before: Outcome
    after: Outcome
    change: Change
    inexact: bool
    count: int = 0
    first_seen: str | None = None

    def as_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "sandbox": r.sandbox,
            "phase": r.phase,
            "scheme": r.scheme,
            "host": r.host,
            "port": r.port,
            "method": r.method,
            "path": r.path,
            "count": self.count,
            "first_seen": self.first_seen,
            "inexact": self.inexact,
            "before": self.before.as_dict(),
            "after": self.after.as_dict(),
        }


@dataclass(slots=True)
class ReplayReport:
    policy_hash: str
    records: int = 0  # decision records read
    replayed: int = 0
    unchanged: int = 0
    inexact: int = 0  # replayed decisions that header conditions could change
    skipped: dict[str, int] = field(default_factory=dict)  # why -> how many
    entries: list[DiffEntry] = field(default_factory=list)  # changed decisions, grouped, in first-seen order

    def of(self, change: Change) -> list[DiffEntry]:
        return [e for e in self.entries if e.change is change]

    def count(self, change: Change) -> int:
        return sum(e.count for e in self.of(change))

    @property
    def changed(self) -> bool:
        return bool(self.entries)

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy_hash": self.policy_hash,
            "records": self.records,
            "replayed": self.replayed,
            "unchanged": self.unchanged,
            "inexact": self.inexact,
            "skipped": dict(sorted(self.skipped.items())),
            **{
                str(change): [e.as_dict() for e in self.of(change)]
                for change in (Change.NEWLY_DENIED, Change.NEWLY_ALLOWED, Change.CHANGED)
            },
        }


# -- replaying ---------------------------------------------------------------------------------------------------


def _recorded(record: Mapping[str, Any]) -> Outcome:
    reason = str(record.get(F.REASON))
    verdict, mode, rule = str(record.get(F.VERDICT)), str(record.get(F.MODE) or Mode.ENFORCE), record.get(F.RULE)
    if reason == Reason.USAGE_LIMIT_EXCEEDED:
        # The limit refused (or, in report mode, would have refused) what the rule allowed.
        verdict, mode, reason = str(Verdict.ALLOW), str(Mode.ENFORCE), str(Reason.ALLOWED_BY_RULE)
    handling = None
    if record.get(F.PHASE) == "connection":
        if verdict == Verdict.DENY and mode == Mode.ENFORCE:
            handling = "refused"
        elif record.get(F.SCHEME) == Scheme.TCP:
            handling = "tunnel"
        else:
            handling = "intercepted" if record.get(F.INTERCEPTED) else "spliced"
    return Outcome(verdict, mode, rule if isinstance(rule, str) else None, reason, handling)


def _decided(decision: Decision, facts: RequestFacts) -> Outcome:
    handling = None
    if facts.is_connection_phase:
        if decision.blocks:
            handling = "refused"
        elif facts.scheme is Scheme.TCP:
            handling = "tunnel"
        else:
            handling = "intercepted" if decision.intercept else "spliced"
    return Outcome(str(decision.verdict), str(decision.mode), decision.rule_id, str(decision.reason), handling)


def _facts(record: Mapping[str, Any]) -> tuple[_Request, RequestFacts] | str:
    """The request a record describes, or why it cannot be replayed."""
    phase = record.get(F.PHASE)
    scheme, host, port = record.get(F.SCHEME), record.get(F.HOST), record.get(F.PORT)
    if scheme not in ("http", "https", "tcp") or not isinstance(host, str) or not isinstance(port, int):
        return "incomplete record"
    try:
        host = normalize_host(host)
    except HostError:
        return "bad host"
    sandbox = record.get(F.SANDBOX)
    sandbox = sandbox if isinstance(sandbox, str) else None
    if phase == "connection":
        return _Request(sandbox, "connection", scheme, host, port, None, None), RequestFacts(Scheme(scheme), host, port)
    method, path = record.get(F.METHOD), record.get(F.PATH)
    if not isinstance(method, str) or not isinstance(path, str):
        return "incomplete record"
    correlation = record.get(F.CORRELATION)
    headers: tuple[tuple[str, str], ...] = ()
    if isinstance(correlation, dict):
        headers = tuple(
            (str(k).lower(), v) for k, v in correlation.items() if isinstance(v, str) and v != CORRELATION_INVALID
        )
    # Grouped by the path without its query: decisions never read the query (and its values were redacted).
    request = _Request(sandbox, "request", scheme, host, port, method, path.split("?", 1)[0])
    return request, RequestFacts(Scheme(scheme), host, port, method, path, headers)


def replay(records: Iterable[Mapping[str, Any]], policy: CompiledPolicy) -> ReplayReport:
    """Re-decide every replayable decision record under `policy` (pure: no I/O)."""
    report = ReplayReport(policy.policy_hash)
    rules = {r.id: r for rs in policy.rules_by_policy.values() for r in rs}
    groups: dict[tuple[_Request, Outcome, Outcome], DiffEntry] = {}

    def skip(why: str) -> None:
        report.skipped[why] = report.skipped.get(why, 0) + 1

    for record in records:
        if record.get(F.EVENT) != F.EVENT_DECISION:
            continue
        report.records += 1
        phase = record.get(F.PHASE)
        if phase not in ("request", "connection"):
            skip(str(phase))  # "dns"
            continue
        reason = record.get(F.REASON)
        if reason not in _POLICY_REASONS:
            skip(str(reason))
            continue
        built = _facts(record)
        if isinstance(built, str):
            skip(built)
            continue
        request, facts = built
        identity = Identity(request.sandbox, str(record.get(F.SOURCE) or "replay")) if request.sandbox else None
        before = _recorded(record)
        after = _decided(policy.decide(identity, facts), facts)
        known = [name for name, _ in facts.headers]
        recorded_rule = rules.get(before.rule or "")
        inexact = policy.depends_on_headers(identity, facts, ignore=known) or (
            recorded_rule is not None and any(h.name not in known for h in recorded_rule.headers)
        )
        report.replayed += 1
        report.inexact += inexact
        if before.passes and not after.passes:
            change = Change.NEWLY_DENIED
        elif after.passes and not before.passes:
            change = Change.NEWLY_ALLOWED
        elif before != after:
            change = Change.CHANGED
        else:
            report.unchanged += 1
            continue
        entry = groups.get((request, before, after))
        if entry is None:
            entry = groups[(request, before, after)] = DiffEntry(request, before, after, change, inexact)
            entry.first_seen = record.get(F.TIME) if isinstance(record.get(F.TIME), str) else None
            report.entries.append(entry)
        entry.count += 1
        entry.inexact = entry.inexact or inexact
    return report


# -- output and the command ------------------------------------------------------------------------------------

_TITLES = {
    Change.NEWLY_DENIED: "newly denied",
    Change.NEWLY_ALLOWED: "newly allowed",
    Change.CHANGED: "changed rule/reason",
}


def render_text(report: ReplayReport, audit_files: Sequence[str] = ()) -> str:
    lines = [
        f"replayed {report.replayed} of {report.records} decision record(s)"
        + (f" from {len(audit_files)} audit file(s)" if audit_files else "")
        + f" under policy {report.policy_hash[:12]}"
    ]
    for change, title in _TITLES.items():
        entries = report.of(change)
        lines.append(f"{title}: {report.count(change)}")
        for e in entries:
            times = f"  x{e.count}" if e.count > 1 else ""
            mark = "  (inexact: header conditions)" if e.inexact else ""
            lines.append(f"  {e.request}{times}{mark}")
            lines.append(f"      before: {e.before}")
            lines.append(f"      after:  {e.after}")
    lines.append(f"unchanged: {report.unchanged}")
    if report.inexact:
        lines.append(
            f"inexact: {report.inexact} (a rule with header conditions could decide these otherwise; "
            "audit records carry no headers)"
        )
    if report.skipped:
        detail = ", ".join(f"{why} {n}" for why, n in sorted(report.skipped.items()))
        lines.append(f"skipped: {sum(report.skipped.values())} ({detail})")
    return "\n".join(lines) + "\n"


def run(
    audit_files: Sequence[str],
    policy_files: Sequence[str],
    *,
    output: Literal["text", "json"] = "text",
    fail_on: Literal["any", "denied"] = "any",
) -> int:
    """`cube-egress policy replay`. Exit codes: 0 nothing changes (or, with fail_on="denied", nothing is newly
    denied); 1 a change; 2 an unreadable audit file or a broken policy (every error with file:line:col)."""
    from .audit import read_records

    try:
        policy = load_policy(policy_files)
    except PolicyError as e:
        for issue in e.issues:
            print(str(issue), file=sys.stderr)
        print(f"cube-egress: the proposed policy has {len(e.issues)} error(s); nothing was replayed", file=sys.stderr)
        return 2
    try:
        report = replay(read_records(audit_files), policy)
    except OSError as e:
        print(f"cube-egress: cannot read audit file {e.filename!r}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"cube-egress: {e}", file=sys.stderr)
        return 2
    if output == "json":
        doc = {"audit_files": list(audit_files), "policy_files": list(policy.files), **report.as_dict()}
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_text(report, audit_files))
    if fail_on == "denied":
        return 1 if report.of(Change.NEWLY_DENIED) else 0
    return 1 if report.changed else 0
