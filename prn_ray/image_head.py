"""The image-level head: a small learned scorer over statistics of the stitched anomaly map.

The map's own rule (``model.score``: the mean of its top 100 pixels) fixes one trade-off
between a defect's peak and its extent; the paper's limitation section notes that it favours
large defects. The head learns that trade-off per product instead: an L2-regularised logistic
regression over a few order statistics of the map (its peak, the means of its top 10, top-k
and top 1 000 pixels, the ``area`` score, and, for whole-image models, the mean of its top
1 % and of the whole map), each as a logit, fitted on the held-out validation images: normals,
simulated anomalies and real defects (masked or image-labelled) and their extended copies.

Its scores are cross-fitted for calibration: each validation image is scored by a head fitted
on the other folds, so the decision threshold and the expected false-alarm rate rest on scores
of images the head did not fit (the head kept is the one fitted on all of them).

Tiled models use the size-free statistics only: their simulated validation anomalies are
single tiles, normals and real defects whole photos, and a map's mean over one tile would
tell the head which is which rather than what a defect looks like.

No Ray, no torch: numpy, OpenCV and scikit-learn. The statistics are computed on the map the
scorer stitches (:class:`prn_ray.inference.ScoreRule` applies the head), so a defect two tiles
share is one region here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

SIZE_FREE = ("max", "top10", "topk", "top1000", "area")
WHOLE_IMAGE = (*SIZE_FREE, "top1pct", "mean")
EPS = 1e-6  # float32 maps saturate at 0 and 1; their logits are clipped at about ±13.8


def statistics_for(tiled: bool) -> tuple[str, ...]:
    """The statistics a head uses: size-free ones for tiled models (see the module doc)."""
    return SIZE_FREE if tiled else WHOLE_IMAGE


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def map_statistics(amap: np.ndarray, names: Sequence[str], topk: int, kernel: int
                   ) -> np.ndarray:
    """The named statistics of one probability map (H x W), as logits (float64).

    ``topk``: the map rule's k; ``kernel``: the ``area`` window (the map rule's). Pixels no
    view reached (NaN) count as the largest, as in the map rule."""
    flat = np.nan_to_num(np.ascontiguousarray(amap, np.float32).ravel(), nan=1.0)
    n = flat.size
    largest = max(1000, topk, n // 100)
    keep = min(n, largest)
    top = np.sort(np.partition(flat, n - keep)[n - keep:])[::-1].astype(np.float64)
    values: dict[str, float] = {}
    for name in names:
        if name == "max":
            values[name] = top[0]
        elif name == "top10":
            values[name] = top[:10].mean()
        elif name == "topk":
            values[name] = top[:topk].mean()
        elif name == "top1000":
            values[name] = top[:1000].mean()
        elif name == "top1pct":
            values[name] = top[:max(1, n // 100)].mean()
        elif name == "mean":
            values[name] = float(flat.mean(dtype=np.float64))
        elif name == "area":
            img = np.nan_to_num(np.asarray(amap, np.float32), nan=1.0)
            values[name] = float(cv2.blur(img, (kernel, kernel),
                                          borderType=cv2.BORDER_REFLECT).max())
        else:
            raise ValueError(f"unknown map statistic {name!r} (one of {WHOLE_IMAGE})")
    return _logit(np.array([values[n] for n in names]))


@dataclass(frozen=True)
class ImageHead:
    """A fitted head: ``score = sigmoid(w . (stats - mean) / scale + bias)``."""

    statistics: tuple[str, ...]
    topk: int
    kernel: int
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float

    def logit(self, stats: np.ndarray) -> np.ndarray:
        """The head's logit of statistics (N x S or S)."""
        z = (np.asarray(stats, np.float64) - np.array(self.mean)) / np.array(self.scale)
        return z @ np.array(self.weights) + self.bias

    def __call__(self, amap: np.ndarray) -> float:
        """The image score of one stitched probability map, in (0, 1)."""
        x = float(self.logit(map_statistics(amap, self.statistics, self.topk, self.kernel)))
        return float(1.0 / (1.0 + np.exp(-x)))

    def to_doc(self) -> dict[str, Any]:
        return {"kind": "logistic", "statistics": list(self.statistics), "topk": self.topk,
                "kernel": self.kernel, "mean": list(self.mean), "scale": list(self.scale),
                "weights": list(self.weights), "bias": self.bias,
                "score": "sigmoid(sum(weights * (logit(statistics) - mean) / scale) + bias)"}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ImageHead:
        if doc.get("kind") != "logistic":
            raise ValueError(f"unknown image head {doc.get('kind')!r}: this version reads "
                             "'logistic' heads only")
        return cls(tuple(doc["statistics"]), int(doc["topk"]), int(doc["kernel"]),
                   tuple(float(v) for v in doc["mean"]), tuple(float(v) for v in doc["scale"]),
                   tuple(float(v) for v in doc["weights"]), float(doc["bias"]))


def sample_weights(labels: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Normals and anomalies weigh the same in all; among the anomalies, the real ones (held-out
    defects and their extended copies) weigh as much as the simulated ones together, so a few
    real defects are not drowned by a hundred simulated ones."""
    labels, real = np.asarray(labels, bool), np.asarray(real, bool) & np.asarray(labels, bool)
    w = np.zeros(len(labels))
    normal, synth = ~labels, labels & ~real
    if normal.any():
        w[normal] = 1.0 / normal.sum()
    groups = [g for g in (real, synth) if g.any()]
    for g in groups:
        w[g] = 1.0 / (len(groups) * g.sum())
    return w * len(labels) / max(w.sum(), 1e-12)


def fit(stats: np.ndarray, labels: np.ndarray, weights: np.ndarray, names: Sequence[str],
        topk: int, kernel: int, c: float = 1.0) -> ImageHead:
    """A head fitted on per-image statistics (N x S), labels and sample weights."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(stats, np.float64)
    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        raise ValueError("the image head needs normal and anomalous validation images")
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    lr = LogisticRegression(C=c, max_iter=1000)
    lr.fit((x - mean) / scale, labels, sample_weight=weights)
    return ImageHead(tuple(names), int(topk), int(kernel), tuple(mean.tolist()),
                     tuple(scale.tolist()), tuple(lr.coef_[0].tolist()),
                     float(lr.intercept_[0]))


def cross_fitted(stats: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                 names: Sequence[str], topk: int, kernel: int, folds: int = 5, seed: int = 0
                 ) -> np.ndarray:
    """Each image's score by a head fitted on the other folds (stratified), in (0, 1)."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels, bool)
    k = int(min(folds, labels.sum(), (~labels).sum()))
    out = np.full(len(labels), np.nan)
    if k < 2:
        raise ValueError("cross-fitting the image head needs at least 2 normal and 2 "
                         "anomalous validation images")
    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for train, held in split.split(stats, labels):
        head = fit(stats[train], labels[train], weights[train], names, topk, kernel)
        out[held] = 1.0 / (1.0 + np.exp(-head.logit(stats[held])))
    return out
