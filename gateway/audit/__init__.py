"""Audit records: what each sandbox sent where, under which rule and policy version. Never a secret value."""

from __future__ import annotations

from . import _fields as fields
from ._writer import AuditLog, redact_path

__all__ = ["AuditLog", "fields", "redact_path"]
