"""`xdpturn-lab demo`: runs end to end as root, refuses cleanly otherwise."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import unavailable
from xdpturn_lab import demo
from xdpturn_lab.cli import main
from xdpturn_lab.demo import PREFIX, DemoError, Options, check_prerequisites

DEMO_TIMEOUT = 120.0  # seconds: 3 s of traffic, plus testbed and relay start and teardown
HAIRPIN_ROUTES = (
    "ipv4_channel_to_ipv4_channel",
    "ipv6_channel_to_ipv6_channel",
    "ipv4_channel_to_ipv6_channel",
    "ipv6_channel_to_ipv4_channel",
)
# veth can reorder across CPUs (see tests/e2e/helpers.py); loss must be none on an idle testbed.
MAX_REORDERED_PER_10K = 10

_ROUTE_ROW = re.compile(r"^\s+(xdp|python)\s+(\w+)\s+([\d,]+)\s+([\d,]+)\s+[\d.]+%$")
_PAIR_ROW = re.compile(r"^\s+(\w+)\s+(\w+ -> \w+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$")


def _number(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.mark.kernel
def test_demo_relays_on_hairpin_routes_and_leaves_nothing() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "xdpturn_lab", "demo", "--seconds", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=DEMO_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"{out}\n{err}"

    routes = {
        (m[1], m[2]): _number(m[3]) for line in out.splitlines() if (m := _ROUTE_ROW.match(line))
    }
    for route in HAIRPIN_ROUTES:
        assert routes.get(("xdp", route), 0) > 0, f"{route} carried nothing:\n{out}"
    pairs = [m for line in out.splitlines() if (m := _PAIR_ROW.match(line))]
    assert len(pairs) == 2 * len(demo.PAIRS), out
    total_sent = 0
    for m in pairs:
        sent, delivered, lost, reordered = (_number(m[i]) for i in (3, 4, 5, 6))
        assert sent > 0 and delivered == sent and lost == 0, f"{m[0]}\n{out}"
        assert reordered * 10_000 <= MAX_REORDERED_PER_10K * sent, m[0]
        total_sent += sent
    # Every datagram took the fast path exactly once (one hairpin route each), none the Python
    # path: the split is all-xdp, not merely "some xdp".
    by_path = {
        path: sum(n for (p, _), n in routes.items() if p == path) for path in ("xdp", "python")
    }
    assert by_path == {"xdp": total_sent, "python": 0}, out
    assert "status: ip netns exec " in out
    assert "torn down: 6 of 6 namespaces removed" in out
    left = [n for n in os.listdir("/run/netns") if n.startswith(f"{PREFIX}-{proc.pid}-")]
    assert left == []


def test_demo_without_root_says_so_and_exits_1() -> None:
    argv = [sys.executable, "-m", "xdpturn_lab", "demo", "--seconds", "1"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            unavailable("setpriv (util-linux) is needed to drop root")
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, env=env, cwd=Path(__file__).parent
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xdpturn-lab demo: needs root"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_without_the_bpf_object_tells_to_run_the_setup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import xdpturn.fastpath.xdp as xdp

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    monkeypatch.setattr(xdp, "OBJECT_PATH", tmp_path / "xdpturn.bpf.o")
    with pytest.raises(DemoError, match=r"not built; run scripts/setup\.sh"):
        check_prerequisites(Options(seconds=1, fastpath=True, rate=1))
    check_prerequisites(Options(seconds=1, fastpath=False, rate=1))  # Python needs no object


def test_demo_refuses_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--rate", "0"]) == 2
    assert "xdpturn-lab demo: --rate: expected a whole number" in capsys.readouterr().err
    assert main(["demo", "--seconds", "99999"]) == 2
    assert "xdpturn-lab demo: --seconds: at most" in capsys.readouterr().err
