"""Clients no one here wrote, against `xdpturn serve`: aioice's TURN client and coturn's
turnutils_uclient (REST API auth with -W, to a UDP echo peer and client-to-client; with -c and
in its default mode, where it allocates RTP/RTCP pairs with EVEN-PORT and RESERVATION-TOKEN, also
with two workers, where a pair's two Allocates may reach different ones)."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import aioice.turn
import pytest

from tests.support import BOUNDED, Serve, unavailable
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.auth import mint_rest_credentials

pytestmark = pytest.mark.interop

SECRET = "interop-secret"
# uclient runs with two workers, at most, until one of them had a pair whose RESERVATION-TOKEN
# Allocate reached another worker than its EVEN-PORT one: each pair does with p = 1/2, and a run
# has 2 (-y) to 3 pairs, so 15 runs without one happen with p < 2**-30.
HANDOVER_RUNS = 15


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serving(workers: int) -> Iterator[tuple[Serve, TransportAddr]]:
    """The relay listens on loopback and tells clients a documentation address, as behind 1:1
    NAT, so loopback peers are plain peers and its public address is itself."""
    args = ["--listen", "127.0.0.1:0", "--public-ipv4", "203.0.113.1"]
    args += ["--auth-secret", SECRET, "--allow-peer", "127.0.0.0/8", "--ports", "20000-29999"]
    args += ["--log-format", "json", "--workers", str(workers)]
    with Serve(args, env={"XDPTURN_WORKERS": str(workers)}) as serve:
        listening = serve.wait_for("listening")
        while workers > 1 and listening.get("workers") != workers:  # the supervisor's: all run
            listening = serve.wait_for("listening")
        listen = listening["listen"]
        assert isinstance(listen, list)
        yield serve, TransportAddr.parse(str(listen[0]))
        # uclient leaves its allocations to expire: SIGTERM would drain until they do.
        serve.proc.send_signal(signal.SIGINT)
        assert serve.proc.wait(timeout=BOUNDED) == 0


@pytest.fixture
def served() -> Iterator[tuple[Serve, TransportAddr]]:
    with serving(1) as served:
        yield served


@pytest.fixture
def served_by_two() -> Iterator[tuple[Serve, TransportAddr]]:
    with serving(2) as served:
        yield served


@pytest.fixture
def relay(served: tuple[Serve, TransportAddr]) -> TransportAddr:
    return served[1]


class Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))


def test_aioice_turn_client_relays_both_ways(relay: TransportAddr) -> None:
    creds = mint_rest_credentials(SECRET, now=time.time(), ttl=600, user_id="aioice")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        peer_transport, peer = await loop.create_datagram_endpoint(
            Collect, local_addr=("127.0.0.1", 0)
        )
        turn, client = await aioice.turn.create_turn_endpoint(
            Collect,
            server_addr=(str(relay.ip), relay.port),
            username=creds.username,
            password=creds.password,
        )
        try:
            relayed_host, relayed_port = turn.get_extra_info("sockname")
            assert relayed_host == "203.0.113.1"
            peer_addr = peer_transport.get_extra_info("sockname")
            for i in range(20):
                # aioice binds a channel for the peer on first use, then sends ChannelData.
                turn.sendto(b"to peer %d" % i, peer_addr)
                data, source = await asyncio.wait_for(peer.received.get(), BOUNDED)
                assert data == b"to peer %d" % i
                assert source == ("127.0.0.1", relayed_port)
                peer_transport.sendto(b"to client %d" % i, source)
                data, source = await asyncio.wait_for(client.received.get(), BOUNDED)
                assert (data, source) == (b"to client %d" % i, peer_addr)
        finally:
            turn.close()
            peer_transport.close()

    asyncio.run(main())


def uclient(relay: TransportAddr, *extra: str, rtcp: bool = False) -> str:
    """4 clients x 100 messages of 200 bytes, 5 ms apart. Without `rtcp` (-c), one allocation
    per client; with it, uclient's default: an RTP allocation with EVEN-PORT (R bit set), then
    an RTCP one on the reserved next port with the RESERVATION-TOKEN it got."""
    binary = shutil.which("turnutils_uclient")
    if binary is None:
        unavailable("coturn's turnutils_uclient is not installed")
    args = [binary, "-W", SECRET, "-u", "uclient", "-p", str(relay.port)]
    args += ["-m", "4", "-n", "100", "-l", "200", "-z", "5", *([] if rtcp else ["-c"])]
    args += [*extra, str(relay.ip)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def assert_no_loss(output: str, expected: int) -> None:
    lost = re.search(r"Total lost packets (\d+)", output)
    received = re.search(r"tot_recv_msgs=(\d+)", output.split("start_mclient: tot_send_msgs")[-1])
    assert lost is not None and received is not None, output[-2000:]
    assert int(lost.group(1)) == 0, output[-2000:]
    assert int(received.group(1)) == expected, output[-2000:]


def uclient_to_echo_peer(relay: TransportAddr, *extra: str, rtcp: bool) -> str:
    binary = shutil.which("turnutils_peer")
    if binary is None:
        unavailable("coturn's turnutils_peer is not installed")
    port = free_udp_port()
    peer = subprocess.Popen(
        [binary, "-L", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return uclient(relay, "-e", "127.0.0.1", "-r", str(port), *extra, rtcp=rtcp)
    finally:
        peer.terminate()
        peer.wait(timeout=BOUNDED)


def assert_rtp_rtcp_pairs(serve: Serve, pairs: int) -> None:
    """The relay logged `pairs` allocations on an even port N (EVEN-PORT) each with one on
    N + 1 (RESERVATION-TOKEN: relay ports are otherwise picked at random). uclient stops with
    an error when either Allocate is refused, so this shows both were served."""
    ports: set[int] = set()
    while len({p for p in ports if p % 2 == 0 and p + 1 in ports}) < pairs:
        port = serve.wait_for("allocation opened")["relay_port"]  # bounded wait
        assert isinstance(port, int)
        ports.add(port)


def rtp_rtcp_pairs_handed_over(serve: Serve, pairs: int) -> int:
    """As assert_rtp_rtcp_pairs, with two workers: how many reserved ports went from the worker
    that reserved them to the one their token's Allocate reached (each logged there before its
    allocation)."""
    ports: set[int] = set()
    handed = 0
    deadline = time.monotonic() + BOUNDED
    while len({p for p in ports if p % 2 == 0 and p + 1 in ports}) < pairs:
        try:
            line = serve.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"fewer than {pairs} RTP/RTCP pairs within {BOUNDED} s") from None
        assert line is not None, f"serve exited ({serve.proc.wait()})"
        record = json.loads(line)
        if record["message"] == "allocation opened":
            ports.add(int(record["relay_port"]))
        elif record["message"] == "reservation taken over":
            handed += 1
    return handed


def test_coturn_uclient_to_an_echo_peer_loses_nothing(relay: TransportAddr) -> None:
    assert_no_loss(uclient_to_echo_peer(relay, rtcp=False), 400)


def test_coturn_uclient_client_to_client_through_the_relay_itself(relay: TransportAddr) -> None:
    # -y: the clients send to each other's relayed addresses: packets to itself.
    assert_no_loss(uclient(relay, "-y"), 400)


def test_coturn_uclient_rtp_rtcp_pairs_to_an_echo_peer_lose_nothing(
    served: tuple[Serve, TransportAddr],
) -> None:
    serve, relay = served
    assert_no_loss(uclient_to_echo_peer(relay, rtcp=True), 400)
    assert_rtp_rtcp_pairs(serve, 3)  # what uclient -m 4 opens towards a peer


def test_coturn_uclient_rtp_rtcp_pairs_client_to_client_lose_nothing(
    served: tuple[Serve, TransportAddr],
) -> None:
    serve, relay = served
    assert_no_loss(uclient(relay, "-y", rtcp=True), 400)
    assert_rtp_rtcp_pairs(serve, 2)  # what uclient -m 4 -y opens


def test_coturn_uclient_rtp_rtcp_pairs_with_dont_fragment_lose_nothing(
    served: tuple[Serve, TransportAddr],
) -> None:
    # -g: DONT-FRAGMENT in the Allocates; the relay sends with DF instead of refusing it.
    serve, relay = served
    assert_no_loss(uclient_to_echo_peer(relay, "-g", rtcp=True), 400)
    assert_rtp_rtcp_pairs(serve, 3)


def test_coturn_uclient_rtp_rtcp_pairs_across_two_workers_to_an_echo_peer_lose_nothing(
    served_by_two: tuple[Serve, TransportAddr],
) -> None:
    serve, relay = served_by_two
    for _ in range(HANDOVER_RUNS):
        assert_no_loss(uclient_to_echo_peer(relay, rtcp=True), 400)
        if rtp_rtcp_pairs_handed_over(serve, 3):
            return
    raise AssertionError("no RESERVATION-TOKEN Allocate ever reached the other worker")


def test_coturn_uclient_rtp_rtcp_pairs_across_two_workers_client_to_client_lose_nothing(
    served_by_two: tuple[Serve, TransportAddr],
) -> None:
    serve, relay = served_by_two
    for _ in range(HANDOVER_RUNS):
        assert_no_loss(uclient(relay, "-y", rtcp=True), 400)
        if rtp_rtcp_pairs_handed_over(serve, 2):
            return
    raise AssertionError("no RESERVATION-TOKEN Allocate ever reached the other worker")
