"""Audit records as OCSF events (Open Cybersecurity Schema Framework, version `OCSF_VERSION`).

One audit record becomes one OCSF event, chosen by what the record is:

| record                                         | OCSF class                  | activity                    |
|------------------------------------------------|-----------------------------|-----------------------------|
| decision, phase `request`                      | HTTP Activity (4002)        | the method (Get, Post, ...) |
| decision, phase `connection` (CONNECT, splice) | Network Activity (4001)     | Open, or Refuse if blocked  |
| decision, phase `dns`                          | DNS Activity (4003)         | Response                    |
| security `packet_dropped` (kernel guard)       | Network Activity (4001)     | Refuse                      |
| any other security event                       | Detection Finding (2004)    | Create                      |
| admin (a registration, unregistration, reload) | API Activity (6003)         | Create, Update or Delete    |

Ledger records (header, checkpoint, ...) are not events and map to nothing. Every traffic event carries the
`security_control` profile (action, disposition, firewall rule, policy); admin events carry no profile (nothing
passed or was blocked: the policy in force changed). Fields without an OCSF attribute of their
own (verdict and mode, credential names and fingerprints, the ledger's `seq`, ...) go to `unmapped` unchanged, so an
export loses nothing the record had. Records carry no secret values, and nothing here adds one.

The shared vocabulary of all exports lives here too (severity, action, the event uid, times), so that OCSF, CEF
and syslog say the same thing about the same record.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
from collections.abc import Mapping
from typing import Any

from .. import __version__
from . import _fields as F
from ._chain import encode, line_hash

__all__ = [
    "OCSF_VERSION",
    "Action",
    "Severity",
    "epoch_ms",
    "event_uid",
    "is_event",
    "judge",
    "to_ocsf",
]

OCSF_VERSION = "1.7.0"
PRODUCT_NAME = "cube-egress"
_PROFILES = ["security_control"]


class Severity(enum.IntEnum):
    """OCSF severity_id; CEF and syslog severities are derived from it."""

    INFORMATIONAL = 1
    LOW = 2
    MEDIUM = 3
    HIGH = 4


class Action(enum.IntEnum):
    """OCSF action_id: what the gateway did with the traffic."""

    ALLOWED = 1
    DENIED = 2
    OBSERVED = 3  # report mode: a rule would deny, the traffic passed and the would-deny is recorded
    MODIFIED = 4  # the traffic passed, changed (an echoed credential overwritten in the response)


class Disposition(enum.IntEnum):
    """OCSF disposition_id, the outcome that goes with each action (OCSF's guidance for each action_id)."""

    ALLOWED = 1
    BLOCKED = 2
    CORRECTED = 11
    DETECTED = 15


_ACTION_DISPOSITION = {
    Action.ALLOWED: Disposition.ALLOWED,
    Action.DENIED: Disposition.BLOCKED,
    Action.OBSERVED: Disposition.DETECTED,
    Action.MODIFIED: Disposition.CORRECTED,
}

# Security events: a title for people, how serious, and what the gateway did. Every kind in fields.SECURITY_KINDS
# has an entry (a test keeps it so); a kind this build does not know (a newer log) is exported as MEDIUM/DENIED.
SECURITY_EVENTS: dict[str, tuple[str, Severity, Action]] = {
    "host_mismatch": ("Host names of one request disagree (CONNECT, SNI, Host)", Severity.MEDIUM, Action.DENIED),
    "address_refused": ("Destination address in a refused class", Severity.MEDIUM, Action.DENIED),
    "destination_not_in_answers": (
        "Original destination is not among the gateway's answers for the name",
        Severity.HIGH,
        Action.DENIED,
    ),
    "ip_literal_refused": ("IP literal destination refused", Severity.LOW, Action.DENIED),
    "gateway_loop": ("Request aimed at the gateway itself", Severity.MEDIUM, Action.DENIED),
    "ambiguous_path": ("Ambiguous request path refused", Severity.MEDIUM, Action.DENIED),
    "bad_proxy_token": ("Unknown proxy token", Severity.MEDIUM, Action.DENIED),
    "unknown_sandbox": ("Traffic from an unknown sandbox", Severity.MEDIUM, Action.DENIED),
    "protocol_not_allowed": ("Protocol not allowed", Severity.LOW, Action.DENIED),
    "hook_error": ("Gateway error; traffic refused", Severity.HIGH, Action.DENIED),
    "credential_endpoint_mismatch": (
        "Credential requested for an endpoint it is not bound to",
        Severity.HIGH,
        Action.DENIED,
    ),
    "secret_unavailable": ("Credential unavailable; request refused", Severity.MEDIUM, Action.DENIED),
    "secret_echo": ("Injected credential echoed by the upstream; redacted", Severity.HIGH, Action.MODIFIED),
    "credential_invalid": ("Credential rejected by its issuer", Severity.MEDIUM, Action.DENIED),
    "packet_dropped": ("Packet dropped by the kernel guard", Severity.LOW, Action.DENIED),
    "dns_refused": ("DNS query name refused (possible exfiltration)", Severity.MEDIUM, Action.DENIED),
    "correlation_invalid": ("Invalid agent correlation header (value not kept)", Severity.LOW, Action.OBSERVED),
}


# Admin changes: a title, the API Activity activity_id (1 Create, 3 Update, 4 Delete) and how serious. Every action
# in fields.ADMIN_ACTIONS has an entry (a test keeps it so); one this build does not know is exported as Other/MEDIUM.
ADMIN_EVENTS: dict[str, tuple[str, int, Severity]] = {
    "sandbox_registered": ("Sandbox registered", 1, Severity.INFORMATIONAL),
    "sandbox_replaced": ("Sandbox registration replaced", 3, Severity.INFORMATIONAL),
    "sandbox_unregistered": ("Sandbox unregistered", 4, Severity.INFORMATIONAL),
    "policy_reloaded": ("Policy reloaded", 3, Severity.INFORMATIONAL),
    "policy_reload_failed": ("Policy reload refused; the policy in force stays", 3, Severity.LOW),
}
_ADMIN_FAILURES = frozenset({"policy_reload_failed"})


class ExportError(ValueError):
    """A record that cannot be exported (no usable time); the message names the record."""


def is_event(record: Mapping[str, Any]) -> bool:
    """Decision, security and admin records are events; the ledger's own records (header, checkpoint, ...) are
    not."""
    return record.get(F.EVENT) in (F.EVENT_DECISION, F.EVENT_SECURITY, F.EVENT_ADMIN)


def event_uid(record: Mapping[str, Any]) -> str:
    """A record's id: the hash of its canonical line (`_chain.line_hash`, which the next record carries as `prev`).
    The same record gets the same uid in every export and every sink, so a receiver can drop duplicates."""
    return line_hash(encode(record))


def parse_time(value: Any) -> dt.datetime:
    if not isinstance(value, str):
        raise ExportError(f"record without a time ({value!r})")
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ExportError(f"record time {value!r} is not RFC 3339") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def epoch_ms(record: Mapping[str, Any]) -> int:
    t = parse_time(record.get(F.TIME))
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1)


