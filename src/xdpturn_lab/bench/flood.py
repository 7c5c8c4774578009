"""`xdpturn-lab flood`: a legitimate client's round trips through a relay while one process floods
the relay's TURN port with junk (issue 12).

Four public hosts on the testbed's internet router: the relay, a client, a peer, an attacker. The
client allocates, binds a channel to a UDP echo on the peer host and pings through it at a fixed
rate (`xdpturn-blast ping` on the client's own socket), first on a quiet relay, then while the
attacker sends `xdpturn-blast junk` (random bytes, truncated and bit-flipped STUN, lying
ChannelData, 65 KB datagrams) as fast as one core sends it. Reported per relay: the client's loss
and round trip, quiet and flooded; the junk rate; the relay's resident memory before and after;
for the fast path, what the XDP program passed and dropped. The abuse test (tests/abuse) asserts
the user-visible bounds on the same measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from xdpturn.fastpath import FastPathCounters
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn_lab.bench import tools
from xdpturn_lab.bench.suite import system
from xdpturn_lab.bench.suite.relays import (
    GENERATOR_CPU,
    CoturnRelay,
    RelayUnderTest,
    XdpturnRelay,
    raise_fd_limit,
)
from xdpturn_lab.bench.suite.workloads import bind, open_turn
from xdpturn_lab.testbed import Relay, Testbed, Topology, cleanup_stale
from xdpturn_lab.testbed.scenario import netns_socket
from xdpturn_lab.testbed.testbed import RelayNode

RELAYS = ("xdp", "python", "coturn")
TOPOLOGY = Topology(
    relays=[Relay("relay"), Relay("client"), Relay("peer"), Relay("attacker")],
)
PING_RATE = 500.0  # a voice call's packet rate, both ways
PING_SIZE = 100
ECHO_PORT = 9000
QUIET_S = 2.0
# The client and the echo stand for machines of their own: real-time priority keeps them from
# waiting for a core that the relay or the attacker (both flat out on this 2-core testbed) holds,
# so the round trips measure the relay, not the scheduler.
REALTIME = ["chrt", "-f", "20"]


@dataclass(frozen=True)
class Hosts:
    tb: Testbed
    relay: RelayNode
    client: RelayNode
    peer: RelayNode
    attacker: RelayNode

    @classmethod
    def of(cls, tb: Testbed) -> Hosts:
        return cls(tb, *(tb.relay(n) for n in ("relay", "client", "peer", "attacker")))


@dataclass
class FloodResult:
    relay: str
    quiet: tools.PingResult
    flooded: tools.PingResult
    junk: tools.SendResult
    rss_before: int
    rss_after: int
    # The XDP program's counters that moved during the flood (fast path only).
    xdp_passes: dict[str, int] = field(default_factory=dict)
    xdp_drops: dict[str, int] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """The client's loss during the flood, as a fraction of what it sent."""
        return self.flooded.lost / self.flooded.sent if self.flooded.sent else 1.0

    def rtt_ms(self, which: str, quantile: str = "p50") -> float:
        ping = self.quiet if which == "quiet" else self.flooded
        if ping.rtt_us is None:
            return float("inf")
        return float(getattr(ping.rtt_us, quantile)) / 1000

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["loss"] = self.loss
        return out

    def row(self) -> str:
        return (
            f"{self.relay:7} junk {self.junk.pps / 1000:6.1f}k/s ({self.junk.sent:,} sent)  "
            f"loss {self.loss * 100:5.2f}% ({self.flooded.lost}/{self.flooded.sent})  "
            f"rtt p50 {self.rtt_ms('quiet'):.2f} -> {self.rtt_ms('flooded'):.2f} ms, "
            f"p99 {self.rtt_ms('quiet', 'p99'):.2f} -> {self.rtt_ms('flooded', 'p99'):.2f} ms  "
            f"rss {self.rss_before / 2**20:.1f} -> {self.rss_after / 2**20:.1f} MiB"
        )


def _ip(host: RelayNode) -> str:
    return str(host.public_ipv4)


def _moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def _xdp_counters(relay: RelayUnderTest) -> FastPathCounters | None:
    if isinstance(relay, XdpturnRelay) and relay.name == "xdp":
        return relay.counters()
    return None


