"""--state-dir in the runtime, Python path only (the kernel path: tests/e2e/test_restart.py): a
relay stopped for a restart saves its allocations, the next one carries on with them on the same
ports, and a state it cannot read makes it start clean, saying why."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from pathlib import Path

import pytest

from xdpturn.client.turn import TurnClient, TurnClientError
from xdpturn.config import ConfigError, ServeConfig
from xdpturn.proto.addr import TransportAddr
from xdpturn.server import RelayServer
from xdpturn.server.restart import STATE_FILE

from .helpers import TIMEOUT, behind_nat_config, local, recv, rest_credentials, run, udp


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


def test_a_state_dir_with_several_workers_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        behind_nat_config(state_dir=tmp_path / "state", workers=2)
    assert caught.value.option == "--state-dir"
    assert "--workers 1" in str(caught.value)