def judge(record: Mapping[str, Any]) -> tuple[Severity, Action]:
    """How serious a record is and what the gateway did, the same for every export format. For an admin record
    the action says whether the change took effect (a refused reload is DENIED)."""
    if record.get(F.EVENT) == F.EVENT_ADMIN:
        name = str(record.get(F.ACTION))
        severity = ADMIN_EVENTS.get(name, ("", 99, Severity.MEDIUM))[2]
        return severity, Action.DENIED if name in _ADMIN_FAILURES else Action.ALLOWED
    if record.get(F.EVENT) == F.EVENT_SECURITY:
        _, severity, action = SECURITY_EVENTS.get(str(record.get(F.KIND)), ("", Severity.MEDIUM, Action.DENIED))
        return severity, action
    if record.get(F.VERDICT) == "allow":
        return Severity.INFORMATIONAL, Action.ALLOWED
    if record.get(F.MODE) == "report":
        return Severity.LOW, Action.OBSERVED
    return Severity.LOW, Action.DENIED


def split_address(value: Any) -> tuple[str | None, int | None]:
    """'ip:port' (as the gateway writes `source` and `upstream_address`; IPv6 without brackets) or a bare ip."""
    if not isinstance(value, str) or not value:
        return None, None
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit() and is_ip(host.strip("[]")):
        return host.strip("[]"), int(port)
    return (value, None) if is_ip(value) else (None, None)


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class _Record:
    """Reads a record's fields and remembers which were mapped, so that the rest can go to `unmapped`."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = record
        self._used: set[str] = {F.EVENT, F.TIME}

    def __getitem__(self, key: str) -> Any:
        self._used.add(key)
        return self.record.get(key)

    def mark(self, key: str) -> None:
        self._used.add(key)

    def peek(self, key: str) -> Any:
        """Read without marking the field mapped (it also goes to `unmapped`, e.g. verdict and mode)."""
        return self.record.get(key)

    def unmapped(self) -> dict[str, Any]:
        return {k: v for k, v in self.record.items() if k not in self._used and v is not None}


_CATEGORY = {2: "Findings", 4: "Network Activity", 6: "Application Activity"}
_CLASS = {
    2004: ("Detection Finding", 2),
    4001: ("Network Activity", 4),
    4002: ("HTTP Activity", 4),
    4003: ("DNS Activity", 4),
    6003: ("API Activity", 6),
}
_HTTP_ACTIVITY = {
    "CONNECT": 1,
    "DELETE": 2,
    "GET": 3,
    "HEAD": 4,
    "OPTIONS": 5,
    "POST": 6,
    "PUT": 7,
    "TRACE": 8,
    "PATCH": 9,
}
_ACTIVITY_NAMES = {
    4001: {1: "Open", 5: "Refuse"},
    4003: {2: "Response"},
    2004: {1: "Create"},
    6003: {1: "Create", 3: "Update", 4: "Delete"},
    4002: {v: k.capitalize() for k, v in _HTTP_ACTIVITY.items()} | {99: "Other"},
}
_RCODE_ID = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}


def to_ocsf(record: Mapping[str, Any], *, uid: str | None = None) -> dict[str, Any] | None:
    """The OCSF event for one audit record, or None for the ledger's own records. `uid` (default: `event_uid`)
    becomes `metadata.uid`."""
    if not is_event(record):
        return None
    r = _Record(record)
    profiles = _PROFILES
    if record.get(F.EVENT) == F.EVENT_ADMIN:
        event, profiles = _api_activity(r), []
    elif record.get(F.EVENT) == F.EVENT_SECURITY:
        event = _packet_dropped(r) if record.get(F.KIND) == "packet_dropped" else _detection_finding(r)
    elif record.get(F.PHASE) == F.PHASE_DNS:
        event = _dns_activity(r)
    elif record.get(F.PHASE) == "request":
        event = _http_activity(r)
    else:
        event = _connection(r)
    event["metadata"] = _metadata(r, uid or event_uid(record), profiles)
    if "finding_info" in event:
        event["finding_info"]["uid"] = event["metadata"]["uid"]  # one finding per record
    unmapped = r.unmapped()
    if unmapped:
        event["unmapped"] = unmapped
    return event


def _base(r: _Record, class_uid: int, activity_id: int) -> dict[str, Any]:
    """The attributes every traffic event has: class, activity, time, severity, and the `security_control`
    profile's action, disposition and policy."""
    severity, action = judge(r.record)
    event = _head(r, class_uid, activity_id, severity)
    event.update(
        {
            "action_id": int(action),
            "action": action.name.capitalize(),
            "disposition_id": int(_ACTION_DISPOSITION[action]),
            "disposition": _ACTION_DISPOSITION[action].name.capitalize(),
        }
    )
    policy_hash = r[F.POLICY_HASH]
    if policy_hash:
        # The policy hash names the exact policy version that decided (docs/policy.md).
        event["policy"] = {"uid": str(policy_hash), "name": "cube-egress policy"}
    return event


