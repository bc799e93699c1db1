"""How long each trial of a tuning study may train so that the study fits a wall-clock budget.

ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020) with
reduction factor η and ``r`` rungs lets a trial past a rung only if it is among the best 1/η
of the trials that reached it. With the rungs at T/η^r, T/η^(r-1), …, T/η of a full trial's
T seconds of training, an average trial trains

    F·T,   F = m_0 + Σ_{j<r} η^-(j+1) (m_{j+1} − m_j),   m_j = η^-(r-j),  m_r = 1

(η = 2, r = 2: F = 1/4 + 1/2·1/4 + 1/4·1/2 = 1/2), so ``n`` trials, ``c`` at a time, take about
``n/c · (start + F·T)``, where ``start`` is a trial's fixed cost (its trainer, the validation
features). :class:`StudyBudget` solves that for T. The rungs are in seconds of the trial's own
clock (Tune's ``time_total_s``), which includes ``start``: ASHA's first rung is
``start + T/η^r``, and each later one η times the one before.
"""

from __future__ import annotations

from dataclasses import dataclass

from prn_ray.config import TuneConfig

MIN_TRIAL_S = 60.0  # below this a trial ends before its first validation on 2 cores


def asha_fraction(reduction_factor: int, rungs: int) -> float:
    """F above: the share of a full trial's training an average trial gets under ASHA."""
    eta = float(reduction_factor)
    marks = [eta ** -(rungs - j) for j in range(rungs)] + [1.0]
    return marks[0] + sum(eta ** -(j + 1) * (marks[j + 1] - marks[j]) for j in range(rungs))


@dataclass(frozen=True)
class StudyBudget:
    """A study's wall-clock budget split into its trials' training budgets."""

    study_s: float  # the whole study of one product, start to summary
    samples: int
    concurrency: int
    reduction_factor: int
    rungs: int
    start_s: float  # a trial's fixed start before it trains

    @property
    def fraction(self) -> float:
        return asha_fraction(self.reduction_factor, self.rungs)

    @property
    def waves(self) -> float:
        """Trials one after another on one slot, on average."""
        return self.samples / max(1, self.concurrency)

    @property
    def trial_s(self) -> float:
        """``train.time_budget_s`` of every trial: the full trial's training."""
        return (self.study_s / self.waves - self.start_s) / self.fraction

    @property
    def grace_s(self) -> float:
        """ASHA's first rung on the trial's clock (``time_total_s``)."""
        return self.start_s + self.trial_s * self.reduction_factor ** -self.rungs

    @property
    def max_t(self) -> float:
        """ASHA's ``max_t``: past the end of a full trial (≈ start + T), so that ASHA never
        stops a trial for having run to its end; its trainer stops itself and cleans up."""
        return self.start_s + self.trial_s * self.reduction_factor

    @classmethod
    def of(cls, study_s: float, samples: int, concurrency: int, reduction_factor: int,
           rungs: int, start_s: float) -> StudyBudget:
        """The split, or ValueError (saying the smallest budget that works) when a full trial
        would get less than :data:`MIN_TRIAL_S`."""
        out = cls(float(study_s), int(samples), int(concurrency), int(reduction_factor),
                  int(rungs), float(start_s))
        if out.trial_s < MIN_TRIAL_S:
            need = out.waves * (start_s + out.fraction * MIN_TRIAL_S)
            raise ValueError(
                f"a study budget of {study_s:.0f}s leaves each of {samples} trial(s) "
                f"({concurrency} at a time) {max(out.trial_s, 0):.0f}s of training; give at "
                f"least {need:.0f}s, or fewer trials")
        return out

    @classmethod
    def from_config(cls, tune_cfg: TuneConfig, samples: int, concurrency: int
                    ) -> StudyBudget | None:
        """The split of ``tune.budget_s`` (None without a study budget)."""
        if tune_cfg.budget_s is None:
            return None
        return cls.of(tune_cfg.budget_s, samples, concurrency, tune_cfg.reduction_factor,
                      tune_cfg.rungs, tune_cfg.trial_start_s)

    def describe(self) -> str:
        return (f"study budget {self.study_s:.0f}s: each trial trains up to {self.trial_s:.0f}s "
                f"(ASHA on the trial's clock: first rung at {self.grace_s:.0f}s, reduction "
                f"{self.reduction_factor}, {self.rungs} rung(s); an average trial trains "
                f"{self.fraction:.0%} of that, after a {self.start_s:.0f}s start)")
