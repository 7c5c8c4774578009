"""Splitting a TCP/TLS byte stream into whole TURN messages (RFC 8656 section 12.5), sans-IO.

A STUN message is as long as its header says; ChannelData is its length padded to 4. Both ends of
a stream use `StreamDecoder`: feed it bytes as they arrive, get back complete frames. Anything that
cannot be framed raises `FramingError`; the caller closes the connection, since a byte stream has
no way to find the next frame boundary once one is lost.
"""

from __future__ import annotations

from xdpturn.proto.channel_data import (
    ACCEPTED_CHANNEL_MAX,
    CHANNEL_MIN,
    ChannelDataError,
    stream_frame_length,
)
from xdpturn.proto.stun import MAGIC_COOKIE

# The largest frame the 16-bit length fields allow: a STUN header plus 0xFFFC bytes (lengths are
# multiples of 4). Checked anyway, so the bound on buffered bytes is explicit, not implied.
MAX_FRAME = 20 + 0xFFFC
_STUN_PREFIX = 8  # type, length, magic cookie: enough to tell STUN from noise


class FramingError(ValueError):
    """Bytes on a stream that are neither a STUN message nor ChannelData."""


class StreamDecoder:
    """Reassembles frames from arbitrary chunks. Holds at most one incomplete frame."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame
        self.failed = False  # once set, every feed raises: the stream is out of sync

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """The frames completed by `data`, in order. Raises FramingError (and stays failed)
        at the first byte that cannot start a frame."""
        if self.failed:
            raise FramingError("stream already failed")
        self._buffer += data
        frames: list[bytes] = []
        start = 0
        buffer = self._buffer
        try:
            while len(buffer) - start >= 4:
                length = self._frame_length(buffer, start)
                if length is None or len(buffer) - start < length:
                    break
                frames.append(bytes(buffer[start : start + length]))
                start += length
        except FramingError:
            self.failed = True
            self._buffer.clear()
            raise
        finally:
            if not self.failed:
                del buffer[:start]
        return frames

    def _frame_length(self, buffer: bytearray, start: int) -> int | None:
        """The frame's length, or None when more bytes are needed to decide."""
        header = bytes(buffer[start : start + 4])
        try:
            length = stream_frame_length(header)
        except ChannelDataError as exc:
            raise FramingError(str(exc)) from None
        if header[0] & 0xC0 == 0x40:
            channel = int.from_bytes(header[:2], "big")
            # Checked here rather than by the core: a bad number means the stream is not TURN.
            if not CHANNEL_MIN <= channel <= ACCEPTED_CHANNEL_MAX:
                raise FramingError(f"channel number 0x{channel:04x} outside 0x4000-0x7FFF")
        else:
            if len(buffer) - start < _STUN_PREFIX:
                return None
            if int.from_bytes(buffer[start + 4 : start + 8], "big") != MAGIC_COOKIE:
                raise FramingError("no STUN magic cookie")
        if length > self._max_frame:
            raise FramingError(f"frame of {length} bytes exceeds {self._max_frame}")
        return length


__all__ = ["MAX_FRAME", "FramingError", "StreamDecoder"]
