"""Cached + streamed features give the batches the full stream gives (no Ray).

Random-init backbone (``model.weights=none``): only the machinery is checked, the features'
values do not matter, only that both paths compute the same ones for the same rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY

from prn_ray.config import load_config
from prn_ray.contracts import FEATURE_COLUMNS
from prn_ray.data.catalog import build_catalog
from prn_ray.data.feature_cache import FeatureCache, cached_kinds, merge_batches, streamed_rows
from prn_ray.data.local import feature_batches, reference_batches, streamed_batches
from prn_ray.data.product import ProductData
from prn_ray.data.stages import build_banks, plan_frame
from prn_ray.demo_data import make_dataset
from prn_ray.engine.reference import build_feature_cache, fit_from_batches
from prn_ray.geometry import Geometry
from prn_ray.model import Backbone

pytestmark = pytest.mark.timeout(300)
PRODUCT = "fabric"
G = Geometry((64, 64))
CACHED_KINDS = cached_kinds(False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    root = str(tmp_path_factory.mktemp("cache"))
    make_dataset(root, products=(PRODUCT,), n_train=14, n_good_test=0, n_defect_test=8,
                 image_size=64)
    cfg = load_config(TINY, [f"data.root={root}", f"storage.runs_uri={root}/runs",
                             "train.batch_size=4", "train.prototype_cache=false"])
    data = ProductData.from_catalog(build_catalog(cfg).df, PRODUCT)
    banks = build_banks(data, {}, cfg, G)
    backbone = Backbone(cfg.model.backbone, "none").eval()
    reference, _, normals = fit_from_batches(data, cfg, reference_batches(
        data.train_normals, cfg, G, backbone, 5))
    cache = build_feature_cache(normals, banks, backbone, cfg, G, data, reference)
    return cfg, data, banks, backbone, cache


def test_plan_positions_and_streamed_rows(setup):
    cfg, data, _, _, _ = setup
    plan = plan_frame(data, cfg, range(0, 2))
    for _, epoch in plan.groupby("epoch"):
        assert epoch["pos"].tolist() == list(range(len(epoch)))
    streamed = streamed_rows(plan, False)
    assert not streamed["kind"].isin(CACHED_KINDS).any()
    assert len(streamed) == (~plan["kind"].isin(CACHED_KINDS)).sum() > 0
    normals = plan[plan["kind"] == "normal"]
    assert [data.train_normals[i] for i in normals["normal_index"]] == normals["image_uri"].tolist()


def test_merged_batches_equal_full_stream(setup):
    cfg, data, banks, backbone, cache = setup
    plan = plan_frame(data, cfg, range(0, 2))
    full = list(feature_batches(plan, banks, cfg, G, backbone, 4, extra=("epoch",),
                                drop_last=True))
    stream = list(streamed_batches(streamed_rows(plan, False), banks, cfg, G, backbone, 3))
    stream.reverse()  # a stream delivers blocks in any order
    merged = list(merge_batches(plan, cache, stream, 4))
    assert len(merged) == len(full) == len(plan) // 4
    for a, b in zip(merged, full):
        for c in FEATURE_COLUMNS:
            assert a[c].dtype == b[c].dtype
            torch.testing.assert_close(a[c].float(), b[c].float(), atol=2e-3, rtol=2e-3)
        assert torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["epoch"], b["epoch"].long())


def test_failed_streamed_row_is_skipped_and_a_short_stream_is_an_error(setup):
    cfg, data, banks, backbone, cache = setup
    plan = plan_frame(data, cfg, range(0, 1))
    stream = list(streamed_batches(streamed_rows(plan, False), banks, cfg, G, backbone, 64))
    assert len(stream) == 1
    stream[0]["error"] = stream[0]["error"].copy()
    stream[0]["error"][0] = "decode failed"
    merged = list(merge_batches(plan, cache, stream, 1))
    assert len(merged) == len(plan) - 1
    with pytest.raises(RuntimeError, match="stream ended"):
        list(merge_batches(plan, cache, [], 1))


def test_cache_roundtrips_through_tensors(setup):
    cache = setup[-1]
    back = FeatureCache.from_tensors(cache.tensors())
    assert back.image_size == cache.image_size and back.nbytes == cache.nbytes
    for a, b in zip([*cache.normals, *cache.seen, cache.seen_masks],
                    [*back.normals, *back.seen, back.seen_masks]):
        np.testing.assert_array_equal(a, b)
    assert cache.normals[0].dtype == np.float16
    assert len(cache.normals[0]) == len(setup[1].train_normals)
    assert len(cache.seen[0]) == len(setup[1].seen) == len(cache.seen_masks)
