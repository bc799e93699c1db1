"""The image head's ablation on an already trained model, without retraining it.

    python benchmarks/image_head.py --models-uri runs/mt/models_bf16 --product magnetic_tile \
        --out-models runs/mt/models_head
    python jobs/evaluate.py --config configs/cpu.yaml --set data.manifest=... \
        --set storage.models_uri=runs/mt/models_head --output runs/mt/eval_head

Training with ``model.image_head: true`` fits the head at each best epoch on that epoch's
validation maps. This script does the same for a registered version: it rebuilds the
validation set its training run built (the same catalog, geometry, synthesis seeds and
backbone weights), computes the registered head's maps on it, fits the image head
(:func:`prn_ray.engine.validation.head_calibration`, the trainer's own function) and publishes
a copy of the version under ``--out-models`` with the head and its threshold in
``calibration.json``. ``jobs/evaluate.py`` on the copy reports the test image AUROC of the head
and, beside it, of the map rule alone (``image_auroc_map_rule``): the ablation on one set of
maps. It prints the validation figures of both.
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401  (repo on sys.path, quiet Ray Data)
import torch

from prn_ray import registry
from prn_ray.config import StorageConfig
from prn_ray.data.catalog import build_catalog
from prn_ray.data.local import feature_batches
from prn_ray.data.product import ProductData, product_geometry
from prn_ray.data.stages import build_banks, validation_frame
from prn_ray.engine.validation import (
    VALIDATION_EXTRA,
    ValidationSet,
    head_calibration,
    predict_logits,
)
from prn_ray.model import Backbone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-uri", required=True)
    p.add_argument("--product", required=True)
    p.add_argument("--version", default=None, help="default: LATEST")
    p.add_argument("--out-models", required=True, help="where the copy with a head goes")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    mv = registry.load(StorageConfig(models_uri=args.models_uri), args.product, args.version)
    cfg = mv.config.replace({"model.image_head": True})
    catalog = build_catalog(cfg).df
    data = ProductData.from_catalog(catalog[catalog["split"] != "test"], args.product)
    cfg, geometry = product_geometry(cfg, data.train_normals)
    if geometry.to_doc() != mv.geometry.to_doc():
        raise SystemExit(f"the catalog gives geometry {geometry.describe()}, the model was "
                         f"trained on {mv.geometry.describe()}: not the same data")
    banks = build_banks(data, {}, cfg, geometry)
    backbone = Backbone(cfg.model.backbone, cfg.model.weights, cfg.storage,
                        state=mv.backbone_state)
    val = ValidationSet.from_batches(feature_batches(
        validation_frame(data, banks, cfg), banks, cfg, geometry, backbone,
        cfg.train.batch_size, extra=VALIDATION_EXTRA, validation=True))
    val = val.limited(cfg.train.val_normal_views)  # what each training validation scores
    head = mv.build().head
    logits = predict_logits(head, val.features, cfg.train.batch_size, torch.device("cpu"),
                            cfg.train.precision)
    map_scores, labels, groups = val.image_scores(torch.sigmoid(logits), cfg)
    calibration = head_calibration(logits, val, cfg, map_scores, labels, groups)
    version = registry.publish(
        cfg.replace({"storage.models_uri": args.out_models}), args.product,
        head_state=mv.head_state, backbone_state=mv.backbone_state, geometry=mv.geometry,
        calibration=calibration,
        metrics={**mv.metrics, "image_head_fitted_by": "benchmarks/image_head.py",
                 "image_head_from_version": mv.version},
        check_views=mv.check_views)
    doc = calibration["image_head"]
    print(json.dumps({"product": args.product, "from_version": mv.version,
                      "version": version, "validation_images": len(map_scores),
                      "val_image_auroc": doc["val_image_auroc"],
                      "statistics": doc["statistics"],
                      "weights": [round(w, 3) for w in doc["weights"]],
                      "threshold": calibration["threshold"],
                      "seconds": round(time.time() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
