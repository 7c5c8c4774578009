"""The core's state as plain data, handed from a relay that stops for a restart to the next one.

`TurnServer.export_state` makes a `CoreState`, `TurnServer.restore_state` takes one; `to_plain` and
`from_plain` turn it into JSON-ready dicts and back. Every time in a `CoreState` is wall-clock
(unix seconds): the core runs on its own clock, which need not mean the same in the next process,
so times are converted with the pair (core now, wall now) on the way out and on the way in.

`from_plain` checks everything it reads and raises `StateError` on anything unexpected, so a
state file from another format version, truncated or corrupt, is refused as a whole.

A reservation also moves between the worker processes of one running relay
(`TurnServer.give_up_reservation`, `handle_fetched_reservation`): as a `SavedReservation` whose
`expires` is the seconds it has left, in the same plain form (`reservation_to_plain`,
`reservation_from_plain`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from xdpturn.proto.addr import ClientAddr, ClientFlow, Family, PeerAddr, Transport, TransportAddr

# Bumped whenever the meaning of a field changes: a file of another version is not adopted.
FORMAT_VERSION = 2  # 2: reservations (RESERVATION-TOKEN), DONT-FRAGMENT


class StateError(ValueError):
    """A saved state that cannot be adopted; the message says why."""


@dataclass(frozen=True)
class SavedChannel:
    number: int
    peer: PeerAddr
    expires: float  # wall clock


@dataclass(frozen=True)
class SavedAllocation:
    flow: ClientFlow  # UDP only: a TCP/TLS client's connection ends with the process
    username: str
    key: bytes
    relay_port: int
    families: frozenset[Family]
    expires: float  # wall clock
    allocate_transaction: bytes
    allocate_response: bytes
    dont_fragment: bool  # its port's sockets send with DF
    permissions: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, float]  # wall clock
    channels: tuple[SavedChannel, ...]


@dataclass(frozen=True)
class SavedReservation:
    """A port held for the Allocate that presents `token` (RFC 8656 section 7.2)."""

    token: bytes
    relay_port: int
    families: frozenset[Family]
    dont_fragment: bool
    expires: float  # wall clock; between workers, the seconds it has left


@dataclass(frozen=True)
class CoreState:
    nonce_key: bytes
    allocations: tuple[SavedAllocation, ...]
    reservations: tuple[SavedReservation, ...] = ()


def to_plain(state: CoreState) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "nonce_key": state.nonce_key.hex(),
        "allocations": [_allocation_to_plain(a) for a in state.allocations],
        "reservations": [reservation_to_plain(r) for r in state.reservations],
    }


def reservation_to_plain(r: SavedReservation) -> dict[str, Any]:
    return {
        "token": r.token.hex(),
        "relay_port": r.relay_port,
        "families": sorted(int(f) for f in r.families),
        "dont_fragment": r.dont_fragment,
        "expires": r.expires,
    }


def reservation_from_plain(data: object) -> SavedReservation:
    """The reservation in `data` (as `reservation_to_plain` made it). Raises StateError."""
    try:
        return _reservation_from_plain(data)
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"malformed reservation: {type(e).__name__} {e}") from e


def _allocation_to_plain(a: SavedAllocation) -> dict[str, Any]:
    return {
        "client": str(a.flow.client),
        "listener": a.flow.listener,
        "username": a.username,
        "key": a.key.hex(),
        "relay_port": a.relay_port,
        "families": sorted(int(f) for f in a.families),
        "expires": a.expires,
        "allocate_transaction": a.allocate_transaction.hex(),
        "allocate_response": a.allocate_response.hex(),
        "dont_fragment": a.dont_fragment,
        "permissions": {str(ip): expires for ip, expires in a.permissions.items()},
        "channels": [
            {"number": c.number, "peer": str(c.peer), "expires": c.expires} for c in a.channels
        ],
    }


def from_plain(data: object) -> CoreState:
    """The state in `data` (as `to_plain` made it). Raises StateError."""
    try:
        obj = _dict(data)
        if obj.get("format") != FORMAT_VERSION:
            raise StateError(f"format {obj.get('format')!r}, this relay reads {FORMAT_VERSION}")
        return CoreState(
            nonce_key=_hex(obj["nonce_key"], 16),
            allocations=tuple(_allocation_from_plain(a) for a in _list(obj["allocations"])),
            reservations=tuple(_reservation_from_plain(r) for r in _list(obj["reservations"])),
        )
    except StateError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"malformed: {type(e).__name__} {e}") from e


def _allocation_from_plain(data: object) -> SavedAllocation:
    a = _dict(data)
    channels = []
    for c in _list(a["channels"]):
        channel = _dict(c)
        channels.append(
            SavedChannel(
                number=_int(channel["number"]),
                peer=PeerAddr(TransportAddr.parse(_str(channel["peer"]))),
                expires=_float(channel["expires"]),
            )
        )
    return SavedAllocation(
        flow=ClientFlow(
            ClientAddr(TransportAddr.parse(_str(a["client"]))),
            _int(a["listener"]),
            Transport.UDP,
        ),
        username=_str(a["username"]),
        key=_hex(a["key"]),
        relay_port=_int(a["relay_port"]),
        families=frozenset(Family(_int(f)) for f in _list(a["families"])),
        expires=_float(a["expires"]),
        allocate_transaction=_hex(a["allocate_transaction"], 12),
        allocate_response=_hex(a["allocate_response"]),
        dont_fragment=_bool(a["dont_fragment"]),
        permissions={
            ipaddress.ip_address(_str(ip)): _float(expires)
            for ip, expires in _dict(a["permissions"]).items()
        },
        channels=tuple(channels),
    )


def _reservation_from_plain(data: object) -> SavedReservation:
    r = _dict(data)
    return SavedReservation(
        token=_hex(r["token"], 8),
        relay_port=_int(r["relay_port"]),
        families=frozenset(Family(_int(f)) for f in _list(r["families"])),
        dont_fragment=_bool(r["dont_fragment"]),
        expires=_float(r["expires"]),
    )


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__}")
    return value


def _dict(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _float(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _hex(value: object, size: int | None = None) -> bytes:
    raw = bytes.fromhex(_str(value))
    if size is not None and len(raw) != size:
        raise ValueError(f"expected {size} bytes, got {len(raw)}")
    return raw


__all__ = [
    "FORMAT_VERSION",
    "CoreState",
    "SavedAllocation",
    "SavedChannel",
    "SavedReservation",
    "StateError",
    "from_plain",
    "reservation_from_plain",
    "reservation_to_plain",
    "to_plain",
]
