"""Decoding and validation: every bad input gets its own reason, good rows are unaffected."""

from __future__ import annotations

import io
import os
import struct
import time

import numpy as np
import pytest
from helpers import bad_files, pil_bytes, png_with_size, rgb
from PIL import Image

from prn_ray import storage
from prn_ray.config import DataConfig, StorageConfig
from prn_ray.contracts import MASK_UNKNOWN
from prn_ray.images import (
    ImageError,
    decode_batch,
    decode_image,
    decode_mask,
    encode_png,
    image_size_from_header,
    resize_image,
    resize_mask,
)

MAXPIX = DataConfig().max_image_pixels


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(data, kw.get("max_pixels", MAXPIX), kw.get("min_side", 8))
    return info.value.reason


# ----------------------------------------------------------------------------- good inputs


def test_png_and_jpeg_decode_to_rgb():
    img = rgb()
    out = decode_image(encode_png(img), MAXPIX, 8)
    assert out.dtype == np.uint8 and out.shape == (40, 56, 3)
    np.testing.assert_array_equal(out, img)  # RGB order preserved through encode/decode
    jpg = pil_bytes(Image.fromarray(img), "JPEG", quality=95)
    out = decode_image(jpg, MAXPIX, 8)
    ref = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    assert out.shape == ref.shape and np.abs(out.astype(int) - ref).mean() < 3


def test_greyscale_becomes_three_equal_channels():
    grey = np.arange(40 * 56, dtype=np.uint32).reshape(40, 56).astype(np.uint8)
    out = decode_image(encode_png(grey), MAXPIX, 8)
    assert out.shape == (40, 56, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_16bit_png_scaled_by_257():
    values = np.linspace(0, 65535, 40 * 56).astype(np.uint16).reshape(40, 56)
    values[0, :4] = [0, 257, 65535, 32896]
    data = encode_png(values)
    assert image_size_from_header(data) == (56, 40)
    out = decode_image(data, MAXPIX, 8)
    assert out.dtype == np.uint8 and out.shape == (40, 56, 3)
    np.testing.assert_array_equal(out[0, :4, 0], [0, 1, 255, 128])
    expected = np.round(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 1], expected)
    # 16-bit colour keeps the channel order
    rgb16 = np.zeros((10, 10, 3), np.uint16)
    rgb16[..., 0] = 65535
    rgb16[..., 2] = 257 * 100
    out = decode_image(encode_png(rgb16), MAXPIX, 8)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 100])


def test_rgba_and_la_drop_alpha():
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[..., 3] = 0  # fully transparent: colour is kept as stored
    out = decode_image(pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), MAXPIX, 8)
    assert out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out[0, 0], [10, 200, 30])
    la = np.zeros((20, 30, 2), np.uint8)
    la[..., 0], la[..., 1] = 90, 255
    out = decode_image(pil_bytes(Image.fromarray(la, "LA"), "PNG"), MAXPIX, 8)
    np.testing.assert_array_equal(out[5, 5], [90, 90, 90])


def test_palette_png_expands_to_rgb():
    img = rgb(24, 24)
    pal = Image.fromarray(img).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out = decode_image(pil_bytes(pal, "PNG"), MAXPIX, 8)
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))


def test_cmyk_jpeg_decodes_to_sensible_rgb():
    cmyk = Image.new("CMYK", (32, 24), (0, 255, 255, 0))  # pure red ink mix
    data = pil_bytes(cmyk, "JPEG", quality=95)
    out = decode_image(data, MAXPIX, 8)
    assert out.shape == (24, 32, 3)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(out.astype(int) - ref).max() <= 8
    r, g, b = out[12, 16].astype(int)
    assert r > 200 and g < 40 and b < 40  # red, not cyan (inverted) or garbage


def test_bmp_and_tiff_decode():
    img = rgb(16, 20)
    for fmt in ("BMP", "TIFF"):
        out = decode_image(pil_bytes(Image.fromarray(img), fmt), MAXPIX, 8)
        np.testing.assert_array_equal(out, img)


