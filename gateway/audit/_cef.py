"""Audit records as CEF lines (ArcSight Common Event Format, version 0), one line per decision, security event or
admin change.

`CEF:0|cube-egress|cube-egress|VERSION|SignatureID|Name|Severity|Extension`

- SignatureID: `decision:<reason>` or `security:<kind>`; Name: what happened, for people; Severity: 0-10, derived
  from the OCSF severity (`_ocsf.judge`) so every export grades a record the same way.
- Extension: keys from the CEF dictionary where one fits (rt, src, spt, dst, dpt, dhost, requestMethod, request,
  app, act, reason, in, out, cnt, proto, smac, msg, externalId) and labelled custom strings for the rest
  (cs1 sandbox, cs2 rule, cs3 policy hash, cs4 credential name, cs5 credential fingerprint, cs6 phase; cn1 upstream
  status, cn2 duration in ms, cn3 echo redactions; flexString1 DNS type, flexString2 DNS rcode).
- Admin changes: SignatureID `admin:<action>`, `act` the action, `outcome` success or failure, `src`/`spt` the
  admin API's TCP client; their custom fields are labelled for them: cs1 sandbox, cs2 via, cs3 policy hash (in force
  after), cs4 old policy hash, cs5 sources, cs6 policies; cn1 rule count, cn2 leases revoked, cn3 errors; `msg` the
  rest (mode, token or not, limits, labels, sandboxes, error locations).
- Escaping (CEF specification): in the header `\\` and `|` are escaped with a backslash; in extension values `\\`
  and `=` are, and CR/LF become `\\r`/`\\n`. Newlines in header fields are written the same way so that one record
  is always one line. Keys are fixed ASCII names and need no escaping.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import orjson

from .. import __version__
from . import _fields as F
from ._ocsf import ADMIN_EVENTS, SECURITY_EVENTS, Action, Severity, epoch_ms, is_event, is_ip, judge, split_address

__all__ = ["cef_fields", "format_cef", "to_cef"]

# OCSF severity -> CEF 0-10 (0-3 low, 4-6 medium, 7-8 high, 9-10 very high).
_CEF_SEVERITY = {Severity.INFORMATIONAL: 1, Severity.LOW: 3, Severity.MEDIUM: 5, Severity.HIGH: 8}
_ACT = {Action.ALLOWED: "allow", Action.DENIED: "deny", Action.OBSERVED: "report", Action.MODIFIED: "redact"}
_CUSTOM = [
    ("cs1", "sandbox", F.SANDBOX),
    ("cs2", "rule", F.RULE),
    ("cs3", "policyHash", F.POLICY_HASH),
    ("cs4", "credential", F.CREDENTIAL),
    ("cs5", "credentialFingerprint", F.CREDENTIAL_FINGERPRINT),
    ("cs6", "phase", F.PHASE),
    ("cn1", "upstreamStatus", F.UPSTREAM_STATUS),
    ("cn2", "durationMs", F.DURATION_MS),
    ("cn3", "echoRedactions", F.ECHO_REDACTIONS),
    ("flexString1", "dnsType", F.QTYPE),
    ("flexString2", "dnsRcode", F.RCODE),
]


_ADMIN_CUSTOM = [
    ("cs1", "sandbox", F.SANDBOX),
    ("cs2", "via", F.VIA),
    ("cs3", "policyHash", F.POLICY_HASH),
    ("cs4", "oldPolicyHash", F.OLD_POLICY_HASH),
    ("cs5", "sources", F.SOURCES),
    ("cs6", "policies", F.POLICIES),
    ("cn1", "ruleCount", F.RULE_COUNT),
    ("cn2", "leasesRevoked", F.LEASES_REVOKED),
    ("cn3", "errors", F.ERRORS),
]
# What an admin record says beyond the fields above, in `msg` (key=value; JSON for lists and objects).
_ADMIN_MSG = (F.DEFAULT_MODE, F.HAS_TOKEN, F.LIMITS, F.LABELS, F.SANDBOXES, F.ERROR_LOCATIONS)


def _escape_header(value: str) -> str:
    return value.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n").replace("\r", "\\r")


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("=", "\\=").replace("\n", "\\n").replace("\r", "\\r")


def _ip_key(ip: str, v4: str, v6: str) -> tuple[str, str]:
    """CEF's src/dst hold IPv4 only; IPv6 goes to the conventional custom IPv6 fields (c6a2 source, c6a3 dest)."""
    return (v4, ip) if ipaddress.ip_address(ip).version == 4 else (v6, ip)


