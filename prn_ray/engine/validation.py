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

from prn_ray import image_head, metrics, thresholds
from prn_ray.config import Config
from prn_ray.contracts import (
    FEATURE_COLUMNS,
    GROUP_NORMAL,
    GROUP_SYNTHETIC,
    MASK_UNKNOWN,
    REAL_GROUPS,
)
from prn_ray.engine.optim import autocast
from prn_ray.geometry import resolve
from prn_ray.inference import ImageMap, ScoreRule, stitch_items
from prn_ray.model.prn import image_score

# What a validation view carries besides its features and mask (local and Ray paths alike):
# its group, the validation image it belongs to, its grid index and that image's own size.
VALIDATION_EXTRA = ("group", "item", "view", "orig_height", "orig_width")
MEAN_METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")  # the ``_mean`` of a subset


@dataclass
class ValidationSet:
    """Validation views held in worker memory (features computed once). An image is one
    ``item``: untiled, one view; tiled, every tile of a held-out normal or real defect, one
    tile of a synthetic anomaly."""

    features: list[torch.Tensor]  # per level: N x C x H x W (float16/32)
    masks: torch.Tensor  # N x h x w uint8
    groups: torch.Tensor  # N int (GROUP_*)
    items: torch.Tensor | None = None  # N: the image of each view (None: one view each)
    views: torch.Tensor | None = None  # N: grid index
    sizes: torch.Tensor | None = None  # N x 2: the image's own (height, width)

    @classmethod
    def from_batches(cls, batches: Iterable[dict[str, torch.Tensor]]) -> ValidationSet:
        """From batches with ``feat0..3``, ``mask``, ``group`` and, where they are known,
        ``item``, ``view``, ``orig_height``, ``orig_width`` (a Ray Data shard's batches, or
        :func:`prn_ray.data.local.feature_batches`)."""
        feats: list[list[torch.Tensor]] = [[] for _ in FEATURE_COLUMNS]
        cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("mask", *VALIDATION_EXTRA)}
        for batch in batches:
            for i, c in enumerate(FEATURE_COLUMNS):
                feats[i].append(batch[c])
            for k in cols:
                if k in batch:
                    cols[k].append(torch.as_tensor(batch[k]))
        if not cols["mask"]:
            raise RuntimeError("the validation set is empty: no readable held-out images")
        got = {k: torch.cat(v) if v else None for k, v in cols.items()}
        sizes = (torch.stack([got["orig_height"], got["orig_width"]], 1)
                 if got["orig_height"] is not None else None)
        return cls([torch.cat(f) for f in feats], got["mask"], got["group"], got["item"],
                   got["view"], sizes)

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def limited(self, normal_views: int | None) -> ValidationSet:
        """The views of every anomaly and of the first held-out normal images (by item) up to
        ``normal_views`` normal views in all: what each epoch validates on. Tiles multiply the
        views of an image (12 per 1500 x 1000 photo), and a validation of every view of 90
        held-out photos took 80 s on 2 cores; every view still calibrates the prior."""
        normal = (self.groups == GROUP_NORMAL).numpy()
        if normal_views is None or int(normal.sum()) <= normal_views:
            return self
        items = (self.items if self.items is not None else torch.arange(len(self))).numpy()
        keep_items, count = set(), 0
        for item in sorted(set(items[normal].tolist())):
            n = int((items == item).sum())
            if count and count + n > normal_views:
                break
            keep_items.add(item)
            count += n
        keep = torch.from_numpy(~normal | np.isin(items, list(keep_items)))

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[keep]

        return ValidationSet([f[keep] for f in self.features], self.masks[keep],
                             self.groups[keep], pick(self.items), pick(self.views),
                             pick(self.sizes))

    def image_scores(self, probs: torch.Tensor, cfg: Config
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score, label, group) per validation image from the views' probability maps
        (N x h x w): stitched as scoring stitches them, scored by the model's map rule."""
        rule = ScoreRule.from_config(cfg.model, tuple(probs.shape[-2:]))
        if self.items is None or not resolve(cfg.data).tiled:
            masks = self.masks.numpy().reshape(len(self), -1).any(1)
            scores = image_score(probs[:, None], rule.kind, rule.topk, rule.kernel).numpy()
            return scores, masks, self.groups.numpy()
        maps, labels, groups = self.image_maps(probs, cfg)
        return np.array([m.score for m in maps], np.float32), labels, groups

    def image_maps(self, probs: torch.Tensor, cfg: Config
                   ) -> tuple[list[ImageMap], np.ndarray, np.ndarray]:
        """(stitched map with its map-rule score, label, group) per validation image."""
        rule = ScoreRule.from_config(cfg.model, tuple(probs.shape[-2:]))
        masks = self.masks.numpy().reshape(len(self), -1).any(1)
        groups = self.groups.numpy()
        geometry = resolve(cfg.data)
        if self.items is None or not geometry.tiled:
            p = probs.numpy()
            return [ImageMap(i, p[i], rule(p[i])) for i in range(len(p))], masks, groups
        items = self.items.numpy()
        maps = stitch_items(probs.numpy(), items, self.views.numpy(),
                            self.sizes[:, 0].numpy(), self.sizes[:, 1].numpy(), geometry, rule)
        first = {m.item: int(np.flatnonzero(items == m.item)[0]) for m in maps}
        labels = np.array([masks[items == m.item].any() for m in maps])
        return maps, labels, np.array([groups[first[m.item]] for m in maps])


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


