"""Reservations across workers, the runtime's part, in one process: two RelayServers as two
workers would run them (each with its own listener, so a test chooses which one a client
reaches), their reservation channels joined by the supervisor's router."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from xdpturn.client import TurnClient, TurnClientError
from xdpturn.client.turn import ClientOptions
from xdpturn.config import ServeConfig
from xdpturn.fastpath import NullFastPath
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.server import FETCH_TIMEOUT
from xdpturn.server import RelayServer
from xdpturn.server.reservations import ReservationChannel, ReservationRouter, channel_pair
from xdpturn.server.sockets import RelaySockets, open_udp_socket
from xdpturn.server.workers import LivePorts, make_core_factory

from .helpers import (
    TIMEOUT,
    behind_nat_config,
    local,
    recv,
    rest_credentials,
    run,
    sockaddr,
    udp,
)

NONCE_KEY = b"k" * 16
OPTIONS = ClientOptions(reliable_timeout=TIMEOUT)


class Relay:
    """Two workers' runtimes and the router between them."""

    def __init__(
        self,
        servers: list[RelayServer],
        supervisor_ends: list[socket.socket],
        worker_ends: list[socket.socket],
    ) -> None:
        self.servers = servers
        self.supervisor_ends = supervisor_ends
        self.worker_ends = worker_ends  # read by the workers' channels

    async def client(self, worker: int) -> TurnClient:
        username, password = rest_credentials("reserve")
        server = self.servers[worker].listen_addresses[0]
        return await TurnClient.connect(server, username, password, options=OPTIONS)


@asynccontextmanager
async def two_workers(*, serving: tuple[int, ...] = (0, 1)) -> AsyncIterator[Relay]:
    """Workers 0 and 1; only those in `serving` answer their reservation channel."""
    config: ServeConfig = behind_nat_config(listen=[TransportAddr.parse("127.0.0.1:0")])
    live = LivePorts()
    servers: list[RelayServer] = []
    channels: list[ReservationChannel] = []
    ends: list[socket.socket] = []
    worker_ends: list[socket.socket] = []
    for index in range(2):
        supervisor_end, worker_end = channel_pair()
        worker_ends.append(worker_end)
        channel = ReservationChannel(worker_end)
        server = RelayServer(
            config,
            core_factory=make_core_factory(config, index, NONCE_KEY, live, None),
            fastpath=NullFastPath(),
            reservations=channel,
        )
        await server.start()
        if index in serving:
            channel.start(server)
        servers.append(server)
        channels.append(channel)
        ends.append(supervisor_end)
    router = ReservationRouter(ends)
    router.start()
    try:
        yield Relay(servers, ends, worker_ends)
    finally:
        router.close()
        for server, channel in zip(servers, channels, strict=True):
            channel.close()
            await server.stop()


async def reserve(relay: Relay, worker: int) -> tuple[TurnClient, TransportAddr, bytes]:
    rtp = await relay.client(worker)
    (relayed,) = await rtp.allocate(even_port=True, reserve_next=True)
    assert rtp.reservation_token is not None and relayed.port % 2 == 0
    return rtp, relayed, rtp.reservation_token


def test_a_reservation_moves_with_its_sockets_to_the_worker_its_token_reached() -> None:
    async def main() -> None:
        async with two_workers() as relay:
            maker, taker = relay.servers
            rtp, rtp_relayed, token = await reserve(relay, 0)
            assert token[:2] == b"\x00\x00"
            assert maker.relay_port_count == 2  # the RTP port and the reserved one
            async with rtp, await relay.client(1) as rtcp:
                (relayed,) = await rtcp.allocate(reservation_token=token)
                assert relayed.port == rtp_relayed.port + 1
                assert maker.relay_port_count == 1 and taker.relay_port_count == 1
                assert [a.relay_port for a in taker.allocations()] == [relayed.port]
                # The socket the maker opened now relays for the taker, both ways.
                with udp() as peer_sock:
                    peer = local(peer_sock)
                    inside = TransportAddr(peer.ip, relayed.port)
                    await rtcp.bind_channel(peer)
                    rtcp.send(peer, b"rtcp out")
                    assert await recv(peer_sock) == (b"rtcp out", inside)
                    peer_sock.sendto(b"rtcp in", sockaddr(inside))
                    assert await asyncio.wait_for(rtcp.recv(), TIMEOUT) == (peer, b"rtcp in")
                # Single use: refused on the worker that made it and on the one that took it.
                for worker in (0, 1):
                    async with await relay.client(worker) as late:
                        with pytest.raises(TurnClientError) as refused:
                            await late.allocate(reservation_token=token)
                        assert refused.value.code == 508
            assert maker.relay_port_count == taker.relay_port_count == 0

    run(main())


