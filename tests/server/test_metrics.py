"""The --metrics listener: Prometheus counters after real traffic on loopback, fast-path counters
from a fake FastPath, health and readiness, /status and `xdpturn status`."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from xdpturn.cli.ops import render, watch
from xdpturn.fastpath import FastPathCounters, FastPathMode, NullFastPath
from xdpturn.proto import stun
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.channel_data import encode_channel_data
from xdpturn.proto.commands import ChannelRoute
from xdpturn.proto.stun import AttrType, MessageClass, Method
from xdpturn.server import RelayServer
from xdpturn.server.drain import Drainer
from xdpturn.server.metrics import OpsServer
from xdpturn.server.relay import THROUGHPUT_INTERVAL
from xdpturn.server.sockets import WORKER_RATE

from .helpers import TIMEOUT, behind_nat_config, local, loopback_config, recv, run, sockaddr, udp
from .test_loopback import StunClient

ANY_PORT = TransportAddr.parse("127.0.0.1:0")


async def http(
    address: TransportAddr, path: str, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP/1.1 request, bounded in time."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(str(address.ip), address.port)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()  # the server closes after one response
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert int(headers["Content-Length"]) == len(body)
    return int(status_line.split(" ")[1]), headers, body


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def scrape(address: TransportAddr) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, headers, body = await http(address, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    return samples(body.decode())


def value(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sample of series `name{labels}`; a missing series fails the test (the exposition must
    carry every series it declares, zero or not)."""
    key = (name, frozenset(labels.items()))
    assert key in metrics, f"no series {name}{labels} in the scrape"
    return metrics[key]


@asynccontextmanager
async def relay_with_ops(
    server: RelayServer, *, timeout: float = 60.0, alternate: TransportAddr | None = None
) -> AsyncIterator[tuple[OpsServer, Drainer]]:
    async with server:
        drainer = Drainer(server, alternate=alternate, timeout=timeout)
        ops = OpsServer(server, drainer, ANY_PORT)
        await ops.start()
        try:
            yield ops, drainer
        finally:
            drainer.cancel()
            await ops.stop()


class FakeFastPath(NullFastPath):
    """A FastPath whose counters are whatever the test says."""

    def __init__(self, mode: str, counters: FastPathCounters, problem: str | None = None) -> None:
        self._mode = mode
        self._counters = counters
        self._problem = problem
        self.installed: list[ChannelRoute] = []

    @property
    def mode(self) -> str:
        return self._mode

    def install(self, route: ChannelRoute) -> None:
        self.installed.append(route)

    def remove(self, route: ChannelRoute) -> None:
        self.installed.remove(route)

    def counters(self) -> FastPathCounters:
        return self._counters

    def problem(self) -> str | None:
        return self._problem

    def close(self) -> None:
        pass


