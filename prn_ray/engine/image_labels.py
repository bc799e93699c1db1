"""Seen defects known by their image label only: which view of a tiled one trains.

An untiled image-labelled defect is one view: the whole image is the bag its multiple-instance
loss pools over (:mod:`prn_ray.model.loss`). A tiled one is a dozen views, and most of them
show no defect at all: asking each to have a high top-k would teach the head that clean tiles
are defective. Its bag is the image, so its instance is chosen here, once, before training:
the view the normal patch memory finds least normal (MIL's max-instance rule, with the
memory -- the floor under the head -- as the instance scorer). Distances are turned into robust
z-scores over the image's own views (median and MAD per level): most of a defective image's
pixels are normal, so they stand in for the held-out normals the prior is calibrated on, which
are not at hand when the training data are assembled.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from prn_ray.config import Config
from prn_ray.contracts import image_labelled
from prn_ray.model.memory import PatchMemory
from prn_ray.model.reference import NormalReference

TOP_FRACTION = 0.01  # a view's score: the mean of its top 1 % positions


@torch.no_grad()
def view_scores(features: list[np.ndarray], reference: NormalReference, cfg: Config
                ) -> np.ndarray:
    """How anomalous the patch memory finds each of one image's views (V features per level,
    V x C x h x w): the top-1 % mean of the summed robust z-maps. Higher = less normal."""
    levels = cfg.model.prior_levels
    channels = [int(m.shape[0]) for m in reference.means]
    memory = PatchMemory(channels, levels, cfg.model.prior_pool)
    memory.set_banks(reference.banks)
    normed = [(torch.from_numpy(np.asarray(features[lv])).float()
               - reference.means[lv].view(1, -1, 1, 1)) / reference.stds[lv].view(1, -1, 1, 1)
              for lv in levels]
    dists = memory.distances(normed)
    grid = dists[0].shape[-2:]
    total = None
    for d in dists:
        med = d.median()
        mad = (d - med).abs().median().clamp_min(1e-6) * 1.4826
        z = F.interpolate((d - med) / mad, size=grid, mode="bilinear", align_corners=False)
        total = z if total is None else total + z
    flat = total.flatten(1)
    k = max(1, int(round(TOP_FRACTION * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1).numpy()


def keep_strongest_views(seen: list[tuple[str, str]], features: list[np.ndarray],
                         masks: np.ndarray, reference: NormalReference, cfg: Config
                         ) -> np.ndarray:
    """Indices of the seen views to train on: every view of a masked defect, the strongest
    view (:func:`view_scores`) of each image-labelled one. ``seen`` has one (image, mask) URI
    pair per view, a tiled image's views next to each other (as the banks list them)."""
    keep: list[int] = []
    start = 0
    while start < len(seen):
        end = start
        while end < len(seen) and seen[end] == seen[start]:
            end += 1
        if end - start > 1 and image_labelled(masks[start]) and reference.banks:
            scores = view_scores([f[start:end] for f in features], reference, cfg)
            keep.append(start + int(np.argmax(scores)))
        else:
            keep.extend(range(start, end))
        start = end
    return np.asarray(keep, np.int64)
