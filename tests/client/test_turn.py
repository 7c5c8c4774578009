"""TurnClient against an in-memory scripted server: auth, retransmission, errors, data paths."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.client.fake_server import (
    CLIENT,
    RELAYED,
    SERVER,
    FakeOpener,
    FakeServer,
    channel_of,
    data_indication,
)
from xdpturn.client.turn import ClientOptions, TurnClient, TurnClientError
from xdpturn.proto import stun
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.channel_data import encode_channel_data, is_channel_data
from xdpturn.proto.stun import AttrType, MessageClass, Method

PEER = TransportAddr.parse("203.0.113.5:7000")
FAST = ClientOptions(rto=0.01, max_transmissions=3, final_wait_factor=4)

Scenario = Callable[[TurnClient, FakeServer, FakeOpener], Awaitable[None]]


def run(scenario: Scenario, server: FakeServer | None = None, password: str = "secret") -> None:
    fake = server or FakeServer()
    opener = FakeOpener(fake)

    async def main() -> None:
        client = await TurnClient.connect(SERVER, "alice", password, options=FAST, opener=opener)
        try:
            await scenario(client, fake, opener)
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_allocate_challenge_then_authenticated() -> None:
    async def scenario(client: TurnClient, server: FakeServer, _: FakeOpener) -> None:
        assert await client.allocate() == [RELAYED]
        assert client.mapped == CLIENT
        assert client.lifetime == 600
        first, second = server.requests
        assert first.get(AttrType.MESSAGE_INTEGRITY) is None
        assert first.get(AttrType.REQUESTED_TRANSPORT) == b"\x11\0\0\0"
        assert first.get(AttrType.REQUESTED_ADDRESS_FAMILY) is None  # IPv4 is the default
        assert stun.decode_text(second.get(AttrType.USERNAME) or b"") == "alice"
        assert stun.decode_text(second.get(AttrType.REALM) or b"") == "example.org"
        assert stun.decode_text(second.get(AttrType.NONCE) or b"") == "nonce-1"
        assert first.transaction_id != second.transaction_id
        assert client.last_error is None

    run(scenario)


def test_allocate_families() -> None:
    async def scenario(client: TurnClient, server: FakeServer, _: FakeOpener) -> None:
        await client.allocate(Family.IPV6, lifetime=300)
        request = server.requests[-1]
        assert request.get(AttrType.REQUESTED_ADDRESS_FAMILY) == b"\x02\0\0\0"
        assert stun.decode_u32(request.get(AttrType.LIFETIME) or b"") == 300
        await client.allocate(Family.IPV4, additional_family=Family.IPV6)
        request = server.requests[-1]
        assert request.get(AttrType.ADDITIONAL_ADDRESS_FAMILY) == b"\x02\0\0\0"
        assert request.get(AttrType.REQUESTED_ADDRESS_FAMILY) is None
        with pytest.raises(ValueError):
            await client.allocate(Family.IPV6, additional_family=Family.IPV4)

    run(scenario)


def test_wrong_password_raises_401() -> None:
    async def scenario(client: TurnClient, server: FakeServer, _: FakeOpener) -> None:
        with pytest.raises(TurnClientError) as caught:
            await client.allocate()
        assert caught.value.code == 401
        assert client.last_error is caught.value
        assert len(server.requests) == 2  # challenge, then one authenticated try

    run(scenario, password="wrong")


def test_stale_nonce_is_retried_once_with_the_new_nonce() -> None:
    async def scenario(client: TurnClient, server: FakeServer, _: FakeOpener) -> None:
        await client.allocate()
        nonces = [stun.decode_text(r.get(AttrType.NONCE) or b"") for r in server.requests[1:]]
        assert nonces == ["nonce-1", "nonce-2"]

    run(scenario, FakeServer(stale_once=True))


def test_retransmits_until_answered() -> None:
    async def scenario(client: TurnClient, server: FakeServer, _: FakeOpener) -> None:
        await client.allocate()
        # Two swallowed sends of the first request, then the challenge, then the real one.
        tids = [r.transaction_id for r in server.requests]
        assert len(tids) == 4
        assert tids[0] == tids[1] == tids[2] != tids[3]

    run(scenario, FakeServer(drop_requests=2))


def test_gives_up_after_max_transmissions() -> None:
    async def scenario(client: TurnClient, server: FakeServer, _: FakeOpener) -> None:
        with pytest.raises(TurnClientError) as caught:
            await client.allocate()
        assert caught.value.code is None
        assert len(server.requests) == FAST.max_transmissions
        assert client.last_error is caught.value

    run(scenario, FakeServer(drop_requests=100))


def test_unsigned_success_is_discarded_once_authenticated() -> None:
    async def scenario(client: TurnClient, server: FakeServer, _: FakeOpener) -> None:
        with pytest.raises(TurnClientError) as caught:
            await client.allocate()
        assert caught.value.code is None  # the forged-looking answers never counted
        assert client.dropped == FAST.max_transmissions

    run(scenario, FakeServer(sign_responses=False))


def test_server_error_code_is_raised() -> None:
    async def scenario(client: TurnClient, server: FakeServer, _: FakeOpener) -> None:
        await client.allocate()
        await client.bind_channel(PEER)
        other = TransportAddr.parse("203.0.113.6:7000")
        server.channels[0x4001] = other  # the next channel number is taken on the server
        with pytest.raises(TurnClientError) as caught:
            await client.bind_channel(TransportAddr.parse("203.0.113.9:1"))
        assert (caught.value.code, caught.value.reason) == (400, "Bad Request")
        assert client.last_error is not None and client.last_error.code == 400
        assert TransportAddr.parse("203.0.113.9:1") not in client.channels

    run(scenario)


def test_send_indication_then_channel_data() -> None:
    async def scenario(client: TurnClient, server: FakeServer, _: FakeOpener) -> None:
        await client.allocate()
        await client.create_permission(PEER, TransportAddr.parse("[2001:db8::1]:9"))
        permission = server.requests[-1]
        peers = [
            stun.decode_xor_address(v, permission.transaction_id)
            for k, v in permission.attributes
            if k == AttrType.XOR_PEER_ADDRESS
        ]
        assert peers == [PEER, TransportAddr.parse("[2001:db8::1]:9")]
        client.send(PEER, b"one")
        indication = stun.decode(server.data[-1])
        assert (indication.method, indication.cls) == (Method.SEND, MessageClass.INDICATION)
        assert indication.get(AttrType.DATA) == b"one"
        peer_value = indication.get(AttrType.XOR_PEER_ADDRESS) or b""
        assert stun.decode_xor_address(peer_value, indication.transaction_id) == PEER
        channel = await client.bind_channel(PEER)
        assert channel == 0x4000
        assert client.channels == {PEER: 0x4000}
        assert await client.bind_channel(PEER) == channel  # a refresh keeps the number
        client.send(PEER, b"two")
        assert is_channel_data(server.data[-1])
        assert channel_of(server.data[-1]) == channel

    run(scenario)


def test_recv_from_data_indication_and_channel_data() -> None:
    async def scenario(client: TurnClient, server: FakeServer, opener: FakeOpener) -> None:
        assert opener.transport is not None
        await client.allocate()
        opener.transport.inject(data_indication(PEER, b"hello"))
        assert await client.recv() == (PEER, b"hello")
        channel = await client.bind_channel(PEER)
        opener.transport.inject(encode_channel_data(channel, b"fast") + b"\0\0\0")
        assert await client.recv() == (PEER, b"fast")
        # Unbound channels, junk and requests from the server are counted and dropped.
        opener.transport.inject(encode_channel_data(0x4ABC, b"?"))
        opener.transport.inject(b"\x00\x01junk")
        assert client.dropped == 2
        opener.transport.inject(data_indication(PEER, b"after"))
        assert await client.recv() == (PEER, b"after")

    run(scenario)


def test_refresh_and_close_deallocate() -> None:
    async def scenario(client: TurnClient, server: FakeServer, opener: FakeOpener) -> None:
        await client.allocate()
        assert await client.refresh(1200) == 1200
        assert client.lifetime == 1200
        await client.close()
        last = server.requests[-1]
        assert last.method == Method.REFRESH
        assert stun.decode_u32(last.get(AttrType.LIFETIME) or b"") == 0
        assert opener.transport is not None and opener.transport.closed
        with pytest.raises(TurnClientError):
            await client.recv()
        with pytest.raises(TurnClientError):
            client.send(PEER, b"x")
        with pytest.raises(TurnClientError):
            await client.refresh()

    run(scenario)


def test_close_wakes_a_waiting_recv() -> None:
    async def scenario(client: TurnClient, server: FakeServer, _: FakeOpener) -> None:
        await client.allocate()
        waiting = asyncio.create_task(client.recv())
        await asyncio.sleep(0)  # let recv start waiting
        await client.close()
        with pytest.raises(TurnClientError):
            await waiting

    run(scenario)
