"""`xdpturn serve --workers 2`: what works with one worker works with two.

The kernel spreads clients over the workers by 4-tuple (SO_REUSEPORT), which a test cannot
choose; so each test opens clients until the relay's log (every worker's record names it) or its
/status shows the cases it needs on both workers, bounded in tries.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import BOUNDED, Serve
from tests.tls_support import make_certificate
from xdpturn.cli.ops import render
from xdpturn.client import TurnClient, open_tcp
from xdpturn.client.turn import ClientOptions, TransportOpener, TurnClientError, open_udp
from xdpturn.config import ConfigError, available_cpus, load_serve_config
from xdpturn.proto import stun
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.stun import AttrType, MessageClass, Method

from .helpers import SECRET, TIMEOUT, local, recv, rest_credentials, run, sockaddr, udp
from .test_metrics import http, scrape, value

WORKERS = 2
# Tries at getting a client onto a given worker: each lands on it with probability 1/2, so
# missing it 40 times in a row (2**-40) is not a flake this suite will see.
TRIES = 40
OPTIONS = ClientOptions(reliable_timeout=TIMEOUT)
# The relay tells clients this but listens on loopback, as behind 1:1 NAT: loopback peers are then
# plain peers (see helpers.PUBLIC_V4).
PUBLIC_NAT = "203.0.113.1"


class Workers(Serve):
    """`xdpturn serve --workers 2` on loopback; every log record is kept, for `record()`."""

    def __init__(self, *extra: str, public: str | None = PUBLIC_NAT) -> None:
        args = [
            "--listen", "127.0.0.1:0",
            "--auth-secret", SECRET,
            "--realm", "test.example",
            "--ports", "20000-29999",
            "--allow-peer", "127.0.0.0/8",
            "--metrics", "127.0.0.1:0",
            "--log-format", "json",
            "--workers", str(WORKERS),
        ]  # fmt: skip
        if public is not None:
            args += ["--public-ipv4", public]
        super().__init__([*args, *extra], env={"XDPTURN_WORKERS": str(WORKERS)})

    def started(self) -> tuple[TransportAddr, TransportAddr]:
        """The UDP listening address and the metrics address, once every worker runs."""
        listening = self.record("listening", lambda r: r.get("workers") == WORKERS)
        metrics = self.record("metrics listening")["metrics"]
        return TransportAddr.parse(listening["listen"][0]), TransportAddr.parse(metrics)

    def worker_of(self, client: TurnClient) -> int:
        """The worker that opened `client`'s allocation."""
        assert client.mapped is not None
        opened = self.record("allocation opened", lambda r: r["client"] == str(client.mapped))
        worker: int = opened["worker"]
        return worker


def by_worker(worker: int) -> Callable[[dict[str, Any]], bool]:
    return lambda record: record.get("worker") == worker


@contextmanager
def workers(*extra: str, public: str | None = PUBLIC_NAT) -> Iterator[Workers]:
    proc = Workers(*extra, public=public)
    try:
        yield proc
    finally:
        proc.stop()


async def status(metrics: TransportAddr) -> dict[str, Any]:
    code, _, body = await http(metrics, "/status?top=50")
    assert code == 200
    answer: dict[str, Any] = json.loads(body)
    return answer


async def connect(server: TransportAddr, opener: TransportOpener = open_udp) -> TurnClient:
    username, password = rest_credentials("workers")
    return await TurnClient.connect(server, username, password, options=OPTIONS, opener=opener)


@asynccontextmanager
async def one_per_worker(
    proc: Workers, server: TransportAddr, opener: TransportOpener = open_udp
) -> AsyncIterator[list[TurnClient]]:
    """An allocated client on each worker, in worker order."""
    async with AsyncExitStack() as stack:
        found: dict[int, TurnClient] = {}
        for _ in range(TRIES):
            client = await stack.enter_async_context(await connect(server, opener))
            await client.allocate()
            found.setdefault(proc.worker_of(client), client)
            if len(found) == WORKERS:
                break
        assert sorted(found) == list(range(WORKERS)), "clients never reached every worker"
        yield [found[i] for i in range(WORKERS)]


