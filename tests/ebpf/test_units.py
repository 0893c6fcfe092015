"""Pure-Python parts of ebpf/: the code registry shared with C, struct layouts, settings validation, drop reports
and the CLI's refusal to fall back silently. No root, no kernel."""

from __future__ import annotations

import re
import socket

import pytest

import ebpf
from ebpf import _build, _layout, _net, events
from ebpf.reasons import FIRST_DROP, Code, c_enum
from gateway.cli import _parser, main

from . import frames


def test_codes_unique_and_partitioned() -> None:
    values = [c.value for c in Code]
    assert len(values) == len(set(values))
    for c in Code:
        assert c.is_drop == (c.value >= FIRST_DROP)
        assert c.description, f"{c.name} has no description"
        assert c.label == c.name.lower()


def test_c_enum_is_generated_from_the_registry_and_every_code_is_used() -> None:
    enum_text = c_enum()
    for c in Code:
        assert f"CXE_{c.name} = {c.value}," in enum_text
    c_source = _build.SOURCE_FILE.read_text()
    used = set(re.findall(r"\bCXE_([A-Z0-9_]+)\b", c_source))
    for c in Code:
        assert c.name in used, f"{c.name} is never produced by guard.bpf.c"
    assert "enum cxe_code {" not in c_source  # only the generated one exists
    assert _build.source().index("enum cxe_code") < _build.source().index("#include")


def test_source_hash_is_stable() -> None:
    assert _build.source_hash() == _build.source_hash() != 0


def test_layout_sizes_match_c_alignment() -> None:
    assert _layout.SANDBOX.size == 108  # struct cxe_sandbox: 106 bytes of fields, 4-byte aligned
    assert _layout.EVENT.size == 136  # struct cxe_event: 132 bytes of fields, 8-byte aligned
    assert _layout.ORIG.size == 24


def test_sandbox_value_round_trip() -> None:
    v = _layout.SandboxValue(3, "10.0.0.2", "10.0.0.1", 3128, 3129, 53, "02:00:00:00:00:02", 0, "sb", "tap0")
    assert _layout.SandboxValue.unpack(v.pack()) == v


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ip": "not-an-ip"},
        {"gateway_ip": "::1"},
        {"mac": "02:00:00:00:00"},
        {"transparent_port": 0},
        {"proxy_port": 70000},
        {"ports": (0,)},
        {"sandbox_id": ""},
        {"sandbox_id": "x" * 64},
    ],
)
def test_spec_validation(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"sandbox_id": "sb", "ip": "10.0.0.2", "gateway_ip": "10.0.0.1"}
    with pytest.raises(ValueError):
        ebpf.SandboxSpec(**{**base, **kwargs})  # type: ignore[arg-type]


def test_redirect_ports_always_include_web() -> None:
    spec = ebpf.SandboxSpec("sb", ip="10.0.0.2", gateway_ip="10.0.0.1", ports=(8443, 443))
    assert spec.redirect_ports == (80, 443, 8443)


def _event(**kw: object) -> bytes:
    f: dict[str, object] = {
        "ts": 1_000_000_000,
        "cgid": 0,
        "slot": 2,
        "code": Code.TCP_PORT.value,
        "ifindex": 7,
        "saddr": socket.inet_aton("10.200.0.2"),
        "daddr": socket.inet_aton("198.51.100.10"),
        "daddr6": bytes(16),
        "sport": 40000,
        "dport": 22,
        "ethertype": 0x0800,
        "proto": 6,
        "hook": 1,
        "smac": bytes.fromhex("020000000002"),
        "family": 4,
        "pad": 0,
        "id": b"sb-1",
    }
    f.update(kw)
    return _layout.EVENT.pack(*f.values())


def test_drop_event_decode_and_audit_fields() -> None:
    ev = events.DropEvent.decode(_event(), boot=1000.0)
    assert ev.time == pytest.approx(1001.0)
    assert (ev.sandbox_id, ev.code, ev.hook, ev.protocol) == ("sb-1", Code.TCP_PORT, "tc", "tcp")
    assert (ev.src, ev.dst, ev.sport, ev.dport, ev.src_mac) == (
        "10.200.0.2",
        "198.51.100.10",
        40000,
        22,
        "02:00:00:00:00:02",
    )
    fields = ev.audit_fields()
    assert fields["reason"] == "tcp_port" and fields["destination"] == "198.51.100.10" and fields["port"] == 22
    v6 = events.DropEvent.decode(
        _event(family=6, code=Code.IPV6.value, daddr6=socket.inet_pton(socket.AF_INET6, "2001:db8::1"), proto=17)
    )
    assert v6.dst == "2001:db8::1" and v6.protocol == "udp" and v6.reason == "ipv6"
    arp = events.DropEvent.decode(_event(ethertype=0x0806, proto=0, code=Code.ARP_SPOOF.value))
    assert arp.protocol == "arp"
    cg = events.DropEvent.decode(_event(hook=2, ifindex=0, cgid=99))
    assert cg.hook == "connect4" and cg.src_mac == "" and cg.cgroup_id == 99


def test_drop_reporter_folds_per_key() -> None:
    out: list[dict[str, object]] = []
    rep = ebpf.DropReporter(out.append, window_s=60)
    ev = events.DropEvent.decode(_event())
    assert rep.feed(ev) and not rep.feed(ev) and not rep.feed(ev)
    other = events.DropEvent.decode(_event(dport=8080))
    assert rep.feed(other)
    assert [r["port"] for r in out] == [22, 8080] and out[0]["count"] == 1
    rep.window_s = 0
    assert rep.feed(ev) and out[-1]["count"] == 3  # the two folded ones are carried by the next record


def test_nft_table_names_are_safe() -> None:
    assert _net.nft_table("cxe123a-gs") == "cxe_cxe123a_gs"
    assert _net.nft_table("tap.0") == "cxe_tap_0"


def test_cli_parser_sandbox() -> None:
    args = _parser().parse_args(
        [
            "sandbox",
            "attach",
            "--iface",
            "tap0",
            "--ip",
            "10.0.0.2",
            "--mac",
            "02:00:00:00:00:02",
            "--id",
            "sb",
            "--port",
            "8443",
            "--port",
            "9000",
        ]
    )
    assert args.ports == [8443, 9000] and args.enforcer == "ebpf" and args.transparent_port == 3129
    with pytest.raises(SystemExit):
        _parser().parse_args(["sandbox", "attach", "--ip", "10.0.0.2", "--id", "sb"])  # no --iface/--cgroup
    with pytest.raises(SystemExit):
        _parser().parse_args(["sandbox", "attach", "--iface", "t", "--id", "sb", "--enforcer", "iptables"])


def test_cli_never_falls_back_silently(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def unavailable(*a: object, **k: object) -> ebpf.Enforcer:
        raise ebpf.EnforcementUnavailable("bcc could not compile: test")

    monkeypatch.setattr(ebpf.Enforcer, "open", unavailable)
    rc = main(
        [
            "sandbox",
            "attach",
            "--iface",
            "tap0",
            "--ip",
            "10.0.0.2",
            "--mac",
            "02:00:00:00:00:02",
            "--id",
            "sb",
            "--gateway-ip",
            "10.0.0.1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "kernel enforcement is unavailable: bcc could not compile: test" in err
    assert "nothing was attached" in err and "--enforcer nftables" in err


def test_frame_checksum() -> None:
    hdr = frames.ipv4("10.0.0.1", "10.0.0.2", 6, b"")
    assert frames.checksum(hdr) == 0
