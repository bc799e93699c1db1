"""Configuration files: every shipped config loads, ``extends`` layers one file on another."""

from __future__ import annotations

import pytest
from helpers import REPO

from prn_ray.config import ConfigError, load_config, read_yaml

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.backbone and cfg.train.batch_size >= 1


def test_magnetic_tile_is_cpu_yaml_with_the_data_location_set():
    cpu = read_yaml(REPO / "configs" / "cpu.yaml")
    mt = read_yaml(REPO / "configs" / "magnetic_tile.yaml")
    assert "extends" not in mt
    for section in ("model", "train", "synthesis"):
        assert mt.get(section) == cpu.get(section), section  # nothing else changed
    assert mt["data"] == {**cpu["data"], "manifest": "runs/mt/magnetic_tile.parquet"}
    assert load_config(REPO / "configs" / "magnetic_tile.yaml").data.manifest.endswith(
        "runs/mt/magnetic_tile.parquet")  # made absolute


def test_extends_merges_sections_key_by_key_and_detects_loops(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  backbone: resnet18\n  score_topk: 7\n"
                                        "train:\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel:\n  score_topk: 9\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.lr=0.25"])
    assert cfg.model.backbone == "resnet18" and cfg.model.score_topk == 9
    assert cfg.train.lr == 0.25  # --set wins over both files
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")
