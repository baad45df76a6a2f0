"""Fixtures for multi-host tests (tests/multihost/hosts.py): `network(hosts)` builds simulated hosts and
always tears them down, also when the test fails; skipped with the reason when namespaces cannot be made."""
from __future__ import annotations

import pytest

from tests.multihost.hosts import Network, unavailable


@pytest.fixture
def network(tmp_path):
    """`network({"head": [], "gen1": [dirs gen1 must not see]})` -> a Network; closed at teardown."""
    why = unavailable()
    if why:
        pytest.skip(why)
    made: list[Network] = []

    def make(hosts: dict[str, list]) -> Network:
        net = Network(tmp_path / f"net{len(made)}", hosts)
        made.append(net)
        return net
    yield make
    for net in made:
        net.close()
