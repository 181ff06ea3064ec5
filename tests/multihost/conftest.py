"""The multihost tier: "hosts" are network namespaces joined by veth pairs (tests/netns.py). Root only; skipped,
saying why, where namespaces cannot be made. Every module marks its tests slow; select the tier with
``-m multihost``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest

from tests.netns import Network, unavailable


@pytest.fixture
def network() -> Iterator[Callable[[Sequence[str]], Network]]:
    """Makes a network of the named hosts (addresses 10.213.77.1, .2, ... in order); all deleted after the test."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    made: list[Network] = []

    def make(names: Sequence[str]) -> Network:
        try:
            net = Network(names)
        except RuntimeError as exc:
            pytest.skip(f"network namespaces cannot be made here: {exc}")
        made.append(net)
        return net

    try:
        yield make
    finally:
        for net in made:
            net.close()
