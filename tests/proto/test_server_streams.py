"""Stream (TCP/TLS) clients in the core: the allocation goes with its connection; and the
stream framer, fed in arbitrary chunks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.proto.harness import PEER, Harness
from xdpturn.proto import stun
from xdpturn.proto.addr import Transport
from xdpturn.proto.channel_data import encode_channel_data
from xdpturn.proto.commands import AllocationClosed, RemovePermission, SendToPeer
from xdpturn.proto.framing import FramingError, StreamDecoder
from xdpturn.proto.stun import Message, MessageClass, Method


@pytest.mark.parametrize("transport", [Transport.TCP, Transport.TLS])
def test_closing_the_connection_deletes_the_allocation(transport: Transport) -> None:
    h = Harness()
    client = h.client(transport=transport)
    other = h.client("192.0.2.11:5000", transport=transport)
    client.allocate()
    other.allocate()
    client.bind(0x4000, PEER)
    h.take()
    port = client.relay_port

    h.server.handle_flow_closed(client.flow, h.now)

    assert h.take() == [
        RemovePermission(port, PEER.ip),
        AllocationClosed(client.flow, port, "connection_closed"),
    ]
    assert port not in h.ports.open
    assert [a.flow for a in h.server.allocations()] == [other.flow]
    # Nothing is left to relay for the closed flow; the other flow still relays.
    h.server.handle_peer_datagram(b"late", port, PEER, h.now)
    assert h.take() == []
    other.permit(PEER)
    h.take()
    other.send_indication(PEER, b"hi")
    assert h.take() == [SendToPeer(other.relay_port, PEER, b"hi")]


def test_closing_twice_or_without_allocation_does_nothing() -> None:
    h = Harness()
    client = h.client(transport=Transport.TCP)
    h.server.handle_flow_closed(client.flow, h.now)
    assert h.take() == []
    client.allocate()
    h.take()
    h.server.handle_flow_closed(client.flow, h.now)
    h.server.handle_flow_closed(client.flow, h.now)
    assert [type(c) for c in h.take()] == [AllocationClosed]


def test_udp_flows_are_never_closed_this_way() -> None:
    h = Harness()
    client = h.client()
    client.allocate()
    h.take()
    h.server.handle_flow_closed(client.flow, h.now)
    assert h.take() == []
    assert len(h.server.allocations()) == 1


# Framing


def stun_frame(n: int = 0) -> bytes:
    return stun.encode(Message(Method.BINDING, MessageClass.REQUEST, bytes([n]) * 12))


FRAMES = [
    stun_frame(1),
    encode_channel_data(0x4000, b"abcde", pad=True),
    encode_channel_data(0x4FFF, b"", pad=True),
    encode_channel_data(0x4001, bytes(range(256)) * 3, pad=True),
    stun_frame(2),
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_frames_come_out_whole_however_the_stream_is_cut(cuts: list[int]) -> None:
    stream = b"".join(FRAMES)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    decoder = StreamDecoder()
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out.extend(decoder.feed(stream[a:b]))
    assert out == FRAMES
    assert decoder.buffered == 0


def test_unpadded_channel_data_is_framed_as_padded() -> None:
    # Over streams the sender must pad; the padding belongs to the frame.
    decoder = StreamDecoder()
    assert decoder.feed(encode_channel_data(0x4000, b"abc")) == []
    assert decoder.feed(b"\0" + stun_frame()) == [
        encode_channel_data(0x4000, b"abc", pad=True),
        stun_frame(),
    ]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x80\x00\x00\x04",  # first bits 0b10
        b"\xff\xff\xff\xff",  # first bits 0b11
        b"\x00\x01\x00\x05\x21\x12\xa4\x42",  # STUN length not a multiple of 4
        b"\x00\x01\x00\x00\xde\xad\xbe\xef",  # no magic cookie
    ],
)
def test_garbage_fails_the_stream_for_good(garbage: bytes) -> None:
    decoder = StreamDecoder()
    with pytest.raises(FramingError):
        decoder.feed(stun_frame() + garbage)
    assert decoder.failed and decoder.buffered == 0
    with pytest.raises(FramingError):
        decoder.feed(stun_frame())


def test_a_frame_over_the_limit_is_refused_from_its_header() -> None:
    decoder = StreamDecoder(max_frame=100)
    with pytest.raises(FramingError):
        decoder.feed(b"\x40\x00\x00\x64")  # ChannelData of 100 bytes + header


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_arbitrary_bytes_only_ever_raise_framing_error(junk: bytes, chunk: int) -> None:
    decoder = StreamDecoder()
    try:
        for i in range(0, len(junk), chunk):
            for frame in decoder.feed(junk[i : i + chunk]):
                assert len(frame) >= 4
    except FramingError:
        pass
    assert decoder.buffered < 20 + 0xFFFF