async def round_trip(client: TurnClient, payload: bytes) -> None:
    """ChannelData both ways between `client`'s allocation and a fresh loopback peer."""
    (relayed,) = client.relayed
    with udp() as peer_sock:
        peer = local(peer_sock)
        inside = TransportAddr(peer.ip, relayed.port)  # relayed.ip may be the public address
        await client.bind_channel(peer)
        client.send(peer, payload)
        assert await recv(peer_sock) == (payload, inside)
        peer_sock.sendto(payload[::-1], sockaddr(inside))
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == (peer, payload[::-1])


def test_each_worker_relays_its_clients_and_metrics_sum_over_all() -> None:
    with workers() as proc:
        listen, metrics = proc.started()

        async def main() -> None:
            before = await scrape(metrics)
            async with one_per_worker(proc, listen) as clients:
                for n, client in enumerate(clients):
                    await round_trip(client, b"worker %d" % n)
                after = await scrape(metrics)
                snapshot = await status(metrics)
            assert value(after, "xdpturn_allocations", family="ipv4") >= WORKERS
            for route in ("client_to_peer", "peer_to_client"):
                labels = {"path": "python", "route": route}
                moved = value(after, "xdpturn_relayed_packets_total", **labels) - value(
                    before, "xdpturn_relayed_packets_total", **labels
                )
                assert moved == WORKERS  # one datagram each way on each worker, summed
            rows = snapshot["workers"]
            assert [r["worker"] for r in rows] == list(range(WORKERS))
            assert all(r["running"] and r["allocations"] >= 1 for r in rows)
            assert snapshot["allocations"]["total"] == sum(r["allocations"] for r in rows)
            assert len({r["pid"] for r in rows}) == WORKERS
            shown = render(snapshot, None, str(metrics)).splitlines()
            assert shown[2].startswith(f"workers {WORKERS}:   #0 up allocations ")
            ready = await http(metrics, "/readyz")
            assert ready[0] == 200

        run(main())
        assert proc.stop() == 0


@pytest.mark.parametrize("public", [None, PUBLIC_NAT], ids=["public-is-local", "behind-nat"])
def test_packets_to_itself_between_allocations_of_different_workers(public: str | None) -> None:
    with workers(public=public) as proc:
        listen, metrics = proc.started()

        async def main() -> None:
            async with one_per_worker(proc, listen) as (a, b):
                (a_relayed,), (b_relayed,) = a.relayed, b.relayed
                # Each side reaches the other at its relayed address: ChannelData one way,
                # a Send indication the other.
                await a.bind_channel(b_relayed)
                await b.create_permission(a_relayed)
                a.send(b_relayed, b"a to b")
                assert await asyncio.wait_for(b.recv(), TIMEOUT) == (a_relayed, b"a to b")
                b.send(a_relayed, b"b to a")
                assert await asyncio.wait_for(a.recv(), TIMEOUT) == (b_relayed, b"b to a")
                # The relay's own address on a port that is no allocation stays refused.
                with pytest.raises(TurnClientError) as refused:
                    await a.bind_channel(TransportAddr(a_relayed.ip, 9))
                assert refused.value.code == 403
            snapshot = await status(metrics)
            assert snapshot["drops"].get("self_not_allocation", 0) == 0

        run(main())


def test_quota_per_ip_is_counted_over_all_workers() -> None:
    with workers("--max-allocations-per-ip", "1") as proc:
        listen, metrics = proc.started()

        async def main() -> None:
            async with AsyncExitStack() as stack:
                first = await stack.enter_async_context(await connect(listen))
                await first.allocate()
                owner = proc.worker_of(first)
                # Until a worker that holds no allocation of 127.0.0.1 has refused one.
                for _ in range(TRIES):
                    client = await stack.enter_async_context(await connect(listen))
                    with pytest.raises(TurnClientError) as refused:
                        await client.allocate()
                    assert refused.value.code == 486
                    rows = (await status(metrics))["workers"]
                    others = [r for r in rows if r["worker"] != owner]
                    if all(r["errors"].get("allocate:486", 0) >= 1 for r in others):
                        break
                else:
                    raise AssertionError("no Allocate reached the other worker")
                assert sum(r["allocations"] for r in rows) == 1
                # The count goes down on whichever worker the allocation ends.
                await first.refresh(0)
                again = await stack.enter_async_context(await connect(listen))
                await again.allocate()

        run(main())


