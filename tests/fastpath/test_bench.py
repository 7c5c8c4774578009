"""Smoke run of the per-route cost benchmark (numbers are not asserted)."""

from __future__ import annotations

import pytest

from xdpturn_lab.bench import bpf_cost


@pytest.mark.kernel
def test_bpf_cost_measures_all_routes(capsys: pytest.CaptureFixture[str]) -> None:
    assert bpf_cost.main(["--runs", "3", "--meter", "all"]) == 0
    table = capsys.readouterr().out
    assert all(f"meter {mode}" in table for mode in bpf_cost.METER_MODES)
    by_mode = bpf_cost.run(runs=3, meters=bpf_cost.METER_MODES)
    for costs in by_mode.values():
        assert len(costs) == 12
        # The limit admits everything: every mode relays every route.
        assert all(c.verdict in ("TX", "REDIRECT") for c in costs), costs
        assert all(c.route in table for c in costs)
