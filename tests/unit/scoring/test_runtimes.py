"""score.runtime (no Ray): the exported graph on onnxruntime / OpenVINO gives the scorer's rows
of the eager model — same files, reasons, sizes, scores and maps within the runtime's
tolerance — for a whole-image and a tiled model; a graph that disagrees with its model is
refused with the setting to change; graphs are built once per version on a node.

Models are registered without training (``helpers.publish_fitted``: random-init backbone
``model.weights=none``, reference fitted on demo normals): the scores mean nothing, only the
runtimes' agreement is checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY, demo_images, job_main, publish_fitted

from prn_ray.cli import run_job
from prn_ray.config import load_config
from prn_ray.geometry import Geometry
from prn_ray.images import encode_png
from prn_ray.runtimes import (
    CACHE_ENV,
    TOLERANCE,
    GraphModel,
    RuntimeMismatch,
    graph_file,
    resolve,
)
from prn_ray.scoring.models import resolve_models
from prn_ray.scoring.scorer import Scorer
from prn_ray.scoring.table import MAP_PNG_MAX, png_to_map

pytest.importorskip("onnxruntime", reason="score.runtime needs the cpu-inference extra")
pytest.importorskip("openvino", reason="score.runtime needs the cpu-inference extra")
pytestmark = pytest.mark.timeout(600)
PRODUCTS = ("whole", "tiled")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("runtimes")
    cfg = load_config(TINY, [f"storage.models_uri={root}/models", "data.image_size=64"])
    publish_fitted(cfg, "whole", demo_images("fabric", 12, 64, seed=0))
    publish_fitted(cfg, "tiled", demo_images("fabric", 6, 160, seed=2),
                   geometry=Geometry((64, 64), scale=0.8, overlap=16))
    files = []
    for product in PRODUCTS:
        for i, im in enumerate([*demo_images("fabric", 2, 150, seed=7),
                                demo_images("fabric", 1, 120, seed=8, role=2, defect="stain")[0]]):
            path = root / "in" / product / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(im[:, : im.shape[1] * 3 // 4]))  # not square
            files.append((product, str(path)))
        bad = root / "in" / product / "broken.png"
        bad.write_bytes(np.random.default_rng(0).bytes(2000))
        files.append((product, str(bad)))
    models = resolve_models(cfg, list(PRODUCTS))
    assert all(m.version for m in models.values())
    batch = {"product": np.array([p for p, _ in files], dtype=object),
             "image_uri": np.array([u for _, u in files], dtype=object)}
    return {"cfg": cfg, "models": models, "batch": batch}


def rows(world, runtime: str, precision: str = "fp32") -> list[dict]:
    cfg = world["cfg"]
    scorer = Scorer(world["models"], cfg.storage, {p: i for i, p in enumerate(PRODUCTS)},
                    threads=2, data_cfg=cfg.data, runtime=runtime, precision=precision)
    out = scorer(dict(world["batch"])).to_pylist()
    for product, m in world["models"].items():  # really that runtime, checked on real views
        model = scorer.runner.get(product, m.version)
        if runtime == "torch":
            assert isinstance(model, torch.nn.Module)
        else:
            assert isinstance(model, GraphModel) and model.runtime == runtime
            assert model.check is not None and model.check["views"] > 0
    return out


@pytest.mark.parametrize("runtime,precision", [("onnxruntime", "fp32"), ("openvino", "fp32"),
                                               ("openvino", "bf16")])
def test_graph_runtimes_give_the_eager_rows(world, runtime, precision, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "graphs"))
    want, got = rows(world, "torch"), rows(world, runtime, precision)
    tol_map, tol = TOLERANCE[precision]
    assert len(got) == len(want) == len(world["batch"]["image_uri"])
    scored = 0
    for a, b in zip(want, got):
        assert (a["product"], a["image_uri"], a["error"]) == (b["product"], b["image_uri"],
                                                              b["error"])
        assert (a["height"], a["width"]) == (b["height"], b["width"])
        if a["error"]:
            assert b["score"] is None and b["anomaly_map_png"] is None
            continue
        scored += 1
        assert b["score"] == pytest.approx(a["score"], abs=tol)
        diff = np.abs(png_to_map(a["anomaly_map_png"]) - png_to_map(b["anomaly_map_png"]))
        assert diff.max() <= tol_map + 1.0 / MAP_PNG_MAX
        assert (a["threshold"], a["model_version"]) == (b["threshold"], b["model_version"])
    assert scored == 6  # 3 readable images per product, the tiled ones cut into tiles


def test_a_graph_that_disagrees_with_its_model_is_refused(world, tmp_path, monkeypatch):
    """The graph of one model checked against another (as a stale or broken graph would be)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "graphs"))
    from prn_ray import registry

    cfg = world["cfg"]
    mv = registry.load(cfg.storage, "whole")
    path = graph_file(mv.build().eval(), "whole", mv.version, mv.image_size)
    other = mv.build().eval()
    torch.nn.init.normal_(other.head.decoder.head.weight, std=0.5)  # another model
    graph = GraphModel(other, path, "onnxruntime", "fp32", threads=1)
    views = np.stack(demo_images("fabric", 3, 64, seed=4))
    with pytest.raises(RuntimeMismatch, match="score.runtime=torch"):
        graph.probabilities(views)
    with pytest.raises(RuntimeMismatch):  # refused every time, not only on the first batch
        graph.probabilities(views)
    same = GraphModel(mv.build().eval(), path, "onnxruntime", "fp32", threads=1)
    same.probabilities(views)
    assert same.check["max_abs_map"] <= TOLERANCE["fp32"][0] and same.check["views"] == 3