def test_python_relaying_moves_the_counters_by_what_was_sent() -> None:
    config = behind_nat_config()
    out_payloads = [b"a" * n for n in (1, 10, 100, 1000, 1200)]
    in_payloads = [b"b" * n for n in (7, 70, 700)]

    async def main() -> None:
        relay = RelayServer(config)
        async with relay_with_ops(relay) as (ops, _):
            metrics_at = ops.bound_address
            before = await scrape(metrics_at)
            assert value(before, "xdpturn_ready") == 1
            assert value(before, "xdpturn_fastpath_mode", mode="off") == 1
            assert value(before, "xdpturn_allocations", family="ipv4") == 0
            listen = ops.server.listen_addresses[0]
            with udp() as sock, udp() as peer_sock:
                client = StunClient(sock, listen)
                relayed = await client.allocate(Family.IPV4)
                inside = TransportAddr(ipaddress.ip_address("127.0.0.1"), relayed.port)
                peer = local(peer_sock)
                await client.permit(peer)
                await client.bind(0x4001, peer)
                mid = await scrape(metrics_at)
                for payload in out_payloads[:2]:  # Send indications
                    client.send_indication(peer, payload)
                    assert (await recv(peer_sock))[0] == payload
                for payload in out_payloads[2:]:  # ChannelData
                    sock.sendto(encode_channel_data(0x4001, payload), sockaddr(listen))
                    assert (await recv(peer_sock))[0] == payload
                for payload in in_payloads:
                    peer_sock.sendto(payload, sockaddr(inside))
                    await recv(sock)
                after = await scrape(metrics_at)
                status, _, body = await http(metrics_at, "/status?top=5")
                with udp() as other:  # a client that never allocates leaves no traffic entry
                    await StunClient(other, listen).exchange(
                        client.message(Method.BINDING), sign=False
                    )
                metered = relay.metered_allocations()
                assert [m.info.relay_port for m in metered] == [relayed.port]
        assert status == 200

        def moved(name: str, route: str) -> float:
            labels = {"path": "python", "route": route}
            return value(after, name, **labels) - value(mid, name, **labels)

        assert moved("xdpturn_relayed_packets_total", "client_to_peer") == len(out_payloads)
        assert moved("xdpturn_relayed_bytes_total", "client_to_peer") == sum(map(len, out_payloads))
        assert moved("xdpturn_relayed_packets_total", "peer_to_client") == len(in_payloads)
        assert moved("xdpturn_relayed_bytes_total", "peer_to_client") == sum(map(len, in_payloads))
        assert moved("xdpturn_relayed_packets_total", "loopback") == 0
        assert value(after, "xdpturn_allocations", family="ipv4") == 1
        assert value(after, "xdpturn_permissions", family="ipv4") == 1
        assert value(after, "xdpturn_channels", family="ipv4") == 1
        assert value(after, "xdpturn_relay_ports") == 1
        # The first Allocate is challenged (401): a request, an error response, an auth failure.
        assert value(after, "xdpturn_requests_total", method="allocate") == 2
        assert value(after, "xdpturn_requests_total", method="channel_bind") == 1
        assert value(after, "xdpturn_error_responses_total", method="allocate", code="401") == 1
        assert value(after, "xdpturn_auth_failures_total") == 1
        assert value(after, "process_resident_memory_bytes") > 0
        assert value(after, "python_info", **_python_labels(after)) == 1

        snapshot = json.loads(body)
        assert snapshot["allocations"]["total"] == 1 and snapshot["ready"] is True
        (top,) = snapshot["top"]
        assert top["relay_port"] == relayed.port and top["channels"] == 1
        # Payload bytes per direction, Send indications and ChannelData alike, no TURN framing.
        assert top["traffic"]["client_to_peer"]["packets"] == len(out_payloads)
        assert top["traffic"]["client_to_peer"]["bytes"] == sum(map(len, out_payloads))
        assert top["traffic"]["peer_to_client"]["packets"] == len(in_payloads)
        assert top["traffic"]["peer_to_client"]["bytes"] == sum(map(len, in_payloads))
        assert top["bytes"] == sum(map(len, out_payloads)) + sum(map(len, in_payloads))
        # A REST credential's traffic counts for its id, after the expiry.
        user = {"user": top["username"].split(":", 1)[1], "direction": "client_to_peer"}
        assert value(after, "xdpturn_user_bytes_total", **user) == sum(map(len, out_payloads))

    run(main())


def test_a_full_receive_queue_drops_and_counts_instead_of_queueing() -> None:
    # 1 ms at WORKER_RATE: each receive queue holds about 60 datagrams, where a 4 MiB buffer
    # held thousands.
    config = behind_nat_config(receive_queue_delay=1.0)
    held = round(WORKER_RATE / 1000)
    sent = 2000

    async def main() -> tuple[float, float]:
        async with relay_with_ops(RelayServer(config)) as (ops, _):
            listen = ops.server.listen_addresses[0]
            with udp() as sock:
                for _ in range(sent):  # no await: the relay reads none of them meanwhile
                    sock.sendto(b"\xffnot TURN", sockaddr(listen))
            async with asyncio.timeout(TIMEOUT):
                while True:
                    metrics = await scrape(ops.bound_address)
                    dropped = value(metrics, "xdpturn_receive_queue_drops_total", socket="listener")
                    read = value(metrics, "xdpturn_drops_total", reason="not_turn")
                    if dropped + read == sent:
                        return dropped, read
                    await asyncio.sleep(0.01)

    dropped, read = run(main())
    assert 0 < read < 2 * held  # the kernel's accounting: held + 1 on loopback
    assert dropped == sent - read


def _python_labels(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float],
) -> dict[str, str]:
    (labels,) = [dict(lab) for name, lab in metrics if name == "python_info"]
    return labels


