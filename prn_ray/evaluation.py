"""Evaluation of registered models on the test split (the paper's table) and of nightly scores.

* :func:`evaluate_models` scores each product's test split (seen anomalies are not in it) with
  its registered model in a Ray Data actor pool, at the resolution the model works at (the
  model's input for a whole image, 256 x 256 as the paper reports; the image at the cut scale
  for tiles), and computes image AUROC, pixel AUROC, AUPRO@0.3, pixel AP and model ms/image.
* :func:`evaluate_scores` checks a scoring job's committed Parquet output against ground-truth
  masks at each image's own resolution (exact for the stored 16-bit maps, constant memory).

Both write ``results.json``, ``results.md`` and an HTML report (``report.html`` + figures)
under the output URI, and, unless disabled, ``maps/<product>.npz`` with every test map, mask,
score and label so anyone can recompute the numbers independently.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from prn_ray import images, metrics, storage, thresholds
from prn_ray.config import Config, DataConfig, StorageConfig
from prn_ray.console import Every, detail, progress, rate_line
from prn_ray.contracts import image_labelled, new_id
from prn_ray.data.catalog import Catalog, build_catalog
from prn_ray.geometry import Geometry, resize_to
from prn_ray.inference import ScoreRule, in_batches, stitch_items
from prn_ray.report import (
    ExampleImage,
    ProductEvaluation,
    select_examples,
    write_report,
    write_tables,
)
from prn_ray.runner import RegisteredModels
from prn_ray.scoring.table import MAP_PNG_MAX, png_to_map, read_scores

PROGRESS_EVERY_S = 15.0  # a progress line of a product's test pass at most this often


class EvalScorer:
    """Ray Data actor: one product's registered model, loaded once. Reads each test image and
    its mask, cuts the image by the model's geometry, stitches the views' maps and returns,
    per image, the map and mask at the working resolution (float32 / uint8 bytes), its score
    and the model's time for it."""

    def __init__(self, storage_cfg: StorageConfig, data_cfg: DataConfig, product: str,
                 version: str, threads: int = 1, batch_size: int = 16):
        from prn_ray import registry

        self.runner = RegisteredModels(storage_cfg, threads=threads)
        self.model = self.runner.get(product, version)
        self.geometry = registry.describe(storage_cfg, product, version)[1]
        self.storage_cfg, self.data_cfg, self.batch_size = storage_cfg, data_cfg, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_uri"])
        g = self.geometry
        maps, masks = [b""] * n, [b""] * n
        hw = np.zeros((n, 2), np.int32)
        scores = np.full(n, np.nan, np.float32)
        ms = np.zeros(n, np.float32)
        errors = [""] * n
        views, items, idx, truth = [], [], [], {}
        for i in range(n):
            try:
                img, mask = images.load_pair(batch["image_uri"][i], batch["mask_uri"][i],
                                             "anomaly" if str(batch["label"][i]) == "anomaly"
                                             else "skip", self.storage_cfg, self.data_cfg)
            except Exception as exc:  # noqa: BLE001 - becomes the row's error
                errors[i] = images.row_error(exc)
                continue
            h, w = img.shape[:2]
            mask = np.zeros((h, w), np.uint8) if mask is None else mask
            truth[i] = (h, w, resize_to(mask, g.working_size(h, w), nearest=True))
            v = g.views(img)
            views.append(v)
            items += [i] * len(v)
            idx += list(range(len(v)))
        if views:
            probs, per_view = in_batches(lambda v: self.runner.probabilities(self.model, v),
                                         np.concatenate(views), self.batch_size)
            items_a = np.asarray(items)
            sizes = np.array([truth[i][:2] for i in items])
            for m in stitch_items(probs, items_a, np.asarray(idx), sizes[:, 0], sizes[:, 1], g,
                                  ScoreRule.of(self.model)):
                maps[m.item] = np.ascontiguousarray(m.amap, np.float32).tobytes()
                masks[m.item] = np.ascontiguousarray(truth[m.item][2], np.uint8).tobytes()
                hw[m.item] = m.amap.shape
                scores[m.item] = m.score
                ms[m.item] = per_view[items_a == m.item].sum()
        return {"image_uri": batch["image_uri"], "label": batch["label"],
                "defect_type": batch["defect_type"], "map": np.array(maps, dtype=object),
                "mask": np.array(masks, dtype=object), "height": hw[:, 0], "width": hw[:, 1],
                "score": scores, "ms": ms, "error": np.array(errors, dtype=object)}


@dataclass
class ProductMaps:
    """One product's test split as evaluated: its metrics and every map and mask (kept in
    memory until the report is written)."""

    evaluation: ProductEvaluation
    maps: list[np.ndarray]  # per image, its working size, float32
    masks: list[np.ndarray]  # per image, the same size, uint8
    uris: list[str]
    errors: dict[str, str]


