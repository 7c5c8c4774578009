"""The guard (issue 12): what can never be valid is dropped and counted in XDP, what Python must
see (STUN) is rate-limited per source and relay-wide, and nothing a real client or peer sends is
lost on the way: ChannelData of a client with an allocation and datagrams of a permitted peer
still reach Python when the program cannot relay them."""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Iterator

import pytest

from tests.fastpath.conftest import LOCAL4, LOCAL6, PUBLIC4, TURN_PORT, Lab, allocated
from tests.fastpath.packets import channel_data, route, run, taddr, udp_frame
from xdpturn.fastpath import FastPathCounters, GuardConfig
from xdpturn.fastpath import libbpf as bpf
from xdpturn.fastpath.xdp import XdpFastPath
from xdpturn.proto.addr import ClientAddr, ClientFlow, TransportAddr
from xdpturn.proto.stun import Message, MessageClass, Method, encode

pytestmark = pytest.mark.kernel

CLIENT = "192.0.2.10:50000"
PEER = "198.51.100.20:6000"
RELAY = 50200
TURN4 = taddr(f"{LOCAL4}:{TURN_PORT}")
TURN6 = taddr(f"[{LOCAL6}]:{TURN_PORT}")
ROUTE = route(CLIENT, 0x4000, RELAY, PEER)


def binding(seed: int = 0) -> bytes:
    return encode(Message(Method.BINDING, MessageClass.REQUEST, seed.to_bytes(12, "big")))


def to_turn(source: str, payload: bytes) -> bytes:
    src = taddr(source)
    return udp_frame(src, TURN4 if src.ip.version == 4 else TURN6, payload)


def to_relay_port(source: str, payload: bytes = b"x", port: int = RELAY) -> bytes:
    return udp_frame(taddr(source), taddr(f"{LOCAL4}:{port}"), payload)


@pytest.fixture
def guarded(lab: Lab) -> Iterator[Lab]:
    """One allocation (CLIENT on RELAY) with a channel and a permission for PEER; the guard's
    defaults again afterwards."""
    lab.fastpath.install(ROUTE)
    try:
        with allocated(lab.fastpath, [ROUTE]):
            yield lab
    finally:
        lab.fastpath.remove(ROUTE)
        lab.fastpath.guard.configure(GuardConfig())


def verdict(lab: Lab, frame: bytes) -> tuple[int, dict[str, int]]:
    """The program's action on `frame` and which pass or drop counters moved."""
    before = lab.fastpath.counters()
    out = run(lab.fastpath, lab.ns, lab.ifindex["rly0"], frame)
    after = lab.fastpath.counters()
    if out.action == bpf.XDP_PASS:
        assert out.frame == frame, "a passed packet must reach the stack unchanged"
    return out.action, moved(before, after)


def moved(before: FastPathCounters, after: FastPathCounters) -> dict[str, int]:
    out = {f"pass:{k}": v - before.passes[k] for k, v in after.passes.items()}
    out |= {f"drop:{k}": v - before.drops[k] for k, v in after.drops.items()}
    return {k: v for k, v in out.items() if v}


DROP, PASS = bpf.XDP_DROP, bpf.XDP_PASS

