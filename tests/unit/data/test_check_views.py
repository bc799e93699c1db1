"""The held-out views registered with a model for the graph runtimes' parity check
(``ProductData.check_views``): normals and defects from the validation split, as the model sees
them (whole image or tiles spread over the grid), at most CHECK_VIEWS, unreadable ones
skipped; and the registry keeps them beside the version."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import TINY, demo_images

from prn_ray import registry
from prn_ray.config import load_config
from prn_ray.data.product import CHECK_IMAGES, CHECK_VIEWS, ProductData
from prn_ray.geometry import Geometry
from prn_ray.images import encode_png


def product(tmp_path, n_normal=6, n_anomaly=3, size=120, broken=False):
    rows = []
    for label, n, seed in (("normal", n_normal, 0), ("anomaly", n_anomaly, 1)):
        for i, im in enumerate(demo_images("fabric", n, size, seed=seed)):
            p = tmp_path / f"{label}_{i}.png"
            p.write_bytes(encode_png(im))
            rows.append({"image_uri": str(p), "mask_uri": "", "label": label})
    if broken:  # sorts first among the normals
        p = tmp_path / "normal_!broken.png"
        p.write_bytes(b"not an image")
        rows.insert(0, {"image_uri": str(p), "mask_uri": "", "label": "normal"})
    return ProductData("p", [], [], pd.DataFrame(rows))


def test_whole_images_one_view_each_normals_and_defects(tmp_path):
    cfg = load_config(TINY, ["data.image_size=64"])
    data = product(tmp_path)
    views = data.check_views(cfg, Geometry((64, 64)))
    assert views.dtype == np.uint8 and views.shape == (sum(CHECK_IMAGES.values()), 64, 64, 3)
    first = Geometry((64, 64)).views(demo_images("fabric", 1, 120, seed=0)[0])[0]
    np.testing.assert_array_equal(views[0], first)  # the first held-out normal, as scored


def test_tiles_spread_over_the_grid_and_capped(tmp_path):
    cfg = load_config(TINY, ["data.image_size=64"])
    g = Geometry((64, 64), scale=1.0, overlap=16)
    data = product(tmp_path, size=200)
    views = data.check_views(cfg, g)
    assert views.shape == (CHECK_VIEWS, 64, 64, 3)
    tiles = g.views(demo_images("fabric", 1, 200, seed=0)[0])
    assert len(tiles) > 2
    # the first and the last tile of the first normal image
    np.testing.assert_array_equal(views[0], tiles[0])
    np.testing.assert_array_equal(views[1], tiles[-1])


def test_unreadable_are_skipped_and_none_without_images(tmp_path):
    cfg = load_config(TINY, ["data.image_size=64"])
    data = product(tmp_path, n_normal=1, n_anomaly=0, broken=True)
    assert data.check_views(cfg, Geometry((64, 64))).shape == (1, 64, 64, 3)
    empty = ProductData("p", [], [], pd.DataFrame(columns=["image_uri", "mask_uri", "label"]))
    assert empty.check_views(cfg, Geometry((64, 64))) is None


def test_registry_refuses_check_views_of_another_size(tmp_path):
    from helpers import publish_fitted

    cfg = load_config(TINY, [f"storage.models_uri={tmp_path}/models", "data.image_size=64"])
    publish_fitted(cfg, "p", demo_images("fabric", 4, 64, seed=0))
    mv = registry.load(cfg.storage, "p")
    with pytest.raises(registry.RegistryError, match="check_views must be V x 64 x 64 x 3"):
        registry.publish(cfg, "p", head_state=mv.head_state, backbone_state=mv.backbone_state,
                         geometry=mv.geometry, calibration=mv.calibration, metrics={},
                         check_views=np.zeros((2, 32, 32, 3), np.uint8))
