"""`cube-egress demo`: one microVM sandbox, the guard, the gateway and a stand-in API, all on this machine.

What it shows, from inside a real guest (a QEMU microvm running a real `curl`):

1. an allowed API call whose credential the gateway injects (the guest never had it), with the upstream echoing
   the request back and the gateway redacting the echo;
2. a search of the guest's environment, files and the API's answer for the secret: nothing;
3. a host the policy does not allow: the gateway's DNS does not resolve it, and with a forged address (`curl
   --resolve`) the gateway answers 403 with the rule and the reason;
4. bypass attempts around the gateway (TCP to a port that is not redirected, QUIC on UDP 443): dropped in the
   kernel by the guard and reported;
then a table of what happened and the gateway's audit records for the sandbox. The VM's sandbox is registered
with the gateway through its admin API when the tap comes up and unregistered when the VM goes, as a platform
would do it.

Everything lives in two network namespaces the demo creates and always removes: "gw" holds the VM's tap, the
guard and the gateway (transparent mode); "net" holds the stand-in API on documentation addresses
(198.51.100.0/24) behind a veth. No namespace has a route to this machine's real interfaces, so nothing the demo
does can leave the machine. The secret is random per run; it lives in a 0600 file the gateway reads.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["DemoError", "run_demo"]

API_HOST = "api.demo.example"
EVIL_HOST = "evil.demo.example"
API_IP = "198.51.100.10"
EVIL_IP = "198.51.100.20"
UPLINK_IP = "198.51.100.1"  # the gateway namespace's side of the veth
GATEWAY_IP = "10.0.0.1"  # on the VM's tap, inside the gateway namespace only
GUEST_IP = "10.0.0.2"
SANDBOX_ID = "demo-agent"
TRANSPARENT_PORT = 3129
SECRET_NAME = "demo/api-token"  # noqa: S105 (the name of the secret, not its value)


class DemoError(RuntimeError):
    """The demo could not set up its world (not root, QEMU or the kernel guard missing, a step timed out)."""


# -- the little PKI of the stand-in API ----------------------------------------------------------------------------


def _write_demo_pki(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for the API names; the gateway trusts the CA for upstreams (upstream_ca)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cube-egress demo upstream CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, API_HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(API_HOST), x509.DNSName(EVIL_HOST)]), False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = d / "upstream-ca.pem", d / "api-cert.pem", d / "api-key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return ca_path, cert_path, key_path


# -- namespaces -----------------------------------------------------------------------------------------------------


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise DemoError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def _in_netns[T](netns: str, fn: Callable[[], T]) -> T:
    """Run fn on a thread that entered `netns` (sockets belong to the namespace of the thread creating them)."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            with open(f"/run/netns/{netns}", "rb") as f:
                os.setns(f.fileno(), os.CLONE_NEWNET)
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=body, name=f"in-{netns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _wait_port(netns: str, host: str, port: int, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout

    def probe() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        return False

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited with {proc.returncode} before it listened on {host}:{port}")
        if _in_netns(netns, probe):
            return
        time.sleep(0.1)
    raise DemoError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


