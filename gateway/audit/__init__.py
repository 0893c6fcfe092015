"""Audit records: what each sandbox sent where, under which rule and policy version, and every change of the policy
in force (admin records). Never a secret value.

The log is a hash chain with signed checkpoints (docs/audit.md). Errors: `AuditLogError` (cannot open or continue
a log), `AuditWriteError` (a record could not be made durable), `AuditKeyError` (a key file is unusable).
"""

from __future__ import annotations

from . import _fields as fields
from ._chain import AuditKeyError, SigningKey, chain_files, load_public_key, read_records
from ._export import RecordFilter, export, parse_when
from ._ocsf import OCSF_VERSION, to_ocsf
from ._sinks import SinkConfig, SyslogSinkConfig, WebhookSinkConfig, make_sinks
from ._verify import Problem, VerifyReport, verify_files
from ._writer import AuditLog, AuditLogError, AuditSink, AuditWriteError, Durability, redact_path

__all__ = [
    "AuditKeyError",
    "AuditLog",
    "AuditLogError",
    "AuditSink",
    "AuditWriteError",
    "Durability",
    "OCSF_VERSION",
    "RecordFilter",
    "SinkConfig",
    "SyslogSinkConfig",
    "WebhookSinkConfig",
    "Problem",
    "SigningKey",
    "VerifyReport",
    "chain_files",
    "fields",
    "export",
    "load_public_key",
    "make_sinks",
    "parse_when",
    "read_records",
    "redact_path",
    "to_ocsf",
    "verify_files",
]
