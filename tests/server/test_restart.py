"""--state-dir in the runtime, Python path only (the kernel path: tests/e2e/test_restart.py): a
relay stopped for a restart saves its allocations, the next one carries on with them on the same
ports, and a state it cannot read makes it start clean, saying why."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.support import BOUNDED, Serve
from xdpturn.client.turn import TurnClient, TurnClientError
from xdpturn.config import ServeConfig
from xdpturn.fastpath import NullFastPath
from xdpturn.proto import stun
from xdpturn.proto.addr import ClientAddr, ClientFlow, Family, Transport, TransportAddr
from xdpturn.proto.handover import CoreState, SavedAllocation, StateError
from xdpturn.proto.stun import MessageClass, Method
from xdpturn.server import RelayServer
from xdpturn.server.relay import bind_udp_listeners
from xdpturn.server.restart import STATE_FILE, SavedRelay, merge, partition
from xdpturn.server.sockets import bound_address

from .helpers import (
    PUBLIC_V4,
    SECRET,
    TEST_PORTS,
    TIMEOUT,
    behind_nat_config,
    local,
    recv,
    rest_credentials,
    run,
    sockaddr,
    udp,
)

CLIENTS = 4  # allocations handed over in the workers' test


def fixed_port_config(state_dir: Path) -> ServeConfig:
    """A relay on a fixed port (the next process must listen where the clients are)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return behind_nat_config(
        listen=[TransportAddr.parse(f"127.0.0.1:{port}")], state_dir=state_dir, workers=1
    )


def test_a_restarted_relay_carries_on_with_the_allocations(tmp_path: Path) -> None:
    config = fixed_port_config(tmp_path / "state")

    async def scenario() -> None:
        peer = udp()
        first = RelayServer(config)
        await first.start()
        client = await TurnClient.connect(first.listen_addresses[0], *rest_credentials())
        try:
            await asyncio.wait_for(client.allocate(), TIMEOUT)
            await asyncio.wait_for(client.bind_channel(local(peer)), TIMEOUT)
            relayed = client.relayed[0]
            await first.stop(for_restart=True)
            assert (tmp_path / "state" / STATE_FILE).exists()

            second = RelayServer(config)
            await second.start()
            try:
                assert [a.relay_port for a in second.allocations()] == [relayed.port]
                assert not (tmp_path / "state" / STATE_FILE).exists()  # taken over once
                assert await asyncio.wait_for(client.refresh(), TIMEOUT) > 0
                client.send(local(peer), b"to the peer")
                data, source = await recv(peer)
                assert (data, source.port) == (b"to the peer", relayed.port)
                peer.sendto(b"to the client", ("127.0.0.1", relayed.port))
                assert await asyncio.wait_for(client.recv(), TIMEOUT) == (
                    local(peer),
                    b"to the client",
                )
                await asyncio.wait_for(client.close(), TIMEOUT)
            finally:
                await second.stop()
        finally:
            peer.close()

    run(scenario())


def test_a_plain_stop_saves_nothing(tmp_path: Path) -> None:
    config = fixed_port_config(tmp_path / "state")

    async def scenario() -> None:
        relay = RelayServer(config)
        await relay.start()
        await relay.stop()

    run(scenario())
    assert not (tmp_path / "state" / STATE_FILE).exists()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"format": 1, "sha', "not whole JSON"),
        (b'{"format": 7}', "format 7"),
        (b"\xff\xfe", "not whole JSON"),
    ],
)
def test_an_unreadable_state_starts_clean_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, why: str
) -> None:
    config = fixed_port_config(tmp_path / "state")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / STATE_FILE).write_bytes(content)

    async def scenario() -> None:
        relay = RelayServer(config)
        with caplog.at_level(logging.INFO, logger="xdpturn.server"):
            await relay.start()
        try:
            assert relay.allocations() == []
        finally:
            await relay.stop()

    run(scenario())
    [clean] = [r for r in caplog.records if r.getMessage() == "starting clean"]
    assert why in clean.__dict__["reason"]
    assert clean.levelno == logging.WARNING
    assert not (tmp_path / "state" / STATE_FILE).exists()


