"""Large and non-square images end to end: a 1500 x 1000 product and a 4096 x 256 one go
through ``train_all`` -> ``score`` -> ``evaluate`` -> ``predict`` with ``data.tiles: auto`` on a
real local Ray, and each job follows the geometry the rule chose (tiles, cut scale, maps back
at the image's own size). Random backbone weights (configs/tiny.yaml): the machinery, not
accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import TINY, job_main

from prn_ray import registry, storage
from prn_ray.config import load_config
from prn_ray.demo_data import make_dataset
from prn_ray.geometry import Geometry
from prn_ray.scoring.table import read_scores

pytestmark = pytest.mark.timeout(900)
SIZES = {"big": (1000, 1500), "strip": (256, 4096)}  # product -> (height, width)
SOURCE = {"big": "metal_plate", "strip": "fabric"}
DATE = "2026-12-07"


def _stretched_tree(src: Path, dst: Path) -> None:
    """The demo tree at src, every image and mask resized to its product's large size."""
    for product, source in SOURCE.items():
        h, w = SIZES[product]
        for path in (src / source).rglob("*.png"):
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            nearest = "ground_truth" in path.parts
            out = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST if nearest
                             else cv2.INTER_LINEAR)
            target = dst / product / path.relative_to(src / source)
            target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target), out)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiles")
    make_dataset(str(base / "src"), products=tuple(SOURCE.values()), n_train=8, n_good_test=2,
                 n_defect_test=6, image_size=128, seed=3)
    _stretched_tree(base / "src", base / "data")
    sets = ["--config", str(TINY), "--set", f"data.root={base / 'data'}",
            "--set", f"storage.models_uri={base / 'models'}",
            "--set", f"storage.runs_uri={base / 'runs'}", "--set", "data.tiles.mode=auto",
            "--set", "data.tiles.overlap=16", "--set", "data.seen_anomalies=2",
            "--set", "model.image_head=true",
            "--set", "train.epochs=1"]
    return base, sets


def test_large_images_train_score_evaluate_and_predict_in_tiles(world, capsys):
    base, sets = world
    assert job_main("train_all")([*sets, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    inputs = plan.split("input per product")[1].splitlines()
    for product in SIZES:
        line = next(x for x in inputs if x.strip().startswith(f"{product}:"))
        assert "tiles of 64x64" in line, line

    assert job_main("train_all")(sets) == 0
    cfg = load_config(TINY, [s for s in sets[3::2]])
    geometries = {}
    for product, (h, w) in SIZES.items():
        mv = registry.load(cfg.storage, product)
        g = mv.geometry
        geometries[product] = g
        assert g.tiled and g.size == (64, 64) and 1 < g.n_views(h, w) <= 8, g
        assert mv.config.data.tiles.mode == "on"  # the choice is pinned in the model's config
        doc = json.loads(storage.read_text(f"{mv.uri}/config.json"))
        assert Geometry.from_doc(doc["geometry"]) == g and doc["image_size"] == 64
        assert np.isfinite(mv.threshold)
        assert mv.image_head is not None  # fitted at the best epoch, scores every path below

    scores = str(base / "scores")
    assert job_main("score")([*sets, "--set", f"score.output_uri={scores}",
                              "--input", str(base / "data"), "--date", DATE]) == 0
    df = read_scores(scores, date=DATE)
    files = sorted(str(p) for p in (base / "data").rglob("*.png"))  # masks are images too
    assert sorted(df["image_uri"]) == files  # exactly one row per image
    assert df["error"].isna().all()
    for row in df.itertuples():
        png = cv2.imdecode(np.frombuffer(row.anomaly_map_png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert png.shape == SIZES[row.product] == (row.height, row.width)

    out = str(base / "eval")
    assert job_main("evaluate")([*sets, "--out", out]) == 0
    results = json.loads(storage.read_text(f"{out}/results.json"))["products"]
    for product, (h, w) in SIZES.items():
        got = results[product]
        assert all(np.isfinite(got[k]) for k in ("image_auroc", "pixel_auroc", "pixel_ap",
                                                 "image_auroc_map_rule"))
        z = np.load(storage.join(out, "maps", f"{product}.npz"))
        # metrics at the working size: the image at the cut scale, not a squash
        assert z["maps"].shape[1:] == geometries[product].working_size(h, w)
        assert z["masks"].shape == z["maps"].shape

    # predict (no Ray) follows the same geometry: the nightly job's score, map at full size
    test_dir = base / "data" / "big" / "test"
    assert job_main("predict")([*sets, "--product", "big", "--input", str(test_dir),
                                "--out", str(base / "predict")]) == 0
    pred = {r["file"]: r for r in _csv(base / "predict" / "predictions.csv")}
    nightly = df.set_index("image_uri")
    for file, r in pred.items():
        assert float(r["score"]) == pytest.approx(float(nightly.loc[file, "score"]), abs=1e-5)
        m = cv2.imread(str(base / "predict" / r["map_png"]), cv2.IMREAD_UNCHANGED)
        assert m.shape == SIZES["big"]


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))