def test_fast_path_counters_show_per_route_and_pass_reason() -> None:
    counters = FastPathCounters(
        routes={"ipv4_channel_to_ipv4_udp": (11, 1100), "ipv4_udp_to_ipv6_channel": (3, 333)},
        passes={"not_turn": 5, "no_channel": 2},
        drops={"rewritten_truncated": 1, "unknown_client": 7, "stun_rate_source": 9},
    )
    config = loopback_config(fastpath=FastPathMode.AUTO, interfaces=["lo"])

    async def main() -> None:
        server = RelayServer(config, fastpath=FakeFastPath("native", counters))
        async with relay_with_ops(server) as (ops, _):
            metrics = await scrape(ops.bound_address)
            status, _, body = await http(ops.bound_address, "/readyz")
            assert (status, body) == (200, b"ready\n")
            snapshot = json.loads((await http(ops.bound_address, "/status"))[2])
        for route, (packets, nbytes) in counters.routes.items():
            labels = {"path": "xdp", "route": route}
            assert value(metrics, "xdpturn_relayed_packets_total", **labels) == packets
            assert value(metrics, "xdpturn_relayed_bytes_total", **labels) == nbytes
        for reason, n in counters.passes.items():
            assert value(metrics, "xdpturn_fastpath_passes_total", reason=reason) == n
        for reason, n in counters.drops.items():
            assert value(metrics, "xdpturn_fastpath_drops_total", reason=reason) == n
        modes = {
            m: value(metrics, "xdpturn_fastpath_mode", mode=m) for m in ("native", "generic", "off")
        }
        assert modes == {"native": 1, "generic": 0, "off": 0}
        xdp_rows = [r for r in snapshot["relayed"] if r["path"] == "xdp"]
        assert {r["route"]: (r["packets"], r["bytes"]) for r in xdp_rows} == counters.routes
        assert snapshot["fastpath"] == {
            "mode": "native",
            "configured": "auto",
            "problem": None,
            "passes": {"no_channel": 2, "not_turn": 5},
            "drops": {"rewritten_truncated": 1, "stun_rate_source": 9, "unknown_client": 7},
        }

    run(main())


def test_readyz_is_503_when_the_fast_path_is_not_as_configured() -> None:
    config = loopback_config(fastpath=FastPathMode.XDP, interfaces=["lo"])

    async def main() -> None:
        server = RelayServer(config, fastpath=FakeFastPath("generic", FastPathCounters()))
        async with relay_with_ops(server) as (ops, _):
            status, _, body = await http(ops.bound_address, "/readyz")
            assert status == 503 and b"fast path is generic, configured xdp" in body
            assert (await http(ops.bound_address, "/healthz"))[0] == 200
            assert value(await scrape(ops.bound_address), "xdpturn_ready") == 0

    run(main())


def test_readyz_is_503_while_attached_but_not_carrying() -> None:
    config = loopback_config(fastpath=FastPathMode.AUTO, interfaces=["lo"])
    problem = "the kernel relayed nothing while 40 packets of bound channels passed as no_next_hop"

    async def main() -> None:
        server = RelayServer(config, fastpath=FakeFastPath("native", FastPathCounters(), problem))
        async with relay_with_ops(server) as (ops, _):
            status, _, body = await http(ops.bound_address, "/readyz")
            assert status == 503 and f"fast path not carrying: {problem}".encode() in body
            snapshot = json.loads((await http(ops.bound_address, "/status"))[2])
            assert snapshot["fastpath"]["problem"] == problem
            assert snapshot["not_ready"] == [f"fast path not carrying: {problem}"]

    run(main())


def test_readyz_flips_to_503_while_draining_and_drain_is_post_only() -> None:
    async def main() -> None:
        async with relay_with_ops(RelayServer(loopback_config())) as (ops, drainer):
            at = ops.bound_address
            assert (await http(at, "/readyz"))[0] == 200
            assert (await http(at, "/drain"))[0] == 405
            status, _, body = await http(at, "/drain", "POST")
            answer = json.loads(body)
            assert status == 202 and answer["started"] is True and answer["draining"] is True
            assert drainer.draining and ops.server.core.draining  # type: ignore[attr-defined]
            status, _, body = await http(at, "/readyz")
            assert status == 503 and b"draining" in body
            assert (await http(at, "/healthz"))[0] == 200  # alive, only not taking new clients
            metrics = await scrape(at)
            assert value(metrics, "xdpturn_draining") == 1 and value(metrics, "xdpturn_ready") == 0
            status, _, body = await http(at, "/drain", "POST")
            assert status == 200 and json.loads(body)["started"] is False

    run(main())


