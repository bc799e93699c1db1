"""Evaluation of registered models on the test split (the paper's table) and of nightly scores.

* :func:`evaluate_models` scores each product's test split (seen anomalies are not in it) with
  its registered model in a Ray Data actor pool, at the model's resolution (the paper reports
  256 x 256), and computes image AUROC, pixel AUROC, AUPRO@0.3, pixel AP and model ms/image.
* :func:`evaluate_scores` checks a scoring job's committed Parquet output against ground-truth
  masks at each image's own resolution.

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

from prn_ray import images, metrics, storage
from prn_ray.config import Config, StorageConfig
from prn_ray.console import Every, detail, progress, rate_line
from prn_ray.contracts import new_id
from prn_ray.data.catalog import build_catalog
from prn_ray.report import (
    ExampleImage,
    ProductEvaluation,
    select_examples,
    write_report,
    write_tables,
)
from prn_ray.runner import RegisteredModels
from prn_ray.scoring.table import png_to_map, read_scores

PROGRESS_EVERY_S = 15.0  # a progress line of a product's test pass at most this often


class EvalScorer:
    """Ray Data actor: one product's registered model, loaded once; float maps + timings."""

    def __init__(self, storage_cfg: StorageConfig, product: str, version: str,
                 threads: int = 1):
        self.runner = RegisteredModels(storage_cfg, threads=threads)
        self.model = self.runner.get(product, version)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = images.error_free(batch["error"])
        n, s = len(ok), batch["image"].shape[1]
        maps = np.zeros((n, s, s), np.float32)  # float16 ties probabilities above 0.9995
        scores = np.full(n, np.nan, np.float32)
        ms = np.zeros(n, np.float32)
        if ok.any():
            out, ms[ok] = self.runner.run(self.model, batch["image"][ok])
            maps[ok] = out.anomaly_map[:, 0].float().cpu().numpy()
            scores[ok] = out.score.float().cpu().numpy()
        errors = np.array(["" if good else str(e) for good, e in zip(ok, batch["error"])],
                          dtype=object)
        return {"image_uri": batch["image_uri"], "label": batch["label"],
                "defect_type": batch["defect_type"], "mask": batch["mask"], "map": maps,
                "score": scores, "ms": ms, "error": errors}


@dataclass
class ProductResult:
    """Everything measured for one product (kept in memory until the report is written)."""

    evaluation: ProductEvaluation
    maps: np.ndarray  # N x S x S float32
    masks: np.ndarray  # N x S x S uint8
    uris: list[str]
    errors: dict[str, str]


def _accumulate(product: str, uris: list[str], labels: np.ndarray, defect_types: list[str],
                masks: np.ndarray, maps: np.ndarray, scores: np.ndarray,
                ms_per_image: float, threshold: float | None, **fields) -> ProductEvaluation:
    acc = metrics.PixelMetricAccumulator(fpr_limit=0.3)
    acc.update(maps.astype(np.float32), masks, scores=scores, labels=labels)
    return ProductEvaluation.from_accumulator(
        product, acc, ms_per_image=ms_per_image, scores=scores, labels=labels,
        defect_types=defect_types, threshold=threshold, **fields)


def evaluate_product(cfg: Config, product: str, test: pd.DataFrame, version: str | None = None
                     ) -> ProductResult:
    """Score one product's test rows with its registered model (Ray Data) and measure."""
    import ray

    from prn_ray import registry
    from prn_ray.data.ray_data import actor_pool_map, decode_stage, frame_dataset

    mv = registry.load(cfg.storage, product, version)
    frame = test[["image_uri", "mask_uri", "label", "defect_type"]].reset_index(drop=True)
    frame["mask_uri"] = frame["mask_uri"].fillna("")
    ds = decode_stage(frame_dataset(frame, cfg), cfg, mv.image_size)
    ds = actor_pool_map(
        ds, EvalScorer, fn_constructor_kwargs={"storage_cfg": cfg.storage, "product": product,
                                           "version": mv.version,
                                           "threads": max(1, int(cfg.score.cpus_per_actor))},
        compute=ray.data.ActorPoolStrategy(size=cfg.score.actors),
        batch_size=cfg.score.batch_size, batch_format="numpy", num_cpus=cfg.score.cpus_per_actor)
    parts: dict[str, list] = {k: [] for k in ("image_uri", "label", "defect_type", "mask",
                                              "map", "score", "ms", "error")}
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
    masks, maps, scores = cols["mask"][ok], cols["map"][ok], cols["score"][ok]
    ms = cols["ms"][ok]
    evaluation = _accumulate(
        product, uris, labels, [str(d) for d in cols["defect_type"][ok]], masks, maps, scores,
        float(np.median(ms)) if ms.size else float("nan"), mv.threshold,
        model_version=mv.version, image_size=mv.image_size,
        info={"backbone": mv.config.model.backbone,
              "weights": mv.metrics.get("backbone_weights", mv.config.model.weights),
              "test images": len(uris), "unreadable test images": len(errors)})
    return ProductResult(evaluation, maps, masks, uris, errors)


