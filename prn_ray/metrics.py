"""Anomaly-detection metrics: image AUROC, pixel AUROC, pixel AP and AUPRO (spec §6).

All metrics are exact (every distinct score value is a threshold), tie-correct, and computed
from ONE descending sort of the scores with float64 accumulation. The sorted order is walked in
chunks and the areas are accumulated on the fly, so memory is O(pixels) (the sort permutation,
8 bytes/pixel, plus region ids) and does not grow with the number of thresholds; only the
``*_curve`` helpers materialise one point per threshold. scikit-learn is not used here (it is
the test oracle).

Definitions
-----------
*Binarisation.* Labels and masks are binarised with ``> 0`` (bool, {0,1}, {0,255} and integer
masks all work). Soft masks (e.g. bilinearly resized) are the caller's job: threshold them first
(``mask >= 0.5``); a floating mask holding values other than 0 and 1 raises ``ValueError``.
Maps may be any float dtype (numpy or torch); NaN scores raise ``ValueError``.

*ROC / AUROC* (``image_auroc``, ``pixel_auroc``, ``roc_curve``) follow
``sklearn.metrics.roc_curve`` / ``roc_auc_score``: an item is predicted anomalous iff
``score >= t`` for t running over the distinct scores in descending order, plus the (0, 0)
start; the AUC is the trapezoid area (tied positive/negative pairs count 1/2). Pixel AUROC pools
all pixels of all images.

*Pixel AP* follows ``sklearn.metrics.average_precision_score``:
``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds (no interpolation).

*AUPRO* follows the official MVTec AD / 3D-AD evaluation (``pro_curve_util.compute_pro`` +
``generic_util.trapezoid``) with exact instead of quantile thresholds, i.e. the single-sort
algorithm of anomalib >= 2.3 with the limit (not anomalib <= 2.2's averaged last FPR) as the
normaliser:

- ground-truth regions are the 8-connected components (3x3 structure) of each image's mask;
- FPR(t) = share of ALL GT-normal pixels of all images with score > t;
- PRO(t) = mean over ALL regions of the dataset of the share of the region's pixels with
  score > t (every region weighs the same, whatever its size);
- t runs over every distinct score (plus -inf), giving points from (0, 0) to (1, 1);
- AUPRO = trapezoid area of PRO over FPR in [0, fpr_limit], PRO linearly interpolated exactly at
  ``fpr_limit``, divided by ``fpr_limit`` (perfect map -> 1, inverted map -> 0, random map ->
  about fpr_limit / 2 = 0.15).

*Undefined cases* (one class only for (image/pixel) AUROC or AP; no region or no normal pixel
for AUPRO) return ``nan`` and emit :class:`UndefinedMetricWarning` rather than raise, so that a
per-category report can still be written; ``PixelMetricAccumulator.compute`` reports ``nan``
silently for a metric whose inputs were never given (e.g. no image scores).

*Streaming.* :class:`PixelMetricAccumulator` takes batches and keeps, in the exact default mode,
float32 scores plus int32 global region ids (8 bytes/pixel); ``merge`` combines per-worker
states. With ``bins=B`` it keeps three B-long histograms instead (constant memory): the result
is then exactly the metric of the scores quantised to B equal bins over ``score_range``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "UndefinedMetricWarning",
    "image_auroc",
    "pixel_auroc",
    "pixel_ap",
    "aupro",
    "roc_curve",
    "pro_curve",
    "label_regions",
    "f1_optimal_threshold",
    "threshold_at_fpr",
    "PixelMetricAccumulator",
]

# 8-connectivity inside each image, no connectivity across the batch axis.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given data (one class only, no region, ...); nan returned."""


