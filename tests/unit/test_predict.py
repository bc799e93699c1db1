"""jobs/predict.py (no Ray): a folder of good images, a broken file and a non-image file gives
one row per file in predictions.csv, reasons on the bad ones, 16-bit maps and overlays at each
image's own size, and the eager model's scores.

The model is registered without training (``helpers.publish_fitted``: random-init backbone
``model.weights=none`` for speed, reference fitted on demo normals): the scores mean nothing,
only the plumbing is checked.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TINY, demo_images, job_main, publish_fitted

from prn_ray import registry
from prn_ray.cli import run_job
from prn_ray.config import load_config
from prn_ray.images import decode_image, encode_png, resize_image
from prn_ray.runner import RegisteredModels
from prn_ray.scoring.table import png_to_map

pytestmark = pytest.mark.timeout(300)
SIZE = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("predict")
    cfg = load_config(TINY, [f"storage.models_uri={root}/models", f"data.image_size={SIZE}"])
    version = publish_fitted(cfg, "fabric", demo_images("fabric", 16, SIZE, seed=0))
    folder = root / "incoming"
    (folder / "line2").mkdir(parents=True)
    good = {
        "good_0.png": demo_images("fabric", 1, 64, seed=9)[0],
        "good_1.png": cv2.resize(demo_images("fabric", 1, 96, seed=9)[0], (120, 80)),
        "line2/defect_0.png": demo_images("fabric", 1, 100, seed=9, role=2, defect="stain")[0],
    }
    for name, img in good.items():
        (folder / name).write_bytes(encode_png(img))
    (folder / "broken.png").write_bytes(np.random.default_rng(0).bytes(3000))
    (folder / "notes.txt").write_bytes(b"operator notes, not an image\n")
    return {"root": root, "cfg": cfg, "version": version, "folder": folder, "good": good}


def run_predict(world, out, *extra) -> int:
    argv = ["--config", str(TINY), "--set", f"storage.models_uri={world['root']}/models",
            "--product", "fabric", "--out", str(out), *extra]
    return run_job(job_main("predict"), argv)


def test_folder_gives_one_row_per_file_and_the_eager_scores(world, tmp_path):
    out = tmp_path / "out"
    assert run_predict(world, out, "--input", str(world["folder"]), "--batch-size", "2") == 0
    df = pd.read_csv(out / "predictions.csv")
    files = sorted(str(p) for p in world["folder"].rglob("*") if p.is_file())
    assert sorted(df["file"]) == files  # one row per file, nothing else
    df = df.set_index("file")
    for bad in ("broken.png", "notes.txt"):
        row = df.loc[str(world["folder"] / bad)]
        assert row["error"].split(":")[0] in ("not_an_image", "corrupt"), row["error"]
        assert len(row["error"].split(":", 1)[1].strip()) > 0  # a reason, not just a code
        assert pd.isna(row["score"]) and pd.isna(row["map_png"]) and pd.isna(row["overlay_png"])
    # Eager: the registered model on the same decoded, resized images in one batch.
    names = sorted(world["good"])
    batch = np.stack([resize_image(decode_image((world["folder"] / n).read_bytes()), SIZE)
                      for n in names])
    runner = RegisteredModels(world["cfg"].storage)
    want, _ = runner.run(runner.get("fabric", world["version"]), batch)
    threshold = registry.load(world["cfg"].storage, "fabric").threshold
    for j, name in enumerate(names):
        row = df.loc[str(world["folder"] / name)]
        assert pd.isna(row["error"])
        assert row["score"] == pytest.approx(float(want.score[j]), abs=1e-6)
        assert row["threshold"] == pytest.approx(threshold)
        assert bool(row["is_anomaly"]) == (row["score"] > threshold)
        assert row["model_version"] == world["version"]
        h, w = world["good"][name].shape[:2]
        amap = png_to_map((out / row["map_png"]).read_bytes())
        raw = cv2.imread(str(out / row["map_png"]), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16 and amap.shape == (h, w)
        small = cv2.resize(amap, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        assert np.abs(small - want.anomaly_map[j, 0].numpy()).mean() < 0.02
        over = decode_image((out / row["overlay_png"]).read_bytes())
        assert over.shape == (h, w, 3)
        assert not np.array_equal(over, world["good"][name])  # the heat map is on it
    assert str(df.loc[str(world["folder"] / "line2/defect_0.png"), "map_png"]) == \
        "maps/line2/defect_0.png"


@pytest.mark.parametrize("threshold,flagged", [("-1", True), ("1", False)])
def test_single_file_and_threshold_override(world, tmp_path, threshold, flagged):
    out = tmp_path / "one"
    path = world["folder"] / "good_0.png"
    assert run_predict(world, out, "--input", str(path), "--threshold", threshold) == 0
    df = pd.read_csv(out / "predictions.csv")
    assert list(df["file"]) == [str(path)] and bool(df["is_anomaly"][0]) is flagged
    assert df["threshold"][0] == float(threshold) and (out / "maps" / "good_0.png").is_file()


@pytest.mark.parametrize("args,message", [
    (["--input", "MISSING"], "no such file or folder"),
    (["--input", "FOLDER", "--version", "v19990101-000000-000000"], "no version"),
])
def test_bad_input_exits_2(world, tmp_path, capsys, args, message):
    args = [str(tmp_path / "missing") if a == "MISSING" else
            str(world["folder"]) if a == "FOLDER" else a for a in args]
    with pytest.raises(SystemExit) as exc:  # argparse's p.error, or run_job's status 2
        raise SystemExit(run_predict(world, tmp_path / "o", *args))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o")
