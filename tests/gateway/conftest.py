from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.harness import RunningGateway, gateway_process, hosts_for_sandbox
from tests.support.world import UPSTREAM_IPS, World


# Module scope: a gateway (and the transparent redirect) never outlives the tests that need it, so other tests
# see the world as it is without one.
@pytest.fixture(scope="module")
def explicit_gateway(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with gateway_process(world, tmp_path_factory.mktemp("explicit"), "explicit") as gw:
        yield gw


@pytest.fixture(scope="module")
def transparent_gateway(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    # The sandbox resolves names itself in transparent mode: give it the answers a resolver would.
    hosts_for_sandbox(
        world,
        {
            "api.example.test": UPSTREAM_IPS["A"],
            "other.example.test": UPSTREAM_IPS["B"],
            "a.wild.example.test": UPSTREAM_IPS["B"],
            "wild.example.test": UPSTREAM_IPS["B"],
            "evil.example.test": UPSTREAM_IPS["evil"],
        },
    )
    with gateway_process(world, tmp_path_factory.mktemp("transparent"), "transparent") as gw:
        yield gw


@pytest.fixture(params=["explicit", "transparent"])
def gateway(request: pytest.FixtureRequest) -> RunningGateway:
    gw: RunningGateway = request.getfixturevalue(f"{request.param}_gateway")
    gw.mark()
    return gw


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
