"""How well does a validation signal rank checkpoints in the order of the test split?

    python benchmarks/selection_signal.py --config configs/magnetic_tile.yaml --steps 600
    python benchmarks/selection_signal.py --config configs/magnetic_tile.yaml --steps 600 \
        --fold 1 --folds 5          # another 2 of the 10 seen defects held out

Trains one product in this process (:func:`prn_ray.engine.local.train_local`, the Ray job's
engine) for a **step** budget and, at every validated epoch, scores the head as that epoch left
it on the validation set (every ``val_*`` signal the trainer computes) and on the **test split**
(read only here, never by training: this is a measurement of the selection rule, not a way to
train). Prints per epoch the signals and the test metrics, then for each signal Spearman's rank
correlation with the test split's mean of the four metrics over the run's checkpoints, the epoch
it would register, and that epoch's test mean against the best the run reached.

``--fold i --folds k``: the product's seen defects (training + validation, sorted by path) are
re-split so that every k-th one from the i-th is held out for validation; ``--fold`` left out
keeps the catalog's split. Writes ``selection_signal.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import _common  # noqa: F401  (repo on sys.path, quiet Ray Data)
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from prn_ray.config import load_config
from prn_ray.console import format_table, progress
from prn_ray.contracts import GROUP_NORMAL, GROUP_REAL
from prn_ray.data.catalog import build_catalog
from prn_ray.data.local import feature_batches
from prn_ray.data.product import ProductData, product_geometry
from prn_ray.data.stages import build_banks
from prn_ray.engine.local import train_local
from prn_ray.engine.validation import (
    MEAN_METRICS,
    VALIDATION_EXTRA,
    ValidationSet,
    predict_logits,
    validation_metrics,
)
from prn_ray.geometry import VIEW_ALL
from prn_ray.model import Backbone

SIGNALS = ("val_real_mean", "val_mean", "val_synth_mean", "val_real_image_auroc",
           "val_real_pixel_ap", "val_pixel_ap")


def refold(catalog: pd.DataFrame, product: str, fold: int, folds: int) -> pd.DataFrame:
    """The catalog with ``product``'s seen defects re-split: every ``folds``-th from ``fold``
    (sorted by path) held out for validation, the others seen in training."""
    df = catalog.copy()
    pool = df[(df["product"] == product) & (df["label"] == "anomaly")
              & df["split"].isin(["seen", "val"])].sort_values("image_uri")
    held = pool.index[fold::folds]
    df.loc[pool.index, "split"] = "seen"
    df.loc[held, "split"] = "val"
    return df


def test_frame(catalog: pd.DataFrame, product: str) -> pd.DataFrame:
    """The product's test rows as validation rows (normals and real defects, every view)."""
    t = catalog[(catalog["product"] == product) & (catalog["split"] == "test")]
    normal = (t["label"] == "normal").to_numpy()
    return pd.DataFrame({
        "image_uri": t["image_uri"].to_numpy(), "mask_uri": t["mask_uri"].fillna("").to_numpy(),
        "kind": np.where(normal, "normal", "seen"), "label": t["label"].to_numpy(),
        "group": np.where(normal, GROUP_NORMAL, GROUP_REAL).astype(np.int64),
        "item": np.arange(len(t), dtype=np.int64), "view": np.full(len(t), VIEW_ALL, np.int64),
        "seed": np.zeros(len(t), np.int64), "source_index": np.full(len(t), -1, np.int64)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--product", default=None, help="default: the catalog's first product")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--fold", type=int, default=None)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--out", default="runs/selection_signal")
    args = p.parse_args()

    cfg = load_config(args.config, args.overrides).replace({
        "train.max_steps": args.steps, "train.epochs": 10_000, "train.time_budget_s": None})
    catalog = build_catalog(cfg)
    product = args.product or catalog.products[0]
    frame = catalog.df
    if args.fold is not None:
        frame = refold(frame, product, args.fold, args.folds)
    data = ProductData.from_catalog(frame, product)
    cfg_p, geometry = product_geometry(cfg, data.train_normals)
    backbone = Backbone(cfg_p.model.backbone, cfg_p.model.weights, cfg_p.storage)
    t0 = time.time()
    test = ValidationSet.from_batches(feature_batches(
        test_frame(frame, product), build_banks(data, {}, cfg_p, geometry), cfg_p, geometry,
        backbone, cfg_p.train.batch_size, extra=VALIDATION_EXTRA, validation=True))
    progress("selection", f"{len(test)} test views in {time.time() - t0:.0f}s; held out: "
             + ", ".join(Path(u).name for u in data.val[data.val.label == "anomaly"].image_uri))

    rows: list[dict] = []

    def on_epoch(trainer, record: dict) -> None:
        if "val_selection" not in record:
            return
        logits = predict_logits(trainer.head, test.features, cfg_p.train.batch_size,
                                trainer.device, trainer.precision)
        tm, *_ = validation_metrics(logits, test, cfg_p)
        row = {"epoch": record["epoch"], "step": record["step"],
               **{k: record.get(k, math.nan) for k in SIGNALS},
               **{f"test_{k}": tm[f"val_real_{k}"] for k in (*MEAN_METRICS, "mean")}}
        rows.append(row)
        progress("selection", f"step {row['step']}: val_real_mean {row['val_real_mean']:.4f} "
                              f"test_mean {row['test_mean']:.4f}")

    train_local(cfg, frame, product, say=lambda m: progress(product, m), report=on_epoch)
    table = pd.DataFrame(rows)
    print(format_table(list(table.columns), [[round(v, 4) if isinstance(v, float) else v
                                               for v in r] for r in table.itertuples(False)]))
    best = float(table["test_mean"].max())
    summary = []
    for s in SIGNALS:
        ok = table[s].notna()
        rho = spearmanr(table.loc[ok, s], table.loc[ok, "test_mean"]).statistic
        pick = table.loc[table.loc[ok, s].idxmax()]
        summary.append([s, round(float(rho), 3), int(pick["step"]),
                        round(float(pick["test_mean"]), 4), round(best - pick["test_mean"], 4)])
    print(format_table(["signal", "spearman vs test_mean", "picks step", "test_mean there",
                        "short of the run's best"], summary), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"selection_signal_fold{args.fold}.json" if args.fold is not None else \
        "selection_signal.json"
    (out / name).write_text(json.dumps({"product": product, "steps": args.steps,
                                        "fold": args.fold, "folds": args.folds,
                                        "rows": rows, "summary": summary}, indent=1))
    progress("selection", f"written {out / name}")


if __name__ == "__main__":
    main()
