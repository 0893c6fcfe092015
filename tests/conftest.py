"""Shared fixtures. The hermetic network world (tests/support/world.py) is session-scoped and built on first use."""

from __future__ import annotations

from tests.support.world import world  # noqa: F401  (session-scoped fixture)
