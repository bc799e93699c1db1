"""jobs/export.py: a registered model exported as one graph (pixels -> anomaly map, score) to
TorchScript and ONNX, loaded back with ``torch.jit.load`` / ``onnxruntime.InferenceSession``
and compared with the eager model (the scoring path, :class:`prn_ray.runner.RegisteredModels`)
on real images: demo-generator images always, Magnetic-Tile photos when ../shared/data has them.

The models are registered without training (``helpers.publish_fitted``): random-init backbone
(``model.weights=none``, for speed: the maps mean nothing, only equivalence is checked), normal
reference and patch-memory prior fitted on real normals, decoder head randomised. At 128 px the
eager patch-memory search splits a batch of 5 into two row blocks: a graph traced on 2 images
that baked its row blocks in would fail on it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import TINY, demo_images, job_main, publish_fitted, shared_data

from prn_ray import registry
from prn_ray.cli import run_job
from prn_ray.config import load_config
from prn_ray.images import decode_image, encode_png, resize_image
from prn_ray.runner import RegisteredModels

pytestmark = pytest.mark.timeout(600)
SIZE = 128
TOLERANCE = 1e-4


def config(root: Path, size: int = SIZE):
    return load_config(TINY, [f"storage.models_uri={root}/models", f"data.image_size={size}"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("export")
    cfg = config(root)
    version = publish_fitted(cfg, "fabric", demo_images("fabric", 20, SIZE, seed=0))
    # Unseen images, not all at the model's size: normals and defects of the same product.
    test = (demo_images("fabric", 2, 160, seed=7)
            + demo_images("fabric", 3, 96, seed=7, role=2, defect="scratch"))
    return {"root": root, "cfg": cfg, "version": version, "images": test}


def eager(cfg, product: str, version: str, batch: np.ndarray):
    runner = RegisteredModels(cfg.storage)
    out, _ = runner.run(runner.get(product, version), batch)
    return out.anomaly_map.numpy(), out.score.numpy()


def exported(path: Path, fmt: str, batch: np.ndarray):
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            amap, score = module(torch.from_numpy(batch))
        return amap.numpy(), score.numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return tuple(session.run(["anomaly_map", "score"], {"images": batch}))


def export(world, fmt: str, out: Path, product: str = "fabric", *extra: str) -> dict:
    argv = ["--config", str(TINY), "--set", f"storage.models_uri={world['root']}/models",
            "--product", product, "--format", fmt, "--out", str(out), *extra]
    assert run_job(job_main("export"), argv) == 0
    return json.loads((out / "export.json").read_text())


def compare(world, product: str, version: str, fmt: str, images: list[np.ndarray], size: int,
            out: Path) -> tuple[float, float]:
    doc = export(world, fmt, out, product)
    assert doc["product"] == product and doc["version"] == version
    batch = np.stack([resize_image(im, size) for im in images])  # export.json's preprocessing
    want_map, want_score = eager(world["cfg"], product, version, batch)
    got_map, got_score = exported(out / doc["file"], fmt, batch)
    assert got_map.shape == want_map.shape == (len(images), 1, size, size)
    d_map = float(np.abs(got_map - want_map).max())
    d_score = float(np.abs(got_score - want_score).max())
    print(f"\n{product} {fmt}: max |exported - eager| map {d_map:.3g}, score {d_score:.3g} "
          f"({len(images)} images)")
    assert d_map <= TOLERANCE and d_score <= TOLERANCE
    assert want_map.std() > 1e-3  # the maps vary: a constant output would compare trivially
    # Any batch size: one image at a time gives the same as the batch.
    one_map, one_score = exported(out / doc["file"], fmt, batch[:1])
    np.testing.assert_allclose(one_score, got_score[:1], atol=TOLERANCE)
    np.testing.assert_allclose(one_map, got_map[:1], atol=TOLERANCE)
    return d_map, d_score


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_eager_on_demo_images(world, fmt, tmp_path):
    compare(world, "fabric", world["version"], fmt, world["images"], SIZE, tmp_path / fmt)
    assert sorted(p.name for p in (tmp_path / fmt).iterdir()) == sorted(
        ["export.json", "model.pt" if fmt == "torchscript" else "model.onnx"])


def test_export_json_describes_input_threshold_and_provenance(world, tmp_path):
    doc = export(world, "torchscript", tmp_path / "ts")
    mv = registry.load(world["cfg"].storage, "fabric")
    assert doc["threshold"] == pytest.approx(mv.threshold)
    assert doc["input"] == {"name": "images", "channel_order": "RGB", "dtype": "uint8",
                            "layout": "NHWC", "shape": ["batch", SIZE, SIZE, 3],
                            "value_range": [0, 255]}
    assert doc["preprocessing"]["size"] == [SIZE, SIZE]
    assert len(doc["preprocessing"]["mean"]) == len(doc["preprocessing"]["std"]) == 3
    assert doc["outputs"]["anomaly_map"]["shape"] == ["batch", 1, SIZE, SIZE]
    assert datetime.fromisoformat(doc["created_at"]) >= datetime.fromisoformat(
        doc["model_created_at"])
    assert doc["check"]["anomaly_map"] <= TOLERANCE and doc["check"]["score"] <= TOLERANCE


def test_float_input_export(world, tmp_path):
    doc = export(world, "onnx", tmp_path / "f32", "fabric", "--input-dtype", "float32")
    assert doc["input"]["layout"] == "NCHW" and doc["input"]["dtype"] == "float32"
    batch = np.stack([resize_image(im, SIZE) for im in world["images"][:3]])
    want_map, want_score = eager(world["cfg"], "fabric", world["version"], batch)
    x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), np.float32) / np.float32(255.0)
    got_map, got_score = exported(tmp_path / "f32" / doc["file"], "onnx", x)
    assert np.abs(got_map - want_map).max() <= TOLERANCE
    assert np.abs(got_score - want_score).max() <= TOLERANCE


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_tiled_export_loop_equals_the_scoring_path(world, fmt, tmp_path):
    """A tiled model's graph scores tiles; predict_image (export.json's geometry around the
    graph) gives the map and score of the scorer's path (predict: decode, views, stitch)."""
    from prn_ray.export import predict_image
    from prn_ray.geometry import Geometry
    from prn_ray.predict import predict
    from prn_ray.scoring.table import MAP_PNG_MAX

    geometry = Geometry((64, 64), scale=0.8, overlap=16)
    cfg = world["cfg"]
    version = publish_fitted(cfg, "tiled", demo_images("fabric", 8, 160, seed=2),
                             geometry=geometry)
    doc = export(world, fmt, tmp_path / fmt, "tiled")
    assert Geometry.from_doc(doc["geometry"]) == geometry and "tile" in doc["geometry"]["how"]
    data = (tmp_path / fmt / doc["file"]).read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    test = world["images"] + demo_images("fabric", 1, 200, seed=9)  # 160, 96 and 200 px
    for i, im in enumerate(test):
        (folder / f"{i}.png").write_bytes(encode_png(im[:, : im.shape[1] * 3 // 4]))
    summary = predict(cfg, "tiled", str(folder), str(tmp_path / "pred"), version=version)
    assert summary.counts["scored"] == len(test)
    for row in summary.rows:
        img = decode_image(Path(row.file).read_bytes())
        assert geometry.n_views(*img.shape[:2]) > 1  # really tiled
        amap, score = predict_image(data, fmt, doc, img)
        assert abs(score - row.score) <= TOLERANCE
        stored = cv2.imread(str(tmp_path / "pred" / row.map_png), cv2.IMREAD_UNCHANGED)
        want = cv2.resize(amap, stored.shape[::-1], interpolation=cv2.INTER_LINEAR)
        assert np.abs(stored / MAP_PNG_MAX - want).max() <= TOLERANCE + 1.0 / MAP_PNG_MAX


@pytest.mark.parametrize("extra,message", [
    (["--product", "nope"], "no model registered for product 'nope'"),
    (["--product", "fabric", "--version", "v19990101-000000-000000"], "no version 'v19990101-000000-000000' of product 'fabric'"),
])
def test_unknown_product_or_version_exits_2(world, tmp_path, capsys, extra, message):
    argv = ["--config", str(TINY), "--set", f"storage.models_uri={world['root']}/models",
            "--format", "torchscript", "--out", str(tmp_path / "x"), *extra]
    assert run_job(job_main("export"), argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


@pytest.mark.realdata
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_eager_on_magnetic_tile(world, fmt, tmp_path):
    root = shared_data("magnetic_tile")
    free = sorted((root / "MT_Free" / "Imgs").glob("*.jpg"))
    defects = [min((root / c / "Imgs").glob("*.jpg"))
               for c in ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray")]
    read = [decode_image(p.read_bytes()) for p in free[:16] + free[-2:] + defects]
    cfg = world["cfg"]
    product = "magnetic_tile"
    version = (registry.latest_version(cfg.storage, product)
               or publish_fitted(cfg, product, read[:16]))
    compare(world, product, version, fmt, read[16:], SIZE, tmp_path / fmt)


def test_an_image_head_scores_the_exported_loop_and_predict_alike(world, tmp_path):
    """A version with an image head: export.json carries it, and predict_image and predict
    both score with it (the head of the stitched map, not the map rule)."""
    from prn_ray.export import predict_image
    from prn_ray.geometry import Geometry
    from prn_ray.image_head import SIZE_FREE, ImageHead
    from prn_ray.inference import ScoreRule
    from prn_ray.predict import predict

    geometry = Geometry((64, 64), scale=0.8, overlap=16)
    head = ImageHead(SIZE_FREE, 20, 3, (0.0,) * 5, (1.0,) * 5, (0.5, -0.2, 0.3, 0.1, 0.4), -1.0)
    cfg = world["cfg"]
    version = publish_fitted(cfg, "headed", demo_images("fabric", 8, 160, seed=2),
                             geometry=geometry, calibration={"image_head": head.to_doc()})
    doc = export(world, "torchscript", tmp_path / "ts", "headed")
    assert ImageHead.from_doc(doc["outputs"]["score"]["head"]) == head
    data = (tmp_path / "ts" / doc["file"]).read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    for i, im in enumerate(demo_images("fabric", 2, 200, seed=9)):
        (folder / f"{i}.png").write_bytes(encode_png(im))
    summary = predict(cfg, "headed", str(folder), str(tmp_path / "pred"), version=version)
    assert summary.counts["scored"] == 2
    for row in summary.rows:
        amap, score = predict_image(data, "torchscript", doc, decode_image(
            Path(row.file).read_bytes()))
        assert score == pytest.approx(head(amap), abs=1e-6)
        assert abs(score - row.score) <= TOLERANCE
        plain = ScoreRule("topk_mean", 20, 3)(amap)
        assert abs(plain - score) > 10 * TOLERANCE  # the head, not the map rule
