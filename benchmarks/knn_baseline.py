"""The no-training floor: a PatchCore-style nearest-neighbour map registered as a model.

    python benchmarks/knn_baseline.py --config configs/cpu.yaml --product macaroni1 \
        --set data.manifest=runs/visa/macaroni1.parquet --set storage.models_uri=runs/visa/knn
    python jobs/score.py --config configs/cpu.yaml --set data.manifest=... \
        --set storage.models_uri=runs/visa/knn --set score.output_uri=runs/visa/knn_scores \
        --input <test images> --date 2026-12-07
    python jobs/evaluate.py ... --scores runs/visa/knn_scores --date 2026-12-07

An untrained PRN head *is* that map: its logits are the patch-memory prior (the L2 distance of
each position's 3x3-averaged, channel-standardised backbone feature to the nearest of a greedy
coreset of every normal training patch, at strides 8/16/32, each level z-scored on held-out
normals, summed and Gaussian-smoothed, as PatchCore does) plus a learned correction whose last
convolution starts at zero. So this script fits the product's normal reference exactly as
training does -- same geometry (``data.tiles`` decided the same way), same backbone, same
coreset -- calibrates the prior on the held-out normals, and registers the head without a
single step. Scored and evaluated by the ordinary jobs, it is compared with trained models on
the same protocol and at the same input resolution. The threshold (1 % of held-out normal
views above it) only decides ``is_anomaly``; the metrics do not depend on it.
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (repo on sys.path, quiet Ray Data)
import numpy as np
import torch

from prn_ray import images, metrics, registry, storage
from prn_ray.config import load_config
from prn_ray.contracts import FEATURE_COLUMNS
from prn_ray.data.catalog import build_catalog
from prn_ray.data.local import reference_batches
from prn_ray.data.product import ProductData, product_geometry
from prn_ray.engine.reference import compute_reference, describe
from prn_ray.model import Backbone, PRNHead, image_score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--product", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--test-list", default=None,
                   help="also write the product's test split as a scoring input list (CSV)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    catalog = build_catalog(cfg).df
    if args.test_list:  # the images the test-split figures are computed on, for jobs/score.py
        test = catalog[(catalog["product"] == args.product) & (catalog["split"] == "test")]
        storage.write_text(args.test_list, test[["product", "image_uri"]].to_csv(index=False),
                           cfg.storage)
        print(f"{len(test)} test images -> {args.test_list}", flush=True)
    data = ProductData.from_catalog(catalog[catalog["split"] != "test"], args.product)
    cfg, geometry = product_geometry(cfg, data.train_normals)
    print(f"{args.product}: {geometry.describe()}", flush=True)
    t0 = time.time()
    backbone = Backbone(cfg.model.backbone, cfg.model.weights, cfg.storage)
    fast = Backbone(cfg.model.backbone, cfg.model.weights, cfg.storage).folded().eval()
    fast = fast.to(memory_format=torch.channels_last)
    bs = cfg.train.feature_batch_size
    reference, _ = compute_reference(data, cfg, geometry, lambda: reference_batches(
        data.train_normals, cfg, geometry, fast, bs))
    print(f"{describe(reference)} ({time.time() - t0:.0f}s)", flush=True)
    head = PRNHead(cfg.model, backbone.channels, geometry.size,
                   backbone.feature_sizes(geometry.size)).eval()
    head.set_reference(reference)
    normals = data.val[data.val["label"] == "normal"]["image_uri"].tolist()
    parts = [b for b in reference_batches(normals, cfg, geometry, fast, bs)]
    ok = np.concatenate([images.error_free(b["error"]) for b in parts])
    feats = [torch.from_numpy(np.concatenate([b[c] for b in parts])[ok]) for c in FEATURE_COLUMNS]
    head.calibrate(feats)
    with torch.no_grad():
        scores = torch.cat([image_score(torch.sigmoid(head([f[i:i + bs] for f in feats])),
                                        cfg.model.score, cfg.model.score_topk)
                            for i in range(0, len(feats[0]), bs)]).numpy()
    threshold = metrics.threshold_at_fpr(scores, 0.01)
    version = registry.publish(
        cfg, args.product, head_state=head.state_dict(), backbone_state=backbone.state_dict(),
        geometry=geometry,
        calibration={"threshold": threshold, "rule": "fpr", "target_fpr": 0.01,
                     "note": "held-out normal views (benchmarks/knn_baseline.py)"},
        metrics={"note": "benchmarks/knn_baseline.py: the patch-memory prior, no training",
                 "n_calibration_views": int(len(scores))})
    print(f"registered {args.product}/{version} under {cfg.storage.models_uri} "
          f"({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
