"""Configuration files: every shipped config loads, ``extends`` layers one file on another,
and every key's value is checked (range or choices), all problems reported at once."""

from __future__ import annotations

import pytest
from helpers import REPO

from prn_ray.config import Config, ConfigError, load_config, read_yaml
from prn_ray.config_checks import RULES, backbone_problem, leaf_keys, value_problems

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


# ----------------------------------------------------------------------------- validation


def test_every_key_has_a_range_or_choice_rule():
    assert sorted(RULES) == sorted(leaf_keys(Config()))
    assert value_problems(Config()) == []  # the defaults are valid


@pytest.mark.parametrize("override,message", [
    ("train.epochs=-5", "train.epochs must be >= 1, got -5"),
    ("data.image_size=0", "data.image_size must be >= 32, got 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("model.prototype_ratio=5", "model.prototype_ratio must be > 0 and <= 1, got 5.0"),
    ("train.lr=-1", "train.lr must be > 0, got -1.0"),
    ("train.lr=.nan", "train.lr must be > 0, got nan"),
    ("data.val_normal_fraction=1.5", "data.val_normal_fraction must be > 0 and < 1, got 1.5"),
    ("model.attention_patch_sizes=[3,0]", "model.attention_patch_sizes items must be >= 1"),
    ("model.attention_patch_sizes=[]", "model.attention_patch_sizes must not be empty"),
    ("model.prior_levels=[1,7]", "model.prior_levels items must be in [0, 1, 2, 3]"),
    ("train.selection_metric=nonsense", "train.selection_metric must be one of"),
    ("tune.metric=nonsense", "tune.metric must be one of selection, image_auroc"),
    ("data.products=[]", "data.products must not be empty"),
    ("data.val_seen_anomalies=20", "data.val_seen_anomalies (20) must be <= data.seen_anomalies"),
    ("synthesis.source_weights={texture: 1, paint: 1}", "has unknown source(s) ['paint']"),
    ("tune.search_space={train.lrr: {choice: [1]}}", "searches 'train.lrr'"),
    ("tune.search_space={train.lr: {uniform: [2, 1]}}", "uniform needs [low, high]"),
    ("score.model_version=a=v1,v2", "score.model_version must be 'VERSION' or"),
    ("storage.endpoint_url=minio:9000", "storage.endpoint_url must start with http://"),
    ("model.weights=efficientnet-lite0-pypi", "fits only model.backbone tf_efficientnet_lite0"),
    ("model.weights=/nonexistent/w.safetensors", "model.weights: no such file"),
    ("train.epoch=3", "unknown key train.epoch (did you mean train.epochs?)"),
    ("train.image_size=3", "unknown key train.image_size (did you mean data.image_size?)"),
    ("trian.lr=1", "unknown section trian (did you mean train?)"),
    ("model.attention_patch_sizes=[3,0", "--set model.attention_patch_sizes: '[3,0' is not a valid"),
])
def test_values_out_of_range_are_rejected_with_one_line_each(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert all("\n" not in p for p in info.value.problems)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.epochs=-5", "data.image_size=0", "train.epoch=1",
                           "train.lr=fast", "model.norm=layer"])
    problems = info.value.problems
    assert len(problems) == 5, problems
    assert str(info.value).startswith("5 problems in the config:\n  ")


def test_booleans_are_accepted_for_true_false_choices(tmp_path):
    assert load_config(None, ["train.use_gpu=true"]).train.use_gpu == "true"
    assert load_config(None, ["train.use_gpu=false"]).train.use_gpu == "false"
    (tmp_path / "gpu.yaml").write_text("train:\n  use_gpu: true\n")
    assert load_config(tmp_path / "gpu.yaml").train.use_gpu == "true"


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: resnet18\ntrain:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line 5, column 1: not valid YAML"):
        load_config(bad)
    (tmp_path / "child.yaml").write_text("extends: bad.yaml\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line 5"):
        load_config(tmp_path / "child.yaml")


def test_backbone_is_checked_against_timm():
    assert backbone_problem("resnet18") is None
    assert backbone_problem("tf_efficientnet_lite0") is None
    problem = backbone_problem("resnet999")
    assert problem.startswith("model.backbone 'resnet999' is not a timm model")
    assert "did you mean" in backbone_problem("resnet_18")
