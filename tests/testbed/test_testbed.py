"""The testbed in the kernel: it comes up, carries traffic like the real thing, and goes away."""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import unavailable
from tests.testbed.udp import WhoAmI, family_of, parse_whoami, request, udp_socket
from xdpturn_lab.testbed import Relay, RelayNode, Site, Testbed, Topology, cleanup_stale, netns

pytestmark = pytest.mark.kernel

ECHO_PORT = 3478
REFLECT_PORT = 7777  # see reflect.bpf.c
TOPOLOGY = Topology(
    relays=[Relay("relay"), Relay("cloud", nat_1to1=True)],
    sites=[Site("client"), Site("gateway", random_ports=True)],
)


@pytest.fixture(scope="module")
def world() -> Iterator[Testbed]:
    with Testbed(TOPOLOGY) as tb:
        yield tb


def ours(prefix: str = "xtb") -> list[str]:
    """Namespaces with the testbed's naming, whoever owns them."""
    return [name for name in netns.names() if name.startswith(f"{prefix}-")]


def wait_until_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once `pid` is gone or a zombie (killed, waiting for a reaper that isn't us)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


# --- lifecycle ---------------------------------------------------------------------------------


def test_up_then_down_leaves_no_namespace() -> None:
    topology = Topology(relays=[Relay("relay", nat_1to1=True)], sites=[Site("client")])
    with Testbed(topology) as tb:
        assert tb.is_up
        assert all(netns.exists(ns) for ns in tb.namespaces)
        assert len(tb.namespaces) == 5  # inet, relay, relay-nat, client, client-nat
        sleeper = tb.popen("relay", ["sleep", "300"])
    assert not any(netns.exists(ns) for ns in tb.namespaces)
    assert sleeper.poll() is not None
    tb.down()  # idempotent


def test_teardown_happens_when_the_body_fails() -> None:
    tb = Testbed(Topology(sites=[Site("client")]))
    with pytest.raises(RuntimeError, match="boom"), tb:
        assert netns.exists(tb.netns_of("client"))
        raise RuntimeError("boom")
    assert not any(netns.exists(ns) for ns in tb.namespaces)


def test_no_link_to_the_root_namespace(world: Testbed) -> None:
    for ns in world.namespaces:
        links = json.loads(subprocess.run(
            ["ip", "-j", "-n", ns, "link", "show"], capture_output=True, check=True, text=True
        ).stdout)  # fmt: skip
        for link in links:
            if link["ifname"] == "lo":
                continue
            # A veth peer in another namespace shows as link_netnsid; the root has no id here
            # unless one of our namespaces reaches it, and every peer must be one of ours.
            assert "link_netnsid" in link, f"{ns}/{link['ifname']} has its peer in its own ns"
        # Every namespace this one has an id for (veth peers) must be a named one of this run;
        # the root namespace has no name under /run/netns.
        ids = subprocess.run(
            ["ip", "-n", ns, "netns", "list-id"], capture_output=True, check=True, text=True
        ).stdout.splitlines()
        names = [re.search(r"netns name: (\S+)\)", line) for line in ids]
        assert all(m is not None and m[1] in world.namespaces for m in names), (ns, ids)


# --- traffic -----------------------------------------------------------------------------------


@pytest.mark.parametrize("relay_name", ["relay", "cloud"])
@pytest.mark.parametrize("version", [4, 6])
def test_sites_reach_relay_public_address_through_masquerading_nat(
    world: Testbed, relay_name: str, version: int
) -> None:
    relay = world.relay(relay_name)
    public = relay.public_ipv4 if version == 4 else relay.public_ipv6
    local = relay.local_ipv4 if version == 4 else relay.local_ipv6
    # Bound to the local address: with 1:1 NAT, receiving at all proves the DNAT.
    with WhoAmI(world, relay, local, ECHO_PORT) as echo:
        for site_name in ("client", "gateway"):
            site = world.site(site_name)
            sock = udp_socket(world, site, family_of(public))
            reply, source = request(sock, public, ECHO_PORT, b"hello")
            sock.close()
            assert source == (public, ECHO_PORT)  # replies come from the public address
            seen_ip, _ = parse_whoami(reply)
            nat_public = site.nat_public_ipv4 if version == 4 else site.nat_public_ipv6
            assert seen_ip == nat_public
        sites = [world.site(n) for n in ("client", "gateway")]
        private = {str(s.ipv4) for s in sites} | {str(s.ipv6) for s in sites}
        assert not {str(ip) for ip, _ in echo.seen} & private


def test_random_ports_nat_changes_the_port(world: Testbed) -> None:
    relay = world.relay("relay")
    with WhoAmI(world, relay, relay.local_ipv4, ECHO_PORT):
        ports = []
        for _ in range(3):
            sock = udp_socket(world, "gateway", socket.AF_INET)
            sock.bind(("0.0.0.0", 0))
            reply, _ = request(sock, relay.public_ipv4, ECHO_PORT, b"x")
            ports.append((sock.getsockname()[1], parse_whoami(reply)[1]))
            sock.close()
    assert any(inner != outer for inner, outer in ports)


@pytest.mark.parametrize("version", [4, 6])
def test_one_to_one_nat_hairpins_to_the_relay_itself(world: Testbed, version: int) -> None:
    relay = world.relay("cloud")
    public = relay.public_ipv4 if version == 4 else relay.public_ipv6
    local = relay.local_ipv4 if version == 4 else relay.local_ipv6
    with WhoAmI(world, relay, local, ECHO_PORT):
        sock = udp_socket(world, relay, family_of(public))
        reply, source = request(sock, public, ECHO_PORT, b"me?")
        sock.close()
    assert source == (public, ECHO_PORT)
    assert parse_whoami(reply)[0] == public


def test_private_site_addresses_are_unreachable_from_the_internet(world: Testbed) -> None:
    client = world.site("client")
    with WhoAmI(world, client, client.ipv4, ECHO_PORT) as echo:
        sock = udp_socket(world, "relay", socket.AF_INET)
        with pytest.raises((TimeoutError, OSError)):
            request(sock, client.ipv4, ECHO_PORT, b"knock", tries=1)
        sock.close()
    assert echo.seen == []


def test_counters_count_datagrams(world: Testbed) -> None:
    relay = world.relay("relay")
    before = world.link_counters(relay, relay.interface)
    sock = udp_socket(world, "client", socket.AF_INET)
    for _ in range(50):
        sock.sendto(b"x" * 100, (str(relay.public_ipv4), 9))
    sock.close()
    delta = world.link_counters(relay, relay.interface) - before
    assert delta.rx_packets >= 50
    assert delta.rx_bytes >= 50 * 100


def test_call_and_entered_run_in_the_namespace(world: Testbed) -> None:
    names = {name for _, name in world.call("inet", socket.if_nameindex)}
    assert {"to-relay", "to-cloud", "to-client", "to-gateway"} <= names
    with world.entered("client"):
        inside = {name for _, name in socket.if_nameindex()}
    assert inside == {"lo", "eth0"}
    assert "to-relay" not in {name for _, name in socket.if_nameindex()}  # back home


def test_relay_facing_ends_are_prepared_for_xdp(world: Testbed) -> None:
    for relay in world.relays:
        ns, ifname = relay.upstream_netns, relay.upstream_interface
        features = world.run(ns, ["ethtool", "-k", ifname], capture_output=True, text=True).stdout
        assert "tx-checksumming: off" in features
        link = subprocess.run(
            ["ip", "-d", "-n", ns, "link", "show", "dev", ifname],
            capture_output=True, check=True, text=True,
        ).stdout  # fmt: skip
        assert "name xtb_pass" in link


# --- XDP_TX from the relay's interface ---------------------------------------------------------


@pytest.fixture(scope="module")
def reflector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clang = shutil.which("clang") or shutil.which("clang-16")
    arch_include = [p for p in glob.glob("/usr/include/*-linux-*") if os.path.isdir(f"{p}/asm")]
    if clang is None or not arch_include:
        unavailable("clang with the BPF target and the kernel's UAPI headers are needed")
    out = tmp_path_factory.mktemp("bpf") / "reflect.o"
    source = Path(__file__).with_name("reflect.bpf.c")
    flags = ["-O2", "-g", "-target", "bpf", f"-I{arch_include[0]}"]
    subprocess.run([clang, *flags, "-c", str(source), "-o", str(out)], check=True)
    return out


def nstat(tb: Testbed, node: str, counter: str) -> int:
    out = tb.run(node, ["nstat", "-az", counter], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith(counter):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("relay_name", ["relay", "cloud"])
def test_xdp_tx_from_the_relay_reaches_sites_behind_nat(
    world: Testbed, reflector: Path, relay_name: str
) -> None:
    relay: RelayNode = world.relay(relay_name)
    world.run(
        relay,
        [
            "ip",
            "link",
            "set",
            "dev",
            relay.interface,
            "xdpdrv",
            "obj",
            str(reflector),
            "sec",
            "xdp",
        ],
    )
    try:
        before = world.ethtool_stats(relay, relay.interface).get("rx_queue_0_xdp_tx", 0)
        csum_errors = nstat(world, "client", "UdpInCsumErrors")
        for public in (relay.public_ipv4, relay.public_ipv6):
            sock = udp_socket(world, "client", family_of(public))
            reply, source = request(sock, public, REFLECT_PORT, b"bounce")
            sock.close()
            assert reply == b"bounce"
            assert source == (public, REFLECT_PORT)
        after = world.ethtool_stats(relay, relay.interface).get("rx_queue_0_xdp_tx", 0)
        assert after - before >= 2  # the replies really were XDP_TX, not the stack
        assert nstat(world, "client", "UdpInCsumErrors") == csum_errors
    finally:
        world.run(relay, ["ip", "link", "set", "dev", relay.interface, "xdpdrv", "off"])


# --- runs that overlap, die or are killed ------------------------------------------------------


def test_two_testbeds_at_once_do_not_collide() -> None:
    topology = Topology(relays=[Relay("relay")], sites=[Site("client")])
    beds = [Testbed(topology), Testbed(topology)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(Testbed.up, beds))  # concurrently: neither one's stale sweep hits the other
    try:
        assert set(beds[0].namespaces).isdisjoint(beds[1].namespaces)
        for tb in beds:
            relay = tb.relay("relay")
            with WhoAmI(tb, relay, relay.local_ipv4, ECHO_PORT):
                sock = udp_socket(tb, "client", socket.AF_INET)
                request(sock, relay.public_ipv4, ECHO_PORT, b"hi")
                sock.close()
        beds[0].down()
        assert all(netns.exists(ns) for ns in beds[1].namespaces)
    finally:
        for tb in beds:
            tb.down()


CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from xdpturn_lab.testbed import Relay, Site, Testbed, Topology
    tb = Testbed(Topology(relays=[Relay("relay")], sites=[Site("client")]), prefix=sys.argv[2])
    with tb:
        sleeper = tb.popen("client", ["sleep", "300"])
        print(json.dumps({"namespaces": tb.namespaces, "sleeper": sleeper.pid}), flush=True)
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(300)
    """
)


def child_prefix() -> str:
    """A prefix of its own, so overlapping test runs never sweep each other's children."""
    return "xc" + "".join(random.choices(string.ascii_lowercase, k=6))


def start_child(mode: str, prefix: str) -> tuple[subprocess.Popen[str], list[str], int]:
    argv = [sys.executable, "-c", CHILD, mode, prefix]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    info = json.loads(child.stdout.readline())
    return child, info["namespaces"], info["sleeper"]


def test_a_killed_run_is_cleaned_up_by_the_next() -> None:
    prefix = child_prefix()
    child, namespaces, sleeper = start_child("kill", prefix)
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert all(netns.exists(ns) for ns in namespaces)  # SIGKILL: no teardown ran
    with Testbed(Topology(sites=[Site("client")]), prefix=prefix):
        assert not any(netns.exists(ns) for ns in namespaces)
        assert wait_until_gone(sleeper)  # what ran inside the stale run was killed too
    assert ours(prefix) == []


def test_a_live_run_of_another_process_survives_sweeps_and_sigterm_tears_it_down() -> None:
    prefix = child_prefix()
    child, namespaces, sleeper = start_child("stay", prefix)
    try:
        assert cleanup_stale(prefix) == []
        assert all(netns.exists(ns) for ns in namespaces)
    finally:
        child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=10) == 128 + signal.SIGTERM
    assert not any(netns.exists(ns) for ns in namespaces)
    assert wait_until_gone(sleeper)
