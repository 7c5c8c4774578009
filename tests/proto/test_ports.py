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
