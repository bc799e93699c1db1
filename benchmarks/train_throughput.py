"""Training throughput: the head's step inside the Ray pipeline vs the same step alone, in one
run, and how close each is to this machine's FLOP limit.

    python benchmarks/train_throughput.py                       # procedural demo data, 128 px
    python benchmarks/train_throughput.py --config configs/magnetic_tile.yaml \\
        --product magnetic_tile --set train.time_budget_s=480 --set train.precision=fp32

(a) ``train_all`` on a local Ray with the config as given (cached normal/seen features merged
    with the streamed synthetic rows): samples/s of the training loop (each epoch's
    ``train_s`` = its steps and data waits, validation excluded; with ``train.features_in:
    trainer`` the waits include the backbone on the streamed rows), over all epochs and over
    the epochs after the first (steady state); the same after the first epoch counting only
    the time inside steps (``step_s``); and the trainer's start-up (``fit()`` -> first batch);
(b) the same ``HeadTrainer.step`` alone in this process, same config, reference and threads,
    on feature batches computed beforehand (no pipeline at all).

FLOPs per step come from ``torch.utils.flop_counter`` (forward + backward, the prior's memory
search included); the limit is the fp32 GEMM rate measured here with a large matmul.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _common import REPO, gemm_rate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a config with real data (default: demo)")
    p.add_argument("--product", default="fabric")
    p.add_argument("--size", type=int, default=128, help="demo data only")
    p.add_argument("--n-train", type=int, default=40, help="demo data only")
    p.add_argument("--bare-steps", type=int, default=10)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()

    import ray
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from prn_ray import registry
    from prn_ray.config import load_config
    from prn_ray.contracts import FEATURE_COLUMNS
    from prn_ray.data.catalog import build_catalog
    from prn_ray.data.local import feature_batches, reference_batches
    from prn_ray.data.product import ProductData, product_geometry
    from prn_ray.data.stages import build_banks, plan_frame
    from prn_ray.demo_data import make_dataset
    from prn_ray.engine.reference import compute_reference
    from prn_ray.engine.trainer import HeadTrainer
    from prn_ray.model import Backbone, PRNHead
    from prn_ray.runtime import quiet_ray_data
    from prn_ray.train.fleet import train_all

    work = tempfile.mkdtemp(prefix="prn-train-bench-")
    if args.config is None:
        make_dataset(f"{work}/data", products=(args.product,), n_train=args.n_train,
                     n_good_test=2, n_defect_test=12, image_size=args.size)
        cfg = load_config(REPO / "configs" / "demo.yaml", [
            f"data.root={work}/data", f"storage.runs_uri={work}/runs",
            f"data.image_size={args.size}", "train.epochs=4", *args.overrides])
    else:
        cfg = load_config(args.config, args.overrides)
    cfg = cfg.replace({"storage.models_uri": f"{work}/models"})  # publish nothing for real
    tc, size = cfg.train, cfg.data.image_size
    threads = tc.torch_threads or max(1, round(tc.cpus_per_worker))
    print(f"{args.product}: {size}px, batch {tc.batch_size}, head threads {threads}, "
          f"{os.cpu_count()} cores, backbone {cfg.model.backbone} ({cfg.model.weights}), "
          f"precision {tc.precision}", flush=True)

    # (a) the Ray pipeline
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    t0 = time.time()
    (res,) = train_all(cfg, [args.product], run_id=f"bench-{int(t0)}")
    wall = time.time() - t0
    ray.shutdown()
    if res.status != "ok":
        print("training failed:", res.error)
        return 1
    hist = [h for h in registry.load(cfg.storage, args.product).metrics["history"]
            if h["epoch"] >= 0]
    steps = [h["step"] - (hist[i - 1]["step"] if i else 0) for i, h in enumerate(hist)]

    def sps(records, counts, key="train_s"):
        return sum(counts) * tc.batch_size / max(1e-9, sum(h[key] for h in records))

    ray_all = sps(hist, steps)
    ray_steady = sps(hist[1:], steps[1:]) if len(hist) > 1 else float("nan")
    steps_only = sps(hist[1:], steps[1:], "step_s") if len(hist) > 1 else float("nan")

    # (b) the same step alone, on real features computed beforehand
    torch.set_num_threads(threads)
    catalog = build_catalog(cfg).df
    data = ProductData.from_catalog(catalog[catalog["split"] != "test"], args.product)
    cfg, geometry = product_geometry(cfg, data.train_normals)
    banks = build_banks(data, {}, cfg, geometry)
    backbone = Backbone(cfg.model.backbone, cfg.model.weights, cfg.storage)
    reference, _ = compute_reference(data, cfg, geometry, lambda: reference_batches(
        data.train_normals, cfg, geometry, backbone, tc.batch_size))
    plan = plan_frame(data, cfg, range(1)).head(tc.batch_size * 4)
    batches = list(feature_batches(plan, banks, cfg, geometry, backbone, tc.batch_size,
                                   extra=("epoch",), drop_last=True))
    head = PRNHead(cfg.model, backbone.channels, geometry.size,
                   backbone.feature_sizes(geometry.size))
    head.set_reference(reference)
    if head.memory is not None:
        head.memory.mark(calibrated=True)  # calibration changes values, not the step's cost
    trainer = HeadTrainer(head, cfg, torch.device("cpu"), data.epoch_rows(cfg))
    trainer.start()
    trainer.model.train()

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        trainer.step([b[c] for c in FEATURE_COLUMNS], b["mask"])

    with FlopCounterMode(display=False) as fc:
        step(0)
    flops = fc.get_total_flops()
    t1 = time.perf_counter()
    for i in range(args.bare_steps):
        step(i)
    alone = args.bare_steps * tc.batch_size / (time.perf_counter() - t1)
    peak = gemm_rate(threads)

    def row(name: str, v: float, note: str = "") -> None:
        gflops = v / tc.batch_size * flops / 1e9
        print(f"{name:<36} {v:>10.2f} {gflops:>9.0f} {100 * gflops / peak:>13.0f}%   {note}")

    print(f"\n{flops / 1e9:.0f} GFLOP per step of {tc.batch_size} (fwd+bwd); fp32 GEMM limit "
          f"here {peak:.0f} GFLOP/s ({threads} threads), precision {trainer.precision}\n")
    print(f"{'':<36} {'samples/s':>10} {'GFLOP/s':>9} {'of the limit':>14}")
    row("Ray pipeline, all epochs", ray_all, f"{sum(steps)} steps, {len(hist)} epoch(s)")
    if len(hist) > 1:
        row("Ray pipeline, after the first epoch", ray_steady, f"{sum(steps[1:])} steps")
        row("  its steps only (no data waits)", steps_only,
            f"data waits {100 * (1 - ray_steady / steps_only):.0f}% of the loop")
    row("the same step alone", alone, f"{args.bare_steps} steps")
    print(f"\nin the pipeline / alone: {ray_all / alone:.2f}x all epochs"
          + (f", {ray_steady / alone:.2f}x after the first ({steps_only / alone:.2f}x counting "
             f"only the time inside steps)" if len(hist) > 1 else ""))
    print(f"trainer start-up (fit() -> first batch): {res.startup_s:.1f}s; whole product run "
          f"(reference, start-up, {len(hist)} epochs, validation): {wall:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