# ----------------------------------------------------------------------------- bad inputs


def test_zero_byte_file():
    assert _reason(b"") == "empty_file"


def test_truncated_jpeg():
    jpg = pil_bytes(Image.fromarray(rgb(64, 64)), "JPEG")
    assert _reason(jpg[: len(jpg) // 2]) == "truncated"
    assert _reason(jpg[:-2]) == "truncated"  # only the EOI marker missing
    assert _reason(jpg[:40]) == "truncated"  # cut inside the header


def test_truncated_png():
    png = encode_png(rgb(64, 64))
    assert _reason(png[: len(png) // 2]) == "truncated"
    assert _reason(png[:-12]) == "truncated"  # IEND chunk missing
    assert _reason(png[:20]) == "truncated"  # cut inside IHDR


def test_text_file_named_png():
    assert _reason(b"this is a text file that was saved as image.png\n" * 3) == "not_an_image"


def test_one_pixel_image_too_small():
    assert _reason(encode_png(np.zeros((1, 1, 3), np.uint8))) == "too_small"
    assert _reason(encode_png(np.zeros((7, 100), np.uint8))) == "too_small"
    assert decode_image(encode_png(np.zeros((1, 1), np.uint8)), MAXPIX, 1).shape == (1, 1, 3)


def test_decompression_bomb_rejected_from_header():
    bomb = png_with_size(50_000, 50_000)
    assert len(bomb) < 200
    assert image_size_from_header(bomb) == (50_000, 50_000)
    t0 = time.perf_counter()
    with pytest.raises(ImageError) as info:
        decode_image(bomb, MAXPIX, 8)
    assert info.value.reason == "too_large"
    assert "50000x50000" in info.value.message
    assert time.perf_counter() - t0 < 1.0  # rejected from the header, nothing allocated
    # The limit is the configured one, checked before decoding: a 64x64 image vs 1000 px.
    assert _reason(encode_png(rgb(64, 64)), max_pixels=1000) == "too_large"


def test_jpeg_bomb_rejected_from_header():
    jpg = bytearray(pil_bytes(Image.fromarray(rgb(16, 16)), "JPEG"))
    i = jpg.find(b"\xff\xc0")
    jpg[i + 5 : i + 9] = struct.pack(">HH", 60_000, 60_000)
    assert _reason(bytes(jpg)) == "too_large"


def test_image_error_is_picklable():
    import pickle

    err = pickle.loads(pickle.dumps(ImageError("truncated", "cut")))
    assert err.reason == "truncated" and str(err) == "truncated: cut"


# ----------------------------------------------------------------------------- masks


def test_soft_mask_binarised_at_threshold():
    soft = np.tile(np.arange(256, dtype=np.uint8), (10, 1))  # 10 x 256, values 0..255
    mask = decode_mask(encode_png(soft), (10, 256), threshold=127)
    assert mask.dtype == np.uint8 and mask.shape == (10, 256)
    assert set(np.unique(mask)) == {0, 1}
    np.testing.assert_array_equal(mask, (soft > 127).astype(np.uint8))
    assert mask[0, 127] == 0 and mask[0, 128] == 1
    np.testing.assert_array_equal(decode_mask(encode_png(soft), (10, 256), 200), soft > 200)


def test_label_masks_mark_every_nonzero_pixel():
    """VisA stores a defect's class index (1..6) in its mask, not 255: at threshold 127 such
    masks would be empty."""
    labels = np.zeros((10, 20), np.uint8)
    labels[2:5, 3:9] = 3
    labels[7:9, 1:4] = 6
    want = (labels > 0).astype(np.uint8)
    for arr in (labels, labels.astype(np.uint16), labels.clip(0, 1)):
        np.testing.assert_array_equal(decode_mask(encode_png(arr), (10, 20), 127), want)
    soft = labels.astype(np.uint8) * 40  # values above the threshold: a soft mask, thresholded
    np.testing.assert_array_equal(decode_mask(encode_png(soft), (10, 20), 127), soft > 127)
    assert decode_mask(encode_png(np.zeros((10, 20), np.uint8)), (10, 20), 127).sum() == 0


def test_colour_and_16bit_masks():
    m = np.zeros((12, 12, 3), np.uint8)
    m[2:5, 2:5, 0] = 255  # red-only defect region
    out = decode_mask(encode_png(m), (12, 12), 127)
    assert out.sum() == 9
    m16 = np.zeros((12, 12), np.uint16)
    m16[0, 0] = 65535
    assert decode_mask(encode_png(m16), (12, 12), 127).sum() == 1


def test_mask_of_wrong_size():
    data = encode_png(np.full((20, 30), 255, np.uint8))
    with pytest.raises(ImageError) as info:
        decode_mask(data, (40, 56), 127)
    assert info.value.reason == "mask_size_mismatch"
    assert "30x20" in info.value.message and "56x40" in info.value.message


def test_missing_and_unreadable_mask():
    with pytest.raises(ImageError) as info:
        decode_mask(None, (10, 10), 127)
    assert info.value.reason == "mask_missing"
    for bad in (b"", b"not a mask at all", encode_png(np.zeros((10, 10), np.uint8))[:30]):
        with pytest.raises(ImageError) as info:
            decode_mask(bad, (10, 10), 127)
        assert info.value.reason == "mask_unreadable"


# ----------------------------------------------------------------------------- resize


def test_resize_image_and_mask():
    img = rgb(100, 300)
    out = resize_image(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    up = resize_image(rgb(20, 30), 64)
    assert up.shape == (64, 64, 3)
    mixed = resize_image(rgb(30, 200), 64)  # enlarged in height, shrunk in width
    assert mixed.shape == (64, 64, 3)
    flat = np.full((30, 200, 3), 77, np.uint8)
    np.testing.assert_array_equal(resize_image(flat, 64), 77)
    mask = np.zeros((100, 300), np.uint8)
    mask[40:60, 100:200] = 1
    rm = resize_mask(mask, 64)
    assert rm.shape == (64, 64) and set(np.unique(rm)) == {0, 1}


# ----------------------------------------------------------------------------- decode_batch


def _column(values) -> np.ndarray:
    return np.array(values, dtype=object)


def test_decode_batch_on_s3_bad_inputs_become_error_rows(s3_bucket):
    cfg = StorageConfig()
    files = bad_files()
    for name, (data, _) in files.items():
        storage.write_bytes(storage.join(s3_bucket, "imgs", name), data, cfg)
    good = files["good.png"][0]
    # masks for anomaly rows: right size, soft, wrong size, missing object, none
    soft = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    storage.write_bytes(storage.join(s3_bucket, "m/soft.png"), encode_png(soft), cfg)
    storage.write_bytes(
        storage.join(s3_bucket, "m/small.png"), encode_png(np.zeros((10, 10), np.uint8)), cfg
    )
    names = list(files)
    uris = [storage.join(s3_bucket, "imgs", n) for n in names]
    masks = [""] * len(names)
    labels = ["normal"] * len(names)
    expected = [files[n][1] for n in names]
    good_uri = storage.join(s3_bucket, "imgs", "good.png")
    extra = [
        ("anomaly", good_uri, storage.join(s3_bucket, "m/soft.png"), None),
        ("anomaly", good_uri, storage.join(s3_bucket, "m/small.png"), "mask_size_mismatch"),
        ("anomaly", good_uri, "", None),  # no mask named: an image-level label
        ("anomaly", good_uri, storage.join(s3_bucket, "m/nope.png"), "mask_missing"),
        ("normal", storage.join(s3_bucket, "imgs/does-not-exist.png"), "", "unreadable"),
    ]
    for label, uri, mask, reason in extra:
        labels.append(label)
        uris.append(uri)
        masks.append(mask)
        expected.append(reason)
    n = len(uris)
    batch = {
        "image_uri": _column(uris),
        "mask_uri": _column(masks),
        "label": _column(labels),
        "row_id": np.arange(n),
    }
    t0 = time.perf_counter()
    out = decode_batch(batch, storage_cfg=cfg, data_cfg=DataConfig(), geometry=32)
    assert time.perf_counter() - t0 < 20
    assert out["image"].shape == (n, 32, 32, 3) and out["image"].dtype == np.uint8
    assert out["mask"].shape == (n, 32, 32) and out["mask"].dtype == np.uint8
    assert out["orig_height"].dtype == np.int32 and out["orig_width"].dtype == np.int32
    np.testing.assert_array_equal(out["row_id"], np.arange(n))  # input columns preserved
    np.testing.assert_array_equal(out["image_uri"], batch["image_uri"])
    reasons = [None if e is None else e.split(":", 1)[0] for e in out["error"]]
    assert reasons == expected, list(zip(uris, out["error"], strict=True))
    ref = resize_image(decode_image(good, MAXPIX, 8), 32)
    for i, reason in enumerate(expected):
        if reason is None:
            assert (out["orig_height"][i], out["orig_width"][i]) == (48, 64)
            assert out["image"][i].any()
        else:
            assert not out["image"][i].any() and not out["mask"][i].any()
    np.testing.assert_array_equal(out["image"][0], ref)  # good row unaffected by its neighbours
    soft_row = len(names)
    expected_mask = resize_mask((soft > 127).astype(np.uint8), 32)
    np.testing.assert_array_equal(out["mask"][soft_row], expected_mask)
    # the anomaly without a mask: every pixel's label unknown (not 0, not 1)
    assert (out["mask"][soft_row + 2] == MASK_UNKNOWN).all() and out["image"][soft_row + 2].any()
    # the unreadable object: redacted message without credential values
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    msg = out["error"][-1]
    assert "does-not-exist.png" in msg
    assert secret not in msg and key_id not in msg
    assert all(secret not in (e or "") for e in out["error"])


def test_decode_batch_without_masks_for_scoring(tmp_path):
    paths = []
    for name, (data, _) in list(bad_files().items())[:6]:
        p = tmp_path / name
        p.write_bytes(data)
        paths.append(str(p))
    out = decode_batch(
        {"image_uri": np.array(paths)}, storage_cfg=None, data_cfg=DataConfig(), geometry=24
    )
    assert out["mask"].shape == (6, 24, 24) and not out["mask"].any()
    assert [e.split(":")[0] if e else None for e in out["error"]] == [None] * 5 + ["empty_file"]
    empty = decode_batch({"image_uri": np.array([], dtype=object)}, data_cfg=DataConfig(),
                         geometry=24)
    assert empty["image"].shape == (0, 24, 24, 3) and len(empty["error"]) == 0


def test_unreadable_storage_error_is_redacted(monkeypatch, tmp_path):
    """A storage exception that quotes a secret reaches the error row redacted."""
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]

    def boom(uri, cfg=None):
        raise OSError(f"access denied for key with aws_secret_access_key={secret} ({secret})")

    monkeypatch.setattr(storage, "read_bytes", boom)
    out = decode_batch({"image_uri": np.array(["s3://b/x.png"], dtype=object)},
                       data_cfg=DataConfig(), geometry=16)
    assert out["error"][0].startswith("unreadable: ")
    assert secret not in out["error"][0]


def test_fast_png_is_lossless_for_16_bit_maps():
    """The scorer's map encoding (zlib level 1, sub filter) reads back bit for bit."""
    import cv2

    rng = np.random.default_rng(0)
    smooth = cv2.resize(rng.random((12, 20)).astype(np.float32), (373, 248))
    for arr in ((smooth * 65535).astype(np.uint16),
                rng.integers(0, 65536, (31, 17)).astype(np.uint16)):
        back = cv2.imdecode(np.frombuffer(encode_png(arr, fast=True), np.uint8),
                            cv2.IMREAD_UNCHANGED)
        assert back.dtype == np.uint16
        np.testing.assert_array_equal(back, arr)
