"""STUN message codec (RFC 8489) with the attributes TURN needs (RFC 8656).

A `Message` is a method, a class, a transaction id and its attributes as (type, raw value) pairs in
wire order; typed values are built and read with the `encode_*`/`decode_*` helpers below, so the
message layer never has to know every attribute. `decode` checks framing and FINGERPRINT and raises
only `StunDecodeError`; authentication is a separate step (`verify_integrity`) over the bytes as
received, because MESSAGE-INTEGRITY covers the header with a rewritten length field.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum

from xdpturn.proto.addr import Family, TransportAddr

MAGIC_COOKIE = 0x2112A442
HEADER_LENGTH = 20


class Method(IntEnum):
    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class MessageClass(IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class AttrType(IntEnum):
    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    ADDITIONAL_ADDRESS_FAMILY = 0x8000
    ADDRESS_ERROR_CODE = 0x8001
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    ICMP = 0x8004
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


# Reason phrases for the error codes TURN uses (RFC 8489 section 14.8, RFC 8656 section 18).
REASONS: dict[int, str] = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthenticated",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}


class StunDecodeError(ValueError):
    """Bytes that are not a well-formed STUN message or attribute value."""


FINGERPRINT_XOR = 0x5354554E
_SHA1_LENGTH = 20
_SECURITY_ATTRS = frozenset(
    (AttrType.MESSAGE_INTEGRITY, AttrType.MESSAGE_INTEGRITY_SHA256, AttrType.FINGERPRINT)
)
_KNOWN_ATTRS = frozenset(int(a) for a in AttrType)
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)


@dataclass
class Message:
    method: int
    cls: MessageClass
    transaction_id: bytes  # 12 bytes
    attributes: list[tuple[int, bytes]] = field(default_factory=list)  # wire order

    def get(self, attr: int) -> bytes | None:
        """The value of the first attribute of this type, or None."""
        for kind, value in self.attributes:
            if kind == attr:
                return value
        return None

    def add(self, attr: int, value: bytes) -> Message:
        """Append an attribute; returns self so calls chain."""
        self.attributes.append((attr, value))
        return self


def _message_type(method: int, cls: int) -> int:
    # The class bits C1 C0 sit at bits 8 and 4, splitting the 12-bit method into 5+3+4 bits.
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def _split_type(message_type: int) -> tuple[int, MessageClass]:
    method = (
        (message_type & 0x000F) | ((message_type >> 1) & 0x0070) | ((message_type >> 2) & 0x0F80)
    )
    cls = ((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10)
    return method, MessageClass(cls)


def _padded(length: int) -> int:
    return (length + 3) & ~3


def is_stun(data: bytes) -> bool:
    """Cheap test: top two bits zero, magic cookie present, at least a header long."""
    return len(data) >= HEADER_LENGTH and data[0] & 0xC0 == 0 and data[4:8] == _COOKIE_BYTES


@dataclass(frozen=True, slots=True)
class _Parsed:
    message: Message
    # Offset of each kept attribute's TLV header in the raw bytes, parallel to message.attributes.
    offsets: list[int]


# Plain ints for the parser's per-attribute comparisons: reading an IntEnum member off its class
# costs ~0.2 us on Python 3.11, several times per attribute of every datagram.
_FINGERPRINT = int(AttrType.FINGERPRINT)
_MESSAGE_INTEGRITY = int(AttrType.MESSAGE_INTEGRITY)
_MESSAGE_INTEGRITY_SHA256 = int(AttrType.MESSAGE_INTEGRITY_SHA256)


def _parse(data: bytes) -> _Parsed:
    if len(data) < HEADER_LENGTH:
        raise StunDecodeError(f"shorter than a STUN header ({len(data)} bytes)")
    message_type, length, cookie = struct.unpack_from("!HHI", data)
    if message_type & 0xC000:
        raise StunDecodeError("top two bits of the message type are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunDecodeError("magic cookie missing")
    if length % 4:
        raise StunDecodeError(f"message length {length} is not a multiple of 4")
    if HEADER_LENGTH + length != len(data):
        raise StunDecodeError(
            f"message length {length} does not match the {len(data) - HEADER_LENGTH} bytes "
            "after the header"
        )
    method, cls = _split_type(message_type)
    msg = Message(method, cls, bytes(data[8:20]))
    offsets: list[int] = []
    seen_integrity = False
    seen_sha256 = False
    seen_fingerprint = False
    pos = HEADER_LENGTH
    total = len(data)
    while pos < total:
        if pos + 4 > total:
            raise StunDecodeError("truncated attribute header")
        kind, size = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + size
        next_pos = pos + 4 + ((size + 3) & ~3)  # values are padded to 4 bytes
        if next_pos > total:
            raise StunDecodeError(f"attribute 0x{kind:04x} overruns the message")
        value = bytes(data[pos + 4 : end])
        if seen_fingerprint:
            raise StunDecodeError("attribute after FINGERPRINT")
        keep = True
        if kind == _FINGERPRINT:
            if size != 4:
                raise StunDecodeError("FINGERPRINT is not 4 bytes")
            expected = (zlib.crc32(data[:pos]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            if struct.unpack("!I", value)[0] != expected:
                raise StunDecodeError("FINGERPRINT mismatch")
            seen_fingerprint = True
        elif kind == _MESSAGE_INTEGRITY_SHA256:
            if seen_sha256:
                keep = False
            else:
                if not 16 <= size <= 32 or size % 4:
                    raise StunDecodeError(f"MESSAGE-INTEGRITY-SHA256 of {size} bytes")
                seen_sha256 = True
        elif kind == _MESSAGE_INTEGRITY:
            if seen_integrity or seen_sha256:
                keep = False  # RFC 8489 section 14.5/14.6: only listed attributes may follow
            else:
                if size != _SHA1_LENGTH:
                    raise StunDecodeError(f"MESSAGE-INTEGRITY of {size} bytes")
                seen_integrity = True
        elif seen_integrity or seen_sha256:
            keep = False  # covered by no integrity check: ignored (RFC 8489 section 14.5)
        if keep:
            msg.attributes.append((kind, value))
            offsets.append(pos)
        pos = next_pos
    return _Parsed(msg, offsets)


def decode(data: bytes) -> Message:
    """Parse a whole message. Raises StunDecodeError on any malformation, including a
    FINGERPRINT that does not match. Attributes after MESSAGE-INTEGRITY other than
    MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are ignored (RFC 8489 section 14.5)."""
    return _parse(data).message


def _header(msg: Message, length: int) -> bytes:
    return struct.pack("!HHI", _message_type(msg.method, msg.cls), length, MAGIC_COOKIE) + bytes(
        msg.transaction_id
    )


def _tlv(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 0xFFFF:
        raise ValueError(f"attribute type out of range: {kind}")
    if len(value) > 0xFFFF:
        raise ValueError(f"attribute 0x{kind:04x} value too long ({len(value)} bytes)")
    return struct.pack("!HH", kind, len(value)) + value + bytes(_padded(len(value)) - len(value))


def _check_body_length(length: int) -> None:
    if length > 0xFFFF:
        raise ValueError(f"message too long ({length} bytes after the header)")


def encode(
    msg: Message,
    *,
    integrity_key: bytes | None = None,
    sha256: bool = False,
    fingerprint: bool = False,
) -> bytes:
    """Serialize. With `integrity_key`, append MESSAGE-INTEGRITY (or MESSAGE-INTEGRITY-SHA256
    when `sha256`), then FINGERPRINT when asked."""
    if not 0 <= msg.method <= 0x0FFF:
        raise ValueError(f"method out of range: {msg.method}")
    if len(msg.transaction_id) != 12:
        raise ValueError("transaction id must be 12 bytes")
    attributes = msg.attributes
    # Recomputed trailers replace any carried over from a decoded message.
    if integrity_key is not None:
        attributes = [(k, v) for k, v in attributes if k not in _SECURITY_ATTRS]
    elif fingerprint:
        attributes = [(k, v) for k, v in attributes if k != AttrType.FINGERPRINT]
    body = b"".join(_tlv(k, v) for k, v in attributes)
    if integrity_key is not None:
        if sha256:
            kind, digest_size, digest = AttrType.MESSAGE_INTEGRITY_SHA256, 32, hashlib.sha256
        else:
            kind, digest_size, digest = AttrType.MESSAGE_INTEGRITY, _SHA1_LENGTH, hashlib.sha1
        # The length field covers the integrity attribute itself, not what may follow it.
        length = len(body) + 4 + digest_size
        _check_body_length(length)
        mac = hmac.new(integrity_key, _header(msg, length) + body, digest).digest()
        body += _tlv(kind, mac)
    if fingerprint:
        length = len(body) + 8
        _check_body_length(length)
        crc = (zlib.crc32(_header(msg, length) + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        body += _tlv(AttrType.FINGERPRINT, struct.pack("!I", crc))
    _check_body_length(len(body))
    return _header(msg, len(body)) + body


def integrity_algorithm(msg: Message) -> str | None:
    """ "sha256" if the message carries MESSAGE-INTEGRITY-SHA256, "sha1" if MESSAGE-INTEGRITY,
    else None."""
    kinds = {kind for kind, _ in msg.attributes}
    if AttrType.MESSAGE_INTEGRITY_SHA256 in kinds:
        return "sha256"
    if AttrType.MESSAGE_INTEGRITY in kinds:
        return "sha1"
    return None


def verify_integrity(data: bytes, key: bytes) -> bool:
    """Check the message's MESSAGE-INTEGRITY-SHA256 if present, else its MESSAGE-INTEGRITY,
    over the raw bytes `data` (as received). False when neither is present or on mismatch."""
    try:
        parsed = _parse(data)
    except StunDecodeError:
        return False
    found: tuple[int, bytes, str] | None = None
    for (kind, value), offset in zip(parsed.message.attributes, parsed.offsets, strict=True):
        if kind == AttrType.MESSAGE_INTEGRITY_SHA256:
            found = (offset, value, "sha256")
            break
        if kind == AttrType.MESSAGE_INTEGRITY:
            found = (offset, value, "sha1")  # keep looking: a SHA-256 one takes precedence
    if found is None:
        return False
    offset, value, algorithm = found
    length = offset + 4 + len(value) - HEADER_LENGTH
    covered = data[:2] + struct.pack("!H", length) + data[4:offset]
    mac = hmac.new(key, covered, algorithm).digest()[: len(value)]
    return hmac.compare_digest(mac, value)


def long_term_key(username: str, realm: str, password: str, *, sha256: bool = False) -> bytes:
    """The long-term credential key: MD5 (or SHA-256) of "username:realm:password".

    Strings are hashed as given (UTF-8): any OpaqueString/SASLprep preparation is the caller's.
    """
    text = f"{username}:{realm}:{password}".encode()
    if sha256:
        return hashlib.sha256(text).digest()
    return hashlib.md5(text, usedforsecurity=False).digest()


# At most this many types are listed in a 420's UNKNOWN-ATTRIBUTES: the answer to an
# unauthenticated request stays small, however many unknown attributes it carried.
MAX_UNKNOWN_LISTED = 16


def unknown_required_attributes(msg: Message) -> list[int]:
    """Comprehension-required attribute types (< 0x8000) not in AttrType, in order of first
    appearance, at most MAX_UNKNOWN_LISTED of them."""
    unknown: dict[int, None] = {}  # ordered, and a set for the membership test
    for kind, _ in msg.attributes:
        if kind < 0x8000 and kind not in _KNOWN_ATTRS:
            unknown[kind] = None
            if len(unknown) == MAX_UNKNOWN_LISTED:
                break
    return list(unknown)


def response(request: Message, cls: MessageClass = MessageClass.SUCCESS) -> Message:
    """An empty response with the request's method and transaction id."""
    return Message(request.method, cls, request.transaction_id)


