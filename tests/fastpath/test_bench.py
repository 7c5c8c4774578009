"""Smoke run of the per-route cost benchmark (numbers are not asserted)."""

from __future__ import annotations

import pytest

from xdpturn_lab.bench import bpf_cost


@pytest.mark.kernel
def test_bpf_cost_measures_all_routes(capsys: pytest.CaptureFixture[str]) -> None:
    assert bpf_cost.main(["--runs", "3"]) == 0
    table = capsys.readouterr().out
    costs = bpf_cost.run(runs=3)
    assert len(costs) == 12
    assert all(c.verdict in ("TX", "REDIRECT") for c in costs), costs
    assert all(c.route in table for c in costs)
