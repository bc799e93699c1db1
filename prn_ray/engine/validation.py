"""Validation of a head on held-out data: maps, metrics per group, the selection score and
the decision threshold. Held-out real defects (and extended copies of them) are kept apart from
simulated ones, and selection weighs the real ones (see :func:`selection_score`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prn_ray import metrics
from prn_ray.config import Config
from prn_ray.contracts import FEATURE_COLUMNS, GROUP_NORMAL, GROUP_SYNTHETIC, REAL_GROUPS
from prn_ray.engine.optim import autocast
from prn_ray.model import image_score
from prn_ray.model.prn import area_kernel


@dataclass
class ValidationSet:
    """Validation features held in worker memory (computed once by the feature actors)."""

    features: list[torch.Tensor]  # per level: N x C x H x W (float16/32)
    masks: torch.Tensor  # N x S x S uint8
    groups: torch.Tensor  # N int (GROUP_*)

    @classmethod
    def from_batches(cls, batches: Iterable[dict[str, torch.Tensor]]) -> ValidationSet:
        """From batches with ``feat0..3``, ``mask`` and ``group`` (e.g. a Ray Data shard's
        ``iter_torch_batches``, or :func:`prn_ray.data.local.feature_batches`)."""
        feats: list[list[torch.Tensor]] = [[] for _ in FEATURE_COLUMNS]
        masks, groups = [], []
        for batch in batches:
            for i, c in enumerate(FEATURE_COLUMNS):
                feats[i].append(batch[c])
            masks.append(batch["mask"])
            groups.append(batch["group"])
        if not masks:
            raise RuntimeError("the validation set is empty: no readable held-out images")
        return cls([torch.cat(f) for f in feats], torch.cat(masks), torch.cat(groups))

    def __len__(self) -> int:
        return int(self.masks.shape[0])


@torch.no_grad()
def predict_logits(head: torch.nn.Module, features: list[torch.Tensor], batch_size: int,
                   device: torch.device, precision: str) -> torch.Tensor:
    """Logit maps (N x S x S float32) of cached features, in eval mode, batch by batch.

    Logits, not probabilities: the sigmoid is 1.0 in float32 beyond logit ≈ 17, and ties at
    the top would distort the pixel metrics that validation selects on."""
    was_training = head.training
    head.eval()
    out = []
    try:
        for i in range(0, features[0].shape[0], batch_size):
            chunk = [f[i:i + batch_size].to(device) for f in features]
            with autocast(device, precision):
                logits = head(chunk)
            out.append(logits.float()[:, 0].cpu())
    finally:
        head.train(was_training)
    return torch.cat(out)


def validation_metrics(logits: torch.Tensor, val: ValidationSet, cfg: Config
                       ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Metrics on all validation images and on the real / synthetic subsets.

    Returns (metrics, image scores, image labels). Keys: ``val_<metric>``,
    ``val_real_<metric>`` (held-out normals + held-out real defects and their extended copies),
    ``val_synth_<metric>`` (held-out normals + simulated anomalies), for image_auroc,
    pixel_auroc, aupro and pixel_ap, plus ``val_real_mean`` / ``val_mean``, the mean of the
    four (the default selection rule).
    """
    scores = image_score(torch.sigmoid(logits[:, None]), cfg.model.score, cfg.model.score_topk,
                         area_kernel(tuple(logits.shape[-2:]))).numpy()
    masks = val.masks.numpy().astype(bool)
    groups = val.groups.numpy()
    labels = masks.reshape(len(masks), -1).any(1)
    m = logits.numpy()  # pixel metrics rank pixels: logits rank them without sigmoid ties
    out: dict[str, float] = {}
    real = np.isin(groups, REAL_GROUPS)
    subsets = {"val": np.ones_like(labels),
               "val_real": (groups == GROUP_NORMAL) | real,
               "val_synth": (groups == GROUP_NORMAL) | (groups == GROUP_SYNTHETIC)}
    for prefix, sel in subsets.items():
        if not (sel & labels).any():
            continue  # no anomaly in this subset (e.g. no held-out real defect)
        acc = metrics.PixelMetricAccumulator(fpr_limit=0.3)
        acc.update(m[sel], masks[sel], scores=scores[sel], labels=labels[sel])
        values = {k: float(v) for k, v in acc.compute().items()}
        out.update({f"{prefix}_{k}": v for k, v in values.items()})
        four = [values[k] for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")]
        out[f"{prefix}_mean"] = float(np.mean(four)) if not np.isnan(four).any() else math.nan
    return out, scores, labels


def calibrate(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, cfg: Config
              ) -> dict[str, Any]:
    """Decision threshold on validation image scores (``is_anomaly = score > threshold``).

    ``f1``: the F1-optimal threshold over held-out normals vs. the anomalies that come from
    held-out *real* defects (raw and extended copies); only when a product has none, vs. the
    simulated ones. ``fpr``: the threshold that flags at most ``calibration_target_fpr`` of the
    held-out normals.
    """
    normals = scores[~labels]
    real = labels & np.isin(groups, REAL_GROUPS)
    doc: dict[str, Any] = {"rule": cfg.train.calibration, "n_normal": int((~labels).sum()),
                           "n_anomalous": int(labels.sum()),
                           "n_real_anomalous": int(real.sum())}
    if real.any():  # weigh real defects only: synthetic ones are easier and would lower it
        keep = ~labels | real
        scores, labels = scores[keep], labels[keep]
    if cfg.train.calibration == "fpr" or not labels.any():
        t = metrics.threshold_at_fpr(normals, cfg.train.calibration_target_fpr)
        doc.update(rule="fpr", threshold=t, target_fpr=cfg.train.calibration_target_fpr)
    else:
        t, f1 = metrics.f1_optimal_threshold(labels, scores)
        doc.update(threshold=t, f1=f1)
    doc["val_fpr"] = float((normals > doc["threshold"]).mean()) if normals.size else math.nan
    doc["val_tpr"] = float((scores[labels] > doc["threshold"]).mean()) if labels.any() else math.nan
    doc["score_rule"] = cfg.model.score
    return doc


def metric_key(name: str) -> str:
    """``pixel_ap`` -> ``val_pixel_ap`` (names may be given with or without the prefix)."""
    return name if name.startswith("val") else f"val_{name}"


def selection_score(vm: dict[str, float], cfg: Config) -> float:
    """The value best-epoch selection (and, by default, tuning) maximises.

    ``train.selection_metric`` (default ``real_mean``: the mean of image AUROC, pixel AUROC,
    AUPRO and pixel AP on held-out normals + held-out real defects and their extended copies).
    A product without held-out real defects falls back to the same metric on all validation
    images."""
    key = metric_key(cfg.train.selection_metric)
    if key not in vm and key.startswith("val_real_"):
        key = "val_" + key.removeprefix("val_real_")
    return float(vm.get(key, math.nan))
