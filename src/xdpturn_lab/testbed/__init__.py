"""Network-namespace worlds for end-to-end tests, `xdpturn-lab demo` and benchmarks.

    from xdpturn_lab.testbed import Relay, Site, Testbed, Topology

    topo = Topology(relays=[Relay("relay", nat_1to1=True)], sites=[Site("client"), Site("gateway")])
    with Testbed(topo) as tb:
        relay = tb.relay("relay")  # .netns .interface .local_ipv4/6 .public_ipv4/6
        server = tb.popen(relay, ["turnserver", "--listening-ip", str(relay.local_ipv4),
                                  "--external-ip", f"{relay.public_ipv4}/{relay.local_ipv4}"])
        tb.run("client", ["ping", "-c1", str(relay.public_ipv4)])  # seen as client NAT's address
        sock = tb.call("client", socket.socket, socket.AF_INET, socket.SOCK_DGRAM)  # lives there
        tb.link_counters(relay, relay.interface)  # rx/tx packets, for benchmarks

See `topology` for the address plan and `testbed` for naming and teardown.
"""

from xdpturn_lab.testbed.counters import LinkCounters, ethtool_stats, link_counters
from xdpturn_lab.testbed.testbed import (
    INET,
    NodeRef,
    RelayNode,
    SiteNode,
    Testbed,
    cleanup_stale,
)
from xdpturn_lab.testbed.topology import Relay, Site, Topology

__all__ = [
    "INET",
    "LinkCounters",
    "NodeRef",
    "Relay",
    "RelayNode",
    "Site",
    "SiteNode",
    "Testbed",
    "Topology",
    "cleanup_stale",
    "ethtool_stats",
    "link_counters",
]
