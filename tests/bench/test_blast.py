"""xdpturn-blast on loopback: counting, ChannelData framing, echo/ping, IPv6, bounds, inherited fds.

Every run is bounded by the tool's own --duration/--count; the wrappers add a grace period and stop
the process after it, so nothing here can hang. Receivers announce readiness before a sender starts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from xdpturn.proto import stun
from xdpturn.proto.channel_data import decode_channel_data, encode_channel_data
from xdpturn_lab.bench import tools
from xdpturn_lab.bench.tools import RecvResult, SendResult

V4 = "127.0.0.1"
V6 = "::1"
# One core each for sender and receiver (this VM has two), so ceilings do not depend on where the
# scheduler happens to put them.
PIN_TX = ["taskset", "-c", "0"]
PIN_RX = ["taskset", "-c", "1"]


def transfer(
    host: str,
    *,
    size: int,
    rate: float | None,
    duration: float,
    count: int | None = None,
    channel: int | None = None,
    rx_channel: int | None = None,
    gso: bool = False,
    tx_prefix: Sequence[str] = (),
    rx_prefix: Sequence[str] = (),
) -> tuple[SendResult, RecvResult]:
    """send -> recv on `host`; recv ends at `count` datagrams or 0.5 s after the last one."""
    rx_cmd = tools.recv(
        (host, 0), duration=duration + 2, idle_timeout=0.5, count=count, channel=rx_channel
    )
    with rx_cmd.start(rx_prefix) as rx:
        port = rx.wait_ready().port
        sent = tools.send(
            (host, port),
            size=size,
            rate=rate,
            duration=duration,
            count=count,
            channel=channel,
            gso=gso,
        ).run(tx_prefix)
        return sent, rx.result()


def assert_complete(sent: SendResult, got: RecvResult, count: int) -> None:
    assert sent.sent == count
    assert (got.received, got.unique, got.lost_vs(sent)) == (count, count, 0)
    assert (got.reordered, got.duplicates, got.malformed, got.socket_drops) == (0, 0, 0, 0)
    assert (got.first_seq, got.max_seq) == (0, count - 1)


def test_build_and_usage(blast: Path) -> None:
    assert blast.is_file()
    assert tools.build() == blast  # idempotent
    usage = subprocess.run([blast, "send", "--to", "nowhere"], capture_output=True, check=False)
    assert usage.returncode == 2
    assert b"usage:" in usage.stderr
    bad_channel = subprocess.run(
        [blast, "send", "--to", "127.0.0.1:9", "--channel", "0x5000"],
        capture_output=True,
        check=False,
    )
    assert bad_channel.returncode == 2


def test_send_recv_complete_and_in_order(blast: Path) -> None:
    sent, got = transfer(V4, size=100, rate=50_000, duration=5, count=10_000)
    assert_complete(sent, got, 10_000)
    assert got.bytes == sent.bytes == 10_000 * 100
    assert 0.15 < sent.elapsed_s < 1.0  # 10,000 at 50,000/s is paced, not a burst
    assert got.latency_us is not None
    assert got.latency_us.samples == 10_000
    assert 0 < got.latency_us.min <= got.latency_us.p50 <= got.latency_us.p99 <= got.latency_us.max
    assert got.future_timestamps == 0  # same machine, same CLOCK_MONOTONIC


@pytest.mark.parametrize("host", [V4, V6])
def test_gso_sends_the_same_datagrams(blast: Path, host: str) -> None:
    """UDP_SEGMENT super-datagrams arrive as separate, complete, ordered ChannelData datagrams;
    10,001 is not a multiple of the segment count, so the last super-datagram is partial."""
    sent, got = transfer(
        host,
        size=1200,
        rate=100_000,
        duration=5,
        count=10_001,
        channel=0x4001,
        rx_channel=0x4001,
        gso=True,
    )
    assert sent.gso_segments > 1
    assert_complete(sent, got, 10_001)


def test_ipv6_loopback(blast: Path) -> None:
    sent, got = transfer(V6, size=1200, rate=20_000, duration=5, count=2_000)
    assert_complete(sent, got, 2_000)
    assert sent.to == f"[{V6}]:{sent.to.rsplit(':', 1)[1]}"


def test_channel_data_round_trip(blast: Path) -> None:
    sent, got = transfer(
        V4, size=64, rate=20_000, duration=5, count=1_000, channel=0x4ABC, rx_channel=0x4ABC
    )
    assert_complete(sent, got, 1_000)
    assert sent.datagram_bytes == 68


def test_channel_data_wrong_channel_is_malformed(blast: Path) -> None:
    _, got = transfer(
        V4, size=64, rate=20_000, duration=5, count=200, channel=0x4001, rx_channel=0x4002
    )
    assert (got.received, got.malformed, got.unique) == (200, 200, 0)


def test_channel_data_wire_format_matches_proto_codec(blast: Path) -> None:
    """What the tool sends decodes with the project's codec, and what the codec encodes the tool
    counts: the framing is checked against an implementation the tool does not share."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind((V4, 0))
        sink.settimeout(5)
        before = time.monotonic_ns()
        tools.send(
            sink.getsockname(), size=40, rate=1000, duration=5, count=5, channel=0x4123
        ).run()
        after = time.monotonic_ns()
        for i in range(5):
            msg = decode_channel_data(sink.recv(2048))
            assert (msg.channel, len(msg.payload)) == (0x4123, 40)
            seq, ts = struct.unpack_from(">QQ", msg.payload)
            assert seq == i
            assert before <= ts <= after

    with (
        tools.recv((V4, 0), duration=5, channel=0x4001, count=102).start() as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as src,
    ):
        target = (V4, rx.wait_ready().port)
        for i in range(100):
            payload = struct.pack(">QQ", i, time.monotonic_ns()) + bytes(20)
            src.sendto(encode_channel_data(0x4001, payload), target)
        src.sendto(encode_channel_data(0x4002, payload), target)  # another channel
        src.sendto(b"\x40\x01\x00\x04abcd", target)  # too short for a sequence number
        got = rx.result()
    assert (got.received, got.unique, got.malformed, got.lost, got.reordered) == (102, 100, 2, 0, 0)


