"""ChannelData framing (RFC 8656 section 12.4)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xdpturn.proto import stun
from xdpturn.proto.channel_data import (
    ACCEPTED_CHANNEL_MAX,
    CHANNEL_MAX,
    CHANNEL_MIN,
    ChannelData,
    ChannelDataError,
    decode_channel_data,
    encode_channel_data,
    is_channel_data,
    split_channel_data,
    stream_frame_length,
)


def test_wire_format() -> None:
    assert encode_channel_data(0x4001, b"hello") == b"\x40\x01\x00\x05hello"
    assert encode_channel_data(0x4001, b"hello", pad=True) == b"\x40\x01\x00\x05hello\0\0\0"
    assert encode_channel_data(0x4FFF, b"", pad=True) == b"\x4f\xff\x00\x00"
    assert decode_channel_data(b"\x40\x01\x00\x05hello") == ChannelData(0x4001, b"hello")


def test_length_field_decides_the_payload() -> None:
    # UDP may carry padding (or anything) past the payload: it is ignored.
    assert decode_channel_data(b"\x40\x00\x00\x02hi\0\0") == ChannelData(0x4000, b"hi")
    assert decode_channel_data(b"\x40\x00\x00\x00junk") == ChannelData(0x4000, b"")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x40\x00\x00", id="short-header"),
        pytest.param(b"\x40\x00\x00\x06hello", id="length-beyond-data"),
        pytest.param(b"\x3f\xff\x00\x00", id="channel-below-range"),
        pytest.param(b"\x80\x00\x00\x00", id="above-rfc5766-range"),
    ],
)
def test_decode_rejects(data: bytes) -> None:
    # 0x5000-0x7FFF (RFC 5766's range) is accepted: see ACCEPTED_CHANNEL_MAX.
    with pytest.raises(ChannelDataError):
        decode_channel_data(data)
    with pytest.raises(ChannelDataError):
        split_channel_data(data)  # the relay's per-datagram variant checks the same


@given(st.binary(max_size=40))
def test_split_is_decode_as_a_plain_tuple(data: bytes) -> None:
    try:
        decoded = decode_channel_data(data)
    except ChannelDataError:
        with pytest.raises(ChannelDataError):
            split_channel_data(data)
        return
    assert split_channel_data(data) == tuple(decoded)


@pytest.mark.parametrize("channel", [CHANNEL_MIN - 1, ACCEPTED_CHANNEL_MAX + 1, 0, 0xFFFF])
def test_encode_rejects_channels_out_of_range(channel: int) -> None:
    with pytest.raises(ValueError):
        encode_channel_data(channel, b"x")


def test_encode_rejects_oversized_payload() -> None:
    with pytest.raises(ValueError):
        encode_channel_data(CHANNEL_MIN, bytes(0x10000))


def test_is_channel_data_tells_stun_apart() -> None:
    request = stun.encode(stun.Message(stun.Method.BINDING, stun.MessageClass.REQUEST, bytes(12)))
    assert not is_channel_data(request)
    assert is_channel_data(encode_channel_data(CHANNEL_MIN, b""))
    assert not is_channel_data(b"\x40\x00\x00")
    assert not is_channel_data(b"\x80\x00\x00\x00")


def test_stream_frame_length() -> None:
    assert stream_frame_length(b"\x40\x00\x00\x05") == 12
    assert stream_frame_length(b"\x40\x00\x00\x08") == 12
    assert stream_frame_length(b"\x40\x00\x00\x00") == 4
    request = stun.encode(
        stun.Message(stun.Method.REFRESH, stun.MessageClass.REQUEST, bytes(12)).add(
            stun.AttrType.LIFETIME, stun.encode_u32(0)
        )
    )
    assert stream_frame_length(request[:4]) == len(request) == 28
    for bad in (b"\x40\x00", b"\x80\x00\x00\x00", b"\xc0\x00\x00\x00", b"\x00\x01\x00\x02"):
        with pytest.raises(ChannelDataError):
            stream_frame_length(bad)


@given(
    channel=st.integers(CHANNEL_MIN, CHANNEL_MAX),
    payload=st.binary(max_size=300),
    pad=st.booleans(),
    trailer=st.binary(max_size=8),
)
def test_round_trip(channel: int, payload: bytes, pad: bool, trailer: bytes) -> None:
    data = encode_channel_data(channel, payload, pad=pad)
    assert is_channel_data(data)
    assert len(data) % 4 == 0 or not pad
    assert stream_frame_length(data[:4]) == 4 + len(payload) + (-len(payload)) % 4
    assert decode_channel_data(data + trailer) == ChannelData(channel, payload)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_only_raise_channel_data_error(data: bytes) -> None:
    is_channel_data(data)
    try:
        decoded = decode_channel_data(data)
    except ChannelDataError:
        pass
    else:
        assert CHANNEL_MIN <= decoded.channel <= CHANNEL_MAX
        assert 4 + len(decoded.payload) <= len(data)
    with contextlib.suppress(ChannelDataError):
        assert stream_frame_length(data) >= 4