def test_graphs_are_built_once_per_version_on_a_node(world, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "graphs"))
    from prn_ray import registry

    mv = registry.load(world["cfg"].storage, "whole")
    first = graph_file(mv.build().eval(), "whole", mv.version, mv.image_size)
    stamp = first.stat().st_mtime_ns
    again = graph_file(mv.build().eval(), "whole", mv.version, mv.image_size)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert mv.version in first.name and first.parent.name == "whole"


def test_auto_picks_openvino_bf16_only_on_a_chip_with_native_bf16(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve("auto", "auto", cpu, native=True) == ("openvino", "bf16")
    assert resolve("auto", "auto", cpu, native=False) == ("torch", "fp32")
    assert resolve("auto", "fp32", cpu, native=True) == ("torch", "fp32")
    assert resolve("torch", "auto", cpu, native=True) == ("torch", "fp32")  # autocast: 1.2x
    assert resolve("openvino", "auto", cpu, native=False) == ("openvino", "fp32")
    assert resolve("onnxruntime", "auto", cpu, native=True) == ("onnxruntime", "fp32")
    assert resolve("openvino", "bf16", cuda, native=True) == ("torch", "bf16")  # a GPU: torch
    with pytest.raises(ValueError, match="onnxruntime"):
        resolve("onnxruntime", "bf16", cpu, native=True)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    assert resolve("auto", "auto", cpu, native=True) == ("torch", "fp32")  # not installed
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))
    assert resolve("auto", "auto", cpu, native=True) == ("torch", "fp32")  # cannot export


def test_bad_runtime_settings_exit_2_before_anything_runs(tmp_path, capsys, monkeypatch):
    base = ["--config", str(TINY), "--input", str(tmp_path), "--dry-run"]
    assert run_job(job_main("score"), [*base, "--set", "score.runtime=onnxruntime",
                                       "--set", "score.precision=bf16"]) == 2
    err = capsys.readouterr().err
    assert "score.precision bf16 has no onnxruntime" in err and "Traceback" not in err
    assert run_job(job_main("score"), [*base, "--set", "score.runtime=tensorrt"]) == 2
    assert "score.runtime" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    assert run_job(job_main("score"), [*base, "--set", "score.runtime=openvino"]) == 2
    err = capsys.readouterr().err
    assert "needs the openvino package" in err and "cpu-inference" in err, err