def error_response(request: Message, code: int, reason: str | None = None) -> Message:
    """An error response carrying ERROR-CODE (reason defaults to REASONS[code])."""
    text = REASONS.get(code, "") if reason is None else reason
    return response(request, MessageClass.ERROR).add(
        AttrType.ERROR_CODE, encode_error_code(code, text)
    )


# Attribute values. Decoders raise StunDecodeError on malformed values.


def _xor_mask(family: Family, transaction_id: bytes) -> bytes:
    if family == Family.IPV4:
        return _COOKIE_BYTES
    return _COOKIE_BYTES + transaction_id


def encode_xor_address(addr: TransportAddr, transaction_id: bytes) -> bytes:
    if len(transaction_id) != 12:
        raise ValueError("transaction id must be 12 bytes")
    mask = _xor_mask(addr.family, transaction_id)
    packed = bytes(a ^ b for a, b in zip(addr.ip.packed, mask, strict=True))
    return struct.pack("!BBH", 0, addr.family, addr.port ^ (MAGIC_COOKIE >> 16)) + packed


def decode_xor_address(value: bytes, transaction_id: bytes) -> TransportAddr:
    if len(transaction_id) != 12:
        raise StunDecodeError("transaction id must be 12 bytes")
    family, port, packed = _split_address(value)
    ip = bytes(a ^ b for a, b in zip(packed, _xor_mask(family, transaction_id), strict=True))
    return _make_address(ip, port ^ (MAGIC_COOKIE >> 16))


