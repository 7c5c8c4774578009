"""Interface counters inside a namespace, for benchmarks and tests."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class LinkCounters:
    rx_packets: int
    rx_bytes: int
    rx_dropped: int
    tx_packets: int
    tx_bytes: int
    tx_dropped: int

    def __sub__(self, earlier: LinkCounters) -> LinkCounters:
        """Counters accumulated since `earlier` (`after - before`)."""
        return LinkCounters(
            self.rx_packets - earlier.rx_packets,
            self.rx_bytes - earlier.rx_bytes,
            self.rx_dropped - earlier.rx_dropped,
            self.tx_packets - earlier.tx_packets,
            self.tx_bytes - earlier.tx_bytes,
            self.tx_dropped - earlier.tx_dropped,
        )


def link_counters(netns_name: str, ifname: str) -> LinkCounters:
    """rtnetlink stats64 of `ifname` (what `ip -s link` shows; on veth they include XDP frames)."""
    out = subprocess.run(
        ["ip", "-j", "-s", "-n", netns_name, "link", "show", "dev", ifname],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stats: dict[str, Any] = json.loads(out)[0]["stats64"]
    rx, tx = stats["rx"], stats["tx"]
    return LinkCounters(
        int(rx["packets"]),
        int(rx["bytes"]),
        int(rx["dropped"]),
        int(tx["packets"]),
        int(tx["bytes"]),
        int(tx["dropped"]),
    )


def ethtool_stats(netns_name: str, ifname: str) -> dict[str, int]:
    """Driver counters (`ethtool -S`); on veth they tell XDP_TX successes from errors."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns_name, "ethtool", "-S", ifname],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, int] = {}
    for line in out.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and value.strip().lstrip("-").isdigit():
            result[key.strip()] = int(value)
    return result
