"""The study budget's split into trial budgets (prn_ray.study_budget), against a
from-definition simulation of successive halving, and its refusal of budgets too small."""

from __future__ import annotations

import numpy as np
import pytest

from prn_ray.config import TuneConfig
from prn_ray.study_budget import MIN_TRIAL_S, StudyBudget, asha_fraction


def halving_mean(n: int, eta: int, rungs: int, rng: np.random.Generator) -> float:
    """Mean training of ``n`` trials (as a fraction of a full one) when, at each of the rungs
    1/eta^rungs, ..., 1/eta, only the best 1/eta of the trials that reached it go on."""
    marks = [eta ** -(rungs - j) for j in range(rungs)] + [1.0]
    quality = rng.random(n)  # a trial's rank is the same at every rung
    alive = np.arange(n)
    trained = np.zeros(n)
    for j, mark in enumerate(marks):
        trained[alive] = mark
        if j < rungs:
            keep = max(1, len(alive) // eta)
            alive = alive[np.argsort(-quality[alive])[:keep]]
    return float(trained.mean())


@pytest.mark.parametrize(("eta", "rungs"), [(2, 1), (2, 2), (3, 2), (3, 3), (4, 1)])
def test_fraction_is_what_successive_halving_trains(eta, rungs):
    n = eta ** rungs * 7  # every rung keeps exactly 1/eta
    got = halving_mean(n, eta, rungs, np.random.default_rng(eta * 10 + rungs))
    assert asha_fraction(eta, rungs) == pytest.approx(got, rel=1e-12)


def test_half_for_two_rungs_of_two():
    assert asha_fraction(2, 2) == pytest.approx(0.5)


def test_the_study_adds_up_to_its_budget():
    b = StudyBudget.of(3600, samples=8, concurrency=2, reduction_factor=3, rungs=2, start_s=45)
    # n/c waves of (start + F * T) fill the budget exactly.
    assert b.waves * (b.start_s + b.fraction * b.trial_s) == pytest.approx(3600)
    # The first rung is the trial's start plus 1/eta^rungs of its training; max_t lies past
    # the end of a full trial, so ASHA never stops one for running to its end.
    assert b.grace_s == pytest.approx(45 + b.trial_s / 9)
    assert b.max_t > b.start_s + b.trial_s
    more = StudyBudget.of(3600, samples=8, concurrency=4, reduction_factor=3, rungs=2,
                          start_s=45)
    assert more.trial_s > b.trial_s  # more concurrency: longer trials


def test_too_small_a_budget_says_how_much_is_needed():
    with pytest.raises(ValueError, match=r"give at least (\d+)s") as err:
        StudyBudget.of(300, samples=8, concurrency=1, reduction_factor=2, rungs=2, start_s=60)
    need = float(err.value.args[0].split("give at least ")[1].split("s")[0])
    ok = StudyBudget.of(need + 1, samples=8, concurrency=1, reduction_factor=2, rungs=2,
                        start_s=60)
    assert ok.trial_s >= MIN_TRIAL_S


def test_from_config():
    assert StudyBudget.from_config(TuneConfig(), 8, 1) is None
    b = StudyBudget.from_config(TuneConfig(budget_s=7200, rungs=3, reduction_factor=2,
                                           trial_start_s=30), 4, 1)
    assert (b.study_s, b.samples, b.rungs, b.start_s) == (7200, 4, 3, 30)
