"""Decision thresholds a line can use: the rule, and what it is expected to cost.

A rule (``score.threshold_rule``) is one of

* ``f1`` -- the F1-optimal threshold over held-out normals vs. held-out defects;
* ``fpr:<x>`` -- flag at most the fraction ``x`` of the held-out normals (``fpr:0.01``: one
  false alarm in a hundred good parts), whatever the defects;
* ``recall:<x>`` -- the highest threshold that still catches the fraction ``x`` of the
  held-out defects (``recall:0.95``), whatever the false alarms.

Every choice comes with the false-alarm rate and recall it gives on the held-out images it was
chosen on, and how many images each rests on (:class:`ThresholdChoice`): with 20 held-out
normals a 1 % false-alarm target cannot be told from 0 %, and the numbers say so. Rule:
``is_anomaly = score > threshold``. No torch, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from prn_ray import metrics

RULES = ("f1", "fpr", "recall")


class ThresholdRuleError(ValueError):
    """A threshold rule that cannot be read."""


def parse_rule(text: str) -> tuple[str, float | None]:
    """``"f1"`` -> (``f1``, None); ``"fpr:0.01"`` -> (``fpr``, 0.01); ``"recall:0.9"``."""
    kind, _, arg = str(text).strip().partition(":")
    kind = kind.strip().lower()
    if kind not in RULES:
        raise ThresholdRuleError(f"threshold rule {text!r}: use f1, fpr:<fraction> or "
                                 "recall:<fraction>")
    if kind == "f1":
        if arg:
            raise ThresholdRuleError(f"threshold rule {text!r}: f1 takes no value")
        return kind, None
    try:
        target = float(arg)
    except ValueError:
        raise ThresholdRuleError(f"threshold rule {text!r}: {kind} needs a fraction, e.g. "
                                 f"{kind}:{0.01 if kind == 'fpr' else 0.95}") from None
    if not 0.0 <= target <= 1.0 or (kind == "recall" and target == 0.0):
        raise ThresholdRuleError(f"threshold rule {text!r}: the fraction must be in "
                                 f"{'[0, 1]' if kind == 'fpr' else '(0, 1]'}")
    return kind, target


@dataclass(frozen=True)
class ThresholdChoice:
    rule: str  # as given, e.g. "fpr:0.01"
    threshold: float
    expected_fpr: float  # held-out normals above the threshold (nan without normals)
    expected_recall: float  # held-out defects above it (nan without defects)
    n_normal: int  # the images each figure rests on
    n_anomalous: int
    f1: float | None = None  # only for the f1 rule


def threshold_at_recall(anomalous_scores: np.ndarray, recall: float) -> float:
    """Largest ``t`` with ``mean(anomalous_scores > t) >= recall``: just below the score of
    the weakest defect that must still be caught."""
    s = np.sort(np.asarray(anomalous_scores, np.float64).ravel())
    if s.size == 0:
        raise ValueError("threshold_at_recall needs at least one defect score")
    need = int(math.ceil(recall * s.size - 1e-9))  # defects that must score above t
    return float(np.nextafter(s[s.size - max(need, 1)], -np.inf))


def choose(normal_scores, anomalous_scores, rule: str) -> ThresholdChoice:
    """The threshold ``rule`` picks on held-out scores, with its expected false-alarm rate and
    recall. ``f1`` and ``recall`` without defects fall back to ``fpr:0.01`` -- said in the
    returned rule --, as there is nothing else to weigh."""
    normals = np.asarray(normal_scores, np.float64).ravel()
    defects = np.asarray(anomalous_scores, np.float64).ravel()
    kind, target = parse_rule(rule)
    f1 = None
    if kind != "fpr" and defects.size == 0:
        kind, target, rule = "fpr", 0.01, f"fpr:0.01 (no held-out defects for {rule})"
    if kind == "fpr":
        if normals.size == 0:
            raise ValueError("a false-alarm target needs held-out normal scores")
        t = metrics.threshold_at_fpr(normals, float(target))
    elif kind == "recall":
        t = threshold_at_recall(defects, float(target))
    else:
        labels = np.r_[np.zeros(normals.size, bool), np.ones(defects.size, bool)]
        t, f1 = metrics.f1_optimal_threshold(labels, np.r_[normals, defects])
        t, f1 = float(t), float(f1)
    return ThresholdChoice(
        rule=str(rule), threshold=float(t),
        expected_fpr=float((normals > t).mean()) if normals.size else math.nan,
        expected_recall=float((defects > t).mean()) if defects.size else math.nan,
        n_normal=int(normals.size), n_anomalous=int(defects.size), f1=f1)


def effective_rule(cfg) -> str:
    """The rule a config asks for: ``score.threshold_rule``, or, when that is unset, the older
    ``train.calibration`` spelling (``f1``; ``fpr`` with ``train.calibration_target_fpr``)."""
    if cfg.score.threshold_rule:
        return str(cfg.score.threshold_rule)
    if cfg.train.calibration == "fpr":
        return f"fpr:{cfg.train.calibration_target_fpr:g}"
    return "f1"


def own_rule(calibration: dict) -> str | None:
    """The rule a calibration was made with (``threshold_rule``; older ones: ``rule``)."""
    return calibration.get("threshold_rule", calibration.get("rule"))


def threshold_for(calibration: dict, rule: str | None) -> float:
    """A registered model's threshold under ``rule``: the calibrated one when the rule is the
    one it was calibrated with (or none is asked), else re-derived from the held-out scores the
    calibration kept. A model calibrated before those were kept cannot change rule."""
    if rule and rule != own_rule(calibration) and not calibration.get("held_out_scores"):
        raise ThresholdRuleError(f"this model was calibrated without its held-out scores: "
                                 f"retrain it to use threshold rule {rule!r}")
    return float(under_rule(calibration, rule)["threshold"])


def under_rule(calibration: dict, rule: str | None) -> dict:
    """The calibration as a run under ``rule`` uses it: its threshold, rule and held-out
    false-alarm rate and recall re-derived from the held-out scores (the calibration itself
    when the rule is its own, or when it kept no scores: :func:`threshold_for` refuses those)."""
    if not rule or rule == own_rule(calibration):
        return calibration
    held = calibration.get("held_out_scores")
    if not held:
        return calibration
    c = choose(held["normal"], held["anomalous"], rule)
    return {**calibration, "threshold": c.threshold, "threshold_rule": c.rule,
            "rule": parse_rule(c.rule.split(" ")[0])[0], "val_fpr": c.expected_fpr,
            "val_tpr": c.expected_recall, "n_normal": c.n_normal, "n_recall": c.n_anomalous,
            "calibrated_rule": own_rule(calibration)}


def held_out_counts(calibration: dict) -> tuple[int | None, int | None]:
    """(held-out normals, held-out defects) a calibration's false-alarm rate and recall rest
    on (calibrations before ``n_recall`` was kept: its real defects, else every anomaly)."""
    n_recall = calibration.get("n_recall")
    if n_recall is None:
        n_recall = calibration.get("n_real_anomalous") or calibration.get("n_anomalous")
    return calibration.get("n_normal"), n_recall
