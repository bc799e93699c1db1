"""Whole images through a PRN by its :class:`~prn_ray.geometry.Geometry`: the views of a batch
of images run through the model a model batch at a time, their maps stitched back into one map
per image at its working size, and the image score taken from that stitched map with the
model's own rule (so a defect that two tiles share is scored once, as one region).

One implementation for the scoring actors, evaluation, ``predict`` and the exported models'
tiled loop (``export.json`` documents it). No Ray imports; torch only where a map is scored
(the scoring driver imports the scorer's module and stays torch-free).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from prn_ray.geometry import Geometry
from prn_ray.image_head import ImageHead

Run = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # views -> (probs, ms per view)


@dataclass(frozen=True)
class ScoreRule:
    """The image score of a map: ``model.score`` / ``score_topk`` and the ``area`` window
    (pixels at the model's scale, the same inside a tile as in a whole squashed image), or,
    where the model has one, its learned image head (:mod:`prn_ray.image_head`)."""

    kind: str = "topk_mean"
    topk: int = 100
    kernel: int = 9
    head: ImageHead | None = None

    @classmethod
    def of(cls, model) -> ScoreRule:
        """The rule a :class:`~prn_ray.model.PRN` (or a runtime's graph model) scores with:
        its ``image_head`` when the registry attached one."""
        return cls(model.score_kind, model.score_topk, model.area_kernel,
                   getattr(model, "image_head", None))

    @classmethod
    def from_config(cls, model_cfg, size: tuple[int, int]) -> ScoreRule:
        """The map's own rule from a config (``model.score``, ``score_topk``) at a model input
        ``size`` (its ``area`` window), without a head: validation, and the head's ablation."""
        from prn_ray.model.prn import area_kernel

        return cls(model_cfg.score, model_cfg.score_topk, area_kernel(size))

    def __call__(self, amap: np.ndarray) -> float:
        """The score of one stitched map: the head's where there is one, else the model's
        ``image_score``, computed here without its full sort (the graph needs a static sort;
        a stitched 1 500 x 1 000 map sorted took 111 ms, a partition of its top k 1.9 ms: the
        same k values, so the same mean up to the order of a float32 sum). NaN (pixels no
        view reached) is the largest value in both."""
        if self.head is not None:
            return self.head(amap)
        flat = np.ascontiguousarray(amap, dtype=np.float32).ravel()
        if self.kind == "topk_mean" and flat.size:
            k = min(self.topk, flat.size)
            top = np.partition(flat, flat.size - k)[flat.size - k:]
            return float(top.mean(dtype=np.float64))
        if self.kind == "max" and flat.size:
            return float(flat.max())
        import torch

        from prn_ray.model.prn import image_score

        t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
        return float(image_score(t, self.kind, self.topk, self.kernel)[0])


@dataclass
class ImageMap:
    """One image's stitched map (working size, float32 probabilities) and score."""

    item: int
    amap: np.ndarray
    score: float


def in_batches(run: Run, views: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities N x h x w float32, ms per view N) of ``views`` (N x h x w x 3 uint8)
    through ``run``, ``batch_size`` views at a time."""
    probs, ms = [], []
    for i in range(0, len(views), max(1, batch_size)):
        p, t = run(views[i:i + batch_size])
        probs.append(np.asarray(p, np.float32))
        ms.append(np.full(len(p), t, np.float32))
    if not probs:
        return np.zeros((0, *views.shape[1:3]), np.float32), np.zeros(0, np.float32)
    return np.concatenate(probs), np.concatenate(ms)


def stitch_items(probs: np.ndarray, items: np.ndarray, views: np.ndarray, heights: np.ndarray,
                 widths: np.ndarray, geometry: Geometry, rule: ScoreRule) -> list[ImageMap]:
    """One :class:`ImageMap` per item (an image), in order of first appearance, from the maps
    of its views (``items``/``views``: each view's image and grid index; ``heights``/``widths``:
    the image's own size). An item whose views are not all there (a validation anomaly
    synthesised on one tile) is scored as the best of its views."""
    out = []
    order = list(dict.fromkeys(int(i) for i in items))
    for item in order:
        idx = np.flatnonzero(items == item)
        h, w = int(heights[idx[0]]), int(widths[idx[0]])
        which = [int(v) for v in views[idx]]
        if not geometry.tiled or len(which) == geometry.n_views(h, w):
            amap = geometry.stitch(probs[idx], h, w, which)
            out.append(ImageMap(item, amap, rule(amap)))
        else:
            out.append(ImageMap(item, probs[idx[0]], max(rule(probs[i]) for i in idx)))
    return out
