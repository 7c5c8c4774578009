"""Smoke test of `xdpturn-lab bench --quick`: one command yields the table, the JSON and the chart
for each relay, with traffic delivered in every workload. Never asserts speed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

TIMEOUT = 300  # seconds; --quick takes well under a minute with three relays


def test_quick_bench_writes_json_chart_and_table(tmp_path: Path, blast: Path) -> None:
    relays = ["xdp", "python"] + (["coturn"] if shutil.which("turnserver") else [])
    argv = [sys.executable, "-m", "xdpturn_lab", "bench", "--quick", "--only", ",".join(relays)]
    proc = subprocess.run(
        [*argv, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("*.json")
    (png_path,) = tmp_path.glob("*.png")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(json_path.read_text())
    for key in ("machine", "settings", "placement", "cpu_accounting", "generator", "relays"):
        assert key in result
    assert {"cpu_model", "cores", "kernel", "memory_mib"} <= result["machine"].keys()
    assert all(c["delivered"] > 0 for c in result["generator"]["ceiling"])
    assert set(result["relays"]) == set(relays)
    for name, relay in result["relays"].items():
        assert relay["errors"] == [], (name, relay["errors"])
        runs = {r["direction"]: r for r in relay["throughput"]}
        assert {"cd->udp", "udp->cd", "hairpin"} <= runs.keys(), name
        for r in relay["throughput"]:
            assert r["delivered"] > 0, (name, r["name"])
            assert r["cpu_s_per_Mpkt"] is not None
        assert relay["latency"]["received"] > 0, name
        assert relay["latency"]["rtt_us"]["p50"] > 0, name
        assert relay["control_plane"]["succeeded"] > 0, name
        assert relay["control_plane"]["rss_bytes"] > 0, name
    if "coturn" in relays:
        assert {"xdp/coturn", "python/coturn"} <= result["ratios"].keys()
    assert "delivered kpps" in proc.stdout and "RTT p99" in proc.stdout


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("203.0.113.10", 40000), ("203.0.113.2", 3478)),
        (("2001:db8:1:2::2", 9000), ("2001:db8::2", 20001)),
    ],
)
def test_live_frame_headers_and_checksums(src: tuple[str, int], dst: tuple[str, int]) -> None:
    """The generator's frame is what a NIC would deliver: addresses, lengths, and complete IP and
    UDP checksums (the relay's XDP program updates them incrementally)."""
    import ipaddress
    import struct

    from xdpturn_lab.bench import livegen

    data = livegen.payload(100, channel=0x4001)
    assert data[:4] == b"\x40\x01\x00\x64" and len(data) == 104
    frame = livegen.udp_frame("02:00:00:00:00:01", "02:00:00:00:00:02", src, dst, data)
    assert frame[:12] == bytes.fromhex("020000000002020000000001")
    v4 = ipaddress.ip_address(src[0]).version == 4
    ip_len = 20 if v4 else 40
    ip, udp = frame[14 : 14 + ip_len], frame[14 + ip_len :]
    s, d = ipaddress.ip_address(src[0]).packed, ipaddress.ip_address(dst[0]).packed
    if v4:
        assert struct.unpack("!H", frame[12:14])[0] == 0x0800
        assert livegen._csum(ip) == 0 and ip[12:16] == s and ip[16:20] == d
        pseudo = s + d + struct.pack("!BBH", 0, 17, len(udp))
    else:
        assert struct.unpack("!H", frame[12:14])[0] == 0x86DD
        assert ip[8:24] == s and ip[24:40] == d
        pseudo = s + d + struct.pack("!IxxxB", len(udp), 17)
    assert struct.unpack("!HHH", udp[:6]) == (src[1], dst[1], 8 + len(data))
    assert livegen._csum(pseudo + udp) == 0
    assert udp[8:] == data