def test_a_nonce_from_one_worker_is_valid_on_every_other() -> None:
    """A nonce is bound to the client's address (IP and port), so only the same address over
    another transport can take it to another worker: TCP from the UDP socket's port, which the
    kernel hashes into the TCP listeners' group independently."""
    with workers("--listen-tcp", "127.0.0.1:0") as proc:
        listen, _ = proc.started()
        tcp = TransportAddr.parse(proc.record("listening on streams")["tcp"][0])
        username, password = rest_credentials("nonce")
        key = stun.long_term_key(username, "test.example", password)

        async def allocate_over_tcp(port: int, nonce: str) -> stun.Message:
            reader, writer = await asyncio.open_connection(
                str(tcp.ip), tcp.port, local_addr=("127.0.0.1", port)
            )
            try:
                request = stun.Message(Method.ALLOCATE, MessageClass.REQUEST, os.urandom(12))
                request.add(AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
                request.add(AttrType.USERNAME, username.encode())
                request.add(AttrType.REALM, b"test.example")
                request.add(AttrType.NONCE, nonce.encode())
                writer.write(stun.encode(request, integrity_key=key))
                async with asyncio.timeout(TIMEOUT):
                    header = await reader.readexactly(20)
                    body = await reader.readexactly(int.from_bytes(header[2:4], "big"))
                return stun.decode(header + body)
            finally:
                writer.close()

        def over_tcp(port: int) -> Callable[[dict[str, Any]], bool]:
            client = f"127.0.0.1:{port}"
            return lambda r: r["client"] == client and r["allocation"].startswith("tcp:")

        async def main() -> None:
            for _ in range(TRIES):
                async with await connect(listen) as udp_client:
                    await udp_client.allocate()
                    assert udp_client.mapped is not None and udp_client._auth is not None
                    port, nonce = udp_client.mapped.port, udp_client._auth.nonce
                    answer = await allocate_over_tcp(port, nonce)
                    assert answer.cls is MessageClass.SUCCESS, answer  # not 438 Stale Nonce
                    if proc.record("allocation opened", over_tcp(port))["worker"] != (
                        proc.worker_of(udp_client)
                    ):
                        return
            raise AssertionError("no Allocate over TCP reached the other worker")

        run(main())


def test_sigterm_drains_every_worker_then_exits_0() -> None:
    alternate = "192.0.2.2:3478"
    with workers("--alternate-server", alternate, "--drain-timeout", "3") as proc:
        listen, metrics = proc.started()

        async def main() -> None:
            async with one_per_worker(proc, listen) as clients:
                proc.proc.send_signal(signal.SIGTERM)
                draining = await asyncio.to_thread(
                    proc.record, "draining", lambda r: r.get("workers") == WORKERS
                )
                assert draining["reason"] == "SIGTERM" and draining["allocations"] >= WORKERS
                assert (await http(metrics, "/readyz"))[0] == 503
                # Every worker sends new clients away; existing allocations keep relaying.
                for _ in range(TRIES):
                    async with await connect(listen) as late:
                        with pytest.raises(TurnClientError) as refused:
                            await late.allocate()
                        assert refused.value.code == 300
                    rows = (await status(metrics))["workers"]
                    if all(r["errors"].get("allocate:300", 0) >= 1 for r in rows):
                        break
                else:
                    raise AssertionError("a worker never refused an Allocate")
                for n, client in enumerate(clients):
                    await round_trip(client, b"still %d" % n)

        started = time.monotonic()
        run(main())
        assert proc.proc.wait(timeout=BOUNDED) == 0
        assert time.monotonic() - started < 3 + BOUNDED
        stopped = proc.record("stopped", lambda r: "workers" in r)
        assert stopped["workers"] == {str(i): 0 for i in range(WORKERS)}


def test_xdpturn_drain_drains_every_worker_and_sigint_still_stops() -> None:
    with workers() as proc:
        listen, metrics = proc.started()

        async def main() -> None:
            async with one_per_worker(proc, listen):
                code, _, body = await http(metrics, "/drain", method="POST")
                assert code == 202 and json.loads(body)["allocations"] >= WORKERS
                draining = await asyncio.to_thread(
                    proc.record, "draining", lambda r: r.get("workers") == WORKERS
                )
                assert draining["reason"] == "POST /drain"
                rows = (await status(metrics))["workers"]
                assert all(r["running"] for r in rows)
                assert (await http(metrics, "/drain", method="POST"))[0] == 200  # already
                # Allocations are open: the drain would last; SIGINT ends it now.
                proc.proc.send_signal(signal.SIGINT)
                assert await asyncio.to_thread(proc.proc.wait, BOUNDED) == 0

        run(main())
        stopped = proc.record("stopped", lambda r: "workers" in r)
        assert stopped["reason"] == "SIGINT"


def test_tcp_and_tls_connections_spread_and_sighup_reloads_every_worker(tmp_path: Path) -> None:
    cert = make_certificate(tmp_path, "relay")
    extra = ["--listen-tcp", "127.0.0.1:0", "--listen-tls", "127.0.0.1:0"]
    extra += ["--tls-cert", str(cert.cert), "--tls-key", str(cert.key)]
    with workers(*extra) as proc:
        proc.started()
        streams = proc.record("listening on streams")
        tcp = TransportAddr.parse(streams["tcp"][0])

        async def main() -> None:
            async with one_per_worker(proc, tcp, open_tcp) as clients:
                for n, client in enumerate(clients):
                    await round_trip(client, b"over tcp %d" % n)

        run(main())
        proc.proc.send_signal(signal.SIGHUP)
        for worker in range(WORKERS):
            proc.record("TLS certificate reloaded", by_worker(worker))
        proc.proc.send_signal(signal.SIGINT)
        assert proc.proc.wait(timeout=BOUNDED) == 0
        assert proc.record("stopped", lambda r: "workers" in r)["reason"] == "SIGINT"


# Reservations: EVEN-PORT with the R bit on one worker, RESERVATION-TOKEN on another


async def worker_answering(metrics: TransportAddr, client: TurnClient) -> int:
    """The worker `client`'s requests reach (its allocation too, as long as no socket joins or
    leaves the listeners' group meanwhile): the one whose count of Refreshes answered 437 (no
    allocation) grows when it asks. The client has its nonce then."""

    async def refused() -> dict[int, int]:
        rows = (await status(metrics))["workers"]
        return {r["worker"]: r["errors"].get("refresh:437", 0) for r in rows}

    before = await refused()
    with pytest.raises(TurnClientError) as error:
        await client.refresh()
    assert error.value.code == 437
    after = await refused()
    (worker,) = [w for w in after if after[w] > before.get(w, 0)]
    return worker


async def client_on(
    stack: AsyncExitStack,
    metrics: TransportAddr,
    server: TransportAddr,
    worker: int,
    *,
    other: bool = False,
    opener: TransportOpener = open_udp,
) -> tuple[TurnClient, int]:
    """A client, not allocated yet, whose requests reach `worker` (`other`: any other one), and
    the worker they reach."""
    for _ in range(TRIES):
        client = await connect(server, opener)
        reached = await worker_answering(metrics, client)
        if (reached == worker) != other:
            return await stack.enter_async_context(client), reached
        await client.close()
    raise AssertionError(f"no client reached {'a worker but' if other else 'worker'} {worker}")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_token_made_on_one_worker_is_taken_on_another_and_only_once(transport: str) -> None:
    with workers("--listen-tcp", "127.0.0.1:0") as proc:
        listen, metrics = proc.started()
        tcp = TransportAddr.parse(proc.record("listening on streams")["tcp"][0])
        server, opener = (listen, open_udp) if transport == "udp" else (tcp, open_tcp)

        async def main() -> None:
            async with AsyncExitStack() as stack:
                rtp = await stack.enter_async_context(await connect(listen))
                (rtp_relayed,) = await rtp.allocate(even_port=True, reserve_next=True)
                token = rtp.reservation_token
                assert token is not None and rtp_relayed.port % 2 == 0
                maker = proc.worker_of(rtp)
                rtcp, taker = await client_on(
                    stack, metrics, server, maker, other=True, opener=opener
                )
                (relayed,) = await rtcp.allocate(reservation_token=token)
                assert relayed == TransportAddr(rtp_relayed.ip, rtp_relayed.port + 1)
                assert proc.worker_of(rtcp) == taker
                taken = proc.record("reservation taken over", by_worker(taker))
                assert taken["relay_port"] == relayed.port and taken["from_worker"] == maker
                # The port's sockets came along: the allocation relays through them.
                await round_trip(rtcp, b"through the port reserved on the other worker")
                # Used: refused wherever it comes again, its maker included.
                for where in (maker, taker):
                    again, _ = await client_on(stack, metrics, listen, where)
                    with pytest.raises(TurnClientError) as refused:
                        await again.allocate(reservation_token=token)
                    assert refused.value.code == 508
                rows = (await status(metrics))["workers"]
                assert sum(r["allocations"] for r in rows) == 2
                assert sum(r["errors"].get("allocate:508", 0) for r in rows) == 2

        run(main())
        assert proc.stop() == 0


# The number of workers


def test_workers_default_to_the_cpus_the_process_may_use() -> None:
    env = {"XDPTURN_AUTH_SECRET": "s", "XDPTURN_PUBLIC_IPV4": "192.0.2.1"}
    assert load_serve_config({}, env).workers == available_cpus()
    assert available_cpus() == len(os.sched_getaffinity(0))
    env["XDPTURN_WORKERS"] = "3"
    assert load_serve_config({}, env).workers == 3
    assert load_serve_config({"workers": "1"}, env).workers == 1
    for bad in ("0", "65537"):
        with pytest.raises(ConfigError) as error:
            load_serve_config({"workers": bad}, env)
        assert str(error.value).startswith("--workers:")


def test_one_cpu_by_default_is_the_single_process_relay_of_before() -> None:
    env = {k: v for k, v in os.environ.items() if k != "XDPTURN_WORKERS"}
    args = ["--listen", "127.0.0.1:0", "--auth-secret", SECRET, "--log-format", "json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "xdpturn", "serve", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
    )
    try:
        assert proc.stderr is not None
        listening = json.loads(proc.stderr.readline())
        if listening["message"] == "the open-file limit is lower than the port range needs":
            listening = json.loads(proc.stderr.readline())  # this machine's hard limit is low
        assert listening["message"] == "listening"
        assert "worker" not in listening and "workers" not in listening
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children == []
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=BOUNDED) == 0


