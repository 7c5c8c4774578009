"""Reservations (EVEN-PORT with the R bit, then RESERVATION-TOKEN) across the workers of one relay.

A client's two Allocates come from two 5-tuples, which the kernel may hand to two workers
(xdpturn.server.workers). The worker that made a token holds its reserved port's sockets; a
token names it (TurnServer puts the worker's index in the token's first two bytes). When an
Allocate presents a token its worker does not hold, the core asks for it (FetchReservation) and
the runtime sends the question over its channel to the supervisor; the supervisor passes it to
the worker holding the token, whose core gives the reservation up and whose runtime sends the
reservation and its port's sockets back (SCM_RIGHTS); the supervisor passes them to the worker
that asked, which takes the sockets as its own and answers the Allocate. The core bounds the
wait (FETCH_TIMEOUT).

One channel per worker: a SOCK_SEQPACKET socket pair, one JSON message per datagram, a
reservation's sockets attached to the message that carries it. Messages:

    worker -> supervisor   {"op": "fetch", "token": T}
    supervisor -> holder   {"op": "give_up", "token": T, "route": ROUTE}
    holder -> supervisor   {"op": "given", "token": T, "route": ROUTE, "reservation": R | null}
    supervisor -> asker    {"op": "fetched", "token": T, "from": HOLDER, "reservation": R | null}

T is hex, R is `handover.reservation_to_plain` (expires: seconds left), ROUTE the supervisor's
own bookkeeping, echoed: the worker that asked and the workers asked so far. The supervisor asks
the worker it handed the token to, if it did (it keeps that for the token's remaining life, so a
token taken over and then not used, say refused for a quota, is still found); else the worker
that made it, and if that one has not got it, each other worker in turn, since a restart deals
the saved reservations out round the workers anew (xdpturn.server.restart).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from xdpturn.proto.handover import (
    SavedReservation,
    StateError,
    reservation_from_plain,
    reservation_to_plain,
)

if TYPE_CHECKING:
    from xdpturn.server.relay import RelayServer

log = logging.getLogger("xdpturn.server")

MESSAGE_SIZE = 4096  # a message is a few hundred bytes
MAX_SOCKETS = 2  # a reservation's port has one socket per family
TOKEN_SIZE = 8
# Messages read per readiness callback before yielding to the loop.
BATCH = 16
# Sockets received are not inherited by programs this one runs, as none of its own are.
MSG_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(the supervisor's end, the worker's end) of one worker's reservation channel."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _token(message: dict[str, Any]) -> bytes:
    token = bytes.fromhex(str(message["token"]))
    if len(token) != TOKEN_SIZE:
        raise ValueError(f"a token of {len(token)} bytes")
    return token


def _send(sock: socket.socket, message: dict[str, Any], socks: Sequence[socket.socket]) -> bool:
    """One message with `socks` attached; False when it could not be sent (logged)."""
    data = json.dumps(message).encode()
    try:
        if socks:
            socket.send_fds(sock, [data], [s.fileno() for s in socks])
        else:
            sock.send(data)
    except OSError as e:
        log.warning("reservation message not sent", extra={"op": message["op"], "error": str(e)})
        return False
    return True


def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[socket.socket]] | None:
    """The next message and the sockets that came with it; None when there is none now.
    Raises EOFError when the other end has closed, ValueError for a malformed message (its
    sockets closed)."""
    try:
        data, fds, _, _ = socket.recv_fds(sock, MESSAGE_SIZE, MAX_SOCKETS + 1, MSG_CMSG_CLOEXEC)
    except (BlockingIOError, InterruptedError):
        return None
    socks = [socket.socket(fileno=fd) for fd in fds]
    if not data:
        for s in socks:
            s.close()
        raise EOFError
    try:
        message = json.loads(data)
        if not isinstance(message, dict) or len(socks) > MAX_SOCKETS:
            raise ValueError("not a reservation message")
    except ValueError:
        for s in socks:
            s.close()
        raise
    return message, socks


class ReservationChannel:
    """A worker's end of its channel: asks for the reservations other workers hold (the
    RelayServer's `ReservationExchange`) and gives up its own when asked."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._server: RelayServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, server: RelayServer) -> None:
        """Serve `server`'s reservations (from the running loop)."""
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def close(self) -> None:
        self._stop_reading()
        self._sock.close()

    def _stop_reading(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None

    def fetch(self, token: bytes) -> bool:
        return _send(self._sock, {"op": "fetch", "token": token.hex()}, [])

    def _on_readable(self) -> None:
        for _ in range(BATCH):
            try:
                received = _receive(self._sock)
            except (EOFError, OSError):
                # The supervisor is gone (the worker stops with it): nothing more to serve.
                self._stop_reading()
                return
            except ValueError as e:
                log.warning("malformed reservation message", extra={"error": str(e)})
                continue
            if received is None:
                return
            message, socks = received
            try:
                self._handle(message, socks)
            except (KeyError, TypeError, ValueError) as e:  # StateError too
                log.warning("malformed reservation message", extra={"error": str(e)})
                for s in socks:
                    s.close()

    def _handle(self, message: dict[str, Any], socks: list[socket.socket]) -> None:
        server = self._server
        assert server is not None
        op, token = message["op"], _token(message)
        if op == "give_up":
            for s in socks:  # none are expected with a question
                s.close()
            given = server.give_up_reservation(token)
            reply: dict[str, Any] = {"op": "given", "token": token.hex(), "route": message["route"]}
            reply["reservation"] = None if given is None else reservation_to_plain(given[0])
            mine = given[1] if given is not None else []
            try:
                _send(self._sock, reply, mine)  # if it fails, the reservation is lost: logged
            finally:
                for s in mine:
                    s.close()  # the copies here; the other worker has its own
        elif op == "fetched":
            plain = message["reservation"]
            handed: SavedReservation | None = None
            if plain is not None:
                try:
                    handed = reservation_from_plain(plain)
                except StateError as e:
                    log.warning("malformed reservation handed over", extra={"error": str(e)})
            if handed is None:
                for s in socks:
                    s.close()
                socks = []
            giver = message.get("from")
            server.reservation_fetched(
                token, handed, socks, giver if isinstance(giver, int) else None
            )
        else:
            raise ValueError(f"unknown op {op!r}")


class ReservationRouter:
    """The supervisor's ends of the workers' channels (in worker order): passes each question
    to the workers that may hold the token, one after the other, and the answer, sockets and
    all, to the worker that asked (see the module's description)."""

    def __init__(self, channels: Sequence[socket.socket]) -> None:
        self._channels = list(channels)
        self._moved: dict[bytes, tuple[int, float]] = {}  # token -> (worker, until: monotonic)
        self._reading: list[int] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for index, sock in enumerate(self._channels):
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._on_readable, index)
            self._reading.append(index)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for index in self._reading:
            loop.remove_reader(self._channels[index].fileno())
        self._reading.clear()
        for sock in self._channels:
            sock.close()

    def _candidates(self, token: bytes, now: float) -> list[int]:
        """The workers that may hold `token`, in the order to ask them."""
        moved = self._moved.get(token)
        if moved is not None and moved[1] > now:
            return [moved[0]]  # handed over here: gone if not there
        maker = int.from_bytes(token[:2], "big")
        return [maker, *(w for w in range(len(self._channels)) if w != maker)]

    def _ask(self, asker: int, token: bytes, tried: list[int], now: float) -> None:
        """Ask the next worker that may hold `token` to give it up for `asker`; when none is
        left, tell `asker` that no worker has it."""
        for worker in self._candidates(token, now):
            if worker == asker or worker in tried:
                continue
            tried = [*tried, worker]
            question = {"op": "give_up", "token": token.hex(), "route": [asker, tried]}
            if self._to(worker, question, []):
                return
        self._to(asker, {"op": "fetched", "token": token.hex(), "reservation": None}, [])

    def _on_readable(self, index: int) -> None:
        sock = self._channels[index]
        for _ in range(BATCH):
            try:
                received = _receive(sock)
            except (EOFError, OSError):  # the worker has exited
                asyncio.get_running_loop().remove_reader(sock.fileno())
                self._reading.remove(index)
                return
            except ValueError as e:
                log.warning(
                    "malformed reservation message", extra={"worker": index, "error": str(e)}
                )
                continue
            if received is None:
                return
            message, socks = received
            try:
                self._route(index, message, socks)
            except (KeyError, TypeError, ValueError) as e:
                log.warning(
                    "malformed reservation message", extra={"worker": index, "error": str(e)}
                )
            finally:
                for s in socks:
                    s.close()  # the supervisor's copies: sent on, or not to be had

    def _route(self, sender: int, message: dict[str, Any], socks: list[socket.socket]) -> None:
        op, token = message["op"], _token(message)
        now = time.monotonic()
        if op == "fetch":
            self._ask(sender, token, [], now)
        elif op == "given":
            asker_value, tried_values = message["route"]
            asker, tried = int(asker_value), [int(w) for w in tried_values]
            if not 0 <= asker < len(self._channels):
                raise ValueError(f"no worker {asker}")
            reservation = message["reservation"]
            if reservation is None:
                self._ask(asker, token, tried, now)
                return
            left = float(reservation["expires"])
            self._moved = {t: m for t, m in self._moved.items() if m[1] > now}
            self._moved[token] = (asker, now + left)
            answer = {"op": "fetched", "token": token.hex(), "from": sender}
            answer["reservation"] = reservation
            self._to(asker, answer, socks)
        else:
            raise ValueError(f"unknown op {op!r}")

    def _to(self, worker: int, message: dict[str, Any], socks: Sequence[socket.socket]) -> bool:
        if worker not in self._reading:  # exited, or no such worker
            return False
        return _send(self._channels[worker], message, socks)


__all__ = ["ReservationChannel", "ReservationRouter", "channel_pair"]
