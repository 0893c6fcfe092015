"""`python -m bench NAME`: run one benchmark (or `all`); the last line printed is one JSON object of figures."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from ._common import BenchError, bench_workdir, emit_json, save_results

NAMES = ("policy", "gateway", "splice", "secrets", "ebpf", "audit", "vm")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so every `finally` runs and every started process is stopped


def _runner(name: str) -> Callable[[argparse.Namespace, Path], dict[str, Any]]:
    if name == "policy":
        from . import policy

        return lambda a, w: policy.run(calls=a.calls, warmup=a.warmup, cold=a.cold, workdir=w)
    if name == "gateway":
        from . import gateway

        return gateway.run
    if name == "secrets":
        from . import secrets

        return secrets.run
    if name == "ebpf":
        from . import ebpf

        return ebpf.run
    if name == "audit":
        from . import audit

        return audit.run
    if name == "vm":
        from . import vm

        return vm.run
    from . import splice

    return splice.run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("name", choices=(*NAMES, "all"))
    p.add_argument("--calls", type=int, default=200_000, help="policy: timed decide() calls per size and phase")
    p.add_argument("--warmup", type=int, default=20_000, help="policy: untimed warm-up calls")
    p.add_argument("--cold", type=int, default=20_000, help="policy: timed calls on never-seen destinations")
    p.add_argument("--duration", type=float, default=8.0, help="load benches: measured seconds per load run")
    p.add_argument("--warmup-s", type=float, default=1.5, help="load benches: unmeasured seconds before each run")
    p.add_argument("--rounds", type=int, default=2, help="load benches: rounds, alternating the order of the peers")
    p.add_argument("--connections", type=int, default=20, help="load benches: keep-alive connections")
    p.add_argument("--client-procs", type=int, default=1, help="load benches: load-generator processes")
    p.add_argument("--rules", type=int, default=1_000, help="load benches: rules in the gateway's policy")
    p.add_argument("--iperf-seconds", type=int, default=5, help="ebpf: measured seconds per iperf3 run")
    p.add_argument("--vm-boots", type=int, default=3, help="vm: cold boots timed")
    p.add_argument("--vm-samples", type=int, default=10, help="vm: restores and clones timed, per kind")
    p.add_argument("--vm-clones", type=int, default=50, help="vm: idle clones for the memory figures")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    names = NAMES if args.name == "all" else (args.name,)
    combined: dict[str, Any] = {}
    status = 0
    for name in names:
        print(f"=== bench {name} ===", flush=True)
        try:
            with bench_workdir(name, keep=args.keep) as workdir:
                figures = _runner(name)(args, workdir)
        except BenchError as e:
            # Still one JSON object, saying why there are no figures.
            print(f"bench {name}: FAILED: {e}", flush=True)
            figures = {"bench": name, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
            status = 1
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
        if any(k == "error" or k.endswith("_error") for k in figures):
            status = 1  # something could not be measured (a missed target alone is not a failure)
        save_results(name, figures)
        combined[name] = figures
        if len(names) > 1:
            emit_json(figures)
    emit_json(combined if len(names) > 1 else combined[names[0]])
    return status


if __name__ == "__main__":
    sys.exit(main())
