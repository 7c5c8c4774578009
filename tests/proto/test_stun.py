"""STUN codec: RFC 5769 vectors, attribute values, framing errors, round trips and fuzzing."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.invariants import exercise_codec
from xdpturn.proto import stun
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method, StunDecodeError


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(text)


# RFC 5769 (April 2010), sections 2.1-2.4, as printed. Their MESSAGE-INTEGRITY and FINGERPRINT
# values check the transcription: one wrong byte and the tests below fail.
SAMPLE_REQUEST = hexbytes(
    """
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
    """
)
SAMPLE_IPV4_RESPONSE = hexbytes(
    """
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
    """
)
SAMPLE_IPV6_RESPONSE = hexbytes(
    """
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
    """
)
SAMPLE_LONG_TERM_REQUEST = hexbytes(
    """
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66
    """
)
SHORT_TERM_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
VECTOR_TID = hexbytes("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
# "マトリックス" and the SASLprep'd form of the password "TheMªtrⅨ".
LT_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
LT_PASSWORD = "TheMatrIX"
LT_NONCE = "f//499k954d6OL34oL9FSTvy64sA"
LT_REALM = "example.org"

ALL_VECTORS = [
    SAMPLE_REQUEST,
    SAMPLE_IPV4_RESPONSE,
    SAMPLE_IPV6_RESPONSE,
    SAMPLE_LONG_TERM_REQUEST,
]


# RFC 5769 vectors


def test_rfc5769_sample_request() -> None:
    msg = stun.decode(SAMPLE_REQUEST)
    assert (msg.method, msg.cls, msg.transaction_id) == (
        Method.BINDING,
        MessageClass.REQUEST,
        VECTOR_TID,
    )
    assert [kind for kind, _ in msg.attributes] == [
        AttrType.SOFTWARE,
        AttrType.PRIORITY,
        AttrType.ICE_CONTROLLED,
        AttrType.USERNAME,
        AttrType.MESSAGE_INTEGRITY,
        AttrType.FINGERPRINT,
    ]
    assert stun.decode_text(msg.get(AttrType.SOFTWARE) or b"") == "STUN test client"
    assert stun.decode_text(msg.get(AttrType.USERNAME) or b"") == "evtj:h6vY"
    assert stun.decode_u32(msg.get(AttrType.PRIORITY) or b"") == 0x6E0001FF
    assert msg.get(AttrType.ICE_CONTROLLED) == hexbytes("932ff9b151263b36")
    assert stun.integrity_algorithm(msg) == "sha1"
    assert stun.verify_integrity(SAMPLE_REQUEST, SHORT_TERM_PASSWORD)
    assert not stun.verify_integrity(SAMPLE_REQUEST, b"VOkJxbRl1RmTxUk/WvJxBT")


def test_rfc5769_sample_request_reencodes_up_to_padding() -> None:
    # The vector pads USERNAME with 0x20 and we pad with zeros, so the digests differ: compare
    # after re-encoding with integrity and fingerprint recomputed.
    msg = stun.decode(SAMPLE_REQUEST)
    again = stun.encode(msg, integrity_key=SHORT_TERM_PASSWORD, fingerprint=True)
    assert len(again) == len(SAMPLE_REQUEST)
    assert stun.verify_integrity(again, SHORT_TERM_PASSWORD)
    assert stun.decode(again).attributes[:4] == msg.attributes[:4]


@pytest.mark.parametrize(
    ("data", "mapped"),
    [
        (SAMPLE_IPV4_RESPONSE, TransportAddr.parse("192.0.2.1:32853")),
        (SAMPLE_IPV6_RESPONSE, TransportAddr.parse("[2001:db8:1234:5678:11:2233:4455:6677]:32853")),
    ],
    ids=["ipv4", "ipv6"],
)
def test_rfc5769_sample_responses(data: bytes, mapped: TransportAddr) -> None:
    msg = stun.decode(data)
    assert (msg.method, msg.cls) == (Method.BINDING, MessageClass.SUCCESS)
    assert stun.decode_text(msg.get(AttrType.SOFTWARE) or b"") == "test vector"
    value = msg.get(AttrType.XOR_MAPPED_ADDRESS)
    assert value is not None
    assert stun.decode_xor_address(value, msg.transaction_id) == mapped
    assert stun.encode_xor_address(mapped, VECTOR_TID) == value
    assert stun.verify_integrity(data, SHORT_TERM_PASSWORD)
    # SOFTWARE is padded with 0x20 here, and MESSAGE-INTEGRITY covers that padding: with our
    # zero padding the same values give other digests, which must verify all the same.
    assert data[20 + 4 + 11] == 0x20
    rebuilt = stun.encode(
        Message(msg.method, msg.cls, msg.transaction_id, msg.attributes[:2]),
        integrity_key=SHORT_TERM_PASSWORD,
        fingerprint=True,
    )
    assert len(rebuilt) == len(data)
    assert stun.decode(rebuilt).attributes[:2] == msg.attributes[:2]
    assert stun.verify_integrity(rebuilt, SHORT_TERM_PASSWORD)


def test_rfc5769_long_term_request() -> None:
    msg = stun.decode(SAMPLE_LONG_TERM_REQUEST)
    assert msg.transaction_id == hexbytes("78ad3433c6ad72c029da412e")
    assert stun.decode_text(msg.get(AttrType.USERNAME) or b"") == LT_USERNAME
    assert stun.decode_text(msg.get(AttrType.NONCE) or b"") == LT_NONCE
    assert stun.decode_text(msg.get(AttrType.REALM) or b"") == LT_REALM
    key = stun.long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD)
    assert stun.verify_integrity(SAMPLE_LONG_TERM_REQUEST, key)
    assert not stun.verify_integrity(
        SAMPLE_LONG_TERM_REQUEST, stun.long_term_key(LT_USERNAME, LT_REALM, "thematrix")
    )
    # All padding in this vector is zero, so encoding the parts gives the same bytes.
    parts = Message(Method.BINDING, MessageClass.REQUEST, msg.transaction_id)
    parts.add(AttrType.USERNAME, stun.encode_text(LT_USERNAME))
    parts.add(AttrType.NONCE, stun.encode_text(LT_NONCE)).add(AttrType.REALM, b"example.org")
    assert stun.encode(parts, integrity_key=key) == SAMPLE_LONG_TERM_REQUEST


def test_long_term_key_sha256() -> None:
    # RFC 8489 9.2.2 / RFC 8656: key = SHA-256(username ":" realm ":" password) for
    # MESSAGE-INTEGRITY-SHA256. The expected values come from coreutils, not from Python:
    # `printf 'user:realm:pass' | sha256sum` (and `| md5sum` for the MD5 key).
    assert stun.long_term_key("user", "realm", "pass", sha256=True) == hexbytes(
        "07e934117abd40836e7c6329b54731b2b2d2a5f9a71f544922d75e0730d8251b"
    )
    assert stun.long_term_key("user", "realm", "pass") == hexbytes(
        "8493fbc53ba582fb4c044c456bdc40eb"
    )


# Header and framing


@pytest.mark.parametrize(
    ("method", "cls", "wire_type"),
    [
        (Method.BINDING, MessageClass.REQUEST, 0x0001),
        (Method.BINDING, MessageClass.SUCCESS, 0x0101),
        (Method.ALLOCATE, MessageClass.ERROR, 0x0113),
        (Method.SEND, MessageClass.INDICATION, 0x0016),
        (Method.DATA, MessageClass.INDICATION, 0x0017),
        (Method.CHANNEL_BIND, MessageClass.SUCCESS, 0x0109),
        (0xFFF, MessageClass.ERROR, 0x3FFF),
    ],
)
def test_message_type_bits(method: int, cls: MessageClass, wire_type: int) -> None:
    data = stun.encode(Message(method, cls, bytes(12)))
    assert struct.unpack_from("!H", data)[0] == wire_type
    msg = stun.decode(data)
    assert (msg.method, msg.cls) == (method, cls)


def test_is_stun() -> None:
    assert all(stun.is_stun(v) for v in ALL_VECTORS)
    assert not stun.is_stun(SAMPLE_REQUEST[:19])
    assert not stun.is_stun(b"\x40" + SAMPLE_REQUEST[1:])  # ChannelData's top bits
    assert not stun.is_stun(SAMPLE_REQUEST[:4] + b"\x21\x12\xa4\x43" + SAMPLE_REQUEST[8:])


def _with_length(data: bytes, length: int) -> bytes:
    return data[:2] + struct.pack("!H", length) + data[4:]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(SAMPLE_LONG_TERM_REQUEST[:19], id="short-header"),
        pytest.param(SAMPLE_LONG_TERM_REQUEST[:-4], id="truncated"),
        pytest.param(SAMPLE_LONG_TERM_REQUEST + b"\0\0\0\0", id="trailing-bytes"),
        pytest.param(b"\x80" + SAMPLE_LONG_TERM_REQUEST[1:], id="top-bits"),
        pytest.param(
            SAMPLE_LONG_TERM_REQUEST[:4] + b"\0\0\0\0" + SAMPLE_LONG_TERM_REQUEST[8:], id="cookie"
        ),
        pytest.param(
            _with_length(SAMPLE_LONG_TERM_REQUEST[:-2], 0x60 - 2), id="length-not-multiple-of-4"
        ),
        pytest.param(
            stun.encode(Message(1, MessageClass.REQUEST, bytes(12))) + b"\x00\x06\x00\x09",
            id="attribute-overruns",
        ),
        pytest.param(
            SAMPLE_REQUEST[:-1] + bytes([SAMPLE_REQUEST[-1] ^ 1]), id="fingerprint-mismatch"
        ),
        pytest.param(
            SAMPLE_REQUEST[:-12] + b"\x80\x28\x00\x04" + SAMPLE_REQUEST[-4:] + b"\0\x06\0\0",
            id="attribute-after-fingerprint",
        ),
    ],
)
def test_decode_rejects(data: bytes) -> None:
    with pytest.raises(StunDecodeError):
        stun.decode(data)


def test_fingerprint_length_and_integrity_length_checked() -> None:
    bad_fp = stun.encode(Message(1, MessageClass.REQUEST, bytes(12), [(AttrType.FINGERPRINT, b"")]))
    with pytest.raises(StunDecodeError):
        stun.decode(bad_fp)
    bad_mi = stun.encode(
        Message(1, MessageClass.REQUEST, bytes(12), [(AttrType.MESSAGE_INTEGRITY, bytes(16))])
    )
    with pytest.raises(StunDecodeError):
        stun.decode(bad_mi)
    bad_sha = stun.encode(
        Message(
            1, MessageClass.REQUEST, bytes(12), [(AttrType.MESSAGE_INTEGRITY_SHA256, bytes(12))]
        )
    )
    with pytest.raises(StunDecodeError):
        stun.decode(bad_sha)


def test_attributes_after_integrity_are_ignored_but_integrity_still_verifies() -> None:
    key = b"secret"
    msg = Message(Method.ALLOCATE, MessageClass.REQUEST, bytes(range(12)))
    msg.add(AttrType.LIFETIME, stun.encode_u32(600))
    signed = stun.encode(msg, integrity_key=key)
    extra = struct.pack("!HH", AttrType.DATA, 3) + b"abc\0"
    tampered = _with_length(signed + extra, len(signed) + len(extra) - 20)
    decoded = stun.decode(tampered)
    assert decoded.get(AttrType.DATA) is None
    assert [kind for kind, _ in decoded.attributes] == [
        AttrType.LIFETIME,
        AttrType.MESSAGE_INTEGRITY,
    ]
    assert stun.verify_integrity(tampered, key)


def test_sha256_integrity_then_fingerprint() -> None:
    key = stun.long_term_key("u", "r", "p", sha256=True)
    msg = Message(Method.REFRESH, MessageClass.REQUEST, bytes(range(12)))
    msg.add(AttrType.LIFETIME, stun.encode_u32(0))
    data = stun.encode(msg, integrity_key=key, sha256=True, fingerprint=True)
    decoded = stun.decode(data)
    assert [kind for kind, _ in decoded.attributes] == [
        AttrType.LIFETIME,
        AttrType.MESSAGE_INTEGRITY_SHA256,
        AttrType.FINGERPRINT,
    ]
    assert stun.integrity_algorithm(decoded) == "sha256"
    assert stun.verify_integrity(data, key)
    assert not stun.verify_integrity(data, key[:-1] + b"x")


def test_sha256_takes_precedence_and_truncated_sha256_verifies() -> None:
    key = b"k" * 16
    msg = Message(Method.REFRESH, MessageClass.REQUEST, bytes(12))
    sha1_signed = stun.encode(msg, integrity_key=key)
    # Append a truncated (16-byte) MESSAGE-INTEGRITY-SHA256 computed over the SHA-1 message.
    covered = _with_length(sha1_signed, len(sha1_signed) - 20 + 20)
    mac = hmac.new(key, covered, hashlib.sha256).digest()[:16]
    both = _with_length(
        sha1_signed + struct.pack("!HH", AttrType.MESSAGE_INTEGRITY_SHA256, 16) + mac,
        len(sha1_signed) - 20 + 20,
    )
    assert stun.integrity_algorithm(stun.decode(both)) == "sha256"
    assert stun.verify_integrity(both, key)
    broken = both[:-1] + bytes([both[-1] ^ 1])
    assert not stun.verify_integrity(broken, key)  # SHA-1 is fine, but SHA-256 is the one checked


def test_verify_integrity_without_integrity_or_on_garbage() -> None:
    assert not stun.verify_integrity(stun.encode(Message(1, MessageClass.REQUEST, bytes(12))), b"k")
    assert not stun.verify_integrity(b"garbage", b"k")


def test_fingerprint_value() -> None:
    data = stun.encode(Message(1, MessageClass.REQUEST, bytes(12)), fingerprint=True)
    crc = zlib.crc32(data[:-8]) ^ 0x5354554E
    assert data[-8:] == struct.pack("!HHI", AttrType.FINGERPRINT, 4, crc)
    assert struct.unpack_from("!H", data, 2)[0] == 8


def test_encode_replaces_carried_over_trailers() -> None:
    # A decoded message (zero padding) re-encoded verbatim is the same bytes, still valid.
    signed = stun.encode(stun.decode(SAMPLE_LONG_TERM_REQUEST), fingerprint=True)
    assert signed[:-8] == _with_length(SAMPLE_LONG_TERM_REQUEST, 0x60 + 8)
    assert stun.encode(stun.decode(signed)) == signed
    # Asking for new trailers replaces the old ones instead of adding a second set.
    msg = stun.decode(SAMPLE_REQUEST)
    again = stun.encode(msg, integrity_key=b"other", fingerprint=True)
    kinds = [kind for kind, _ in stun.decode(again).attributes]
    assert kinds.count(AttrType.MESSAGE_INTEGRITY) == 1
    assert kinds.count(AttrType.FINGERPRINT) == 1
    assert stun.verify_integrity(again, b"other")


def test_encode_rejects_bad_messages() -> None:
    with pytest.raises(ValueError):
        stun.encode(Message(1, MessageClass.REQUEST, bytes(11)))
    with pytest.raises(ValueError):
        stun.encode(Message(0x1000, MessageClass.REQUEST, bytes(12)))
    with pytest.raises(ValueError):
        stun.encode(Message(1, MessageClass.REQUEST, bytes(12), [(AttrType.DATA, bytes(0x10000))]))
    too_long: list[tuple[int, bytes]] = [(AttrType.DATA, bytes(0x8000))] * 2
    with pytest.raises(ValueError):
        stun.encode(Message(1, MessageClass.REQUEST, bytes(12), too_long))


def test_unknown_attributes_are_listed_up_to_a_bound() -> None:
    # 16,000 distinct unknown types fit in one 64 KiB datagram; listing them all made the
    # answer large and the scan quadratic (1.7 s for one datagram).
    request = Message(Method.BINDING, MessageClass.REQUEST, bytes(12))
    for kind in range(0x4000, 0x4000 + 16_000):
        request.add(kind, b"")
    listed = stun.unknown_required_attributes(request)
    assert listed == list(range(0x4000, 0x4000 + stun.MAX_UNKNOWN_LISTED))


def test_get_add_response_and_unknown_attributes() -> None:
    request = Message(Method.ALLOCATE, MessageClass.REQUEST, bytes(range(12)))
    assert request.add(0x7FFF, b"a").add(0x7FFF, b"b").add(0xC001, b"c") is request
    request.add(AttrType.LIFETIME, b"\0\0\0\1").add(0x0030, b"")
    assert request.get(0x7FFF) == b"a"
    assert request.get(AttrType.NONCE) is None
    assert stun.unknown_required_attributes(request) == [0x7FFF, 0x0030]
    ok = stun.response(request)
    assert (ok.method, ok.cls, ok.transaction_id, ok.attributes) == (
        Method.ALLOCATE,
        MessageClass.SUCCESS,
        request.transaction_id,
        [],
    )
    err = stun.error_response(request, 437)
    assert err.cls == MessageClass.ERROR
    assert stun.decode_error_code(err.get(AttrType.ERROR_CODE) or b"") == (
        437,
        "Allocation Mismatch",
    )
    assert stun.decode_error_code(
        stun.error_response(request, 400, "no LIFETIME").get(AttrType.ERROR_CODE) or b""
    ) == (400, "no LIFETIME")


# Attribute values


def test_error_code_wire_format() -> None:
    assert stun.encode_error_code(438, "Stale Nonce") == b"\0\0\x04\x26Stale Nonce"
    assert stun.decode_error_code(b"\0\0\x04\x26Stale Nonce") == (438, "Stale Nonce")
    assert stun.decode_error_code(b"\0\0\x05\x08") == (508, "")
    for bad in [b"\0\0\x04", b"\0\0\x02\x00", b"\0\0\x07\x00", b"\0\0\x04\x64", b"\0\0\x04\0\xff"]:
        with pytest.raises(StunDecodeError):
            stun.decode_error_code(bad)
    for code in (299, 700):
        with pytest.raises(ValueError):
            stun.encode_error_code(code, "")


def test_address_error_code() -> None:
    value = stun.encode_address_error_code(Family.IPV6, 440, "Address Family not Supported")
    assert value[:4] == b"\x02\0\x04\x28"
    assert stun.decode_address_error_code(value) == (2, 440, "Address Family not Supported")


ADDRESSES = [
    TransportAddr.parse("192.0.2.1:32853"),
    TransportAddr.parse("0.0.0.0:0"),
    TransportAddr.parse("255.255.255.255:65535"),
    TransportAddr.parse("[::]:1"),
    TransportAddr.parse("[2001:db8::1]:3478"),
    TransportAddr.parse("[::ffff:192.0.2.9]:9"),
]


@pytest.mark.parametrize("addr", ADDRESSES, ids=str)
def test_addresses_round_trip(addr: TransportAddr) -> None:
    assert stun.decode_address(stun.encode_address(addr)) == addr
    assert stun.decode_xor_address(stun.encode_xor_address(addr, VECTOR_TID), VECTOR_TID) == addr
    assert len(stun.encode_address(addr)) == (8 if addr.family == Family.IPV4 else 20)


def test_plain_address_wire_format() -> None:
    assert stun.encode_address(TransportAddr.parse("192.0.2.1:3478")) == hexbytes(
        "00010d96c0000201"
    )


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\0\x01\0\0\x01\x02\x03",  # IPv4 one byte short
        b"\0\x02\0\0" + bytes(4),  # IPv6 family, IPv4 length
        b"\0\x01\0\0" + bytes(16),  # IPv4 family, IPv6 length
        b"\0\x03\0\0\x01\x02\x03\x04",  # unknown family
    ],
)
def test_bad_addresses(value: bytes) -> None:
    with pytest.raises(StunDecodeError):
        stun.decode_address(value)
    with pytest.raises(StunDecodeError):
        stun.decode_xor_address(value, VECTOR_TID)


def test_xor_address_needs_a_transaction_id() -> None:
    value = stun.encode_xor_address(ADDRESSES[4], VECTOR_TID)
    with pytest.raises(StunDecodeError):
        stun.decode_xor_address(value, b"short")


def test_fixed_size_values() -> None:
    assert stun.encode_u32(600) == b"\0\0\x02\x58"
    assert stun.decode_u32(b"\0\0\x02\x58") == 600
    assert stun.encode_channel_number(0x4001) == b"\x40\x01\0\0"
    assert stun.decode_channel_number(b"\x40\x01\0\0") == 0x4001
    assert stun.encode_requested_transport(17) == b"\x11\0\0\0"
    assert stun.decode_requested_transport(b"\x11\0\0\0") == 17
    assert stun.encode_address_family(Family.IPV6) == b"\x02\0\0\0"
    assert stun.decode_address_family(b"\x02\0\0\0") == 2
    assert stun.decode_unknown_attributes(stun.encode_unknown_attributes([0x1234, 0x7FFF])) == [
        0x1234,
        0x7FFF,
    ]
    assert stun.encode_even_port(True) == b"\x80"
    assert stun.decode_even_port(b"\x80") is True
    assert stun.decode_even_port(b"\x00") is False
    assert stun.decode_reservation_token(bytes(range(8))) == bytes(range(8))
    assert stun.decode_icmp(stun.encode_icmp(3, 4, 1400)) == (3, 4, 1400)
    assert stun.decode_text(stun.encode_text("r\u00e9alm")) == "r\u00e9alm"
    decoders = [
        stun.decode_u32,
        stun.decode_channel_number,
        stun.decode_requested_transport,
        stun.decode_address_family,
        stun.decode_reservation_token,
        stun.decode_icmp,
    ]
    for decoder in decoders:
        with pytest.raises(StunDecodeError):
            decoder(b"\0\0\0")
    for bad in (b"", b"\0\0"):
        with pytest.raises(StunDecodeError):
            stun.decode_even_port(bad)
    with pytest.raises(StunDecodeError):
        stun.decode_unknown_attributes(b"\0\0\0")
    with pytest.raises(StunDecodeError):
        stun.decode_text(b"\xff")


# Property tests

SECURITY = {AttrType.MESSAGE_INTEGRITY, AttrType.MESSAGE_INTEGRITY_SHA256, AttrType.FINGERPRINT}
attr_types = st.integers(0, 0xFFFF).filter(lambda t: t not in SECURITY)
attributes = st.lists(st.tuples(attr_types, st.binary(max_size=64)), max_size=8)
messages = st.builds(
    Message,
    method=st.integers(0, 0xFFF),
    cls=st.sampled_from(MessageClass),
    transaction_id=st.binary(min_size=12, max_size=12),
    attributes=attributes,
)


@given(
    msg=messages,
    key=st.none() | st.binary(max_size=32),
    sha256=st.booleans(),
    fingerprint=st.booleans(),
)
def test_round_trip(msg: Message, key: bytes | None, sha256: bool, fingerprint: bool) -> None:
    data = stun.encode(msg, integrity_key=key, sha256=sha256, fingerprint=fingerprint)
    assert stun.is_stun(data)
    assert len(data) % 4 == 0
    decoded = stun.decode(data)
    assert (decoded.method, decoded.cls, decoded.transaction_id) == (
        msg.method,
        msg.cls,
        msg.transaction_id,
    )
    trailers = [kind for kind, _ in decoded.attributes[len(msg.attributes) :]]
    assert decoded.attributes[: len(msg.attributes)] == msg.attributes
    expected: list[int] = []
    if key is not None:
        expected.append(AttrType.MESSAGE_INTEGRITY_SHA256 if sha256 else AttrType.MESSAGE_INTEGRITY)
        assert stun.verify_integrity(data, key)
        assert not stun.verify_integrity(data, key + b"x")
    else:
        assert stun.integrity_algorithm(decoded) is None
    if fingerprint:
        expected.append(AttrType.FINGERPRINT)
    assert trailers == expected
    # Re-encoding the decoded message verbatim gives the same bytes.
    assert stun.encode(decoded) == data


@given(
    addr=st.builds(
        TransportAddr,
        ip=st.ip_addresses().map(lambda ip: ipaddress.ip_address(ip.packed)),
        port=st.integers(0, 0xFFFF),
    ),
    tid=st.binary(min_size=12, max_size=12),
)
def test_address_round_trip_property(addr: TransportAddr, tid: bytes) -> None:
    assert stun.decode_xor_address(stun.encode_xor_address(addr, tid), tid) == addr
    assert stun.decode_address(stun.encode_address(addr)) == addr


@given(code=st.integers(300, 699), reason=st.text(max_size=127))
def test_error_code_round_trip(code: int, reason: str) -> None:
    assert stun.decode_error_code(stun.encode_error_code(code, reason)) == (code, reason)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_decode_error(data: bytes) -> None:
    exercise_codec(data)


@given(
    body=st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=24)), max_size=6),
    tid=st.binary(min_size=12, max_size=12),
)
def test_valid_header_with_random_attributes(body: list[tuple[int, bytes]], tid: bytes) -> None:
    # Framing is right, so decoding reaches the attribute checks (FINGERPRINT, integrity sizes).
    raw = b"".join(
        struct.pack("!HH", kind, len(value)) + value + bytes(-len(value) % 4)
        for kind, value in body
    )
    exercise_codec(struct.pack("!HHI", 0x0003, len(raw), stun.MAGIC_COOKIE) + tid + raw)


@given(
    seed=st.sampled_from(ALL_VECTORS),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 200),
)
def test_mutated_vectors_only_raise_decode_error(
    seed: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed)
    for position, xor in edits:
        data[position % len(data)] ^= xor
    exercise_codec(bytes(data))
    exercise_codec(bytes(data[:cut]))
