"""Issue "testbed": Client and Gateway, each behind its own masquerading NAT, relay to each other.

On one relay, each binds a channel to the other's relayed address, so the relay must send packets
to itself (the hairpin): in XDP a ChannelData -> ChannelData route, in Python a UDP datagram from
one allocation to another. The clients' transport families pick the XDP route (e.g. a Client over
IPv6 and a Gateway over IPv4 use ipv6_channel_to_ipv4_channel one way and
ipv4_channel_to_ipv6_channel the other); the relayed addresses' family is the hairpin's family.
Also: two relays (UDP between them), and a relay behind 1:1 NAT (public address not on its
interface). 10,000 numbered datagrams each way, windowed, must all arrive intact and in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.e2e.helpers import (
    MAX_STACK_DATAGRAMS,
    assert_intact,
    assert_not_a_router,
    assert_seen_through_nat,
    channel_route,
    counters_note,
    misses,
    route_deltas,
    run,
    udp_errors,
    udp_in,
    udp_route,
)
from xdpturn.fastpath import FastPathCounters
from xdpturn.proto.addr import Family
from xdpturn_lab.testbed import Testbed
from xdpturn_lab.testbed.scenario import (
    EndpointSpec,
    RelayProcess,
    Report,
    exchange,
    pair,
)

pytestmark = pytest.mark.kernel

COUNT = 10_000
V4, V6 = Family.IPV4, Family.IPV6
SITES = ("client", "gateway")


@dataclass(frozen=True)
class Case:
    client: Family  # transport to the relay
    gateway: Family
    relayed: Family  # the relayed addresses the channels are bound to
    dual_stack: bool = False  # allocate IPv4 + IPv6 on both sides


CASES = {
    "v4-v4": Case(V4, V4, V4),
    "v6-v6": Case(V6, V6, V6),
    "client-v6-gateway-v4": Case(V6, V4, V4),
    "client-v4-gateway-v6": Case(V4, V6, V6, dual_stack=True),
}


def spec(
    tb: Testbed, relay: RelayProcess, site: str, transport: Family, case: Case
) -> EndpointSpec:
    if case.dual_stack:
        return EndpointSpec(
            tb,
            site,
            relay.server(transport),
            family=V4,
            additional_family=V6,
            peer_family=case.relayed,
        )
    return EndpointSpec(tb, site, relay.server(transport), family=case.relayed)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_client_and_gateway_on_the_same_relay(world: Testbed, fastpath: bool, case: Case) -> None:
    errors_before = {site: udp_errors(world, site) for site in SITES}
    stack = [0]  # datagrams that reached the relay's UDP stack during the exchange
    with RelayProcess(world, "relay", fastpath=fastpath) as relay:

        async def scenario() -> tuple[Report, Report, FastPathCounters, FastPathCounters]:
            async with pair(
                spec(world, relay, "client", case.client, case),
                spec(world, relay, "gateway", case.gateway, case),
            ) as (client, gateway):
                assert_seen_through_nat(world, relay, client, case.client)
                assert_seen_through_nat(world, relay, gateway, case.gateway)
                if case.dual_stack:
                    assert {a.family for a in client.relayed} == {V4, V6}
                # The peers are the relay itself, at its public address.
                assert client.peer is not None and gateway.peer is not None
                public = relay.server(case.relayed).ip
                assert client.peer.ip == gateway.peer.ip == public
                before = relay.counters()
                stack_before = udp_in(world, "relay")
                to_gateway, to_client = await exchange(client, gateway, COUNT)
                assert_not_a_router(world, "relay")
                stack[0] = udp_in(world, "relay") - stack_before
                return to_gateway, to_client, before, relay.counters()

        to_gateway, to_client, before, after = run(scenario())
    assert_intact(to_gateway, to_client, note=counters_note(before, after))
    assert {site: udp_errors(world, site) for site in SITES} == errors_before
    if fastpath:
        expected: dict[str, int] = {}
        for src, dst in ((case.client, case.gateway), (case.gateway, case.client)):
            route = channel_route(src, dst)
            expected[route] = expected.get(route, 0) + COUNT
        assert route_deltas(before, after) == expected
        assert misses(before, after) == {}
        assert stack[0] <= MAX_STACK_DATAGRAMS
    else:
        assert after == before == FastPathCounters()
        assert stack[0] >= 2 * COUNT


def test_client_and_gateway_on_two_relays(world: Testbed, fastpath: bool) -> None:
    """Relay A's allocation sends UDP to relay B's and back: channel -> UDP on one relay,
    UDP -> channel on the other."""
    with (
        RelayProcess(world, "relay", fastpath=fastpath) as a,
        RelayProcess(world, "other", fastpath=fastpath) as b,
    ):

        async def scenario() -> tuple[Report, Report, list[FastPathCounters]]:
            async with pair(
                EndpointSpec(world, "client", a.server(V4)),
                EndpointSpec(world, "gateway", b.server(V4)),
            ) as (client, gateway):
                assert client.peer == gateway.relayed_of(V4)
                assert client.peer is not None and client.peer.ip == b.relay.public_ipv4
                before = [a.counters(), b.counters()]
                to_gateway, to_client = await exchange(client, gateway, COUNT)
                return to_gateway, to_client, [*before, a.counters(), b.counters()]

        to_gateway, to_client, (a0, b0, a1, b1) = run(scenario())
    assert_intact(to_gateway, to_client, note=counters_note(a0, a1) + counters_note(b0, b1))
    if fastpath:
        one_way = {channel_route(V4, V4, "udp"): COUNT, udp_route(V4, V4): COUNT}
        assert route_deltas(a0, a1) == one_way
        assert route_deltas(b0, b1) == one_way
        assert misses(a0, a1) == misses(b0, b1) == {}


@pytest.mark.parametrize("family", [V4, V6], ids=["v4", "v6"])
def test_relay_behind_one_to_one_nat_loops_to_itself(
    world: Testbed, fastpath: bool, family: Family
) -> None:
    """The relay's public address is not on its interface: XDP must still recognise packets to
    its own public address (config public vs local) and take the hairpin route."""
    node = world.relay("cloud")
    assert node.public_ipv4 != node.local_ipv4 and node.public_ipv6 != node.local_ipv6
    with RelayProcess(world, node, fastpath=fastpath) as relay:

        async def scenario() -> tuple[Report, Report, FastPathCounters, FastPathCounters]:
            async with pair(
                EndpointSpec(world, "client", relay.server(family), family=family),
                EndpointSpec(world, "gateway", relay.server(family), family=family),
            ) as (client, gateway):
                public = node.public_ipv4 if family is V4 else node.public_ipv6
                assert client.relayed_of(family).ip == public
                assert gateway.relayed_of(family).ip == public
                assert_seen_through_nat(world, relay, client, family)
                before = relay.counters()
                to_gateway, to_client = await exchange(client, gateway, COUNT)
                return to_gateway, to_client, before, relay.counters()

        to_gateway, to_client, before, after = run(scenario())
    assert_intact(to_gateway, to_client, note=counters_note(before, after))
    if fastpath:
        assert route_deltas(before, after) == {channel_route(family, family): 2 * COUNT}
        assert misses(before, after) == {}
