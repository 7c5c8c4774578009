"""Checks shared by the e2e tests."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from collections.abc import Coroutine
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from xdpturn.fastpath import FastPathCounters
from xdpturn.proto.addr import Family
from xdpturn_lab.testbed import Testbed, netns
from xdpturn_lab.testbed.scenario import RelayProcess, Report, TurnEndpoint

T = TypeVar("T")

METRICS = "127.0.0.1:9478"  # where a test's relay serves /metrics (`--metrics`), in its namespace
SCENARIO_TIMEOUT = 90.0  # seconds for a whole asyncio scenario, set-up included

# Pass reasons that mean a relayed datagram missed the fast path. Others (ARP/ND, STUN on the
# TURN port, packets for other addresses) are normal background.
DATA_PATH_MISSES = (
    "no_channel",
    "no_peer",
    "hairpin_no_route",
    "zero_checksum",
    "ttl_expired",
    "too_big",
    "no_neighbour",
    "no_next_hop",
    "fib_failed",
    "adjust_failed",
)
# The host's own settings the relay must leave alone: it is not a router.
FORWARDING_SYSCTLS = r"(\.forwarding|ip_forward)$"
# Datagrams of a fast-path exchange that may still reach the relay's UDP sockets (e.g. a refresh).
MAX_STACK_DATAGRAMS = 10


def run(coro: Coroutine[Any, Any, T], timeout: float = SCENARIO_TIMEOUT) -> T:
    """asyncio.run with a bound on the whole scenario."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def relayed_packets(tb: Testbed, relay: str) -> dict[tuple[str, str], float]:
    """xdpturn_relayed_packets_total by (path, route), scraped from the relay's /metrics (at
    METRICS) inside its namespace."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(tb.call(relay, fetch)):
        for sample in family.samples:
            if sample.name == "xdpturn_relayed_packets_total":
                out[(sample.labels["path"], sample.labels["route"])] = sample.value
    return out


def route_deltas(before: FastPathCounters, after: FastPathCounters) -> dict[str, int]:
    """Packets per XDP route between two readings; routes that did not move are left out."""
    deltas = {
        name: after.routes[name][0] - before.routes.get(name, (0, 0))[0] for name in after.routes
    }
    return {name: n for name, n in deltas.items() if n}


def misses(before: FastPathCounters, after: FastPathCounters) -> dict[str, int]:
    """Data-path pass reasons and drops that grew between two readings."""
    deltas = {r: after.passes.get(r, 0) - before.passes.get(r, 0) for r in DATA_PATH_MISSES}
    deltas |= {f"drop:{r}": n - before.drops.get(r, 0) for r, n in after.drops.items()}
    return {r: n for r, n in deltas.items() if n}


def forwarding_sysctls(tb: Testbed, node: str) -> dict[str, str]:
    """Every forwarding sysctl of the node's namespace (all interfaces, both families)."""
    out = subprocess.run(
        ["ip", "netns", "exec", tb.netns_of(node), "sysctl", "-a", "--pattern", FORWARDING_SYSCTLS],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split(" = ", 1) for line in out.splitlines())


def assert_not_a_router(tb: Testbed, node: str) -> None:
    values = forwarding_sysctls(tb, node)
    assert values and set(values.values()) == {"0"}, f"{node} forwards: {values}"


def udp_in(tb: Testbed, node: str) -> int:
    """Datagrams the node's UDP stack delivered to sockets (UDP and UDP6 InDatagrams)."""
    with netns.entered(tb.netns_of(node)):
        with open("/proc/thread-self/net/snmp") as f:
            lines = [line.split() for line in f if line.startswith("Udp:")]
        with open("/proc/thread-self/net/snmp6") as f:
            udp6 = dict(line.split() for line in f if line.startswith("Udp6"))
    udp = dict(zip(lines[0][1:], (int(v) for v in lines[1][1:]), strict=True))
    return udp["InDatagrams"] + int(udp6["Udp6InDatagrams"])


def channel_route(ingress: Family, egress: Family, kind: str = "channel") -> str:
    """XDP route name, e.g. channel_route(IPV6, IPV4) == "ipv6_channel_to_ipv4_channel"."""
    return f"ipv{_v(ingress)}_channel_to_ipv{_v(egress)}_{kind}"


def udp_route(ingress: Family, egress: Family) -> str:
    return f"ipv{_v(ingress)}_udp_to_ipv{_v(egress)}_channel"


def _v(family: Family) -> int:
    return 4 if family is Family.IPV4 else 6


# veth hands a sent packet to the backlog of the sending CPU (netif_rx), so when a sender (an
# endpoint, or the Python relay) migrates between CPUs mid-stream, a datagram can overtake the one
# before it. Measured here: at most 1 per 10,000, with the fast path (more hand-offs between
# CPUs); none over about 40 runs of Python relaying. More than this is the relay's doing.
MAX_REORDERED_PER_10K = 10


def assert_intact(*reports: Report, note: str = "") -> None:
    """Everything arrived, once and unchanged, in order but for what veth itself reorders.
    `note` goes into the failure message (e.g. the XDP counters: which path a datagram took)."""
    for report in reports:
        assert report.ok, f"{report} {note}"
        assert report.reordered * 10_000 <= MAX_REORDERED_PER_10K * report.sent, f"{report} {note}"


def counters_note(before: FastPathCounters, after: FastPathCounters) -> str:
    return f"(XDP routes {route_deltas(before, after)}, misses {misses(before, after)})"


def udp_errors(tb: Testbed, node: str) -> dict[str, int]:
    """InCsumErrors and RcvbufErrors of UDP and UDP6 in the node's namespace."""
    with netns.entered(tb.netns_of(node)):
        # thread-self: /proc/self/net would show the main thread's namespace.
        with open("/proc/thread-self/net/snmp") as f:
            lines = [line.split() for line in f if line.startswith("Udp:")]
        with open("/proc/thread-self/net/snmp6") as f:
            udp6 = dict(line.split() for line in f if line.startswith("Udp6"))
    udp = dict(zip(lines[0][1:], (int(v) for v in lines[1][1:]), strict=True))
    return {
        "UdpInCsumErrors": udp["InCsumErrors"],
        "UdpRcvbufErrors": udp["RcvbufErrors"],
        "Udp6InCsumErrors": int(udp6["Udp6InCsumErrors"]),
        "Udp6RcvbufErrors": int(udp6["Udp6RcvbufErrors"]),
    }


def assert_seen_through_nat(
    tb: Testbed, relay: RelayProcess, endpoint: TurnEndpoint, transport: Family
) -> None:
    """The relay sees the site's NAT router, never the site host: in XOR-MAPPED-ADDRESS and in
    the relay's "allocation opened" log record."""
    site = tb.site(endpoint.name)
    nat = site.nat_public_ipv4 if transport is Family.IPV4 else site.nat_public_ipv6
    private = site.ipv4 if transport is Family.IPV4 else site.ipv6
    mapped = endpoint.mapped
    assert mapped is not None
    assert mapped.ip == nat, f"{endpoint.name} mapped to {mapped}, not {nat}"
    opened = relay.wait_for("allocation opened", where=lambda r: r.get("client") == str(mapped))
    assert opened["client"] == str(mapped)
    clients = {
        str(r.get("client")) for r in relay.records if r.get("message") == "allocation opened"
    }
    for text in clients:
        assert str(private) not in text, f"relay saw the private address {private}: {text}"