def encode_address(addr: TransportAddr) -> bytes:
    """Plain (non-XOR) address, as in MAPPED-ADDRESS and ALTERNATE-SERVER."""
    return struct.pack("!BBH", 0, addr.family, addr.port) + addr.ip.packed


def decode_address(value: bytes) -> TransportAddr:
    _, port, packed = _split_address(value)
    return _make_address(packed, port)


def _split_address(value: bytes) -> tuple[Family, int, bytes]:
    # The first byte is reserved: senders set it to zero and receivers ignore it.
    if len(value) < 4:
        raise StunDecodeError("address attribute shorter than 4 bytes")
    _, family, port = struct.unpack_from("!BBH", value)
    if family == Family.IPV4 and len(value) == 8:
        return Family.IPV4, port, bytes(value[4:])
    if family == Family.IPV6 and len(value) == 20:
        return Family.IPV6, port, bytes(value[4:])
    raise StunDecodeError(f"address family 0x{family:02x} with {len(value)} bytes")


def _make_address(packed: bytes, port: int) -> TransportAddr:
    # _split_address checked 4 bytes for IPv4 and 16 for IPv6, which ip_address tells apart.
    return TransportAddr(ipaddress.ip_address(packed), port)


def encode_error_code(code: int, reason: str) -> bytes:
    return _encode_code(0, code, reason)