def test_an_allocation_from_a_saved_state_whose_port_is_taken_is_dropped(tmp_path: Path) -> None:
    config = fixed_port_config(tmp_path / "state")

    async def scenario() -> None:
        first = RelayServer(config)
        await first.start()
        client = await TurnClient.connect(first.listen_addresses[0], *rest_credentials())
        try:
            await asyncio.wait_for(client.allocate(), TIMEOUT)
            port = client.relayed[0].port
            await first.stop(for_restart=True)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
                squatter.bind(("127.0.0.1", port))
                second = RelayServer(config)
                await second.start()
                try:
                    assert second.allocations() == []
                    with pytest.raises(TurnClientError) as caught:
                        await asyncio.wait_for(client.refresh(), TIMEOUT)
                    assert caught.value.code == 437
                finally:
                    await second.stop()
        finally:
            with contextlib.suppress(TurnClientError, TimeoutError):
                await asyncio.wait_for(client.close(), TIMEOUT)

    run(scenario())


def test_the_state_file_is_the_relay_users_only(tmp_path: Path) -> None:
    """It holds long-term keys (hashes of the passwords) and the nonce key: readable by the
    relay's user only."""
    config = fixed_port_config(tmp_path / "state")

    async def scenario() -> None:
        relay = RelayServer(config)
        await relay.start()
        client = await TurnClient.connect(relay.listen_addresses[0], *rest_credentials())
        try:
            await asyncio.wait_for(client.allocate(), TIMEOUT)
            await relay.stop(for_restart=True)
        finally:
            with contextlib.suppress(TurnClientError, TimeoutError):
                await asyncio.wait_for(client.close(), 1.0)

    run(scenario())
    path = tmp_path / "state" / STATE_FILE
    assert path.stat().st_mode & 0o077 == 0
    assert "s3cret" not in path.read_text()
    assert json.loads(path.read_text())["format"] == 1