# (what, frame, expected verdict, expected counter)
CASES = [
    ("one byte", to_turn("192.0.2.77:4000", b"\x00"), DROP, "drop:not_turn_message"),
    ("three bytes", to_turn("192.0.2.77:4000", b"\x40\x00\x00"), DROP, "drop:not_turn_message"),
    (
        "first bits 10",
        to_turn("192.0.2.77:4000", b"\x80" + b"\x00" * 30),
        DROP,
        "drop:not_turn_message",
    ),
    ("first bits 11", to_turn(CLIENT, b"\xff" * 40), DROP, "drop:not_turn_message"),
    ("STUN header cut", to_turn("192.0.2.77:4000", binding()[:19]), DROP, "drop:bad_stun"),
    (
        "no magic cookie",
        to_turn("192.0.2.77:4000", binding()[:4] + b"\x21\x12\xa4\x43" + binding()[8:]),
        DROP,
        "drop:bad_stun",
    ),
    ("length not /4", to_turn("192.0.2.77:4000", binding() + b"\x00\x00"), DROP, "drop:bad_stun"),
    (
        "length lies",
        to_turn("192.0.2.77:4000", binding()[:2] + struct.pack("!H", 8) + binding()[4:]),
        DROP,
        "drop:bad_stun",
    ),
    (
        "ChannelData longer than the datagram",
        to_turn(CLIENT, channel_data(0x4000, b"data", length=200)),
        DROP,
        "drop:bad_channel_data",
    ),
    (
        "ChannelData, source without allocation",
        to_turn("192.0.2.77:4000", channel_data(0x4000, b"data")),
        DROP,
        "drop:unknown_client",
    ),
    (
        "ChannelData, the client's other port",
        to_turn("192.0.2.10:50001", channel_data(0x4000, b"data")),
        DROP,
        "drop:unknown_client",
    ),
    (
        "ChannelData of the client, unbound channel",
        to_turn(CLIENT, channel_data(0x4FFF, b"data")),
        PASS,
        "pass:no_channel",
    ),
    (
        "ChannelData of the client, 4 bytes of padding",
        to_turn(CLIENT, channel_data(0x4000, b"data", pad=4)),
        PASS,
        "pass:bad_channel_length",
    ),
    ("STUN from the client", to_turn(CLIENT, binding()), PASS, "pass:stun"),
    ("a peer without permission", to_relay_port("198.51.100.21:6000"), DROP, "drop:no_permission"),
    ("a permitted peer, unbound port", to_relay_port("198.51.100.20:6001"), PASS, "pass:no_peer"),
    (
        "not an allocation port",
        to_relay_port("198.51.100.21:6000", port=RELAY + 1),
        PASS,
        "pass:not_turn",
    ),
    (
        "the relay's own address",
        udp_frame(taddr(f"{LOCAL4}:{RELAY + 2}"), taddr(f"{LOCAL4}:{RELAY}"), b"x"),
        PASS,
        "pass:no_peer",
    ),
]


@pytest.mark.parametrize(("what", "frame", "action", "counter"), CASES, ids=[c[0] for c in CASES])
def test_verdict(guarded: Lab, what: str, frame: bytes, action: int, counter: str) -> None:
    assert verdict(guarded, frame) == (action, {counter: 1})


def test_every_drop_reason_has_a_case(guarded: Lab) -> None:
    rate_limits = {"stun_rate_source", "stun_rate_total"}  # below
    not_the_guards = {
        "rewritten_truncated",  # cannot happen in practice (shared.h)
        "allocation_rate",  # the per-allocation limit: tests/fastpath/test_meter.py
    }
    covered = {c[3].removeprefix("drop:") for c in CASES if c[3].startswith("drop:")}
    names = set(guarded.fastpath.counters().drops)
    assert names - covered - rate_limits - not_the_guards == set()


def test_with_the_guard_off_everything_is_passed(guarded: Lab) -> None:
    guarded.fastpath.guard.configure(GuardConfig(enabled=False))
    for what, frame, _, _ in CASES:
        action, counters = verdict(guarded, frame)
        assert action == PASS, what
        assert not any(k.startswith("drop:") for k in counters), what


def send_stun(lab: Lab, sources: list[str], count: int) -> tuple[dict[str, int], float]:
    """`count` Binding requests from each source in turn; counters moved and seconds taken."""
    before = lab.fastpath.counters()
    started = time.monotonic()
    for i in range(count):
        for source in sources:
            run(lab.fastpath, lab.ns, lab.ifindex["rly0"], to_turn(source, binding(i)))
    elapsed = time.monotonic() - started
    return moved(before, lab.fastpath.counters()), elapsed


def test_stun_is_limited_per_source(guarded: Lab) -> None:
    rate = 10  # a bucket holds one second's worth: 10
    guarded.fastpath.guard.configure(GuardConfig(stun_rate_per_source=rate, stun_rate_total=0))
    counters, elapsed = send_stun(guarded, ["192.0.2.101:4000"], 40)
    passed = counters.get("pass:stun", 0)
    assert rate <= passed <= rate + math.ceil(elapsed * rate), counters
    assert counters["drop:stun_rate_source"] == 40 - passed

    # Another source has its own bucket; the client with an allocation is never limited.
    counters, _ = send_stun(guarded, ["192.0.2.102:4000"], rate)
    assert counters == {"pass:stun": rate}
    counters, _ = send_stun(guarded, [CLIENT], 40)
    assert counters == {"pass:stun": 40}


