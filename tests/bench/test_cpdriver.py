"""The control-plane driver (`cpdriver`) against a real `xdpturn serve` on loopback: every
sequence it counts as done left an allocation with a permission and a channel on the relay, and
a refused request is counted as a failure with its error code, not as a success."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.server.test_metrics import scrape, value
from tests.support import Serve
from xdpturn.proto.addr import TransportAddr
from xdpturn_lab.bench import cpdriver

SECRET = "s3cret"
PEER = TransportAddr.parse("127.0.0.1:9")  # never sent to: the driver only binds a channel


@pytest.fixture
def relay() -> Iterator[tuple[TransportAddr, TransportAddr]]:
    with Serve(
        [
            "--listen", "127.0.0.1:0",
            "--public-ipv4", "203.0.113.1",  # peers on loopback are then plain peers
            "--auth-secret", SECRET,
            "--ports", "20000-29999",
            "--allow-peer", "127.0.0.0/8",
            "--metrics", "127.0.0.1:0",
            "--log-format", "json",
        ]
    ) as proc:  # fmt: skip
        listen = proc.wait_for("listening")["listen"]
        assert isinstance(listen, list)
        metrics = proc.wait_for("metrics listening")["metrics"]
        yield TransportAddr.parse(listen[0]), TransportAddr.parse(str(metrics))


def _run(server: TransportAddr, secret: str, count: int, window: int) -> dict[str, object]:
    args = cpdriver.driver_args(server, PEER, secret, 0, count, window)
    with cpdriver.DriverProcess([], args, timeout=30.0) as driver:
        driver.wait_ready()
        driver.go()
        return driver.result()


def _gauge(metrics: TransportAddr, name: str) -> float:
    scraped = asyncio.run(scrape(metrics))
    return value(scraped, name, family="ipv4")


def test_every_counted_sequence_is_an_allocation_with_a_channel(
    relay: tuple[TransportAddr, TransportAddr],
) -> None:
    server, metrics = relay
    result = _run(server, SECRET, count=40, window=8)
    assert (result["succeeded"], result["failed"], result["errors"]) == (40, 0, {})
    assert _gauge(metrics, "xdpturn_allocations") == 40
    assert _gauge(metrics, "xdpturn_permissions") == 40
    assert _gauge(metrics, "xdpturn_channels") == 40


def test_a_wrong_secret_fails_every_sequence_with_401(
    relay: tuple[TransportAddr, TransportAddr],
) -> None:
    server, metrics = relay
    result = _run(server, "not-the-secret", count=5, window=5)
    assert (result["succeeded"], result["failed"]) == (0, 5)
    errors = result["errors"]
    assert isinstance(errors, dict) and list(errors.values()) == [5], errors
    assert next(iter(errors)).startswith("allocate (authenticated): 401 "), errors
    assert _gauge(metrics, "xdpturn_allocations") == 0