def _accumulate(product: str, uris: list[str], labels: np.ndarray, defect_types: list[str],
                masks: list[np.ndarray], maps: list[np.ndarray], scores: np.ndarray,
                ms_per_image: float, threshold: float | None, **fields) -> ProductEvaluation:
    acc = metrics.PixelMetricAccumulator(fpr_limit=0.3)
    # A defect known by its image label only has no pixel truth: image metrics only.
    known = [(a, m) for a, m in zip(maps, masks) if not image_labelled(m)]
    if known and len({a.shape for a, _ in known}) == 1:
        acc.update(np.stack([a for a, _ in known]), np.stack([m for _, m in known]))
    else:  # images of several sizes: one image per update
        for amap, mask in known:
            acc.update(amap, mask)
    acc.update(scores=scores, labels=labels)
    return ProductEvaluation.from_accumulator(
        product, acc, ms_per_image=ms_per_image, scores=scores, labels=labels,
        defect_types=defect_types, threshold=threshold, **fields)


def resolution(geometry: Geometry, sizes: list[tuple[int, int]]) -> str:
    """What the evaluation's resolution was, in words (the working size of the images)."""
    shapes = sorted(set(sizes))
    shown = ", ".join(f"{w}x{h}" for h, w in shapes[:3]) + (" ..." if len(shapes) > 3 else "")
    where = "the model's input" if not geometry.tiled else f"the images cut at {geometry.scale:g}x"
    return f"{shown} ({where})"


def evaluate_product(cfg: Config, product: str, test: pd.DataFrame, version: str | None = None
                     ) -> ProductMaps:
    """Score one product's test rows with its registered model (Ray Data) and measure, at
    the resolution the model works at (the working size: the model's input for a whole
    image, the image at the cut scale for tiles)."""
    import ray

    from prn_ray import registry
    from prn_ray.data.ray_data import actor_pool_map, frame_dataset

    version, geometry, threshold = registry.describe(cfg.storage, product, version,
                                                     cfg.score.threshold_rule)
    mv = registry.load(cfg.storage, product, version)
    frame = test[["image_uri", "mask_uri", "label", "defect_type"]].reset_index(drop=True)
    frame["mask_uri"] = frame["mask_uri"].fillna("")
    ds = actor_pool_map(
        frame_dataset(frame, cfg), EvalScorer,
        fn_constructor_kwargs={"storage_cfg": cfg.storage, "data_cfg": cfg.data,
                               "product": product, "version": version,
                               "threads": max(1, int(cfg.score.cpus_per_actor)),
                               "batch_size": cfg.score.batch_size},
        compute=ray.data.ActorPoolStrategy(size=cfg.score.actors),
        batch_size=cfg.data.read_batch_size, batch_format="numpy",
        num_cpus=cfg.score.cpus_per_actor)
    parts: dict[str, list] = {k: [] for k in ("image_uri", "label", "defect_type", "mask",
                                              "map", "height", "width", "score", "ms",
                                              "error")}
    done, clock = 0, Every(PROGRESS_EVERY_S)
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        for k in parts:
            parts[k].append(batch[k])
        done += len(batch["image_uri"])
        if done < len(frame) and clock.due():
            progress(product, "test: " + rate_line(done, len(frame), clock.elapsed()))
    cols = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    ok = images.error_free(cols["error"])
    errors = {str(u): str(e) for u, e, good in zip(cols["image_uri"], cols["error"], ok)
              if not good}
    uris = [str(u) for u in cols["image_uri"][ok]]
    labels = np.array([str(x) == "anomaly" for x in cols["label"][ok]])
    shapes = [(int(h), int(w)) for h, w in zip(cols["height"][ok], cols["width"][ok])]
    maps = [np.frombuffer(b, np.float32).reshape(s) for b, s in zip(cols["map"][ok], shapes)]
    masks = [np.frombuffer(b, np.uint8).reshape(s) for b, s in zip(cols["mask"][ok], shapes)]
    scores, ms = cols["score"][ok].astype(np.float32), cols["ms"][ok]
    evaluation = _accumulate(
        product, uris, labels, [str(d) for d in cols["defect_type"][ok]], masks, maps, scores,
        float(np.median(ms)) if ms.size else float("nan"), threshold,
        model_version=version, image_size=list(geometry.size),
        info={"backbone": mv.config.model.backbone,
              "weights": mv.metrics.get("backbone_weights", mv.config.model.weights),
              "input": geometry.describe(), "resolution": resolution(geometry, shapes),
              "test images": len(uris), "unreadable test images": len(errors)},
        calibration=thresholds.under_rule(mv.calibration, cfg.score.threshold_rule))
    if mv.image_head is not None:
        _head_ablation(evaluation, mv, geometry, maps, labels)
    return ProductMaps(evaluation, maps, masks, uris, errors)