def subsets(groups: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of each metric prefix: all, held-out normals + real defects (and their
    extended copies), held-out normals + simulated anomalies."""
    return {"val": np.ones(len(groups), bool),
            "val_real": (groups == GROUP_NORMAL) | np.isin(groups, REAL_GROUPS),
            "val_synth": (groups == GROUP_NORMAL) | (groups == GROUP_SYNTHETIC)}


def validation_metrics(logits: torch.Tensor, val: ValidationSet, cfg: Config
                       ) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
    """Metrics on all validation images and on the real / synthetic subsets.

    Returns (metrics, and per validation image: score, label, group). Keys: ``val_<metric>``,
    ``val_real_<metric>`` (held-out normals + held-out real defects and their extended copies),
    ``val_synth_<metric>`` (held-out normals + simulated anomalies), for image_auroc,
    pixel_auroc, aupro and pixel_ap, plus ``val_real_mean`` / ``val_mean``, the mean of the
    four (the default selection rule). Pixel metrics pool the views' pixels; image metrics
    use the images' stitched scores.
    """
    scores, labels, image_groups = val.image_scores(torch.sigmoid(logits), cfg)
    raw = val.masks.numpy()
    # Views of image-labelled defects have no pixel truth: they count in the image metrics only.
    pixels_known = ~(raw == MASK_UNKNOWN).reshape(len(raw), -1).any(1)
    masks = raw.astype(bool)
    m = logits.numpy()  # pixel metrics rank pixels: logits rank them without sigmoid ties
    out: dict[str, float] = {}
    by_view, by_image = subsets(val.groups.numpy()), subsets(image_groups)
    for prefix, sel in by_view.items():
        img = by_image[prefix]
        if not (img & labels).any():
            continue  # no anomaly in this subset (e.g. no held-out real defect)
        acc = metrics.PixelMetricAccumulator(fpr_limit=0.3)
        pix = sel & pixels_known
        if masks[pix].any():  # else undefined: every defect here is known by its label only
            acc.update(m[pix], masks[pix])
        acc.update(scores=scores[img], labels=labels[img])
        values = {k: float(v) for k, v in acc.compute().items()}
        out.update({f"{prefix}_{k}": v for k, v in values.items()})
    for prefix in by_view:
        if f"{prefix}_image_auroc" not in out:
            continue
        four = [out[f"{prefix}_{k}"] for k in MEAN_METRICS]
        if prefix == "val_real":
            # Held-out real defects known by image labels only leave the real pixel metrics
            # undefined: their image AUROC still judges the decision, and the synthetic
            # anomalies' pixel metrics judge the localisation in their place.
            four = [v if not math.isnan(v) or k == "image_auroc"
                    else out.get(f"val_synth_{k}", math.nan)
                    for k, v in zip(MEAN_METRICS, four)]
        out[f"{prefix}_mean"] = float(np.mean(four)) if not np.isnan(four).any() else math.nan
    return out, scores, labels, image_groups


def calibrate(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, cfg: Config
              ) -> dict[str, Any]:
    """Decision threshold on validation image scores (``is_anomaly = score > threshold``) by
    the rule :func:`prn_ray.thresholds.effective_rule` gives, weighing held-out normals against
    the anomalies from held-out *real* defects (raw and extended copies); only when a product
    has none, against the simulated ones. The held-out scores are kept in the document, so a
    scoring run with another ``score.threshold_rule`` re-derives its threshold from the same
    images (:func:`prn_ray.thresholds.threshold_for`)."""
    normals = scores[~labels]
    real = labels & np.isin(groups, REAL_GROUPS)
    defects = scores[real] if real.any() else scores[labels]
    choice = thresholds.choose(normals, defects, thresholds.effective_rule(cfg))
    kind, target = thresholds.parse_rule(choice.rule.split(" ")[0])
    doc: dict[str, Any] = {"rule": kind, "n_normal": int((~labels).sum()),
                           "n_anomalous": int(labels.sum()), "n_real_anomalous": int(real.sum()),
                           "anomalous_from": "real" if real.any() else "synthetic",
                           "threshold": choice.threshold, "threshold_rule": choice.rule,
                           # what val_fpr / val_tpr rest on: held-out normals, weighed defects
                           "n_recall": choice.n_anomalous}
    if choice.f1 is not None:
        doc["f1"] = choice.f1
    if kind == "fpr":
        doc["target_fpr"] = target
    doc.update(val_fpr=choice.expected_fpr, val_tpr=choice.expected_recall,
               score_rule=cfg.model.score,
               held_out_scores={"normal": [round(float(v), 7) for v in normals],
                                "anomalous": [round(float(v), 7) for v in defects]})
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


def fit_image_head(logits: torch.Tensor, val: ValidationSet, cfg: Config
                   ) -> tuple[image_head.ImageHead, np.ndarray, np.ndarray, np.ndarray]:
    """The image head (:mod:`prn_ray.image_head`) fitted on the validation images' maps, and
    per image its cross-fitted score, label and group (what calibration weighs).

    Image-labelled and masked real defects count alike here: the head needs image labels only."""
    maps, labels, groups = val.image_maps(torch.sigmoid(logits), cfg)
    rule = ScoreRule.from_config(cfg.model, tuple(logits.shape[-2:]))
    names = image_head.statistics_for(resolve(cfg.data).tiled)
    stats = np.stack([image_head.map_statistics(m.amap, names, rule.topk, rule.kernel)
                      for m in maps])
    weights = image_head.sample_weights(labels, np.isin(groups, REAL_GROUPS))
    held = image_head.cross_fitted(stats, labels, weights, names, rule.topk, rule.kernel,
                                   seed=cfg.train.seed)
    head = image_head.fit(stats, labels, weights, names, rule.topk, rule.kernel)
    return head, held, labels, groups


def head_calibration(logits: torch.Tensor, val: ValidationSet, cfg: Config,
                     map_scores: np.ndarray, labels: np.ndarray, groups: np.ndarray
                     ) -> dict[str, Any]:
    """:func:`calibrate` on the image head's cross-fitted scores, with the head itself and
    both scores' validation image AUROC (the head against the map rule it replaces).
    ``map_scores``, ``labels``, ``groups``: per validation image, as
    :func:`validation_metrics` returns them for ``logits``."""
    try:
        head, held, labels, groups = fit_image_head(logits, val, cfg)
    except ValueError as exc:  # too few validation images of a kind to fit and cross-fit
        return {**calibrate(map_scores, labels, groups, cfg),
                "image_head_skipped": f"{exc}; the map rule scores this version"}
    doc = calibrate(held, labels, groups, cfg)
    real = (~labels) | np.isin(groups, REAL_GROUPS)
    sel = real if (labels & real).any() else np.ones(len(labels), bool)
    auroc = {name: round(float(metrics.image_auroc(labels[sel], s[sel])), 5)
             for name, s in (("head", held), ("map_rule", map_scores))}
    doc["image_head"] = {**head.to_doc(), "val_image_auroc": auroc,
                         "scores": "cross-fitted over 5 folds of the validation images"}
    return doc
