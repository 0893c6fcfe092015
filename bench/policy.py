"""`python -m bench policy`: latency of one `CompiledPolicy.decide` call at 10, 1,000 and 10,000 rules.

Generated policy files (bench/_policygen.py) are loaded with `load_policy`, as the gateway does. A fixed mix of
queries (hits and misses of every kind, see `_policygen.CATEGORIES`) is turned into `RequestFacts` beforehand; then
each `decide` call is timed on its own with `time.perf_counter_ns`, after a warm-up, for the request phase (method,
path, headers) and for the connection phase (CONNECT / ClientHello: no method). The baseline is the 10-rule file:
the target is that decision time does not grow with the number of rules (indexes, not scans). The mix repeats its
2,000 destinations, so caches are warm; "first sight" times destinations never seen before (no target).
"""

from __future__ import annotations

import gc
import statistics
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _policygen
from ._common import BenchError, percentile, print_table, rnd

SIZES = (10, 1_000, 10_000)
TARGET_P50_US = 5.0
TARGET_RATIO = 1.5


@dataclass
class PhaseResult:
    size: int
    phase: str
    calls: int
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    by_category: dict[str, float]  # p50 per query category


def _timer_overhead_ns(n: int = 200_000) -> float:
    """p50 of timing an empty call the same way: what every figure below includes."""
    pc = time.perf_counter_ns

    def noop(a: object, b: object) -> None:
        return None

    out = array("q", bytes(8 * n))
    for i in range(n):
        t0 = pc()
        noop(None, None)
        out[i] = pc() - t0
    return percentile(sorted(out), 50)


def _measure(policy: Any, identity: Any, facts: list[Any], calls: int, warmup: int) -> tuple[array[int], list[int]]:
    decide = policy.decide
    pc = time.perf_counter_ns
    n = len(facts)
    for i in range(warmup):
        decide(identity, facts[i % n])
    out = array("q", bytes(8 * calls))
    idx: list[int] = [i % n for i in range(calls)]
    gc.collect()
    for k, i in enumerate(idx):
        f = facts[i]
        t0 = pc()
        decide(identity, f)
        out[k] = pc() - t0
    return out, idx


def _result(size: int, phase: str, lat: array[int], by_cat: dict[str, list[int]]) -> PhaseResult:
    s = sorted(lat)
    return PhaseResult(
        size=size,
        phase=phase,
        calls=len(s),
        p50_us=percentile(s, 50) / 1000,
        p90_us=percentile(s, 90) / 1000,
        p99_us=percentile(s, 99) / 1000,
        mean_us=statistics.fmean(s) / 1000,
        by_category={c: percentile(sorted(v), 50) / 1000 for c, v in by_cat.items()},
    )


def _measure_once(policy: Any, identity: Any, facts: list[Any]) -> array[int]:
    """Each fact decided exactly once (no repeat, so no cache can have seen its destination)."""
    decide = policy.decide
    pc = time.perf_counter_ns
    out = array("q", bytes(8 * len(facts)))
    gc.collect()
    for k, f in enumerate(facts):
        t0 = pc()
        decide(identity, f)
        out[k] = pc() - t0
    return out