# ---------------------------------------------------------------------------------------------
# input handling


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view/copy of a numpy array, torch tensor (any device/dtype) or sequence."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype.itemsize < 4:  # float16 / bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _binary(x: Any, what: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.dtype == bool:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if np.isnan(a).any() or not np.isin(a, (0.0, 1.0)).all():
            raise ValueError(
                f"{what} is a floating array with values other than 0 and 1 (a soft mask?); "
                "binarise it first, e.g. `mask >= 0.5`"
            )
    elif not (np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{what} must be bool, integer or {{0,1}} float, got {a.dtype}")
    return a > 0


def _scores(x: Any, what: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise TypeError(f"{what} must be numeric, got {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and np.isnan(a).any():
        raise ValueError(f"{what} contains NaN")
    return a


def _as_images(a: np.ndarray, what: str) -> np.ndarray:
    """(H, W), (N, H, W) or (N, 1, H, W) -> (N, H, W)."""
    if a.ndim == 2:
        return a[None]
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    if a.ndim == 3:
        return a
    raise ValueError(f"{what} must have shape (H, W), (N, H, W) or (N, 1, H, W), got {a.shape}")


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _as_images(_binary(masks, "masks"), "masks")
    s = _as_images(_scores(maps, "maps"), "maps")
    if m.shape != s.shape:
        raise ValueError(f"masks {m.shape} and maps {s.shape} differ in shape")
    return m, s


def _flat_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _binary(labels, "labels").ravel()
    s = _scores(scores, "scores").ravel()
    if y.size != s.size:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    return y, s


def _undefined(msg: str) -> float:
    warnings.warn(msg, UndefinedMetricWarning, stacklevel=3)
    return math.nan


def label_regions(masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """8-connected GT regions of each image, numbered globally.

    Returns ``(region_ids, sizes)``: int32 ids of the masks' shape as (N, H, W) (0 = normal,
    1..R = regions) and int64 ``sizes[r - 1]`` = pixel count of region r.
    """
    m = _as_images(_binary(masks, "masks"), "masks")
    ids = np.empty(m.shape, dtype=np.int32)
    n = ndimage.label(m, structure=_STRUCTURE_8, output=ids)
    sizes = np.bincount(ids[m], minlength=n + 1)[1:].astype(np.int64)  # anomalous px only
    return ids, sizes


# ---------------------------------------------------------------------------------------------
# core: one descending sort, walked in chunks; points at the end of every tie group

_CHUNK = 1 << 18  # sorted items per step of the walk (bounds the temporaries)


class _Curve:
    """Curve points after distinct thresholds, descending, cumulative (no (0, 0) point)."""

    __slots__ = ("thresholds", "tp", "fp", "pro")

    def __init__(
        self, thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, pro: np.ndarray | None
    ) -> None:
        self.thresholds = thresholds  # float64, strictly decreasing
        self.tp = tp  # int64: positives with score >= threshold
        self.fp = fp  # int64: negatives with score >= threshold
        self.pro = pro  # float64: PRO of score >= threshold, or None


def _walk(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> Iterator[_Curve]:
    """Sort ``scores`` once (descending) and yield the curve points chunk by chunk.

    ``labels``: bool (positive) or int region ids (0 = normal, r > 0 = region r).
    ``weights[r]``: PRO weight of one pixel of region r, i.e. 1 / (size_r * n_regions), index 0
    = 0. Beyond the sort permutation only O(chunk) temporaries are allocated.
    """
    s, lab = scores.ravel(), labels.ravel()
    n, chunk = s.size, _CHUNK
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
        yield _Curve(sc[ends].astype(np.float64), tp, a + 1 + ends - tp, pro)


class _Integrals:
    """AUROC, AP and the PRO area up to ``fpr_limit``, accumulated over a stream of points."""

    def __init__(self, n_pos: int, n_neg: int, fpr_limit: float = 1.0) -> None:
        self.n_pos, self.n_neg, self.limit = n_pos, n_neg, fpr_limit
        self.tp, self.fp, self.pro = 0, 0, 0.0  # last point; the curves start at (0, 0)
        self.auc2 = self.ap_sum = self.pro_area = 0.0
        self.pro_open = True

    def add(self, c: _Curve) -> None:
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
            return _undefined(f"{what}: only one class present; AUROC is undefined (nan)")
        return self.auc2 / (2.0 * self.n_pos * self.n_neg)

    def ap(self, what: str) -> float:
        if self.n_pos == 0:
            return _undefined(f"{what}: no positive present; AP is undefined (nan)")
        return self.ap_sum / self.n_pos

    def aupro(self, n_regions: int) -> float:
        if n_regions == 0:
            return _undefined("aupro: no anomalous pixel (no GT region); AUPRO is undefined (nan)")
        if self.n_neg == 0:
            return _undefined("aupro: no GT-normal pixel, FPR is undefined; AUPRO is nan")
        return self.pro_area / self.limit


def _integrate(
    points: Iterable[_Curve], n_pos: int, n_neg: int, fpr_limit: float = 1.0
) -> _Integrals:
    it = _Integrals(n_pos, n_neg, fpr_limit)
    for c in points:
        it.add(c)
    return it


def _collect(points: Iterable[_Curve]) -> _Curve:
    parts = list(points)
    pro = None if not parts or parts[0].pro is None else np.concatenate([p.pro for p in parts])
    cat = (lambda f, dt: np.concatenate([getattr(p, f) for p in parts]) if parts
           else np.zeros(0, dt))
    return _Curve(cat("thresholds", np.float64), cat("tp", np.int64), cat("fp", np.int64), pro)


def _counts(labels: np.ndarray) -> tuple[int, int]:
    n_pos = int(np.count_nonzero(labels))
    return n_pos, labels.size - n_pos


def _roc_points(c: _Curve, n_pos: int, n_neg: int) -> tuple[np.ndarray, ...]:
    return (
        np.concatenate(([0.0], c.fp / n_neg)),
        np.concatenate(([0.0], c.tp / n_pos)),
        np.concatenate(([np.inf], c.thresholds)),
    )


def _pro_points(c: _Curve, n_neg: int, fpr_limit: float | None) -> tuple[np.ndarray, ...]:
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


def _check_limit(fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return float(fpr_limit)


def _region_weights(sizes: np.ndarray) -> np.ndarray:
    w = np.zeros(sizes.size + 1, dtype=np.float64)
    if sizes.size:
        w[1:] = 1.0 / (sizes.astype(np.float64) * sizes.size)
    return w


def _decimate(max_points: int | None, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    n = arrays[0].size
    if max_points is None or n <= max_points:
        return arrays
    idx = np.unique(np.linspace(0, n - 1, max(int(max_points), 2)).round().astype(np.int64))
    return tuple(a[idx] for a in arrays)


# ---------------------------------------------------------------------------------------------
# one-shot public API


def image_auroc(labels: Any, scores: Any) -> float:
    """ROC-AUC of image scores vs. image labels (nan + warning with one class only)."""
    y, s = _flat_inputs(labels, scores)
    return _integrate(_walk(s, y), *_counts(y)).auroc("image_auroc")


def pixel_auroc(masks: Any, maps: Any) -> float:
    """ROC-AUC over all pixels of all images (flattened)."""
    m, s = _pixel_inputs(masks, maps)
    return _integrate(_walk(s, m), *_counts(m)).auroc("pixel_auroc")


def pixel_ap(masks: Any, maps: Any) -> float:
    """Average precision over all pixels, as ``sklearn.metrics.average_precision_score``."""
    m, s = _pixel_inputs(masks, maps)
    return _integrate(_walk(s, m), *_counts(m)).ap("pixel_ap")


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec definition, exact)."""
    fpr_limit = _check_limit(fpr_limit)
    m, s = _pixel_inputs(masks, maps)
    ids, sizes = label_regions(m)
    del m
    it = _integrate(_walk(s, ids, _region_weights(sizes)), *_counts(ids), fpr_limit)
    return it.aupro(sizes.size)


def roc_curve(
    labels: Any, scores: Any, max_points: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` at every distinct threshold (``score >= t``), starting at
    (0, 0) with ``thresholds[0] = inf`` like scikit-learn. Works for image labels/scores and for
    masks/maps (flattened). ``max_points`` evenly subsamples long curves for plotting."""
    y, s = _flat_inputs(labels, scores)
    n_pos, n_neg = _counts(y)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_curve needs both classes")
    points = _roc_points(_collect(_walk(s, y)), n_pos, n_neg)
    return _decimate(max_points, points)  # type: ignore[return-value]


def pro_curve(
    masks: Any, maps: Any, fpr_limit: float | None = None, max_points: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, pro, thresholds)`` of the PRO curve, from (0, 0, inf). With ``fpr_limit`` the curve
    stops at that FPR with an interpolated last point (its threshold is nan)."""
    limit = None if fpr_limit is None else _check_limit(fpr_limit)
    m, s = _pixel_inputs(masks, maps)
    ids, sizes = label_regions(m)
    n_pos, n_neg = _counts(ids)
    if sizes.size == 0 or n_neg == 0:
        raise ValueError("pro_curve needs at least one GT region and one normal pixel")
    c = _collect(_walk(s, ids, _region_weights(sizes)))
    return _decimate(max_points, _pro_points(c, n_neg, limit))  # type: ignore[return-value]


def f1_optimal_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """``(threshold, f1)`` maximising F1 of the rule ``anomalous iff score > threshold``.

    The threshold is the next lower observed score below the best cut, so the rule reproduces
    the best F1 exactly on these data (``nextafter(min, -inf)`` if everything is flagged).
    """
    y, s = _flat_inputs(labels, scores)
    n_pos, _ = _counts(y)
    if n_pos == 0:
        raise ValueError("f1_optimal_threshold needs at least one positive")
    c = _collect(_walk(s, y))
    f1 = 2.0 * c.tp / (c.tp + c.fp + n_pos)
    i = int(np.argmax(f1))
    if i + 1 < c.thresholds.size:
        thr = float(c.thresholds[i + 1])
    else:
        thr = float(np.nextafter(c.thresholds[-1], -np.inf))
    return thr, float(f1[i])


def threshold_at_fpr(normal_scores: Any, fpr: float) -> float:
    """Smallest observed normal score ``t`` with ``mean(normal_scores > t) <= fpr``.

    Rule: anomalous iff ``score > t``. ``fpr = 0`` gives the maximum normal score; ``fpr = 1``
    gives ``nextafter(min, -inf)``.
    """
    s = _scores(normal_scores, "normal_scores").ravel()
    if s.size == 0:
        raise ValueError("threshold_at_fpr needs at least one normal score")
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    s = np.sort(s)
    k = int(math.floor(fpr * s.size + 1e-9))  # allowed exceedances
    if k >= s.size:
        return float(np.nextafter(np.float64(s[0]), -np.inf))
    return float(s[s.size - 1 - k])


# ---------------------------------------------------------------------------------------------
# streaming accumulator


class PixelMetricAccumulator:
    """Streaming image AUROC, pixel AUROC, AUPRO and pixel AP over batches of images.

    ``bins=None`` (default) is exact and keeps ``score_dtype`` scores (float32: float64 maps are
    rounded, which may create ties; pass ``score_dtype=np.float64`` to keep them) plus int32
    global region ids, 8 bytes/pixel. ``bins=B`` keeps three B-long histograms over
    ``score_range`` (scores outside are clipped into the edge bins): constant memory, and the
    metrics equal the exact ones of the scores quantised to those bins. Image scores/labels are
    always kept exactly (one value per image). ``merge`` combines per-worker states.
    """

    def __init__(
        self,
        fpr_limit: float = 0.3,
        bins: int | None = None,
        score_range: tuple[float, float] = (0.0, 1.0),
        score_dtype: Any = np.float32,
    ) -> None:
        self.fpr_limit = _check_limit(fpr_limit)
        self.bins = None if bins is None else int(bins)
        if self.bins is not None and self.bins < 1:
            raise ValueError("bins must be >= 1")
        lo, hi = float(score_range[0]), float(score_range[1])
        if not hi > lo:
            raise ValueError(f"score_range must be increasing, got {score_range}")
        self.score_range = (lo, hi)
        self.score_dtype = np.dtype(score_dtype)
        self.n_regions = 0
        self._img_scores: list[np.ndarray] = []
        self._img_labels: list[np.ndarray] = []
        # exact state: per batch, flat scores, flat global region ids, region sizes
        self._scores: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []
        self._sizes: list[np.ndarray] = []
        # binned state: normal / anomalous pixel counts and sum of 1/size_r over region pixels
        nb = self.bins or 0
        self._h_neg = np.zeros(nb, dtype=np.int64)
        self._h_pos = np.zeros(nb, dtype=np.int64)
        self._h_inv = np.zeros(nb, dtype=np.float64)

    def _bin(self, s: np.ndarray) -> np.ndarray:
        assert self.bins is not None
        lo, hi = self.score_range
        b = np.floor((s.astype(np.float64) - lo) * (self.bins / (hi - lo)))
        return np.clip(b, 0, self.bins - 1).astype(np.intp)

    def update(
        self, maps: Any = None, masks: Any = None, scores: Any = None, labels: Any = None
    ) -> None:
        """Add a batch: maps/masks (H, W), (N, H, W) or (N, 1, H, W), image scores (N,).

        Each batch must hold whole images (regions are labelled per image). If ``scores`` is
        given without ``labels``, an image is anomalous iff its mask has an anomalous pixel
        (pass ``labels`` when an anomalous image can have an empty mask, e.g. a cropped defect).
        """
        if (maps is None) != (masks is None):
            raise ValueError("maps and masks must be given together")
        m = None
        if maps is not None:
            m, s = _pixel_inputs(masks, maps)
            ids, sizes = label_regions(m)
            if self.bins is None:
                ids[ids > 0] += self.n_regions
                self._scores.append(np.ascontiguousarray(s, dtype=self.score_dtype).ravel())
                self._ids.append(ids.ravel())
                self._sizes.append(sizes)
            else:
                b, rid = self._bin(s.ravel()), ids.ravel()
                pos = rid > 0
                self._h_neg += np.bincount(b[~pos], minlength=self.bins)
                self._h_pos += np.bincount(b[pos], minlength=self.bins)
                inv = np.concatenate(([0.0], 1.0 / sizes))
                self._h_inv += np.bincount(b[pos], weights=inv[rid[pos]], minlength=self.bins)
            self.n_regions += int(sizes.size)
        if scores is not None:
            sc = _scores(scores, "scores").astype(np.float64).ravel()
            if labels is None:
                if m is None:
                    raise ValueError("labels are required when no masks are given")
                lab = m.reshape(m.shape[0], -1).any(axis=1)
            else:
                lab = _binary(labels, "labels").ravel()
            if lab.size != sc.size:
                raise ValueError(f"{lab.size} labels for {sc.size} image scores")
            self._img_scores.append(sc)
            self._img_labels.append(lab)
        elif labels is not None:
            raise ValueError("labels given without scores")

    def merge(self, other: PixelMetricAccumulator) -> PixelMetricAccumulator:
        """Add ``other``'s data to this accumulator (in place) and return ``self``."""
        if other is self:
            raise ValueError("cannot merge an accumulator with itself")
        if (self.bins, self.score_range, self.fpr_limit) != (
            other.bins, other.score_range, other.fpr_limit
        ):
            raise ValueError("cannot merge accumulators with different bins/range/fpr_limit")
        if self.bins is None:
            for s, ids, sizes in zip(other._scores, other._ids, other._sizes):
                ids = ids.copy()
                ids[ids > 0] += self.n_regions
                self._scores.append(s.astype(self.score_dtype, copy=False))
                self._ids.append(ids)
                self._sizes.append(sizes)
        else:
            self._h_neg += other._h_neg
            self._h_pos += other._h_pos
            self._h_inv += other._h_inv
        self.n_regions += other.n_regions
        self._img_scores += other._img_scores
        self._img_labels += other._img_labels
        return self

    def _pixels(self) -> tuple[Callable[[], Iterable[_Curve]], int, int] | None:
        """(a function that walks the curve points, n_pos, n_neg), or None if no pixel."""
        if self.bins is None:
            if not self._scores:
                return None
            if len(self._scores) > 1:  # compact into one array each (kept for later calls)
                self._scores = [np.concatenate(self._scores)]
                self._ids = [np.concatenate(self._ids)]
                self._sizes = [np.concatenate(self._sizes)]
            s, ids, sizes = self._scores[0], self._ids[0], self._sizes[0]
            return (lambda: _walk(s, ids, _region_weights(sizes))), *_counts(ids)
        keep = np.flatnonzero((self._h_neg + self._h_pos) > 0)[::-1]  # non-empty bins, desc
        if keep.size == 0:
            return None
        lo, hi = self.score_range
        c = _Curve(
            lo + keep * ((hi - lo) / self.bins),  # lower bin edges
            np.cumsum(self._h_pos[keep]),
            np.cumsum(self._h_neg[keep]),
            np.cumsum(self._h_inv[keep]) / max(self.n_regions, 1),
        )
        return (lambda: [c]), int(self._h_pos.sum()), int(self._h_neg.sum())

    def compute(self) -> dict[str, float]:
        """``{"image_auroc", "pixel_auroc", "aupro", "pixel_ap"}``; nan where undefined."""
        out = dict.fromkeys(("image_auroc", "pixel_auroc", "aupro", "pixel_ap"), math.nan)
        if self._img_scores:
            y = np.concatenate(self._img_labels)
            it = _integrate(_walk(np.concatenate(self._img_scores), y), *_counts(y))
            out["image_auroc"] = it.auroc("image_auroc")
        px = self._pixels()
        if px is not None:
            points, n_pos, n_neg = px
            it = _integrate(points(), n_pos, n_neg, self.fpr_limit)
            out["pixel_auroc"] = it.auroc("pixel_auroc")
            out["pixel_ap"] = it.ap("pixel_ap")
            out["aupro"] = it.aupro(self.n_regions)
        return out

    def curves(self, max_points: int | None = 2000) -> dict[str, tuple[np.ndarray, ...]]:
        """Plot points: ``pixel_roc`` (fpr, tpr, thr), ``pro`` (fpr, pro, thr) up to
        ``fpr_limit``, ``image_roc`` (fpr, tpr, thr); a curve is absent where undefined."""
        out: dict[str, tuple[np.ndarray, ...]] = {}
        px = self._pixels()
        if px is not None and px[1] and px[2]:
            points, n_pos, n_neg = px
            c = _collect(points())
            out["pixel_roc"] = _decimate(max_points, _roc_points(c, n_pos, n_neg))
            if self.n_regions:
                out["pro"] = _decimate(max_points, _pro_points(c, n_neg, self.fpr_limit))
        if self._img_scores:
            y = np.concatenate(self._img_labels)
            if y.any() and not y.all():
                out["image_roc"] = roc_curve(y, np.concatenate(self._img_scores), max_points)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the state (for memory reports)."""
        arrays = self._scores + self._ids + self._sizes + self._img_scores + self._img_labels
        arrays += [self._h_neg, self._h_pos, self._h_inv]
        return int(sum(a.nbytes for a in arrays))
