"""The declarative part: names and the address plan. No kernel needed."""

from __future__ import annotations

import ipaddress

import pytest

from xdpturn_lab.testbed import Relay, Site, Testbed, Topology
from xdpturn_lab.testbed.topology import (
    MAX_RELAYS,
    MAX_SITES,
    relay_inside,
    relay_uplink,
    site_lan,
    site_uplink,
)

DOC4 = [ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
DOC6 = ipaddress.IPv6Network("2001:db8::/32")
PRIVATE4 = ipaddress.IPv4Network("10.0.0.0/8")
ULA = ipaddress.IPv6Network("fd00::/8")


def test_internet_uses_documentation_prefixes_only_and_links_do_not_overlap() -> None:
    uplinks = [relay_uplink(i) for i in range(MAX_RELAYS)] + [
        site_uplink(j) for j in range(MAX_SITES)
    ]
    for link in uplinks:
        assert any(link.net4.subnet_of(doc) for doc in DOC4)
        assert link.net6.subnet_of(DOC6)
    nets4 = [link.net4 for link in uplinks]
    assert not any(a.overlaps(b) for i, a in enumerate(nets4) for b in nets4[i + 1 :])
    assert len({link.net6 for link in uplinks}) == len(uplinks)


def test_inside_addresses_are_private() -> None:
    for link in [relay_inside(i) for i in range(MAX_RELAYS)] + [
        site_lan(j) for j in range(MAX_SITES)
    ]:
        assert link.net4.subnet_of(PRIVATE4)
        assert link.net6.subnet_of(ULA)


def test_address_plan_examples() -> None:
    assert str(relay_uplink(0).b4) == "203.0.113.2"
    assert str(relay_uplink(1).a4) == "203.0.113.9"
    assert str(site_uplink(1).b6) == "2001:db8:2:1::2"
    assert str(site_lan(2).b4) == "10.1.2.2"
    assert relay_uplink(0).cidr4(relay_uplink(0).a4) == "203.0.113.1/29"


@pytest.mark.parametrize(
    "topology_args",
    [
        {"relays": [Relay("Relay")]},
        {"relays": [Relay("a-b")]},
        {"relays": [Relay("waytoolongname")]},
        {"relays": [Relay("inet")]},
        {"relays": [Relay("x")], "sites": [Site("x")]},
        {"sites": [Site(f"s{j}") for j in range(MAX_SITES + 1)]},
    ],
)
def test_bad_topologies_are_rejected(topology_args: dict[str, list[Relay] | list[Site]]) -> None:
    with pytest.raises(ValueError):
        Topology(**topology_args)  # type: ignore[arg-type]


def test_plan_is_known_before_up_and_unique_per_testbed() -> None:
    topology = Topology(relays=[Relay("relay", nat_1to1=True)], sites=[Site("client")])
    one, two = Testbed(topology), Testbed(topology)
    assert not one.is_up
    assert set(one.namespaces).isdisjoint(two.namespaces)
    relay = one.relay("relay")
    assert relay.local_ipv4 != relay.public_ipv4
    assert relay.upstream_netns == relay.nat_netns == one.netns_of("relay-nat")
    assert one.netns_of(relay) == relay.netns == one.netns_of("relay")
    assert one.netns_of(relay.netns) == relay.netns
    with pytest.raises(KeyError):
        one.netns_of(two.netns_of("relay"))


def test_interface_names_fit_ifnamsiz() -> None:
    topology = Topology(relays=[Relay("r" * 10)], sites=[Site("s" * 10)])
    tb = Testbed(topology)
    names = [tb.relay("r" * 10).upstream_interface, tb.relay("r" * 10).interface]
    site = tb.site("s" * 10)
    names += [site.interface, site.nat_wan_interface, site.nat_lan_interface, f"to-{site.name}"]
    assert all(len(name) <= 15 for name in names)