def _examples(cfg: Config, res: ProductResult, size: int, max_examples: int) -> None:
    """Attach the report's image grid: decode the selected images again (small, in-process)."""
    ev = res.evaluation
    idx = select_examples(np.asarray(ev.scores), np.asarray(ev.labels), max_examples)
    if not idx:
        return
    batch = {"image_uri": np.array([res.uris[i] for i in idx], dtype=object)}
    decoded = images.decode_batch(batch, storage_cfg=cfg.storage, data_cfg=cfg.data,
                                  image_size=size)
    for j, i in enumerate(idx):
        ev.examples.append(ExampleImage(
            image=decoded["image"][j], anomaly_map=res.maps[i].astype(np.float32),
            score=float(ev.scores[i]), label=bool(ev.labels[i]), mask=res.masks[i],
            defect_type=str(ev.defect_types[i]), name=res.uris[i].rsplit("/", 1)[-1]))


def save_maps(res: ProductResult, uri: str, storage_cfg: StorageConfig | None) -> None:
    ev = res.evaluation
    buf = io.BytesIO()
    np.savez_compressed(buf, uris=np.array(res.uris), labels=np.asarray(ev.labels),
                        scores=np.asarray(ev.scores, np.float32), maps=res.maps,
                        masks=res.masks.astype(np.uint8))
    storage.write_bytes(uri, buf.getvalue(), storage_cfg)


def evaluate_models(cfg: Config, products: list[str] | None = None, out_uri: str | None = None,
                    *, save: bool = True, report: bool = True, max_examples: int = 16
                    ) -> tuple[list[ProductEvaluation], str]:
    """Evaluate the registered model of each product on its test split; returns the
    evaluations and the output URI (results.json/.md, report.html, maps/)."""
    from prn_ray.registry import RegistryError

    catalog = build_catalog(cfg)
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
            _examples(cfg, res, int(ev.image_size), max_examples)
        evaluations.append(ev)
    _write(evaluations, out_uri, cfg, report, title="PRN evaluation: test split")
    return evaluations, out_uri


def evaluate_scores(cfg: Config, scores_uri: str, date: str | None = None,
                    products: list[str] | None = None, out_uri: str | None = None,
                    *, report: bool = True) -> tuple[list[ProductEvaluation], str]:
    """Check committed nightly scores against the catalog's ground truth, at each image's own
    resolution. Only the catalog's test split counts: scored images that the catalog does not
    know, or that were training data (train, seen, val), are left out (counted in ``info``)."""

    catalog = build_catalog(cfg).df
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
        acc = metrics.PixelMetricAccumulator(fpr_limit=0.3)
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
            acc.update(prob, mask)  # one image per update: resolutions may differ
        acc.update(scores=np.array(scores), labels=np.array(labels))
        ev = ProductEvaluation.from_accumulator(
            product, acc, scores=np.array(scores), labels=np.array(labels),
            defect_types=[str(truth.loc[u, "defect_type"]) for u in part["image_uri"]],
            threshold=float(part["threshold"].iloc[0]),
            model_version=",".join(sorted(part["model_version"].dropna().unique())),
            info={"rows": len(part), "resolution": "original",
                  "left out (error, not in the test split)": n_rows - len(part)})
        evaluations.append(ev)
        detail(product, "scores vs ground truth: " + ", ".join(
            f"{k} {ev.metric(k):.4f}" for k in ("image_auroc", "pixel_auroc", "pixel_ap")))
    _write(evaluations, out_uri, cfg, report, title="PRN evaluation: nightly scores")
    return evaluations, out_uri


def _write(evaluations: list[ProductEvaluation], out_uri: str, cfg: Config, report: bool,
           title: str) -> None:
    write_tables(evaluations, out_uri, cfg.storage)
    if report and evaluations:
        meta: dict[str, Any] = {"backbone": cfg.model.backbone, "image size": cfg.data.image_size,
                                "seen anomalies": cfg.data.seen_anomalies}
        write_report(evaluations, out_uri, cfg.storage, title=title, meta=meta)
