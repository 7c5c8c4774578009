"""A scripted client-server pair for the sans-IO TURN core: clients speak STUN through the
core, time advances by hand and timers fire as a runtime would fire them."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

from xdpturn.proto import stun
from xdpturn.proto.addr import ClientAddr, ClientFlow, Family, PeerAddr, Transport, TransportAddr
from xdpturn.proto.auth import Authenticator
from xdpturn.proto.commands import (
    ChannelRoute,
    CloseRelayPort,
    Command,
    InstallChannel,
    OpenRelayPort,
    PortResult,
    RemoveChannel,
    SendToClient,
)
from xdpturn.proto.server import ServerConfig, TurnServer
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method

PUBLIC_V4 = ipaddress.IPv4Address("203.0.113.1")
PUBLIC_V6 = ipaddress.IPv6Address("2001:db8::1")
REALM = "example.org"
SECRET = "s3cret"
T0 = 1_700_000_000.0


def addr(text: str) -> TransportAddr:
    return TransportAddr.parse(text)


def flow_of(text: str, transport: Transport = Transport.UDP) -> ClientFlow:
    return ClientFlow(ClientAddr(addr(text)), 0, transport)


PEER = PeerAddr(addr("198.51.100.7:4000"))
PEER_V6 = PeerAddr(addr("[2001:db8:2::7]:4000"))


class FakePorts:
    """The core's port chooser and the runtime's sockets, faked: ports are handed out in order
    from a small range, released ones last; `open` are the ports the core has opened
    (OpenRelayPort) and not closed yet, which tests check. `refused` ports are ones the runtime
    cannot open (another program holds them); once `exhausted`, the runtime can open none (out
    of file descriptors)."""

    def __init__(self, low: int = 50000, high: int = 50999) -> None:
        self.free = list(range(low, high + 1))
        self.open: dict[int, frozenset[Family]] = {}
        self.dont_fragment: set[int] = set()  # open ports whose sockets send with DF
        self.refused: set[int] = set()
        self.exhausted = False
        self.attempts = 0  # OpenRelayPort commands answered

    def acquire(
        self, families: frozenset[Family], *, even: bool = False, pair: bool = False
    ) -> int | None:
        for port in self.free:
            if (even or pair) and port % 2:
                continue
            if pair and port + 1 not in self.free:
                continue
            for taken in (port, port + 1) if pair else (port,):
                self.free.remove(taken)
            return port
        return None

    def release(self, port: int) -> None:
        assert port not in self.free, f"port {port} released twice"
        self.free.append(port)

    def opened(self, command: OpenRelayPort) -> PortResult:
        assert command.relay_port not in self.free, "opened a port the chooser did not hand out"
        assert command.relay_port not in self.open, "opened twice"
        self.attempts += 1
        if self.exhausted:
            return PortResult.EXHAUSTED
        if command.relay_port in self.refused:
            return PortResult.TAKEN
        self.open[command.relay_port] = command.families
        if command.dont_fragment:
            self.dont_fragment.add(command.relay_port)
        return PortResult.OPENED

    def closed(self, command: CloseRelayPort) -> None:
        del self.open[command.relay_port]
        self.dont_fragment.discard(command.relay_port)

    def claim(self, port: int, families: frozenset[Family]) -> bool:
        if port not in self.free:
            return False
        self.free.remove(port)
        return True


@dataclass
class Client:
    """One client of the server under test, speaking STUN through the sans-IO core."""

    harness: Harness
    flow: ClientFlow
    username: str
    password: str
    nonce: bytes = b""
    sha256: bool = False
    relay_port: int = 0

    @property
    def key(self) -> bytes:
        return stun.long_term_key(self.username, REALM, self.password)

    def message(self, method: Method, *attrs: tuple[int, bytes]) -> Message:
        msg = Message(method, MessageClass.REQUEST, self.harness.rng.randbytes(12))
        for attr, value in attrs:
            msg.add(attr, value)
        return msg

    def request(self, method: Method, *attrs: tuple[int, bytes]) -> Message:
        """An authenticated request, doing the 401 dance for the nonce once."""
        if not self.nonce:
            challenge = self.harness.exchange(self.flow, self.message(method, *attrs))
            assert challenge.cls == MessageClass.ERROR
            nonce = challenge.get(AttrType.NONCE)
            assert nonce is not None
            self.nonce = nonce
        return self.send(self.message(method, *attrs))

    def send(self, msg: Message, *, renew_nonce: bool = True) -> Message:
        """Sign and send; on 438 take the fresh nonce and try once more, as clients do.
        Integrity of authenticated responses is checked with the client's key."""
        unsigned = list(msg.attributes)
        response = self.harness.exchange(self.flow, self.signed(msg), key=self.key)
        if renew_nonce and response.cls == MessageClass.ERROR and error_code(response) == 438:
            nonce = response.get(AttrType.NONCE)
            assert nonce is not None
            self.nonce = nonce
            retry = Message(msg.method, msg.cls, self.harness.rng.randbytes(12), unsigned)
            return self.send(retry, renew_nonce=False)
        return response

    def signed(self, msg: Message, *, fingerprint: bool = True) -> bytes:
        msg.add(AttrType.USERNAME, self.username.encode())
        msg.add(AttrType.REALM, REALM.encode())
        msg.add(AttrType.NONCE, self.nonce)
        return stun.encode(msg, integrity_key=self.key, sha256=self.sha256, fingerprint=fingerprint)

    def allocate(self, *attrs: tuple[int, bytes]) -> Message:
        response = self.request(
            Method.ALLOCATE,
            (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17)),
            *attrs,
        )
        relayed = response.get(AttrType.XOR_RELAYED_ADDRESS)
        if relayed is not None:
            self.relay_port = stun.decode_xor_address(relayed, response.transaction_id).port
        return response

    def permit(self, *peers: TransportAddr) -> Message:
        txid = self.harness.rng.randbytes(12)
        msg = Message(Method.CREATE_PERMISSION, MessageClass.REQUEST, txid)
        for peer in peers:
            msg.add(AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, txid))
        return self.send(msg)

    def bind(self, channel: int, peer: TransportAddr) -> Message:
        txid = self.harness.rng.randbytes(12)
        msg = Message(Method.CHANNEL_BIND, MessageClass.REQUEST, txid)
        msg.add(AttrType.CHANNEL_NUMBER, stun.encode_channel_number(channel))
        msg.add(AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, txid))
        return self.send(msg)

    def refresh(self, lifetime: int | None = None) -> Message:
        attrs = [] if lifetime is None else [(AttrType.LIFETIME, stun.encode_u32(lifetime))]
        return self.request(Method.REFRESH, *attrs)

    def send_indication(self, peer: TransportAddr, data: bytes) -> None:
        txid = self.harness.rng.randbytes(12)
        msg = Message(Method.SEND, MessageClass.INDICATION, txid)
        msg.add(AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, txid))
        msg.add(AttrType.DATA, data)
        self.harness.server.handle_client_datagram(stun.encode(msg), self.flow, self.harness.now)

    @property
    def relayed_v4(self) -> PeerAddr:
        return PeerAddr(TransportAddr(PUBLIC_V4, self.relay_port))

    @property
    def relayed_v6(self) -> PeerAddr:
        return PeerAddr(TransportAddr(PUBLIC_V6, self.relay_port))