@pytest.mark.parametrize(("host", "channel"), [(V4, None), (V4, 0x4001), (V6, None)])
def test_ping_against_echo(blast: Path, host: str, channel: int | None) -> None:
    with tools.echo((host, 0), duration=10).start() as peer:
        port = peer.wait_ready().port
        result = tools.ping((host, port), rate=1000, count=500, size=100, channel=channel).run()
        peer.interrupt()
        echoed = peer.result()
    assert (result.sent, result.received, result.lost) == (500, 500, 0)
    assert (result.duplicates, result.malformed, result.errors) == (0, 0, 0)
    assert echoed.echoed == 500
    rtt = result.rtt_us
    assert rtt is not None
    assert 0 < rtt.min <= rtt.p50 <= rtt.p90 <= rtt.p99 <= rtt.max
    assert rtt.p50 < 5_000  # loopback: tens of microseconds
    assert 0.4 < result.elapsed_s < 2.0  # 500 at 1000/s


def test_duration_bounds_each_subcommand(blast: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind((V4, 0))
        sent = tools.send(sink.getsockname(), size=32, rate=2000, duration=0.5).run()
    assert 0.5 <= sent.elapsed_s < 0.7
    assert 900 <= sent.sent <= 1001
    assert not sent.interrupted

    start = time.monotonic()
    idle = tools.recv((V4, 0), duration=0.3).run()
    reflected = tools.echo((V4, 0), duration=0.3).run()
    assert time.monotonic() - start < 3
    assert idle.received == 0 and idle.latency_us is None and idle.first_seq is None
    assert 0.3 <= idle.elapsed_s < 0.6
    assert reflected.received == 0 and 0.3 <= reflected.elapsed_s < 0.6


def test_interrupt_prints_the_result(blast: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind((V4, 0))
        with tools.send(sink.getsockname(), size=32, rate=1000, duration=60).start() as proc:
            proc.wait_ready()
            proc.interrupt()
            sent = proc.result(timeout=5)
    assert sent.interrupted
    assert sent.elapsed_s < 5


def test_inherited_fd_is_the_source_and_keeps_its_flags(blast: Path) -> None:
    """A relay keys an allocation by the client's source address: `--fd` sends from the very
    socket the client allocated from, without making it blocking or connected."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink,
    ):
        client.bind((V4, 0))
        client.setblocking(False)  # as under asyncio
        sink.bind((V4, 0))
        sink.settimeout(5)
        sent = tools.send(
            sink.getsockname(), size=32, rate=10_000, duration=5, count=200, fd=client.fileno()
        ).run()
        assert sent.sent == 200
        sources = {sink.recvfrom(2048)[1] for _ in range(200)}
        assert sources == {client.getsockname()}
        assert not client.getblocking()
        with pytest.raises(OSError):
            client.getpeername()  # still unconnected

        # The same socket also receives (e.g. ChannelData from the relay).
        with tools.recv(fd=client.fileno(), duration=5, count=300).start() as rx:
            rx.wait_ready()
            tools.send(client.getsockname(), size=32, rate=20_000, duration=5, count=300).run()
            got = rx.result()
        assert (got.unique, got.lost, got.malformed) == (300, 0, 0)


def test_from_shares_a_reuseport_port(blast: Path) -> None:
    with (
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as holder,
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sink,
    ):
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((V6, 0))
        port = holder.getsockname()[1]
        sink.bind((V6, 0))
        sink.settimeout(5)
        sent = tools.send(
            (V6, sink.getsockname()[1]), size=32, rate=1000, duration=5, count=3, source=(V6, port)
        ).run()
        assert sent.sent == 3
        assert {sink.recvfrom(2048)[1][1] for _ in range(3)} == {port}


def test_async_api(blast: Path) -> None:
    async def main() -> tuple[tools.PingResult, tools.EchoResult]:
        async with await tools.echo((V4, 0), duration=10, count=100).start_async() as peer:
            port = (await peer.wait_ready()).port
            pinged = await tools.ping((V4, port), rate=2000, count=100, size=64).run_async()
            return pinged, await peer.result()

    pinged, echoed = asyncio.run(main())
    assert (pinged.received, echoed.echoed) == (100, 100)


def _ceiling(run: Callable[[int, bool], tuple[SendResult, RecvResult]], where: str) -> list[str]:
    lines = []
    for gso in (False, True):
        for size in (100, 1200):
            sent, got = run(size, gso)
            assert sent.sent > 0 and got.unique > 0
            lines.append(
                f"{where} ceiling, {size:4}-byte payload{', GSO' if gso else '     '}: "
                f"send {sent.pps:>9,.0f} pps, recv {got.pps:>9,.0f} pps, "
                f"lost {got.lost_vs(sent)} (socket drops {got.socket_drops})"
            )
    return lines


def test_loopback_ceiling(blast: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The generator's own ceiling with no relay in the way (printed, not asserted)."""
    lines = _ceiling(
        lambda size, gso: transfer(
            V4, size=size, rate=None, duration=2, gso=gso, tx_prefix=PIN_TX, rx_prefix=PIN_RX
        ),
        "loopback",
    )
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.kernel
def test_netns_ceiling(blast: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Same, between two namespaces over a veth pair (documentation prefixes). The namespaces are
    ours and are deleted even on failure."""
    tag = f"blast-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    a, b = f"{tag}-a", f"{tag}-b"
    dst = ("192.0.2.2", 40000)

    def run(size: int, gso: bool) -> tuple[SendResult, RecvResult]:
        with tools.recv(dst, duration=4, idle_timeout=0.5).start(
            tools.netns_prefix(b) + PIN_RX
        ) as rx:
            rx.wait_ready()
            tx = tools.send(dst, size=size, rate=None, duration=2, gso=gso)
            return tx.run(tools.netns_prefix(a) + PIN_TX), rx.result()

    try:
        for cmd in (
            ["ip", "netns", "add", a],
            ["ip", "netns", "add", b],
            ["ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "vb", "netns", b],
            ["ip", "-n", a, "addr", "add", "192.0.2.1/24", "dev", "va"],
            ["ip", "-n", b, "addr", "add", "192.0.2.2/24", "dev", "vb"],
            ["ip", "-n", a, "link", "set", "va", "up"],
            ["ip", "-n", b, "link", "set", "vb", "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        lines = _ceiling(run, "netns")
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_junk_sends_every_kind_of_bad_datagram(blast: Path) -> None:
    """junk: STUN that decodes and STUN that does not, ChannelData whose length lies, random
    bytes, and 65,000-byte datagrams; the same sequence every run."""
    count = 1024

    def one_run() -> list[bytes]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
            sock.bind((V4, 0))
            sock.settimeout(5)
            sent = tools.junk(sock.getsockname(), rate=20_000, duration=5, count=count).run()
            assert (sent.sent, sent.errors) == (count, 0)
            return [sock.recv(65535) for _ in range(count)]

    got = one_run()
    stun_ok = stun_bad = lying = big = 0
    for data in got:
        if len(data) == 65000:
            big += 1
        elif data[0] >> 6 == 1:
            try:
                decode_channel_data(data)
            except ValueError:
                lying += 1
        elif len(data) >= 8 and data[4:8] == b"\x21\x12\xa4\x42":
            try:
                stun.decode(data)
                stun_ok += 1
            except ValueError:
                stun_bad += 1
    assert big == count // 256
    assert stun_ok > 50 and stun_bad > 200 and lying > 150, (stun_ok, stun_bad, lying)
    assert one_run() == got
