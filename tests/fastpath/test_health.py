"""CarryingCheck: whether the kernel carries bound channels, from two looks at the counters."""

from __future__ import annotations

import logging

import pytest

from xdpturn.fastpath import FastPathCounters
from xdpturn.fastpath.health import CarryingCheck


def counters(relayed: int = 0, **passes: int) -> FastPathCounters:
    return FastPathCounters(
        routes={"ipv4_channel_to_ipv4_udp": (relayed, 100 * relayed)}, passes=passes
    )


def test_failing_for_every_packet_is_a_problem_logged_once_with_the_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    check = CarryingCheck(min_evidence=20)
    assert check.update(counters(), routes=1) is None
    assert check.update(counters(no_next_hop=19), routes=1) is None  # not enough to judge
    with caplog.at_level(logging.WARNING, "xdpturn.fastpath"):
        problem = check.update(counters(no_next_hop=25), routes=1)
        assert problem is not None and "25 packets" in problem and "no_next_hop" in problem
        assert check.update(counters(no_next_hop=60), routes=1) is not None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "ip route get" in warnings[0]
    # The kernel relays again: carrying.
    assert check.update(counters(relayed=5, no_next_hop=61), routes=1) is None


def test_a_few_failures_among_relayed_packets_are_fine() -> None:
    check = CarryingCheck(min_evidence=20)
    check.update(counters(), routes=1)
    assert check.update(counters(relayed=1000, no_next_hop=50), routes=1) is None


def test_no_config_is_a_problem_at_once_and_no_routes_is_none() -> None:
    check = CarryingCheck(min_evidence=20)
    check.update(counters(), routes=1)
    problem = check.update(counters(no_config=1), routes=1)
    assert problem is not None and "no_config" in problem
    assert check.update(counters(no_config=500), routes=0) is None  # nothing to carry