def decode_error_code(value: bytes) -> tuple[int, str]:
    _, code, reason = _decode_code(value)
    return code, reason


def encode_address_error_code(family: Family, code: int, reason: str) -> bytes:
    """ADDRESS-ERROR-CODE (RFC 8656 section 18.13)."""
    return _encode_code(family, code, reason)


def decode_address_error_code(value: bytes) -> tuple[int, int, str]:
    """(raw family byte, code, reason) from ADDRESS-ERROR-CODE."""
    return _decode_code(value)


_MAX_REASON = 763  # bytes (RFC 8489 section 14.8: fewer than 128 characters)


def _encode_code(first: int, code: int, reason: str) -> bytes:
    if not 300 <= code <= 699:
        raise ValueError(f"error code out of range: {code}")
    text = reason.encode()
    if len(text) > _MAX_REASON:
        raise ValueError("reason phrase too long")
    return struct.pack("!BBBB", first, 0, code // 100, code % 100) + text


def _decode_code(value: bytes) -> tuple[int, int, str]:
    if len(value) < 4:
        raise StunDecodeError("error code attribute shorter than 4 bytes")
    first, _, hundreds, number = struct.unpack_from("!BBBB", value)
    hundreds &= 0x07
    if not 3 <= hundreds <= 6 or number > 99:
        raise StunDecodeError(f"error class {hundreds} number {number}")
    return first, hundreds * 100 + number, decode_text(value[4:])


def encode_u32(value: int) -> bytes:
    """LIFETIME, PRIORITY."""
    return struct.pack("!I", value)


def decode_u32(value: bytes) -> int:
    if len(value) != 4:
        raise StunDecodeError(f"expected 4 bytes, got {len(value)}")
    result: int = struct.unpack("!I", value)[0]
    return result


def encode_channel_number(channel: int) -> bytes:
    """Channel number plus two RFFU bytes."""
    return struct.pack("!HH", channel, 0)


def decode_channel_number(value: bytes) -> int:
    if len(value) != 4:
        raise StunDecodeError(f"CHANNEL-NUMBER of {len(value)} bytes")
    channel: int = struct.unpack_from("!H", value)[0]
    return channel


def encode_requested_transport(protocol: int) -> bytes:
    return struct.pack("!B3x", protocol)


def decode_requested_transport(value: bytes) -> int:
    """The IANA protocol number (17 = UDP)."""
    if len(value) != 4:
        raise StunDecodeError(f"REQUESTED-TRANSPORT of {len(value)} bytes")
    return value[0]


def encode_address_family(family: int) -> bytes:
    """REQUESTED-ADDRESS-FAMILY / ADDITIONAL-ADDRESS-FAMILY: family byte plus RFFU."""
    return struct.pack("!B3x", family)


def decode_address_family(value: bytes) -> int:
    """The raw family byte; the caller decides whether it is supported (0x01, 0x02)."""
    if len(value) != 4:
        raise StunDecodeError(f"address family attribute of {len(value)} bytes")
    return value[0]


def encode_unknown_attributes(types: list[int]) -> bytes:
    return struct.pack(f"!{len(types)}H", *types)


def decode_unknown_attributes(value: bytes) -> list[int]:
    if len(value) % 2:
        raise StunDecodeError("UNKNOWN-ATTRIBUTES of odd length")
    return list(struct.unpack(f"!{len(value) // 2}H", value))


def encode_even_port(reserve: bool) -> bytes:
    """EVEN-PORT (RFC 8656 section 18.7): the R bit asks to reserve the next port too."""
    return bytes([0x80 if reserve else 0])


def decode_even_port(value: bytes) -> bool:
    if len(value) != 1:
        raise StunDecodeError(f"EVEN-PORT of {len(value)} bytes")
    return bool(value[0] & 0x80)


def decode_reservation_token(value: bytes) -> bytes:
    """RESERVATION-TOKEN (RFC 8656 section 18.10): an opaque 8-byte token."""
    if len(value) != 8:
        raise StunDecodeError(f"RESERVATION-TOKEN of {len(value)} bytes")
    return bytes(value)


def encode_icmp(icmp_type: int, icmp_code: int, error_data: int = 0) -> bytes:
    """ICMP (RFC 8656 section 18.14), carried in Data indications."""
    return struct.pack("!HBBI", 0, icmp_type, icmp_code, error_data)


def decode_icmp(value: bytes) -> tuple[int, int, int]:
    """(ICMP type, ICMP code, error data)."""
    if len(value) != 8:
        raise StunDecodeError(f"ICMP attribute of {len(value)} bytes")
    _, icmp_type, icmp_code, error_data = struct.unpack("!HBBI", value)
    return icmp_type, icmp_code, error_data


def encode_text(text: str) -> bytes:
    """UTF-8 text attributes (USERNAME, REALM, NONCE, SOFTWARE)."""
    return text.encode()


def decode_text(value: bytes) -> str:
    """UTF-8 text attributes (USERNAME, REALM, NONCE, SOFTWARE)."""
    try:
        return bytes(value).decode()
    except UnicodeDecodeError as exc:
        raise StunDecodeError(f"text attribute is not UTF-8: {exc}") from None
