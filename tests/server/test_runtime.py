"""The runtime alone, around a fake core: sockets, command execution, timer, shutdown.

The fake speaks a toy protocol so each test shows one runtime duty without STUN in the way.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import socket

import pytest

from xdpturn.client import TurnClient, TurnClientError
from xdpturn.config import ConfigError
from xdpturn.fastpath import FastPathCounters, NullFastPath
from xdpturn.log import setup_logging
from xdpturn.proto.addr import ClientFlow, Family, PeerAddr, TransportAddr
from xdpturn.proto.commands import (
    AllocationClosed,
    AllocationOpened,
    ChannelRoute,
    CloseRelayPort,
    Command,
    InstallChannel,
    OpenRelayPort,
    PortResult,
    RemoveChannel,
    SendToClient,
    SendToPeer,
)
from xdpturn.proto.handover import CoreState, SavedAllocation, SavedReservation
from xdpturn.proto.paths import ChannelPath
from xdpturn.proto.ports import PortRange
from xdpturn.proto.server import AllocationInfo, RelayPorts, ServerConfig
from xdpturn.proto.stats import CoreStats
from xdpturn.server import RelayServer, StartError
from xdpturn.server import relay as relay_module
from xdpturn.server.sockets import IP_MTU_DISCOVER, IP_PMTUDISC_DO, IPV6_DONTFRAG, RelaySockets

from .helpers import (
    TEST_PORTS,
    behind_nat_config,
    local,
    loopback_config,
    recv,
    rest_credentials,
    run,
    sockaddr,
    udp,
)


class FakeCore:
    """Toy protocol: b"echo:X" -> X back; b"alloc" -> an allocation (reply: its port);
    b"send:<port>:<peer>:X" -> X to the peer from that port; b"timer:<s>" -> b"tick" after
    <s> seconds; b"boom" -> raises; b"route" -> InstallChannel + RemoveChannel. A peer datagram
    goes back to the client that allocated, prefixed with b"peer:"."""

    def __init__(self, config: ServerConfig, ports: RelayPorts) -> None:
        self.config = config
        self.ports = ports
        self.stats = CoreStats()
        self.commands: list[Command] = []
        self.owner: dict[int, ClientFlow] = {}
        self.opening: dict[int, ClientFlow] = {}
        self.deadline: float | None = None
        self.timer_client: ClientFlow | None = None
        self.closed = False

    def handle_client_datagram(self, data: bytes, flow: ClientFlow, now: float) -> None:
        verb, _, rest = data.partition(b":")
        if verb == b"echo":
            self.commands.append(SendToClient(flow, rest))
        elif verb == b"alloc":
            families = frozenset({Family.IPV4, Family.IPV6})
            port = self.ports.acquire(families)
            if port is None:
                self.commands.append(SendToClient(flow, b"full"))
                return
            self.opening[port] = flow
            self.commands.append(OpenRelayPort(port, families))
        elif verb == b"send":
            port_text, _, tail = rest.partition(b":")
            peer, _, payload = tail.partition(b"|")
            self.commands.append(
                SendToPeer(int(port_text), PeerAddr(TransportAddr.parse(peer.decode())), payload)
            )
        elif verb == b"timer":
            self.deadline = now + float(rest)
            self.timer_client = flow
        elif verb == b"boom":
            raise RuntimeError("core bug")
        elif verb == b"route":
            port = next(iter(self.owner))
            route = ChannelRoute(flow.client, 0x4000, port, PeerAddr(flow.client))
            self.commands += [
                InstallChannel(route),
                RemoveChannel(route),
                SendToClient(flow, b"ok"),
            ]

    def handle_relay_port(self, port: int, result: PortResult, now: float) -> None:
        flow = self.opening.pop(port)
        if result is not PortResult.OPENED:
            self.commands.append(SendToClient(flow, b"full"))
            return
        self.owner[port] = flow
        families = frozenset({Family.IPV4, Family.IPV6})
        self.commands.append(AllocationOpened(flow, port, families, "alice", 600))
        self.commands.append(SendToClient(flow, str(port).encode()))

    def handle_peer_datagram(
        self, data: bytes, relay_port: int, peer: PeerAddr, now: float
    ) -> None:
        self.commands.append(SendToClient(self.owner[relay_port], b"peer:" + data))

    def channel_path(self, flow: ClientFlow, number: int, now: float) -> ChannelPath | None:
        return None  # no channels: every datagram goes through the toy protocol

    def peer_path(self, relay_port: int, peer: PeerAddr, now: float) -> ChannelPath | None:
        return None

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            assert self.timer_client is not None
            self.commands.append(SendToClient(self.timer_client, b"tick"))

    def next_command(self) -> Command | None:
        return self.commands.pop(0) if self.commands else None

    def close(self, now: float) -> None:
        self.closed = True
        for port, flow in self.owner.items():
            self.ports.release(port)
            self.commands.append(CloseRelayPort(port))
            self.commands.append(AllocationClosed(flow, port, "shutdown"))
        self.owner.clear()

    def allocations(self) -> list[AllocationInfo]:
        return []

    def set_throughput(self, bps: float) -> None:
        pass

    def handle_flow_closed(self, flow: ClientFlow, now: float) -> None:
        pass  # only stream (TCP/TLS) flows close, and these tests speak UDP

    def export_state(self, now: float, wall_now: float) -> CoreState:
        return CoreState(b"\x00" * 16, ())

    def restore_state(
        self, state: CoreState, now: float, wall_now: float, listeners: int
    ) -> list[tuple[SavedAllocation, str]]:
        return []

    def give_up_reservation(self, token: bytes, now: float) -> SavedReservation | None:
        return None

    def handle_fetched_reservation(
        self, token: bytes, handed: SavedReservation | None, now: float
    ) -> None:
        pass


class RecordingFastPath(NullFastPath):
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[str] = []
        self.closed = False

    @property
    def mode(self) -> str:
        return "fake"

    def install(self, route: ChannelRoute) -> None:
        self.calls.append("install")
        if self.fail:
            raise OSError("map full")

    def remove(self, route: ChannelRoute) -> None:
        self.calls.append("remove")

    def counters(self) -> FastPathCounters:
        return FastPathCounters()

    def problem(self) -> str | None:
        return None

    def close(self) -> None:
        self.closed = True


def fake_server(fastpath: RecordingFastPath | None = None, **overrides: object) -> RelayServer:
    return RelayServer(
        loopback_config(**overrides),
        core_factory=lambda config, ports, rng: FakeCore(config, ports),
        fastpath=fastpath if fastpath is not None else RecordingFastPath(),
    )


def fake_core(server: RelayServer) -> FakeCore:
    core = server.core
    assert isinstance(core, FakeCore)
    return core


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_listens_on_both_families_and_answers_from_the_same_socket(loop: str) -> None:
    async def main() -> None:
        async with fake_server() as server:
            v4, v6 = server.listen_addresses
            assert (str(v4.ip), str(v6.ip)) == ("127.0.0.1", "::1")
            assert v4.port != 0 and v6.port != 0
            for listen, host in ((v4, "127.0.0.1"), (v6, "::1")):
                with udp(host) as client:
                    client.sendto(b"echo:hello", sockaddr(listen))
                    data, source = await recv(client)
                    assert (data, source) == (b"hello", listen)

    run(main(), loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_allocation_sockets_relay_both_ways_in_each_family(loop: str) -> None:
    async def main() -> None:
        async with fake_server() as server:
            listen = server.listen_addresses[0]
            with udp() as client, udp() as peer4, udp("::1") as peer6:
                client.sendto(b"alloc", sockaddr(listen))
                port = int((await recv(client))[0])
                assert port in TEST_PORTS
                for peer in (peer4, peer6):
                    client.sendto(f"send:{port}:{local(peer)}|data".encode(), sockaddr(listen))
                    data, source = await recv(peer)
                    assert (data, source.port) == (b"data", port)
                    peer.sendto(b"back", sockaddr(source))
                    assert await recv(client) == (b"peer:back", listen)

    run(main(), loop)


def test_address_caches_stay_bounded_and_senders_beyond_them_are_still_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The runtime remembers each sender's ClientFlow/PeerAddr and each destination's socket
    # address; a cache that is full is emptied, never grown, and a miss is only slower.
    monkeypatch.setattr(relay_module, "ADDRESS_CACHE", 2)

    async def main() -> None:
        async with fake_server() as server:
            listen = server.listen_addresses[0]
            with udp() as owner:
                owner.sendto(b"alloc", sockaddr(listen))
                port = int((await recv(owner))[0])
                for round_ in range(2):  # the second round meets caches refilled by others
                    for _ in range(3):
                        with udp() as client, udp() as peer:
                            client.sendto(b"echo:%d" % round_, sockaddr(listen))
                            assert (await recv(client))[0] == b"%d" % round_
                            message = f"send:{port}:{local(peer)}|x".encode()
                            owner.sendto(message, sockaddr(listen))
                            data, source = await recv(peer)
                            assert (data, source.port) == (b"x", port)
                            peer.sendto(b"back", sockaddr(source))
                            assert await recv(owner) == (b"peer:back", listen)
                assert all(len(cache) <= 2 for cache in server._client_flows)
                assert len(server._peer_addrs) <= 2 and len(server._sockaddrs) <= 2

    run(main())


def test_timer_is_armed_from_the_core_deadline_and_fires() -> None:
    async def main() -> None:
        async with fake_server() as server:
            with udp() as client:
                client.sendto(b"timer:0.05", sockaddr(server.listen_addresses[0]))
                assert await recv(client) == (b"tick", server.listen_addresses[0])
                assert fake_core(server).deadline is None

    run(main())


def test_a_core_exception_is_logged_and_the_relay_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with fake_server() as server:
            with udp() as client:
                client.sendto(b"boom", sockaddr(server.listen_addresses[0]))
                client.sendto(b"echo:still here", sockaddr(server.listen_addresses[0]))
                assert (await recv(client))[0] == b"still here"
            assert server.stats["core_errors"] == 1

    run(main())
    assert any("core failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_channel_commands_go_to_the_fast_path_and_a_failure_only_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fastpath = RecordingFastPath(fail=True)

    async def main() -> None:
        async with fake_server(fastpath) as server:
            with udp() as client:
                client.sendto(b"alloc", sockaddr(server.listen_addresses[0]))
                await recv(client)
                client.sendto(b"route", sockaddr(server.listen_addresses[0]))
                assert (await recv(client))[0] == b"ok"
            assert server.stats["fastpath_errors"] == 1

    run(main())
    assert fastpath.calls == ["install", "remove"]
    assert fastpath.closed
    assert any(r.getMessage() == "fast path install failed" for r in caplog.records)


def test_stop_closes_allocations_fast_path_and_every_socket() -> None:
    fastpath = RecordingFastPath()

    async def main() -> None:
        server = fake_server(fastpath)
        await server.start()
        listen = server.listen_addresses[0]
        with udp() as client:
            client.sendto(b"alloc", sockaddr(listen))
            port = int((await recv(client))[0])
        assert server.relay_port_count == 1
        await server.stop()
        assert fake_core(server).closed and fastpath.closed
        assert server.relay_port_count == 0 and server.listen_addresses == []
        assert not server.running
        # Every port is free again: binding them succeeds.
        for addr in (listen, TransportAddr.parse(f"127.0.0.1:{port}")):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(sockaddr(addr))
        await server.stop()  # idempotent

    run(main())


def test_allocation_events_are_logged_as_json_lines() -> None:
    stream = io.StringIO()
    handler = setup_logging("json", "INFO", stream)
    try:

        async def main() -> None:
            async with fake_server() as server:
                with udp() as client:
                    client.sendto(b"alloc", sockaddr(server.listen_addresses[0]))
                    await recv(client)

        run(main())
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    messages = [line["message"] for line in lines]
    assert messages == ["listening", "allocation opened", "allocation closed", "stopped"]
    started, opened, closed = lines[0], lines[1], lines[2]
    assert started["fastpath"] == "fake" and len(started["listen"]) == 2
    assert opened["level"] == "INFO" and opened["time"].endswith("Z")
    assert opened["relay_port"] in TEST_PORTS and opened["families"] == ["ipv4", "ipv6"]
    assert opened["client"].startswith("127.0.0.1:") and opened["username"] == "alice"
    assert closed["reason"] == "shutdown" and closed["allocation"] == opened["allocation"]


def _squatted_pair() -> tuple[socket.socket, int]:
    """A socket bound to some port P on 127.0.0.1 whose neighbour P + 1 was free a moment ago
    (checked by binding it ourselves); bounded retries, so a busy host fails, never skips."""
    for _ in range(50):
        squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        squatter.bind(("127.0.0.1", 0))
        taken = int(squatter.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", taken + 1))
                return squatter, taken
            except OSError:
                squatter.close()
    raise AssertionError("no port P with P + 1 free on 127.0.0.1 in 50 tries")


def test_relay_ports_taken_by_others_are_skipped_and_exhaustion_is_508() -> None:
    async def main() -> None:
        squatter, taken = _squatted_pair()
        with squatter:
            config = behind_nat_config(ports=PortRange(taken, taken + 1))
            username, password = rest_credentials()
            async with RelayServer(config) as server:
                listen = server.listen_addresses[0]
                async with await TurnClient.connect(listen, username, password) as first:
                    (relayed,) = await first.allocate(family=Family.IPV4)
                    assert relayed.port == taken + 1
                    assert server.relay_port_count == 1
                    async with await TurnClient.connect(listen, username, password) as second:
                        with pytest.raises(TurnClientError) as refused:
                            await second.allocate(family=Family.IPV4)
                        assert refused.value.code == 508
                        await first.close()  # releases the port
                        assert server.relay_port_count == 0
                        (again,) = await second.allocate(family=Family.IPV4)
                        assert again.port == taken + 1

    run(main())


def test_a_port_opened_for_dont_fragment_sends_with_df_and_others_as_the_kernel_likes() -> None:
    v4, v6 = ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")
    both = frozenset({Family.IPV4, Family.IPV6})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sockets = RelaySockets(
            loop, {Family.IPV4: v4, Family.IPV6: v6}, lambda s, p, f: None, 65536
        )
        try:
            with udp() as probe:  # a port number free in IPv4, and so likely in IPv6
                df_port = local(probe).port
            assert sockets.open(df_port, both, dont_fragment=True) is PortResult.OPENED
            assert sockets.open(0, frozenset({Family.IPV4})) is PortResult.OPENED  # 0: any
            df_v4 = sockets.socket(df_port, Family.IPV4)
            df_v6 = sockets.socket(df_port, Family.IPV6)
            plain = sockets.socket(0, Family.IPV4)
            assert df_v4 is not None and df_v6 is not None and plain is not None
            mtu_discover = df_v4.getsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER)
            assert mtu_discover == IP_PMTUDISC_DO
            assert df_v6.getsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG) == 1
            assert plain.getsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER) != IP_PMTUDISC_DO
        finally:
            sockets.close_all()

    run(main())


def test_a_busy_listen_address_is_a_start_error_naming_the_option() -> None:
    async def main() -> None:
        with udp() as squatter:
            server = fake_server(listen=[local(squatter)])
            with pytest.raises(StartError, match=r"--listen: cannot bind 127\.0\.0\.1:\d+"):
                await server.start()

    run(main())


def test_wildcard_listeners_need_a_public_address() -> None:
    async def main() -> None:
        with pytest.raises(ConfigError, match="--public-ipv4"):
            await fake_server(listen=[TransportAddr.parse("0.0.0.0:0")]).start()

    run(main())