async def measure(
    hosts: Hosts,
    relay: RelayUnderTest,
    *,
    duration: float,
    junk_rate: float | None = None,
    ping_rate: float = PING_RATE,
) -> FloodResult:
    """One quiet and one flooded ping run against a started relay."""
    server = relay.server(Family.IPV4)
    echo_addr = TransportAddr.parse(f"{_ip(hosts.peer)}:{ECHO_PORT}")
    echo_sock = netns_socket(hosts.peer.netns, socket.AF_INET, (_ip(hosts.peer), ECHO_PORT))
    turn = await open_turn(hosts.client.netns, server, relay.secret, Family.IPV4, "flood")
    try:
        channel = await bind(turn, echo_addr)
        total = QUIET_S + duration + 10

        def ping(seconds: float) -> tools.PingResult:
            # Blocks this event loop: the TURN client must not read the tool's replies.
            return tools.ping(
                (str(server.ip), server.port),
                rate=ping_rate,
                count=int(ping_rate * seconds),
                size=PING_SIZE,
                channel=channel,
                fd=turn.sock.fileno(),
            ).run([*tools.netns_prefix(hosts.client.netns), *REALTIME])

        echo = tools.echo(fd=echo_sock.fileno(), duration=total)
        with echo.start([*tools.netns_prefix(hosts.peer.netns), *REALTIME]) as peer:
            peer.wait_ready()
            quiet = ping(QUIET_S)
            rss_before = system.rss_bytes(relay.pid)
            counters_before = _xdp_counters(relay)
            junk = tools.junk((str(server.ip), server.port), rate=junk_rate, duration=duration)
            prefix = [*tools.netns_prefix(hosts.attacker.netns), "taskset", "-c", GENERATOR_CPU]
            with junk.start(prefix) as attacker:
                attacker.wait_ready()
                flooded = ping(duration)
                sent = attacker.result()
            rss_after = system.rss_bytes(relay.pid)
            counters_after = _xdp_counters(relay)
            peer.interrupt()
    finally:
        await turn.client.close()
        echo_sock.close()
    result = FloodResult(relay.name, quiet, flooded, sent, rss_before, rss_after)
    if counters_before is not None and counters_after is not None:
        result.xdp_passes = _moved(counters_before.passes, counters_after.passes)
        result.xdp_drops = _moved(counters_before.drops, counters_after.drops)
    return result


def make_relay(name: str, tb: Testbed) -> RelayUnderTest:
    node = tb.relay("relay")
    if name == "coturn":
        return CoturnRelay(tb, node)
    return XdpturnRelay(tb, node, fastpath=name == "xdp")


def run(only: Sequence[str], duration: float, junk_rate: float | None) -> list[FloodResult]:
    if not only:
        return []
    tools.build()
    raise_fd_limit()
    cleanup_stale()
    results = []
    with Testbed(TOPOLOGY) as tb:
        hosts = Hosts.of(tb)
        for name in only:
            relay = make_relay(name, tb)
            relay.start()
            try:
                results.append(
                    asyncio.run(measure(hosts, relay, duration=duration, junk_rate=junk_rate))
                )
            finally:
                relay.stop()
            print(results[-1].row(), file=sys.stderr, flush=True)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--only",
        default=",".join(RELAYS),
        metavar="LIST",
        help=f"relays to run, comma-separated, from {','.join(RELAYS)} (default: all)",
    )
    p.add_argument("--duration", type=float, default=5.0, metavar="S", help="seconds of flood")
    p.add_argument(
        "--rate", type=float, metavar="PPS", help="junk datagrams per second (default: max)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON lines")


def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("xdpturn-lab flood: needs root (namespaces, XDP)", file=sys.stderr)
        return 2
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    if not only or any(n not in RELAYS for n in only):
        print(f"xdpturn-lab flood: --only: expected names from {','.join(RELAYS)}", file=sys.stderr)
        return 2
    if not 0.5 <= args.duration <= 120:
        print("xdpturn-lab flood: --duration: expected 0.5 to 120 seconds", file=sys.stderr)
        return 2
    for result in run(only, args.duration, args.rate):
        print(json.dumps(result.to_json()) if args.json else result.row())
    return 0
