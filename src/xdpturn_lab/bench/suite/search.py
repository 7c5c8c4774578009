"""The no-drop / partial-drop rate search (RFC 2544 throughput, as TRex's NDR bench and FD.io
CSIT's MLRsearch do it), independent of what a trial is.

A trial offers a rate for a while and reports what was sent and what arrived. The search looks,
for each loss ratio goal (NDR: at most 0.1 %, PDR: at most 1 %), for the highest offered rate
whose trial stays within it:

1. one trial at the highest rate asked for (the generator's ceiling): a relay that carries it
   within the goal is measured no further (the load, not the relay, is the limit);
2. otherwise the next rate is just below what arrived in the failing trial (a relay in overload
   forwards about its capacity), then geometric bisection between the highest passing and the
   lowest failing rate, until the two are within `precision` of each other or the trial budget
   is spent;
3. `confirm` trials at each goal's final rate (longer ones), reported as min / median / max.

Bounds use the rate the generator actually offered (it may fall short of the one asked for), so
a relay is only ever judged at rates it was really offered.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

NDR_LOSS = 0.001  # RFC 2544 asks for zero; 0.1 % is CSIT's and TRex's no-drop tolerance
PDR_LOSS = 0.01
GOALS = {"ndr": NDR_LOSS, "pdr": PDR_LOSS}
FLOOR_PPS = 1000.0  # below this a relay is broken, not slow: stop searching


@dataclass(frozen=True)
class Trial:
    """One bounded run at one offered rate. `extra` carries whatever else the trial measured
    (CPU, counters) into the JSON."""

    requested_pps: float | None  # None: as fast as the generator goes
    duration_s: float
    sent: int
    delivered: int
    elapsed_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def offered_pps(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def delivered_pps(self) -> float:
        return self.delivered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def loss(self) -> float:
        """1 - delivered / sent; negative (more arrived than sent) is reported as is."""
        return 1.0 - self.delivered / self.sent if self.sent else 1.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        d.update(offered_pps=self.offered_pps, delivered_pps=self.delivered_pps, loss=self.loss)
        return d


RunTrial = Callable[[float | None, float], Trial]  # (rate or None for max, seconds) -> Trial


@dataclass(frozen=True)
class SearchSettings:
    trial_s: float  # each search trial
    confirm_s: float  # each confirming trial
    confirm: int  # confirming trials per goal
    max_trials: int  # search trials (the confirming ones come on top)
    precision: float  # stop bisecting when hi / lo - 1 is below this


@dataclass
class Bounds:
    lo: float | None = None  # highest offered rate within the goal
    hi: float | None = None  # lowest offered rate beyond it
    hi_delivered: float = 0.0  # what arrived in that failing trial

    def done(self, precision: float) -> bool:
        if self.hi is None:  # passed at the top: nothing above to look for
            return True
        if self.lo is None:
            return False
        return self.hi <= self.lo * (1 + precision)


def _spread(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


@dataclass
class GoalResult:
    goal: str  # "ndr" or "pdr"
    max_loss: float
    rate_pps: float | None  # the rate the confirming trials were asked for; None: not found
    confirms: list[Trial]
    reason: str | None = None  # why no rate was found (rate_pps None)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "goal": self.goal,
            "max_loss": self.max_loss,
            "rate_pps": self.rate_pps,
            "confirms": [t.to_json() for t in self.confirms],
        }
        if self.reason is not None:
            d["reason"] = self.reason
        if self.confirms:
            d["offered_pps"] = _spread([t.offered_pps for t in self.confirms])
            d["delivered_pps"] = _spread([t.delivered_pps for t in self.confirms])
            d["loss"] = _spread([t.loss for t in self.confirms])
            d["within_goal"] = sum(1 for t in self.confirms if t.loss <= self.max_loss)
        return d


@dataclass
class SearchResult:
    top_pps: float | None  # the highest rate asked for (None: as fast as the generator goes)
    trials: list[Trial]
    goals: dict[str, GoalResult]
    load_limited: bool  # the top rate passed the NDR goal: the generator, not the relay, limits

    def to_json(self) -> dict[str, Any]:
        return {
            "top_pps": self.top_pps,
            "load_limited": self.load_limited,
            "search_trials": [t.to_json() for t in self.trials],
            **{k: g.to_json() for k, g in self.goals.items()},
        }


def _update(bounds: dict[str, Bounds], t: Trial) -> None:
    rate = t.offered_pps
    for name, b in bounds.items():
        if t.loss <= GOALS[name]:
            # A pass above a failure (noise) leaves lo >= hi: `done`, and lo is the answer.
            b.lo = rate if b.lo is None else max(b.lo, rate)
        elif b.hi is None or rate < b.hi:
            b.hi, b.hi_delivered = rate, t.delivered_pps


def next_rate(bounds: dict[str, Bounds], precision: float) -> float | None:
    """The rate of the next search trial, or None when every goal is settled. PDR first: a
    trial beyond the PDR goal is beyond the NDR goal too, so it bounds both."""
    for name in ("pdr", "ndr"):
        b = bounds[name]
        if b.done(precision):
            continue
        assert b.hi is not None
        if b.lo is None:
            # Just below what the failing trial delivered, and at least 25 % below its rate (a
            # loss that is not overload, e.g. other load, then still leaves a few trials).
            guess = min(b.hi_delivered * (1 - GOALS[name]) * 0.98, b.hi * 0.75)
            if guess < FLOOR_PPS:
                return None
            return guess
        return math.sqrt(b.lo * b.hi)
    return None


def no_rate_reason(goal: str, trials: list[Trial], budget_spent: bool) -> str:
    """Why no trial met `goal`, in the numbers a reader needs to judge it."""
    lowest = min(trials, key=lambda t: t.offered_pps)
    least = min(trials, key=lambda t: t.loss)
    stop = (
        f"all {len(trials)} search trials spent"
        if budget_spent
        else f"the next rate would have been below {FLOOR_PPS:,.0f} pps"
    )
    text = (
        f"no search trial within {100 * GOALS[goal]:g} % loss ({stop}); at the lowest offered "
        f"rate, {lowest.offered_pps:,.0f} pps, {100 * lowest.loss:.2f} % was lost; the least "
        f"loss was {100 * least.loss:.2f} % at {least.offered_pps:,.0f} pps"
    )
    carried = max(trials, key=lambda t: t.delivered_pps)
    if carried.delivered_pps >= lowest.offered_pps:
        # Overload sheds only what exceeds what the relay can carry, and it carried more.
        text += (
            f", although {carried.delivered_pps:,.0f} pps arrived in another trial: more loss "
            "than overload explains (other load on the machine, or a broken path)"
        )
    return text


def search(run: RunTrial, top_pps: float | None, settings: SearchSettings) -> SearchResult:
    trials = [run(top_pps, settings.trial_s)]
    bounds = {name: Bounds() for name in GOALS}
    _update(bounds, trials[0])
    load_limited = trials[0].loss <= NDR_LOSS
    while len(trials) < settings.max_trials:
        rate = next_rate(bounds, settings.precision)
        if rate is None:
            break
        t = run(rate, settings.trial_s)
        trials.append(t)
        _update(bounds, t)
    goals: dict[str, GoalResult] = {}
    confirmed: dict[float | None, list[Trial]] = {}
    budget_spent = len(trials) >= settings.max_trials
    for name, max_loss in GOALS.items():
        b = bounds[name]
        if b.lo is None:
            reason = no_rate_reason(name, trials, budget_spent)
            goals[name] = GoalResult(name, max_loss, None, [], reason)
            continue
        # At the top: ask for the top again (as fast as it goes), not for what it happened to
        # reach, so the confirming trials see the same load.
        final: float | None = top_pps if b.hi is None else b.lo
        if final not in confirmed:
            confirmed[final] = [run(final, settings.confirm_s) for _ in range(settings.confirm)]
        goals[name] = GoalResult(name, max_loss, final, confirmed[final])
    return SearchResult(top_pps, trials, goals, load_limited)
