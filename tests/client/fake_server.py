"""An in-memory scripted TURN server and transport, for client tests without sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from xdpturn.client.turn import LostHandler, Receiver
from xdpturn.proto import stun
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.channel_data import decode_channel_data, is_channel_data
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method

REALM = "example.org"
SERVER = TransportAddr.parse("192.0.2.1:3478")
CLIENT = TransportAddr.parse("198.51.100.7:40000")
RELAYED = TransportAddr.parse("192.0.2.1:50000")


@dataclass
class FakeServer:
    """Long-term auth with one user; answers Allocate/Refresh/CreatePermission/ChannelBind."""

    username: str = "alice"
    password: str = "secret"
    drop_requests: int = 0  # swallow this many requests first (tests retransmission)
    stale_once: bool = False  # answer the first authenticated request with 438
    sign_responses: bool = True
    nonces: list[str] = field(default_factory=lambda: ["nonce-1", "nonce-2", "nonce-3"])
    requests: list[Message] = field(default_factory=list)  # every request that arrived
    data: list[bytes] = field(default_factory=list)  # Send indications and ChannelData seen
    channels: dict[int, TransportAddr] = field(default_factory=dict)

    @property
    def key(self) -> bytes:
        return stun.long_term_key(self.username, REALM, self.password)

    def handle(self, raw: bytes) -> list[bytes]:
        if is_channel_data(raw):
            self.data.append(raw)
            return []
        msg = stun.decode(raw)
        if msg.cls == MessageClass.INDICATION:
            self.data.append(raw)
            return []
        self.requests.append(msg)
        if self.drop_requests:
            self.drop_requests -= 1
            return []
        if msg.get(AttrType.MESSAGE_INTEGRITY) is None:
            return [self._challenge(msg, 401)]
        nonce = stun.decode_text(msg.get(AttrType.NONCE) or b"")
        if self.stale_once:
            self.stale_once = False
            self.nonces.pop(0)
            return [self._challenge(msg, 438)]
        if nonce != self.nonces[0] or not stun.verify_integrity(raw, self.key):
            return [self._challenge(msg, 401)]
        return [self._sign(self._answer(msg))]

    def _challenge(self, msg: Message, code: int) -> bytes:
        answer = stun.error_response(msg, code)
        answer.add(AttrType.REALM, stun.encode_text(REALM))
        answer.add(AttrType.NONCE, stun.encode_text(self.nonces[0]))
        return stun.encode(answer)

    def _sign(self, msg: Message) -> bytes:
        key = self.key if self.sign_responses else None
        return stun.encode(msg, integrity_key=key, fingerprint=True)

    def _answer(self, msg: Message) -> Message:
        ok = stun.response(msg)
        tid = msg.transaction_id
        if msg.method == Method.ALLOCATE:
            ok.add(AttrType.XOR_RELAYED_ADDRESS, stun.encode_xor_address(RELAYED, tid))
            ok.add(AttrType.XOR_MAPPED_ADDRESS, stun.encode_xor_address(CLIENT, tid))
            ok.add(AttrType.LIFETIME, stun.encode_u32(600))
        elif msg.method == Method.REFRESH:
            lifetime = msg.get(AttrType.LIFETIME)
            ok.add(AttrType.LIFETIME, lifetime if lifetime is not None else stun.encode_u32(600))
        elif msg.method == Method.CHANNEL_BIND:
            channel = stun.decode_channel_number(msg.get(AttrType.CHANNEL_NUMBER) or b"")
            peer = stun.decode_xor_address(msg.get(AttrType.XOR_PEER_ADDRESS) or b"", tid)
            if self.channels.get(channel, peer) != peer:
                return stun.error_response(msg, 400)
            self.channels[channel] = peer
        elif msg.method != Method.CREATE_PERMISSION:
            return stun.error_response(msg, 400)
        return ok


class FakeTransport:
    """Hands each sent message to `handle` and delivers its answers on the next loop turn."""

    reliable = False

    def __init__(self, handle: Callable[[bytes], list[bytes]], receiver: Receiver) -> None:
        self._handle = handle
        self._receiver = receiver
        self.closed = False

    def send(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        for answer in self._handle(data):
            loop.call_soon(self._receiver, answer)

    def close(self) -> None:
        self.closed = True

    def inject(self, data: bytes) -> None:
        """A message from the server that answers nothing (Data indication, ChannelData)."""
        self._receiver(data)


@dataclass
class FakeOpener:
    """A `TransportOpener` that keeps the transport it made, so tests can inject messages."""

    server: FakeServer
    transport: FakeTransport | None = None

    async def __call__(
        self, server: TransportAddr, receiver: Receiver, lost: LostHandler
    ) -> FakeTransport:
        self.transport = FakeTransport(self.server.handle, receiver)
        return self.transport


def data_indication(peer: TransportAddr, payload: bytes, tid: bytes = bytes(12)) -> bytes:
    msg = Message(Method.DATA, MessageClass.INDICATION, tid)
    msg.add(AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, tid))
    msg.add(AttrType.DATA, payload)
    return stun.encode(msg)


def channel_of(raw: bytes) -> int:
    return decode_channel_data(raw).channel
