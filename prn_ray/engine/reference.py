"""The normal reference of a product (channel statistics, prototypes, memory banks), fitted
from a stream of its normal images' features and cached by content.

The stream is injected (a Ray Data dataset's batches, or the in-process
:func:`prn_ray.data.local.reference_batches`): both paths fit and cache the same way.

The same pass keeps the normal images' features (float16): every training epoch repeats them
unchanged, so the training stream carries only the synthetic rows
(:mod:`prn_ray.data.feature_cache`). With tiles the pass sees every tile of every normal
image; training draws a fresh tile per row, so those features are not kept.

Cache: ``<storage.runs_uri>/prototype_cache/<key>.safetensors`` (the reference) and
``<key>.features.safetensors`` (the normals' features), the key a SHA-256 over the
normal images' URIs, sizes and modification times, the backbone and its weights (a weights
file by its content too), the image size and every setting of the fit. Tuning trials, ablation
variants and restarted runs with the same images and settings reuse it. The cache remembers
which images were unreadable, so a hit quarantines them as a fit would. Random backbone weights
(``none``) are never cached: they differ from process to process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from prn_ray import images, storage
from prn_ray.config import Config
from prn_ray.console import Every, detail, progress, rate_line
from prn_ray.contracts import FEATURE_COLUMNS
from prn_ray.data.feature_cache import FeatureCache, seen_features
from prn_ray.data.product import ProductData
from prn_ray.data.stages import SynthesisBanks, feature_dtype
from prn_ray.engine.image_labels import keep_strongest_views
from prn_ray.geometry import Geometry
from prn_ray.model.inputs import images_to_tensor
from prn_ray.model.reference import NormalReference, fit_reference

CACHE_VERSION = 3  # bump when feature extraction or the reference fit change
Batches = Iterable[dict[str, np.ndarray]]  # image_uri, view, error, feat0..3 (numpy)
# Per level [N, C, h, w]: the train normals, in their order (None with tiles: not kept).
Features = list[np.ndarray] | None
PROGRESS_EVERY_S = 15.0  # a progress line of the feature pass at most this often


def cache_uri(data: ProductData, cfg: Config, geometry: Geometry) -> str:
    """Where the normal reference of these images and settings is cached (content-keyed)."""
    m = cfg.model
    weights = m.weights
    key_doc = {
        "v": CACHE_VERSION,  # no product name: same images, same reference
        "normals": storage.fingerprint(data.train_normals, cfg.storage),
        "backbone": m.backbone, "weights": weights,
        # a weights file is keyed by its content too, not only by its name
        "weights_file": (storage.fingerprint([weights], cfg.storage)
                         if "/" in weights or "://" in weights else None),
        "geometry": geometry.to_doc(), "feature_dtype": m.feature_dtype,
        "prototypes": m.use_prototypes, "standardize": m.standardize,
        "ratio": m.prototype_ratio, "max_images": m.prototype_max_images,
        "iters": m.kmeans_iters, "seed": cfg.train.seed,
        "prior": ([m.prior_levels, m.prior_bank_size, m.prior_pool]
                  if m.residual_prior else None),
        "max_image_pixels": cfg.data.max_image_pixels, "min_side": cfg.data.min_image_side,
    }
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:32]
    return storage.join(cfg.storage.runs_uri, "prototype_cache", f"{key}.safetensors")


def _features_uri(uri: str) -> str:
    return uri[: -len(".safetensors")] + ".features.safetensors"


def _load_cached(uri: str, cfg: Config, keep: bool
                 ) -> tuple[NormalReference, dict[str, str], Features] | None:
    feats_uri = _features_uri(uri)
    if not storage.exists(uri, cfg.storage) or (keep and not storage.exists(feats_uri,
                                                                           cfg.storage)):
        return None
    blob = storage.read_bytes(uri, cfg.storage)
    header_len = int.from_bytes(blob[:8], "little")  # safetensors: u64 length + JSON header
    meta = json.loads(blob[8:8 + header_len])["__metadata__"]
    ref = NormalReference.from_tensors(safetensors_load(blob), int(meta["n_normal"]))
    feats = None
    if keep:
        got = safetensors_load(storage.read_bytes(feats_uri, cfg.storage))
        feats = [got[c].numpy() for c in FEATURE_COLUMNS]
    return ref, json.loads(meta["quarantine"]), feats


def compute_reference(data: ProductData, cfg: Config, geometry: Geometry,
                      batches: Callable[[], Batches]) -> tuple[NormalReference, Features]:
    """The product's normal reference and its normal images' features (untiled; ``None``
    with tiles): from the cache when the same images and settings were fitted before, else
    fitted from ``batches()`` (unreadable images are quarantined)."""
    cacheable = cfg.train.prototype_cache and cfg.model.weights != "none"
    cache = cache_uri(data, cfg, geometry) if cacheable else None
    keep = not geometry.tiled
    hit = _load_cached(cache, cfg, keep) if cache else None
    if hit is not None:
        ref, bad, feats = hit
        data.exclude(bad)
        progress(data.product, f"normal reference: cached ({cache.rsplit('/', 1)[-1][:12]}…)")
        return ref, feats
    detail(data.product, f"normal reference: features of {len(data.train_normals)} normal "
                         "images (statistics, prototypes, patch memory)")
    ref, bad, feats = fit_from_batches(data, cfg, batches())
    if not keep:
        feats = None  # training draws fresh tiles: the pass's tiles are not needed again
    if cache:
        if feats is not None:
            # features first: a reader that sees the reference sees its features too
            storage.write_bytes(_features_uri(cache), safetensors_save(
                {c: torch.from_numpy(np.ascontiguousarray(f))
                 for c, f in zip(FEATURE_COLUMNS, feats)}), cfg.storage)
        blob = safetensors_save(ref.tensors(), metadata={"n_normal": str(ref.n_normal),
                                                         "quarantine": json.dumps(bad)})
        storage.write_bytes(cache, blob, cfg.storage)  # atomic: readers see all or nothing
    return ref, feats


def fit_from_batches(data: ProductData, cfg: Config, batches: Batches
                     ) -> tuple[NormalReference, dict[str, str], Features]:
    """Collect the normal features (every view of every image), quarantine unreadable
    images, fit. Returns the reference, the unreadable images (uri -> reason) and the
    features in ``data.train_normals`` order (by view within an image)."""
    per_level: list[list[np.ndarray]] = [[] for _ in FEATURE_COLUMNS]
    uris: list[np.ndarray] = []
    views: list[np.ndarray] = []
    bad: dict[str, str] = {}
    total = len(data.train_normals)
    seen: set[str] = set()
    clock = Every(PROGRESS_EVERY_S)
    for batch in batches:
        err = batch["error"]
        ok = images.error_free(err)
        for uri, e in zip(batch["image_uri"][~ok], err[~ok]):
            bad[str(uri)] = str(e)
        uris.append(np.asarray(batch["image_uri"])[ok])
        views.append(np.asarray(batch["view"])[ok] if "view" in batch
                     else np.zeros(int(ok.sum()), np.int64))
        for j, col in enumerate(FEATURE_COLUMNS):
            per_level[j].append(np.asarray(batch[col])[ok])
        seen.update(str(u) for u in batch["image_uri"])
        if len(seen) < total and clock.due():
            progress(data.product, "normal reference: "
                     + rate_line(len(seen), total, clock.elapsed()))
    data.exclude(bad)
    if not data.train_normals:
        raise RuntimeError(f"product {data.product}: no readable normal training image")
    # Streams deliver blocks in completion order: sort by (URI, view) (the order of
    # train_normals) so the seeded fits (k-means init, subsamples, coreset) see the same
    # order every run.
    names = np.concatenate(uris).astype(str)
    order = np.lexsort((np.concatenate(views), names))
    if list(dict.fromkeys(names[order].tolist())) != data.train_normals:
        raise RuntimeError(f"product {data.product}: the reference pass returned other images "
                           "than the train normals")
    feats = [np.concatenate(level)[order] for level in per_level]
    ref = fit_reference([torch.from_numpy(f) for f in feats], cfg.model, seed=cfg.train.seed,
                        n_images=len(data.train_normals))
    return ref, bad, feats


def build_feature_cache(normals: Features, banks: SynthesisBanks, backbone: torch.nn.Module,
                        cfg: Config, geometry: Geometry, data: ProductData,
                        reference: NormalReference) -> FeatureCache:
    """The features every epoch repeats: the normals' (from the reference pass; none with
    tiles) and the seen defects' (computed here from the decoded bank: a handful of views).
    Tiled, an image-labelled defect keeps only its strongest view
    (:func:`~prn_ray.engine.image_labels.keep_strongest_views`): ``banks.seen`` and
    ``data.seen`` lose the others too, so the epoch plan indexes the views that train."""
    dtype = feature_dtype(cfg.model)
    if banks.seen:
        seen, masks = seen_features(banks.seen, backbone, dtype)
        if geometry.tiled and len(data.seen) == len(banks.seen):
            keep = keep_strongest_views(data.seen, seen, masks, reference, cfg)
            if len(keep) < len(banks.seen):
                seen, masks = [f[keep] for f in seen], masks[keep]
                banks.seen = [banks.seen[i] for i in keep]
                data.seen = [data.seen[i] for i in keep]
    else:  # a product without real defects: its plan has no raw seen rows
        x = np.zeros((1, *geometry.size, 3), np.uint8)
        with torch.inference_mode():
            shapes = [f.shape[1:] for f in backbone(images_to_tensor(x))]
        seen = [np.zeros((0, *s), dtype) for s in shapes]
        masks = np.zeros((0, *geometry.size), np.uint8)
    return FeatureCache(normals=(None if normals is None else
                                 [f.astype(dtype, copy=False) for f in normals]),
                        seen=seen, seen_masks=masks, image_size=geometry.size)


def describe(ref: NormalReference) -> str:
    parts = [f"normal reference from {ref.n_normal} normals"]
    if ref.prototypes:
        parts.append(f"K={ref.prototypes[0].shape[0]} prototypes per scale")
    if ref.banks:
        parts.append("memory " + "/".join(str(b.shape[0]) for b in ref.banks) + " patches")
    return ", ".join(parts)
