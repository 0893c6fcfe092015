"""`cube-egress audit export`: the audit log's decision, security and admin records as OCSF, CEF, CSV or JSON lines.

    cube-egress audit export --format ocsf|cef|csv|jsonl [--config FILE | FILE...]
        [--since WHEN] [--until WHEN] [--sandbox ID] [--verdict allow|deny] [--rule ID] [--credential NAME]
        [--event decision|security|admin] [--output FILE]

Records are read with `_chain.read_records` (chain order, headers/checkpoints/recovery records left out; the chain
is not verified here: `audit verify` does that). Filters of different options must all match; an option given
twice matches either value; a record without the field (a security event has no verdict) does not match.
WHEN is ISO 8601 (`2025-03-01`, `2025-03-01T10:00:00Z`; no zone means UTC) or a duration back from now (`90s`,
`15m`, `1h`, `2d`, `1w`, `1h30m`); `--since` is inclusive, `--until` exclusive.

Formats: `ocsf` one OCSF event per line (`_ocsf`); `cef` one CEF line per record (`_cef`); `jsonl` the records'
own canonical lines (byte for byte what the log holds, so their hashes still chain); `csv` the columns in
`CSV_COLUMNS` with a header row, anything else in `extra` as JSON, and every cell that a spreadsheet would run as a
formula (starting with = + - @ TAB CR, or ') prefixed with `'` (`unprotect_cell` undoes it).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from . import _fields as F
from ._cef import to_cef
from ._chain import chain_files, encode, read_records
from ._ocsf import ExportError, event_uid, is_event, parse_time, to_ocsf

__all__ = [
    "CSV_COLUMNS",
    "FORMATS",
    "ExportError",
    "RecordFilter",
    "add_export_parser",
    "csv_row",
    "export",
    "parse_when",
    "unprotect_cell",
]

FORMATS = ("ocsf", "cef", "csv", "jsonl")

CSV_COLUMNS = (
    F.TIME,
    F.SEQ,
    F.EVENT,
    F.KIND,
    F.ACTION,  # admin records
    F.VIA,
    F.SANDBOX,
    F.SOURCE,
    F.PHASE,
    F.VERDICT,
    F.MODE,
    F.RULE,
    F.REASON,
    F.SCHEME,
    F.METHOD,
    F.HOST,
    F.PORT,
    F.PATH,
    F.CREDENTIAL,
    F.CREDENTIAL_FINGERPRINT,
    F.UPSTREAM_ADDRESS,
    F.UPSTREAM_STATUS,
    F.BYTES_IN,
    F.BYTES_OUT,
    F.DURATION_MS,
    F.ECHO_REDACTIONS,
    F.INTERCEPTED,
    F.QTYPE,
    F.RCODE,
    F.ANSWERS,
    F.TTL,
    "destination",  # packet_dropped (ebpf.DropEvent.audit_fields)
    "protocol",
    "count",
    F.DETAIL,
    F.ERROR,
    F.POLICY_HASH,
    "uid",  # the record's line hash (metadata.uid in OCSF)
    "extra",  # every other field, as a JSON object
)
_CSV_FIELDS = frozenset(CSV_COLUMNS) - {"uid", "extra"}
# OWASP "CSV injection": a cell starting with one of these is a formula to Excel/LibreOffice/Sheets. The quote is
# in the set so that `unprotect_cell` can tell a protected cell from one that began with a quote.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")

_DURATION = re.compile(r"^(?:\d+[smhdw])+$")
_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """ISO 8601 (a date, or a date and time; UTC unless a zone is given) or a duration back from `now`."""
    value = text.strip()
    if _DURATION.match(value):
        seconds = sum(int(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(value))
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=seconds)
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ExportError(
            f"{text!r} is neither ISO 8601 (2025-03-01, 2025-03-01T10:00:00Z) nor a duration (90s, 15m, 1h, 2d, 1w)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class RecordFilter:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    sandbox: frozenset[str] = field(default_factory=frozenset)
    verdict: frozenset[str] = field(default_factory=frozenset)
    rule: frozenset[str] = field(default_factory=frozenset)
    credential: frozenset[str] = field(default_factory=frozenset)
    event: frozenset[str] = field(default_factory=frozenset)

    def __call__(self, record: Mapping[str, Any]) -> bool:
        for key, wanted in (
            (F.SANDBOX, self.sandbox),
            (F.VERDICT, self.verdict),
            (F.RULE, self.rule),
            (F.CREDENTIAL, self.credential),
            (F.EVENT, self.event),
        ):
            if wanted and record.get(key) not in wanted:
                return False
        if self.since is not None or self.until is not None:
            t = parse_time(record.get(F.TIME))
            if self.since is not None and t < self.since:
                return False
            if self.until is not None and t >= self.until:
                return False
        return True


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = str(value)
    else:
        text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return "'" + text if text.startswith(_FORMULA_START) else text


def unprotect_cell(cell: str) -> str:
    """The cell as it was before formula protection (for reading an export back)."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(_FORMULA_START) else cell


