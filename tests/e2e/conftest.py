"""One testbed for the whole e2e suite: three relays (one behind 1:1 NAT) and two sites behind
masquerading NATs. Each test starts its own `xdpturn serve`; the namespaces go when the session
ends, also after failures (the Testbed context manager)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.helpers import assert_not_a_router
from xdpturn_lab.testbed import Relay, Site, Testbed, Topology
from xdpturn_lab.testbed.scenario import add_internet_host, xdp_attached

TOPOLOGY = Topology(
    relays=[Relay("relay"), Relay("other"), Relay("cloud", nat_1to1=True)],
    sites=[Site("client"), Site("gateway")],
)


@pytest.fixture(scope="session")
def world() -> Iterator[Testbed]:
    with Testbed(TOPOLOGY) as tb:
        add_internet_host(tb)
        yield tb


@pytest.fixture(autouse=True)
def _no_program_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, detach any XDP program a failed test left on a relay, so the next test's
    relay can attach its own (it never replaces a program) and failures do not cascade. Before
    and after, every relay namespace is a host, not a router: all forwarding sysctls 0."""
    tb: Testbed | None = (
        request.getfixturevalue("world") if "world" in request.fixturenames else None
    )
    if tb is not None:
        for relay in tb.relays:
            assert_not_a_router(tb, relay.name)
    yield
    if tb is None:
        return
    for relay in tb.relays:
        assert_not_a_router(tb, relay.name)
    for relay in tb.relays:
        if xdp_attached(tb, relay, relay.interface):
            subprocess.run(
                ["ip", "-n", relay.netns, "link", "set", "dev", relay.interface, "xdp", "off"],
                check=False,
            )


@pytest.fixture(params=[True, False], ids=["xdp", "python"])
def fastpath(request: pytest.FixtureRequest) -> bool:
    """Each e2e test runs with the XDP fast path on, then with Python relaying everything."""
    on: bool = request.param
    return on