def test_a_reservation_not_on_the_worker_its_token_names_is_still_found() -> None:
    # As after a restart that dealt the saved reservations out round the workers anew: worker 1
    # holds a token of worker 0's, and the router was never told.
    async def main() -> None:
        async with two_workers() as relay:
            maker, holder = relay.servers
            rtp, rtp_relayed, token = await reserve(relay, 0)
            given = maker.give_up_reservation(token)
            assert given is not None
            holder.reservation_fetched(token, *given)
            async with rtp, await relay.client(0) as rtcp:
                (relayed,) = await rtcp.allocate(reservation_token=token)
                assert relayed.port == rtp_relayed.port + 1
                assert [a.relay_port for a in maker.allocations()] == [
                    rtp_relayed.port,
                    relayed.port,
                ]

    run(main())


def test_a_token_naming_no_worker_is_508_at_once() -> None:
    async def main() -> None:
        async with two_workers() as relay, await relay.client(1) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TurnClientError) as refused:
                await client.allocate(reservation_token=b"\x00\x07" + bytes(6))
            assert refused.value.code == 508
            assert loop.time() - started < FETCH_TIMEOUT  # the router said so, no waiting

    run(main())


def test_a_worker_that_does_not_answer_costs_the_allocate_a_second_then_508() -> None:
    async def main() -> None:
        async with two_workers(serving=(1,)) as relay:
            rtp, _, token = await reserve(relay, 0)
            async with rtp, await relay.client(1) as rtcp:
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(TurnClientError) as refused:
                    await rtcp.allocate(reservation_token=token)
                assert refused.value.code == 508
                assert loop.time() - started >= FETCH_TIMEOUT
                assert relay.servers[0].relay_port_count == 2  # never given up: held there

    run(main())


def test_the_router_survives_malformed_messages() -> None:
    async def main() -> None:
        async with two_workers() as relay:
            # What a peer with a bug might send, both ways: each is logged and dropped.
            junk = [b"not json", b"[]", json.dumps({"op": "fetch"}).encode()]
            junk += [json.dumps({"op": "steal", "token": "00" * 8}).encode()]
            for message in junk:
                relay.worker_ends[1].send(message)  # to the router
                relay.supervisor_ends[1].send(message)  # to worker 1
            rtp, rtp_relayed, token = await reserve(relay, 0)
            async with rtp, await relay.client(1) as rtcp:
                (relayed,) = await rtcp.allocate(reservation_token=token)
                assert relayed.port == rtp_relayed.port + 1

    run(main())


def test_relay_sockets_take_only_sockets_of_their_address_and_port() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        bind = {Family.IPV4: TransportAddr.parse("127.0.0.1:0").ip}
        received: list[tuple[bytes, int]] = []
        mine = RelaySockets(
            loop, bind, lambda s, port, f: received.append((s.recv(100), port)), 1 << 16
        )
        theirs = RelaySockets(loop, bind, lambda s, port, f: None, 1 << 16)
        port = next(p for p in range(20000, 20100) if theirs.open(p, frozenset({Family.IPV4})))
        socks = theirs.detach(port)
        assert len(theirs) == 0 and set(socks) == {Family.IPV4}
        assert not mine.adopt(port + 1, socks)  # bound to another port
        with open_udp_socket(TransportAddr.parse("[::1]:0"), 1 << 16) as v6:
            assert not mine.adopt(port, {Family.IPV4: v6})  # of the other family
        assert mine.adopt(port, socks)
        assert not mine.adopt(port, socks)  # open here already
        with udp() as sender:
            sender.sendto(b"x", ("127.0.0.1", port))
            async with asyncio.timeout(TIMEOUT):
                while not received:
                    await asyncio.sleep(0.01)
        assert received == [(b"x", port)]
        mine.close_all()

    run(main())
