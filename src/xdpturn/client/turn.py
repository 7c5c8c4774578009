"""An asyncio TURN client (RFC 8656) for UDP relaying, over a pluggable message transport.

`TurnClient` owns one allocation on one server. Requests are STUN transactions: retransmitted
over unreliable transports with RTO doubling (RFC 8489 section 6.2.1), authenticated with the
long-term credential mechanism (RFC 8489 section 9.2): the first request goes without credentials,
the 401 answer supplies REALM and NONCE, and a 438 (stale nonce) is retried once with the new one.

The transport only moves whole messages (STUN or ChannelData) to and from the server: UDP is
`open_udp`; `open_tcp` and `open_tls` (xdpturn.client.streams) frame a byte stream and say
`reliable = True` (no retransmissions; ChannelData padded to 4 bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from xdpturn.proto import stun
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.channel_data import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    ChannelDataError,
    decode_channel_data,
    encode_channel_data,
    is_channel_data,
)
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method, StunDecodeError

log = logging.getLogger(__name__)

UDP_PROTOCOL = 17  # IANA protocol number, for REQUESTED-TRANSPORT


class TurnClientError(Exception):
    """A request failed: `code` is the server's STUN error code, or None when no usable answer
    came (timeout, closed transport, malformed response)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code} {self.reason}" if self.code is not None else self.reason


# Transport interface

Receiver = Callable[[bytes], None]
LostHandler = Callable[[Exception | None], None]


class MessageTransport(Protocol):
    """Carries whole STUN and ChannelData messages to the server; framing is its business."""

    @property
    def reliable(self) -> bool:
        """True for stream transports: no retransmissions, ChannelData padded to 4 bytes."""
        ...

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


TransportOpener = Callable[[TransportAddr, Receiver, LostHandler], Awaitable[MessageTransport]]
# A request's attributes for a given transaction id: XOR addresses depend on it, and every
# attempt after a 401 or 438 is a new transaction.
AttrsFor = Callable[[bytes], list[tuple[int, bytes]]]


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, receiver: Receiver, lost: LostHandler) -> None:
        self._receiver = receiver
        self._lost = lost

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._receiver(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) on a connected socket: the retransmission timer copes.
        log.debug("udp error from server", extra={"error": str(exc)})

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)


class UdpTransport:
    """A connected UDP socket: only the server's datagrams reach us."""

    reliable = False

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self._transport = transport

    @property
    def local(self) -> TransportAddr:
        host, port = self._transport.get_extra_info("sockname")[:2]
        return TransportAddr(ipaddress.ip_address(host), port)

    def send(self, data: bytes) -> None:
        self._transport.sendto(data)

    def close(self) -> None:
        self._transport.close()


async def open_udp(server: TransportAddr, receiver: Receiver, lost: LostHandler) -> UdpTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpProtocol(receiver, lost), remote_addr=(str(server.ip), server.port)
    )
    return UdpTransport(transport)


# Client


@dataclass(frozen=True)
class ClientOptions:
    """Retransmission per RFC 8489 section 6.2.1: send at 0, RTO, 3 RTO, ... (`max_transmissions`
    sends), then give up `final_wait_factor` * RTO after the last; over reliable transports, one
    send and `reliable_timeout` seconds."""

    rto: float = 0.5
    max_transmissions: int = 7
    final_wait_factor: int = 16
    reliable_timeout: float = 39.5
    recv_queue_size: int = 4096  # datagrams for recv(); newer ones are dropped when full
    software: str | None = "xdpturn-client"
    close_timeout: float = 2.0  # seconds close() waits for the deallocating Refresh


@dataclass
class _Auth:
    realm: str
    nonce: str
    key: bytes


