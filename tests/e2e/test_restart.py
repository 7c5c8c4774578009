"""Issue 15 part 1: a restart with --state-dir loses nothing on bound channels.

Four clients behind NAT (the four channel <-> UDP family pairs) exchange datagrams with plain UDP
peers at a steady rate, both ways, through bound channels. In the middle, the relay gets SIGINT
(stop for a restart: its XDP program stays attached, its maps pinned, its state saved) and a new
`xdpturn serve` with the same configuration takes over. Every datagram arrives, including those
sent while no relay process ran; every old allocation is refreshed on the new process. The same
with a changed BPF object (another build of the program) for the new process; and with several
worker processes, the new relay running as many workers as the old one or another number. And a
state that cannot be taken over (another format, truncated, corrupt, a pinned map gone) makes the
new process start clean, saying why, with nothing of the old one left.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import run
from xdpturn.client.turn import TurnClientError
from xdpturn.fastpath import pinning
from xdpturn.fastpath.xdp import OBJECT_PATH
from xdpturn.proto.addr import Family
from xdpturn_lab.testbed import Testbed
from xdpturn_lab.testbed.scenario import (
    INTERNET_HOST_IPV4,
    INTERNET_HOST_IPV6,
    EndpointSpec,
    RelayProcess,
    TurnEndpoint,
    UdpPeer,
    datagram,
    sequence_of,
    xdp_attached,
)
from xdpturn_lab.testbed.testbed import RelayNode

pytestmark = pytest.mark.kernel

V4, V6 = Family.IPV4, Family.IPV6
ROUTES = [(V4, V4), (V6, V6), (V4, V6), (V6, V4)]  # (client transport, relayed family)
INTERVAL = 0.005  # seconds between datagrams, per direction and route (200/s each, 1600/s in all)
SIZE = 200
BEFORE = 1.0  # seconds of traffic before the restart, and after it
SETTLE = 3.0  # seconds at most for the last datagrams to arrive


@pytest.fixture
def bpffs(tmp_path: Path) -> Iterator[Path]:
    """A bpffs in this (the host's) mount namespace: `ip netns exec` gives each relay process a
    private /sys, whose own bpffs would die with it."""
    root = tmp_path / "bpffs"
    root.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def build_variant(tmp_path: Path, define: str) -> Path:
    """The program built with `define` (NAME=VALUE) on the compiler's command line."""
    out = tmp_path / "variant.bpf.o"
    multiarch = subprocess.run(
        ["gcc", "-print-multiarch"], capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(
        [
            "clang-16",
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-Wall",
            "-Werror",
            f"-I/usr/include/{multiarch}",
            f"-D{define}",
            "-c",
            "main.c",
            "-o",
            str(out),
        ],
        cwd=OBJECT_PATH.parent,
        check=True,
    )
    assert out.read_bytes() != OBJECT_PATH.read_bytes()
    return out


@pytest.fixture
def variant_object(tmp_path: Path) -> Path:
    """Another build of the program: other instructions, the same maps."""
    return build_variant(tmp_path, "XDPTURN_BUILD_ID=7")


def attached_prog_id(tb: Testbed, node: RelayNode) -> int | None:
    out = subprocess.run(
        ["ip", "-j", "-n", node.netns, "link", "show", "dev", node.interface],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for link in json.loads(out):
        xdp: dict[str, Any] = link.get("xdp", {})
        prog = xdp.get("prog", {})
        if "id" in prog:
            return int(prog["id"])
    return None


def state_args(state_dir: Path, bpffs: Path) -> list[str]:
    return ["--state-dir", str(state_dir), "--bpffs", str(bpffs)]


@dataclass
class Direction:
    """Datagrams one way on one route: what was sent (with when), what arrived."""

    name: str
    sent: list[float] = field(default_factory=list)  # send time of datagram i
    got: set[int] = field(default_factory=set)

    def lost(self) -> list[int]:
        return sorted(set(range(len(self.sent))) - self.got)

    def sent_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.sent if start <= t <= end)


@dataclass
class Route:
    client: TurnEndpoint
    peer: UdpPeer
    up: Direction
    down: Direction


async def open_routes(world: Testbed, relay: RelayProcess) -> list[Route]:
    routes = []
    for transport, relayed in ROUTES:
        name = f"{transport.name.lower()}-to-{relayed.name.lower()}"
        peer_ip = INTERNET_HOST_IPV4 if relayed is V4 else INTERNET_HOST_IPV6
        peer = await UdpPeer.open(f"peer-{name}", world.inet_netns, peer_ip)
        spec = EndpointSpec(world, "client", relay.server(transport), family=relayed)
        client = await TurnEndpoint.open(spec)
        await client.connect_to(peer.address)
        peer.target = client.relayed_of(relayed)
        routes.append(Route(client, peer, Direction(f"{name} up"), Direction(f"{name} down")))
    return routes


async def send_steadily(send: Callable[[bytes], None], d: Direction, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not stop.is_set():
        d.sent.append(time.monotonic())
        send(datagram(len(d.sent) - 1, SIZE))
        # Paced against the start, so a slow iteration does not lower the rate.
        await asyncio.sleep(max(0.0, start + len(d.sent) * INTERVAL - loop.time()))


async def receive(recv: Callable[[], Any], d: Direction) -> None:
    while True:
        seq = sequence_of(await recv())
        if seq is not None:
            d.got.add(seq)


@dataclass
class Restart:
    gap: tuple[float, float]  # no relay process ran in between (monotonic times)
    new: RelayProcess


def whole_relay(record: dict[str, Any]) -> bool:
    """A record of the relay as a whole: the one process's, or the workers' supervisor's (a
    worker's records name it)."""
    return "worker" not in record


def restart(
    world: Testbed,
    old: RelayProcess,
    args: list[str],
    expect_restored: int | None,
    workers: int = 1,
) -> Restart:
    """SIGINT the old relay, start a new one with `args` and `workers`; waits for its "restored"
    record (with workers, the supervisor's: every worker has restored its share)."""
    node = old.relay
    assert old.interrupt() == 0, old.tail()
    gap_start = time.monotonic()
    assert xdp_attached(world, node, node.interface), "the program left with the process"
    new = RelayProcess(world, node, fastpath=True, extra_args=args, workers=workers)
    new.start()
    gap_end = time.monotonic()
    if expect_restored is not None:
        restored = new.wait_for("restored", where=whole_relay)
        assert restored["allocations"] == expect_restored, new.tail()
    return Restart((gap_start, gap_end), new)


def run_restart(
    world: Testbed,
    state_dir: Path,
    bpffs: Path,
    new_object: Path | None = None,
    workers: tuple[int, int] = (1, 1),
) -> None:
    """The whole scenario: traffic on 4 routes, a restart in the middle, then checks.
    `workers`: the old relay's and the new one's."""
    args = state_args(state_dir, bpffs)
    old = RelayProcess(world, "relay", fastpath=True, extra_args=args, workers=workers[0])
    old.start()
    new_args = [*args, *(["--bpf-object", str(new_object)] if new_object else [])]
    done: list[Restart] = []
    old_prog = attached_prog_id(world, old.relay)
    try:

        async def scenario() -> list[Route]:
            routes = await open_routes(world, old)
            stop = asyncio.Event()
            tasks = []
            for r in routes:
                tasks += [
                    asyncio.create_task(send_steadily(r.client.send, r.up, stop)),
                    asyncio.create_task(send_steadily(r.peer.send, r.down, stop)),
                    asyncio.create_task(receive(r.peer.recv, r.up)),
                    asyncio.create_task(receive(r.client.recv, r.down)),
                ]
            try:
                await asyncio.sleep(BEFORE)
                done.append(
                    await asyncio.to_thread(restart, world, old, new_args, len(routes), workers[1])
                )
                for r in routes:
                    # Each old allocation goes on, on the new process.
                    assert await r.client.client.refresh() > 0
                    assert r.client.peer is not None
                    await r.client.client.create_permission(r.client.peer)
                    assert await r.client.client.bind_channel(r.client.peer) == r.client.channel
                await asyncio.sleep(BEFORE)
                stop.set()
                deadline = time.monotonic() + SETTLE
                while time.monotonic() < deadline and any(
                    d.lost() for r in routes for d in (r.up, r.down)
                ):
                    await asyncio.sleep(0.05)
                return routes
            finally:
                stop.set()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for r in routes:
                    await r.client.close()
                    r.peer.close()

        routes = run(scenario())
    finally:
        if old.returncode is None:
            old.stop()
    new = done[0].new
    try:
        new_prog = attached_prog_id(world, new.relay)
        assert new_prog is not None and new_prog != old_prog  # the new object runs
    finally:
        assert new.stop() == 0  # SIGTERM; asserts the program is detached
    gap_start, gap_end = done[0].gap
    for r in routes:
        for d in (r.up, r.down):
            assert d.lost() == [], f"{d.name}: lost {len(d.lost())} of {len(d.sent)}"
            # Datagrams flowed while no relay process ran: the kernel carried them.
            assert d.sent_between(gap_start, gap_end) > 0, d.name
    assert "fast path adopted: 4 routes kept, 0 stale entries removed" in [
        rec.get("message") for rec in new.records
    ]
    if workers[1] > 1:
        # Every worker took its share, round the workers in the order of the relay ports.
        shares = {
            rec["worker"]: rec["allocations"]
            for rec in new.records
            if rec.get("message") == "restored" and "worker" in rec
        }
        assert shares == {w: len(range(w, len(ROUTES), workers[1])) for w in range(workers[1])}
    assert not (state_dir / "state.json").exists()  # spent
    assert not any((bpffs / "xdpturn").glob("*/*"))  # pins removed once adopted


def test_restart_keeps_bound_channels_flowing(world: Testbed, tmp_path: Path, bpffs: Path) -> None:
    run_restart(world, tmp_path / "state", bpffs)


def test_upgrade_to_a_changed_program_keeps_bound_channels_flowing(
    world: Testbed, tmp_path: Path, bpffs: Path, variant_object: Path
) -> None:
    run_restart(world, tmp_path / "state", bpffs, new_object=variant_object)


@pytest.mark.parametrize(
    "workers", [(2, 2), (1, 2), (2, 1)], ids=["2-to-2-workers", "1-to-2-workers", "2-to-1-worker"]
)
def test_restart_with_workers_keeps_bound_channels_flowing(
    world: Testbed, tmp_path: Path, bpffs: Path, workers: tuple[int, int]
) -> None:
    """Every worker's allocations are handed over, to as many workers or to another number."""
    run_restart(world, tmp_path / "state", bpffs, workers=workers)


def _another_version(state_dir: Path, pins: Path) -> None:
    """A whole, well-formed file whose core state is of another format."""
    envelope = json.loads((state_dir / "state.json").read_text())
    envelope["body"]["core"]["format"] = 99
    text = json.dumps(envelope["body"], sort_keys=True, separators=(",", ":"))
    envelope["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (state_dir / "state.json").write_text(json.dumps(envelope))


def _truncate(state_dir: Path, pins: Path) -> None:
    data = (state_dir / "state.json").read_bytes()
    (state_dir / "state.json").write_bytes(data[: len(data) // 2])


def _flip_a_byte(state_dir: Path, pins: Path) -> None:
    data = bytearray((state_dir / "state.json").read_bytes())
    at = data.index(b'"relay_port":') + len(b'"relay_port":')
    data[at] = ord("1") if data[at] != ord("1") else ord("2")
    (state_dir / "state.json").write_bytes(bytes(data))


def _remove_a_pinned_map(state_dir: Path, pins: Path) -> None:
    (pins / "maps" / "udp_to_chan").unlink()


@pytest.mark.parametrize(
    ("damage", "reason", "workers"),
    [
        (_another_version, "format 99", 1),
        (_truncate, "not whole JSON", 1),
        (_flip_a_byte, "does not match its digest", 1),
        (_remove_a_pinned_map, "pinned map udp_to_chan missing", 1),
        (_flip_a_byte, "does not match its digest", 2),
        (_remove_a_pinned_map, "pinned map udp_to_chan missing", 2),
    ],
    ids=[
        "other-format",
        "truncated",
        "corrupt",
        "pinned-map-missing",
        "corrupt-workers",
        "pinned-map-missing-workers",
    ],
)
def test_a_state_that_cannot_be_taken_over_starts_clean(
    world: Testbed,
    tmp_path: Path,
    bpffs: Path,
    damage: Callable[[Path, Path], None],
    reason: str,
    workers: int,
) -> None:
    state_dir = tmp_path / "state"
    args = state_args(state_dir, bpffs)
    old = RelayProcess(world, "relay", fastpath=True, extra_args=args, workers=workers)
    old.start()
    pins = pinning.pin_dir_for(state_dir, bpffs)
    old_prog = attached_prog_id(world, old.relay)
    started: list[RelayProcess] = []

    def stop_and_damage() -> RelayProcess:
        assert old.interrupt() == 0
        assert (state_dir / "state.json").exists() and (pins / "program").exists()
        damage(state_dir, pins)
        started.append(
            RelayProcess(world, "relay", fastpath=True, extra_args=args, workers=workers)
        )
        started[-1].start()
        return started[-1]

    try:

        async def scenario() -> RelayProcess:
            peer = await UdpPeer.open("peer", world.inet_netns, INTERNET_HOST_IPV4)
            client = await TurnEndpoint.open(EndpointSpec(world, "client", old.server(V4)))
            try:
                await client.connect_to(peer.address)
                new = await asyncio.to_thread(stop_and_damage)
                with pytest.raises(TurnClientError) as caught:
                    await client.client.refresh()
                assert caught.value.code == 437  # the allocation did not survive
                return new
            finally:
                client.abandon()
                peer.close()

        new = run(scenario())
        clean = new.wait_for("starting clean")
        assert reason in clean["reason"], clean
        assert "restored" not in [r.get("message") for r in new.records]
        # Nothing half adopted: no pins, no state file, a program of the new process's own.
        assert not pins.exists()
        assert not (state_dir / "state.json").exists()
        assert attached_prog_id(world, new.relay) not in (None, old_prog)
        assert new.stop() == 0  # and it detaches when stopped
    finally:
        if old.returncode is None:
            old.stop()
        for process in started:
            if process.returncode is None:
                process.stop()
        shutil.rmtree(pins, ignore_errors=True)


def test_a_program_whose_maps_differ_is_refused_and_the_old_one_keeps_relaying(
    world: Testbed, tmp_path: Path, bpffs: Path
) -> None:
    """A new object whose route maps have another size cannot take the pinned ones over: the
    new process refuses to start, naming the map; the old program keeps relaying the bound
    channel; `xdpturn detach` then stops it for good."""
    state_dir = tmp_path / "state"
    args = state_args(state_dir, bpffs)
    other = build_variant(tmp_path, "XDPTURN_MAX_ROUTES=1024")
    old = RelayProcess(world, "relay", fastpath=True, extra_args=args)
    old.start()
    node = old.relay
    pins = pinning.pin_dir_for(state_dir, bpffs)
    refused: list[subprocess.CompletedProcess[str]] = []

    def stop_and_upgrade() -> None:
        assert old.interrupt() == 0
        argv = RelayProcess(world, node, fastpath=True, extra_args=args).argv()
        refused.append(
            world.run(
                node,
                [*argv, "--bpf-object", str(other)],
                check=False,
                capture_output=True,
                text=True,
                timeout=30,
            )
        )

    try:

        async def scenario() -> tuple[Direction, Direction]:
            peer = await UdpPeer.open("peer", world.inet_netns, INTERNET_HOST_IPV4)
            client = await TurnEndpoint.open(EndpointSpec(world, "client", old.server(V4)))
            up, down = Direction("up"), Direction("down")
            try:
                await client.connect_to(peer.address)
                peer.target = client.relayed_of(V4)
                await asyncio.to_thread(stop_and_upgrade)
                # No relay process runs now; the kernel still relays both ways.
                tasks = [
                    asyncio.create_task(receive(peer.recv, up)),
                    asyncio.create_task(receive(client.recv, down)),
                ]
                for seq in range(100):
                    up.sent.append(time.monotonic())
                    client.send(datagram(seq, SIZE))
                    down.sent.append(time.monotonic())
                    peer.send(datagram(seq, SIZE))
                    await asyncio.sleep(INTERVAL)
                deadline = time.monotonic() + SETTLE
                while time.monotonic() < deadline and (up.lost() or down.lost()):
                    await asyncio.sleep(0.05)
                for t in tasks:
                    t.cancel()
                return up, down
            finally:
                client.abandon()
                peer.close()

        up, down = run(scenario())
        assert refused[0].returncode == 1
        assert "cannot take over the running XDP program: map chan_to_udp" in refused[0].stderr
        assert "xdpturn detach" in refused[0].stderr
        assert up.lost() == [] and down.lost() == []
        assert (state_dir / "state.json").exists() and (pins / "program").exists()
        detach = [*RelayProcess(world, node, fastpath=True).argv()[:3], "detach"]
        world.run(node, [*detach, *args[:2], "--bpffs", str(bpffs)], check=True)
        assert not xdp_attached(world, node, node.interface)
        assert not pins.exists() and not (state_dir / "state.json").exists()
    finally:
        subprocess.run(
            ["ip", "-n", node.netns, "link", "set", "dev", node.interface, "xdp", "off"],
            check=False,
        )
        shutil.rmtree(pins, ignore_errors=True)