def test_an_ipv6_source_is_its_64(guarded: Lab) -> None:
    rate = 10
    guarded.fastpath.guard.configure(GuardConfig(stun_rate_per_source=rate, stun_rate_total=0))
    one_net = ["[2001:db8:1:7::1]:4000", "[2001:db8:1:7:ffff::2]:4001"]
    counters, elapsed = send_stun(guarded, one_net, 20)
    passed = counters.get("pass:stun", 0)
    assert rate <= passed <= rate + math.ceil(elapsed * rate), counters
    counters, _ = send_stun(guarded, ["[2001:db8:1:8::1]:4000"], rate)
    assert counters == {"pass:stun": rate}


def test_stun_is_limited_relay_wide(guarded: Lab) -> None:
    rate = 10
    guarded.fastpath.guard.configure(GuardConfig(stun_rate_per_source=0, stun_rate_total=rate))
    sources = [f"192.0.2.{110 + i}:4000" for i in range(5)]
    counters, elapsed = send_stun(guarded, sources, 6)
    passed = counters.get("pass:stun", 0)
    assert rate <= passed <= rate + math.ceil(elapsed * rate), counters
    assert counters["drop:stun_rate_total"] == 30 - passed
    counters, _ = send_stun(guarded, [CLIENT], 20)  # allocations are not counted
    assert counters == {"pass:stun": 20}


def test_a_client_that_could_not_be_recorded_still_reaches_python(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the kernel cannot learn an allocation, unknown-client ChannelData goes to Python
    again, for every client: a bound channel is never cut off by a failed map update."""
    fp = XdpFastPath(lab.fastpath.config)  # its own maps: this state is for good
    try:
        scratch = Lab(lab.ns, lab.ifindex, lab.mac, fp)

        def full(key: bytes, value: bytes, flags: int = 0) -> None:
            raise OSError(7, "Argument list too long")

        monkeypatch.setattr(fp.guard.clients, "update", full)
        fp.allocation_opened(ClientFlow(ClientAddr(TransportAddr.parse(CLIENT))), RELAY)
        frame = to_turn("192.0.2.77:4000", channel_data(0x4000, b"data"))
        assert verdict(scratch, frame) == (PASS, {"pass:no_channel": 1})
        fp.guard.configure(GuardConfig())  # reconfiguring does not forget it
        assert verdict(scratch, frame) == (PASS, {"pass:no_channel": 1})
        # What can never be valid is still dropped.
        junk = to_turn("192.0.2.77:4000", b"\xff" * 40)
        assert verdict(scratch, junk) == (DROP, {"drop:not_turn_message": 1})
    finally:
        fp.close()


def test_a_closed_allocation_is_forgotten(lab: Lab) -> None:
    fp = lab.fastpath
    flow = ClientFlow(ClientAddr(TransportAddr.parse("192.0.2.10:50002")))
    frame = to_turn("192.0.2.10:50002", channel_data(0x4000, b"data"))
    peer = to_relay_port("198.51.100.20:6000", port=RELAY + 4)
    fp.allocation_opened(flow, RELAY + 4)
    fp.permit(RELAY + 4, TransportAddr.parse(PEER).ip)
    assert verdict(lab, frame) == (PASS, {"pass:no_channel": 1})
    assert verdict(lab, peer) == (PASS, {"pass:not_turn": 1})
    fp.unpermit(RELAY + 4, TransportAddr.parse(PEER).ip)
    assert verdict(lab, peer) == (DROP, {"drop:no_permission": 1})
    fp.allocation_closed(flow, RELAY + 4)
    assert verdict(lab, frame) == (DROP, {"drop:unknown_client": 1})
    assert verdict(lab, peer) == (PASS, {"pass:not_turn": 1})


def test_the_relay_itself_as_peer_is_never_judged(guarded: Lab) -> None:
    frame = udp_frame(taddr(f"{PUBLIC4}:{RELAY + 5}"), taddr(f"{LOCAL4}:{RELAY}"), b"x")
    action, counters = verdict(guarded, frame)
    assert action == PASS and not any(k.startswith("drop:") for k in counters)