def cef_fields(record: Mapping[str, Any]) -> tuple[list[str], dict[str, str]] | None:
    """The header fields (after `CEF:0`) and the extension as plain, unescaped strings; None for ledger records."""
    if not is_event(record):
        return None
    if record.get(F.EVENT) == F.EVENT_ADMIN:
        return _admin_fields(record)
    severity, action = judge(record)
    security = record.get(F.EVENT) == F.EVENT_SECURITY
    kind = str(record.get(F.KIND))
    if security:
        signature = f"security:{kind}"
        name = SECURITY_EVENTS.get(kind, (kind,))[0]
    else:
        signature = f"decision:{record.get(F.REASON)}"
        phase = record.get(F.PHASE)
        what = {"request": "request", F.PHASE_DNS: "DNS query"}.get(str(phase), "connection")
        name = f"{what} {_ACT[action]}"
    header = ["cube-egress", "cube-egress", __version__, signature, name, str(_CEF_SEVERITY[severity])]

    ext: dict[str, str] = {"rt": str(epoch_ms(record)), "cat": str(record.get(F.EVENT)), "act": _ACT[action]}

    def put(key: str, value: Any) -> None:
        if value is not None and value != "":
            ext[key] = str(value).lower() if isinstance(value, bool) else str(value)

    seq = record.get("seq")
    put("externalId", seq if isinstance(seq, int) else None)
    put("reason", kind if security and kind != "packet_dropped" else record.get(F.REASON))
    src_ip, src_port = split_address(record.get(F.SOURCE))
    if src_ip is not None:
        put(*_ip_key(src_ip, "src", "c6a2"))
        if "c6a2" in ext:
            ext["c6a2Label"] = "sourceAddress"
    put("spt", src_port)
    put("smac", record.get("source_mac"))
    host = record.get(F.HOST)
    dst_ip, _ = split_address(record.get(F.UPSTREAM_ADDRESS))
    for bare in (record.get("destination"), host):  # addresses without a port
        if dst_ip is None and isinstance(bare, str) and is_ip(bare):
            dst_ip = bare
    if isinstance(host, str) and host and host != dst_ip:
        put("dhost", host)
    if dst_ip is not None:
        put(*_ip_key(dst_ip, "dst", "c6a3"))
        if "c6a3" in ext:
            ext["c6a3Label"] = "destinationAddress"
    put("dpt", record.get(F.PORT))
    put("proto", str(record.get("protocol")).upper() if record.get("protocol") else None)
    put("app", record.get(F.SCHEME))
    put("requestMethod", record.get(F.METHOD))
    if record.get(F.PHASE) == "request" and isinstance(host, str):
        authority = f"[{host}]" if ":" in host else host
        port = record.get(F.PORT)
        put("request", f"{record.get(F.SCHEME)}://{authority}{f':{port}' if port else ''}{record.get(F.PATH) or '/'}")
    put("in", record.get(F.BYTES_IN))
    put("out", record.get(F.BYTES_OUT))
    put("cnt", record.get("count"))
    for key, label, field in _CUSTOM:
        value = record.get(field)
        if key == "cn2" and isinstance(value, float):
            value = round(value)  # cn fields are integers
        if value is not None and value != "":
            put(key, value)
            ext[f"{key}Label"] = label
    put("msg", record.get(F.DETAIL) or record.get(F.ERROR))
    return header, ext


def _admin_fields(record: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    severity, action = judge(record)
    name = str(record.get(F.ACTION))
    title = ADMIN_EVENTS.get(name, (name,))[0]
    header = ["cube-egress", "cube-egress", __version__, f"admin:{name}", title, str(_CEF_SEVERITY[severity])]
    ext: dict[str, str] = {
        "rt": str(epoch_ms(record)),
        "cat": F.EVENT_ADMIN,
        "act": name,
        "outcome": "failure" if action is Action.DENIED else "success",
    }
    seq = record.get("seq")
    if isinstance(seq, int):
        ext["externalId"] = str(seq)
    ip, port = split_address(record.get(F.PEER))
    if ip is not None:
        key, address = _ip_key(ip, "src", "c6a2")
        ext[key] = address
        if key == "c6a2":
            ext["c6a2Label"] = "sourceAddress"
        if port is not None:
            ext["spt"] = str(port)
    for key, label, field in _ADMIN_CUSTOM:
        value = record.get(field)
        if isinstance(value, list):
            value = ",".join(map(str, value))
        if value is not None and value != "":
            ext[key] = str(value)
            ext[f"{key}Label"] = label
    rest = [(k, record[k]) for k in _ADMIN_MSG if record.get(k) is not None]
    peer = record.get(F.PEER)
    if peer is not None and ip is None:
        rest.insert(0, (F.PEER, peer))  # "unix": the admin socket
    if rest:
        ext["msg"] = " ".join(f"{k}={_msg_value(v)}" for k, v in rest)
    return header, ext


def _msg_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return str(value)


def format_cef(header: list[str], ext: Mapping[str, str]) -> str:
    head = "|".join(_escape_header(h) for h in header)
    return f"CEF:0|{head}|" + " ".join(f"{k}={_escape_value(v)}" for k, v in ext.items())


def to_cef(record: Mapping[str, Any]) -> str | None:
    """One CEF line (no newline) for a decision, security or admin record; None for the ledger's own records."""
    fields = cef_fields(record)
    return None if fields is None else format_cef(*fields)
