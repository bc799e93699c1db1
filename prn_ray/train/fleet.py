"""All products at once: one Tune trial per product (Ray's many-model pattern), each running
:func:`prn_ray.train.product.train_product`; run summaries and the end-of-run table.

A run is resumable by its id: products that finished keep their result, the others resume from
their checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from typing import Any

import pandas as pd
import ray

from prn_ray import storage
from prn_ray.config import Config, from_dict
from prn_ray.console import format_table, progress
from prn_ray.contracts import dumps, new_id
from prn_ray.data.catalog import training_inputs
from prn_ray.plans import products_at_once
from prn_ray.runtime import quiet_ray_data, quiet_worker_exit
from prn_ray.train.product import ProductResult, storage_filesystem, train_product


def _product_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one product's driver. Writes its result as JSON, then reports."""
    from ray import tune

    quiet_ray_data()
    quiet_worker_exit()
    cfg = from_dict(config["cfg"]).replace(config["overrides"].get(config["product"], {}))
    catalog = ray.get(config["catalog"])
    result = train_product(cfg, config["product"], catalog, config["run_id"], config["others"])
    doc = asdict(result)
    storage.write_text(storage.join(config["summary_uri"], f"{result.product}.json"),
                       dumps(doc), cfg.storage)
    with tempfile.TemporaryDirectory() as d:
        # Tune keeps trial metrics only when reported with a checkpoint (Ray 2.60).
        with open(os.path.join(d, "result.json"), "w") as f:
            f.write(dumps(doc))
        tune.report({"ok": int(result.status == "ok")},
                    checkpoint=tune.Checkpoint.from_directory(d))


def max_concurrent_products(cfg: Config, n_products: int) -> int:
    """How many products fit at once in the cluster Ray is connected to."""
    return products_at_once(cfg, n_products, ray.cluster_resources().get("CPU", 1.0))


def train_all(cfg: Config, products: list[str] | None = None, run_id: str | None = None,
              overrides: dict[str, dict[str, Any]] | None = None,
              inputs: tuple[pd.DataFrame, dict[str, list[str]], list[str]] | None = None
              ) -> list[ProductResult]:
    """Train every product of the catalog in parallel; returns one result per product.

    ``overrides`` maps a product to dotted config overrides for it alone (e.g. the best
    configuration a tuning study found, see :func:`prn_ray.studies.load_best`).

    Writes ``<runs_uri>/<run_id>/summary/<product>.json`` as products finish and
    ``<runs_uri>/<run_id>/summary.json`` plus ``<models_uri>/_runs/<run_id>.json`` at the end.
    """
    cfg = cfg.with_absolute_paths()  # trials run in their own working directories
    run_id = run_id or new_id("train-")
    frame, others, wanted = inputs or training_inputs(cfg, products)
    summary_uri = storage.join(cfg.storage.runs_uri, run_id, "summary")
    done = _finished_products(cfg, summary_uri, wanted)  # a resumed run keeps what succeeded
    todo = [p for p in wanted if p not in done]
    concurrency = max_concurrent_products(cfg, max(1, len(todo)))
    progress("train_all", f"run {run_id}: {len(wanted)} product(s) {wanted}, "
                          f"{concurrency} at a time"
                          + (f", {len(done)} already trained in this run" if done else ""))
    if todo:
        _run_products(cfg, todo, run_id, frame, others, overrides or {}, summary_uri,
                      concurrency)
    results = []
    for product in wanted:
        uri = storage.join(summary_uri, f"{product}.json")
        if storage.exists(uri, cfg.storage):
            results.append(ProductResult(**json.loads(storage.read_text(uri, cfg.storage))))
        else:  # the trial itself died (e.g. its process was killed) before writing a result
            results.append(ProductResult(product=product, status="failed",
                                         error="trial died before reporting (see Ray logs)"))
    table = [asdict(r) for r in results]
    doc = dumps({"run_id": run_id, "products": table})
    storage.write_text(storage.join(cfg.storage.runs_uri, run_id, "summary.json"), doc, cfg.storage)
    storage.write_text(storage.join(cfg.storage.models_uri, "_runs", f"{run_id}.json"), doc,
                       cfg.storage)
    return results


def _finished_products(cfg: Config, summary_uri: str, products: list[str]) -> set[str]:
    done = set()
    for product in products:
        uri = storage.join(summary_uri, f"{product}.json")
        if storage.exists(uri, cfg.storage):
            if json.loads(storage.read_text(uri, cfg.storage)).get("status") == "ok":
                done.add(product)
    return done


def _run_products(cfg: Config, products: list[str], run_id: str, frame: pd.DataFrame,
                  others: dict[str, list[str]], overrides: dict[str, dict[str, Any]],
                  summary_uri: str, concurrency: int) -> None:
    """One Tune trial per product (Ray's many-model pattern), ``concurrency`` at a time."""
    from ray import tune

    fs, path = storage_filesystem(cfg, storage.join(cfg.storage.runs_uri, run_id))
    tuner = tune.Tuner(
        tune.with_resources(_product_trial, {"cpu": cfg.train.driver_cpus}),
        param_space={
            "product": tune.grid_search(list(products)),
            "cfg": cfg.to_dict(), "catalog": ray.put(frame), "run_id": run_id,
            "overrides": overrides, "others": others, "summary_uri": summary_uri,
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=new_id("products-"),
                                  storage_path=path, storage_filesystem=fs,
                                  verbose=0),
    )
    tuner.fit()


def format_summary(results: list[ProductResult]) -> str:
    """The final table a person reads at the end of a run (validation metrics on the held-out
    real defects: the numbers best-epoch selection used)."""
    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append([r.product, r.status, r.epochs, r.best_epoch + 1 if r.epochs else "-",
                     m.get("val_real_pixel_ap"), m.get("val_real_aupro"),
                     m.get("val_real_image_auroc"), round(r.wall_s),
                     r.version if r.status == "ok" else (r.error or "")[:80]])
    return format_table(["product", "status", "epochs", "best", "val pAP", "val AUPRO",
                         "val iAUROC", "wall s", "version / error"], rows, align="llrrrrrrl")
