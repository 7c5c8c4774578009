"""ChannelData messages (RFC 8656 section 12.4).

A 4-byte header (channel number, payload length) and the payload: the compact framing for data
on a bound channel. Over UDP the datagram may carry padding past the payload; over TCP/TLS it must
be padded to a multiple of 4, and `stream_frame_length` finds frame boundaries on a byte stream.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF  # what RFC 8656 lets a client pick; our client stays in it
# What the relay accepts: RFC 5766's range. RFC 8656 narrowed it to 0x4FFF, but clients of that
# era (coturn's turnutils_uclient among them) still pick 0x5000-0x7FFF, and the first two bits
# (0b01) still tell ChannelData from STUN, so accepting them costs nothing.
ACCEPTED_CHANNEL_MAX = 0x7FFF
HEADER_LENGTH = 4

_STUN_HEADER_LENGTH = 20  # kept local: this module must not depend on the STUN codec
_HEADER = struct.Struct("!HH")  # channel number, payload length


class ChannelDataError(ValueError):
    """Bytes that are not a valid ChannelData message."""


class ChannelData(NamedTuple):
    channel: int
    payload: bytes


def is_channel_data(data: bytes) -> bool:
    """First two bits 0b01: a ChannelData message, not STUN (whose first two bits are 0b00)."""
    return len(data) >= HEADER_LENGTH and data[0] & 0xC0 == 0x40


def decode_channel_data(data: bytes) -> ChannelData:
    """The length field, not the datagram size, decides the payload: trailing bytes (padding)
    are ignored; a length longer than what is there is an error, as is a channel number outside
    0x4000-0x7FFF."""
    return ChannelData(*split_channel_data(data))


def split_channel_data(data: bytes) -> tuple[int, bytes]:
    """`decode_channel_data` as a plain (channel, payload) tuple, for the relay's per-datagram
    path: building the NamedTuple costs as much as the checks (a few hundred ns)."""
    if len(data) < HEADER_LENGTH:
        raise ChannelDataError(f"shorter than a ChannelData header ({len(data)} bytes)")
    channel, length = _HEADER.unpack_from(data)
    if not CHANNEL_MIN <= channel <= ACCEPTED_CHANNEL_MAX:
        raise ChannelDataError(f"channel number 0x{channel:04x} outside 0x4000-0x7FFF")
    if HEADER_LENGTH + length > len(data):
        raise ChannelDataError(
            f"length {length} exceeds the {len(data) - HEADER_LENGTH} bytes after the header"
        )
    return channel, bytes(data[HEADER_LENGTH : HEADER_LENGTH + length])


def encode_channel_data(channel: int, payload: bytes, *, pad: bool = False) -> bytes:
    """With `pad`, round up to a multiple of 4 bytes (required over TCP/TLS)."""
    if not CHANNEL_MIN <= channel <= ACCEPTED_CHANNEL_MAX:
        raise ValueError(f"channel number 0x{channel:04x} outside 0x4000-0x7FFF")
    if len(payload) > 0xFFFF:
        raise ValueError(f"payload too long for ChannelData ({len(payload)} bytes)")
    if not pad:
        return _HEADER.pack(channel, len(payload)) + payload
    return _HEADER.pack(channel, len(payload)) + payload + bytes((-len(payload)) % 4)


def stream_frame_length(header: bytes) -> int:
    """For stream transports: from the first 4 bytes of a ChannelData or the first 4 of a STUN
    header, the length of the whole frame including padding. ChannelData is padded to 4."""
    if len(header) < 4:
        raise ChannelDataError(f"need 4 bytes to frame, got {len(header)}")
    kind = header[0] >> 6
    length = int.from_bytes(header[2:4], "big")
    if kind == 0b01:
        return HEADER_LENGTH + length + (-length) % 4
    if kind == 0b00:
        if length % 4:
            raise ChannelDataError(f"STUN length {length} is not a multiple of 4")
        return _STUN_HEADER_LENGTH + length
    raise ChannelDataError(f"first two bits 0b{kind:02b}: neither STUN nor ChannelData")
