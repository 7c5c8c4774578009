"""What the relay answers before authentication: rate-limited per source over UDP, and nonces
bound to the client's transport address."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from tests.proto.harness import Harness, error_code, flow_of
from xdpturn.proto import stun
from xdpturn.proto.addr import ClientFlow, Transport
from xdpturn.proto.commands import SendToClient
from xdpturn.proto.ratelimit import SourceBuckets
from xdpturn.proto.stats import Drop
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method


def limited(rate: float = 1.0, burst: int = 3) -> Harness:
    config = dataclasses.replace(
        Harness().config, unauthenticated_rate=rate, unauthenticated_burst=burst
    )
    return Harness(config=config)


def unauthenticated_allocate(h: Harness, flow: ClientFlow) -> list[bytes]:
    msg = Message(Method.ALLOCATE, MessageClass.REQUEST, h.rng.randbytes(12))
    msg.add(AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
    h.server.handle_client_datagram(stun.encode(msg), flow, h.now)
    return [c.data for c in h.commands() if isinstance(c, SendToClient)]


def binding(h: Harness, flow: ClientFlow) -> list[bytes]:
    msg = Message(Method.BINDING, MessageClass.REQUEST, h.rng.randbytes(12))
    h.server.handle_client_datagram(stun.encode(msg), flow, h.now)
    return [c.data for c in h.commands() if isinstance(c, SendToClient)]


def test_challenges_beyond_the_burst_are_dropped_and_counted() -> None:
    h = limited(rate=1.0, burst=3)
    flow = flow_of("192.0.2.10:5000")
    for _ in range(3):
        (answer,) = unauthenticated_allocate(h, flow)
        assert error_code(stun.decode(answer)) == 401
    assert unauthenticated_allocate(h, flow) == []
    assert unauthenticated_allocate(h, flow_of("192.0.2.10:5001")) == []  # same IP
    assert h.server.stats.drops[Drop.UNAUTHENTICATED_RATE] == 2
    assert len(unauthenticated_allocate(h, flow_of("192.0.2.11:5000"))) == 1  # another IP
    h.advance(1.0)  # one token back
    assert len(unauthenticated_allocate(h, flow)) == 1
    assert unauthenticated_allocate(h, flow) == []
    assert h.ports.open == {}


def test_binding_answers_share_the_budget() -> None:
    h = limited(rate=1.0, burst=2)
    flow = flow_of("192.0.2.10:5000")
    assert len(binding(h, flow)) == 1
    assert len(unauthenticated_allocate(h, flow)) == 1
    assert binding(h, flow) == []
    assert h.server.stats.drops[Drop.UNAUTHENTICATED_RATE] == 1


def test_tcp_clients_are_not_limited() -> None:
    h = limited(rate=1.0, burst=1)
    flow = flow_of("192.0.2.10:5000", Transport.TCP)
    for _ in range(5):
        assert len(unauthenticated_allocate(h, flow)) == 1


def test_authenticated_requests_pass_when_the_budget_is_spent() -> None:
    h = limited(rate=1.0, burst=1)
    client = h.client()
    assert client.refresh().cls == MessageClass.ERROR  # the 401 spent the only token
    assert unauthenticated_allocate(h, client.flow) == []
    assert client.allocate().cls == MessageClass.SUCCESS


def test_default_limit_bounds_reflection_from_one_forged_source() -> None:
    h = Harness()
    flow = flow_of("192.0.2.10:5000")
    answered = 0
    for _ in range(10_000):  # ten seconds at 1000 requests/s
        h.now += 0.001
        answered += len(unauthenticated_allocate(h, flow))
    config = h.config
    assert config.unauthenticated_burst <= answered
    assert answered <= config.unauthenticated_burst + 10 * config.unauthenticated_rate + 1
    assert h.server.stats.drops[Drop.UNAUTHENTICATED_RATE] == 10_000 - answered


def test_source_buckets_stay_within_their_bound() -> None:
    buckets: SourceBuckets[int] = SourceBuckets(rate=1.0, burst=2, max_sources=8)
    for source in range(1000):
        assert buckets.take(source, 0.0)
        assert len(buckets) <= 8
    # A forgotten source starts again with a full bucket; a remembered one is still empty.
    assert buckets.take(0, 0.0) and buckets.take(0, 0.0) and not buckets.take(0, 0.0)


def test_source_buckets_forget_refilled_sources_first() -> None:
    buckets: SourceBuckets[int] = SourceBuckets(rate=1.0, burst=2, max_sources=4)
    for source in range(4):
        buckets.take(source, 0.0)
    buckets.take(3, 0.0)  # source 3 is empty now; 0-2 have one token, full again at t=1
    buckets.take(100, 1.0)  # full: 0-2 are forgotten, 3 is kept with its one token
    assert len(buckets) == 2
    assert buckets.take(3, 1.0) and not buckets.take(3, 1.0)


def test_rate_zero_turns_the_limit_off() -> None:
    h = limited(rate=0.0, burst=1)
    flow = flow_of("192.0.2.10:5000")
    for _ in range(50):
        assert len(unauthenticated_allocate(h, flow)) == 1


@pytest.mark.parametrize("transport", [Transport.UDP, Transport.TCP], ids=lambda t: t.value)
def test_a_nonce_from_another_port_of_the_same_ip_is_stale(transport: Transport) -> None:
    h = Harness()
    first = h.client("192.0.2.10:5000", transport=transport)
    assert first.allocate().cls == MessageClass.SUCCESS
    second = h.client("192.0.2.10:5001", transport=transport)
    second.nonce = first.nonce
    msg = second.message(
        Method.ALLOCATE, (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
    )
    response = second.send(msg, renew_nonce=False)
    assert error_code(response) == 438
    fresh = response.get(AttrType.NONCE)
    assert fresh and fresh != first.nonce
    assert len(h.server.allocations()) == 1
    second.nonce = fresh
    assert second.allocate().cls == MessageClass.SUCCESS


def test_a_nonce_from_another_ip_is_stale() -> None:
    h = Harness()
    first = h.client("192.0.2.10:5000")
    first.allocate()
    second = h.client("192.0.2.11:5000")
    second.nonce = first.nonce
    msg = second.message(
        Method.ALLOCATE, (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
    )
    assert error_code(second.send(msg, renew_nonce=False)) == 438
    assert ipaddress.ip_address("192.0.2.11") not in {
        a.flow.client.ip for a in h.server.allocations()
    }
