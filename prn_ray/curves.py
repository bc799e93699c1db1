"""The engine of :mod:`prn_ray.metrics`: one descending sort of the scores, walked in chunks,
with ROC / AP / PRO areas accumulated on the fly (float64), so memory does not grow with the
number of thresholds. The definitions are in :mod:`prn_ray.metrics`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator

import numpy as np


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given data (one class only, no region, ...); nan returned."""


def undefined(msg: str) -> float:
    warnings.warn(msg, UndefinedMetricWarning, stacklevel=3)
    return math.nan


# ---------------------------------------------------------------------------------------------
# core: one descending sort, walked in chunks; points at the end of every tie group

CHUNK = 1 << 18  # sorted items per step of the walk (bounds the temporaries)


class Curve:
    """Curve points after distinct thresholds, descending, cumulative (no (0, 0) point)."""

    __slots__ = ("thresholds", "tp", "fp", "pro")

    def __init__(
        self, thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, pro: np.ndarray | None
    ) -> None:
        self.thresholds = thresholds  # float64, strictly decreasing
        self.tp = tp  # int64: positives with score >= threshold
        self.fp = fp  # int64: negatives with score >= threshold
        self.pro = pro  # float64: PRO of score >= threshold, or None


def walk(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> Iterator[Curve]:
    """Sort ``scores`` once (descending) and yield the curve points chunk by chunk.

    ``labels``: bool (positive) or int region ids (0 = normal, r > 0 = region r).
    ``weights[r]``: PRO weight of one pixel of region r, i.e. 1 / (size_r * n_regions), index 0
    = 0. Beyond the sort permutation only O(chunk) temporaries are allocated.
    """
    s, lab = scores.ravel(), labels.ravel()
    n, chunk = s.size, CHUNK
    order = np.argsort(s)[::-1]
    tp0, w0 = 0, 0.0
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        idx = order[a:b]
        sc = s[idx]
        is_end = np.empty(b - a, dtype=bool)
        np.not_equal(sc[:-1], sc[1:], out=is_end[:-1])
        is_end[-1] = b == n or sc[-1] != s[order[b]]
        ends = np.flatnonzero(is_end)
        li = lab[idx]
        tp = np.cumsum(li > 0, dtype=np.int64)
        tp += tp0
        tp0 = int(tp[-1])
        pro = None
        if weights is not None:
            w = weights[li]
            np.cumsum(w, out=w)
            w += w0
            w0 = float(w[-1])
            pro = w[ends]
        tp = tp[ends]
        yield Curve(sc[ends].astype(np.float64), tp, a + 1 + ends - tp, pro)


class Integrals:
    """AUROC, AP and the PRO area up to ``fpr_limit``, accumulated over a stream of points."""

    def __init__(self, n_pos: int, n_neg: int, fpr_limit: float = 1.0) -> None:
        self.n_pos, self.n_neg, self.limit = n_pos, n_neg, fpr_limit
        self.tp, self.fp, self.pro = 0, 0, 0.0  # last point; the curves start at (0, 0)
        self.auc2 = self.ap_sum = self.pro_area = 0.0
        self.pro_open = True

    def add(self, c: Curve) -> None:
        if c.tp.size == 0:
            return
        tp = np.concatenate(([self.tp], c.tp)).astype(np.float64)
        fp = np.concatenate(([self.fp], c.fp)).astype(np.float64)
        self.auc2 += float(np.dot(np.diff(fp), tp[1:] + tp[:-1]))  # 2 x trapezoid, in counts
        self.ap_sum += float(np.dot(np.diff(tp), tp[1:] / (tp[1:] + fp[1:])))
        if c.pro is not None and self.pro_open and self.n_neg:
            x, y = fp / self.n_neg, np.concatenate(([self.pro], c.pro))
            k = int(np.searchsorted(x, self.limit, side="right"))  # x[0] <= limit while open
            self.pro_area += float(np.trapezoid(y[:k], x[:k]))
            if k < x.size:  # crosses the limit: add the piece up to it, interpolated
                self.pro_open = False
                x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
                if x0 < self.limit:
                    y_lim = y0 + (y1 - y0) * (self.limit - x0) / (x1 - x0)
                    self.pro_area += (self.limit - x0) * (y0 + y_lim) / 2
            self.pro = float(c.pro[-1])
        self.tp, self.fp = int(c.tp[-1]), int(c.fp[-1])

    def auroc(self, what: str) -> float:
        if self.n_pos == 0 or self.n_neg == 0:
            return undefined(f"{what}: only one class present; AUROC is undefined (nan)")
        return self.auc2 / (2.0 * self.n_pos * self.n_neg)

    def ap(self, what: str) -> float:
        if self.n_pos == 0:
            return undefined(f"{what}: no positive present; AP is undefined (nan)")
        return self.ap_sum / self.n_pos

    def aupro(self, n_regions: int) -> float:
        if n_regions == 0:
            return undefined("aupro: no anomalous pixel (no GT region); AUPRO is undefined (nan)")
        if self.n_neg == 0:
            return undefined("aupro: no GT-normal pixel, FPR is undefined; AUPRO is nan")
        return self.pro_area / self.limit


def integrate(
    points: Iterable[Curve], n_pos: int, n_neg: int, fpr_limit: float = 1.0
) -> Integrals:
    it = Integrals(n_pos, n_neg, fpr_limit)
    for c in points:
        it.add(c)
    return it


def collect(points: Iterable[Curve]) -> Curve:
    parts = list(points)
    pro = None if not parts or parts[0].pro is None else np.concatenate([p.pro for p in parts])

    def cat(name: str, dtype) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts]) if parts else np.zeros(0, dtype)

    return Curve(cat("thresholds", np.float64), cat("tp", np.int64), cat("fp", np.int64), pro)


def counts(labels: np.ndarray) -> tuple[int, int]:
    n_pos = int(np.count_nonzero(labels))
    return n_pos, labels.size - n_pos


def roc_points(c: Curve, n_pos: int, n_neg: int) -> tuple[np.ndarray, ...]:
    return (
        np.concatenate(([0.0], c.fp / n_neg)),
        np.concatenate(([0.0], c.tp / n_pos)),
        np.concatenate(([np.inf], c.thresholds)),
    )


def pro_points(c: Curve, n_neg: int, fpr_limit: float | None) -> tuple[np.ndarray, ...]:
    assert c.pro is not None
    x = np.concatenate(([0.0], c.fp / n_neg))
    y = np.concatenate(([0.0], c.pro))
    t = np.concatenate(([np.inf], c.thresholds))
    if fpr_limit is None:
        return x, y, t
    # points with x <= limit plus, if needed, y interpolated at x = limit (threshold nan)
    k = int(np.searchsorted(x, fpr_limit, side="right"))
    xs, ys, ts = x[:k], y[:k], t[:k]
    if k < x.size and xs[-1] < fpr_limit:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        xs, ys, ts = np.append(xs, fpr_limit), np.append(ys, y_lim), np.append(ts, np.nan)
    return xs, ys, ts


def check_limit(fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return float(fpr_limit)


def region_weights(sizes: np.ndarray) -> np.ndarray:
    w = np.zeros(sizes.size + 1, dtype=np.float64)
    if sizes.size:
        w[1:] = 1.0 / (sizes.astype(np.float64) * sizes.size)
    return w


def decimate(max_points: int | None, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    n = arrays[0].size
    if max_points is None or n <= max_points:
        return arrays
    idx = np.unique(np.linspace(0, n - 1, max(int(max_points), 2)).round().astype(np.int64))
    return tuple(a[idx] for a in arrays)
