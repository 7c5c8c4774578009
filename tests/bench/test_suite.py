"""Smoke test of `xdpturn bench --quick`: one command yields the table, the JSON and the chart for
each relay, with traffic delivered in every workload. Never asserts speed."""

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
    argv = [sys.executable, "-m", "xdpturn", "bench", "--quick", "--only", ",".join(relays)]
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
