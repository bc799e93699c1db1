"""Object-storage retries against the real loopback S3 server behind the fault proxy
(tests/faultproxy.py): what is retried, what is not, how many requests a failure costs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from faultproxy import FaultProxy
from helpers import new_bucket, rgb

from prn_ray import images, storage
from prn_ray.config import DataConfig, StorageConfig
from prn_ray.images import encode_png

FAST = {"retries": 8, "retry_max_s": 0.02}  # tests: short sleeps, enough tries for 15 % faults


def _cfg(url: str, **kw) -> StorageConfig:
    return StorageConfig(endpoint_url=url, **{**FAST, **kw})


@pytest.mark.parametrize("message,transient", [
    ("AWS Error SLOW_DOWN during GetObject operation: injected", True),
    ("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body.", True),
    ("AWS Error UNKNOWN (HTTP status 500) during HeadObject operation: No response body.", True),
    ("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 18, Transferred a "
     "partial file; Details: end of response with 50000 bytes missing", True),
    ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect "
     "to server", True),
    ("AWS Error NETWORK_CONNECTION during UploadPart operation: curlCode: 28, Timeout was "
     "reached", True),
    ("AWS Error ACCESS_DENIED during HeadObject operation: No response body.", False),
    ("AWS Error NO_SUCH_KEY during ListObjectsV2 operation", False),
    ("AWS Error UNKNOWN (HTTP status 403) during GetObject operation", False),
    ("No space left on device", False),
])
def test_transient_or_not(message, transient):
    assert storage.is_transient(OSError(message)) is transient
    assert not storage.is_transient(FileNotFoundError(message))


def test_transient_faults_are_retried_everywhere(s3_endpoint):
    bucket = new_bucket(s3_endpoint, "retry")
    blobs = {f"{bucket}/d/{i}.bin": np.random.default_rng(i).bytes(3000 + i) for i in range(12)}
    with FaultProxy(s3_endpoint, rate=0.15, seed=7) as proxy:
        cfg = _cfg(proxy.url)
        before = storage.retried_requests()
        for uri, data in blobs.items():
            storage.write_bytes(uri, data, cfg)
        assert storage.list_files(f"{bucket}/d", cfg) == sorted(blobs)
        assert storage.list_dirs(bucket, cfg) == ["d"]
        for uri, data in blobs.items():
            assert storage.read_bytes(uri, cfg) == data
            assert storage.read_head(uri, cfg, 100) == data[:100]
        storage.copy_file(next(iter(blobs)), f"{bucket}/copy.bin", cfg)
        for uri in blobs:
            storage.delete_file(uri, cfg)
        assert storage.list_files(f"{bucket}/d", cfg) == []
        retried = storage.retried_requests() - before
    assert proxy.counts["status503"] and proxy.counts["drop"], proxy.counts
    # every injected fault that reached one of our calls was retried (none fatal)
    assert retried >= 1 and retried <= proxy.counts["status503"] + proxy.counts["drop"]


def test_truncated_body_is_retried(s3_endpoint):
    bucket = new_bucket(s3_endpoint, "trunc")
    data = np.random.default_rng(0).bytes(200_000)
    storage.write_bytes(f"{bucket}/big.bin", data)
    # Only GETs fail, half of them dropped mid-body: the body arrives cut short.
    with FaultProxy(s3_endpoint, rate=0.6, seed=3, methods=("GET",)) as proxy:
        for _ in range(5):
            assert storage.read_bytes(f"{bucket}/big.bin", _cfg(proxy.url)) == data
    assert proxy.counts["drop"] >= 1


def test_permanent_faults_fail_with_the_number_of_tries(s3_endpoint):
    bucket = new_bucket(s3_endpoint, "perm")
    for name in ("denied", "broken", "fine"):
        storage.write_bytes(f"{bucket}/{name}.bin", b"x" * 10)
    with FaultProxy(s3_endpoint, permanent={"denied.bin": 403, "broken.bin": 500}) as proxy:
        cfg = _cfg(proxy.url, retries=3)
        with pytest.raises(OSError, match=r"ACCESS_DENIED.*\[1 try\]"):
            storage.read_bytes(f"{bucket}/denied.bin", cfg)
        assert proxy.counts["status403"] == 1  # 403: never retried, by us or by the SDK
        with pytest.raises(OSError, match=r"HTTP status 500.*\[4 tries\]"):
            storage.read_bytes(f"{bucket}/broken.bin", cfg)
        # 4 requests, not 4 x the SDK's 3: its own retries are off for these calls
        assert proxy.counts["status500"] == 4
        with pytest.raises(FileNotFoundError, match=r"\[1 try\]"):
            storage.read_bytes(f"{bucket}/missing.bin", cfg)
        assert storage.read_bytes(f"{bucket}/fine.bin", cfg) == b"x" * 10


def test_training_reads_survive_transient_faults(s3_endpoint):
    """The training/scoring decode UDF (what Ray Data tasks run) through 5 % faults: the same
    pixels and no error rows as a clean read (unit level: the training run itself takes minutes
    on the shared CI machine)."""
    bucket = new_bucket(s3_endpoint, "decode")
    uris, masks = [], []
    for i in range(40):
        uris.append(f"{bucket}/p/img{i}.png")
        storage.write_bytes(uris[-1], encode_png(rgb(40, 56, seed=i)))
        masks.append(f"{bucket}/p/mask{i}.png")
        storage.write_bytes(masks[-1], encode_png((rgb(40, 56, seed=i)[:, :, 0] > 128)
                                                  .astype(np.uint8) * 255))
    frame = pd.DataFrame({"image_uri": uris, "mask_uri": masks,
                          "label": ["anomaly", "normal"] * 20})
    batch = {k: frame[k].to_numpy(dtype=object) for k in frame}
    clean = images.decode_batch(dict(batch), data_cfg=DataConfig(), geometry=32)
    with FaultProxy(s3_endpoint, rate=0.05, seed=11) as proxy:
        faulty = images.decode_batch(dict(batch), storage_cfg=_cfg(proxy.url),
                                     data_cfg=DataConfig(), geometry=32)
    assert proxy.counts["status503"] + proxy.counts["drop"] >= 1, proxy.counts
    assert all(e is None for e in clean["error"]) and all(e is None for e in faulty["error"])
    np.testing.assert_array_equal(clean["image"], faulty["image"])
    np.testing.assert_array_equal(clean["mask"], faulty["mask"])
