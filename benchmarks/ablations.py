"""The paper's ablations (Table 4: MP / MSA / MF off; seen-anomaly count) on one product.

    python benchmarks/ablations.py --config configs/magnetic_tile.yaml --steps 600 \
        --set data.image_size=128

Every variant is a copy of the product in a derived manifest (``<product>__<variant>``) with the
*same* test set and the *same* validation images, trained in one ``train_all`` run with its own
overrides and a **step** budget (not a time budget: the variants are compared at equal
optimisation, whatever else the machine does), then evaluated with ``evaluate_models``.

Variants: ``full`` (all seen training anomalies), ``no_mp``, ``no_msa``, ``no_mf`` (one module
off each) and ``seen<k>`` (only k of the seen training anomalies; the held-out validation
anomalies are the same for all). Heterologous synthesis is off for all variants: the copies
would otherwise use each other's (identical) images as "other products".

Prints a Markdown table and writes it with the run's JSON under
``<runs_uri>/ablations/<run_id>/``.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import _common  # noqa: F401  (repo on sys.path, quiet Ray Data)
import pandas as pd

from prn_ray import storage
from prn_ray.config import load_config
from prn_ray.console import progress
from prn_ray.data.catalog import build_catalog
from prn_ray.data.product import ProductData, product_geometry
from prn_ray.engine.reference import compute_reference
from prn_ray.evaluation import evaluate_models
from prn_ray.runtime import init_ray
from prn_ray.train.datasets import reference_dataset
from prn_ray.train.fleet import train_all

MODULES = {"no_mp": {"model.use_prototypes": False},
           "no_msa": {"model.use_attention": False},
           "no_mf": {"model.use_fusion": False}}
COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")


def ablation_manifest(catalog: pd.DataFrame, product: str, variants: list[str]) -> pd.DataFrame:
    """One copy of ``product`` per variant; seen<k> keeps k seen rows (sorted by path)."""
    base = catalog[catalog["product"] == product]
    seen = base[base["split"] == "seen"].sort_values("image_uri")
    parts = []
    for v in variants:
        rows = base
        if v.startswith("seen"):
            k = int(v[4:])
            if not 1 <= k <= len(seen):
                raise SystemExit(f"{v}: the product has {len(seen)} seen training anomalies")
            rows = base.drop(index=seen.index[k:])
        parts.append(rows.assign(product=f"{product}__{v}"))
    cols = ["product", "image_uri", "label", "defect_type", "mask_uri", "split"]
    return pd.concat(parts, ignore_index=True)[cols]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--product", default=None, help="default: the catalog's only/first product")
    p.add_argument("--variants", default="full,no_mp,no_msa,no_mf,seen1,seen5")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per variant")
    p.add_argument("--run-id", default=None, help="resume this ablation run")
    args = p.parse_args()

    cfg = load_config(args.config, args.overrides)
    catalog = build_catalog(cfg)
    product = args.product or catalog.products[0]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    run_id = args.run_id or time.strftime("ablate-%Y%m%d-%H%M%S", time.gmtime())
    root = storage.join(cfg.storage.runs_uri, "ablations", run_id)
    manifest = storage.join(root, "manifest.parquet")
    if not storage.exists(manifest, cfg.storage):
        storage.write_bytes(manifest, ablation_manifest(catalog.df, product, variants)
                            .to_parquet(index=False), cfg.storage)
    rows = pd.read_parquet(io.BytesIO(storage.read_bytes(manifest, cfg.storage)))
    names = [f"{product}__{v}" for v in variants]
    cfg = cfg.replace({
        "data.manifest": manifest, "data.root": None, "data.products": names,
        "storage.models_uri": storage.join(root, "models"),
        "storage.runs_uri": storage.join(root, "train"),
        "train.max_steps": args.steps, "train.epochs": 10_000, "train.time_budget_s": None,
        "synthesis.source_weights": {**cfg.synthesis.source_weights, "heterologous": 0.0},
    })
    overrides = {f"{product}__{v}": MODULES.get(v, {}) for v in variants}
    init_ray(cfg)
    t0 = time.time()
    # The variants share their normal images: fit the reference once, before they start
    # together (each would miss the cache at the same moment and fit its own).
    if any(v != "no_mp" for v in variants):
        data = ProductData.from_catalog(build_catalog(cfg).df, names[0])
        cfg_p, geometry = product_geometry(cfg, data.train_normals)
        compute_reference(data, cfg_p, geometry, lambda: reference_dataset(data, cfg_p, geometry)
                          .iter_batches(batch_size=64, batch_format="numpy"))
    results = train_all(cfg, names, run_id=run_id, overrides=overrides)
    progress("ablations", f"trained {len(names)} variants in {time.time() - t0:.0f}s")
    evaluations, out = evaluate_models(cfg, names, storage.join(root, "eval"), save=False)
    by_name = {e.product: e for e in evaluations}
    trained = {r.product: r for r in results}
    lines = ["| variant | seen (train) | steps | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    doc = {"run_id": run_id, "product": product, "steps": args.steps, "rows": {}}
    for v, name in zip(variants, names):
        e, r = by_name.get(name), trained.get(name)
        vals = {k: (e.metric(k) if e else float("nan")) for k in COLUMNS}
        n_seen = int(((rows["product"] == name) & (rows["split"] == "seen")).sum())
        doc["rows"][v] = {**vals, "seen_train": n_seen, "steps": r.steps if r else 0,
                          "status": r.status if r else "missing"}
        lines.append(f"| {v} | {n_seen} | {r.steps if r else 0} | "
                     + " | ".join(f"{100 * vals[k]:.1f}" for k in COLUMNS) + " |")
    table = "\n".join(lines)
    print(table, flush=True)
    storage.write_text(storage.join(root, "ablations.md"), table + "\n", cfg.storage)
    storage.write_text(storage.join(root, "ablations.json"), json.dumps(doc, indent=1),
                       cfg.storage)
    progress("ablations", f"table: {storage.redact(root)}/ablations.md, report: "
                          f"{storage.redact(out)}/report.html")


if __name__ == "__main__":
    main()