def _head_ablation(evaluation: ProductEvaluation, mv, geometry: Geometry,
                   maps: list[np.ndarray], labels: np.ndarray) -> None:
    """A model with an image head: the test image AUROC of the map's own rule beside the
    head's (the same maps, scored both ways), in ``metrics`` and in the report's info."""
    rule = ScoreRule.from_config(mv.config.model, geometry.size)
    plain = np.array([rule(a) for a in maps], np.float64)
    value = metrics.image_auroc(labels, plain) if labels.any() and not labels.all() \
        else float("nan")
    evaluation.metrics = {**evaluation.metrics, "image_auroc_map_rule": value}
    evaluation.info = {**evaluation.info, "image score": (
        f"image head (test image AUROC {100 * evaluation.metric('image_auroc'):.1f}; the map "
        f"rule {mv.config.model.score} k={mv.config.model.score_topk} alone: "
        f"{100 * value:.1f})")}


def _examples(cfg: Config, res: ProductMaps, geometry: Geometry, max_examples: int) -> None:
    """Attach the report's image grid: the selected images again (small, in-process), at the
    resolution of their maps (the stitched map of a tiled model, not a squashed one)."""
    ev = res.evaluation
    idx = select_examples(np.asarray(ev.scores), np.asarray(ev.labels), max_examples)
    for i in idx:
        try:
            img, _ = images.load_pair(res.uris[i], None, "skip", cfg.storage, cfg.data)
        except Exception:  # noqa: BLE001 - it decoded a moment ago; a vanished file is skipped
            continue
        ev.examples.append(ExampleImage(
            image=resize_to(img, res.maps[i].shape), anomaly_map=res.maps[i],
            score=float(ev.scores[i]), label=bool(ev.labels[i]), mask=res.masks[i],
            defect_type=str(ev.defect_types[i]), name=res.uris[i].rsplit("/", 1)[-1]))


def save_maps(res: ProductMaps, uri: str, storage_cfg: StorageConfig | None) -> None:
    """``maps/<product>.npz``: uris, labels, scores and, when every image has one size,
    ``maps`` / ``masks`` stacked (else ``map_<i>`` / ``mask_<i>`` per image)."""
    ev = res.evaluation
    buf = io.BytesIO()
    arrays: dict[str, np.ndarray] = {}
    if len({m.shape for m in res.maps}) <= 1:
        shape = res.maps[0].shape if res.maps else (0, 0)
        arrays["maps"] = np.stack(res.maps) if res.maps else np.zeros((0, *shape), np.float32)
        arrays["masks"] = (np.stack(res.masks).astype(np.uint8) if res.masks
                           else np.zeros((0, *shape), np.uint8))
    else:
        for i, (amap, mask) in enumerate(zip(res.maps, res.masks)):
            arrays[f"map_{i}"], arrays[f"mask_{i}"] = amap, mask.astype(np.uint8)
    np.savez_compressed(buf, uris=np.array(res.uris), labels=np.asarray(ev.labels),
                        scores=np.asarray(ev.scores, np.float32), **arrays)
    storage.write_bytes(uri, buf.getvalue(), storage_cfg)


def evaluate_models(cfg: Config, products: list[str] | None = None, out_uri: str | None = None,
                    *, save: bool = True, report: bool = True, max_examples: int = 16,
                    catalog: Catalog | None = None) -> tuple[list[ProductEvaluation], str]:
    """Evaluate the registered model of each product on its test split; returns the
    evaluations and the output URI (results.json/.md, report.html, maps/). ``catalog``: the
    one the caller built (a CLI builds it before Ray starts, so bad data paths fail first)."""
    from prn_ray.registry import RegistryError

    catalog = catalog or build_catalog(cfg)
    wanted = list(products or cfg.data.products or catalog.products)
    out_uri = out_uri or storage.join(cfg.storage.runs_uri, "eval",
                                      new_id("eval-"))
    evaluations = []
    for product in wanted:
        test = catalog.df[(catalog.df["product"] == product) & (catalog.df["split"] == "test")]
        if test.empty:
            progress(product, "no test images: skipped")
            continue
        try:
            res = evaluate_product(cfg, product, test)
        except RegistryError as exc:
            progress(product, f"skipped: {exc}")
            continue
        ev = res.evaluation
        if res.errors:
            progress(product, f"{len(res.errors)} unreadable test image(s) left out: "
                              + "; ".join(f"{u}: {e}" for u, e in list(res.errors.items())[:3]))
        progress(product, "test: " + ", ".join(
            f"{k} {ev.metric(k):.4f}" for k in ("image_auroc", "pixel_auroc", "aupro",
                                                "pixel_ap"))
                 + f", {ev.metric('ms_per_image'):.1f} ms/image")
        if save:
            save_maps(res, storage.join(out_uri, "maps", f"{product}.npz"), cfg.storage)
        if report:
            from prn_ray.registry import describe

            _examples(cfg, res, describe(cfg.storage, product)[1], max_examples)
        evaluations.append(ev)
    _write(evaluations, out_uri, cfg, report, title="PRN evaluation: test split")
    return evaluations, out_uri


