"""Shared plumbing of the benchmarks: temp dirs, certificates, child processes, ports, percentiles and tables.

Every child process is started in its own session (a Ctrl-C in the terminal reaches only the benchmark, which then
stops its children in order) with a parent-death signal, and is stopped by `Services.close()` at the end, on
failure and on Ctrl-C/SIGTERM alike. Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
UPSTREAM_HOST = "bench.example.test"  # intercepted: its rule has method/path conditions
SPLICE_HOST = "bench-splice.example.test"  # spliced: allowed without conditions or credential
BENCH_PATH = "/bench/ok"
UPSTREAM_CA_ORG = "cube-egress bench upstream CA"  # signs nginx's certificate
INTERCEPT_CA_ORG = "cube-egress bench"  # the gateway's / mitmproxy's interception CA


class BenchError(RuntimeError):
    """A benchmark could not run or measured something other than what it claims (bad status, wrong cert...)."""


# -- output ----------------------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100); NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def rnd(value: float, digits: int = 3) -> float | None:
    """Round for the JSON line; NaN/inf become null (JSON has no NaN)."""
    if math.isnan(value) or math.isinf(value):
        return None
    return round(value, digits)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    def cell(v: Any) -> str:
        if not isinstance(v, float):
            return str(v)
        if math.isnan(v):
            return "-"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    print("  ".join("-" * w for w in widths))
    for r in text:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def emit_json(figures: Mapping[str, Any]) -> None:
    """The last line of every benchmark: one JSON object of figures."""
    sys.stdout.flush()
    print(json.dumps(figures, sort_keys=True, separators=(",", ":")), flush=True)


def save_results(name: str, figures: Mapping[str, Any]) -> Path | None:
    """Also keep the figures in bench/results/ (ignored by git); failure to write is not a benchmark failure."""
    try:
        out = REPO / "bench" / "results"
        out.mkdir(exist_ok=True)
        path = out / f"{name}.json"
        path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        return path
    except OSError:
        return None


# -- certificates ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPKI:
    upstream_ca: Path  # signs nginx's certificate; the proxies trust it, and so does the client when spliced
    upstream_cert: Path  # key + chain for nginx
    intercept_ca_cert: Path  # the gateway's (and bare mitmproxy's) interception CA: trusted by intercepted clients
    intercept_ca_key: Path  # key + cert (mitmproxy's mitmproxy-ca.pem layout)
    intercept_confdir: Path  # a mitmproxy confdir holding that CA
    upstream_bundle: Path  # certifi + upstream CA: what the gateway builds for ssl_verify_upstream_trusted_ca


def make_pki(root: Path) -> BenchPKI:
    import certifi
    import trustme
    from mitmproxy.certs import CertStore

    root.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name=UPSTREAM_CA_ORG)
    upstream_ca = root / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(upstream_ca))
    leaf = ca.issue_cert(UPSTREAM_HOST, SPLICE_HOST)
    upstream_cert = root / "upstream.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(upstream_cert))
    # The interception CA as the gateway would generate it (RSA 2048, mitmproxy's layout), shared by the gateway
    # and the bare-mitmproxy baseline so both mint the same kind of leaf certificates.
    confdir = root / "mitm-conf"
    confdir.mkdir(mode=0o700)
    CertStore.create_store(confdir, "mitmproxy", 2048, organization=INTERCEPT_CA_ORG, cn=f"{INTERCEPT_CA_ORG} CA")
    bundle = root / "upstream-trust.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + b"\n" + upstream_ca.read_bytes())
    return BenchPKI(
        upstream_ca=upstream_ca,
        upstream_cert=upstream_cert,
        intercept_ca_cert=confdir / "mitmproxy-ca-cert.pem",
        intercept_ca_key=confdir / "mitmproxy-ca.pem",
        intercept_confdir=confdir,
        upstream_bundle=bundle,
    )


# -- ports -----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# -- child processes -------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec: a child gets SIGTERM if the benchmark dies without cleaning up (e.g. SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")


@dataclass
class Services:
    """The child processes of one benchmark run; `close()` stops them in reverse order of start."""

    workdir: Path
    started: list[Service] = field(default_factory=list)
    cleanup_paths: list[Path] = field(default_factory=list)  # outside workdir, removed by close()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Service:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # the parent has no threads of its own when it starts services
            )
        svc = Service(name, proc, log, stop_signal)
        self.started.append(svc)
        return svc

    def stop(self, svc: Service, timeout: float = 10.0) -> None:
        if svc in self.started:
            self.started.remove(svc)
        proc = svc.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(svc.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)

    def close(self) -> None:
        try:
            while self.started:
                self.stop(self.started[-1])
        finally:
            for path in self.cleanup_paths:
                shutil.rmtree(path, ignore_errors=True)
            self.cleanup_paths.clear()


def wait_listening(svc: Service, port: int, timeout: float = 30.0) -> None:
    """Until `port` on loopback accepts a connection (or the service died, or `timeout` passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        svc.check_alive()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"{svc.name} did not listen on {LOOPBACK}:{port} within {timeout:.0f}s:\n{svc.tail()}")


@contextlib.contextmanager
def bench_workdir(name: str, keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"cube-egress-bench-{name}-"))
    try:
        yield path
    finally:
        if keep:
            print(f"(kept {path})", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc), for CPU cost per request."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
