"""The Ray actor's feature stage and the in-process runner compute features one way: the same
numbers for readable rows, zeros for a row that failed to decode (no Ray: the actor class is
called in-process). Random backbone weights (model.weights=none): only equality matters."""

from __future__ import annotations

import numpy as np
import torch
from helpers import TINY, demo_images

from prn_ray.config import load_config
from prn_ray.contracts import FEATURE_COLUMNS
from prn_ray.data.stages import FeatureExtractor, backbone_features, feature_dtype

torch.set_num_threads(1)


def test_error_rows_get_zero_features_on_both_paths():
    cfg = load_config(TINY, ["data.image_size=64"])
    imgs = np.stack(demo_images("fabric", 3, 64, seed=0))
    imgs[1] = 0  # the decoder's black placeholder of an unreadable image
    errors = np.array(["", "decode_failed: not an image", ""], dtype=object)
    actor = FeatureExtractor(cfg.model, cfg.storage, 64)
    got = actor({"image": imgs, "error": errors, "image_uri": np.array(["a", "b", "c"])})
    local = backbone_features(actor.backbone, imgs, errors, feature_dtype(cfg.model))
    for name, f in zip(FEATURE_COLUMNS, local):
        assert got[name].dtype == np.float16 == f.dtype
        np.testing.assert_array_equal(got[name], f)
        assert not got[name][1].any(), f"{name}: the error row has features"
        assert got[name][0].any() and got[name][2].any()
    # the error row does not change its neighbours' features (nor go through the backbone)
    alone = backbone_features(actor.backbone, imgs[[0, 2]], None, np.float16)
    for f, a in zip(local, alone):
        np.testing.assert_allclose(f[[0, 2]].astype(np.float32), a.astype(np.float32),
                                   atol=1e-3)
    none_ok = backbone_features(actor.backbone, imgs[:1], errors[1:2], np.float32)
    assert [f.shape[1:] for f in none_ok] == [f.shape[1:] for f in local]
    assert not any(f.any() for f in none_ok)
