"""The NDR/PDR rate search against modelled relays, the accounting and the report built on it,
and the one-benchmark-per-machine lock: no network, so all of it can be exact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xdpturn_lab.bench.suite import report, search, system
from xdpturn_lab.bench.suite.search import SearchSettings, Trial

SETTINGS = SearchSettings(trial_s=1.0, confirm_s=2.0, confirm=3, max_trials=12, precision=0.02)


class Relay:
    """Carries everything up to `capacity` pps and drops the excess; the generator offers at
    most `generator` pps. Records every trial's (requested rate, seconds)."""

    def __init__(self, capacity: float, generator: float = 1e6, base_loss: float = 0.0) -> None:
        self.capacity = capacity
        self.generator = generator
        self.base_loss = base_loss
        self.calls: list[tuple[float | None, float]] = []

    def __call__(self, rate: float | None, seconds: float) -> Trial:
        self.calls.append((rate, seconds))
        offered = min(self.generator, rate if rate is not None else self.generator)
        sent = int(offered * seconds)
        carried = min(offered, self.capacity) * (1 - self.base_loss)
        return Trial(rate, seconds, sent, int(carried * seconds), seconds)


def test_ndr_of_a_relay_that_drops_above_its_capacity() -> None:
    relay = Relay(capacity=80_000)
    result = search.search(relay, 600_000, SETTINGS)
    assert not result.load_limited
    ndr = result.goals["ndr"]
    pdr = result.goals["pdr"]
    assert ndr.rate_pps is not None and pdr.rate_pps is not None
    # Within the precision below capacity, never above (it would lose more than 0.1 %).
    assert 80_000 * (1 - 0.02) <= ndr.rate_pps <= 80_000 * (1 + search.NDR_LOSS)
    assert ndr.rate_pps <= pdr.rate_pps <= 80_000 * (1 + search.PDR_LOSS) / (1 - search.PDR_LOSS)
    assert [t.duration_s for t in ndr.confirms] == [2.0, 2.0, 2.0]
    assert all(t.loss <= search.NDR_LOSS for t in ndr.confirms)
    assert len(result.trials) <= SETTINGS.max_trials
    assert relay.calls[0] == (600_000, 1.0)  # first at the top


def test_a_relay_that_carries_the_top_rate_is_load_limited() -> None:
    relay = Relay(capacity=2e6, generator=450_000)
    result = search.search(relay, None, SETTINGS)
    assert result.load_limited
    assert len(result.trials) == 1
    # Confirmed at the top again ("as fast as it goes"), once for both goals.
    assert relay.calls[1:] == [(None, 2.0)] * 3
    assert result.goals["ndr"].confirms is result.goals["pdr"].confirms
    js = result.to_json()
    assert js["ndr"]["within_goal"] == 3 and js["ndr"]["delivered_pps"]["median"] == 450_000


def test_pdr_above_ndr_with_steady_background_loss() -> None:
    """0.5 % loss at any rate: no NDR at all, PDR up to capacity."""
    relay = Relay(capacity=50_000, base_loss=0.005)
    result = search.search(relay, 400_000, SETTINGS)
    assert result.goals["ndr"].rate_pps is None and result.goals["ndr"].confirms == []
    pdr = result.goals["pdr"].rate_pps
    assert pdr is not None and 50_000 * 0.97 <= pdr <= 50_000 * 1.01
    # The JSON and the table say why, with the numbers: loss that stays put is not overload.
    reason = result.to_json()["ndr"]["reason"]
    assert reason.startswith("no search trial within 0.1 % loss (all 12 search trials spent)")
    assert "0.50 % was lost" in reason and "more loss than overload explains" in reason
    assert "reason" not in result.to_json()["pdr"]


def test_a_dead_relay_stops_the_search_below_the_floor() -> None:
    relay = Relay(capacity=0.0)
    result = search.search(relay, 400_000, SETTINGS)
    assert result.goals["ndr"].rate_pps is None and result.goals["pdr"].rate_pps is None
    assert len(relay.calls) == 1
    reason = result.goals["ndr"].reason
    assert reason is not None and "the next rate would have been below 1,000 pps" in reason
    assert "100.00 % was lost" in reason and "overload explains" not in reason


def _trial_json(
    delivered: int, busy_s: float, return_s: float, own_s: float = 0.0
) -> dict[str, object]:
    t = Trial(
        1000.0,
        1.0,
        delivered,
        delivered,
        1.0,
        {
            "cpu": {
                "wall_s": 1.2,
                "relay_core_busy_s": busy_s,
                "relay_core_softirq_s": 0.0,
                "relay_process_s": own_s / 2,
                "relay_napi_s": own_s / 2,
                "return_napi_s": return_s,
                "machine_busy_s": 0.0,
            }
        },
    )
    return t.to_json()