def _head(r: _Record, class_uid: int, activity_id: int, severity: Severity) -> dict[str, Any]:
    class_name, category_uid = _CLASS[class_uid]
    activity_name = _ACTIVITY_NAMES[class_uid].get(activity_id, "Other")
    return {
        "class_uid": class_uid,
        "class_name": class_name,
        "category_uid": category_uid,
        "category_name": _CATEGORY[category_uid],
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        "type_name": f"{class_name}: {activity_name}",
        "time": epoch_ms(r.record),
        "timezone_offset": 0,
        "severity_id": int(severity),
        "severity": severity.name.capitalize(),
    }


def _metadata(r: _Record, uid: str, profiles: list[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "version": OCSF_VERSION,
        "product": {"name": PRODUCT_NAME, "vendor_name": PRODUCT_NAME, "version": __version__},
        "profiles": list(profiles),
        "uid": uid,
        "log_name": "audit",
        "original_time": str(r.record.get(F.TIME)),
    }
    seq = r.record.get("seq")
    if isinstance(seq, int) and not isinstance(seq, bool):
        r.mark("seq")
        meta["sequence"] = seq
    code = {F.EVENT_SECURITY: r.peek(F.KIND), F.EVENT_ADMIN: r.peek(F.ACTION)}.get(
        str(r.record.get(F.EVENT)), r.peek(F.REASON)
    )
    if code:
        meta["event_code"] = str(code)
    return meta


def _status(r: _Record, event: dict[str, Any], ok: bool) -> None:
    event["status_id"] = 1 if ok else 2
    event["status"] = "Success" if ok else "Failure"
    reason = r[F.REASON]
    if reason:
        event["status_detail"] = str(reason)


def _rule(r: _Record, event: dict[str, Any]) -> None:
    rule = r[F.RULE]
    if rule:
        event["firewall_rule"] = {"uid": str(rule), "name": str(rule)}


def _src(r: _Record) -> dict[str, Any] | None:
    ip, port = split_address(r[F.SOURCE])
    ep: dict[str, Any] = {}
    sandbox = r[F.SANDBOX]
    if sandbox:
        ep["uid"] = str(sandbox)  # the sandbox id: unique, and what SIEM queries pivot on
    if ip is not None:
        ep["ip"] = ip
    if port is not None:
        ep["port"] = port
    return ep or None


def _dst(r: _Record) -> dict[str, Any] | None:
    ep: dict[str, Any] = {}
    host = r[F.HOST]
    if isinstance(host, str) and host:
        ep["ip" if is_ip(host) else "hostname"] = host
    upstream_ip, _ = split_address(r[F.UPSTREAM_ADDRESS])
    if upstream_ip is not None:
        ep["ip"] = upstream_ip  # the address the gateway resolved, checked and dialled
    port = r[F.PORT]
    if isinstance(port, int) and 0 <= port <= 65535:
        ep["port"] = port
    return ep if ("ip" in ep or "hostname" in ep) else None


def _endpoints(r: _Record, event: dict[str, Any]) -> None:
    src, dst = _src(r), _dst(r)
    if src:
        event["src_endpoint"] = src
    if dst:
        event["dst_endpoint"] = dst


def _message(r: _Record, what: str) -> str:
    rec = r.record
    verdict = str(rec.get(F.VERDICT))
    if verdict == "deny" and rec.get(F.MODE) == "report":
        verdict = "deny (report mode)"
    return f"{verdict} {what} for sandbox {rec.get(F.SANDBOX) or '(unknown)'}: {rec.get(F.REASON)}"


def _http_activity(r: _Record) -> dict[str, Any]:
    method = r.peek(F.METHOD)
    known = isinstance(method, str) and method.upper() in _HTTP_ACTIVITY
    event = _base(r, 4002, _HTTP_ACTIVITY[method.upper()] if known else 99)
    url: dict[str, Any] = {}
    scheme, host, port, raw_path = r[F.SCHEME], r.peek(F.HOST), r.peek(F.PORT), r[F.PATH]
    path, _, query = str(raw_path or "/").partition("?")
    url["path"] = path
    if query:
        url["query_string"] = query  # already redacted in the record: names kept, values REDACTED
    if scheme:
        url["scheme"] = str(scheme)
    if isinstance(host, str) and host:
        url["hostname"] = host
        authority = f"[{host}]" if ":" in host else host
        url["url_string"] = f"{scheme}://{authority}{f':{port}' if port else ''}{raw_path or '/'}"
    if isinstance(port, int):
        url["port"] = port
    request: dict[str, Any] = {"url": url}
    if known:
        r.mark(F.METHOD)
        request["http_method"] = str(method).upper()
    if isinstance(r.peek(F.BYTES_IN), int):
        request["body_length"] = r[F.BYTES_IN]
    event["http_request"] = request
    status = r[F.UPSTREAM_STATUS]
    if isinstance(status, int):
        response: dict[str, Any] = {"code": status}
        if isinstance(r.peek(F.BYTES_OUT), int):
            response["body_length"] = r[F.BYTES_OUT]
        event["http_response"] = response
    _endpoints(r, event)
    _rule(r, event)
    error = r[F.ERROR]
    _status(r, event, event["action_id"] != Action.DENIED and not error)
    duration = r[F.DURATION_MS]
    if isinstance(duration, int | float):
        event["duration"] = round(duration)
    event["message"] = str(error) if error else _message(r, f"{method} {url.get('url_string', path)}")
    return event


def _connection(r: _Record) -> dict[str, Any]:
    blocked = judge(r.record)[1] is Action.DENIED
    event = _base(r, 4001, 5 if blocked else 1)
    _endpoints(r, event)
    scheme = r[F.SCHEME]
    event["connection_info"] = {"protocol_name": "tcp", "direction_id": 2, "direction": "Outbound"}
    _rule(r, event)
    _status(r, event, not blocked)
    target = f"{scheme or 'connection'} {r.peek(F.HOST)}:{r.peek(F.PORT)}"
    event["message"] = _message(r, target)
    return event


def _dns_activity(r: _Record) -> dict[str, Any]:
    event = _base(r, 4003, 2)
    name = r[F.HOST]
    qtype = r.peek(F.QTYPE)
    if isinstance(name, str):
        query: dict[str, Any] = {"hostname": name}
        if isinstance(qtype, str):
            r.mark(F.QTYPE)
            qclass, _, rrtype = qtype.rpartition(" ")  # "CH TXT": a class other than IN is written first
            query["type"] = rrtype
            query["class"] = qclass or "IN"
        event["query"] = query
    answers = r[F.ANSWERS]
    ttl = r[F.TTL]
    if isinstance(answers, list):
        event["answers"] = [
            {"rdata": str(a), "type": "A", "class": "IN", **({"ttl": ttl} if isinstance(ttl, int) else {})}
            for a in answers
        ]
    rcode = r[F.RCODE]
    if isinstance(rcode, str):
        event["rcode"] = rcode
        event["rcode_id"] = _RCODE_ID.get(rcode, 99)
    src = _src(r)
    if src:
        event["src_endpoint"] = src
    _rule(r, event)
    _status(r, event, rcode == "NOERROR")
    error = r[F.ERROR]
    event["message"] = str(error) if error else _message(r, f"DNS {qtype} {name} ({rcode})")
    return event


def _packet_dropped(r: _Record) -> dict[str, Any]:
    event = _base(r, 4001, 5)
    src: dict[str, Any] = {}
    if r[F.SANDBOX]:
        src["uid"] = str(r.peek(F.SANDBOX))
    source = r[F.SOURCE]
    if isinstance(source, str) and is_ip(source):
        src["ip"] = source
    mac = r.peek("source_mac")
    if isinstance(mac, str) and mac:
        r.mark("source_mac")
        src["mac"] = mac
        # An endpoint needs an identifier besides its MAC; a frame with no IP (ARP) from an unknown slot has none.
        if "uid" not in src and "ip" not in src:
            src["uid"] = mac
    if src:
        event["src_endpoint"] = src
    dst: dict[str, Any] = {}
    destination = r["destination"]
    if isinstance(destination, str) and is_ip(destination):
        dst["ip"] = destination
    port = r[F.PORT]
    if dst and isinstance(port, int):
        dst["port"] = port
    if dst:
        event["dst_endpoint"] = dst
    protocol = r["protocol"]
    info: dict[str, Any] = {"direction_id": 2, "direction": "Outbound"}
    if protocol:
        info["protocol_name"] = str(protocol)
    event["connection_info"] = info
    reason, detail = r[F.REASON], r[F.DETAIL]
    if reason:
        # The guard's drop code is the rule that dropped the packet (docs/enforcement.md lists them).
        event["firewall_rule"] = {"name": str(reason), "type": "kernel guard", **({"desc": detail} if detail else {})}
        event["status_detail"] = str(reason)
    event["status_id"], event["status"] = 2, "Failure"
    count = r["count"]
    if isinstance(count, int):
        event["count"] = count
    event["message"] = str(detail or reason or "packet dropped")
    return event


def _detection_finding(r: _Record) -> dict[str, Any]:
    event = _base(r, 2004, 1)
    kind = str(r[F.KIND])
    title = SECURITY_EVENTS.get(kind, (kind,))[0]
    detail = r[F.DETAIL]
    info: dict[str, Any] = {
        "uid": "",  # the event's uid, set with the metadata
        "title": title,
        "types": [kind],
        "analytic": {"type_id": 1, "type": "Rule", "name": kind, "uid": kind},
    }
    if detail:
        info["desc"] = str(detail)
    event["finding_info"] = info
    evidence: dict[str, Any] = {}
    src, dst = _src(r), _dst(r)
    if src:
        evidence["src_endpoint"] = src
    if dst:
        evidence["dst_endpoint"] = dst
    if evidence:
        event["evidences"] = [evidence]
    event["status_id"], event["status"] = 1, "New"
    event["is_alert"] = True
    event["message"] = f"{title}: {detail}" if detail else title
    return event


_SANDBOX_DATA = (F.SOURCES, F.POLICIES, F.LABELS, F.DEFAULT_MODE, F.LIMITS, F.HAS_TOKEN)


def _api_activity(r: _Record) -> dict[str, Any]:
    """An admin change: the operation is the action, the actor how it was made (`via`), the resource the sandbox
    (with what its registration gives it) or the policy (its hash, rules and sandboxes after the reload)."""
    action = str(r[F.ACTION])
    title, activity_id, severity = ADMIN_EVENTS.get(action, (action, 99, Severity.MEDIUM))
    event = _head(r, 6003, activity_id, severity)
    event["api"] = {"operation": action}
    via, peer = r[F.VIA], r.peek(F.PEER)
    event["actor"] = {"app_name": str(via or "unknown")}
    ip, port = split_address(peer)
    if ip is not None:
        r.mark(F.PEER)
        event["src_endpoint"] = {"ip": ip, **({"port": port} if port is not None else {})}
    else:
        # No network peer: the admin socket ("unix"), a signal or a call inside the gateway (the `via`). OCSF
        # requires a source endpoint; its name says which.
        if peer:
            r.mark(F.PEER)
        event["src_endpoint"] = {"name": str(peer or via or "unknown")}
    sandbox = r[F.SANDBOX]
    if sandbox:
        data = {k: r[k] for k in _SANDBOX_DATA if r.record.get(k) is not None}
        resource: dict[str, Any] = {"type": "sandbox", "uid": str(sandbox), "name": str(sandbox)}
        event["resources"] = [{**resource, "data": data} if data else resource]
    else:
        policy_hash = r[F.POLICY_HASH]
        data = {k: r[k] for k in (F.RULE_COUNT, F.SANDBOXES) if r.record.get(k) is not None}
        if policy_hash:
            resource = {"type": "policy", "uid": str(policy_hash), "name": "cube-egress policy"}
            event["resources"] = [{**resource, "data": data} if data else resource]
    ok = action not in _ADMIN_FAILURES
    event["status_id"], event["status"] = (1, "Success") if ok else (2, "Failure")
    errors, locations = r.peek(F.ERRORS), r.peek(F.ERROR_LOCATIONS)
    if not ok and isinstance(errors, int):
        where = f": {', '.join(map(str, locations))}" if isinstance(locations, list) and locations else ""
        event["status_detail"] = f"{errors} error(s){where}"  # the fields stay in `unmapped` too
    subject = f"sandbox {sandbox}" if sandbox else f"policy {str(r.peek(F.POLICY_HASH) or '')[:12]}"
    how = f"{via} ({peer})" if peer else str(via)
    event["message"] = f"{title}: {subject}, via {how}"
    return event
