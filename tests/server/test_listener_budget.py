"""The Python path reads its listening sockets within --stun-rate-per-source and --stun-rate-total
(issue 12): a source over its rate is dropped unparsed, and when the relay-wide rate is spent the
listener is left unread (the kernel drops the overflow) while clients' own sockets are served."""

from __future__ import annotations

import asyncio
import math
import os
import time

import pytest

from xdpturn.fastpath import GuardConfig
from xdpturn.proto import stun
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.channel_data import decode_channel_data, encode_channel_data
from xdpturn.proto.stun import Message, MessageClass, Method
from xdpturn.server import RelayServer
from xdpturn.server.budget import ListenerBudget, Schedule, source_key
from xdpturn.server.clientsockets import ClientSockets

from .helpers import behind_nat_config, local, recv, run, sockaddr, udp
from .test_loopback import StunClient


def binding() -> bytes:
    return stun.encode(Message(Method.BINDING, MessageClass.REQUEST, os.urandom(12)))


async def answers(sock: object, within: float) -> int:
    """Datagrams that arrive on `sock` until none has for `within` seconds."""
    n = 0
    while True:
        try:
            await recv(sock, within)  # type: ignore[arg-type]
        except TimeoutError:
            return n
        n += 1


def test_a_source_over_its_rate_is_dropped_unparsed() -> None:
    rate = 20  # a bucket holds one second's worth

    async def main() -> None:
        config = behind_nat_config(stun_rate_per_source=rate)
        async with RelayServer(config) as server:
            listen = server.listen_addresses[0]
            with udp() as sock, udp("127.0.0.2") as other:
                started = time.monotonic()
                for _ in range(3 * rate):
                    sock.sendto(binding(), sockaddr(listen))
                got = await answers(sock, 0.3)
                elapsed = time.monotonic() - started
                assert rate <= got <= rate + math.ceil(elapsed * rate)
                assert server.stats["listener_source_limited"] == 3 * rate - got
                # Another address has its own budget.
                other.sendto(binding(), sockaddr(listen))
                assert (await recv(other))[0][:2] == b"\x01\x01"  # a Binding success

    run(main())


def test_a_spent_total_rate_leaves_the_listener_unread_but_not_the_clients() -> None:
    rate = 50

    async def main() -> None:
        config = behind_nat_config(stun_rate_per_source=0, stun_rate_total=rate)
        async with RelayServer(config) as server:
            listen = server.listen_addresses[0]
            with udp() as sock, udp() as peer_sock, udp() as flood:
                client = StunClient(sock, listen)
                relayed = await client.allocate(Family.IPV4)
                peer = local(peer_sock)
                await client.permit(peer)
                await client.bind(0x4001, peer)
                inside = TransportAddr(listen.ip, relayed.port)

                paused = server.stats["listener_paused"]
                for _ in range(10 * rate):
                    flood.sendto(binding(), sockaddr(listen))
                await asyncio.sleep(0)  # let the relay run into its budget
                sock.sendto(encode_channel_data(0x4001, b"still here"), sockaddr(listen))
                assert await recv(peer_sock) == (b"still here", inside)
                peer_sock.sendto(b"and back", sockaddr(inside))
                raw, _ = await recv(sock)
                assert tuple(decode_channel_data(raw)) == (0x4001, b"and back")
                assert server.stats["listener_paused"] > paused
                # Well under what was sent was answered: the rest stayed unread.
                assert await answers(flood, 0.3) < 4 * rate

    run(main(), "uvloop")


def test_schedules_follow_gcra() -> None:
    s = Schedule(10)
    assert [s.take(100.0) for _ in range(11)] == [True] * 10 + [False]
    assert math.isclose(s.wait(100.0), 0.1)
    assert s.take(100.1 + 1e-9)
    slow = Schedule(0.5)  # a bucket holds at least one datagram
    assert slow.take(0.0) and not slow.take(1.0) and slow.take(2.0)
    unlimited = Schedule(0)
    assert all(unlimited.take(0.0) for _ in range(1000))
    budget = ListenerBudget(GuardConfig(stun_rate_per_source=1))
    assert budget.source_allows("a", 5.0) and not budget.source_allows("a", 5.0)
    assert budget.source_allows("b", 5.0)


def test_an_ipv6_source_counts_by_its_64() -> None:
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::2")
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("fe80::1%lo") == source_key("fe80::2")
    assert source_key("192.0.2.1") == "192.0.2.1"


def test_a_client_with_an_allocation_is_not_limited_on_the_listener(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should its own socket be missing, an allocated client's datagrams arrive on the listener:
    they are not held to a newcomer's rate."""
    rate = 5
    monkeypatch.setattr(ClientSockets, "open", lambda self, flow: None)  # as if it failed

    async def main() -> None:
        config = behind_nat_config(stun_rate_per_source=rate)
        async with RelayServer(config) as server:
            listen = server.listen_addresses[0]
            with udp() as sock, udp() as peer_sock:
                client = StunClient(sock, listen)
                await client.allocate(Family.IPV4)
                peer = local(peer_sock)
                await client.permit(peer)
                await client.bind(0x4001, peer)
                assert server.client_socket_count == 0
                for i in range(4 * rate):
                    sock.sendto(encode_channel_data(0x4001, bytes([i])), sockaddr(listen))
                got = [(await recv(peer_sock))[0] for _ in range(4 * rate)]
                assert got == [bytes([i]) for i in range(4 * rate)]
                assert server.stats["listener_source_limited"] == 0

    run(main())
