"""Our TurnClient against the real runtime on loopback: relaying both ways in every family mix,
and two allocations of the same relay reaching each other (packets to itself)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from tests.server.helpers import behind_nat_config, recv, rest_credentials, run, sockaddr, udp
from xdpturn.client import TurnClient, TurnClientError
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.stats import Route
from xdpturn.server import RelayServer

TIMEOUT = 5.0


CASES = {
    "ipv4": ("127.0.0.1", Family.IPV4, "127.0.0.1"),
    "ipv6": ("::1", Family.IPV6, "::1"),
    "ipv6-client-to-ipv4-peer": ("::1", Family.IPV4, "127.0.0.1"),
    "ipv4-client-to-ipv6-peer": ("127.0.0.1", Family.IPV6, "::1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_client_relays_to_a_udp_peer_both_ways(case: str) -> None:
    client_host, family, peer_host = CASES[case]
    config = behind_nat_config()

    async def main() -> None:
        async with RelayServer(config) as server:
            listen = next(a for a in server.listen_addresses if str(a.ip) == client_host)
            username, password = rest_credentials()
            with udp(peer_host) as peer_sock:
                peer_host_port = peer_sock.getsockname()[:2]
                peer = TransportAddr(ipaddress.ip_address(peer_host_port[0]), peer_host_port[1])
                async with await TurnClient.connect(listen, username, password) as client:
                    (relayed,) = await client.allocate(family=family)
                    inside = TransportAddr(ipaddress.ip_address(peer_host), relayed.port)
                    await client.create_permission(peer)
                    client.send(peer, b"indication out")
                    assert await recv(peer_sock) == (b"indication out", inside)
                    peer_sock.sendto(b"indication in", sockaddr(inside))
                    assert await asyncio.wait_for(client.recv(), TIMEOUT) == (
                        peer,
                        b"indication in",
                    )
                    await client.bind_channel(peer)
                    for i in range(50):
                        client.send(peer, b"channel out %d" % i)
                        assert await recv(peer_sock) == (b"channel out %d" % i, inside)
                        peer_sock.sendto(b"channel in %d" % i, sockaddr(inside))
                        got = await asyncio.wait_for(client.recv(), TIMEOUT)
                        assert got == (peer, b"channel in %d" % i)
                    assert server.core.stats.relayed[Route.PEER_TO_CLIENT].packets == 51

    run(main(), "uvloop")


@pytest.mark.parametrize("mode", ["channel", "indication"])
@pytest.mark.parametrize("family", [Family.IPV4, Family.IPV6])
def test_two_allocations_reach_each_other_through_the_relay_itself(
    mode: str, family: Family
) -> None:
    config = behind_nat_config()

    async def main() -> None:
        async with RelayServer(config) as server:
            listen_v4, listen_v6 = server.listen_addresses
            username, password = rest_credentials()
            # One client over IPv4, the other over IPv6: the relay loops between them.
            async with (
                await TurnClient.connect(listen_v4, username, password) as a,
                await TurnClient.connect(listen_v6, username, password) as b,
            ):
                (relayed_a,) = await a.allocate(family=family)
                (relayed_b,) = await b.allocate(family=family)
                await a.create_permission(relayed_b)
                await b.create_permission(relayed_a)
                if mode == "channel":
                    await a.bind_channel(relayed_b)
                    await b.bind_channel(relayed_a)
                for i in range(100):
                    a.send(relayed_b, b"a->b %d" % i)
                    assert await asyncio.wait_for(b.recv(), TIMEOUT) == (relayed_a, b"a->b %d" % i)
                    b.send(relayed_a, b"b->a %d" % i)
                    assert await asyncio.wait_for(a.recv(), TIMEOUT) == (relayed_b, b"b->a %d" % i)
                stats = server.core.stats
                assert stats.relayed[Route.LOOPBACK].packets == 200
                assert stats.relayed[Route.CLIENT_TO_PEER].packets == 0  # nothing left a socket

    run(main(), "uvloop")


@pytest.mark.parametrize(
    "peer_host",
    # Loopback is allowed in this set-up, but not these: --deny-peer, and the relay's own
    # public addresses in another spelling (NAT64 and 6to4 of PUBLIC_V4, 203.0.113.1).
    ["127.0.0.3", "64:ff9b::cb00:7101", "2002:cb00:7101::1"],
)
def test_the_runtime_refuses_denied_peers_with_403(peer_host: str) -> None:
    config = behind_nat_config(deny_peers=[ipaddress.ip_network("127.0.0.3/32")])

    async def main() -> None:
        async with RelayServer(config) as server:
            listen = server.listen_addresses[0]
            username, password = rest_credentials()
            async with await TurnClient.connect(listen, username, password) as client:
                family = Family.IPV6 if ":" in peer_host else Family.IPV4
                await client.allocate(family=family)
                peer = TransportAddr(ipaddress.ip_address(peer_host), 4000)
                with pytest.raises(TurnClientError) as refused:
                    await client.create_permission(peer)
                assert refused.value.code == 403
                await client.create_permission(
                    TransportAddr(
                        ipaddress.ip_address("127.0.0.2" if family is Family.IPV4 else "::1"), 4000
                    )
                )

    run(main(), "uvloop")