@dataclass
class _World:
    """The demo's namespaces, processes and files; `close()` removes all of them, whatever state they are in."""

    work: Path
    say: Callable[[str], None]
    tag: str = field(default_factory=lambda: f"cxd{os.getpid() % 100000}")
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    @property
    def gw_ns(self) -> str:
        return f"{self.tag}g"

    @property
    def net_ns(self) -> str:
        return f"{self.tag}i"

    def build_network(self) -> None:
        for ns in (self.gw_ns, self.net_ns):
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip("link", "set", "lo", "up", netns=ns)
        up, down = f"{self.tag}u", f"{self.tag}d"
        _ip("link", "add", up, "netns", self.gw_ns, "type", "veth", "peer", "name", down, "netns", self.net_ns)
        _ip("addr", "add", f"{UPLINK_IP}/24", "dev", up, netns=self.gw_ns)
        _ip("link", "set", up, "up", netns=self.gw_ns)
        for addr in (API_IP, EVIL_IP):
            _ip("addr", "add", f"{addr}/24", "dev", down, netns=self.net_ns)
        _ip("link", "set", down, "up", netns=self.net_ns)
        # Hermetic by construction: neither namespace has a default route, and the only links are the veth and
        # (later) the VM's tap. The gateway namespace forwards nothing: the gateway itself dials upstreams.

    def spawn(self, what: str, netns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115 (kept open for the child's lifetime; closed with the process)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        self.procs.append((what, proc))
        return proc

    def close(self) -> None:
        for _what, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()


# -- gateway configuration ------------------------------------------------------------------------------------------


def _write_gateway_files(w: _World, upstream_ca: Path, secret: str) -> Path:
    """Policy, secret file and gateway config for the demo; returns the config path."""
    secrets_file = w.work / "secrets.yaml"
    fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{SECRET_NAME}: {json.dumps(secret)}\n")
    (w.work / "demo-policy.yaml").write_text(
        f"""# The demo's policy: one sandbox (the microVM), one API it may call with a credential it never sees.
version: 1
credentials:
  demo-api:
    description: The API token; injected by the gateway, never given to the sandbox.
    secret: {SECRET_NAME}
    injector: {{kind: header, header: Authorization, format: "Bearer {{secret}}"}}
policies:
  demo:
    rules:
      - id: demo-api-read
        action: allow
        hosts: [{API_HOST}]
        schemes: [https]
        methods: [GET]
        paths: ["/v1/**"]
        credential: demo-api
      - id: demo-upstream-address
        description: The stand-in API lives in TEST-NET-2, which is not global unicast, so the policy names it.
        action: allow
        cidrs: [{API_IP}/32]
        schemes: [https]
        ports: [443]
# No sandboxes here: the VM runtime registers the microVM's sandbox through the admin API when its tap comes up
# (hypervisor.registration.GatewayRegistration) and unregisters it when the VM goes.
"""
    )
    config = w.work / "gateway.yaml"
    config.write_text(
        f"""version: 1
mode: transparent
listen: {{host: 0.0.0.0, port: {TRANSPARENT_PORT}}}
policies: [demo-policy.yaml]
state_dir: state
upstream_ca: {upstream_ca.name}
resolver:
  hosts: {{{API_HOST}: [{API_IP}], {EVIL_HOST}: [{EVIL_IP}]}}
dns:
  listen: {{host: 0.0.0.0, port: 53}}
secrets: {{backend: file, path: secrets.yaml}}
enforcement: {{report_drops: true}}
gateway_addresses: [{GATEWAY_IP}, {UPLINK_IP}]
"""
    )
    return config


# -- the steps run inside the guest ---------------------------------------------------------------------------------


@dataclass
class Step:
    what: str
    command: str
    expected: str
    observed: str = ""
    ok: bool = False


def _curl(*args: str) -> list[str]:
    # -w prints the status on its own last line; --max-time bounds every attempt.
    return ["curl", "-sS", "--max-time", "20", "-w", "\\n%{http_code}", *args]


def _split_status(stdout: bytes) -> tuple[bytes, str]:
    body, _, status = stdout.rstrip(b"\n").rpartition(b"\n")
    return body, status.decode(errors="replace")


def _run_steps(vm: Any, secret: str, events: Callable[[], list[dict[str, Any]]]) -> list[Step]:
    steps: list[Step] = []
    needle = secret.encode()

    # 1. The allowed call: the guest sends no credential, the API sees the real one, the echo comes back redacted.
    s = Step(
        "allowed API call, credential injected by the gateway",
        f"curl https://{API_HOST}/v1/models",
        "200; API saw the right token; the echo of it redacted",
    )
    r = vm.exec(_curl(f"https://{API_HOST}/v1/models"), timeout_s=60)
    body, status = _split_status(r.stdout)
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    echoed = str(doc.get("headers", {}).get("Authorization", "-"))
    s.observed = f"{status}; authorized={doc.get('authorized')}; echoed Authorization: {echoed[:40]!r}"
    s.ok = status == "200" and doc.get("authorized") is True and needle not in r.stdout
    steps.append(s)
    api_answer = r.stdout + r.stderr

    # 2. Where could the guest have the secret? Pull its environment and every file out and search them here, so
    #    the secret never has to be given to the guest to look for it.
    s = Step(
        "search the guest for the secret",
        "environ of every process + every file + the API answer",
        "not found anywhere",
    )
    env = vm.exec(["sh", "-c", "cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null"], timeout_s=60)
    files = vm.exec(
        ["sh", "-c", "find / -xdev -type f -exec cat {} + 2>/dev/null"], timeout_s=120
    )
    where = [
        name
        for name, blob in (("environment", env.stdout), ("files", files.stdout), ("API answer", api_answer))
        if needle in blob
    ]
    s.observed = (
        f"searched {len(env.stdout) + len(files.stdout) + len(api_answer):,} bytes: "
        + ("found in " + ", ".join(where) if where else "not found")
    )
    s.ok = not where and len(files.stdout) > 0
    steps.append(s)

    # 3. A host the policy does not name: no DNS answer, and a forged address gets a 403 with the reason.
    s = Step("resolve a host the policy does not allow", f"curl https://{EVIL_HOST}/", "no such name (NXDOMAIN)")
    r = vm.exec(_curl(f"https://{EVIL_HOST}/"), timeout_s=60)
    s.observed = f"curl exit {r.exit_code}: {r.stderr.decode(errors='replace').strip()[:60]}"
    s.ok = r.exit_code == 6  # CURLE_COULDNT_RESOLVE_HOST
    steps.append(s)

    s = Step(
        "same host with a forged address",
        f"curl --resolve {EVIL_HOST}:443:{EVIL_IP} https://{EVIL_HOST}/",
        "403 from the gateway, with rule and reason",
    )
    r = vm.exec(_curl("--resolve", f"{EVIL_HOST}:443:{EVIL_IP}", f"https://{EVIL_HOST}/"), timeout_s=60)
    body, status = _split_status(r.stdout)
    try:
        deny = json.loads(body)
    except ValueError:
        deny = {}
    s.observed = f"{status}; reason={deny.get('reason')}"
    s.ok = status == "403" and bool(deny.get("reason"))
    steps.append(s)

    # 4. Around the gateway: TCP to a port that is not redirected, and QUIC. Dropped in the kernel.
    before = len(events())
    s = Step(
        "direct TCP to the API's address on another port",
        f"nc -w 3 {API_IP} 8443",
        "dropped by the guard (tcp_port), reported",
    )
    r = vm.exec(["sh", "-c", f"echo hello | nc -w 3 {API_IP} 8443; echo exit=$?"], timeout_s=30)
    s.command = f"echo hello | nc -w 3 {API_IP} 8443"
    s.observed = r.stdout.decode(errors="replace").strip().splitlines()[-1] if r.stdout else f"exit {r.exit_code}"
    steps.append(s)

    # Any UDP datagram to port 443 stands for QUIC here; curl's TFTP client is an easy way to send one.
    q = Step(
        "UDP to the API's port 443 (QUIC, HTTP/3)",
        f"curl tftp://{API_IP}:443/x",
        "dropped by the guard (quic)",
    )
    vm.exec(["curl", "-sS", "--max-time", "3", f"tftp://{API_IP}:443/x"], timeout_s=30)
    steps.append(q)

    # Drop reports reach the audit log asynchronously (ring buffer -> gateway); give them a moment.
    deadline = time.monotonic() + 10
    drops: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        drops = [e for e in events()[before:] if e.get("kind") == "packet_dropped" or e.get("event") == "drop"]
        reasons = {str(e.get("reason")) for e in drops}
        if {"tcp_port", "quic"} <= reasons:
            break
        time.sleep(0.3)
    reasons = {str(e.get("reason")) for e in drops}
    s.ok = "tcp_port" in reasons and "exit=0" not in s.observed
    s.observed += "; drop reported" if "tcp_port" in reasons else "; no drop report"
    q.ok = "quic" in reasons
    q.observed = "drop reported (quic)" if q.ok else "no drop report"
    return steps


# -- output ---------------------------------------------------------------------------------------------------------


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        out.write("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def _audit_records(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def _print_audit(records: list[dict[str, Any]], out: TextIO) -> None:
    rows = [["time", "event", "phase", "verdict", "rule", "reason", "destination", "credential"]]
    for r in records:
        if r.get("sandbox") != SANDBOX_ID:
            continue
        event = str(r.get("kind") or r.get("event") or "")
        host = r.get("host") or r.get("dst") or r.get("destination") or ""
        port = r.get("port") or r.get("dport") or ""
        rows.append(
            [
                str(r.get("time", ""))[11:23],
                event,
                str(r.get("phase") or ""),
                str(r.get("verdict") or ""),
                str(r.get("rule") or ""),
                str(r.get("reason") or ""),
                f"{host}:{port}" if host and port else str(host),
                str(r.get("credential") or ""),
            ]
        )
    _table(rows, out)


# -- the demo -------------------------------------------------------------------------------------------------------


def _preflight() -> None:
    if os.geteuid() != 0:
        raise DemoError("the demo needs root (it creates network namespaces, a tap and the kernel guard)")
    for tool in ("ip", "nft", "qemu-system-x86_64", "curl"):
        if shutil.which(tool) is None:
            raise DemoError(f"{tool} is not installed: run `bash scripts/setup.sh` first")
    import ebpf

    reason = ebpf.unavailable_reason()
    if reason is not None:
        raise DemoError(f"the kernel guard cannot run here: {reason}")


@contextlib.contextmanager
def _work_dir(keep: bool, base: Path | None) -> Iterator[Path]:
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
        yield base
        return
    d = Path(tempfile.mkdtemp(prefix="cube-egress-demo-"))
    try:
        yield d
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


def run_demo(*, image_dir: Path, work_dir: Path | None = None, keep: bool = False, out: TextIO = sys.stdout) -> int:
    """Run the demo; returns 0 when every step behaved as expected, 1 otherwise (DemoError: could not run)."""
    from gateway.config import load_config
    from gateway.server import ensure_ca

    from .image import build_image
    from .net import EbpfGuard, NetSpec
    from .registration import GatewayRegistration
    from .vm import MicroVM

    _preflight()

    def say(msg: str) -> None:
        out.write(f"demo: {msg}\n")
        out.flush()

    secret = "demo-" + secrets.token_urlsafe(24)
    with _work_dir(keep, work_dir) as work:
        world = _World(work=work, say=say)
        try:
            say(f"building the world in network namespaces {world.gw_ns} (gateway, VM) and {world.net_ns} (API)")
            world.build_network()
            upstream_ca, cert, key = _write_demo_pki(work)
            config_path = _write_gateway_files(world, upstream_ca, secret)
            gw_ca = Path(ensure_ca(load_config(str(config_path)))) / "mitmproxy-ca-cert.pem"

            expect = hashlib.sha256(f"Bearer {secret}".encode()).hexdigest()
            for addr in (API_IP, EVIL_IP):
                api = world.spawn(
                    f"API {addr}",
                    world.net_ns,
                    [sys.executable, "-m", "hypervisor._demo_api", "--listen", f"{addr}:443", "--cert", str(cert),
                     "--key", str(key), "--expect-sha256", expect],
                    work / "api.log",
                )
                _wait_port(world.net_ns, addr, 443, 20, f"the stand-in API on {addr}", api)
            gateway = world.spawn(
                "gateway",
                world.gw_ns,
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(config_path)],
                work / "gateway.log",
            )
            _wait_port(world.gw_ns, "127.0.0.1", TRANSPARENT_PORT, 60, "the gateway", gateway)
            deadline = time.monotonic() + 20
            while not (work / "state" / "admin.sock").exists():
                if time.monotonic() > deadline or gateway.poll() is not None:
                    raise DemoError(f"the gateway's admin socket did not appear (see {work / 'gateway.log'})")
                time.sleep(0.1)
            say("gateway up (transparent mode, DNS, drop reports); building the guest image (curl + gateway CA)")
            image = build_image(image_dir, ca_cert=gw_ca, extra_binaries=("curl",), progress=say)
            net = NetSpec(ip=GUEST_IP, gateway_ip=GATEWAY_IP, prefix=24, netns=world.gw_ns)
            guard = EbpfGuard(transparent_port=TRANSPARENT_PORT, proxy_port=0, dns_port=53)
            admin_socket = work / "state" / "admin.sock"
            registration = GatewayRegistration(
                policies=["demo"], unix_socket=admin_socket, labels={"kind": "microvm"}
            )
            audit_path = work / "state" / "audit.jsonl"
            t0 = time.monotonic()
            with MicroVM(image, net=net, sandbox_id=SANDBOX_ID, hooks=[guard, registration]) as vm:
                vm.boot()
                say(f"guest {vm.id} up in {time.monotonic() - t0:.1f} s (accel {vm.machine.accel}); tap {vm.tap} "
                    f"guarded; sandbox {SANDBOX_ID} registered through the admin API; running the agent's steps")
                steps = _run_steps(vm, secret, lambda: _audit_records(audit_path))
        finally:
            world.close()  # the gateway stops cleanly: its audit log ends with a signed checkpoint
        return _report(steps, secret, work, config_path, keep, out)


def _report(steps: list[Step], secret: str, work: Path, config_path: Path, keep: bool, out: TextIO) -> int:
    audit_path = work / "state" / "audit.jsonl"
    out.write("\nWhat the sandboxed agent tried\n\n")
    rows = [["#", "attempt", "command", "expected", "observed", "ok"]]
    for i, st in enumerate(steps, 1):
        rows.append([str(i), st.what, st.command, st.expected, st.observed, "yes" if st.ok else "NO"])
    _table(rows, out)
    out.write(f"\nAudit records for sandbox {SANDBOX_ID} ({audit_path})\n\n")
    _print_audit(_audit_records(audit_path), out)
    verify = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "audit", "verify", "--config", str(config_path), str(audit_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    out.write(f"\n$ cube-egress audit verify --config {config_path.name} {audit_path.name}\n")
    out.write((verify.stdout + verify.stderr).strip() + "\n")
    leaked = secret.encode() in (audit_path.read_bytes() if audit_path.exists() else b"") or any(
        secret.encode() in p.read_bytes() for p in work.glob("*.log")
    )
    out.write(f"\nsecret in the audit log or the gateway's logs: {'YES' if leaked else 'no'}\n")
    ok = all(st.ok for st in steps) and not leaked and verify.returncode == 0
    passed = sum(st.ok for st in steps)
    out.write(f"demo {'passed' if ok else 'FAILED'}: {passed}/{len(steps)} steps as expected\n")
    if keep:
        out.write(f"kept {work}\n")
    return 0 if ok else 1


def is_documentation_address(addr: str) -> bool:
    """Every address the demo's upstreams use is in a documentation range (a guard against editing mistakes)."""
    a = ipaddress.ip_address(addr)
    return any(a in ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"))


assert all(is_documentation_address(a) for a in (API_IP, EVIL_IP, UPLINK_IP))
