"""Seen defects known by their image label only, and the threshold rules (no Ray).

The loss is checked against a from-definition float64 reference; validation's pixel metrics
against scikit-learn on the views that have pixel truth; the thresholds against the
definitions of false-alarm rate and recall on known scores."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from prn_ray.config import Config, DataConfig
from prn_ray.config_checks import value_problems
from prn_ray.contracts import GROUP_NORMAL, GROUP_REAL, GROUP_SYNTHETIC, MASK_UNKNOWN
from prn_ray.data.catalog import build_catalog, describe_seen, seen_defect_counts
from prn_ray.data.manifest import write_manifest
from prn_ray.engine.image_labels import keep_strongest_views, view_scores
from prn_ray.engine.validation import ValidationSet, calibrate, validation_metrics
from prn_ray.images import encode_png
from prn_ray.model.loss import PRNLoss
from prn_ray.model.reference import NormalReference
from prn_ray.synthesis import SOURCES, Synthesizer
from prn_ray.thresholds import ThresholdRuleError, choose, parse_rule, threshold_for

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- the loss


def reference_loss(z: np.ndarray, mask: np.ndarray, lam: float, gamma: float, alpha: float,
                   topk: int, weight: float) -> float:
    """Pixel terms over the pixels with a label; -log sigmoid(top-k mean) per image-labelled
    row, summed and divided by the batch size."""
    z, mask = z.astype(np.float64), mask.astype(np.float64)
    known = mask != MASK_UNKNOWN
    p = 1 / (1 + np.exp(-z[known]))
    y = mask[known]
    d = np.abs(p - y)
    sl1 = np.where(d < 1, 0.5 * d * d, d - 0.5).mean()
    foc = (-(alpha * y * (1 - p) ** gamma * np.log(p)
             + (1 - alpha) * (1 - y) * p ** gamma * np.log(1 - p))).mean()
    image = 0.0
    for row in range(z.shape[0]):
        if (mask[row] == MASK_UNKNOWN).any():
            top = np.sort(z[row].ravel())[::-1][:topk].mean()
            image += math.log1p(math.exp(-top))
    return sl1 + lam * foc + weight * image / z.shape[0]


def test_image_labelled_rows_leave_the_pixel_terms_for_a_top_k_term():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64).float() * 3
    mask = (torch.rand(3, 1, 8, 8, generator=g) > 0.8).float()
    mask[1] = MASK_UNKNOWN  # an image-level label
    loss = PRNLoss(gamma=4.0, alpha=0.5, lam=5.0, image_weight=0.7, topk=5)
    out = loss(z, mask)
    want = reference_loss(z.numpy(), mask.numpy(), 5.0, 4.0, 0.5, 5, 0.7)
    assert out.total.item() == pytest.approx(want, rel=1e-5)
    assert out.image.item() > 0
    # The gradient reaches the labelled row only through its top 5 logits.
    zg = z.clone().requires_grad_()
    loss(zg, mask).total.backward()
    grad = zg.grad[1].flatten()
    top = set(torch.topk(z[1].flatten(), 5).indices.tolist())
    assert all((grad[i] != 0) == (i in top) for i in range(grad.numel()))
    assert (grad[list(top)] < 0).all()  # gradient descent raises them


def test_without_image_labels_the_loss_is_the_pixel_mean():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 1, 6, 7, generator=g) * 4
    mask = (torch.rand(2, 1, 6, 7, generator=g) > 0.7).float()
    out = PRNLoss()(z, mask)
    assert out.image.item() == 0.0
    assert out.total.item() == pytest.approx(
        reference_loss(z.numpy(), mask.numpy(), 5.0, 4.0, 0.5, 100, 1.0), rel=1e-5)


# ----------------------------------------------------------------------------- validation


def test_validation_pixel_metrics_skip_image_labelled_views_and_selection_stays_defined():
    rng = np.random.default_rng(0)
    n, s = 8, 16
    groups = np.array([GROUP_NORMAL] * 4 + [GROUP_REAL] * 2 + [GROUP_SYNTHETIC] * 2)
    masks = np.zeros((n, s, s), np.uint8)
    masks[4:6] = MASK_UNKNOWN  # held-out real defects with image labels only
    masks[6:, 4:9, 4:9] = 1  # simulated anomalies with masks
    logits = rng.normal(size=(n, s, s)).astype(np.float32)
    logits[4:6, 2:5, 2:5] += 4
    logits[6:] += 2 * masks[6:]
    val = ValidationSet([torch.zeros(n, 1, 1, 1)] * 4, torch.from_numpy(masks),
                        torch.from_numpy(groups))
    cfg = Config()
    cfg.data.tiles.mode = "off"
    vm, scores, labels, _ = validation_metrics(torch.from_numpy(logits), val, cfg)
    assert labels.tolist() == [False] * 4 + [True] * 4  # image labels count as defective
    # all-view pixel metrics: the views with pixel truth only (normals + simulated)
    keep = np.r_[0:4, 6:8]
    y, x = masks[keep].ravel().astype(bool), logits[keep].ravel()
    assert vm["val_pixel_auroc"] == pytest.approx(roc_auc_score(y, x), abs=1e-6)
    assert vm["val_pixel_ap"] == pytest.approx(average_precision_score(y, x), abs=1e-6)
    # the real subset has no pixel truth: its mean takes the simulated anomalies' pixel metrics
    assert math.isnan(vm["val_real_pixel_ap"])
    real_auroc = roc_auc_score(labels[:6], scores[:6])
    assert vm["val_real_image_auroc"] == pytest.approx(real_auroc)
    assert vm["val_real_mean"] == pytest.approx(np.mean(
        [real_auroc, vm["val_synth_pixel_auroc"], vm["val_synth_aupro"], vm["val_synth_pixel_ap"]]))


# ----------------------------------------------------------------------------- synthesis


def test_an_image_labelled_defect_is_never_pasted():
    s = 32
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (2, s, s, 3), dtype=np.uint8)
    defect = np.full((s, s, 3), 250, np.uint8)
    seen = [(defect, np.full((s, s), MASK_UNKNOWN, np.uint8))]
    syn = Synthesizer(Config().synthesis, s, seen=seen, annotate=True)
    batch = {"image": imgs, "mask": np.zeros((2, s, s), np.uint8),
             "kind": np.array(["extended", "extended"]), "seed": np.array([1, 2]),
             "source_index": np.array([0, 0])}
    out = syn(batch)
    assert all(src in SOURCES for src in out["synth_source"])  # simulated instead
    assert set(np.unique(out["mask"])) <= {0, 1}


# ----------------------------------------------------------------------------- tiled instances


def test_a_tiled_image_label_keeps_the_view_the_memory_finds_least_normal():
    torch.manual_seed(0)
    cfg = Config()
    cfg.model.prior_levels = [1]
    c = [4, 6, 8, 10]
    normal = [torch.randn(64, ch, 6, 6) for ch in c]
    ref = NormalReference(means=[torch.zeros(ch) for ch in c], stds=[torch.ones(ch) for ch in c],
                          prototypes=[], banks=[normal[1].permute(0, 2, 3, 1).reshape(-1, 6)],
                          n_normal=64)
    views = [torch.randn(3, ch, 6, 6) for ch in c]
    views[1][2, :, 1:3, 1:3] += 6.0  # view 2 shows something no normal patch has
    feats = [v.numpy() for v in views]
    assert int(np.argmax(view_scores(feats, ref, cfg))) == 2
    unknown = np.full((3, 8, 8), MASK_UNKNOWN, np.uint8)
    drawn = np.zeros((2, 8, 8), np.uint8)
    drawn[:, 2, 2] = 1
    seen = [("a.png", "")] * 3 + [("b.png", "b_mask.png")] * 2
    feats5 = [np.concatenate([f, f[:2]]) for f in feats]
    keep = keep_strongest_views(seen, feats5, np.concatenate([unknown, drawn]), ref, cfg)
    assert keep.tolist() == [2, 3, 4]  # one view of the image label, every view of the mask


# ----------------------------------------------------------------------------- catalog


def test_catalog_counts_both_kinds_and_reports_empty_mask_files(tmp_path):
    img = encode_png(np.zeros((16, 16, 3), np.uint8))
    mask = encode_png(np.full((16, 16), 255, np.uint8))
    rows = []
    for i in range(6):
        (tmp_path / f"n{i}.png").write_bytes(img)
        rows.append(dict(product="p", image_uri=f"n{i}.png", label="normal", split="train",
                         mask_uri="", defect_type="good"))
    for i, kind in enumerate(["mask", "mask", "none", "none", "none", "empty"]):
        (tmp_path / f"a{i}.png").write_bytes(img)
        mask_uri = ""
        if kind != "none":
            (tmp_path / f"a{i}_mask.png").write_bytes(mask if kind == "mask" else b"")
            mask_uri = f"a{i}_mask.png"
        rows.append(dict(product="p", image_uri=f"a{i}.png", label="anomaly",
                         split="seen" if i < 5 else "val", mask_uri=mask_uri, defect_type="d"))
    for i in range(2):
        (tmp_path / f"t{i}.png").write_bytes(img)
        rows.append(dict(product="p", image_uri=f"t{i}.png", label="anomaly", split="test",
                         mask_uri="", defect_type="d"))
    write_manifest(pd.DataFrame(rows), str(tmp_path / "m.csv"))
    cfg = Config()
    cfg.data = DataConfig(manifest=str(tmp_path / "m.csv"))
    cat = build_catalog(cfg)
    counts = seen_defect_counts(cat.df)
    assert counts == {"p": (3, 3)}  # the 0-byte mask is named, so not an image label
    assert describe_seen(*counts["p"]) == "6 seen anomalies (3 with masks, 3 with image labels only)"
    text = "\n".join(cat.problems)
    assert "3 of 6 seen anomalies have no mask" in text
    assert "1 seen anomaly mask file(s) are empty (0 bytes)" in text and "a5_mask.png" in text
    assert "2 test anomalies have no mask: they count in the image metrics only" in text


# ----------------------------------------------------------------------------- thresholds


def test_threshold_rules_on_known_scores():
    normals = np.arange(100, dtype=np.float64) / 100  # 0.00 .. 0.99
    defects = np.array([0.5, 0.9, 0.95, 0.97, 0.985, 0.992, 1.2, 1.5, 2.0, 3.0])
    fpr = choose(normals, defects, "fpr:0.01")
    assert (normals > fpr.threshold).mean() <= 0.01 and fpr.threshold == 0.98
    assert fpr.expected_fpr == pytest.approx(0.01)
    assert fpr.expected_recall == pytest.approx((defects > 0.98).mean())  # 0.6
    assert (fpr.n_normal, fpr.n_anomalous) == (100, 10)
    rec = choose(normals, defects, "recall:0.9")
    assert (defects > rec.threshold).mean() >= 0.9
    assert rec.threshold < 0.9 and rec.threshold > 0.5  # the highest that keeps 9 of 10
    assert rec.expected_fpr == pytest.approx((normals > rec.threshold).mean())
    f1 = choose(normals, defects, "f1")
    flagged = np.r_[normals, defects] > f1.threshold
    truth = np.r_[np.zeros(100, bool), np.ones(10, bool)]
    tp = (flagged & truth).sum()
    assert f1.f1 == pytest.approx(2 * tp / (flagged.sum() + truth.sum()))
    no_defects = choose(normals, [], "recall:0.9")
    assert no_defects.rule.startswith("fpr:0.01") and no_defects.threshold == 0.98


@pytest.mark.parametrize("bad", ["f2", "fpr", "fpr:x", "fpr:1.5", "recall:0", "f1:0.1"])
def test_bad_rules_are_refused_clearly(bad):
    with pytest.raises(ThresholdRuleError):
        parse_rule(bad)
    cfg = Config()
    cfg.score.threshold_rule = bad
    assert any(p.startswith("score.threshold_rule must be f1, fpr:<fraction> or recall")
               for p in value_problems(cfg))


def test_calibration_keeps_its_scores_and_another_rule_is_rederived():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0, 1, 60), rng.normal(3, 1, 8)].astype(np.float32)
    labels = np.r_[np.zeros(60, bool), np.ones(8, bool)]
    groups = np.r_[np.full(60, GROUP_NORMAL), np.full(8, GROUP_REAL)]
    cfg = Config()
    doc = calibrate(scores, labels, groups, cfg)
    assert doc["threshold_rule"] == "f1" and doc["n_normal"] == 60 and doc["n_anomalous"] == 8
    assert doc["val_fpr"] == pytest.approx((scores[:60] > doc["threshold"]).mean())
    assert threshold_for(doc, None) == doc["threshold"] == threshold_for(doc, "f1")
    strict = threshold_for(doc, "fpr:0.0")
    assert strict == pytest.approx(float(scores[:60].max()), abs=1e-6)
    cfg.score.threshold_rule = "fpr:0.0"
    assert calibrate(scores, labels, groups, cfg)["threshold"] == pytest.approx(strict, abs=1e-6)
    old = {k: v for k, v in doc.items() if k != "held_out_scores"}  # calibrated before
    with pytest.raises(ThresholdRuleError, match="retrain"):
        threshold_for(old, "recall:0.9")


def test_at_fpr_001_both_false_alarm_rates_are_reported_from_their_definitions():
    """A model calibrated by F1, evaluated under fpr:0.01: the threshold, its held-out
    false-alarm rate and recall are re-derived from the kept held-out scores, and the test
    split's rates are measured at that same threshold."""
    from prn_ray.report import ProductEvaluation
    from prn_ray.thresholds import under_rule

    rng = np.random.default_rng(4)
    held_n, held_d = rng.normal(0, 1, 300), rng.normal(2.5, 1, 20)
    scores = np.r_[held_n, held_d].astype(np.float32)
    labels = np.r_[np.zeros(300, bool), np.ones(20, bool)]
    doc = calibrate(scores, labels, np.r_[np.full(300, GROUP_NORMAL), np.full(20, GROUP_REAL)],
                    Config())
    used = under_rule(doc, "fpr:0.01")
    assert under_rule(doc, None) is doc and under_rule(doc, "f1") is doc
    normals = np.array(doc["held_out_scores"]["normal"])
    defects = np.array(doc["held_out_scores"]["anomalous"])
    t = used["threshold"]
    assert t == threshold_for(doc, "fpr:0.01") and used["threshold_rule"] == "fpr:0.01"
    assert used["val_fpr"] == (normals > t).mean() <= 0.01
    assert used["val_tpr"] == (defects > t).mean() and used["calibrated_rule"] == "f1"
    test_scores = np.r_[rng.normal(0, 1, 500), rng.normal(2.5, 1, 50)]
    test_labels = np.r_[np.zeros(500, bool), np.ones(50, bool)]
    at = ProductEvaluation("p", {}, scores=test_scores, labels=test_labels, threshold=t,
                           calibration=used).at_threshold()
    assert at["rule"] == "fpr:0.01" and at["held_out_normals"] == 300
    assert at["held_out_false_alarm_rate"] == pytest.approx((normals > t).mean())
    assert at["test_false_alarm_rate"] == pytest.approx((test_scores[:500] > t).mean())
    assert at["test_recall"] == pytest.approx((test_scores[500:] > t).mean())
