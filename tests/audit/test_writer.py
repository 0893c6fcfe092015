from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gateway.audit import AuditLog, redact_path


@pytest.mark.parametrize(
    ("path", "redacted"),
    [
        ("/v1/models", "/v1/models"),
        ("/search?q=secret&page=2", "/search?q=REDACTED&page=REDACTED"),
        ("/p?sk-abc123", "/p?REDACTED"),
        ("/p?token=", "/p?token=REDACTED"),
        ("/p?" + "x" * 60 + "=1", "/p?REDACTED"),
        ("/p?a%3Db=c", "/p?REDACTED"),
        ("/p?", "/p?REDACTED"),
    ],
)
def test_redact_path(path: str, redacted: str) -> None:
    assert redact_path(path) == redacted


def test_one_sorted_line_per_record_and_private_file(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "a" / "audit.jsonl"))
    log.decision(sandbox="s", verdict="allow")
    log.security("host_mismatch", detail="x")
    log.close()
    path = tmp_path / "a" / "audit.jsonl"
    lines = path.read_bytes().splitlines()
    # header, the two records, the closing checkpoint
    assert [json.loads(x)["event"] for x in lines] == ["header", "decision", "security", "checkpoint"]
    first = json.loads(lines[1])
    assert first["event"] == "decision" and first["time"].endswith("Z")
    assert list(first) == sorted(first)
    assert json.loads(lines[2])["kind"] == "host_mismatch"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_unknown_security_kind_is_a_bug(tmp_path: Path) -> None:
    log = AuditLog(None)
    with pytest.raises(AssertionError):
        log.security("made_up")
