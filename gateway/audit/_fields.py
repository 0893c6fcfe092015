"""Audit field names, in one place: the audit line is an interface that compliance exports and SIEMs parse."""

from __future__ import annotations

# every record
TIME = "time"  # RFC 3339, UTC, microseconds
EVENT = "event"  # EVENT_DECISION | EVENT_SECURITY
SANDBOX = "sandbox"
SOURCE = "source"  # sandbox address as seen by the gateway ("ip:port")
POLICY_HASH = "policy_hash"

# decision records
PHASE = "phase"  # "connection" (CONNECT / TLS ClientHello, spliced or refused) | "request" | PHASE_DNS
METHOD = "method"
SCHEME = "scheme"
HOST = "host"
PORT = "port"
PATH = "path"  # query values redacted
VERDICT = "verdict"
RULE = "rule"
MODE = "mode"
REASON = "reason"
INTERCEPTED = "intercepted"
CREDENTIAL = "credential"  # the credential's name, never its value
CREDENTIAL_FINGERPRINT = "credential_fingerprint"  # HMAC-SHA256 (gateway key) of the injected value, 32 hex
ECHO_REDACTIONS = "echo_redactions"  # injected-value echoes overwritten in the response
UPSTREAM_ADDRESS = "upstream_address"
UPSTREAM_STATUS = "upstream_status"
BYTES_IN = "bytes_in"  # request body bytes from the sandbox
BYTES_OUT = "bytes_out"  # response body bytes to the sandbox
DURATION_MS = "duration_ms"
ERROR = "error"

# decision records of DNS queries (PHASE_DNS); HOST is the query name, SCHEME/PORT/METHOD/PATH are absent
PHASE_DNS = "dns"
QTYPE = "qtype"  # "A", "AAAA", "TXT", "TYPE65534", ...; a class other than IN is prefixed ("CH TXT")
RCODE = "rcode"  # what the sandbox was answered: "NOERROR", "NXDOMAIN", "REFUSED", "SERVFAIL"
ANSWERS = "answers"  # addresses in the answer (A records), [] when none
TTL = "ttl"  # TTL of the answer's records (never beyond the gateway's own cache entry), null without records

# security events
KIND = "kind"  # one of SECURITY_KINDS
DETAIL = "detail"

EVENT_DECISION = "decision"
EVENT_SECURITY = "security"

SECURITY_KINDS = frozenset(
    {
        "host_mismatch",
        "address_refused",
        "destination_not_in_answers",
        "ip_literal_refused",
        "gateway_loop",
        "ambiguous_path",
        "bad_proxy_token",
        "unknown_sandbox",
        "protocol_not_allowed",
        "hook_error",
        "credential_endpoint_mismatch",
        "secret_unavailable",
        "secret_echo",
        "credential_invalid",
        "packet_dropped",
        "dns_refused",  # a DNS query name that is no host name, too long, or looks like encoded data
    }
)
