"""The guard's maps (bpf/guard.h): the kernel's view of allocations and permissions, and the STUN
rate limits. XdpFastPath owns one `Guard` and forwards the server's calls.

What the kernel drops depends on these views being complete: a failed update of guard_clients
turns the unknown-client drop off for good (flag XDPTURN_GUARD_CLIENTS_COMPLETE cleared), so a
client whose entry is missing is never cut off. A permission that cannot be recorded takes its
allocation port out of the guard (guard_ports at 0: nothing is dropped there) until the last
allocation on that port closes; one that cannot be removed only admits a peer Python refuses.
"""

from __future__ import annotations

import logging
from collections import Counter

from xdpturn.fastpath import libbpf as bpf
from xdpturn.fastpath import maps
from xdpturn.fastpath.api import GuardConfig
from xdpturn.proto.addr import ClientAddr, ClientFlow, IPAddress, Transport

log = logging.getLogger("xdpturn.fastpath")

_ZERO = b"\x00" * 4
_PRESENT = b"\x01"


class Guard:
    def __init__(self, obj: bpf.BpfObject, config: GuardConfig) -> None:
        self.config_map = obj.map("guard_config")
        self.clients = obj.map("guard_clients")
        self.ports = obj.map("guard_ports")
        self.permissions = obj.map("guard_permissions")
        self._config = maps.GuardConfig()
        self._port_allocations: dict[int, int] = {}
        self._unguarded_ports: set[int] = set()
        self._clients: set[ClientFlow] = set()
        self._permitted: set[bytes] = set()  # guard_permissions keys this process wrote
        # Flows per client address: two listeners may see the same address, and its entry stays
        # while one has it. Counted, not searched for: closing 10,000 allocations at shutdown
        # by scanning _clients took 28 s.
        self._flows_per_address: Counter[ClientAddr] = Counter()
        self._clients_complete = True  # False for good once a client could not be recorded
        self.configure(config)

    def configure(self, config: GuardConfig) -> None:
        """Apply `config` (at start, or later: the maps are kept)."""
        self._config = maps.guard_config(
            config.enabled, config.stun_rate_per_source, config.stun_rate_total
        )
        if not self._clients_complete:
            self._config.flags &= ~maps.GUARD_CLIENTS_COMPLETE
        self._write_config()
        log.info(
            "fast path guard: %s, STUN rate per source %s/s, total %s/s",
            "on" if config.enabled else "off",
            config.stun_rate_per_source or "unlimited",
            config.stun_rate_total or "unlimited",
        )

    def _write_config(self) -> None:
        self.config_map.update(_ZERO, bytes(self._config))

    def allocation_opened(self, flow: ClientFlow, relay_port: int) -> None:
        self._port_use(relay_port, +1)
        if flow.transport is not Transport.UDP or flow in self._clients:
            return
        try:
            self.clients.update(bytes(maps.client_key(flow.client)), _PRESENT)
        except OSError as e:
            self._clients_incomplete(e)
            return
        self._clients.add(flow)
        self._flows_per_address[flow.client] += 1

    def allocation_closed(self, flow: ClientFlow, relay_port: int) -> None:
        self._port_use(relay_port, -1)
        if flow not in self._clients:
            return
        self._clients.discard(flow)
        left = self._flows_per_address[flow.client] - 1
        if left:
            self._flows_per_address[flow.client] = left
            return
        del self._flows_per_address[flow.client]
        self._delete(self.clients, bytes(maps.client_key(flow.client)))

    def permit(self, relay_port: int, peer: IPAddress) -> None:
        key = bytes(maps.permission_key(relay_port, peer))
        try:
            self.permissions.update(key, _PRESENT)
            self._permitted.add(key)
        except OSError as e:
            log.warning(
                "fast path guard: permission for %s on port %d not recorded (%s); peers of "
                "that port go to Python unchecked",
                peer,
                relay_port,
                e,
            )
            self._unguarded_ports.add(relay_port)
            self._port_use(relay_port, 0)

    def unpermit(self, relay_port: int, peer: IPAddress) -> None:
        key = bytes(maps.permission_key(relay_port, peer))
        self._permitted.discard(key)
        self._delete(self.permissions, key)

    def client_keys(self) -> frozenset[bytes]:
        """The guard_clients keys of this process's allocations."""
        return frozenset(bytes(maps.client_key(f.client)) for f in self._clients)

    @property
    def permitted(self) -> set[bytes]:
        """The guard_permissions keys this process wrote."""
        return self._permitted

    def settle(
        self,
        old_ports: list[int],
        clients: frozenset[bytes],
        permissions: frozenset[bytes],
        allocation_ports: frozenset[int],
    ) -> int:
        """After adopting a previous process's maps, once the restored cores have announced
        their allocations and permissions again (the client keys, permission keys and ports of
        every process sharing the maps): remove the rest (those that lapsed while no process
        ran). `old_ports` are the ports the previous process used. Returns how many went."""
        stale = 0
        for m, keys in ((self.clients, clients), (self.permissions, permissions)):
            present = list(m.keys())
            for key in present:
                if key not in keys:
                    stale += m.delete(key)
        for port in old_ports:
            if port not in allocation_ports:
                self.ports.update(port.to_bytes(4, "little"), _ZERO)
                stale += 1
        return stale

    @property
    def allocation_ports(self) -> set[int]:
        return set(self._port_allocations)

    @property
    def clients_complete(self) -> bool:
        return self._clients_complete

    def _clients_incomplete(self, error: OSError) -> None:
        if not self._clients_complete:
            return
        self._clients_complete = False
        log.warning(
            "fast path guard: a client could not be recorded (%s); ChannelData from unknown "
            "clients now goes to Python instead of being dropped",
            error,
        )
        self._config.flags &= ~maps.GUARD_CLIENTS_COMPLETE
        self._write_config()

    def _port_use(self, port: int, delta: int) -> None:
        count = max(0, self._port_allocations.get(port, 0) + delta)
        if count:
            self._port_allocations[port] = count
        else:
            self._port_allocations.pop(port, None)
            self._unguarded_ports.discard(port)
        guarded = 0 if port in self._unguarded_ports else count
        self.ports.update(port.to_bytes(4, "little"), guarded.to_bytes(4, "little"))

    @staticmethod
    def _delete(m: bpf.Map, key: bytes) -> None:
        try:
            m.delete(key)
        except OSError as e:
            log.warning("fast path guard: delete from %s failed: %s", m.name, e)
