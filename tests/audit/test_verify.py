"""`cube-egress audit verify`: each kind of tampering is caught and the first bad seq named; a torn tail after a
crash is reported apart from tampering; signatures, anchors and exit codes."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog, SigningKey, chain_files, verify_files
from gateway.audit._chain import encode, line_hash, order_files
from gateway.audit.cli import add_parser

N_DECISIONS = 60


def main(argv: list[str]) -> int:
    """`cube-egress ARGV` for the audit commands (the same parser gateway/cli.py builds them with)."""
    parser = argparse.ArgumentParser(prog="cube-egress")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed chain over several rotated files, with checkpoints every 10 records."""
    d = tmp_path_factory.mktemp("chain")
    with AuditLog(str(d / "audit.jsonl"), rotate_bytes=4096, checkpoint_records=10) as log:
        for i in range(N_DECISIONS):
            log.decision(sandbox="sb", n=i, path=f"/v1/items/{i}?" + "q=REDACTED&" * 3)
    assert len(chain_files(str(d / "audit.jsonl"))) >= 3
    return d


@pytest.fixture
def chain(original: Path, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(original, d)
    return d


def _files(d: Path) -> list[Path]:
    return order_files(d.glob("audit*.jsonl"))


def _pubkey(d: Path) -> Path:
    out = d.parent / "pub.pem"
    out.write_text(SigningKey.load(str(d / "audit-signing-key.pem")).public_pem())
    return out


class Lines:
    """The chain as editable lines, file by file."""

    def __init__(self, d: Path) -> None:
        self.files = _files(d)
        self.lines = [f.read_bytes().splitlines() for f in self.files]

    def find(self, seq: int) -> tuple[int, int]:
        for fi, lines in enumerate(self.lines):
            for li, line in enumerate(lines):
                if json.loads(line)["seq"] == seq:
                    return fi, li
        raise KeyError(seq)

    def record(self, seq: int) -> dict[str, Any]:
        fi, li = self.find(seq)
        return dict(json.loads(self.lines[fi][li]))

    def seqs_of(self, event: str) -> list[int]:
        return [json.loads(x)["seq"] for lines in self.lines for x in lines if json.loads(x)["event"] == event]

    def seq_of(self, event: str, nth: int = 0) -> int:
        return self.seqs_of(event)[nth]

    def decision_from(self, seq: int) -> int:
        return min(s for s in self.seqs_of("decision") if s >= seq)

    def save(self) -> None:
        for f, lines in zip(self.files, self.lines, strict=True):
            f.write_bytes(b"".join(x + b"\n" for x in lines))


def _verify(d: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    return _run_cli(["audit", "verify", "--json", "--pubkey", str(_pubkey(d)), *extra, *map(str, _files(d))])


def _run_cli(argv: list[str]) -> tuple[int, dict[str, Any]]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, json.loads(out.getvalue()) if out.getvalue().startswith("{") else {"text": out.getvalue()}


def test_an_untouched_chain_verifies(chain: Path) -> None:
    code, out = _verify(chain)
    assert code == 0 and out["ok"], out
    assert out["first_seq"] == 1 and out["closed"] and out["unsigned"] == 0 and out["signatures_checked"]
    assert out["records"] == out["last_seq"] and out["checkpoints"] >= N_DECISIONS // 10
    assert out["head"]["hash"] == line_hash(_files(chain)[-1].read_bytes().splitlines()[-1])


def _edit_field(lines: Lines, seq: int) -> int:
    fi, li = lines.find(seq)
    rec = lines.record(seq)
    rec["host"] = "innocent.example"  # still canonical JSON, just not what was recorded
    lines.lines[fi][li] = encode(rec)
    return seq


def _rehash_from(lines: Lines, seq: int) -> None:
    """What an editor without the key would do: recompute every later link (checkpoint signatures stay)."""
    flat = [(fi, li) for fi, ls in enumerate(lines.lines) for li in range(len(ls))]
    start = flat.index(lines.find(seq))
    for (pf, pl), (fi, li) in zip(flat[start:], flat[start + 1 :], strict=False):
        rec = json.loads(lines.lines[fi][li])
        rec["prev"] = hashlib.sha256(lines.lines[pf][pl]).hexdigest()
        lines.lines[fi][li] = encode(rec)


Tamper = Callable[[Lines], tuple[str, int]]


def _edited(lines: Lines) -> tuple[str, int]:
    return "edited", _edit_field(lines, lines.decision_from(20))


def _edited_in_last_checkpointed_stretch(lines: Lines) -> tuple[str, int]:
    return "edited", _edit_field(lines, lines.seq_of("checkpoint", -1) - 2)


def _edited_and_relinked(lines: Lines) -> tuple[str, int]:
    seq = _edit_field(lines, lines.decision_from(20))
    _rehash_from(lines, seq)
    return "bad_signature", min(s for s in lines.seqs_of("checkpoint") if s > seq)


def _edited_seq(lines: Lines) -> tuple[str, int]:
    fi, li = lines.find(30)
    rec = lines.record(30)
    rec["seq"] = 31
    lines.lines[fi][li] = encode(rec)
    return "edited", 30


def _deleted(lines: Lines) -> tuple[str, int]:
    fi, li = lines.find(25)
    del lines.lines[fi][li]
    return "deleted", 25


def _deleted_run(lines: Lines) -> tuple[str, int]:
    fi, li = lines.find(25)
    del lines.lines[fi][li : li + 3]
    return "deleted", 25


def _reordered(lines: Lines) -> tuple[str, int]:
    fi, li = lines.find(33)
    fj, lj = lines.find(34)
    assert fi == fj
    lines.lines[fi][li], lines.lines[fj][lj] = lines.lines[fj][lj], lines.lines[fi][li]
    return "reordered", 33


def _duplicated(lines: Lines) -> tuple[str, int]:
    fi, li = lines.find(12)
    lines.lines[fi].insert(li + 1, lines.lines[fi][li])
    return "reordered", 12


def _rotated_file_cut_short(lines: Lines) -> tuple[str, int]:
    first = lines.lines[0]
    last_seq = json.loads(first[-3])["seq"]
    del first[-2:]
    return "truncated", last_seq + 1


def _middle_file_deleted(lines: Lines) -> tuple[str, int]:
    missing = json.loads(lines.lines[1][0])["seq"]
    lines.files[1].unlink()
    del lines.files[1], lines.lines[1]
    return "truncated", missing


def _checkpoint_count_changed(lines: Lines) -> tuple[str, int]:
    seq = lines.seq_of("checkpoint", 1)
    fi, li = lines.find(seq)
    rec = lines.record(seq)
    rec["file_records"] += 1
    lines.lines[fi][li] = encode(rec)
    _rehash_from(lines, seq)
    return "edited", seq


def _not_json(lines: Lines) -> tuple[str, int]:
    fi, li = lines.find(40)
    lines.lines[fi][li] = lines.lines[fi][li][:-5] + b"#####"
    return "edited", 40


@pytest.mark.parametrize(
    "tamper",
    [
        _edited,
        _edited_in_last_checkpointed_stretch,
        _edited_and_relinked,
        _edited_seq,
        _deleted,
        _deleted_run,
        _reordered,
        _duplicated,
        _rotated_file_cut_short,
        _middle_file_deleted,
        _checkpoint_count_changed,
        _not_json,
    ],
)
def test_tampering_is_caught_and_the_first_bad_seq_named(chain: Path, tamper: Tamper) -> None:
    lines = Lines(chain)
    kind, seq = tamper(lines)
    lines.save()
    code, out = _verify(chain)
    assert code == 1 and not out["ok"], out
    assert (out["problem"]["kind"], out["problem"]["seq"]) == (kind, seq), out["problem"]
    # the text form names the same
    code, text = _run_cli(["audit", "verify", "--pubkey", str(_pubkey(chain)), *map(str, _files(chain))])
    assert code == 1 and text["text"].startswith(f"FAILED: {kind} at seq {seq}: "), text


def test_a_torn_last_line_is_reported_apart_from_tampering(chain: Path) -> None:
    last = _files(chain)[-1]
    with open(last, "ab") as f:
        f.write(b'{"event":"decision","host":"api.exa')
    code, out = _verify(chain)
    assert code == 0 and out["ok"] and out["torn_bytes"] == 35
    assert any("torn final line (35 bytes)" in n and "not tampering" in n for n in out["notes"])


def test_cutting_the_end_off_needs_an_anchor(chain: Path) -> None:
    code, before = _verify(chain)
    head = before["head"]
    lines = Lines(chain)
    del lines.lines[-1][-4:]  # the closing checkpoint and three records
    lines.save()
    unsigned = head["seq"] - 4 - max(lines.seqs_of("checkpoint"))
    code, out = _verify(chain)
    # nothing in the files themselves betrays it ...
    assert code == 0 and out["ok"] and not out["closed"] and out["unsigned"] == unsigned > 0
    assert any("are unsigned" in n for n in out["notes"])
    assert any("does not end with a clean shutdown" in n for n in out["notes"])
    # ... a head kept elsewhere does
    code, out = _verify(chain, "--anchor", f"{head['seq']}:{head['hash']}")
    assert code == 1 and out["problem"]["kind"] == "truncated" and out["problem"]["seq"] == head["seq"] - 3


def test_an_anchor_that_matches_passes_and_one_that_does_not_fails(chain: Path) -> None:
    lines = Lines(chain)
    fi, li = lines.find(15)
    good = hashlib.sha256(lines.lines[fi][li]).hexdigest()
    code, out = _verify(chain, "--anchor", f"15:{good}")
    assert code == 0 and out["anchors_checked"] == 1
    code, out = _verify(chain, "--anchor", f"15:{'0' * 64}")
    assert code == 1 and (out["problem"]["kind"], out["problem"]["seq"]) == ("edited", 15)


def test_signatures_of_another_key_fail(chain: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_text(SigningKey.load_or_create(str(tmp_path / "other-key.pem")).public_pem())
    code, out = _run_cli(["audit", "verify", "--json", "--pubkey", str(other), *map(str, _files(chain))])
    assert code == 1 and out["problem"]["kind"] == "bad_signature" and out["problem"]["seq"] == 11


def test_without_a_key_signatures_are_not_checked_and_it_says_so(chain: Path) -> None:
    (chain / "audit-signing-key.pem").unlink()
    code, out = _run_cli(["audit", "verify", "--json", *map(str, _files(chain))])
    assert code == 0 and not out["signatures_checked"] and out["key_source"] is None
    assert any("signatures were NOT checked" in n for n in out["notes"])


def test_the_key_next_to_the_files_is_used_and_named(chain: Path) -> None:
    code, out = _run_cli(["audit", "verify", "--json", *map(str, _files(chain))])
    assert code == 0 and out["signatures_checked"] and "found next to the audit files" in out["key_source"]


def test_files_verify_in_chain_order_whatever_order_they_are_given(chain: Path) -> None:
    files = _files(chain)
    report = verify_files(list(reversed(files)))
    assert report.ok and report.files == [str(f) for f in files]


def test_the_current_file_alone_verifies_and_says_where_it_starts(chain: Path) -> None:
    report = verify_files([chain / "audit.jsonl"])
    assert report.ok and report.first_seq is not None and report.first_seq > 1
    assert any("continues a file that was not given" in n for n in report.notes())


def test_bad_usage_exits_2(chain: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["audit", "verify", "--anchor", "12:abc", str(chain / "audit.jsonl")]) == 2
    assert main(["audit", "verify", "--pubkey", str(tmp_path / "nokey.pem"), str(chain / "audit.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "no such audit file" in err and "SEQ:HASH" in err and "cannot read the public key" in err


def test_pubkey_prints_the_configured_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    config = tmp_path / "gw.yaml"
    config.write_text(f"version: 1\npolicies: [p.yaml]\nstate_dir: {state}\n")
    assert main(["audit", "pubkey", "--config", str(config)]) == 2
    assert "no audit signing key yet" in capsys.readouterr().err
    key = SigningKey.load_or_create(str(state / "audit-signing-key.pem"))
    assert main(["audit", "pubkey", "--config", str(config)]) == 0
    assert capsys.readouterr().out == key.public_pem()
