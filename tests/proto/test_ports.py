"""The core's choice of allocation ports: each port of the range once, from a random start."""

from __future__ import annotations

import random

from xdpturn.proto.addr import Family
from xdpturn.proto.ports import PortChooser, PortRange

V4 = frozenset({Family.IPV4})


def test_every_port_is_handed_out_once_then_none_until_one_is_released() -> None:
    chooser = PortChooser(PortRange(50000, 50009), random.Random(3))
    got = [chooser.acquire(V4) for _ in range(10)]
    assert sorted(p for p in got if p is not None) == list(range(50000, 50010))
    assert chooser.acquire(V4) is None
    chooser.release(50004)
    assert chooser.acquire(V4) == 50004


def test_the_first_port_depends_on_the_random_source() -> None:
    firsts = {
        PortChooser(PortRange(50000, 59999), random.Random(seed)).acquire(V4) for seed in range(5)
    }
    assert len(firsts) == 5


def test_a_pair_takes_both_its_ports_and_each_is_released_on_its_own() -> None:
    chooser = PortChooser(PortRange(21001, 21006), random.Random(3))
    assert {chooser.acquire(V4, pair=True), chooser.acquire(V4, pair=True)} == {21002, 21004}
    assert chooser.acquire(V4, pair=True) is None  # 21006's N + 1 is outside the range
    assert chooser.acquire(V4, even=True) == 21006
    assert chooser.acquire(V4) == 21001
    assert chooser.acquire(V4) is None  # the pairs' odd ports were taken with them
    chooser.release(21005)  # the reservation expired
    assert chooser.acquire(V4, pair=True) is None  # 21004 is still the RTP allocation's
    assert chooser.acquire(V4) == 21005


def test_even_asks_for_an_even_port_and_none_when_only_odd_ones_are_left() -> None:
    chooser = PortChooser(PortRange(21001, 21004), random.Random(5))
    assert {chooser.acquire(V4, even=True), chooser.acquire(V4, even=True)} == {21002, 21004}
    assert chooser.acquire(V4, even=True) is None
    assert chooser.acquire(V4, pair=True) is None
    assert {chooser.acquire(V4), chooser.acquire(V4)} == {21001, 21003}
