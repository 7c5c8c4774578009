"""Issue "production": /metrics scraped after real traffic through the real relay, on the XDP
path and on the Python path, moves by exactly what was relayed."""

from __future__ import annotations

import pytest

from tests.e2e.helpers import METRICS, assert_intact, relayed_packets, run
from xdpturn.proto.addr import Family
from xdpturn_lab.testbed import Testbed
from xdpturn_lab.testbed.scenario import EndpointSpec, RelayProcess, Report, exchange, pair

pytestmark = pytest.mark.kernel

COUNT = 1_000


def test_relayed_packets_metrics_follow_the_path_taken(world: Testbed, fastpath: bool) -> None:
    with RelayProcess(
        world, "relay", fastpath=fastpath, extra_args=["--metrics", METRICS]
    ) as relay:

        async def scenario() -> tuple[Report, Report]:
            async with pair(
                EndpointSpec(world, "client", relay.server(Family.IPV4)),
                EndpointSpec(world, "gateway", relay.server(Family.IPV4)),
            ) as (client, gateway):
                return await exchange(client, gateway, COUNT)

        relay.wait_for("metrics listening")
        before = relayed_packets(world, "relay")
        reports = run(scenario())
        after = relayed_packets(world, "relay")
    assert_intact(*reports)
    moved = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key)}
    if fastpath:
        # Both directions are ChannelData -> ChannelData over IPv4 (packets to itself).
        assert moved == {("xdp", "ipv4_channel_to_ipv4_channel"): 2 * COUNT}
    else:
        assert moved[("python", "loopback")] == 2 * COUNT
        assert not any(path == "xdp" for path, _ in moved)
