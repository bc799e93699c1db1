"""jobs/models.py and registry.list_models: two products with two versions each, published to a
temporary registry (weights are placeholders: the listing reads only the JSON files)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, job_main

from prn_ray import registry
from prn_ray.cli import run_job
from prn_ray.config import load_config
from prn_ray.geometry import Geometry

PUBLISHED = {  # product -> [(version, threshold, validation metrics)], oldest first
    "fabric": [("v20261101-080000-aaaaaa", 0.41, {"val_selection": 0.70, "val_real_aupro": 0.61}),
               ("v20261102-090000-bbbbbb", 0.37, {"val_selection": 0.80, "val_real_aupro": 0.72,
                                                  "val_real_image_auroc": 0.9})],
    "wood_panel": [("v20261103-100000-cccccc", 0.52, {}),
                   ("v20261104-110000-dddddd", 0.55, {"val_selection": 0.5,
                                                      "val_real_pixel_ap": 0.25})],
}


@pytest.fixture(scope="module")
def models_uri(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("registry") / "models")
    for product, versions in PUBLISHED.items():
        metric = "real_mean" if product == "fabric" else "pixel_ap"
        cfg = load_config(TINY, [f"storage.models_uri={uri}",
                                 f"train.selection_metric={metric}"])
        for version, threshold, val in versions:
            registry.publish(cfg, product, head_state={"w": torch.zeros(1)},
                             backbone_state={"w": torch.zeros(1)}, geometry=Geometry((64, 64)),
                             calibration={"threshold": threshold},
                             metrics={"validation": {**val, "val_synth_aupro": 0.1}},
                             version=version)
    return uri


def run_models(models_uri: str, *extra: str) -> int:
    return run_job(job_main("models"), ["--config", str(TINY), "--set",
                                        f"storage.models_uri={models_uri}", *extra])


def test_json_lists_every_version_with_latest_threshold_metrics(models_uri, capsys):
    assert run_models(models_uri, "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["product"], r["version"]) for r in rows] == [
        (p, v) for p, versions in PUBLISHED.items() for v, _, _ in versions]
    for r in rows:
        version, threshold, val = next(x for x in PUBLISHED[r["product"]] if x[0] == r["version"])
        assert r["latest"] == (version == PUBLISHED[r["product"]][-1][0])
        assert r["threshold"] == pytest.approx(threshold)
        assert r["metrics"] == val  # the listed ones only (val_synth_* is not)
        assert r["created_at"].startswith(
            f"{version[1:5]}-{version[5:7]}-{version[7:9]}T{version[10:12]}:{version[12:14]}")
        assert r["image_size"] == 64 and r["backbone"] == "tf_efficientnet_lite0"
    assert {r["selection_metric"] for r in rows if r["product"] == "wood_panel"} == {"pixel_ap"}


def test_table_marks_latest_and_filters_by_product(models_uri, capsys):
    assert run_models(models_uri, "--product", "wood_panel") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["product", "version", "latest", "threshold"]
    body = [line for line in out[2:] if line.strip()]
    assert len(body) == 2 and all(line.startswith("wood_panel") for line in body)
    latest = [line for line in body if " * " in line]
    assert len(latest) == 1 and "v20261104-110000-dddddd" in latest[0]
    assert "0.550" in latest[0] and "0.250" in latest[0] and "2026-11-04T11:00:00" in latest[0]


def test_unknown_product_exits_2_and_empty_registry_is_fine(models_uri, tmp_path, capsys):
    assert run_models(models_uri, "--product", "nope") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model registered for product 'nope'"), err
    assert run_models(str(tmp_path / "empty")) == 0
    assert "no models under" in capsys.readouterr().out


def test_a_version_registered_before_the_memory_vote_keeps_its_own_maps(tmp_path):
    uri = str(tmp_path / "models")
    cfg = load_config(TINY, [f"storage.models_uri={uri}", "model.prior_vote=0.4"])
    version = registry.publish(cfg, "old", head_state={"w": torch.zeros(1)},
                               backbone_state={"w": torch.zeros(1)}, geometry=Geometry((64, 64)),
                               calibration={"threshold": 0.5}, metrics={})
    assert registry.load(cfg.storage, "old", version).config.model.prior_vote == 0.4
    path = tmp_path / "models" / "old" / version / "config.json"
    doc = json.loads(path.read_text())
    del doc["config"]["model"]["prior_vote"]  # what a version from before the key holds
    path.write_text(json.dumps(doc))
    assert registry.load(cfg.storage, "old", version).config.model.prior_vote == 0.0


def test_the_rule_and_its_held_out_figures_are_listed_and_another_rule_is_rederived(
        tmp_path, capsys):
    uri = str(tmp_path / "models")
    cfg = load_config(TINY, [f"storage.models_uri={uri}"])
    normals = [i / 100 for i in range(100)]  # 0.00 .. 0.99
    defects = [0.5, 0.95, 1.2, 1.5]
    calibration = {"threshold": 0.7, "threshold_rule": "f1", "val_fpr": 0.29, "val_tpr": 0.75,
                   "n_normal": 100, "n_real_anomalous": 4,
                   "held_out_scores": {"normal": normals, "anomalous": defects}}
    version = registry.publish(cfg, "fabric", head_state={"w": torch.zeros(1)},
                               backbone_state={"w": torch.zeros(1)},
                               geometry=Geometry((64, 64)), calibration=calibration, metrics={})
    assert run_models(uri) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert " f1 " in row and "29.0 % of 100" in row and "75.0 % of 4" in row
    # the calibrated threshold for its own rule; another rule from the kept held-out scores
    assert registry.describe(cfg.storage, "fabric", version)[2] == 0.7
    assert registry.describe(cfg.storage, "fabric", version, "f1")[2] == 0.7
    assert registry.describe(cfg.storage, "fabric", version, "fpr:0.01")[2] == 0.98
    strict = registry.describe(cfg.storage, "fabric", version, "recall:1.0")[2]
    assert strict < 0.5 and sum(v > strict for v in defects) == 4
    old = registry.publish(cfg, "wood", head_state={"w": torch.zeros(1)},
                           backbone_state={"w": torch.zeros(1)}, geometry=Geometry((64, 64)),
                           calibration={"threshold": 0.4}, metrics={})
    with pytest.raises(registry.RegistryError, match="retrain"):
        registry.describe(cfg.storage, "wood", old, "fpr:0.01")
