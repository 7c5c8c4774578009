"""Traffic per allocation and user from both paths (server/metering.py), with a fast path whose
kernel counters are what the test says."""

from __future__ import annotations

import ipaddress

from xdpturn.fastpath import NullFastPath
from xdpturn.proto.addr import ClientAddr, ClientFlow, Family, TransportAddr
from xdpturn.proto.meter import AllocationTraffic, DirectionTraffic
from xdpturn.proto.server import AllocationInfo
from xdpturn.server.metering import OTHER_USERS, Metering, user_of


def traffic(out: int, back: int = 0) -> AllocationTraffic:
    return AllocationTraffic(DirectionTraffic(1, out), DirectionTraffic(1 if back else 0, back))


class KernelMeters(NullFastPath):
    def __init__(self) -> None:
        self.live: dict[int, AllocationTraffic] = {}
        self.opened: list[int] = []

    def open_allocation(self, relay_port: int) -> None:
        self.opened.append(relay_port)
        self.live[relay_port] = AllocationTraffic()

    def close_allocation(self, relay_port: int) -> AllocationTraffic:
        return self.live.pop(relay_port)

    def allocation_traffic(self) -> dict[int, AllocationTraffic]:
        return {port: t.copy() for port, t in self.live.items()}


def info(port: int, user: str, python: AllocationTraffic) -> AllocationInfo:
    client = ClientAddr(TransportAddr(ipaddress.ip_address("192.0.2.10"), port))
    return AllocationInfo(
        ClientFlow(client, 0), user, port, frozenset({Family.IPV4}), 0.0, 1, 1, python
    )


def test_both_paths_add_up_per_allocation_and_survive_the_close() -> None:
    kernel, metering = KernelMeters(), Metering()
    metering.opened(50000, "alice", kernel)
    assert kernel.opened == [50000]
    kernel.live[50000] = traffic(1000, 300)
    (m,) = metering.allocations([info(50000, "alice", traffic(10))], kernel)
    assert (m.traffic.client_to_peer.bytes, m.traffic.peer_to_client.bytes) == (1010, 300)
    assert metering.total_bytes([m]) == 1310
    closed = metering.closed(50000, traffic(10), kernel)
    assert closed == m.traffic
    assert metering.total_bytes([]) == 1310  # the rate does not drop when an allocation closes
    assert metering.by_user([])["alice"].bytes == 1310


def test_users_beyond_the_top_are_summed_as_other() -> None:
    kernel, metering = KernelMeters(), Metering()
    allocations = [info(50000 + i, f"user{i}", traffic(100 * (i + 1))) for i in range(5)]
    users = metering.by_user(metering.allocations(allocations, kernel), top=3)
    assert list(users) == ["user4", "user3", "user2", OTHER_USERS]
    assert users[OTHER_USERS].bytes == 100 + 200
    assert sum(t.bytes for t in users.values()) == sum(100 * (i + 1) for i in range(5))
    assert OTHER_USERS not in metering.by_user(metering.allocations(allocations, kernel), top=5)


def test_rest_credentials_count_for_the_id_after_the_expiry() -> None:
    assert user_of("1700000000:alice") == "alice"
    assert user_of("1700000000:team:bob") == "team:bob"
    assert user_of("alice") == "alice"
    assert user_of("room:7") == "room:7"  # not a REST username: the head is no expiry
    kernel, metering = KernelMeters(), Metering()
    allocations = [
        info(50000, "1700000000:carol", traffic(5)),
        info(50001, "1700000600:carol", traffic(7)),
    ]
    assert {
        u: t.bytes for u, t in metering.by_user(metering.allocations(allocations, kernel)).items()
    } == {"carol": 12}


def test_a_supervisor_adds_up_the_workers_closed_allocations() -> None:
    kernel, workers = KernelMeters(), [Metering(), Metering()]
    for port, metering in zip((50000, 50001), workers, strict=True):
        metering.opened(port, "1700000000:dave", kernel)
        metering.closed(port, traffic(100 + port - 50000), kernel)
    pool = Metering()
    for metering in workers:
        pool.add_closed(*metering.closed_totals())
    assert pool.by_user([])["dave"].bytes == 201
    assert pool.total_bytes([]) == 201
