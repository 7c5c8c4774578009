"""What must hold whatever bytes arrive: shared by the atheris harnesses (fuzz_codec.py,
fuzz_server.py) and the hypothesis tests.

The server harness reads its input as a script of steps, each `[op][length:2][payload]`:
- op % 8 in 0-2: `payload` from client `op // 8 % len(CLIENTS)` (a datagram, or stream bytes
  for a TCP client), unauthenticated;
- 3: `payload` decoded as a STUN message, then signed with that client's valid credentials
  (USERNAME, REALM, NONCE, MESSAGE-INTEGRITY) before it is sent, so requests with arbitrary
  attributes reach the authenticated paths;
- 4: a datagram from peer `PEERS[client index]` to relay port `RELAY_PORT_LOW + payload[0]`;
- 5: the clock moves `payload[0]` seconds (0-255) and timers fire;
- 6-7: as 0.
Invariants: nothing raises; nothing is ever answered to a client that never signed a request
except an unsigned STUN answer no larger than MAX_UNAUTHENTICATED_ANSWER; no allocation,
channel route or relayed datagram for such a client; every relayed datagram and channel route
goes to a peer the policy allows (or to one of the relay's own allocations).
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import struct

from xdpturn.proto import stun
from xdpturn.proto.addr import (
    ClientAddr,
    ClientFlow,
    Family,
    IPAddress,
    PeerAddr,
    Transport,
    TransportAddr,
)
from xdpturn.proto.auth import Authenticator
from xdpturn.proto.commands import (
    AddPermission,
    AllocationClosed,
    AllocationOpened,
    CloseRelayPort,
    Command,
    InstallChannel,
    OpenRelayPort,
    PortResult,
    RemoveChannel,
    RemovePermission,
    SendToClient,
    SendToPeer,
)
from xdpturn.proto.framing import FramingError, StreamDecoder
from xdpturn.proto.policy import PeerPolicy
from xdpturn.proto.server import ServerConfig, TurnServer
from xdpturn.proto.stun import AttrType, Message, MessageClass, StunDecodeError


class Violation(AssertionError):
    """An invariant does not hold."""


# The codec


def exercise_codec(data: bytes) -> None:
    """Everything a receiver might do with untrusted bytes; only StunDecodeError may escape."""
    stun.is_stun(data)
    stun.verify_integrity(data, b"key")
    try:
        msg = stun.decode(data)
    except StunDecodeError:
        return
    stun.integrity_algorithm(msg)
    stun.unknown_required_attributes(msg)
    decoders = [
        lambda v: stun.decode_xor_address(v, msg.transaction_id),
        stun.decode_address,
        stun.decode_error_code,
        stun.decode_address_error_code,
        stun.decode_u32,
        stun.decode_channel_number,
        stun.decode_requested_transport,
        stun.decode_address_family,
        stun.decode_unknown_attributes,
        stun.decode_even_port,
        stun.decode_reservation_token,
        stun.decode_icmp,
        stun.decode_text,
    ]
    for _, value in msg.attributes:
        for decoder in decoders:
            with contextlib.suppress(StunDecodeError):
                decoder(value)


# The server

REALM = "fuzz.example"
USER, PASSWORD = "fuzzer", "correct horse"
PUBLIC_V4 = ipaddress.IPv4Address("203.0.113.1")
PUBLIC_V6 = ipaddress.IPv6Address("2001:db8::1")
T0 = 1_700_000_000.0
RELAY_PORT_LOW = 50000


def _flow(text: str, transport: Transport = Transport.UDP) -> ClientFlow:
    return ClientFlow(ClientAddr(TransportAddr.parse(text)), 0, transport)


CLIENTS = (
    _flow("192.0.2.10:5000"),
    _flow("192.0.2.10:5001"),  # same IP, another port
    _flow("[2001:db8::10]:5000"),
    _flow("192.0.2.11:6000", Transport.TCP),
)
PEERS = (
    PeerAddr(TransportAddr.parse("198.51.100.7:4000")),
    PeerAddr(TransportAddr.parse("127.0.0.1:4000")),
    PeerAddr(TransportAddr.parse("[2001:db8:2::7]:4000")),
    PeerAddr(TransportAddr.parse("[::ffff:169.254.169.254]:80")),
)


def max_unauthenticated_answer(realm: str) -> int:
    """The largest answer to an unauthenticated request: a 401 or 438 (ERROR-CODE with its
    reason, REALM, a 33-byte NONCE, FINGERPRINT), a 400 (reason cut to 100 bytes), a 420 (at
    most stun.MAX_UNKNOWN_LISTED types) or a Binding response (XOR-MAPPED-ADDRESS,
    FINGERPRINT). About 200 bytes with a short realm."""
    return 20 + (4 + 4 + 100) + (4 + 4 * ((len(realm.encode()) + 3) // 4)) + (4 + 36) + 8


MAX_UNAUTHENTICATED_ANSWER = max_unauthenticated_answer(REALM)


class _Ports:
    """The core's port chooser (`free`, even ports and pairs) and what the runtime has open
    (`open`, kept by `ServerUnderFuzz.commands` from OpenRelayPort/CloseRelayPort)."""

    def __init__(self) -> None:
        self.free = list(range(RELAY_PORT_LOW, RELAY_PORT_LOW + 16))
        self.handed_out: set[int] = set()
        self.reserved: set[int] = set()  # the N + 1 of pairs (EVEN-PORT with the R bit)
        self.open: set[int] = set()

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
                self.handed_out.add(taken)
            if pair:
                self.reserved.add(port + 1)
            return port
        return None

    def release(self, port: int) -> None:
        self.handed_out.remove(port)
        self.reserved.discard(port)
        self.free.append(port)

    def claim(self, port: int, families: frozenset[Family]) -> bool:
        return False  # the fuzzer never restores a saved state


class ServerUnderFuzz:
    """A TurnServer fed one script (see the module docstring), checking every command."""

    def __init__(self) -> None:
        config = ServerConfig(
            realm=REALM,
            public_ipv4=PUBLIC_V4,
            public_ipv6=PUBLIC_V6,
            auth=Authenticator(users={USER: PASSWORD}),
        )
        self.ports = _Ports()
        # The script's clock starts at unix time T0, so it serves as the wall clock too.
        self.server = TurnServer(config, self.ports, random.Random(0), wall_clock=lambda: self.now)
        self.policy = PeerPolicy(own=[PUBLIC_V4, PUBLIC_V6])
        self.now = T0
        self.key = stun.long_term_key(USER, REALM, PASSWORD)
        self.nonces: dict[ClientFlow, bytes] = {}
        self.signed: set[ClientFlow] = set()  # clients that sent a validly signed request
        self.streams = {f: StreamDecoder() for f in CLIENTS if f.transport is not Transport.UDP}
        # Permissions announced to the runtime (the kernel's view), by allocation port.
        self.permitted: set[tuple[int, IPAddress]] = set()

    def run(self, script: bytes) -> None:
        at = 0
        while at + 3 <= len(script):
            op = script[at]
            length = int.from_bytes(script[at + 1 : at + 3], "big") % 2048
            payload = script[at + 3 : at + 3 + length]
            at += 3 + length
            self.step(op, payload)

    def step(self, op: int, payload: bytes) -> None:
        kind, client = op % 8, CLIENTS[op // 8 % len(CLIENTS)]
        if kind == 3:
            self.signed_request(client, payload)
        elif kind == 4:
            port = RELAY_PORT_LOW + (payload[0] if payload else 0)
            peer = PEERS[op // 8 % len(PEERS)]
            self.server.handle_peer_datagram(payload[1:], port, peer, self.now)
            self.check(self.commands(), client=None)
        elif kind == 5:
            self.now += payload[0] if payload else 1
            self.server.handle_timer(self.now)
            self.check(self.commands(), client=None)
        else:
            self.from_client(client, payload)

    def from_client(self, flow: ClientFlow, data: bytes) -> None:
        decoder = self.streams.get(flow)
        if decoder is None:
            frames = [data]
        else:
            try:
                frames = decoder.feed(data)
            except FramingError:
                self.streams[flow] = StreamDecoder()  # the runtime closes the connection
                self.server.handle_flow_closed(flow, self.now)
                self.check(self.commands(), client=None)
                return
        for frame in frames:
            self.server.handle_client_datagram(frame, flow, self.now)
            self.check(self.commands(), client=flow)

    def signed_request(self, flow: ClientFlow, payload: bytes) -> None:
        try:
            msg = stun.decode(payload)
        except StunDecodeError:
            return
        if msg.cls != MessageClass.REQUEST:
            return
        nonce = self.nonces.get(flow)
        if nonce is None:
            return  # the client has not been challenged yet
        attrs = [
            (kind, value)
            for kind, value in msg.attributes
            if kind
            not in (
                AttrType.MESSAGE_INTEGRITY,
                AttrType.MESSAGE_INTEGRITY_SHA256,
                AttrType.FINGERPRINT,
                AttrType.USERNAME,
                AttrType.REALM,
                AttrType.NONCE,
            )
        ]
        request = Message(msg.method, msg.cls, msg.transaction_id, attrs)
        request.add(AttrType.USERNAME, USER.encode())
        request.add(AttrType.REALM, REALM.encode())
        request.add(AttrType.NONCE, nonce)
        try:
            data = stun.encode(request, integrity_key=self.key)
        except ValueError:
            return  # too long once signed
        self.signed.add(flow)
        self.from_client(flow, data)

    def commands(self) -> list[Command]:
        """The core's commands; relay ports open at once, as the runtime's do."""
        out: list[Command] = []
        while (command := self.server.next_command()) is not None:
            out.append(command)
            if isinstance(command, OpenRelayPort):
                if command.relay_port in self.ports.open:
                    raise Violation(f"opening an open port: {command}")
                self.ports.open.add(command.relay_port)
                self.server.handle_relay_port(command.relay_port, PortResult.OPENED, self.now)
            elif isinstance(command, CloseRelayPort):
                if command.relay_port not in self.ports.open:
                    raise Violation(f"closing a port not open: {command}")
                self.ports.open.remove(command.relay_port)
        return out

    def check(self, commands: list[Command], client: ClientFlow | None) -> None:
        for command in commands:
            if isinstance(command, SendToClient):
                self.check_answer(command, client)
            elif isinstance(command, AllocationOpened):
                if command.flow not in self.signed:
                    raise Violation(f"allocation without credentials: {command}")
            elif isinstance(command, InstallChannel):
                route = command.route
                if not self.is_self(route.peer) and not self.policy.permits(route.peer.ip):
                    raise Violation(f"channel to a refused peer: {command}")
            elif isinstance(command, SendToPeer):
                if not self.policy.permits(command.peer.ip):
                    raise Violation(f"datagram to a refused peer: {command}")
                if command.relay_port not in self.ports.open:
                    raise Violation(f"datagram from no allocation: {command}")
            elif isinstance(command, OpenRelayPort):
                if command.relay_port not in self.ports.handed_out:
                    raise Violation(f"opening a port the chooser did not hand out: {command}")
            elif isinstance(command, AddPermission):
                key = (command.relay_port, command.peer)
                if command.relay_port not in self.ports.open or key in self.permitted:
                    raise Violation(f"permission for no allocation, or twice: {command}")
                own = command.peer in (PUBLIC_V4, PUBLIC_V6)
                if not own and not self.policy.permits(command.peer):
                    raise Violation(f"permission for a refused peer: {command}")
                self.permitted.add(key)
            elif isinstance(command, RemovePermission):
                key = (command.relay_port, command.peer)
                if key not in self.permitted:
                    raise Violation(f"withdrawn permission never announced: {command}")
                self.permitted.discard(key)
            elif isinstance(command, AllocationClosed):
                if any(port == command.relay_port for port, _ in self.permitted):
                    raise Violation(f"allocation closed with permissions announced: {command}")
            elif not isinstance(command, RemoveChannel | CloseRelayPort):
                raise Violation(f"unexpected command {command}")
        flows = {a.flow for a in self.server.allocations()}
        if not flows <= self.signed:
            raise Violation(f"allocations of clients that never signed: {flows - self.signed}")
        # Open ports: those handed out (every OpenRelayPort is answered at once here), each an
        # allocation's or held for a RESERVATION-TOKEN (which may since have become one's).
        allocated = {a.relay_port for a in self.server.allocations()}
        ports = self.ports
        if ports.open != ports.handed_out or not allocated <= ports.open:
            raise Violation("allocations and open relay ports disagree")
        if not ports.open - allocated <= ports.reserved:
            raise Violation(f"open ports of no allocation: {ports.open - allocated}")

    def check_answer(self, command: SendToClient, client: ClientFlow | None) -> None:
        flow = command.flow
        if flow in self.signed:
            return  # authenticated traffic: answers and relayed data of any size
        if flow != client:
            raise Violation(f"sent to a client that sent nothing: {command}")
        try:
            answer = stun.decode(command.data)
        except StunDecodeError as exc:
            raise Violation(f"non-STUN sent to an unauthenticated client: {command}") from exc
        if answer.cls not in (MessageClass.SUCCESS, MessageClass.ERROR):
            raise Violation(f"unauthenticated client got a {answer.cls}")
        if answer.get(AttrType.MESSAGE_INTEGRITY) is not None:
            raise Violation("signed answer to an unauthenticated client")
        if len(command.data) > MAX_UNAUTHENTICATED_ANSWER:
            raise Violation(f"{len(command.data)}-byte answer to an unauthenticated request")
        nonce = answer.get(AttrType.NONCE)
        if nonce is not None:
            self.nonces[flow] = nonce

    def is_self(self, peer: PeerAddr) -> bool:
        return peer.ip in (PUBLIC_V4, PUBLIC_V6)


def step(op: int, payload: bytes) -> bytes:
    """One step of a server script, for writing seeds and hypothesis strategies."""
    return struct.pack("!BH", op, len(payload)) + payload