@dataclass
class Harness:
    config: ServerConfig = field(
        default_factory=lambda: ServerConfig(
            realm=REALM,
            public_ipv4=PUBLIC_V4,
            public_ipv6=PUBLIC_V6,
            auth=Authenticator(secrets=[SECRET], users={"alice": "wonderland"}),
        )
    )
    now: float = T0
    ports: FakePorts = field(default_factory=FakePorts)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    server: TurnServer = field(init=False)

    def __post_init__(self) -> None:
        # The test clock starts at unix time T0, so it serves as the wall clock too.
        self.server = TurnServer(
            self.config, self.ports, random.Random(1), wall_clock=lambda: self.now
        )

    def client(self, where: str = "192.0.2.10:5000", user: str = "alice", **kw: object) -> Client:
        password = {"alice": "wonderland"}.get(user, "")
        if ":" in user:  # a REST username: the password is the HMAC
            password = Authenticator(secrets=[SECRET]).passwords(user, self.now)[0]
        transport = kw.get("transport", Transport.UDP)
        assert isinstance(transport, Transport)
        return Client(self, flow_of(where, transport), user, password)

    def commands(self) -> list[Command]:
        """Drain the core's commands; relay ports are opened and closed here, as a runtime
        would (and answered at once), so tests see the rest."""
        out: list[Command] = []
        while (command := self.server.next_command()) is not None:
            if isinstance(command, OpenRelayPort):
                result = self.ports.opened(command)
                self.server.handle_relay_port(command.relay_port, result, self.now)
            elif isinstance(command, CloseRelayPort):
                self.ports.closed(command)
            else:
                out.append(command)
        return out

    def exchange(self, flow: ClientFlow, msg: Message | bytes, key: bytes | None = None) -> Message:
        data = msg if isinstance(msg, bytes) else stun.encode(msg)
        self.server.handle_client_datagram(data, flow, self.now)
        replies = [c for c in self.commands_kept() if isinstance(c, SendToClient)]
        assert len(replies) == 1, replies
        response = stun.decode(replies[0].data)
        if key is not None and response.get(AttrType.MESSAGE_INTEGRITY) is not None:
            assert stun.verify_integrity(replies[0].data, key)
        return response

    kept: list[Command] = field(default_factory=list)

    def commands_kept(self) -> list[Command]:
        """Drain commands, keeping the non-send ones for assertions via `take`."""
        fresh = self.commands()
        self.kept.extend(c for c in fresh if not isinstance(c, SendToClient))
        return fresh

    def take(self) -> list[Command]:
        out = self.kept + self.commands()
        self.kept = []
        return out

    def advance(self, seconds: float) -> list[Command]:
        """Step the clock, firing timers as a runtime would."""
        target = self.now + seconds
        while (deadline := self.server.get_timer()) is not None and deadline <= target:
            self.now = max(self.now, deadline)
            self.server.handle_timer(self.now)
        self.now = target
        return self.take()


def error_code(response: Message) -> int:
    assert response.cls == MessageClass.ERROR, response
    value = response.get(AttrType.ERROR_CODE)
    assert value is not None
    return stun.decode_error_code(value)[0]


def routes(
    commands: list[Command], kind: type[InstallChannel] | type[RemoveChannel]
) -> set[ChannelRoute]:
    return {c.route for c in commands if isinstance(c, kind)}
