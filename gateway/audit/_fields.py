"""Audit field names, in one place: the audit line is an interface that compliance exports and SIEMs parse."""

from __future__ import annotations

# every record
TIME = "time"  # RFC 3339, UTC, microseconds
EVENT = "event"  # EVENT_DECISION | EVENT_SECURITY | EVENT_ADMIN | EVENT_HEADER | EVENT_CHECKPOINT | EVENT_RECOVERY
SEQ = "seq"  # 1, 2, 3...: one chain per audit log, across restarts and rotated files; never reused
PREV = "prev"  # hex SHA-256 of the previous record's line (its bytes without the newline); GENESIS for seq 1
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
# agent correlation (policy `correlation:`): {lower-case header: value} on every record of a request, and of a
# CONNECT tunnel for the headers of its CONNECT; "<invalid>" for a value that is not short printable ASCII
CORRELATION = "correlation"
# usage limits (policy `limits:`): the limit a refusal or a report-mode would-refusal is about, e.g.
# "requests_per_minute:sandbox"; and the counts after the request, {"sandbox": {"requests_per_minute": 3, ...}}
LIMIT = "limit"
USAGE = "usage"

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
EVENT_ADMIN = "admin"  # a change of the policy in force: a registration, an unregistration, a reload

# admin records (docs/audit.md): ACTION, VIA and PEER on each; SANDBOX and POLICY_HASH (the policy in force after)
ACTION = "action"  # one of ADMIN_ACTIONS
VIA = "via"  # one of ADMIN_VIAS: who made the change
PEER = "peer"  # via admin_api: "unix", or the TCP client's "ip:port"; absent otherwise
# the registration (sandbox_registered / _replaced / _unregistered): what it gave the sandbox; never its token
SOURCES = "sources"
POLICIES = "policies"
LABELS = "labels"
DEFAULT_MODE = "default_mode"
LIMITS = "limits"  # {"requests_per_minute", "bytes_per_session", "mode"} or null
HAS_TOKEN = "has_token"  # noqa: S105 (a name); whether a proxy token identifies it: never the token or its hash
LEASES_REVOKED = "leases_revoked"  # sandbox_unregistered: dynamic-secret leases revoked (null: revocation failed)
# reloads: the policy files' hash before (POLICY_HASH is the one in force after), and the policy in force after
OLD_POLICY_HASH = "old_policy_hash"
RULE_COUNT = "rule_count"
SANDBOXES = "sandboxes"  # how many sandboxes (from files and registrations)
ERRORS = "errors"  # policy_reload_failed: how many errors the files had
ERROR_LOCATIONS = "error_locations"  # ... and where the first MAX_ERROR_LOCATIONS are ("file:line:col")
MAX_ERROR_LOCATIONS = 5

# chain records (docs/audit.md): they carry SEQ/PREV like every record and are not decisions
EVENT_HEADER = "header"  # first record of every file
EVENT_CHECKPOINT = "checkpoint"  # signed; closes a file at rotation and the log at a clean shutdown
EVENT_RECOVERY = "recovery"  # first record after a restart that found no clean shutdown
CHAIN_EVENTS = frozenset({EVENT_HEADER, EVENT_CHECKPOINT, EVENT_RECOVERY})
GENESIS = "0" * 64  # PREV of seq 1
FORMAT = "format"  # header: the ledger format version (1)
PREVIOUS_FILE = "previous_file"  # header: name of the file this one continues, null at genesis
KEY_ID = "key_id"  # header, checkpoint: first 16 hex of SHA-256 of the raw Ed25519 public key
FILE_RECORDS = "file_records"  # checkpoint: records in this file before the checkpoint (header included)
CLOSES = "closes"  # checkpoint: null, "file" (rotation) or "log" (clean shutdown)
SIGNATURE = "sig"  # checkpoint: base64 Ed25519 signature (docs/audit.md, "Chain and checkpoints")
LAST_SEQ = "last_seq"  # recovery: the last intact record found on disk
TORN_BYTES = "torn_bytes"  # recovery: bytes of a partial last line that were cut away
TORN_SHA256 = "torn_sha256"  # recovery: hex SHA-256 of those bytes (null when none)

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
        "correlation_invalid",  # a correlation header too long, not printable ASCII, or repeated (value not kept)
    }
)

ADMIN_ACTIONS = frozenset(
    {
        "sandbox_registered",
        "sandbox_replaced",  # a registration of an id already registered, replacing it whole
        "sandbox_unregistered",
        "policy_reloaded",
        "policy_reload_failed",  # the files were refused; the policy in force stayed
    }
)
VIA_ADMIN_API = "admin_api"
VIA_SIGHUP = "sighup"
VIA_PYTHON = "python"  # gateway.server.Gateway called in-process
ADMIN_VIAS = frozenset({VIA_ADMIN_API, VIA_SIGHUP, VIA_PYTHON})
