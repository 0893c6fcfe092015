"""DNS query names as the decision core sees them: validation, and the test for names that carry encoded data.

Pure functions, no I/O. `CompiledPolicy.decide_dns` uses them; they are separate so the heuristic can be read,
tested and tuned in one place.

Why a shape test at all: a name the sandbox's policy does not allow is answered NXDOMAIN without ever leaving the
gateway, so names cannot carry data out through the gateway's resolver. The part of a name a sandbox can still
choose freely is what sits below a wildcard (`*.cdn.example.com` lets it pick `<anything>.cdn.example.com`), and
such queries do reach that domain's name servers. `encoded_data` refuses the usual encodings of DNS tunnels and
exfiltration tools (hex, decimal, base32, base36, base64 with letters and digits mixed) in that chosen part, and
in every label of a name nobody allows (there only to raise an alarm: that name is refused anyway).
"""

from __future__ import annotations

import enum
import itertools
import math
import re
from collections import Counter

__all__ = [
    "MAX_LABEL",
    "MAX_NAME",
    "DnsNameError",
    "NameFault",
    "encoded_data",
    "parse_query_name",
]

MAX_NAME = 253  # characters of the text form without the final dot (255 octets on the wire)
MAX_LABEL = 63

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]+(?<!-)$")
_NUMERIC_LAST = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")
_SEPARATORS = re.compile(r"[-_.]")
_DIGIT_RUN = re.compile(r"[0-9]+")

# The thresholds of `encoded_data` (see its docstring for why these values).
HEX_RUN = 16  # hex digits in one run, with letters and digits both present: 8 bytes of data
_HEX_RUN_RE = re.compile(rf"[0-9a-f]{{{HEX_RUN},}}")
DIGIT_RUN = 20  # decimal digits in one run
MIXED_LENGTH = 20  # letters and digits (separators not counted) ...
MIXED_CHANGES = 4  # ... changing between letter and digit at least this often inside a run ...
MIXED_ENTROPY = 3.0  # ... with at least this much Shannon entropy, bits per character


class NameFault(enum.StrEnum):
    """Why a query name is not a host name the gateway will look up."""

    BAD_NAME = "bad_name"
    NAME_TOO_LONG = "name_too_long"
    LABEL_TOO_LONG = "label_too_long"


class DnsNameError(ValueError):
    def __init__(self, fault: NameFault, detail: str) -> None:
        super().__init__(detail)
        self.fault = fault
        self.detail = detail


def parse_query_name(qname: str) -> str:
    """The canonical form of a query name (lower case, no final dot), or DnsNameError.

    `qname` is the presentation form (dnspython's `Name.to_text()`): a byte that cannot be in a host name shows as
    an escape (`\\.`, `\\000`) and is refused here with everything else that is not letters, digits, `-` and `_`.
    An all-numeric last label is an address spelling (`10.0.0.1`, `0x7f.1`), not a name: refused too.
    """
    name = qname[:-1] if qname.endswith(".") else qname
    if not name or name == "@":
        raise DnsNameError(NameFault.BAD_NAME, "the root name")
    if not name.isascii():
        raise DnsNameError(NameFault.BAD_NAME, "not ASCII")
    name = name.lower()
    if len(name) > MAX_NAME:
        raise DnsNameError(NameFault.NAME_TOO_LONG, f"{len(name)} characters (at most {MAX_NAME})")
    labels = name.split(".")
    for i, label in enumerate(labels, 1):
        if len(label) > MAX_LABEL:
            raise DnsNameError(NameFault.LABEL_TOO_LONG, f"label {i} has {len(label)} characters (at most {MAX_LABEL})")
    for i, label in enumerate(labels, 1):
        if not _LABEL.match(label):
            raise DnsNameError(NameFault.BAD_NAME, f"label {i} is empty or not a host name label")
    if _NUMERIC_LAST.match(labels[-1]):
        raise DnsNameError(NameFault.BAD_NAME, "an address spelling, not a name")
    return name


def _entropy(text: str) -> float:
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def _changes(segment: str) -> int:
    """How often adjacent characters switch between digit and non-digit."""
    return sum(1 for a, b in itertools.pairwise(segment) if a.isdigit() != b.isdigit())


def encoded_data(text: str) -> str | None:
    """Why `text` (one label, or several joined by dots) looks like encoded data; None when it does not.

    Separators (`-`, `_`, `.`) split the text into segments. It looks encoded when:

    1. a segment holds a run of at least 16 hex digits with both letters and digits (hex: dnscat2, Cobalt Strike
       beacons; also UUIDs and hashes);
    2. a segment holds a run of at least 20 decimal digits;
    3. the segments together hold at least 20 characters, letters and digits change places at least 4 times
       inside segments, and their Shannon entropy is at least 3.0 bits per character (base32, base36, base64 as
       iodine, dns2tcp and most exfiltration scripts use them: 12 random bytes in base32 are 20 characters and
       fail this test 85% of the time, 20 bytes 98%).

    Raw entropy alone does not separate random strings from long human labels (`my-company-production-artifacts`
    has 3.8 bits/char, 20 random base32 characters 3.8 too), so rule 3 also asks for letters and digits to
    interleave, which words and version numbers (`us-east-1`, `node-v20`, `ec2-203-0-113-25`) do not. Not caught,
    by design: labels of letters only (a word list, base26), and data spread thinly (under 16 hex or 20 base32
    characters per name), which limits a name below an allowed wildcard to a few bytes per query.
    """
    segments = [s for s in _SEPARATORS.split(text) if s]
    for segment in segments:
        for run in _HEX_RUN_RE.findall(segment):
            if not run.isdigit() and any(c.isdigit() for c in run):
                return f"{len(run)} hex digits in a row"
        longest = max((len(r) for r in _DIGIT_RUN.findall(segment)), default=0)
        if longest >= DIGIT_RUN:
            return f"{longest} decimal digits in a row"
    chars = "".join(segments)
    if len(chars) >= MIXED_LENGTH:
        changes = sum(_changes(s) for s in segments)
        if changes >= MIXED_CHANGES:
            bits = _entropy(chars)
            if bits >= MIXED_ENTROPY:
                return f"{len(chars)} characters, letters and digits interleaved {changes} times, {bits:.1f} bits/char"
    return None
