"""Training throughput: Ray Train (streamed features) vs a bare PyTorch loop, and start-up cost.

    python benchmarks/train_throughput.py [--size 128] [--n-train 40] [--epochs 4] [--threads 1]

One product of the procedural demo data on local disk, EfficientNet-Lite0 features, the same
config for both paths, the same number of torch threads for the head:

(a) ``train_all`` on a local Ray: samples/s of the training loop at steady state (epochs after
    the first; each epoch's ``train_s`` = its steps and data waits, validation excluded), and
    the fixed start-up cost of a trainer (``TorchTrainer.fit()`` -> first batch);
(b) a bare loop in this process: the same head and ``HeadTrainer.step`` over the same number
    of batches of features computed beforehand (no data pipeline at all).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _common import REPO, ready_head


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the head (both)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()

    import ray
    import torch

    from prn_ray import registry
    from prn_ray.config import load_config
    from prn_ray.contracts import FEATURE_COLUMNS
    from prn_ray.data.catalog import build_catalog
    from prn_ray.data.local import feature_batches
    from prn_ray.data.product import ProductData
    from prn_ray.data.stages import build_banks, plan_frame
    from prn_ray.demo_data import make_dataset
    from prn_ray.engine.trainer import HeadTrainer
    from prn_ray.model import Backbone
    from prn_ray.runtime import quiet_ray_data
    from prn_ray.train.fleet import train_all

    work = tempfile.mkdtemp(prefix="prn-train-bench-")
    make_dataset(f"{work}/data", products=("fabric",), n_train=args.n_train, n_good_test=2,
                 n_defect_test=12, image_size=args.size)
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"data.root={work}/data", f"storage.models_uri={work}/models",
        f"storage.runs_uri={work}/runs", f"data.image_size={args.size}",
        f"train.epochs={args.epochs}", f"train.val_every_epochs={args.epochs}",
        f"train.batch_size={args.batch}", f"train.torch_threads={args.threads}",
        f"train.cpus_per_worker={args.cpus_per_worker}", *args.overrides])
    print(f"{args.size}px, batch {args.batch}, head threads {args.threads}, {os.cpu_count()} "
          f"cores, backbone {cfg.model.backbone} ({cfg.model.weights}), "
          f"{cfg.model.attention_blocks} MSA block(s)", flush=True)

    # (a) Ray Train
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    t0 = time.time()
    (res,) = train_all(cfg, ["fabric"], run_id="bench")
    wall = time.time() - t0
    ray.shutdown()
    if res.status != "ok":
        print("training failed:", res.error)
        return 1
    hist = registry.load(cfg.storage, "fabric").metrics["history"]
    steady = hist[1:] or hist
    steps = [h["step"] - (hist[i - 1]["step"] if i else 0) for i, h in enumerate(hist)][1:] \
        or [hist[0]["step"]]
    ray_sps = sum(steps) * args.batch / sum(h["train_s"] for h in steady)
    first_epoch_sps = hist[0]["step"] * args.batch / hist[0]["train_s"]

    # (b) bare loop on precomputed features, same head, same steps
    torch.set_num_threads(args.threads)
    catalog = build_catalog(cfg).df
    data = ProductData.from_catalog(catalog[catalog["split"] != "test"], "fabric")
    banks = build_banks(data, {}, cfg, args.size)
    backbone = Backbone(cfg.model.backbone, cfg.model.weights, cfg.storage)
    batches = list(feature_batches(plan_frame(data, cfg, range(1)), banks, cfg, args.size,
                                   backbone, args.batch, extra=("epoch",), drop_last=True))
    head = ready_head(cfg.model, backbone.channels,
                      backbone.feature_sizes((args.size, args.size)), args.size,
                      n_normal=len(data.train_normals))
    trainer = HeadTrainer(head, cfg, torch.device("cpu"), data.epoch_rows(cfg))
    trainer.start()
    trainer.model.train()
    trainer.step([batches[0][c] for c in FEATURE_COLUMNS], batches[0]["mask"])  # warm-up
    n = sum(steps)
    t1 = time.perf_counter()
    for i in range(n):
        b = batches[i % len(batches)]
        trainer.step([b[c] for c in FEATURE_COLUMNS], b["mask"])
    bare_sps = n * args.batch / (time.perf_counter() - t1)

    print(f"\n{'':<34} {'samples/s':>10}")
    print(f"{'Ray Train, steady state':<34} {ray_sps:>10.1f}   ({sum(steps)} steps, "
          f"epochs 2..{len(hist)})")
    print(f"{'Ray Train, first epoch':<34} {first_epoch_sps:>10.1f}   (pipeline warm-up)")
    print(f"{'bare loop, precomputed features':<34} {bare_sps:>10.1f}   ({n} steps)")
    print(f"\nRay / bare (steady state): {ray_sps / bare_sps:.2f}x")
    print(f"trainer start-up (fit() -> first batch): {res.startup_s:.1f}s; whole product run "
          f"(prototypes, start-up, {len(hist)} epochs, validation, registry): {wall:.0f}s "
          f"[precision {trainer.precision}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