@pytest.mark.parametrize(("busy_s", "limit"), [(0.9, "relay"), (0.3, "load")])
def test_cost_per_packet_subtracts_background_and_names_the_limit(
    busy_s: float, limit: str
) -> None:
    confirms = [_trial_json(100_000, busy_s, 0.05) for _ in range(3)]
    w: dict[str, object] = {"load_limited": False, "ndr": {"confirms": confirms}}
    report.derive_workload(w, background=0.05)  # 0.05 * 1.2 s of other load on the core
    cost = w["cost_at_ndr"]
    assert isinstance(cost, dict)
    expected = 1e6 * (busy_s - 0.06) / 100_000
    assert cost["relay_us_per_pkt"]["median"] == pytest.approx(expected)
    assert cost["next_hop_us_per_pkt"]["median"] == pytest.approx(0.5)
    assert w["limit"] == limit
    if limit == "load":
        assert w["projected_pps_one_core"] == pytest.approx(1e6 / expected)
    else:
        assert w["projected_pps_one_core"] is None


@pytest.mark.parametrize(("busy_s", "own_s"), [(0.9, 0.85), (0.05, 0.0)])
def test_a_cost_swallowed_by_the_background_is_no_measurement(busy_s: float, own_s: float) -> None:
    """0.3 * 1.2 s subtracted from a core whose relay tasks alone used more than what is left
    (or from a core less busy than that): no cost at all, and the reason, never 0."""
    confirms = [_trial_json(100_000, 0.9, 0.05, own_s=0.85)] * 2
    confirms.append(_trial_json(100_000, busy_s, 0.05, own_s=own_s))
    w: dict[str, object] = {"load_limited": False, "name": "cd->udp", "ndr": {"confirms": confirms}}
    report.derive_workload(w, background=0.3)
    assert w["cost_at_ndr"] == {}
    assert isinstance(w["cost_invalid"], str) and "changed during the run" in w["cost_invalid"]
    assert w["projected_pps_one_core"] is None


def test_a_workload_without_ndr_has_no_cost_and_says_why() -> None:
    w: dict[str, object] = {"load_limited": False, "ndr": {"confirms": [], "reason": "lossy"}}
    report.derive_workload(w, background=0.0)
    assert w["cost_at_ndr"] == {} and w["cost_invalid"] == "no NDR: lossy"
    assert w["limit"] is None


@pytest.mark.parametrize(
    ("driver_s", "relay_s", "core", "pace"),
    [
        (0.3, 0.95, 1.0, "relay"),
        (0.95, 0.5, 0.5, "driver"),
        (0.95, 0.85, 0.9, "relay"),
        (0.2, 0.3, 0.35, "round trips"),
        (0.2, 0.3, 0.95, "other load"),
    ],
)
def test_control_plane_pace_names_what_was_busy(
    driver_s: float, relay_s: float, core: float, pace: str
) -> None:
    cp = {"elapsed_s": 2.0, "driver_cpu_s": 2 * driver_s, "relay_cpu_s": 2 * relay_s}
    busy = {"driver_busy": driver_s, "relay_busy": relay_s, "relay_core_busy": core}
    assert report.control_limit({**cp, **busy}) == pace


def test_readme_table_is_replaced_between_the_markers_only() -> None:
    result = {
        "provenance": {"commit": "0123456789abcdef", "dirty": True},
        "machine": {"cpu_model": "CPU", "cores": 2, "kernel": "6.18"},
        "command": ["xdpturn-lab", "bench"],
        "settings": {"search": {"confirm": 3}, "ping_rate": 5000},
        "relays": {"coturn": {"background_relay_core_busy": 0.5}},
    }
    readme = f"before\n{report.README_BEGIN}\nold table\n{report.README_END}\nafter\n"
    new = report.rewrite_readme(readme, result, "bench/results/x.json")
    assert new.startswith(f"before\n{report.README_BEGIN}\nFrom `bench/results/x.json`")
    assert new.endswith(f"\n{report.README_END}\nafter\n") and "old table" not in new
    assert "`0123456789ab`" in new and "tree dirty" in new and "Not a measurement" in new
    with pytest.raises(ValueError, match="markers"):
        report.rewrite_readme("no markers here\n", result, "x.json")


def test_a_second_benchmark_waits_for_the_first_then_gives_up(tmp_path: Path) -> None:
    """Two benchmarks on one machine measure each other: the second waits (bounded), says so,
    and names the holder; once the first is done, the lock is free again."""
    lock = tmp_path / "bench.lock"
    said: list[str] = []
    with system.machine_lock(1.0, said.append, lock) as waited:
        assert waited < 0.5 and lock.read_text() == f"pid {os.getpid()}"
        with pytest.raises(system.MachineBusy), system.machine_lock(0.3, said.append, lock):
            pytest.fail("acquired a lock that is held")
    assert len(said) == 1 and f"pid {os.getpid()}" in said[0]
    with system.machine_lock(0.0, said.append, lock) as waited:
        assert waited < 0.5
    assert lock.read_text() == "" and len(said) == 1
