"""Bounded fuzzing in CI: each atheris harness runs for a fixed time from the kept corpus, in a
subprocess, and hypothesis drives the same server invariants. Longer runs: docs/security.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.invariants import ServerUnderFuzz, step
from tests.fuzz.seeds import server_seeds
from xdpturn.proto.stats import Route

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).parent / "corpus"
SECONDS = 15


@pytest.mark.parametrize("target", ["codec", "server"])
def test_atheris_finds_nothing_in_a_bounded_run(target: str, tmp_path: Path) -> None:
    # New inputs go to tmp_path (the first directory); the kept corpus is only read.
    found = tmp_path / "corpus"
    found.mkdir()
    argv = [
        sys.executable,
        "-m",
        f"tests.fuzz.fuzz_{target}",
        str(found),
        str(CORPUS / target),
        f"-max_total_time={SECONDS}",
        "-timeout=10",  # one input this slow is a finding (a loop stalled that long)
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
    ]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    runs = re.search(r"stat::number_of_executed_units: (\d+)", output)
    assert runs is not None, output[-2000:]
    assert int(runs.group(1)) >= 100, output[-2000:]  # it did run, from the seeds onwards
    assert not list(tmp_path.glob("crash-*")), output[-4000:]


def test_the_seed_session_reaches_relaying() -> None:
    # The harness signs requests, so fuzzing starts from allocations, channels and relaying.
    fuzz = ServerUnderFuzz()
    fuzz.run(server_seeds()[0])
    stats = fuzz.server.stats
    assert stats.relayed[Route.CLIENT_TO_PEER].packets == 2
    assert stats.relayed[Route.PEER_TO_CLIENT].packets == 1
    assert len(fuzz.server.allocations()) == 1


@settings(max_examples=200, deadline=None)
@given(
    seed=st.sampled_from(server_seeds()),
    steps=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=120)), max_size=12),
)
def test_server_invariants_hold_for_any_script(seed: bytes, steps: list[tuple[int, bytes]]) -> None:
    ServerUnderFuzz().run(seed + b"".join(step(op, payload) for op, payload in steps))
