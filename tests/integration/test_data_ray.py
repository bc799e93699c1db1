"""Data stages inside real Ray Data pipelines: the decoder reading the loopback S3, and the
training stream with its features computed by an actor pool or by the worker."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TINY, bad_files

from prn_ray import storage
from prn_ray.config import DataConfig, StorageConfig, load_config
from prn_ray.contracts import FEATURE_COLUMNS
from prn_ray.data.catalog import build_catalog
from prn_ray.data.product import ProductData
from prn_ray.data.stages import FeatureExtractor, build_banks
from prn_ray.demo_data import make_dataset
from prn_ray.geometry import Geometry
from prn_ray.images import decode_batch, error_free
from prn_ray.train.datasets import TRAIN_COLUMNS, train_dataset
from prn_ray.train.worker import with_features

pytestmark = pytest.mark.timeout(300)


def test_decode_batch_in_ray_data_from_s3(ray_local, s3_bucket):
    """The UDF in a real Ray Data pipeline reading the loopback S3: error rows are kept."""
    import ray

    cfg = StorageConfig()
    files = bad_files()
    rows = []
    for name, (data, reason) in files.items():
        uri = storage.join(s3_bucket, "ray", name)
        storage.write_bytes(uri, data, cfg)
        rows.append({"image_uri": uri, "expected": reason or ""})
    ds = ray.data.from_items(rows).map_batches(
        decode_batch,
        fn_kwargs={"storage_cfg": cfg, "data_cfg": DataConfig(), "geometry": 32},
        batch_format="numpy",
        batch_size=4,
    )
    out = ds.take_all()
    assert len(out) == len(rows)
    for row in out:
        got = row["error"].split(":", 1)[0] if row["error"] else ""
        assert got == row["expected"], (row["image_uri"], row["error"])
        assert row["image"].shape == (32, 32, 3) and row["mask"].shape == (32, 32)


def test_features_in_the_trainer_equal_the_actor_pools(ray_local, tmp_path):
    """``train.features_in``: the training stream with features from the actor pool and the
    stream of images that the worker turns into features itself give the same rows (same
    synthesis, same seeds) with the same features."""
    import torch

    make_dataset(f"{tmp_path}/data", products=("fabric",), n_train=10, n_good_test=1,
                 n_defect_test=6, image_size=64)
    corrupt = sorted((tmp_path / "data" / "fabric" / "train" / "good").iterdir())[0]
    corrupt.write_bytes(b"not an image")  # its synthetic rows must arrive as error rows
    rows = {}
    for mode in ("actors", "trainer"):
        cfg = load_config(TINY, [f"data.root={tmp_path}/data", f"storage.runs_uri={tmp_path}/runs",
                                 f"train.features_in={mode}", "train.epochs=3"])
        catalog = build_catalog(cfg).df
        data = ProductData.from_catalog(catalog[catalog["split"] != "test"], "fabric")
        banks = build_banks(data, {}, cfg, Geometry((64, 64)))
        ds = train_dataset(data, banks, cfg, Geometry((64, 64)), f"{tmp_path}/runs/{mode}")
        batches = ds.iter_batches(batch_size=8, batch_format="numpy")
        extract = (FeatureExtractor(cfg.model, cfg.storage, 64, threads=torch.get_num_threads())
                   if mode == "trainer" else None)
        if mode == "trainer":
            assert "image" in next(iter(ds.iter_batches(batch_size=1)))  # images, no features
        rows[mode] = {(int(e), int(p)): (b, i) for b in with_features(batches, extract,
                                                                          TRAIN_COLUMNS)
                      for i, (e, p) in enumerate(zip(b["epoch"], b["pos"]))}
    assert rows["actors"].keys() == rows["trainer"].keys() and len(rows["actors"]) > 8
    errors = {m: {k for k, (b, i) in r.items() if not error_free(b["error"][i:i + 1])[0]}
              for m, r in rows.items()}
    assert 0 < len(errors["actors"]) < len(rows["actors"]), errors
    assert errors["actors"] == errors["trainer"]
    for key, (a, i) in rows["actors"].items():
        t, j = rows["trainer"][key]
        assert np.array_equal(a["mask"][i], t["mask"][j]), key
        for c in FEATURE_COLUMNS:
            assert a[c].dtype == t[c].dtype
            np.testing.assert_allclose(a[c][i].astype(np.float32), t[c][j].astype(np.float32),
                                       rtol=1e-2, atol=1e-2, err_msg=f"{key} {c}")