def test_check_views_refuse_a_disagreeing_graph_at_load(world, tmp_path, monkeypatch):
    """With the held-out views registered beside a version, a graph is compared before it scores
    anything: the stale graph of another model is refused at construction."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "graphs"))
    from prn_ray import registry

    mv = registry.load(world["cfg"].storage, "whole")
    assert mv.check_views is None  # registered without them: the first batch is compared
    path = graph_file(mv.build().eval(), "whole", mv.version, mv.image_size)
    views = np.stack(demo_images("fabric", 4, 64, seed=5))
    other = mv.build().eval()
    torch.nn.init.normal_(other.head.decoder.head.weight, std=0.5)
    with pytest.raises(RuntimeMismatch, match="held-out check views"):
        GraphModel(other, path, "openvino", "fp32", threads=1, check_views=views)
    same = GraphModel(mv.build().eval(), path, "openvino", "fp32", threads=1, check_views=views)
    assert same.check["on"] == "held-out check views" and same.check["views"] == 4
    assert same.check["max_abs_map"] <= TOLERANCE["fp32"][0]


def test_a_stale_graph_becomes_scoring_failed_rows_before_any_read(tmp_path, monkeypatch,
                                                                     capsys):
    """A version registered with check views, and in the node's cache a graph of another model
    under its name: every row of the product is a scoring_failed row naming the check, and the
    other product's rows are scored."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "graphs"))
    from prn_ray import registry
    from prn_ray.export import ImageModel, example_batch, export_graph

    cfg = load_config(TINY, [f"storage.models_uri={tmp_path}/models", "data.image_size=64"])
    normals = demo_images("fabric", 8, 64, seed=0)
    publish_fitted(cfg, "stale", normals, check_views=True)
    publish_fitted(cfg, "fresh", normals, seed=1, check_views=True)
    mv = registry.load(cfg.storage, "stale")
    assert mv.check_views is not None and mv.check_views.shape == (2, 64, 64, 3)
    other = registry.load(cfg.storage, "fresh").build().eval()
    path = graph_file(mv.build().eval(), "stale", mv.version, mv.image_size)
    path.write_bytes(export_graph(ImageModel(other, "uint8").eval(),
                                  example_batch(mv.image_size, "uint8", 2), "onnx"))
    files = []
    for product in ("stale", "fresh"):
        for i, im in enumerate(demo_images("fabric", 2, 80, seed=9)):
            p = tmp_path / "in" / product / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(encode_png(im))
            files.append((product, str(p)))
    # predict refuses the same graph at load: one line, exit 1, nothing written
    out_dir = tmp_path / "predicted"
    argv = ["--config", str(TINY), "--set", f"storage.models_uri={tmp_path}/models",
            "--set", "data.image_size=64", "--set", "score.runtime=onnxruntime",
            "--product", "stale", "--input", str(tmp_path / "in" / "stale"),
            "--out", str(out_dir)]
    assert run_job(job_main("predict"), argv) == 1
    # (other tests' logging handlers may write to a closed capture here: only our lines count)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: score.runtime onnxruntime")
    assert "held-out check views" in err[0] and not out_dir.exists()
    scorer = Scorer(resolve_models(cfg, ["stale", "fresh"]), cfg.storage,
                    {"stale": 0, "fresh": 1}, threads=1, data_cfg=cfg.data,
                    runtime="onnxruntime", precision="fp32")
    out = scorer({"product": np.array([p for p, _ in files], dtype=object),
                  "image_uri": np.array([u for _, u in files], dtype=object)}).to_pylist()
    for r in out:
        if r["product"] == "stale":
            assert r["error"].startswith("scoring_failed: RuntimeMismatch")
            assert "held-out check views" in r["error"] and r["score"] is None
        else:
            assert r["error"] is None and r["score"] is not None