def csv_row(record: Mapping[str, Any]) -> dict[str, str]:
    row = {c: _cell(record.get(c)) for c in CSV_COLUMNS if c in _CSV_FIELDS}
    row["uid"] = event_uid(record)
    extra = {k: v for k, v in record.items() if k not in _CSV_FIELDS}
    row["extra"] = _cell(extra) if extra else ""
    return row


def export(records: Iterable[Mapping[str, Any]], fmt: str, out: IO[str]) -> int:
    """Write the records (the ledger's own records are skipped) in `fmt`; returns how many were written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    n = 0
    writer: csv.DictWriter[str] | None = None
    if fmt == "csv":
        # RFC 4180 (CRLF line ends, quoting where needed): what csv.DictReader and spreadsheets read.
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, quoting=csv.QUOTE_MINIMAL)
        writer.writeheader()
    line_of: Callable[[Mapping[str, Any]], str | None] = {
        "ocsf": _ocsf_line,
        "cef": to_cef,
        "jsonl": lambda r: encode(r).decode(),
        "csv": lambda r: None,  # rows go through the csv writer
    }[fmt]
    for record in records:
        if not is_event(record):
            continue
        if writer is not None:
            writer.writerow(csv_row(record))
        else:
            line = line_of(record)
            if line is None:
                continue
            out.write(line + "\n")
        n += 1
    return n


def _ocsf_line(record: Mapping[str, Any]) -> str | None:
    event = to_ocsf(record)
    return None if event is None else orjson.dumps(event).decode()


# -- command line ------------------------------------------------------------------------------------------------


def add_export_parser(audit_subparsers: Any) -> None:
    """Add `export` to the subparsers of `cube-egress audit`."""
    p = audit_subparsers.add_parser(
        "export",
        help="export decision, security and admin records as OCSF, CEF, CSV or JSON lines",
        description=(
            "Filters of different options must all match; an option given twice matches either value. WHEN is "
            "ISO 8601 (2025-03-01, 2025-03-01T10:00:00Z; no zone means UTC) or a duration back from now (90s, 15m, "
            "1h, 2d, 1w). Formats: ocsf (OCSF 1.7 events, one per line), cef, csv, jsonl (the records' own lines)."
        ),
    )
    p.add_argument("--format", required=True, choices=FORMATS, dest="export_format")
    p.add_argument("files", nargs="*", help="audit files (default: every file of the configured log, in order)")
    p.add_argument("--config", help="gateway config file whose audit log to read (default: the embedded default)")
    p.add_argument("--since", metavar="WHEN", help="ISO 8601 time or a duration back from now (1h, 2d); inclusive")
    p.add_argument("--until", metavar="WHEN", help="ISO 8601 time or a duration back from now; exclusive")
    p.add_argument("--sandbox", action="append", default=[], help="sandbox id (repeatable: any of)")
    p.add_argument("--verdict", action="append", default=[], choices=("allow", "deny"), help="repeatable")
    p.add_argument("--rule", action="append", default=[], help="rule id (repeatable)")
    p.add_argument("--credential", action="append", default=[], help="credential name (repeatable)")
    p.add_argument("--event", action="append", default=[], choices=(F.EVENT_DECISION, F.EVENT_SECURITY, F.EVENT_ADMIN))
    p.add_argument("-o", "--output", help="write here (created 0600) instead of standard output")
    p.set_defaults(func=cmd_export)


def _input_files(args: argparse.Namespace) -> list[str]:
    if args.files:
        return list(args.files)
    from ..config import default_config, load_config  # the CLI's concern; the audit package itself needs no config

    config = load_config(args.config) if args.config else default_config()
    files = [str(p) for p in chain_files(config.audit_path)]
    if not files:
        raise ExportError(f"no audit log at {config.audit_path}")
    return files


def _filtered(records: Iterator[dict[str, Any]], keep: RecordFilter) -> Iterator[dict[str, Any]]:
    return (r for r in records if keep(r))


def cmd_export(args: argparse.Namespace) -> int:
    from ..config import ConfigError

    try:
        keep = RecordFilter(
            since=parse_when(args.since) if args.since else None,
            until=parse_when(args.until) if args.until else None,
            sandbox=frozenset(args.sandbox),
            verdict=frozenset(args.verdict),
            rule=frozenset(args.rule),
            credential=frozenset(args.credential),
            event=frozenset(args.event),
        )
        files = _input_files(args)
        for path in files:
            if not os.path.isfile(path):
                raise ExportError(f"{path}: no such audit file")
        with contextlib.ExitStack() as stack:
            if args.output:
                fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                out: IO[str] = stack.enter_context(open(fd, "w", encoding="utf-8", newline=""))
            else:
                out = sys.stdout
            n = export(_filtered(read_records(files), keep), args.export_format, out)
            out.flush()
    except (ExportError, ConfigError, ValueError, OSError) as e:
        print(f"cube-egress audit export: {e}", file=sys.stderr)
        return 2
    if args.output:
        print(f"exported {n} records to {args.output}", file=sys.stderr)
    return 0