def run(
    *, calls: int = 200_000, warmup: int = 20_000, cold: int = 20_000, sizes: tuple[int, ...] = SIZES, workdir: Path
) -> dict[str, Any]:
    from gateway.policies import Identity, facts_from_url, load_policy

    identity = Identity("bench", "127.0.0.1:40000")
    results: list[PhaseResult] = []
    cold_results: list[PhaseResult] = []
    load_times: dict[int, list[float]] = {}
    mismatches = 0
    overhead_ns = _timer_overhead_ns()
    print(
        f"policy decision latency: {calls:,} timed calls per size and phase after {warmup:,} warm-up calls; "
        f"query mix {', '.join(f'{c} {w:.0%}' for c, w in _policygen.CATEGORIES)}; "
        f"timer overhead (empty call) p50 {overhead_ns / 1000:.3f} us, included in every figure. The mix cycles "
        f"over 2,000 destinations, so a cache of decisions is warm; 'first sight' below times {cold:,} calls per "
        f"size and phase whose destinations are all new ("
        f"{', '.join(f'{c} {w:.0%}' for c, w in _policygen.COLD_CATEGORIES)})"
    )
    for size in sizes:
        doc, spec = _policygen.generate(size)
        path = workdir / f"policy-{size}.yaml"
        _policygen.write(path, doc)
        times = []
        for _ in range(3 if size >= 10_000 else 1):
            t0 = time.perf_counter()
            policy = load_policy([str(path)])
            times.append(time.perf_counter() - t0)
        load_times[size] = times
        if policy.rule_count != size:
            raise BenchError(f"generated {size} rules, policy has {policy.rule_count}")
        qs = _policygen.queries(spec, 2_000)
        for phase in ("request", "connection"):
            facts = [facts_from_url(q.method if phase == "request" else None, q.url, q.headers) for q in qs]
            if phase == "request":
                for q, f in zip(qs, facts, strict=True):
                    got = "deny" if policy.decide(identity, f).blocks else "allow"
                    if got != q.expect_request:
                        mismatches += 1
            lat, idx = _measure(policy, identity, facts, calls, warmup)
            by_cat: dict[str, list[int]] = {}
            for k, i in enumerate(idx):
                by_cat.setdefault(qs[i].category, []).append(lat[k])
            results.append(_result(size, phase, lat, by_cat))
            if cold:
                cq = _policygen.cold_queries(spec, cold, tag=phase[0])
                cfacts = [facts_from_url(q.method if phase == "request" else None, q.url, q.headers) for q in cq]
                clat = _measure_once(policy, identity, cfacts)
                cold_by_cat: dict[str, list[int]] = {}
                for k, q in enumerate(cq):
                    cold_by_cat.setdefault(q.category, []).append(clat[k])
                cold_results.append(_result(size, phase, clat, cold_by_cat))
    if mismatches:
        print(f"WARNING: {mismatches} request-phase decisions differ from what the generator expected")

    print_table(
        ["rules", "phase", "calls", "p50 us", "p90 us", "p99 us", "mean us"],
        [(r.size, r.phase, r.calls, r.p50_us, r.p90_us, r.p99_us, r.mean_us) for r in results],
        title="decide() latency",
    )
    cats = [c for c, _ in _policygen.CATEGORIES]
    print_table(
        ["rules", "phase", *cats],
        [(r.size, r.phase, *(r.by_category.get(c, float("nan")) for c in cats)) for r in results],
        title="p50 us by query category",
    )
    if cold_results:
        cold_cats = [c for c, _ in _policygen.COLD_CATEGORIES]
        print_table(
            ["rules", "phase", "calls", "p50 us", "p90 us", "p99 us", "mean us", *(f"{c} p50" for c in cold_cats)],
            [
                (
                    r.size,
                    r.phase,
                    r.calls,
                    r.p50_us,
                    r.p90_us,
                    r.p99_us,
                    r.mean_us,
                    *(r.by_category[c] for c in cold_cats),
                )
                for r in cold_results
            ],
            title="decide() latency, first sight of each destination (no target)",
        )
    print_table(
        ["rules", "load+compile s (each run)"],
        [(size, ", ".join(f"{t:.3f}" for t in ts)) for size, ts in load_times.items()],
        title="load_policy() time",
    )

    by = {(r.size, r.phase): r for r in results}
    small, big = min(sizes), max(sizes)
    figures: dict[str, Any] = {
        "bench": "policy",
        "calls": calls,
        "warmup": warmup,
        "timer_overhead_us": rnd(overhead_ns / 1000),
    }
    for r in results:
        key = f"{r.phase}_{r.size}"
        figures[f"{key}_p50_us"] = rnd(r.p50_us)
        figures[f"{key}_p99_us"] = rnd(r.p99_us)
    for r in cold_results:
        figures[f"first_sight_{r.phase}_{r.size}_p50_us"] = rnd(r.p50_us)
        figures[f"first_sight_{r.phase}_{r.size}_p99_us"] = rnd(r.p99_us)
    for phase in ("request", "connection"):
        figures[f"{phase}_ratio_p50_{big}_vs_{small}"] = rnd(by[(big, phase)].p50_us / by[(small, phase)].p50_us)
    figures[f"load_compile_{big}_s"] = rnd(statistics.median(load_times[big]))
    figures["decision_mismatches"] = mismatches
    worst_p50 = max(r.p50_us for r in results)
    worst_ratio = max(figures[f"{p}_ratio_p50_{big}_vs_{small}"] or 0.0 for p in ("request", "connection"))
    figures["target_p50_us"] = TARGET_P50_US
    figures["target_ratio"] = TARGET_RATIO
    figures["meets_targets"] = worst_p50 <= TARGET_P50_US and worst_ratio <= TARGET_RATIO
    print(
        f"\ntargets: p50 <= {TARGET_P50_US} us (worst {worst_p50:.2f} us), p50({big})/p50({small}) <= {TARGET_RATIO} "
        f"(worst {worst_ratio:.2f}): {'met' if figures['meets_targets'] else 'MISSED'}"
    )
    return figures


__all__ = ["run"]
