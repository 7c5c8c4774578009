"""Address types: the hash and family they compute once must behave like derived values."""

from __future__ import annotations

import copy
import ipaddress
import pickle

from xdpturn.proto.addr import ClientAddr, ClientFlow, Family, Transport, TransportAddr


def addr(text: str) -> TransportAddr:
    return TransportAddr.parse(text)


def test_equal_addresses_hash_alike_and_find_each_other_in_dicts() -> None:
    a, b = addr("192.0.2.1:3478"), addr("192.0.2.1:3478")
    assert a is not b and a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert a != addr("192.0.2.1:3479") and a != addr("192.0.2.2:3478")
    flow = ClientFlow(ClientAddr(a), 1, Transport.TCP)
    same = ClientFlow(ClientAddr(b), 1, Transport.TCP)
    assert flow == same and hash(flow) == hash(same) and {flow: 1}[same] == 1
    assert flow != ClientFlow(ClientAddr(a), 1)
    assert flow != ClientFlow(ClientAddr(a), 0, Transport.TCP)


def test_family_follows_the_address() -> None:
    assert addr("192.0.2.1:1").family is Family.IPV4
    assert addr("[2001:db8::1]:1").family is Family.IPV6


def test_cached_fields_stay_out_of_repr_and_patterns() -> None:
    a = addr("192.0.2.1:3478")
    assert repr(a) == "TransportAddr(ip=IPv4Address('192.0.2.1'), port=3478)"
    assert TransportAddr.__match_args__ == ("ip", "port")
    assert ClientFlow.__match_args__ == ("client", "listener", "transport")
    match ClientFlow(ClientAddr(a)):
        case ClientFlow(TransportAddr(ip, port), listener, transport):
            assert (ip, port, listener, transport) == (a.ip, 3478, 0, Transport.UDP)


def test_copies_and_pickles_are_rebuilt_with_their_own_hash() -> None:
    flow = ClientFlow(ClientAddr(TransportAddr(ipaddress.ip_address("2001:db8::1"), 5)), 2)
    assert b"_hash" not in pickle.dumps(flow)  # another process has another hash seed
    for clone in (copy.copy(flow), copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))):
        assert clone == flow and hash(clone) == hash(flow) and clone.client.family is Family.IPV6
