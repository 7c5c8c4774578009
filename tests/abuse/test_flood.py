"""Issue 12: a junk flood at the highest rate one sending process reaches (random bytes;
truncated and bit-flipped STUN; ChannelData with random channel numbers and lying lengths;
65 KB datagrams) does not take the relay from a client that holds an allocation, with the fast
path on and off. The client echoes through a channel at 500/s beside the flood: its loss stays
at or below 1%, its median round trip within a few milliseconds of the quiet one, and the
relay's memory stays flat. `xdpturn-lab flood` prints the same measurement (and coturn's)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from xdpturn_lab.bench import flood, tools
from xdpturn_lab.bench.suite.relays import raise_fd_limit
from xdpturn_lab.testbed import Testbed

pytestmark = pytest.mark.kernel

FLOOD_S = 3.0
MAX_LOSS = 0.01
MAX_RTT_INCREASE_MS = 3.0
MAX_RSS_GROWTH = 4 * 2**20


@pytest.fixture(scope="module")
def hosts() -> Iterator[flood.Hosts]:
    tools.build()
    raise_fd_limit()
    with Testbed(flood.TOPOLOGY) as tb:
        yield flood.Hosts.of(tb)


@pytest.mark.parametrize("relay_name", ["xdp", "python"])
def test_a_client_with_an_allocation_rides_out_a_junk_flood(
    hosts: flood.Hosts, relay_name: str
) -> None:
    relay = flood.make_relay(relay_name, hosts.tb)
    relay.start()
    try:
        result = asyncio.run(asyncio.wait_for(flood.measure(hosts, relay, duration=FLOOD_S), 60))
    finally:
        relay.stop()
    note = result.row()
    assert result.junk.sent > 0 and result.quiet.lost == 0, note
    assert result.loss <= MAX_LOSS, note
    assert result.rtt_ms("flooded") <= result.rtt_ms("quiet") + MAX_RTT_INCREASE_MS, note
    assert result.rss_after - result.rss_before <= MAX_RSS_GROWTH, note
    if relay_name == "xdp":
        # The junk ended in XDP: what reached the stack was fragments (the 65 KB datagrams,
        # which only the stack can reassemble) and STUN within the rate limits.
        dropped = sum(result.xdp_drops.values())
        passed = result.xdp_passes.get("stun", 0) + result.xdp_passes.get("no_channel", 0)
        assert dropped > 0 and passed <= dropped // 10, (note, result.xdp_drops, result.xdp_passes)