def test_unknown_paths_and_methods() -> None:
    async def main() -> None:
        async with relay_with_ops(RelayServer(loopback_config())) as (ops, _):
            at = ops.bound_address
            assert (await http(at, "/nope"))[0] == 404
            status, headers, _ = await http(at, "/metrics", "DELETE")
            assert status == 405 and headers["Allow"] == "GET, HEAD"
            # Garbage is closed without an answer and the listener keeps serving.
            reader, writer = await asyncio.open_connection(str(at.ip), at.port)
            writer.write(b"garbage\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
            assert (await http(at, "/healthz"))[0] == 200

    run(main())


def test_drain_is_refused_from_a_non_loopback_address() -> None:
    async def main() -> None:
        async with relay_with_ops(RelayServer(loopback_config())) as (ops, drainer):
            status, *_ = ops.respond("POST", "/drain", ("192.0.2.1", 40000))
            assert status == 403 and not drainer.draining
            status, *_ = ops.respond("POST", "/drain", ("::ffff:127.0.0.1", 40000, 0, 0))
            assert status == 202 and drainer.draining

    run(main())


def test_status_command_prints_json_once_and_a_table() -> None:
    async def main() -> None:
        async with relay_with_ops(RelayServer(loopback_config())) as (ops, _):
            out = io.StringIO()
            # `watch` blocks on urllib, as the command does: run it off the relay's loop.
            code = await asyncio.to_thread(
                watch, ops.bound_address, interval=1, top=3, once=True, as_json=True, out=out
            )
            assert code == 0
            snapshot: dict[str, Any] = json.loads(out.getvalue())
            assert snapshot["ready"] is True and snapshot["top"] == []
            later = dict(snapshot, time=snapshot["time"] + 2.0)
            later["relayed"] = [dict(r, packets=r["packets"] + 1000) for r in snapshot["relayed"]]
            table = render(later, snapshot, "127.0.0.1:9478")
            assert "ready" in table and "client_to_peer" in table and "500" in table
            later["fastpath"] = dict(later["fastpath"], drops={"unknown_client": 12})
            assert "xdp-drop:unknown_client 12" in render(later, snapshot, "127.0.0.1:9478")

    run(main())


def test_status_command_reports_an_unreachable_relay(capsys: Any) -> None:
    from xdpturn.cli import main

    with udp() as sock:  # a port nothing listens on with TCP (bound for UDP only)
        port = sock.getsockname()[1]
        assert main(["status", "--metrics", f"127.0.0.1:{port}", "--once"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_max_bps_refuses_allocations_while_the_relay_is_at_its_cap() -> None:
    """The relay measures its rate once a second; at --max-bps a new Allocate gets 508, and once
    the traffic stops the next one succeeds."""
    cap = 8_000  # bits per second: 1,000 bytes
    config = behind_nat_config(max_bps=cap)

    async def status_of(ops: OpsServer) -> dict[str, Any]:
        code, _, body = await http(ops.bound_address, "/status")
        assert code == 200
        snapshot: dict[str, Any] = json.loads(body)
        return snapshot

    async def until(ops: OpsServer, check: Any) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5 * THROUGHPUT_INTERVAL
        while not check((await status_of(ops))["throughput_bps"]):
            assert loop.time() < deadline, await status_of(ops)
            await asyncio.sleep(0.1)

    async def allocate_code(client: StunClient) -> int:
        challenge = await client.exchange(client.message(Method.ALLOCATE), sign=False)
        client.nonce = challenge.get(AttrType.NONCE)  # 401's nonce
        msg = client.message(Method.ALLOCATE)
        msg.add(AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
        response = await client.exchange(msg)
        if response.cls is MessageClass.SUCCESS:
            return 200
        error = response.get(AttrType.ERROR_CODE)
        assert error is not None
        return stun.decode_error_code(error)[0]

    async def main() -> None:
        async with relay_with_ops(RelayServer(config)) as (ops, _):
            listen = ops.server.listen_addresses[0]
            with udp() as sock, udp() as peer_sock, udp() as second, udp() as third:
                client = StunClient(sock, listen)
                await client.allocate(Family.IPV4)
                peer = local(peer_sock)
                await client.permit(peer)
                await client.bind(0x4001, peer)
                for _ in range(20):  # 10 kB within a fraction of a second: far above the cap
                    sock.sendto(encode_channel_data(0x4001, b"m" * 500), sockaddr(listen))
                    await recv(peer_sock)
                await until(ops, lambda bps: bps is not None and bps >= cap)
                assert await allocate_code(StunClient(second, listen)) == 508
                await until(ops, lambda bps: bps is not None and bps < cap)  # traffic stopped
                assert await allocate_code(StunClient(third, listen)) == 200

    run(main())