class WorkersRelay(Serve):
    """`xdpturn serve --workers N --state-dir DIR` on a fixed loopback port, Python path only;
    every log record is kept."""

    def __init__(self, state_dir: Path, port: int, workers: int, *extra: str) -> None:
        args = [
            "--listen", f"127.0.0.1:{port}",
            "--public-ipv4", str(PUBLIC_V4),
            "--auth-secret", SECRET,
            "--realm", "test.example",
            "--ports", str(TEST_PORTS),
            "--allow-peer", "127.0.0.0/8",
            "--log-format", "json",
            "--workers", str(workers),
            "--state-dir", str(state_dir),
            "--drain-timeout", "2",
            *extra,
        ]  # fmt: skip
        super().__init__(args, env={"XDPTURN_WORKERS": str(workers)})

    def interrupt(self) -> int:
        """SIGINT (with --state-dir: stop for a restart); the exit status."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=BOUNDED)


def whole_relay(record: dict[str, Any]) -> bool:
    return "worker" not in record  # a worker's records name it


def of_worker(worker: int) -> Callable[[dict[str, Any]], bool]:
    return lambda record: record.get("worker") == worker


@pytest.mark.parametrize("counts", [(2, 3), (3, 1)], ids=["2-to-3-workers", "3-to-1-worker"])
def test_every_workers_allocations_carry_on_after_a_restart(
    tmp_path: Path, counts: tuple[int, int]
) -> None:
    """The old relay's workers each hand their allocations over; the new relay, with another
    number of workers, deals them out round its workers, carries on with every one (refresh,
    channel, data both ways, the old nonce), and counts them against the quotas again."""
    state_dir = tmp_path / "state"
    port = fixed_port_config(state_dir).listen[0].port
    quota = ["--max-allocations-per-ip", str(CLIENTS)]
    old, new_count = WorkersRelay(state_dir, port, counts[0], *quota), counts[1]
    relays = [old]

    async def scenario() -> None:
        server = TransportAddr.parse(f"127.0.0.1:{port}")
        peer = udp()
        clients: list[TurnClient] = []
        try:
            old.record("listening", whole_relay)
            for _ in range(CLIENTS):
                client = await TurnClient.connect(server, *rest_credentials())
                clients.append(client)
                await asyncio.wait_for(client.allocate(), TIMEOUT)
                await asyncio.wait_for(client.bind_channel(local(peer)), TIMEOUT)
            assert await asyncio.to_thread(old.interrupt) == 0
            saved = json.loads((state_dir / STATE_FILE).read_text())["body"]["core"]
            assert len(saved["allocations"]) == CLIENTS

            new = WorkersRelay(state_dir, port, new_count, *quota)
            relays.append(new)
            restored = await asyncio.to_thread(new.record, "restored", whole_relay)
            assert restored["allocations"] == CLIENTS
            if new_count > 1:
                shares = {}
                for worker in range(new_count):
                    share = await asyncio.to_thread(new.record, "restored", of_worker(worker))
                    shares[worker] = share["allocations"]
                assert shares == {w: len(range(w, CLIENTS, new_count)) for w in range(new_count)}
            assert not (state_dir / STATE_FILE).exists()  # taken over once

            for index, client in enumerate(clients):
                assert await asyncio.wait_for(client.refresh(), TIMEOUT) > 0
                assert await asyncio.wait_for(client.bind_channel(local(peer)), TIMEOUT)
                client.send(local(peer), b"up %d" % index)
                data, source = await recv(peer)
                assert (data, source.port) == (b"up %d" % index, client.relayed[0].port)
                peer.sendto(b"down %d" % index, ("127.0.0.1", client.relayed[0].port))
                assert await asyncio.wait_for(client.recv(), TIMEOUT) == (
                    local(peer),
                    b"down %d" % index,
                )
            # The supervisor counted the restored allocations: the address's quota is full.
            extra = await TurnClient.connect(server, *rest_credentials())
            try:
                with pytest.raises(TurnClientError) as caught:
                    await asyncio.wait_for(extra.allocate(), TIMEOUT)
                assert caught.value.code == 486
            finally:
                await extra.close()
        finally:
            for client in clients:
                with contextlib.suppress(TurnClientError, TimeoutError):
                    await asyncio.wait_for(client.close(), TIMEOUT)
            peer.close()

    try:
        run(scenario())
    finally:
        for relay in relays:
            relay.stop()
    assert relays[-1].proc.returncode == 0


def test_a_state_is_dealt_out_round_the_workers_in_port_order_and_merged_back() -> None:
    state = handed_over_state(ports=[20010, 20004, 20002, 20008, 20006])
    parts = partition(state, 2)
    assert [[a.relay_port for a in part.allocations] for part in parts] == [
        [20002, 20006, 20010],
        [20004, 20008],
    ]
    assert all(part.nonce_key == state.nonce_key for part in parts)
    merged = merge(partition(state, 3))
    assert sorted(a.relay_port for a in merged.allocations) == [20002, 20004, 20006, 20008, 20010]
    assert merged.nonce_key == state.nonce_key
    assert [len(part.allocations) for part in partition(state, 7)] == [1, 1, 1, 1, 1, 0, 0]


def test_workers_states_with_different_nonce_keys_are_not_merged() -> None:
    one, other = handed_over_state([20002]), handed_over_state([20004])
    with pytest.raises(StateError):
        merge([one, replace(other, nonce_key=bytes(16))])


def handed_over_state(ports: list[int]) -> CoreState:
    """A core's state with one allocation on each of `ports`."""
    allocation = SavedAllocation(
        flow=ClientFlow(ClientAddr(TransportAddr.parse("192.0.2.1:5000")), 0, Transport.UDP),
        username="user",
        key=bytes(16),
        relay_port=0,
        families=frozenset({Family.IPV4}),
        expires=1_900_000_600.0,
        allocate_transaction=bytes(12),
        allocate_response=b"",
        dont_fragment=False,
        permissions={},
        channels=(),
    )
    return CoreState(
        nonce_key=b"k" * 16,
        allocations=tuple(replace(allocation, relay_port=port) for port in ports),
    )


