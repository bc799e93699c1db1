"""Anomaly-detection metrics: image AUROC, pixel AUROC, pixel AP and AUPRO@0.3.

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
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from scipy import ndimage

from prn_ray.curves import (
    Curve,
    UndefinedMetricWarning,
    check_limit,
    collect,
    counts,
    decimate,
    integrate,
    pro_points,
    region_weights,
    roc_points,
    walk,
)

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
# one-shot public API


def image_auroc(labels: Any, scores: Any) -> float:
    """ROC-AUC of image scores vs. image labels (nan + warning with one class only)."""
    y, s = _flat_inputs(labels, scores)
    return integrate(walk(s, y), *counts(y)).auroc("image_auroc")


def pixel_auroc(masks: Any, maps: Any) -> float:
    """ROC-AUC over all pixels of all images (flattened)."""
    m, s = _pixel_inputs(masks, maps)
    return integrate(walk(s, m), *counts(m)).auroc("pixel_auroc")


def pixel_ap(masks: Any, maps: Any) -> float:
    """Average precision over all pixels, as ``sklearn.metrics.average_precision_score``."""
    m, s = _pixel_inputs(masks, maps)
    return integrate(walk(s, m), *counts(m)).ap("pixel_ap")


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec definition, exact)."""
    fpr_limit = check_limit(fpr_limit)
    m, s = _pixel_inputs(masks, maps)
    ids, sizes = label_regions(m)
    del m
    it = integrate(walk(s, ids, region_weights(sizes)), *counts(ids), fpr_limit)
    return it.aupro(sizes.size)


def roc_curve(
    labels: Any, scores: Any, max_points: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` at every distinct threshold (``score >= t``), starting at
    (0, 0) with ``thresholds[0] = inf`` like scikit-learn. Works for image labels/scores and for
    masks/maps (flattened). ``max_points`` evenly subsamples long curves for plotting."""
    y, s = _flat_inputs(labels, scores)
    n_pos, n_neg = counts(y)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_curve needs both classes")
    points = roc_points(collect(walk(s, y)), n_pos, n_neg)
    return decimate(max_points, points)  # type: ignore[return-value]


def pro_curve(
    masks: Any, maps: Any, fpr_limit: float | None = None, max_points: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, pro, thresholds)`` of the PRO curve, from (0, 0, inf). With ``fpr_limit`` the curve
    stops at that FPR with an interpolated last point (its threshold is nan)."""
    limit = None if fpr_limit is None else check_limit(fpr_limit)
    m, s = _pixel_inputs(masks, maps)
    ids, sizes = label_regions(m)
    n_pos, n_neg = counts(ids)
    if sizes.size == 0 or n_neg == 0:
        raise ValueError("pro_curve needs at least one GT region and one normal pixel")
    c = collect(walk(s, ids, region_weights(sizes)))
    return decimate(max_points, pro_points(c, n_neg, limit))  # type: ignore[return-value]


def f1_optimal_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """``(threshold, f1)`` maximising F1 of the rule ``anomalous iff score > threshold``.

    The threshold is the next lower observed score below the best cut, so the rule reproduces
    the best F1 exactly on these data (``nextafter(min, -inf)`` if everything is flagged).
    """
    y, s = _flat_inputs(labels, scores)
    n_pos, _ = counts(y)
    if n_pos == 0:
        raise ValueError("f1_optimal_threshold needs at least one positive")
    c = collect(walk(s, y))
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
        self.fpr_limit = check_limit(fpr_limit)
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

    def _pixels(self) -> tuple[Callable[[], Iterable[Curve]], int, int] | None:
        """(a function that walks the curve points, n_pos, n_neg), or None if no pixel."""
        if self.bins is None:
            if not self._scores:
                return None
            if len(self._scores) > 1:  # compact into one array each (kept for later calls)
                self._scores = [np.concatenate(self._scores)]
                self._ids = [np.concatenate(self._ids)]
                self._sizes = [np.concatenate(self._sizes)]
            s, ids, sizes = self._scores[0], self._ids[0], self._sizes[0]
            return (lambda: walk(s, ids, region_weights(sizes))), *counts(ids)
        keep = np.flatnonzero((self._h_neg + self._h_pos) > 0)[::-1]  # non-empty bins, desc
        if keep.size == 0:
            return None
        lo, hi = self.score_range
        c = Curve(
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
            it = integrate(walk(np.concatenate(self._img_scores), y), *counts(y))
            out["image_auroc"] = it.auroc("image_auroc")
        px = self._pixels()
        if px is not None:
            points, n_pos, n_neg = px
            it = integrate(points(), n_pos, n_neg, self.fpr_limit)
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
            c = collect(points())
            out["pixel_roc"] = decimate(max_points, roc_points(c, n_pos, n_neg))
            if self.n_regions:
                out["pro"] = decimate(max_points, pro_points(c, n_neg, self.fpr_limit))
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
