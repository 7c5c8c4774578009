"""The operations listener (--metrics ADDR:PORT): Prometheus metrics, health, status, drain.

    GET  /metrics  Prometheus text format
    GET  /healthz  200 while the process runs its event loop
    GET  /readyz   200 when listening, the fast path is as configured and carrying bound channels,
                   and not draining; else 503
    GET  /status   JSON for `xdpturn status` (?top=N allocations, default 10)
    POST /drain    start draining (`xdpturn drain`); only from a loopback address

Metrics are read at scrape time from the counters the core and the fast path keep anyway
(`TurnServer.stats`, `FastPath.counters()`), so relaying does no extra work for them. The
listener is a minimal HTTP/1.0-style server on the relay's own event loop: one request per
connection, bounded in size and time, never blocking the relay for longer than a scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import Iterator
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from xdpturn import __version__
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.meter import DIRECTIONS
from xdpturn.server.drain import Drainer, RelayView
from xdpturn.server.metering import OTHER_USERS, TOP_USERS
from xdpturn.server.relay import StartError
from xdpturn.server.snapshot import fastpath_counters, not_ready, status_snapshot
from xdpturn.server.traffic import (
    drop_counts,
    error_counts,
    receive_queue_drop_counts,
    relayed_rows,
    request_counts,
    totals_by_family,
)

log = logging.getLogger("xdpturn.server")

FASTPATH_MODES = ("native", "generic", "off")
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 32  # a scraper, `xdpturn status` and a probe or two; more is a leak or abuse


class RelayCollector:
    """Reads the relay's state on every scrape."""

    def __init__(self, server: RelayView, drainer: Drainer) -> None:
        self.server = server
        self.drainer = drainer

    def collect(self) -> Iterator[Metric]:
        server = self.server
        info = GaugeMetricFamily("xdpturn_info", "Relay version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        ready = GaugeMetricFamily("xdpturn_ready", "1 when /readyz answers 200")
        ready.add_metric([], 0 if not_ready(server, self.drainer) else 1)
        yield ready
        draining = GaugeMetricFamily("xdpturn_draining", "1 while draining")
        draining.add_metric([], 1 if self.drainer.draining else 0)
        yield draining
        mode = GaugeMetricFamily(
            "xdpturn_fastpath_mode", "1 for the fast path's current mode", labels=["mode"]
        )
        for name in FASTPATH_MODES:
            mode.add_metric([name], 1 if server.fastpath.mode == name else 0)
        yield mode
        if not server.running:
            return
        yield from self._allocations()
        yield from self._core()
        yield from self._relayed()
        yield from self._users()

    def _allocations(self) -> Iterator[Metric]:
        labels = ["family"]
        gauges = {
            "allocations": GaugeMetricFamily(
                "xdpturn_allocations",
                "Active allocations by relay address family (dual: IPv4 and IPv6)",
                labels=labels,
            ),
            "permissions": GaugeMetricFamily(
                "xdpturn_permissions", "Permissions of active allocations", labels=labels
            ),
            "channels": GaugeMetricFamily(
                "xdpturn_channels", "Channel bindings of active allocations", labels=labels
            ),
        }
        for family, totals in totals_by_family(self.server.allocations()).items():
            for name, gauge in gauges.items():
                gauge.add_metric([family], getattr(totals, name))
        yield from gauges.values()
        ports = GaugeMetricFamily("xdpturn_relay_ports", "Allocation ports bound")
        ports.add_metric([], self.server.relay_port_count)
        yield ports

    def _core(self) -> Iterator[Metric]:
        stats = self.server.core.stats
        requests = CounterMetricFamily(
            "xdpturn_requests", "STUN/TURN requests received", labels=["method"]
        )
        for method, n in sorted(request_counts(stats).items()):
            requests.add_metric([method], n)
        yield requests
        errors = CounterMetricFamily(
            "xdpturn_error_responses",
            "Error responses sent (401 includes the normal first challenge)",
            labels=["method", "code"],
        )
        for (method, code), n in sorted(error_counts(stats).items()):
            errors.add_metric([method, code], n)
        yield errors
        auth = CounterMetricFamily(
            "xdpturn_auth_failures", "Requests that failed authentication (incl. challenges)"
        )
        auth.add_metric([], stats.auth_failures)
        yield auth
        drops = CounterMetricFamily(
            "xdpturn_drops", "Datagrams the Python path dropped", labels=["reason"]
        )
        for reason, n in sorted(drop_counts(stats).items()):
            drops.add_metric([reason], n)
        yield drops
        runtime = CounterMetricFamily(
            "xdpturn_runtime_events",
            "Runtime events: socket errors, full send queues, core and fast path errors",
            labels=["event"],
        )
        for event, n in sorted(self.server.stats.items()):
            runtime.add_metric([event], n)
        yield runtime
        queue_drops = CounterMetricFamily(
            "xdpturn_receive_queue_drops",
            "UDP datagrams the kernel dropped because a receive queue was full (relay "
            "overloaded: see --receive-queue-delay), by socket kind (listener, client, relay)",
            labels=["socket"],
        )
        for kind, n in receive_queue_drop_counts(self.server.receive_queue_drops()).items():
            queue_drops.add_metric([kind], n)
        yield queue_drops

    def _relayed(self) -> Iterator[Metric]:
        counters = fastpath_counters(self.server)
        labels = ["path", "route"]
        packets = CounterMetricFamily(
            "xdpturn_relayed_packets", "Datagrams relayed, by path (python, xdp)", labels=labels
        )
        nbytes = CounterMetricFamily(
            "xdpturn_relayed_bytes",
            "Bytes relayed, by path (python: application data; xdp: as the program counts)",
            labels=labels,
        )
        for row in relayed_rows(self.server.core.stats, counters):
            packets.add_metric([row.path, row.route], row.packets)
            nbytes.add_metric([row.path, row.route], row.bytes)
        yield packets
        yield nbytes
        passes = CounterMetricFamily(
            "xdpturn_fastpath_passes",
            "Packets the XDP program passed to the kernel stack, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(counters.passes.items()):
            passes.add_metric([reason], n)
        yield passes
        drops = CounterMetricFamily(
            "xdpturn_fastpath_drops",
            "Packets the XDP program dropped: never valid, or STUN over a rate limit, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(counters.drops.items()):
            drops.add_metric([reason], n)
        yield drops

    def _users(self) -> Iterator[Metric]:
        try:
            metered = self.server.metered_allocations()
        except Exception:
            log.exception("reading the allocations' meters failed")
            return
        users = self.server.metering.by_user(metered)
        labels = ["user", "direction"]
        nbytes = CounterMetricFamily(
            "xdpturn_user_bytes",
            f"Payload bytes relayed per user, both paths; the top {TOP_USERS} users by bytes, "
            f"the rest summed as user {OTHER_USERS!r}",
            labels=labels,
        )
        dropped = CounterMetricFamily(
            "xdpturn_user_dropped_bytes",
            "Payload bytes refused by --max-bps-per-allocation per user (same users)",
            labels=labels,
        )
        for user, traffic in users.items():
            for direction in DIRECTIONS:
                counts = getattr(traffic, direction)
                nbytes.add_metric([user, direction], counts.bytes)
                dropped.add_metric([user, direction], counts.dropped_bytes)
        yield nbytes
        yield dropped


def make_registry(server: RelayView, drainer: Drainer) -> CollectorRegistry:
    """A registry of its own (not the global one), so several relays can run in one process."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(RelayCollector(server, drainer))
    return registry


Response = tuple[HTTPStatus, str, bytes, dict[str, str]]


def _text(status: HTTPStatus, text: str, **headers: str) -> Response:
    return status, "text/plain; charset=utf-8", text.encode(), headers


def _json(status: HTTPStatus, value: object) -> Response:
    return status, "application/json", json.dumps(value).encode() + b"\n", {}


class OpsServer:
    """The HTTP listener on the running event loop."""

    def __init__(self, server: RelayView, drainer: Drainer, address: TransportAddr) -> None:
        self.server = server
        self.drainer = drainer
        self.address = address
        self.registry = make_registry(server, drainer)
        self.started = time.time()
        self._listener: asyncio.Server | None = None
        self._connections = 0

    async def start(self) -> None:
        try:
            self._listener = await asyncio.start_server(
                self._handle, str(self.address.ip), self.address.port, limit=MAX_REQUEST_HEAD
            )
        except OSError as e:
            raise StartError(f"--metrics: cannot bind {self.address}: {e.strerror or e}") from e
        log.info("metrics listening", extra={"metrics": str(self.bound_address)})

    @property
    def bound_address(self) -> TransportAddr:
        assert self._listener is not None and self._listener.sockets
        host, port = self._listener.sockets[0].getsockname()[:2]
        return TransportAddr(ipaddress.ip_address(host), port)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            # Not wait_closed(): on Python 3.12+ it waits for open connections, and a stuck
            # client must not delay the relay's exit.
            self._listener = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                return
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                method, target = _request_line(head)
                peer = writer.get_extra_info("peername")
                status, ctype, body, headers = self.respond(method, target, peer)
                lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Content-Type: {ctype}"]
                lines += [f"Content-Length: {len(body)}", "Connection: close"]
                lines += [f"{k}: {v}" for k, v in headers.items()]
                writer.write("\r\n".join(lines).encode() + b"\r\n\r\n")
                writer.write(body if method != "HEAD" else b"")
                await writer.drain()
        except (
            TimeoutError,
            ValueError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # a bad, oversized or slow request: just close
        except Exception:
            log.exception("metrics request failed")
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def respond(self, method: str, target: str, peer: object) -> Response:
        url = urlsplit(target)
        path = url.path
        get_paths = {"/metrics", "/healthz", "/readyz", "/status"}
        if path in get_paths and method not in ("GET", "HEAD"):
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, "use GET\n", Allow="GET, HEAD")
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.registry), {}
        if path == "/healthz":
            return _text(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            reasons = not_ready(self.server, self.drainer)
            if reasons:
                return _text(HTTPStatus.SERVICE_UNAVAILABLE, "not ready: " + "; ".join(reasons))
            return _text(HTTPStatus.OK, "ready\n")
        if path == "/status":
            top = parse_qs(url.query).get("top", ["10"])[0]
            count = int(top) if top.isdigit() else 10
            return _json(
                HTTPStatus.OK,
                status_snapshot(self.server, self.drainer, started=self.started, top=count),
            )
        if path == "/drain":
            return self._drain(method, peer)
        return _text(HTTPStatus.NOT_FOUND, "not found\n")

    def _drain(self, method: str, peer: object) -> Response:
        if method != "POST":
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, "use POST\n", Allow="POST")
        # /metrics may be exposed to a monitoring network; draining is for the host's operator.
        if not _is_loopback(peer):
            return _text(HTTPStatus.FORBIDDEN, "drain only from a loopback address\n")
        if not self.server.running:
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, "not running\n")
        started = self.drainer.start("POST /drain")
        body = {
            "draining": True,
            "started": started,
            "allocations": len(self.server.allocations()),
            "remaining_seconds": self.drainer.remaining(),
        }
        return _json(HTTPStatus.ACCEPTED if started else HTTPStatus.OK, body)


def _request_line(head: bytes) -> tuple[str, str]:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("bad request line")
    return parts[0], parts[1]


def _is_loopback(peer: object) -> bool:
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        ip = ipaddress.ip_address(str(peer[0]).partition("%")[0])
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


__all__ = ["OpsServer", "RelayCollector", "make_registry", "not_ready"]
