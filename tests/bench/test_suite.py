"""`xdpturn-lab bench --quick` end to end: one command yields the table, the JSON (with its
provenance) and the chart for each relay; every workload's rate search finds a rate the relay
carries (or says why not); the fast path's traffic is counted by the XDP program's routes; the
generator's frames are what a NIC would deliver (checked by scapy, not by the code that built
them). Never asserts speed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import unavailable
from xdpturn_lab.bench.suite import report, search
from xdpturn_lab.bench.suite.run import LOCK_WAIT_S

# Seconds; --quick takes about two minutes with three relays on an idle machine, after waiting
# for any other benchmark on the machine to finish (LOCK_WAIT_S).
TIMEOUT = 600 + LOCK_WAIT_S
# The route of the XDP program each workload of --quick must take.
XDP_ROUTES = {
    "cd->udp ipv4 100B": "ipv4_channel_to_ipv4_udp",
    "udp->cd ipv4 100B": "ipv4_udp_to_ipv4_channel",
    "hairpin ipv4 100B": "ipv4_channel_to_ipv4_channel",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, blast: Path) -> tuple[dict[str, Any], str]:
    for tool in ("turnserver", "turnutils_uclient", "turnutils_peer"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} (Debian's coturn package) is needed for the coturn column")
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    argv = [sys.executable, "-m", "xdpturn_lab", "bench", "--quick", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run to the same file is refused before it measures anything.
    again = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "never overwritten" in again.stderr
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.kernel
def test_quick_bench_records_provenance_and_prints_the_table(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    result, stdout = quick_run
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    assert result["provenance"]["commit"] == git.stdout.strip()
    assert isinstance(result["provenance"]["dirty"], bool)
    assert {"cpu_model", "cores", "kernel", "memory_mib"} <= result["machine"].keys()
    assert result["command"][-3:] == ["--quick", "--out", result["files"]["json"]]
    assert result["settings"]["search"]["confirm"] >= 3
    assert set(result["relays"]) == {"xdp", "python", "coturn"}
    assert {"xdp/coturn", "python/coturn"} <= result["ratios"].keys()
    assert "NDR kpps" in stdout and "RTT p99.9 us" in stdout and "relay CPU us/op" in stdout
    assert "driver/relay/core busy%" in stdout and "pace set by" in stdout


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["xdp", "python", "coturn"])
def test_every_workload_has_a_confirmed_rate_within_the_loss_goals(
    quick_run: tuple[dict[str, Any], str], name: str
) -> None:
    relay = quick_run[0]["relays"][name]
    assert relay["errors"] == [], relay["errors"]
    assert {w["name"] for w in relay["throughput"]} == set(XDP_ROUTES)
    for w in relay["throughput"]:
        ndr, pdr = w["ndr"], w["pdr"]
        if ndr["rate_pps"] is None:
            # No rate met the goal: the search must say why (e.g. loss that is not overload,
            # which on a shared machine is other load); a silent gap would fail here.
            assert ndr.get("reason"), f"{name} {w['name']}: no NDR and no reason"
            continue
        assert ndr["rate_pps"] >= search.FLOOR_PPS, w["name"]
        assert len(ndr["confirms"]) == 3 and len(pdr["confirms"]) == 3
        assert ndr["delivered_pps"]["min"] > 0
        # Whether the confirming trials met the 0.1 % / 1 % goals is the benchmark's finding,
        # reported with min/median/max, not a CI assertion: it swings with what else the machine
        # runs (seen: 3-37 % lost at a searched rate). The tight loss bound is on the latency
        # runs below, at a rate every relay carries.
        for goal in (ndr, pdr):
            assert {"min", "median", "max"} <= goal["loss"].keys(), goal
        # A cost is either measured (never 0) or marked invalid with the reason, never printed 0.
        if "cost_invalid" in w:
            assert w["cost_invalid"], f"{name} {w['name']}: cost marked invalid without a reason"
        else:
            assert w["cost_at_ndr"]["relay_us_per_pkt"]["min"] > 0
        assert w["limit"] in ("relay", "load")
    runs = relay["latency_runs"]
    assert len(runs) == 3
    for run in runs:
        assert run["lost"] <= run["sent"] // 100, run  # a rate every relay carries
        assert 0 < run["rtt_us"]["p50"] <= run["rtt_us"]["p99"] <= run["rtt_us"]["p999"]
    cp = relay["control_plane"]
    # coturn once answered a retransmitted authenticated Allocate with 437 (1 of 500): its
    # column may lose that much; xdpturn's may not.
    allowed_failures = cp["attempted"] // 100 if name == "coturn" else 0
    assert cp["attempted"] - cp["succeeded"] <= allowed_failures, cp["errors"]
    assert cp["relay_cpu_s"] > 0
    # The driver had headroom: the relay, or the round trips, set the pace, never the driver.
    assert report.control_limit(cp) != "driver", f"{name}: the driver set the pace: {cp}"


@pytest.mark.kernel
def test_xdp_routes_counted_what_the_sink_received(quick_run: tuple[dict[str, Any], str]) -> None:
    """Every datagram the sink counted went through the XDP program's route for its workload,
    and nothing took another route: the fast path, not the kernel's stack or Python, relayed."""
    for w in quick_run[0]["relays"]["xdp"]["throughput"]:
        moved = w["fastpath_routes"]
        route = XDP_ROUTES[w["name"]]
        sent, delivered = w["totals"]["sent"], w["totals"]["delivered"]
        assert set(moved) == {route}, (w["name"], moved)
        # Forwarded by the program: at least what arrived, at most what was sent; what the
        # program forwarded and the sink missed was lost on the way back, and is bounded.
        assert delivered <= moved[route] <= sent, (w["name"], moved, sent, delivered)
        assert moved[route] - delivered <= sent - delivered
        # What reached the relay's interface, the program relayed and the sink counted: loss at
        # any rate is the rings' (the links' counters say where), never the program's.
        for t in w["search_trials"]:
            lost_inside = t["lost_at"]["in_or_after_relay"]
            assert lost_inside <= max(2, t["sent"] // 1000), (w["name"], t["lost_at"], t["sent"])


@pytest.mark.kernel
def test_uclient_runs_against_every_relay(quick_run: tuple[dict[str, Any], str]) -> None:
    relays = quick_run[0]["relays"]
    for name, relay in relays.items():
        modes = {u["mode"]: u for u in relay["uclient"]}
        assert set(modes) == {"default", "-c"}, name
        c = modes["-c"]
        assert c["error"] is None, (name, c)
        assert c["figures"]["sent"] == 10 * quick_run[0]["settings"]["uclient_messages"]
        assert c["figures"]["lost_percent"] <= 1.0, (name, c["figures"])
    # coturn serves the default mode (RTP/RTCP pairs); xdpturn's result is reported either way.
    assert relays["coturn"]["uclient"][0]["error"] is None


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("203.0.113.10", 40000), ("203.0.113.2", 3478)),
        (("2001:db8:1:2::2", 9000), ("2001:db8::2", 20001)),
    ],
)
def test_live_frames_parse_with_valid_checksums_in_scapy(
    src: tuple[str, int], dst: tuple[str, int]
) -> None:
    """scapy decodes the generator's frame and, recomputing the IP and UDP checksums itself,
    arrives at the same values: a NIC would deliver this frame as is."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    from xdpturn_lab.bench import livegen

    data = livegen.payload(100, channel=0x4001)
    frame = livegen.udp_frame("02:00:00:00:00:01", "02:00:00:00:00:02", src, dst, data)
    pkt = Ether(frame)
    assert (pkt.src, pkt.dst) == ("02:00:00:00:00:01", "02:00:00:00:00:02")
    ip_layer = IP if ":" not in src[0] else IPv6
    ip = pkt[ip_layer]
    assert (ip.src, ip.dst) == (src[0], dst[0])
    udp = pkt[UDP]
    assert (udp.sport, udp.dport, udp.len) == (src[1], dst[1], 8 + len(data))
    assert bytes(udp.payload) == data and data[:4] == bytes.fromhex("40010064")
    stripped = pkt.copy()
    del stripped[UDP].chksum
    if ip_layer is IP:
        del stripped[IP].chksum
        assert Ether(bytes(stripped))[IP].chksum == ip.chksum
        assert ip.len == 20 + 8 + len(data)
    else:
        assert ip.plen == 8 + len(data)
    assert Ether(bytes(stripped))[UDP].chksum == udp.chksum != 0


@pytest.mark.parametrize(("rate", "burst"), [(1_000, 1), (40_000, 10), (256_000, 64), (2e6, 64)])
def test_paced_generator_bursts_no_more_than_a_smooth_source_would(rate: float, burst: int) -> None:
    """A paced call's frames leave back to back: at most 0.25 ms of the rate (fixed 64-frame
    calls overflowed coturn's 64 KiB relay socket even at 1,000 pps), at most one kernel batch."""
    from xdpturn_lab.bench import livegen

    assert livegen.pace_burst(rate) == burst
