"""The decoder inside a real Ray Data pipeline reading the loopback S3."""

from __future__ import annotations

import pytest
from helpers import bad_files

from prn_ray import storage
from prn_ray.config import DataConfig, StorageConfig
from prn_ray.images import decode_batch

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
        fn_kwargs={"storage_cfg": cfg, "data_cfg": DataConfig(), "image_size": 32},
        batch_format="numpy",
        batch_size=4,
    )
    out = ds.take_all()
    assert len(out) == len(rows)
    for row in out:
        got = row["error"].split(":", 1)[0] if row["error"] else ""
        assert got == row["expected"], (row["image_uri"], row["error"])
        assert row["image"].shape == (32, 32, 3) and row["mask"].shape == (32, 32)