class TurnClient:
    """One allocation on one TURN server. Create with `await TurnClient.connect(...)`."""

    def __init__(
        self,
        server: TransportAddr,
        username: str,
        password: str,
        options: ClientOptions | None = None,
    ) -> None:
        self.server = server
        self.options = options or ClientOptions()
        self._username = username
        self._password = password
        self._transport: MessageTransport | None = None
        self._auth: _Auth | None = None
        self._pending: dict[bytes, asyncio.Future[tuple[Message, bytes]]] = {}
        self._inbox: deque[tuple[TransportAddr, bytes]] = deque()
        self._inbox_ready = asyncio.Event()
        self._closed = False
        # Channel bindings: confirmed ones are used to send; every requested one is accepted
        # on receive, since the server may relay before its ChannelBind success reaches us.
        self._peer_channels: dict[TransportAddr, int] = {}
        self._channel_peers: dict[int, TransportAddr] = {}
        self._next_channel = CHANNEL_MIN
        self.relayed: list[TransportAddr] = []
        self.mapped: TransportAddr | None = None
        self.lifetime: int | None = None
        # The RESERVATION-TOKEN of the next port, after allocate(reserve_next=True).
        self.reservation_token: bytes | None = None
        self.last_error: TurnClientError | None = None
        self.dropped = 0  # datagrams dropped: malformed, unknown channel, or inbox full

    @classmethod
    async def connect(
        cls,
        server: TransportAddr,
        username: str,
        password: str,
        *,
        options: ClientOptions | None = None,
        opener: TransportOpener = open_udp,
    ) -> TurnClient:
        client = cls(server, username, password, options)
        client._transport = await opener(server, client._on_message, client._on_lost)
        return client

    async def __aenter__(self) -> TurnClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def channels(self) -> Mapping[TransportAddr, int]:
        """Confirmed channel bindings, by peer."""
        return dict(self._peer_channels)

    # Requests

    async def allocate(
        self,
        family: Family = Family.IPV4,
        additional_family: Family | None = None,
        lifetime: int | None = None,
        *,
        even_port: bool = False,
        reserve_next: bool = False,
        reservation_token: bytes | None = None,
    ) -> list[TransportAddr]:
        """Allocate relayed addresses: one in `family`, plus one in `additional_family` for a
        dual-stack allocation (RFC 8656 section 7.1 allows only IPv4 + additional IPv6).
        `even_port`: on an even port (EVEN-PORT); `reserve_next`: and the next port held for
        another allocation, whose token is then `reservation_token` (the R bit);
        `reservation_token`: on the port a token holds, in its family (RFC 8656 section 7.2)."""
        attrs: list[tuple[int, bytes]] = [
            (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(UDP_PROTOCOL))
        ]
        if reservation_token is not None:
            if even_port or reserve_next or family != Family.IPV4 or additional_family is not None:
                raise ValueError("a RESERVATION-TOKEN allocation names no port or family")
            attrs.append((AttrType.RESERVATION_TOKEN, reservation_token))
        elif even_port or reserve_next:
            attrs.append((AttrType.EVEN_PORT, stun.encode_even_port(reserve_next)))
        if additional_family is not None:
            if family != Family.IPV4 or additional_family != Family.IPV6:
                raise ValueError("a dual-stack allocation is IPv4 plus additional IPv6")
            attrs.append(
                (AttrType.ADDITIONAL_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV6))
            )
        elif family != Family.IPV4:
            # IPv4 is the default; leaving it out keeps RFC 5766 servers (no such attribute) happy.
            attrs.append((AttrType.REQUESTED_ADDRESS_FAMILY, stun.encode_address_family(family)))
        if lifetime is not None:
            attrs.append((AttrType.LIFETIME, stun.encode_u32(lifetime)))
        answer = await self._request(Method.ALLOCATE, lambda _: attrs)
        relayed: list[TransportAddr] = []
        try:
            for kind, value in answer.attributes:
                if kind == AttrType.XOR_RELAYED_ADDRESS:
                    relayed.append(stun.decode_xor_address(value, answer.transaction_id))
                elif kind == AttrType.XOR_MAPPED_ADDRESS and self.mapped is None:
                    self.mapped = stun.decode_xor_address(value, answer.transaction_id)
                elif kind == AttrType.LIFETIME:
                    self.lifetime = stun.decode_u32(value)
                elif kind == AttrType.RESERVATION_TOKEN:
                    self.reservation_token = stun.decode_reservation_token(value)
        except StunDecodeError as exc:
            raise self._fail(None, f"malformed Allocate response: {exc}") from None
        if not relayed:
            raise self._fail(None, "Allocate response without XOR-RELAYED-ADDRESS")
        self.relayed = relayed
        return list(relayed)

    async def refresh(self, lifetime: int | None = None) -> int:
        """Refresh the allocation; returns the lifetime granted (0 deletes the allocation)."""
        attrs: list[tuple[int, bytes]] = []
        if lifetime is not None:
            attrs.append((AttrType.LIFETIME, stun.encode_u32(lifetime)))
        answer = await self._request(Method.REFRESH, lambda _: attrs)
        value = answer.get(AttrType.LIFETIME)
        granted = lifetime or 0
        if value is not None:
            try:
                granted = stun.decode_u32(value)
            except StunDecodeError as exc:
                raise self._fail(None, f"malformed LIFETIME: {exc}") from None
        self.lifetime = granted
        if granted == 0:
            self.relayed = []
        return granted

    async def create_permission(self, *peers: TransportAddr) -> None:
        """Install (or refresh) permissions for the peers' IP addresses, in one request."""
        if not peers:
            raise ValueError("create_permission needs at least one peer")
        await self._request(
            Method.CREATE_PERMISSION,
            lambda tid: [
                (AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, tid)) for peer in peers
            ],
        )

    async def bind_channel(self, peer: TransportAddr) -> int:
        """Bind a channel to `peer` (or refresh its binding); returns the channel number."""
        channel = self._peer_channels.get(peer)
        if channel is None:
            channel = self._free_channel()
        self._channel_peers[channel] = peer
        try:
            await self._request(
                Method.CHANNEL_BIND,
                lambda tid: [
                    (AttrType.CHANNEL_NUMBER, stun.encode_channel_number(channel)),
                    (AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, tid)),
                ],
            )
        except TurnClientError:
            if peer not in self._peer_channels:
                del self._channel_peers[channel]
            raise
        self._peer_channels[peer] = channel
        return channel

    async def close(self) -> None:
        """Delete the allocation (Refresh with LIFETIME 0, best effort), then the transport."""
        if self._closed:
            return
        if self.relayed and self._transport is not None:
            # Bounded: a dead server must not hold close() for the whole retransmission schedule.
            with contextlib.suppress(TurnClientError, TimeoutError):
                await asyncio.wait_for(self.refresh(0), self.options.close_timeout)
        self._shut(None)

    # Data

    def send(self, peer: TransportAddr, data: bytes) -> None:
        """Relay `data` to `peer`: ChannelData when a channel is bound to it, else a Send
        indication. Fire and forget, like the UDP datagram it becomes."""
        transport = self._open_transport()
        channel = self._peer_channels.get(peer)
        if channel is not None:
            transport.send(encode_channel_data(channel, data, pad=transport.reliable))
            return
        tid = secrets.token_bytes(12)
        msg = Message(Method.SEND, MessageClass.INDICATION, tid)
        msg.add(AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, tid))
        msg.add(AttrType.DATA, data)
        transport.send(stun.encode(msg))

    async def recv(self) -> tuple[TransportAddr, bytes]:
        """The next datagram from a peer, from a Data indication or ChannelData."""
        while not self._inbox:
            if self._closed:
                raise TurnClientError(None, "client closed")
            self._inbox_ready.clear()
            await self._inbox_ready.wait()
        return self._inbox.popleft()

    # Internals

    def _open_transport(self) -> MessageTransport:
        if self._transport is None or self._closed:
            raise TurnClientError(None, "client closed")
        return self._transport

    def _free_channel(self) -> int:
        for _ in range(CHANNEL_MAX - CHANNEL_MIN + 1):
            channel = self._next_channel
            self._next_channel = CHANNEL_MIN if channel == CHANNEL_MAX else channel + 1
            if channel not in self._channel_peers:
                return channel
        raise TurnClientError(None, "no free channel number")

    def _fail(self, code: int | None, reason: str) -> TurnClientError:
        self.last_error = TurnClientError(code, reason)
        return self.last_error

    def _build(self, method: int, attrs: AttrsFor) -> tuple[bytes, bytes]:
        tid = secrets.token_bytes(12)
        msg = Message(method, MessageClass.REQUEST, tid, list(attrs(tid)))  # ours to append to
        if self.options.software:
            msg.add(AttrType.SOFTWARE, stun.encode_text(self.options.software))
        if self._auth is None:
            return tid, stun.encode(msg)
        msg.add(AttrType.USERNAME, stun.encode_text(self._username))
        msg.add(AttrType.REALM, stun.encode_text(self._auth.realm))
        msg.add(AttrType.NONCE, stun.encode_text(self._auth.nonce))
        return tid, stun.encode(msg, integrity_key=self._auth.key)

    async def _request(self, method: int, attrs: AttrsFor) -> Message:
        """One request to success, through at most one 401 challenge and one 438 retry."""
        challenged = stale = False
        while True:
            sent_with_auth = self._auth is not None
            answer = await self._transaction(*self._build(method, attrs))
            if answer.cls == MessageClass.SUCCESS:
                return answer
            code, reason = self._error_of(answer)
            if code == 401 and not sent_with_auth and not challenged:
                challenged = True
                self._take_challenge(answer, code, reason)
                continue
            if code == 438 and sent_with_auth and not stale:
                stale = True
                self._take_challenge(answer, code, reason)
                continue
            raise self._fail(code, reason)

    def _error_of(self, answer: Message) -> tuple[int, str]:
        value = answer.get(AttrType.ERROR_CODE)
        if value is None:
            raise self._fail(None, "error response without ERROR-CODE")
        try:
            code, reason = stun.decode_error_code(value)
        except StunDecodeError as exc:
            raise self._fail(None, f"malformed ERROR-CODE: {exc}") from None
        return code, reason.strip()  # some servers pad the phrase with spaces

    def _take_challenge(self, answer: Message, code: int, reason: str) -> None:
        nonce, realm = answer.get(AttrType.NONCE), answer.get(AttrType.REALM)
        if nonce is None or (realm is None and self._auth is None):
            raise self._fail(code, reason)
        try:
            realm_text = stun.decode_text(realm) if realm is not None else None
            nonce_text = stun.decode_text(nonce)
        except StunDecodeError:
            raise self._fail(code, reason) from None
        if realm_text is None:
            assert self._auth is not None  # checked above
            realm_text = self._auth.realm
        key = stun.long_term_key(self._username, realm_text, self._password)
        self._auth = _Auth(realm_text, nonce_text, key)

    async def _transaction(self, tid: bytes, data: bytes) -> Message:
        transport = self._open_transport()
        future: asyncio.Future[tuple[Message, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[tid] = future
        opts = self.options
        if transport.reliable:
            waits = [opts.reliable_timeout]
        else:
            waits = [opts.rto * 2**i for i in range(opts.max_transmissions - 1)]
            waits.append(opts.rto * opts.final_wait_factor)
        try:
            for wait in waits:
                transport.send(data)
                try:
                    message, _ = await asyncio.wait_for(asyncio.shield(future), wait)
                    return message
                except TimeoutError:
                    continue
            raise self._fail(None, f"no response after {len(waits)} transmissions")
        finally:
            self._pending.pop(tid, None)
            future.cancel()

    def _on_message(self, data: bytes) -> None:
        if is_channel_data(data):
            self._on_channel_data(data)
            return
        try:
            msg = stun.decode(data)
        except StunDecodeError as exc:
            self._drop("malformed STUN", exc)
            return
        if msg.cls == MessageClass.INDICATION:
            self._on_indication(msg)
            return
        if msg.cls == MessageClass.REQUEST:
            self._drop("request from server", None)
            return
        future = self._pending.get(msg.transaction_id)
        if future is None or future.done():
            return  # a retransmission's second answer, or a transaction we gave up on
        if not self._authentic(msg, data):
            self._drop("response failed MESSAGE-INTEGRITY", None)
            return
        future.set_result((msg, data))

    def _authentic(self, msg: Message, data: bytes) -> bool:
        """RFC 8489 section 9.2.5: once we send credentials, responses must be signed with our
        key. Challenges (401, 438) and errors the server cannot sign may come unsigned."""
        if self._auth is None:
            return True
        if stun.integrity_algorithm(msg) is not None:
            return stun.verify_integrity(data, self._auth.key)
        return msg.cls == MessageClass.ERROR

    def _on_indication(self, msg: Message) -> None:
        if msg.method != Method.DATA:
            self._drop("unexpected indication", None)
            return
        peer_value, payload = msg.get(AttrType.XOR_PEER_ADDRESS), msg.get(AttrType.DATA)
        if peer_value is None or payload is None:
            self._drop("Data indication without XOR-PEER-ADDRESS or DATA", None)
            return
        try:
            peer = stun.decode_xor_address(peer_value, msg.transaction_id)
        except StunDecodeError as exc:
            self._drop("bad XOR-PEER-ADDRESS", exc)
            return
        self._deliver(peer, payload)

    def _on_channel_data(self, data: bytes) -> None:
        try:
            channel, payload = decode_channel_data(data)
        except ChannelDataError as exc:
            self._drop("malformed ChannelData", exc)
            return
        peer = self._channel_peers.get(channel)
        if peer is None:
            self._drop("ChannelData on an unbound channel", None)
            return
        self._deliver(peer, payload)

    def _deliver(self, peer: TransportAddr, payload: bytes) -> None:
        if len(self._inbox) >= self.options.recv_queue_size:
            self._drop("receive queue full", None)
            return
        self._inbox.append((peer, payload))
        self._inbox_ready.set()

    def _drop(self, why: str, exc: Exception | None) -> None:
        self.dropped += 1
        log.debug("dropped from server", extra={"trigger": why, "error": str(exc or "")})

    def _on_lost(self, exc: Exception | None) -> None:
        self._shut(exc)

    def _shut(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        reason = f"transport closed: {exc}" if exc else "client closed"
        for future in self._pending.values():
            if not future.done():
                future.set_exception(TurnClientError(None, reason))
        self._inbox_ready.set()
        if self._transport is not None:
            self._transport.close()
