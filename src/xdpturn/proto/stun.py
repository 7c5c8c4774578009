"""STUN message codec (RFC 8489) with the attributes TURN needs (RFC 8656).

CONTRACT STUB: the signatures below are the API other modules code against. Bodies to be written.
"""

from __future__ import annotations

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


@dataclass
class Message:
    method: int
    cls: MessageClass
    transaction_id: bytes  # 12 bytes
    attributes: list[tuple[int, bytes]] = field(default_factory=list)  # wire order

    def get(self, attr: int) -> bytes | None:
        """The value of the first attribute of this type, or None."""
        raise NotImplementedError

    def add(self, attr: int, value: bytes) -> Message:
        """Append an attribute; returns self so calls chain."""
        raise NotImplementedError


def is_stun(data: bytes) -> bool:
    """Cheap test: top two bits zero, magic cookie present, at least a header long."""
    raise NotImplementedError


def decode(data: bytes) -> Message:
    """Parse a whole message. Raises StunDecodeError on any malformation, including a
    FINGERPRINT that does not match. Attributes after MESSAGE-INTEGRITY other than
    MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are ignored (RFC 8489 section 14.5)."""
    raise NotImplementedError


def encode(
    msg: Message,
    *,
    integrity_key: bytes | None = None,
    sha256: bool = False,
    fingerprint: bool = False,
) -> bytes:
    """Serialize. With `integrity_key`, append MESSAGE-INTEGRITY (or MESSAGE-INTEGRITY-SHA256
    when `sha256`), then FINGERPRINT when asked."""
    raise NotImplementedError


def integrity_algorithm(msg: Message) -> str | None:
    """"sha256" if the message carries MESSAGE-INTEGRITY-SHA256, "sha1" if MESSAGE-INTEGRITY,
    else None."""
    raise NotImplementedError


def verify_integrity(data: bytes, key: bytes) -> bool:
    """Check the message's MESSAGE-INTEGRITY-SHA256 if present, else its MESSAGE-INTEGRITY,
    over the raw bytes `data` (as received). False when neither is present or on mismatch."""
    raise NotImplementedError


def long_term_key(username: str, realm: str, password: str, *, sha256: bool = False) -> bytes:
    """The long-term credential key: MD5 (or SHA-256) of "username:realm:password"."""
    raise NotImplementedError


def unknown_required_attributes(msg: Message) -> list[int]:
    """Comprehension-required attribute types (< 0x8000) not in AttrType."""
    raise NotImplementedError


def response(request: Message, cls: MessageClass = MessageClass.SUCCESS) -> Message:
    """An empty response with the request's method and transaction id."""
    raise NotImplementedError


def error_response(request: Message, code: int, reason: str | None = None) -> Message:
    """An error response carrying ERROR-CODE (reason defaults to REASONS[code])."""
    raise NotImplementedError


# Attribute values. Decoders raise StunDecodeError on malformed values.


def encode_xor_address(addr: TransportAddr, transaction_id: bytes) -> bytes:
    raise NotImplementedError


def decode_xor_address(value: bytes, transaction_id: bytes) -> TransportAddr:
    raise NotImplementedError


def encode_address(addr: TransportAddr) -> bytes:
    """Plain (non-XOR) address, as in MAPPED-ADDRESS and ALTERNATE-SERVER."""
    raise NotImplementedError


def decode_address(value: bytes) -> TransportAddr:
    raise NotImplementedError


def encode_error_code(code: int, reason: str) -> bytes:
    raise NotImplementedError


def decode_error_code(value: bytes) -> tuple[int, str]:
    raise NotImplementedError


def encode_address_error_code(family: Family, code: int, reason: str) -> bytes:
    """ADDRESS-ERROR-CODE (RFC 8656 section 18.13)."""
    raise NotImplementedError


def encode_u32(value: int) -> bytes:
    """LIFETIME, PRIORITY."""
    raise NotImplementedError


def decode_u32(value: bytes) -> int:
    raise NotImplementedError


def encode_channel_number(channel: int) -> bytes:
    """Channel number plus two RFFU bytes."""
    raise NotImplementedError


def decode_channel_number(value: bytes) -> int:
    raise NotImplementedError


def encode_requested_transport(protocol: int) -> bytes:
    raise NotImplementedError


def decode_requested_transport(value: bytes) -> int:
    """The IANA protocol number (17 = UDP)."""
    raise NotImplementedError


def encode_address_family(family: int) -> bytes:
    """REQUESTED-ADDRESS-FAMILY / ADDITIONAL-ADDRESS-FAMILY: family byte plus RFFU."""
    raise NotImplementedError


def decode_address_family(value: bytes) -> int:
    """The raw family byte; the caller decides whether it is supported (0x01, 0x02)."""
    raise NotImplementedError


def encode_unknown_attributes(types: list[int]) -> bytes:
    raise NotImplementedError


def decode_unknown_attributes(value: bytes) -> list[int]:
    raise NotImplementedError


def decode_text(value: bytes) -> str:
    """UTF-8 text attributes (USERNAME, REALM, NONCE, SOFTWARE)."""
    raise NotImplementedError
