"""Issue 10, real browsers: two headless Chromiums, one in the Client site and one in the Gateway
site (each behind its own masquerading NAT), relay-only ICE on one xdpturn relay with the fast path
on. The Client sends its fake camera and a data channel; the Gateway decodes the video and echoes
every message. Both ICE agents pick a relay/relay pair on the same relay, so the media hairpins
(ChannelData -> ChannelData in XDP), and /metrics must show that the kernel carried nearly all.

Chromium asks for no relayed-address family, so over an IPv6 transport it still gets IPv4 relayed
addresses: the IPv6 case hairpins through IPv4 relayed addresses on the ipv6_channel_to_ipv6_channel
route. It gathers for each m-line before BUNDLE is agreed, then releases the unused allocation
(Refresh with lifetime 0).
"""

from __future__ import annotations

import base64
import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.chromium import Chromium, executable
from tests.e2e.helpers import METRICS, channel_route, relayed_packets
from tests.support import unavailable
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.auth import mint_rest_credentials
from xdpturn_lab.testbed import Testbed
from xdpturn_lab.testbed.scenario import TURN_PORT, RelayProcess

pytestmark = [pytest.mark.kernel, pytest.mark.interop]

PAGE = (Path(__file__).parent / "webrtc_peer.html").as_uri()
SIGNAL_TIMEOUT = 15.0  # seconds for gathering, connecting or the echo, each
MESSAGES = 300
FRAMES = 90  # video frames the Gateway must decode (a few seconds of the fake camera)
# The kernel must carry at least this share of the relayed datagrams. Not all: ICE checks and
# the first packets of each direction go as Send/Data indications through Python until Chromium's
# ChannelBind succeeds; only bound channels are in the XDP maps.
KERNEL_SHARE = 0.95


def echo_messages(count: int) -> list[dict[str, str]]:
    """Text and binary messages of varied sizes, edge sizes first, the same in every run."""
    rng = random.Random(10)
    sizes = [0, 1, 2, 256, 1024, 1200, 1201, 16_384, 65_535]
    sizes += [rng.choice((rng.randint(1, 300), rng.randint(300, 20_000))) for _ in range(count)]
    messages: list[dict[str, str]] = []
    for i, size in enumerate(sizes[:count]):
        if i % 3 == 2:
            # Non-ASCII text: each "é€😀" is 2, 3 and 4 bytes of UTF-8.
            messages.append({"text": ("é€😀" + "xdpturn " * (size // 8 + 1))[: size // 4]})
        else:
            payload = bytes(range(256)) if i == 3 else rng.randbytes(size)
            messages.append({"binary": base64.b64encode(payload).decode()})
    return messages


def turn_server(relay: RelayProcess, transport: Family, user: str) -> dict[str, Any]:
    """The RTCIceServer for one page: the relay's public address of the transport family, REST
    credentials minted with the relay's secret."""
    server = relay.server(transport)
    host = f"[{server.ip}]" if transport is Family.IPV6 else str(server.ip)
    creds = mint_rest_credentials(relay.secret, now=time.time(), ttl=600, user_id=user)
    return {
        "urls": f"turn:{host}:{TURN_PORT}?transport=udp",
        "username": creds.username,
        "credential": creds.password,
    }


def closing_of(relay: RelayProcess, allocation: str) -> dict[str, Any]:
    """The relay's "allocation closed" record of this allocation (waited for)."""
    return relay.wait_for("allocation closed", where=lambda r: r["allocation"] == allocation)


def first_difference(sent: list[dict[str, str]], echoed: list[dict[str, str]]) -> str:
    for i, (a, b) in enumerate(zip(sent, echoed, strict=False)):
        if a != b:
            return f"message {i} came back changed: sent {str(a)[:80]}..., got {str(b)[:80]}..."
    return f"sent {len(sent)} messages, {len(echoed)} came back"


@pytest.mark.parametrize("transport", [Family.IPV4, Family.IPV6], ids=["v4", "v6"])
def test_chromium_pages_call_each_other_through_the_relay(
    world: Testbed, transport: Family
) -> None:
    if executable() is None:
        unavailable("chromium is not installed")
    messages = echo_messages(MESSAGES)
    ms = int(SIGNAL_TIMEOUT * 1000)  # the pages' own bound; ours is a little longer
    bound = SIGNAL_TIMEOUT + 5
    # Leaving the block closes the browsers, then stops the relay; on a failure too.
    with (
        RelayProcess(world, "relay", fastpath=True, extra_args=["--metrics", METRICS]) as relay,
        Chromium(world, "client") as client,
        Chromium(world, "gateway") as gateway,
    ):
        relay.wait_for("metrics listening")
        before = relayed_packets(world, "relay")
        for page in (client, gateway):
            page.open(PAGE)
        # Signalling: each page's description, all candidates included, handed to the other.
        offer = client.run("offer", turn_server(relay, transport, "client"), ms, timeout=bound)
        answer = gateway.run(
            "answer", turn_server(relay, transport, "gateway"), offer, ms, timeout=bound
        )
        for name, sdp in (("client", offer), ("gateway", answer)):
            assert " typ relay " in sdp, f"{name} gathered no relay candidate: {relay.tail()}"
        client.run("accept", answer)
        for page in (client, gateway):
            page.run("connected", ms, timeout=bound)
        echoed = client.run("echo", messages, ms, timeout=bound)
        frames = gateway.run("decoded", FRAMES, ms, timeout=bound)
        pairs = {page.node: page.run("selectedPair") for page in (client, gateway)}
        after = relayed_packets(world, "relay")
        allocations = [r for r in relay.records if r.get("message") == "allocation opened"]
        # Hanging up releases every allocation (Refresh with lifetime 0), the second one of the
        # Client's included if bundling had not released it already.
        for page in (client, gateway):
            page.run("hangUp")
        closed = [closing_of(relay, opened["allocation"]) for opened in allocations]

    assert all(record["reason"] == "refresh" for record in closed), closed
    assert echoed == messages, first_difference(messages, echoed)
    assert frames >= FRAMES
    public = relay.relay.public_ipv4  # Chromium's relayed addresses are IPv4 (see above)
    for node, pair in pairs.items():
        assert pair is not None, f"{node}: no selected candidate pair"
        assert pair["state"] == "succeeded", (node, pair)
        assert pair["local"]["candidateType"] == pair["remote"]["candidateType"] == "relay", (
            node,
            pair,
        )
        assert pair["local"]["address"] == pair["remote"]["address"] == str(public), (node, pair)
        assert pair["local"]["relayProtocol"] == "udp", (node, pair)
    # Each browser reached the relay over the transport family, from its NAT's public address.
    nats = {
        str(site.nat_public_ipv4 if transport is Family.IPV4 else site.nat_public_ipv6)
        for site in world.sites
    }
    clients = {TransportAddr.parse(r["client"]).ip for r in allocations}
    assert {str(ip) for ip in clients} == nats, allocations

    moved = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    kernel = sum(n for (path, _), n in moved.items() if path == "xdp")
    python = sum(n for (path, _), n in moved.items() if path == "python")
    share = kernel / (kernel + python) if kernel + python else 0.0
    print(
        f"\n{transport.name} transport: the kernel carried {kernel:.0f} of {kernel + python:.0f}"
        f" relayed datagrams ({share:.2%}), Python {python:.0f}; {frames} frames decoded;"
        f" per route {moved}"
    )
    hairpin = channel_route(transport, transport)
    assert {route for path, route in moved if path == "xdp"} == {hairpin}, moved
    assert share >= KERNEL_SHARE, moved
