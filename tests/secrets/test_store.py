"""The store over the real file backend: caching, refresh, and failing closed when the backend goes away."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gateway.policies import SecretRef
from gateway.secrets import FileBackend, SecretNotFound, SecretStore, SecretUnavailable


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_reads_are_cached_until_refresh(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("api/key: first-value-123\naws/bench: {access_key_id: AKIDEXAMPLE, secret_access_key: sk-1234567}\n")

    async def main() -> None:
        store = SecretStore(FileBackend(str(f)), cache_ttl_s=60)
        ref = SecretRef.parse("api/key")
        assert (await store.get(ref, "sb")).single(None).reveal() == "first-value-123"
        for _ in range(50):
            await store.get(ref, "sb")
        assert store.stats.backend_reads == 1 and store.stats.cache_hits == 50
        bundle = await store.get(SecretRef.parse("aws/bench"), "sb")
        assert sorted(bundle) == ["access_key_id", "secret_access_key"]
        field = await store.get(SecretRef.parse("aws/bench#access_key_id"), "sb")
        assert field.single(None).reveal() == "AKIDEXAMPLE"
        with pytest.raises(SecretNotFound):
            await store.get(SecretRef.parse("nope"), "sb")

    run(main())


def test_background_refresh_then_fail_closed_after_ttl_and_recovery(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("api/key: first-value-123\n")

    async def main() -> None:
        store = SecretStore(FileBackend(str(f)), cache_ttl_s=1.0, refresh_ahead=0.5, tick_s=0.05)
        store.start()
        ref = SecretRef.parse("api/key")
        assert (await store.get(ref, "sb")).single(None).reveal() == "first-value-123"
        f.write_text("api/key: second-value-456\n")
        os.utime(f, (1, 1))  # make sure the change is seen even within one mtime tick
        await asyncio.sleep(0.8)
        # Refreshed in the background: the request path did not have to ask.
        reads = store.stats.backend_reads
        assert (await store.get(ref, "sb")).single(None).reveal() == "second-value-456"
        assert store.stats.backend_reads == reads
        # The backend disappears: the cached value serves until its TTL, then the request fails closed.
        f.unlink()
        assert (await store.get(ref, "sb")).single(None).reveal() == "second-value-456"
        await asyncio.sleep(1.2)
        with pytest.raises(SecretUnavailable):
            await store.get(ref, "sb")
        # Meanwhile, requests fail at once instead of each waiting on the backend ...
        reads = store.stats.backend_reads
        with pytest.raises(SecretUnavailable):
            await store.get(ref, "sb")
        assert store.stats.backend_reads == reads
        # ... and service comes back by itself once the backend does.
        f.write_text("api/key: third-value-789\n")
        await asyncio.sleep(store.outage_backoff_s)
        assert (await store.get(ref, "sb")).single(None).reveal() == "third-value-789"
        await store.close()

    run(main())


def test_error_messages_do_not_quote_the_file(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("api/key: [unclosed secret-value-abc\n")

    async def main() -> None:
        store = SecretStore(FileBackend(str(f)))
        with pytest.raises(SecretUnavailable) as e:
            await store.get(SecretRef.parse("api/key"), "sb")
        assert "secret-value-abc" not in str(e.value)

    run(main())


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("a/b", SecretRef("a/b")),
        ("a/b#f", SecretRef("a/b", "f")),
        ("dynamic:database/creds/app", SecretRef("database/creds/app", None, True)),
    ],
)
def test_secret_ref_parse(text: str, ref: SecretRef) -> None:
    assert SecretRef.parse(text) == ref
    assert str(ref) == text


@pytest.mark.parametrize("bad", ["", "#f", "dynamic:x#f"])
def test_secret_ref_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        SecretRef.parse(bad)
