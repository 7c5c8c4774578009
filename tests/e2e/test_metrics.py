"""Issue "production": /metrics scraped after real traffic through the real relay, on the XDP
path and on the Python path, moves by exactly what was relayed."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.helpers import assert_intact, run
from xdpturn.proto.addr import Family
from xdpturn_lab.testbed import Testbed
from xdpturn_lab.testbed.scenario import EndpointSpec, RelayProcess, Report, exchange, pair

pytestmark = pytest.mark.kernel

COUNT = 1_000
METRICS = "127.0.0.1:9478"  # inside the relay's namespace


def scrape(tb: Testbed, relay: str) -> dict[tuple[str, str], float]:
    """Relayed packets by (path, route), read over HTTP from inside the relay's namespace."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    text: str = tb.call(relay, fetch)
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "xdpturn_relayed_packets_total":
                out[(sample.labels["path"], sample.labels["route"])] = sample.value
    return out


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
        before = scrape(world, "relay")
        reports = run(scenario())
        after = scrape(world, "relay")
    assert_intact(*reports)
    moved = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key)}
    if fastpath:
        # Both directions are ChannelData -> ChannelData over IPv4 (packets to itself).
        assert moved == {("xdp", "ipv4_channel_to_ipv4_channel"): 2 * COUNT}
    else:
        assert moved[("python", "loopback")] == 2 * COUNT
        assert not any(path == "xdp" for path, _ in moved)
