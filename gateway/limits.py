"""Usage limits: the stateful meter behind the policy's `limits:` (requests per minute, bytes per session).

The policy core stays pure: `CompiledPolicy.limits_for(sandbox, credential)` names the limits a request counts
against, and this module counts. The addon asks the meter twice per intercepted request:

    meter.admit_request(sandbox_id, limits, expected_bytes)  # request headers read: rate, and the declared size
    meter.add_bytes(sandbox_id, limits, nbytes)             # whole request read, before anything goes upstream

The gateway reads every intercepted request body whole before sending it (injection needs it; no request is
streamed), so the byte check sees the entire request before its first byte leaves. Should request streaming ever
be turned on, bodies must be counted chunk by chunk and the flow killed when a budget is passed.

Each call is atomic across all the limits it is given: if an enforced limit would be exceeded, nothing is counted
anywhere (a refused request spends no budget, so a client that backs off recovers) and the first such limit is
returned as the refusal; otherwise everything is counted, and report-mode limits that are now over are returned
as `reported` (the request passes, the would-refusal is audited).

Counters are keyed by names (`UsageLimit.meter_key`), never by policy objects, so they survive a policy reload; a
changed number applies to the counts already made.

- requests_per_minute: a sliding window in one-second slots (at most 61 slots per key, whatever the limit): no 60
  seconds ever see more than the limit, where a fixed window or a token bucket lets a burst get twice the limit
  across a boundary. A request leaves the count 60 to 61 seconds after it was made.
- bytes_per_session: request bytes (request line, headers and body, as the sandbox sent them) since the sandbox's
  session began. A session is the sandbox's registration in this gateway process: it ends when the sandbox is
  unregistered (`end_session`, called by `Gateway.unregister_sandbox`) or the gateway restarts.

Memory is bounded: entries whose window is empty and that hold no session bytes are dropped as they are found idle,
and past `max_keys` the least recently used entries are evicted (losing their counts: the price of a bound).
Thread-safe: one lock around each call; calls are short (no I/O).
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from .policies import Decision, LimitSubject, Mode, Reason, UsageLimit, Verdict

__all__ = ["Admission", "Exceeded", "LimitKind", "UsageMeter", "limit_decision"]

WINDOW_S = 60
# A slot is kept one second longer than the window: a request made late in second s may only leave the count once a
# full 60 s have passed, so "at most N in any 60 seconds" holds, at the price of up to one second of extra wait.
_KEEP_S = WINDOW_S + 1
_SWEEP_EVERY = 1024  # calls between idle sweeps


class LimitKind(enum.StrEnum):
    REQUESTS_PER_MINUTE = "requests_per_minute"
    BYTES_PER_SESSION = "bytes_per_session"


@dataclass(frozen=True, slots=True)
class Exceeded:
    """One limit a request is over (or would be)."""

    limit: UsageLimit
    kind: LimitKind
    used: int  # counted before this request
    allowed: int
    retry_after_s: int | None  # when the window will have room again; None for a session budget (it never refills)

    @property
    def label(self) -> str:
        """Stable text for 429 bodies, audit records and metrics: `requests_per_minute:sandbox`."""
        return f"{self.kind}:{self.limit.subject}"

    @property
    def scope(self) -> str:
        """Whose budget: `sandbox` (the sandbox's own, or its share of a credential) or `global` (a credential's)."""
        return str(self.limit.scope)


@dataclass(frozen=True, slots=True)
class Admission:
    refused: Exceeded | None  # an enforced limit: the request must not pass
    reported: tuple[Exceeded, ...] = ()  # report-mode limits over their number: it passes, this is recorded
    # After counting: {"sandbox": {"requests_per_minute": 3, "bytes_per_session": 1200}, "credential": {...}}
    usage: dict[str, dict[str, int]] | None = None

    @property
    def ok(self) -> bool:
        return self.refused is None


_ADMITTED = Admission(None)


class _Entry:
    """The counts of one key: a sliding window of [second, count] slots and the session's bytes."""

    __slots__ = ("bytes", "slots", "total")

    def __init__(self) -> None:
        self.slots: deque[list[int]] = deque()
        self.total = 0
        self.bytes = 0

    def expire(self, now_s: int) -> None:
        while self.slots and self.slots[0][0] <= now_s - _KEEP_S:
            self.total -= self.slots.popleft()[1]

    def count_request(self, now_s: int) -> None:
        if self.slots and self.slots[-1][0] == now_s:
            self.slots[-1][1] += 1
        else:
            self.slots.append([now_s, 1])
        self.total += 1

    def retry_after(self, now: float, excess: int) -> int:
        """Seconds until `excess` requests have left the window (at least 1)."""
        left = excess
        for second, count in self.slots:
            left -= count
            if left <= 0:
                return max(1, math.ceil(second + _KEEP_S - now))
        return _KEEP_S

    @property
    def idle(self) -> bool:
        return not self.slots and self.bytes == 0