def evaluate_scores(cfg: Config, scores_uri: str, date: str | None = None,
                    products: list[str] | None = None, out_uri: str | None = None,
                    *, report: bool = True, catalog: Catalog | None = None
                    ) -> tuple[list[ProductEvaluation], str]:
    """Check committed nightly scores against the catalog's ground truth, at each image's own
    resolution. Only the catalog's test split counts: scored images that the catalog does not
    know, or that were training data (train, seen, val), are left out (counted in ``info``)."""

    catalog = (catalog or build_catalog(cfg)).df
    rows = read_scores(scores_uri, cfg.storage, date=date, products=products)
    out_uri = out_uri or storage.join(cfg.storage.runs_uri, "eval-scores",
                                      new_id("eval-"))
    evaluations = []
    for product, part in rows.groupby("product", sort=True):
        truth = catalog[(catalog["product"] == product)
                        & (catalog["split"] == "test")].set_index("image_uri")
        n_rows = len(part)
        part = part[part["error"].isna() & part["image_uri"].isin(truth.index)]
        if part.empty:
            continue
        # The stored maps are 16-bit (65535 = 1): 65536 bins over [0, 1] hold one level each,
        # so the binned metrics are exactly those of the stored maps, in constant memory
        # (190 images of 1.5 MP are 285 M pixels: 2.3 GB in the exact mode).
        acc = metrics.PixelMetricAccumulator(fpr_limit=0.3, bins=MAP_PNG_MAX + 1)
        labels, scores = [], []
        clock = Every(PROGRESS_EVERY_S)
        for done, r in enumerate(part.itertuples()):
            if clock.due():
                progress(product, "scores vs ground truth: "
                         + rate_line(done, len(part), clock.elapsed()))
            t = truth.loc[r.image_uri]
            prob = png_to_map(r.anomaly_map_png)
            h, w = prob.shape
            mask = np.zeros((h, w), np.uint8)
            if t["label"] == "anomaly" and t["mask_uri"]:
                mask = images.decode_mask(storage.read_bytes(t["mask_uri"], cfg.storage), (h, w),
                                          cfg.data.mask_threshold)
            labels.append(t["label"] == "anomaly")
            scores.append(float(r.score))
            if t["label"] == "anomaly" and not t["mask_uri"]:
                continue  # an image label only: no pixel truth, image metrics only
            acc.update(prob, mask)  # one image per update: resolutions may differ
        acc.update(scores=np.array(scores), labels=np.array(labels))
        ev = ProductEvaluation.from_accumulator(
            product, acc, scores=np.array(scores), labels=np.array(labels),
            defect_types=[str(truth.loc[u, "defect_type"]) for u in part["image_uri"]],
            threshold=float(part["threshold"].iloc[0]),
            model_version=",".join(sorted(part["model_version"].dropna().unique())),
            info={"rows": len(part), "resolution": "original",
                  "left out (error, not in the test split)": n_rows - len(part)},
            calibration=thresholds.under_rule(
                _calibration(cfg, product, part["model_version"].dropna()),
                cfg.score.threshold_rule))
        evaluations.append(ev)
        detail(product, "scores vs ground truth: " + ", ".join(
            f"{k} {ev.metric(k):.4f}" for k in ("image_auroc", "pixel_auroc", "pixel_ap")))
    _write(evaluations, out_uri, cfg, report, title="PRN evaluation: nightly scores")
    return evaluations, out_uri


def _calibration(cfg: Config, product: str, versions: pd.Series) -> dict[str, Any]:
    """The calibration of the one model version the scores came from (none for a mix)."""
    from prn_ray import registry

    names = sorted(set(versions))
    if len(names) != 1:
        return {}
    try:
        return registry.calibration(cfg.storage, product, names[0])
    except Exception:  # noqa: BLE001 - a figure of the report, never a failed evaluation
        return {}


def _write(evaluations: list[ProductEvaluation], out_uri: str, cfg: Config, report: bool,
           title: str) -> None:
    write_tables(evaluations, out_uri, cfg.storage)
    if report and evaluations:
        meta: dict[str, Any] = {"backbone": cfg.model.backbone, "image size": cfg.data.image_size,
                                "seen anomalies": cfg.data.seen_anomalies}
        write_report(evaluations, out_uri, cfg.storage, title=title, meta=meta)