class SiblingShare:
    """A worker's Handover, as the supervisor gives it: an empty share of its own, and the flow
    of an allocation another worker restores."""

    def __init__(self, elsewhere: ClientFlow) -> None:
        self._elsewhere = frozenset({elsewhere})

    def saved(self) -> SavedRelay | None:
        return SavedRelay(CoreState(nonce_key=bytes(16), allocations=()), None, time.time())

    def restored(self, allocations: int) -> None:
        pass

    def elsewhere(self) -> frozenset[ClientFlow]:
        return self._elsewhere

    def keep(self, core: CoreState, fastpath: dict[str, Any] | None, wall_now: float) -> str:
        raise AssertionError("not stopped for a restart here")

    def abandon(self) -> None:
        pass


def test_what_queued_for_another_workers_allocation_is_dropped_not_answered() -> None:
    """Datagrams that queued on a worker's listener before every worker had restored its share:
    those of a client another worker restores are dropped (its retransmission will reach that
    worker), the others answered."""
    config = behind_nat_config(listen=[TransportAddr.parse("127.0.0.1:0")])
    [listener] = bind_udp_listeners(config.listen, 1 << 16)
    other_workers, newcomer = udp(), udp()
    flow = ClientFlow(ClientAddr(local(other_workers)))

    async def scenario() -> None:
        server = sockaddr(bound_address(listener))
        for sock in (other_workers, newcomer):
            request = stun.Message(Method.BINDING, MessageClass.REQUEST, os.urandom(12))
            sock.sendto(stun.encode(request), server)
        relay = RelayServer(
            config,
            fastpath=NullFastPath(),
            listeners=[listener],
            handover=SiblingShare(flow),
        )
        await relay.start()
        try:
            answer, _ = await recv(newcomer)
            assert stun.decode(answer).cls is MessageClass.SUCCESS
            assert relay.stats["listener_restored_elsewhere"] == 1
            # Sorted out in start(): an answer would be queued on the socket by now.
            with pytest.raises(BlockingIOError):
                other_workers.recvfrom(2048)
        finally:
            await relay.stop()

    try:
        run(scenario())
    finally:
        other_workers.close()
        newcomer.close()


def test_a_restart_missing_a_workers_state_keeps_nothing(tmp_path: Path) -> None:
    """SIGINT while one worker cannot answer (stopped, then killed): the other worker's state
    alone is not saved; the relay stops for good, saying which worker's state is missing."""
    state_dir = tmp_path / "state"
    port = fixed_port_config(state_dir).listen[0].port
    relay = WorkersRelay(state_dir, port, 2)
    try:
        listening = relay.record("listening", whole_relay)
        hung = listening["pids"][1]
        os.kill(hung, signal.SIGSTOP)
        relay.proc.send_signal(signal.SIGINT)
        relay.record("state saved for a restart", of_worker(0))
        os.kill(hung, signal.SIGKILL)
        missing = relay.record("workers' states missing; stopping for good")
        assert missing["workers"] == [1]
        assert relay.proc.wait(timeout=BOUNDED) == 1
        stopped = relay.record("stopped", whole_relay)
        assert stopped["for_restart"] is False
        assert not (state_dir / STATE_FILE).exists()
    finally:
        relay.stop()


def test_sigint_while_the_workers_start_is_still_a_stop_for_a_restart(tmp_path: Path) -> None:
    """SIGINT as soon as the first worker listens (the others may still be starting): every
    worker hands its state over and the relay exits cleanly, not with a worker's
    KeyboardInterrupt."""
    state_dir = tmp_path / "state"
    port = fixed_port_config(state_dir).listen[0].port
    relay = WorkersRelay(state_dir, port, 3)
    try:
        relay.record("listening", lambda record: "worker" in record)
        assert relay.interrupt() == 0
        assert relay.record("stopped", whole_relay)["for_restart"] is True
        assert (state_dir / STATE_FILE).exists()
    finally:
        relay.stop()
