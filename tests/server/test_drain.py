"""Draining a real `xdpturn serve` process: SIGTERM or `xdpturn drain` stops new allocations
(300 Try Alternate or 508), existing ones keep relaying, the process exits by itself at the drain
deadline; SIGINT still stops at once."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
import time

import pytest

from tests.support import BOUNDED, Serve
from xdpturn.cli import main as cli_main
from xdpturn.proto import stun
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.channel_data import decode_channel_data, encode_channel_data
from xdpturn.proto.stun import AttrType, MessageClass, Method

from .helpers import local, recv, run, sockaddr, udp
from .test_loopback import StunClient
from .test_metrics import http

ALTERNATE = TransportAddr.parse("192.0.2.2:3478")
DRAIN_TIMEOUT = 3.0


def serve(*extra: str) -> Serve:
    return Serve(
        [
            "--listen", "127.0.0.1:0",
            "--public-ipv4", "203.0.113.1",  # peers on loopback are then plain peers
            "--auth-secret", "s3cret",
            "--realm", "test.example",
            "--ports", "20000-29999",
            "--allow-peer", "127.0.0.0/8",
            "--metrics", "127.0.0.1:0",
            "--log-format", "json",
            *extra,
        ]
    )  # fmt: skip


def addresses(proc: Serve) -> tuple[TransportAddr, TransportAddr]:
    listen = proc.wait_for("listening")["listen"]
    assert isinstance(listen, list)
    metrics = proc.wait_for("metrics listening")["metrics"]
    return TransportAddr.parse(listen[0]), TransportAddr.parse(str(metrics))


async def refused_allocate(listen: TransportAddr) -> stun.Message:
    """An authenticated Allocate from a new client that the relay refuses."""
    with udp() as sock:
        client = StunClient(sock, listen)

        def request() -> stun.Message:
            msg = client.message(Method.ALLOCATE)
            msg.add(AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
            return msg

        challenge = await client.exchange(request(), sign=False)
        client.nonce = challenge.get(AttrType.NONCE)
        response = await client.exchange(request())
        assert response.cls is MessageClass.ERROR
        return response


def error_code(response: stun.Message) -> int:
    value = response.get(AttrType.ERROR_CODE)
    assert value is not None
    return stun.decode_error_code(value)[0]


async def relays(
    client: StunClient, listen: TransportAddr, peer_sock: socket.socket, port: int
) -> None:
    """ChannelData both ways and a Send indication between `client` and `peer_sock`."""
    inside = TransportAddr(ipaddress.ip_address("127.0.0.1"), port)
    peer = local(peer_sock)
    client.sock.sendto(encode_channel_data(0x4001, b"out"), sockaddr(listen))
    assert await recv(peer_sock) == (b"out", inside)
    peer_sock.sendto(b"in", sockaddr(inside))
    raw, _ = await recv(client.sock)
    assert tuple(decode_channel_data(raw)) == (0x4001, b"in")
    client.send_indication(peer, b"indication")
    assert await recv(peer_sock) == (b"indication", inside)


def test_sigterm_drains_then_exits_0_at_the_deadline() -> None:
    with serve("--alternate-server", str(ALTERNATE), "--drain-timeout", str(DRAIN_TIMEOUT)) as proc:
        listen, metrics = addresses(proc)

        async def main() -> float:
            with udp() as sock, udp() as peer_sock:
                client = StunClient(sock, listen)
                relayed = await client.allocate(Family.IPV4)
                await client.permit(local(peer_sock))
                await client.bind(0x4001, local(peer_sock))
                await relays(client, listen, peer_sock, relayed.port)

                sent_at = time.monotonic()
                proc.proc.send_signal(signal.SIGTERM)
                draining = await asyncio.to_thread(proc.wait_for, "draining")
                assert draining["reason"] == "SIGTERM" and draining["allocations"] == 1

                refused = await refused_allocate(listen)
                assert error_code(refused) == 300
                alternate = refused.get(AttrType.ALTERNATE_SERVER)
                assert alternate is not None and stun.decode_address(alternate) == ALTERNATE
                status, _, body = await http(metrics, "/readyz")
                assert status == 503 and b"draining" in body
                # The allocation made before SIGTERM keeps relaying both ways.
                await relays(client, listen, peer_sock, relayed.port)
                assert (await http(metrics, "/healthz"))[0] == 200
            return sent_at

        sent_at = run(main())
        timeout = proc.wait_for("drain timeout")
        assert timeout["allocations"] == 1
        assert proc.wait_for("stopped")["level"] == "INFO"
        assert proc.proc.wait(timeout=BOUNDED) == 0
        assert time.monotonic() - sent_at >= DRAIN_TIMEOUT


def test_drain_command_then_sigint_stops_at_once() -> None:
    with serve("--drain-timeout", "300") as proc:
        listen, metrics = addresses(proc)

        async def main() -> None:
            with udp() as sock:
                await StunClient(sock, listen).allocate(Family.IPV4)
                code = await asyncio.to_thread(cli_main, ["drain", "--metrics", str(metrics)])
                assert code == 0
                assert error_code(await refused_allocate(listen)) == 508  # no alternate given
                assert (await http(metrics, "/readyz"))[0] == 503

        run(main())
        assert proc.wait_for("draining")["reason"] == "POST /drain"
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGINT)
        stopping = proc.wait_for("stopping")
        assert stopping["signal"] == "SIGINT" and stopping["drained"] is False
        assert proc.proc.wait(timeout=BOUNDED) == 0
        assert time.monotonic() - started < BOUNDED


def test_sigterm_without_allocations_exits_at_once() -> None:
    with serve("--drain-timeout", "300") as proc:
        addresses(proc)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait_for("drained")["allocations"] == 0
        assert proc.proc.wait(timeout=BOUNDED) == 0


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_a_bad_drain_timeout_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(
        ["serve", "--listen", "127.0.0.1:0", "--auth-secret", "s", "--drain-timeout", value]
    )
    assert code == 2
    assert capsys.readouterr().err.startswith("xdpturn serve: --drain-timeout: expected seconds")
