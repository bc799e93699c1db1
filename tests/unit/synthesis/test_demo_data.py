"""The procedural demo dataset: layout, determinism, pixel-accurate masks, speed."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import REPO

from prn_ray import demo_data
from prn_ray.images import decode_image, decode_mask


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_layout_and_determinism(tmp_path):
    kw = dict(products=("wood_panel", "metal_plate"), n_train=3, n_good_test=2, n_defect_test=5,
              image_size=40)
    s = demo_data.make_dataset(str(tmp_path / "a"), **kw)
    demo_data.make_dataset(str(tmp_path / "b"), **kw)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b  # same seed -> byte-identical files
    assert s["n_images"] == 2 * (3 + 2 + 5) and s["n_masks"] == 10
    assert s["products"]["wood_panel"]["test_defect"] == {
        "scratch": 2, "dent": 1, "stain": 1, "crack": 1
    }
    assert sorted(k for k in a if k.startswith("wood_panel/")) == sorted(
        [f"wood_panel/train/good/{i:03d}.png" for i in range(3)]
        + [f"wood_panel/test/good/{i:03d}.png" for i in range(2)]
        + ["wood_panel/test/scratch/000.png", "wood_panel/test/scratch/001.png",
           "wood_panel/test/dent/000.png", "wood_panel/test/stain/000.png",
           "wood_panel/test/crack/000.png"]
        + ["wood_panel/ground_truth/scratch/000_mask.png",
           "wood_panel/ground_truth/scratch/001_mask.png",
           "wood_panel/ground_truth/dent/000_mask.png",
           "wood_panel/ground_truth/stain/000_mask.png",
           "wood_panel/ground_truth/crack/000_mask.png"]
    )
    # an image does not depend on how many others are generated; the seed changes everything
    demo_data.make_dataset(str(tmp_path / "c"), **{**kw, "n_train": 5})
    c = _files(tmp_path / "c")
    assert all(c[k] == v for k, v in a.items())
    demo_data.make_dataset(str(tmp_path / "d"), **{**kw, "seed": 1})
    d = _files(tmp_path / "d")
    assert sum(d[k] == v for k, v in a.items()) == 0
    # images decode to the right shapes; metal_plate is stored as 1-channel greyscale
    grey = cv2.imdecode(np.frombuffer(a["metal_plate/train/good/000.png"], np.uint8), -1)
    assert grey.shape == (40, 40)
    colour = decode_image(a["wood_panel/test/dent/000.png"], 10**8, 8)
    assert colour.shape == (40, 40, 3)
    mask = decode_mask(a["wood_panel/ground_truth/dent/000_mask.png"], (40, 40), 127)
    assert mask.any() and set(np.unique(mask)) == {0, 1}
    raw = cv2.imdecode(np.frombuffer(a["wood_panel/ground_truth/dent/000_mask.png"], np.uint8), -1)
    assert set(np.unique(raw)) == {0, 255}
    with pytest.raises(ValueError, match="unknown demo product"):
        demo_data.make_dataset(str(tmp_path / "e"), products=("toaster",))


@pytest.mark.parametrize("product", demo_data.PRODUCTS)
def test_masks_are_pixel_accurate(product):
    size = 64
    for k, defect in enumerate(demo_data.DEFECTS):
        for index in range(3):
            rng = np.random.default_rng([5, k, index])
            img, region = demo_data._PRODUCT_FNS[product](rng, size)
            trial = img.copy()
            mask = demo_data._DEFECT_FNS[defect](rng, trial, region)
            changed = np.any(trial != img, axis=2)
            assert mask.any(), (product, defect, index)
            assert not (changed & ~mask).any(), "pixels changed outside the mask"
            assert not (mask & ~region).any(), "defect outside the product region"
            assert changed.sum() >= 0.9 * mask.sum(), "mask pixels left unchanged"


def test_defects_are_visible():
    """Defective pixels differ clearly from the same image without the defect."""
    for product in demo_data.PRODUCTS:
        for defect in demo_data.DEFECTS:
            img, mask = demo_data.render(product, 64, 0, 9, 0, defect)
            assert mask is not None and mask.sum() >= 6
            img = img.astype(np.float32).reshape(64, 64, -1)
            inside = img[mask.astype(bool)].mean(axis=0)
            ring = cv2.dilate(mask, np.ones((7, 7), np.uint8)).astype(bool) & ~mask.astype(bool)
            outside = img[ring].mean(axis=0)
            assert np.abs(inside - outside).max() > 8, (product, defect)


def test_default_dataset_is_fast(tmp_path):
    t0 = time.perf_counter()
    s = demo_data.make_dataset(str(tmp_path / "demo"))  # 4 products x (40 + 10 + 12) at 128 px
    elapsed = time.perf_counter() - t0
    assert s["n_images"] == 4 * 62 and s["n_masks"] == 4 * 12
    assert elapsed < 30, f"demo dataset took {elapsed:.1f}s"


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("mdd", REPO / "jobs" / "make_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cli"
    rc = mod.main(["--out", str(out), "--size", "32", "--products", "fabric,bottle_cap",
                   "--n-train", "2", "--n-good-test", "1", "--n-defect-test", "2"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 10 and sorted(summary["products"]) == ["bottle_cap", "fabric"]
    assert (out / "bottle_cap" / "ground_truth" / "dent" / "000_mask.png").is_file()
