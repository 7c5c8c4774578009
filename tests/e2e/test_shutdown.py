"""A relay holding thousands of allocations, each with a permission and a channel in the fast
path, stops at once on SIGINT and detaches its program. Closing them used to cost time quadratic
in their number (the guard searched every client at each close): 10,000 took about 30 s, past
the bench's bound, and the relay was killed with its program still attached."""

from __future__ import annotations

import os
import signal

import pytest

from xdpturn.proto.addr import TransportAddr
from xdpturn_lab.bench import cpdriver, tools
from xdpturn_lab.testbed import Testbed
from xdpturn_lab.testbed.scenario import INTERNET_HOST_IPV4, RelayProcess

pytestmark = pytest.mark.kernel

ALLOCATIONS = int(os.environ.get("XDPTURN_SHUTDOWN_ALLOCATIONS", "8000"))
PORTS = "40000-59999"  # room for them all (the testbed's own range holds 4,000)
WINDOW = 64
DRIVE_TIMEOUT = 120.0  # bounded even at 50 sequences per second
STOP_BOUND = 10.0  # seconds from SIGINT to "stopped": a hang, not a speed, is what fails here


def test_sigint_with_thousands_of_channels_stops_and_detaches(world: Testbed) -> None:
    # Every client comes from the client site's one NAT address: no rate limit on its STUN.
    no_limits = ["--stun-rate-per-source", "0", "--unauthenticated-rate", "0", "--ports", PORTS]
    with RelayProcess(world, "relay", fastpath=True, extra_args=no_limits) as relay:
        assert relay.fastpath_mode != "off"
        peer = TransportAddr.parse(f"{INTERNET_HOST_IPV4}:9")  # never sent to: channels only
        args = cpdriver.driver_args(relay.server(), peer, relay.secret, 0, ALLOCATIONS, WINDOW)
        prefix = tools.netns_prefix(world.netns_of(world.site("client")))
        with cpdriver.DriverProcess(prefix, args, DRIVE_TIMEOUT) as driver:
            driver.wait_ready()
            driver.go()
            result = driver.result()
            assert (result["succeeded"], result["failed"]) == (ALLOCATIONS, 0), result
            os.kill(relay.pid, signal.SIGINT)
            relay.wait_for("stopped", timeout=STOP_BOUND)
    # Leaving the block asserted that no XDP program is left on the relay's interface.
