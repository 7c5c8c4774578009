"""Writes the seed corpus kept in tests/fuzz/corpus (rerun after changing the script format):

.venv/bin/python -m tests.fuzz.seeds
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.fuzz.invariants import CLIENTS, PEERS, PUBLIC_V4, RELAY_PORT_LOW, step
from xdpturn.proto import stun
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.channel_data import encode_channel_data
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method

CORPUS = Path(__file__).parent / "corpus"
TID = bytes(range(1, 13))


def request(method: Method, *attrs: tuple[int, bytes]) -> bytes:
    return stun.encode(Message(method, MessageClass.REQUEST, TID, list(attrs)))


def peer_attr(peer: TransportAddr) -> tuple[int, bytes]:
    return (AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, TID))


UDP = (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
DUAL = (AttrType.ADDITIONAL_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV6))
EVEN_RESERVE = (AttrType.EVEN_PORT, stun.encode_even_port(True))
ALLOCATE = request(Method.ALLOCATE, UDP)
PERMIT = request(Method.CREATE_PERMISSION, peer_attr(PEERS[0]))
BIND = request(
    Method.CHANNEL_BIND,
    (AttrType.CHANNEL_NUMBER, stun.encode_channel_number(0x4000)),
    peer_attr(PEERS[0]),
)
SEND = stun.encode(
    Message(
        Method.SEND,
        MessageClass.INDICATION,
        TID,
        [peer_attr(PEERS[0]), (AttrType.DATA, b"hello")],
    )
)


def codec_seeds() -> list[bytes]:
    key = stun.long_term_key("user", "realm", "password")
    signed = Message(Method.ALLOCATE, MessageClass.REQUEST, TID, [UDP, DUAL])
    signed.add(AttrType.USERNAME, b"user").add(AttrType.REALM, b"realm")
    signed.add(AttrType.NONCE, b"0123456789abcdef")
    error = stun.error_response(Message(Method.ALLOCATE, MessageClass.REQUEST, TID), 401)
    error.add(AttrType.REALM, b"realm")
    return [
        ALLOCATE,
        PERMIT,
        BIND,
        SEND,
        request(Method.BINDING),
        stun.encode(signed, integrity_key=key, fingerprint=True),
        stun.encode(signed, integrity_key=key, sha256=True, fingerprint=True),
        stun.encode(error, fingerprint=True),
    ]


def server_seeds() -> list[bytes]:
    udp, tcp = 0, 3 * 8  # op bases: client 0 (UDP), client 3 (TCP)
    relay_port = (0).to_bytes(1, "big")  # offset of the first allocation port
    session = [
        step(udp, ALLOCATE),  # 401: the harness learns the nonce
        step(udp + 3, ALLOCATE),  # signed
        step(udp + 3, PERMIT),
        step(udp + 3, BIND),
        step(udp, encode_channel_data(0x4000, b"through the channel")),
        step(udp, SEND),
        step(4, relay_port + b"from the peer"),
        step(5, b"\x78"),  # two minutes
        step(udp + 3, request(Method.REFRESH)),
        step(5, b"\xff"),
    ]
    to_self = request(Method.CREATE_PERMISSION, peer_attr(TransportAddr(PUBLIC_V4, RELAY_PORT_LOW)))
    return [
        b"".join(session),
        b"".join([step(tcp, ALLOCATE), step(tcp + 3, ALLOCATE), step(tcp + 3, PERMIT)]),
        b"".join(
            [
                step(udp, request(Method.ALLOCATE, UDP, DUAL)),
                step(3, request(Method.ALLOCATE, UDP, DUAL)),
                step(3, to_self),
            ]
        ),
        b"".join(  # an RTP/RTCP pair: the reservation expires unused
            [
                step(udp, request(Method.ALLOCATE, UDP, EVEN_RESERVE)),
                step(3, request(Method.ALLOCATE, UDP, EVEN_RESERVE)),
                step(5, b"\x78"),
            ]
        ),
        b"".join(step(8, request(Method.BINDING)) for _ in range(3)),
        step(udp, b"\x40\x00\x00\x04abcd"),
        step(4, relay_port + b"no allocation"),
    ]


def write(name: str, seeds: list[bytes]) -> None:
    folder = CORPUS / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for seed in seeds:
        (folder / hashlib.sha1(seed).hexdigest()).write_bytes(seed)


def main() -> None:
    write("codec", codec_seeds())
    write("server", server_seeds())
    assert CLIENTS[3].transport.value == "tcp"


if __name__ == "__main__":
    main()
