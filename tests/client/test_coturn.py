"""TurnClient and probe against coturn on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.client.conftest import RELAY_PORTS, Coturn
from xdpturn.client.probe import format_probe, probe
from xdpturn.client.turn import (
    LostHandler,
    MessageTransport,
    Receiver,
    TurnClient,
    TurnClientError,
    open_udp,
)
from xdpturn.proto import stun
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.channel_data import is_channel_data

pytestmark = pytest.mark.interop

TIMEOUT = 10.0  # seconds for a whole scenario; each step is far shorter on loopback


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


class PeerSocket(asyncio.DatagramProtocol):
    """A plain UDP peer on loopback."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[TransportAddr, bytes]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.inbox.put_nowait((TransportAddr.parse(f"{addr[0]}:{addr[1]}"), data))

    @property
    def addr(self) -> TransportAddr:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")
        return TransportAddr.parse(f"{host}:{port}")

    def send(self, to: TransportAddr, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (str(to.ip), to.port))


async def open_peer() -> PeerSocket:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(PeerSocket, local_addr=("127.0.0.1", 0))
    peer.transport = transport
    return peer


@dataclass
class Recorder:
    """Wraps the UDP transport to keep every message each way, so tests can see the framing."""

    sent: list[bytes] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)

    async def __call__(
        self, server: TransportAddr, receiver: Receiver, lost: LostHandler
    ) -> MessageTransport:
        def record(data: bytes) -> None:
            self.received.append(data)
            receiver(data)

        inner = await open_udp(server, record, lost)
        recorder = self

        class Recording:
            reliable = False

            def send(self, data: bytes) -> None:
                recorder.sent.append(data)
                inner.send(data)

            def close(self) -> None:
                inner.close()

        return Recording()


def test_allocate_permission_channel_and_data_both_ways(coturn: Coturn) -> None:
    creds = coturn.credentials()
    recorder = Recorder()

    async def main() -> None:
        peer = await open_peer()
        client = await TurnClient.connect(
            coturn.server, creds.username, creds.password, opener=recorder
        )
        try:
            [relayed] = await client.allocate()
            assert str(relayed.ip) == "127.0.0.1"
            assert RELAY_PORTS[0] <= relayed.port <= RELAY_PORTS[1]
            assert client.mapped is not None and str(client.mapped.ip) == "127.0.0.1"
            assert client.lifetime is not None and client.lifetime > 0
            await client.create_permission(peer.addr)

            # Send and Data indications.
            client.send(peer.addr, b"indication out")
            assert stun.decode(recorder.sent[-1]).method == stun.Method.SEND
            assert await peer.inbox.get() == (relayed, b"indication out")
            peer.send(relayed, b"indication in")
            assert await client.recv() == (peer.addr, b"indication in")
            assert stun.decode(recorder.received[-1]).method == stun.Method.DATA

            # ChannelData, both ways.
            channel = await client.bind_channel(peer.addr)
            client.send(peer.addr, b"channel out")
            assert is_channel_data(recorder.sent[-1])
            assert await peer.inbox.get() == (relayed, b"channel out")
            peer.send(relayed, b"channel in")
            assert await client.recv() == (peer.addr, b"channel in")
            assert is_channel_data(recorder.received[-1])
            assert client.channels == {peer.addr: channel}

            assert await client.refresh(1200) == 1200  # below 600 coturn grants 600
            assert client.last_error is None
        finally:
            await client.close()
            if peer.transport is not None:
                peer.transport.close()
        # close() deleted the allocation: coturn answered the LIFETIME=0 Refresh.
        last = stun.decode(recorder.received[-1])
        assert (last.method, last.cls) == (stun.Method.REFRESH, stun.MessageClass.SUCCESS)

    run(main)


def test_wrong_password_is_refused(coturn: Coturn) -> None:
    creds = coturn.credentials()

    async def main() -> None:
        client = await TurnClient.connect(coturn.server, creds.username, "not-the-password")
        try:
            with pytest.raises(TurnClientError) as caught:
                await client.allocate()
            assert caught.value.code in (401, 441)
            assert client.last_error is caught.value
        finally:
            await client.close()

    run(main)


def test_probe_reports_no_loss(coturn: Coturn) -> None:
    creds = coturn.credentials("probe")

    async def main() -> None:
        result = await probe(coturn.server, creds.username, creds.password, count=200)
        text = format_probe(result)
        assert result.ok, text
        assert (result.sent, result.received, result.forwarded, result.lost) == (200, 200, 200, 0)
        assert len(result.relayed) == 2 and result.relayed[0] != result.relayed[1]
        p50, p99 = result.rtt_percentile(50), result.rtt_percentile(99)
        assert result.rtt_min is not None and p50 is not None and p99 is not None
        assert 0 < result.rtt_min <= p50 <= p99 <= (result.rtt_max or 0)
        assert "0 lost" in text and "OK" in text

    run(main)


def test_probe_with_bad_credentials_reports_the_error(coturn: Coturn) -> None:
    creds = coturn.credentials()

    async def main() -> None:
        result = await probe(coturn.server, creds.username, "wrong", count=5)
        assert not result.ok
        assert result.sent == 0
        assert result.error is not None and result.error.startswith("401")
        assert "FAILED" in format_probe(result)

    run(main)
