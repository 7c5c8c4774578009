"""The peer policy on its own: the registry rows, embedded IPv4 addresses, operator lists."""

from __future__ import annotations

import ipaddress

import pytest

from tests.proto.peer_cases import DANGEROUS, REGISTRY_SAMPLES
from xdpturn.proto.policy import IPV4_SPECIAL, IPV6_SPECIAL, PeerPolicy, embedded_ipv4

ip = ipaddress.ip_address
net = ipaddress.ip_network


def test_every_registry_row_has_a_sample() -> None:
    rows = {str(row.prefix) for row in IPV4_SPECIAL + IPV6_SPECIAL}
    sampled = {str(net(prefix)) for prefix, _, _ in REGISTRY_SAMPLES}
    assert rows == sampled


@pytest.mark.parametrize(("row", "sample", "relayed"), REGISTRY_SAMPLES)
def test_registry_row_default(row: str, sample: str, relayed: bool) -> None:
    assert ip(sample) in net(row)
    assert PeerPolicy().permits(ip(sample)) is relayed


@pytest.mark.parametrize("spelling", DANGEROUS)
def test_dangerous_spelling_is_refused(spelling: str) -> None:
    assert not PeerPolicy().permits(ip(spelling))


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("::ffff:10.1.2.3", ["10.1.2.3"]),
        ("::10.1.2.3", ["10.1.2.3"]),
        ("64:ff9b::a01:203", ["10.1.2.3"]),
        ("2002:a01:203:4::5", ["10.1.2.3"]),
        ("2001:0:a01:203:8000:f227:f5fe:fdfc", ["10.1.2.3", "10.1.2.3"]),
        ("2001:db8::1", []),
        ("::1", []),
        ("::", []),
        ("64:ff9b:1::a01:203", []),  # local use: the embedding is the network's own choice
    ],
)
def test_embedded_ipv4(address: str, embedded: list[str]) -> None:
    parsed = ip(address)
    assert isinstance(parsed, ipaddress.IPv6Address)
    assert [str(a) for a in embedded_ipv4(parsed)] == embedded


def test_deny_peer_closes_a_range_in_every_spelling() -> None:
    policy = PeerPolicy(deny=[net("198.51.100.0/24")])
    for spelling in (
        "198.51.100.7",
        "::ffff:198.51.100.7",
        "64:ff9b::c633:6407",
        "2002:c633:6407::1",
        "::198.51.100.7",
    ):
        assert not policy.permits(ip(spelling)), spelling
    assert policy.permits(ip("203.0.113.9"))


def test_the_most_specific_prefix_decides() -> None:
    policy = PeerPolicy(allow=[net("10.0.0.0/8")], deny=[net("10.1.0.0/16")])
    assert policy.permits(ip("10.2.0.1"))
    assert not policy.permits(ip("10.1.0.1"))
    policy = PeerPolicy(allow=[net("10.1.0.0/16")], deny=[net("10.0.0.0/8")])
    assert policy.permits(ip("10.1.0.1"))
    assert not policy.permits(ip("10.2.0.1"))


def test_deny_wins_over_allow_for_the_same_prefix() -> None:
    policy = PeerPolicy(allow=[net("10.0.0.0/8")], deny=[net("10.0.0.0/8")])
    assert not policy.permits(ip("10.1.2.3"))


def test_operator_rule_beats_the_registry_row_of_the_same_length() -> None:
    assert PeerPolicy(allow=[net("127.0.0.0/8")]).permits(ip("127.0.0.1"))
    assert not PeerPolicy(deny=[net("2001:db8::/32")]).permits(ip("2001:db8::7"))


def test_ipv6_loopback_opens_on_its_own() -> None:
    assert PeerPolicy(allow=[net("::1/128")]).permits(ip("::1"))


def test_allowing_an_ipv4_range_opens_its_embedded_spellings() -> None:
    policy = PeerPolicy(allow=[net("127.0.0.0/8")])
    for spelling in ("::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1"):
        assert policy.permits(ip(spelling)), spelling


def test_allowing_an_embedding_prefix_still_judges_the_embedded_address() -> None:
    policy = PeerPolicy(allow=[net("2002::/16"), net("64:ff9b::/96"), net("::ffff:0:0/96")])
    assert not policy.permits(ip("2002:7f00:1::1"))
    assert not policy.permits(ip("64:ff9b::a9fe:a9fe"))
    assert not policy.permits(ip("::ffff:10.0.0.1"))
    assert policy.permits(ip("2002:c633:6407::1"))


def test_deny_on_an_embedding_prefix_closes_it() -> None:
    policy = PeerPolicy(deny=[net("2002::/16"), net("2001::/32")])
    assert not policy.permits(ip("2002:c633:6407::1"))
    assert not policy.permits(ip("2001:0:c633:6407::39cc:9bf7"))


def test_local_use_nat64_opens_as_a_whole() -> None:
    assert PeerPolicy(allow=[net("64:ff9b:1::/48")]).permits(ip("64:ff9b:1::7f00:1"))


def test_own_addresses_are_refused_in_every_spelling_even_when_allowed() -> None:
    own = [ip("203.0.113.1"), ip("2001:db8::1")]
    policy = PeerPolicy(allow=[net("203.0.113.0/24")], own=own)
    for spelling in (
        "203.0.113.1",
        "::ffff:203.0.113.1",
        "::203.0.113.1",
        "64:ff9b::cb00:7101",
        "2002:cb00:7101::1",
        "2001:0:cb00:7101::34ff:8efe",
        "2001:db8::1",
    ):
        assert not policy.permits(ip(spelling)), spelling
    assert policy.permits(ip("203.0.113.2"))
