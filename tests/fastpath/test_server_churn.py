"""The TURN core driving the real XDP maps: channels bound and then lost every way the RFC
allows (channel expiry, permission loss, Refresh with LIFETIME 0, allocation expiry) leave no
stale route behind."""

from __future__ import annotations

import pytest

from tests.fastpath.conftest import Lab
from tests.proto.harness import PUBLIC_V4, Harness, addr
from xdpturn.fastpath.xdp import XdpFastPath
from xdpturn.proto import stun
from xdpturn.proto.addr import PeerAddr, TransportAddr
from xdpturn.proto.commands import Command, InstallChannel, RemoveChannel
from xdpturn.proto.server import CHANNEL_LIFETIME, PERMISSION_LIFETIME
from xdpturn.proto.stun import AttrType

ALLOCATIONS = 100
CHANNELS_EACH = 10  # 1,000 channels in all


def apply(commands: list[Command], fastpath: XdpFastPath) -> tuple[int, int]:
    """Execute the core's route commands on the fast path, as the runtime does."""
    installed = removed = 0
    for command in commands:
        if isinstance(command, InstallChannel):
            fastpath.install(command.route)
            installed += 1
        elif isinstance(command, RemoveChannel):
            fastpath.remove(command.route)
            removed += 1
    return installed, removed


def map_entries(fastpath: XdpFastPath) -> tuple[int, int]:
    return len(list(fastpath.chan_to_udp.keys())), len(list(fastpath.udp_to_chan.keys()))


@pytest.mark.kernel
def test_1000_channels_bound_and_lost_leave_the_maps_empty(lab: Lab) -> None:
    fastpath = lab.fastpath
    h = Harness()
    clients = []
    for i in range(ALLOCATIONS):
        client = h.client(f"192.0.2.{10 + i}:{5000 + i}")
        client.allocate((AttrType.LIFETIME, stun.encode_u32(3600)))
        clients.append(client)
    # Half the allocations also talk to each other through the relay (packets to itself).
    for i, client in enumerate(clients):
        for c in range(CHANNELS_EACH - 1):
            peer = PeerAddr(addr(f"198.51.100.{c + 1}:{7000 + i}"))
            assert client.bind(0x4000 + c, peer).cls == stun.MessageClass.SUCCESS
        other = clients[i ^ 1]
        own = PeerAddr(TransportAddr(PUBLIC_V4, other.relay_port))
        assert client.bind(0x4FFF, own).cls == stun.MessageClass.SUCCESS
    installed, _ = apply(h.take(), fastpath)
    assert installed == ALLOCATIONS * CHANNELS_EACH
    assert map_entries(fastpath) == (1000, 1000)

    # A quarter are deleted by Refresh LIFETIME 0.
    for client in clients[:25]:
        client.refresh(0)
    apply(h.take(), fastpath)
    assert map_entries(fastpath) == (750, 750)
    # Permissions lapse (300 s) before channels (600 s): the rest lose their routes...
    apply(h.advance(PERMISSION_LIFETIME + 1), fastpath)
    assert map_entries(fastpath) == (0, 0)
    # ...a quarter get them back with a permission, then lose them when the channels expire.
    for client in clients[25:50]:
        client.permit(*(addr(f"198.51.100.{c + 1}:1") for c in range(CHANNELS_EACH - 1)))
    installed, _ = apply(h.take(), fastpath)
    assert installed == 25 * (CHANNELS_EACH - 1)
    apply(h.advance(CHANNEL_LIFETIME - PERMISSION_LIFETIME), fastpath)
    assert map_entries(fastpath) == (0, 0)
    # Fresh channels, then every allocation expires.
    for client in clients[50:]:
        client.refresh(3600)
        assert (
            client.bind(0x4100, PeerAddr(addr("198.51.100.200:9"))).cls == stun.MessageClass.SUCCESS
        )
    installed, _ = apply(h.take(), fastpath)
    assert installed == 50
    apply(h.advance(3601), fastpath)
    assert h.server.allocations() == []
    assert map_entries(fastpath) == (0, 0)
    assert fastpath.routes == 0
