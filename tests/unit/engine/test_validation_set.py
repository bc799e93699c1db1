"""The validation set of a tiled product: images as items, stitched image scores, and the
per-epoch subset that bounds validation's cost (prn_ray.engine.validation)."""

from __future__ import annotations

import pytest
import torch

from prn_ray.config import Config, DataConfig, TilesConfig
from prn_ray.contracts import GROUP_NORMAL, GROUP_REAL, GROUP_SYNTHETIC
from prn_ray.engine.validation import ValidationSet
from prn_ray.geometry import Geometry


def _set(n_normal_images: int, views: int) -> ValidationSet:
    groups, items, idx = [], [], []
    for i in range(n_normal_images):  # normals: every view
        groups += [GROUP_NORMAL] * views
        items += [i] * views
        idx += list(range(views))
    groups += [GROUP_REAL] * views  # one real defect: every view
    items += [100] * views
    idx += list(range(views))
    groups += [GROUP_SYNTHETIC]  # a synthetic anomaly: one view
    items += [200]
    idx += [1]
    n = len(groups)
    masks = torch.zeros(n, 8, 8, dtype=torch.uint8)
    masks[n - 1 - views, 2:4, 2:4] = 1  # the real defect's first view
    masks[n - 1, 5:7, 5:7] = 1
    feats = [torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)]
    return ValidationSet(feats, masks, torch.tensor(groups), torch.tensor(items),
                         torch.tensor(idx), torch.tensor([[8, 14]] * n))


def test_limited_keeps_whole_images_and_every_anomaly():
    val = _set(n_normal_images=10, views=3)
    small = val.limited(7)  # 2 whole normal images (6 views), never a part of one
    kept_normals = small.items[small.groups == GROUP_NORMAL].unique().tolist()
    assert kept_normals == [0, 1]
    assert (small.groups != GROUP_NORMAL).sum() == (val.groups != GROUP_NORMAL).sum()
    assert small.features[0].flatten().tolist() == [
        float(i) for i in range(len(val)) if val.groups[i] != GROUP_NORMAL or val.items[i] < 2]
    assert val.limited(None) is val and val.limited(1000) is val
    assert len(val.limited(1)) == 3 + 3 + 1  # at least one image's views


def test_image_scores_are_stitched_per_item():
    val = _set(n_normal_images=2, views=2)
    cfg = Config(data=DataConfig(image_size=8, tiles=TilesConfig(mode="on", scale=1.0,
                                                                  overlap=2)))
    assert Geometry((8, 8), scale=1.0, overlap=2).n_views(8, 14) == 2
    probs = torch.full((len(val), 8, 8), 0.1)
    probs[val.items == 100] = 0.9  # the real defect's views
    probs[-1] = 0.7
    scores, labels, groups = val.image_scores(probs, cfg)
    assert scores.tolist() == pytest.approx([0.1, 0.1, 0.9, 0.7])
    assert labels.tolist() == [False, False, True, True]
    assert groups.tolist() == [GROUP_NORMAL, GROUP_NORMAL, GROUP_REAL, GROUP_SYNTHETIC]
    untiled = val.image_scores(probs, Config(data=DataConfig(image_size=8)))
    assert len(untiled[0]) == len(val)  # one view is one image