class UsageMeter:
    """Counts requests and bytes against usage limits. `clock` is injectable (monotonic seconds) for tests."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 65_536) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self._max_keys = max_keys
        self._entries: OrderedDict[tuple[str, str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._calls = 0

    def __len__(self) -> int:
        return len(self._entries)

    # -- counting -----------------------------------------------------------------------------------------------

    def admit_request(self, sandbox_id: str, limits: Sequence[UsageLimit], expected_bytes: int = 0) -> Admission:
        """A new request: counts it against every requests_per_minute limit. Refused as well when the session's
        bytes plus `expected_bytes` (what the request says it will send) would pass an enforced byte budget, so a
        large body is refused before it is read; its bytes are counted by `add_bytes`."""
        if not limits:
            return _ADMITTED
        with self._lock:
            now = self._clock()
            now_s = math.floor(now)
            entries = [(limit, self._entry(limit.meter_key(sandbox_id), now_s)) for limit in limits]
            over: list[Exceeded] = []
            for limit, entry in entries:
                rpm = limit.requests_per_minute
                if rpm is not None and entry.total + 1 > rpm:
                    retry = entry.retry_after(now, entry.total + 1 - rpm)
                    over.append(Exceeded(limit, LimitKind.REQUESTS_PER_MINUTE, entry.total, rpm, retry))
                budget = limit.bytes_per_session
                if budget is not None and entry.bytes + expected_bytes > budget and limit.mode is Mode.ENFORCE:
                    over.append(Exceeded(limit, LimitKind.BYTES_PER_SESSION, entry.bytes, budget, None))
            refused = next((e for e in over if e.limit.mode is Mode.ENFORCE), None)
            if refused is not None:
                return Admission(refused, (), _usage(entries))
            for limit, entry in entries:
                if limit.requests_per_minute is not None:
                    entry.count_request(now_s)
            return Admission(None, tuple(over), _usage(entries))

    def add_bytes(self, sandbox_id: str, limits: Sequence[UsageLimit], nbytes: int) -> Admission:
        """The request's bytes, once it has been read whole and before it is sent: counted against every
        bytes_per_session limit, or refused (and not counted) if an enforced one would be passed."""
        limits = [limit for limit in limits if limit.bytes_per_session is not None]
        if not limits:
            return _ADMITTED
        with self._lock:
            now_s = math.floor(self._clock())
            entries = [(limit, self._entry(limit.meter_key(sandbox_id), now_s)) for limit in limits]
            over = [
                Exceeded(limit, LimitKind.BYTES_PER_SESSION, entry.bytes, limit.bytes_per_session, None)
                for limit, entry in entries
                if limit.bytes_per_session is not None and entry.bytes + nbytes > limit.bytes_per_session
            ]
            refused = next((e for e in over if e.limit.mode is Mode.ENFORCE), None)
            if refused is not None:
                return Admission(refused, (), _usage(entries))
            for _, entry in entries:
                entry.bytes += nbytes
            return Admission(None, tuple(over), _usage(entries))

    # -- sessions and reading -----------------------------------------------------------------------------------

    def end_session(self, sandbox_id: str) -> int:
        """The sandbox's session ended (unregistered): drop every count kept for it alone. A global credential
        budget is shared and stays. Returns how many entries were dropped."""
        with self._lock:
            mine = [
                key
                for key in self._entries
                if (key[0] == LimitSubject.SANDBOX.value and key[1] == sandbox_id)
                or (key[0] == LimitSubject.CREDENTIAL.value and key[2] == sandbox_id)
            ]
            for key in mine:
                del self._entries[key]
            return len(mine)

    def usage(self, sandbox_id: str, limits: Iterable[UsageLimit]) -> dict[str, dict[str, int]]:
        """The current counts for these limits, without counting anything (for the admin API and tests)."""
        with self._lock:
            now_s = math.floor(self._clock())
            out: dict[str, dict[str, int]] = {}
            for limit in limits:
                entry = self._entries.get(limit.meter_key(sandbox_id))
                if entry is not None:
                    entry.expire(now_s)
                out[str(limit.subject)] = _counts(limit, entry)
            return out

    # -- internals ----------------------------------------------------------------------------------------------

    def _entry(self, key: tuple[str, str, str], now_s: int) -> _Entry:
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0:
            self._sweep(now_s)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            while len(self._entries) > self._max_keys:
                self._entries.popitem(last=False)  # least recently used
        else:
            self._entries.move_to_end(key)
        entry.expire(now_s)
        return entry

    def _sweep(self, now_s: int) -> None:
        """Drop entries with nothing in them: an empty window and no session bytes equal a fresh entry."""
        idle = []
        for key, entry in self._entries.items():
            entry.expire(now_s)
            if entry.idle:
                idle.append(key)
        for key in idle:
            del self._entries[key]


def _counts(limit: UsageLimit, entry: _Entry | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    if limit.requests_per_minute is not None:
        counts[LimitKind.REQUESTS_PER_MINUTE.value] = entry.total if entry else 0
    if limit.bytes_per_session is not None:
        counts[LimitKind.BYTES_PER_SESSION.value] = entry.bytes if entry else 0
    return counts


def _usage(entries: Iterable[tuple[UsageLimit, _Entry]]) -> dict[str, dict[str, int]]:
    return {str(limit.subject): _counts(limit, entry) for limit, entry in entries}


def limit_decision(decision: Decision, exceeded: Exceeded) -> Decision:
    """The decision to answer and audit when a limit is exceeded: a 429 refusal for an enforced limit; for a
    report-mode one, the would-refusal that lets the request pass (as a report-mode deny rule does). The rule and
    the credential of the original decision stay, so the record says which request hit which limit."""
    if exceeded.limit.mode is Mode.ENFORCE:
        return replace(
            decision,
            verdict=Verdict.DENY,
            mode=Mode.ENFORCE,
            reason=Reason.USAGE_LIMIT_EXCEEDED,
            detail=exceeded.label,
        )
    if decision.verdict is not Verdict.ALLOW:
        return decision  # already a would-deny (a report-mode rule): that record stays as it is
    return replace(
        decision, verdict=Verdict.DENY, mode=Mode.REPORT, reason=Reason.USAGE_LIMIT_EXCEEDED, detail=exceeded.label
    )