# When things go wrong


def test_a_worker_that_dies_stops_the_others_and_the_relay_exits_1() -> None:
    with workers() as proc:
        proc.started()
        pids = proc.record("listening", lambda r: r.get("workers") == WORKERS)["pids"]
        os.kill(pids[1], signal.SIGKILL)
        assert proc.proc.wait(timeout=BOUNDED) == 1
        failed = proc.record("worker exited; stopping the others")
        assert failed["workers"] == {"0": None, "1": -signal.SIGKILL}
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_workers_stop_when_the_supervisor_is_killed() -> None:
    with workers() as proc:
        proc.started()
        pids = proc.record("listening", lambda r: r.get("workers") == WORKERS)["pids"]
        proc.proc.kill()
        proc.proc.wait(timeout=BOUNDED)
        for pid in pids:
            proc.record("stopped", by_worker(pids.index(pid)))
        deadline = time.monotonic() + BOUNDED
        while any(Path(f"/proc/{pid}").exists() for pid in pids):
            assert time.monotonic() < deadline, "a worker outlived its supervisor"
            time.sleep(0.05)


def test_an_address_in_use_fails_the_start_naming_the_option() -> None:
    with udp() as taken:
        address = str(local(taken))
        proc = Serve(["--listen", address, "--auth-secret", SECRET, "--workers", "2"])
        assert proc.proc.wait(timeout=BOUNDED) == 1
        output = list(iter(lambda: proc.lines.get(timeout=BOUNDED), None))
        # Log records aside (this machine's open-file limit gets a warning): the one error.
        assert [line for line in output if not line.startswith("{")] == [
            f"xdpturn serve: --listen: cannot bind {address}: Address already in use\n"
        ]
