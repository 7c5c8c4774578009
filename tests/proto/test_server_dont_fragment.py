"""DONT-FRAGMENT in an Allocate (RFC 8656 section 7.2, check 4): the allocation's sockets send
with DF; where the relay cannot give it (a port reserved without it), 420 naming the attribute."""

from __future__ import annotations

from tests.proto.harness import Harness, error_code
from xdpturn.proto import stun
from xdpturn.proto.stun import AttrType, MessageClass

DF = (AttrType.DONT_FRAGMENT, b"")
EVEN_RESERVE = (AttrType.EVEN_PORT, stun.encode_even_port(True))


def test_dont_fragment_opens_the_allocation_port_with_df_and_only_then() -> None:
    h = Harness()
    with_df, without = h.client("192.0.2.10:5000"), h.client("192.0.2.11:5000")
    assert with_df.allocate(DF).cls == MessageClass.SUCCESS
    assert without.allocate().cls == MessageClass.SUCCESS
    assert h.ports.dont_fragment == {with_df.relay_port}


def test_a_pair_asked_with_dont_fragment_reserves_a_df_port_for_its_token() -> None:
    h = Harness()
    rtp = h.client("192.0.2.10:5000").allocate(EVEN_RESERVE, DF)
    token = rtp.get(AttrType.RESERVATION_TOKEN)
    assert token is not None
    rtcp = h.client("192.0.2.10:5001")
    assert rtcp.allocate((AttrType.RESERVATION_TOKEN, token), DF).cls == MessageClass.SUCCESS
    assert h.ports.dont_fragment == {rtcp.relay_port - 1, rtcp.relay_port}


def test_dont_fragment_with_a_token_reserved_without_it_is_420_and_the_token_stays() -> None:
    h = Harness()
    token = h.client("192.0.2.10:5000").allocate(EVEN_RESERVE).get(AttrType.RESERVATION_TOKEN)
    assert token is not None
    rtcp = h.client("192.0.2.10:5001")
    response = rtcp.allocate((AttrType.RESERVATION_TOKEN, token), DF)
    assert error_code(response) == 420
    unknown = response.get(AttrType.UNKNOWN_ATTRIBUTES)
    assert unknown is not None
    assert stun.decode_unknown_attributes(unknown) == [AttrType.DONT_FRAGMENT]
    # As RFC 8656 tells the client: try again without it.
    assert rtcp.allocate((AttrType.RESERVATION_TOKEN, token)).cls == MessageClass.SUCCESS
    assert h.ports.dont_fragment == set()
