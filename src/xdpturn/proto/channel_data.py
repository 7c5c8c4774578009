"""ChannelData messages (RFC 8656 section 12.4).

CONTRACT STUB: signatures fixed, bodies to be written.
"""

from __future__ import annotations

from typing import NamedTuple

CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF  # RFC 8656 narrowed the range from 0x7FFF
HEADER_LENGTH = 4


class ChannelDataError(ValueError):
    """Bytes that are not a valid ChannelData message."""


class ChannelData(NamedTuple):
    channel: int
    payload: bytes


def is_channel_data(data: bytes) -> bool:
    """First two bits 0b01: a ChannelData message, not STUN (whose first two bits are 0b00)."""
    raise NotImplementedError


def decode_channel_data(data: bytes) -> ChannelData:
    """The length field, not the datagram size, decides the payload: trailing bytes (padding)
    are ignored; a length longer than what is there is an error, as is a channel number outside
    0x4000-0x4FFF."""
    raise NotImplementedError


def encode_channel_data(channel: int, payload: bytes, *, pad: bool = False) -> bytes:
    """With `pad`, round up to a multiple of 4 bytes (required over TCP/TLS)."""
    raise NotImplementedError


def stream_frame_length(header: bytes) -> int:
    """For stream transports: from the first 4 bytes of a ChannelData or the first 4 of a STUN
    header, the length of the whole frame including padding. ChannelData is padded to 4."""
    raise NotImplementedError
