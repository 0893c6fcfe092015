from __future__ import annotations

import json
import logging
import pickle

import pytest

from gateway.secrets import SecretBundle, SecretValue

SECRET = "sk-unit-0123456789abcdef"


def test_secret_value_never_prints_itself(caplog: pytest.LogCaptureFixture) -> None:
    v = SecretValue(SECRET, "openai/api-key")
    rendered = [
        repr(v),
        str(v),
        f"{v}",
        f"{v!r}",
        "%s" % v,  # noqa: UP031 (the old-style formatting a logger uses)
        repr([v]),
        repr({"k": v}),
        repr(SecretBundle("b", {"f": v})),
    ]
    logging.getLogger("t").warning("value %s", v)
    for text in [*rendered, caplog.text]:
        assert SECRET not in text
        assert "openai/api-key" in text or "fields=" in text
    with pytest.raises(TypeError):
        pickle.dumps(v)
    with pytest.raises(TypeError):
        json.dumps(v)
    try:
        raise ValueError(f"bad credential {v}")
    except ValueError as e:
        assert SECRET not in str(e)
    assert v.reveal() == SECRET


def test_fingerprint_is_keyed_and_stable() -> None:
    v = SecretValue(SECRET, "n")
    assert v.fingerprint(b"k1") == SecretValue(SECRET, "other").fingerprint(b"k1")
    assert v.fingerprint(b"k1") != v.fingerprint(b"k2")
    assert SECRET not in v.fingerprint(b"k1") and len(v.fingerprint(b"k1")) == 32


def test_bundle_single_field_rules() -> None:
    one = SecretBundle("x", {"token": SecretValue("a" * 10, "x#token")})
    assert one.single(None).reveal() == "a" * 10
    two = SecretBundle("y", {"value": SecretValue("v" * 10, "y#value"), "other": SecretValue("o" * 10, "y#other")})
    assert two.single(None).reveal() == "v" * 10 and two.single("other").reveal() == "o" * 10
