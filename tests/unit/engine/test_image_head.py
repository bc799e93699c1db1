"""The image head (no Ray): its statistics against from-definition references, its fit against
scikit-learn's decision function, the cross-fitted scores against fold-by-fold fits, its
calibration on a validation set, and the registry / scoring rule that carry it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from prn_ray import image_head
from prn_ray.config import Config
from prn_ray.contracts import GROUP_NORMAL, GROUP_REAL, GROUP_SYNTHETIC, MASK_UNKNOWN
from prn_ray.engine.validation import (
    ValidationSet,
    fit_image_head,
    head_calibration,
    validation_metrics,
)
from prn_ray.image_head import ImageHead, map_statistics
from prn_ray.inference import ScoreRule

torch.set_num_threads(1)


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


def reference_statistics(amap: np.ndarray, topk: int, kernel: int) -> dict[str, float]:
    """Each statistic from its definition: a full float64 sort, and the box mean of every
    kernel x kernel window of the map mirrored at its borders (edge pixels repeated)."""
    flat = np.sort(amap.astype(np.float64).ravel())[::-1]
    r = kernel // 2
    padded = np.pad(amap.astype(np.float64), r, mode="symmetric")
    h, w = amap.shape
    box = max(padded[y:y + kernel, x:x + kernel].mean() for y in range(h) for x in range(w))
    return {"max": flat[0], "top10": flat[:10].mean(), "topk": flat[:topk].mean(),
            "top1000": flat[:1000].mean(), "top1pct": flat[:max(1, flat.size // 100)].mean(),
            "mean": flat.mean(), "area": box}


@pytest.mark.parametrize("shape", [(40, 30), (12, 9)])  # fewer pixels than 1 000 too
def test_statistics_are_their_definitions_as_logits(shape):
    rng = np.random.default_rng(1)
    amap = rng.beta(0.5, 4, size=shape).astype(np.float32)
    amap[3, 4] = 1.0  # saturated: clipped, finite
    got = map_statistics(amap, image_head.WHOLE_IMAGE, topk=25, kernel=5)
    want = reference_statistics(amap, 25, 5)
    assert np.all(np.isfinite(got))
    for name, value in zip(image_head.WHOLE_IMAGE, got):
        assert value == pytest.approx(logit(want[name]), abs=1e-4), name


def test_tiled_heads_use_size_free_statistics_only():
    assert "mean" not in image_head.statistics_for(True)
    assert "top1pct" not in image_head.statistics_for(True)
    assert image_head.statistics_for(False) == image_head.WHOLE_IMAGE
    with pytest.raises(ValueError, match="unknown map statistic"):
        map_statistics(np.zeros((4, 4), np.float32), ("median",), 5, 3)


def separable(n: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n, bool), np.ones(n // 4, bool)]
    stats = rng.normal(size=(len(labels), 3))
    stats[labels, 0] += 3.0  # the first statistic tells them apart, the others are noise
    return stats, labels


def test_fit_is_sklearns_logistic_regression_on_standardised_statistics():
    stats, labels = separable()
    w = image_head.sample_weights(labels, labels)
    head = image_head.fit(stats, labels, w, ("a", "b", "c"), 10, 3)
    z = (stats - stats.mean(0)) / stats.std(0)
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(z, labels, sample_weight=w)
    np.testing.assert_allclose(head.logit(stats), lr.decision_function(z), atol=1e-6)
    assert roc_auc_score(labels, head.logit(stats)) > 0.95
    assert abs(head.weights[0]) > 3 * max(abs(head.weights[1]), abs(head.weights[2]))
    back = ImageHead.from_doc(head.to_doc())
    assert back == head
    with pytest.raises(ValueError, match="logistic"):
        ImageHead.from_doc({**head.to_doc(), "kind": "mlp"})
    with pytest.raises(ValueError, match="normal and anomalous"):
        image_head.fit(stats[~labels], labels[~labels], w[~labels], ("a", "b", "c"), 10, 3)


def test_cross_fitted_scores_come_from_heads_that_did_not_see_the_image():
    stats, labels = separable(seed=2)
    w = image_head.sample_weights(labels, labels)
    got = image_head.cross_fitted(stats, labels, w, ("a", "b", "c"), 10, 3, folds=4, seed=7)
    want = np.full(len(labels), np.nan)
    for train, held in StratifiedKFold(4, shuffle=True, random_state=7).split(stats, labels):
        z_mean, z_std = stats[train].mean(0), stats[train].std(0)
        lr = LogisticRegression(max_iter=1000).fit((stats[train] - z_mean) / z_std,
                                                   labels[train], sample_weight=w[train])
        want[held] = lr.predict_proba((stats[held] - z_mean) / z_std)[:, 1]
    np.testing.assert_allclose(got, want, atol=1e-6)
    in_sample = image_head.fit(stats, labels, w, ("a", "b", "c"), 10, 3).logit(stats)
    assert not np.allclose(got, 1 / (1 + np.exp(-in_sample)), atol=1e-3)


def test_weights_balance_normals_against_anomalies_and_real_against_simulated():
    labels = np.r_[np.zeros(10, bool), np.ones(6, bool)]
    real = np.r_[np.zeros(10, bool), np.ones(2, bool), np.zeros(4, bool)]
    w = image_head.sample_weights(labels, real)
    assert w[~labels].sum() == pytest.approx(w[labels].sum())
    assert w[real].sum() == pytest.approx(w[labels & ~real].sum())
    assert w.sum() == pytest.approx(len(labels))


def test_head_calibration_thresholds_the_cross_fitted_scores():
    """Normals, simulated and (image-labelled) real defects: the head is fitted on them all and
    the threshold, expected false-alarm rate and held-out scores are the cross-fitted ones."""
    rng = np.random.default_rng(0)
    n_norm, n_syn, n_real, s = 30, 12, 4, 24
    n = n_norm + n_syn + n_real
    groups = np.r_[np.full(n_norm, GROUP_NORMAL), np.full(n_syn, GROUP_SYNTHETIC),
                   np.full(n_real, GROUP_REAL)]
    masks = np.zeros((n, s, s), np.uint8)
    masks[n_norm:n_norm + n_syn, 5:12, 5:12] = 1
    masks[n_norm + n_syn:] = MASK_UNKNOWN
    logits = rng.normal(-4, 1, size=(n, s, s)).astype(np.float32)
    logits[n_norm:, 5:12, 5:12] += 5  # every anomaly has a hot region
    val = ValidationSet([torch.zeros(n, 1, 1, 1)] * 4, torch.from_numpy(masks),
                        torch.from_numpy(groups))
    cfg = Config()
    cfg.data.tiles.mode = "off"
    cfg.model.score_topk = 20
    _, map_scores, labels, groups_ = validation_metrics(torch.from_numpy(logits), val, cfg)
    doc = head_calibration(torch.from_numpy(logits), val, cfg, map_scores, labels, groups_)
    head = ImageHead.from_doc(doc["image_head"])
    assert head.statistics == image_head.WHOLE_IMAGE
    normals = np.array(doc["held_out_scores"]["normal"])
    assert len(normals) == n_norm and len(doc["held_out_scores"]["anomalous"]) == n_real
    assert np.all((normals > 0) & (normals < 1))  # head scores, not map scores
    _, held, held_labels, _ = fit_image_head(torch.from_numpy(logits), val, cfg)
    np.testing.assert_allclose(normals, held[~held_labels], atol=1e-6)
    assert doc["val_fpr"] == pytest.approx((held[~held_labels] > doc["threshold"]).mean())
    auroc = doc["image_head"]["val_image_auroc"]
    real = np.r_[np.ones(n_norm, bool), np.zeros(n_syn, bool), np.ones(n_real, bool)]
    assert auroc["map_rule"] == pytest.approx(roc_auc_score(labels[real], map_scores[real]),
                                              abs=1e-5)


def test_the_rule_of_a_model_with_a_head_scores_with_the_head():
    stats, labels = separable()
    names = ("max", "topk", "area")
    rng = np.random.default_rng(3)
    maps = rng.beta(0.5, 4, size=(len(labels), 16, 16)).astype(np.float32)
    maps[labels, 4:8, 4:8] = 0.9
    x = np.stack([map_statistics(m, names, 10, 3) for m in maps])
    head = image_head.fit(x, labels, image_head.sample_weights(labels, labels), names, 10, 3)

    class Model:  # what ScoreRule.of reads from a PRN or a runtime's graph model
        score_kind, score_topk, area_kernel, image_head = "topk_mean", 10, 3, head

    rule = ScoreRule.of(Model())
    amap = maps[-1]
    assert rule(amap) == pytest.approx(1 / (1 + np.exp(-head.logit(x[-1]))))
    assert ScoreRule("topk_mean", 10, 3)(amap) == pytest.approx(np.sort(amap.ravel())[::-1][:10].mean(),
                                                  abs=1e-6)


def test_too_few_validation_images_fall_back_to_the_map_rule():
    """One held-out normal cannot be cross-fitted: the version is calibrated on the map rule's
    scores and says why, instead of failing the product."""
    s = 16
    groups = np.r_[GROUP_NORMAL, np.full(3, GROUP_SYNTHETIC)]
    masks = np.zeros((4, s, s), np.uint8)
    masks[1:, 4:8, 4:8] = 1
    logits = np.full((4, s, s), -4.0, np.float32)
    logits[1:, 4:8, 4:8] = 3.0
    val = ValidationSet([torch.zeros(4, 1, 1, 1)] * 4, torch.from_numpy(masks),
                        torch.from_numpy(groups))
    cfg = Config()
    cfg.data.tiles.mode = "off"
    _, scores, labels, groups_ = validation_metrics(torch.from_numpy(logits), val, cfg)
    doc = head_calibration(torch.from_numpy(logits), val, cfg, scores, labels, groups_)
    assert "image_head" not in doc and "at least 2 normal" in doc["image_head_skipped"]
    assert doc["held_out_scores"]["normal"] == [round(float(scores[0]), 7)]
