"""The GPU path, measured in one call: scoring speed, training steps and CPU-vs-GPU parity.

    bash benchmarks/gpu_check.sh             # on a machine with a CUDA GPU (a few minutes)
    bash benchmarks/gpu_check.sh --dry-run   # anywhere: the same script on the CPU, tiny sizes

(a) Scoring, at 256 px (whole 256 x 256 images) and tiled (1 500 x 1 000 JPEGs at
    ``configs/cpu.yaml``'s tile rule): a registered Lite0 model whose head is untrained over a
    random reference of the real sizes (speed is real, scores are meaningless), run
    - alone, through ``prn_ray.runner.RegisteredModels`` on the device, at fp32 and at the
      precision ``score.precision: auto`` picks there (bf16 on CUDA): views/s, images/s, MP/s;
    - through the scoring job (``prn_ray.scoring.run.score`` on one local Ray that sees the
      device, Parquet commit included): images/s and MP/s from launch to commit.
(b) Training: one head step (``HeadTrainer.step``, precision ``auto``) at
    ``configs/paper.yaml`` (ResNet18, batch 48, three MSA blocks, logits at full resolution)
    and at ``configs/cpu.yaml`` (Lite0, batch 16), on random features of the real sizes:
    s/step and samples/s.
(c) Parity: the same registered model's maps and image scores on the CPU (torch fp32, the
    reference) and on the device at fp32 and at ``auto``: the largest |difference|.

Prints one Markdown table per part (what the README quotes) and, with ``--out``, the same
figures as JSON. Without a CUDA device the script refuses unless ``--dry-run`` (which runs
every part on the CPU at a few images and one step, so the tests keep it working).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import _common
from _common import ready_head, register_untrained, write_images

TILED = (1000, 1500)  # H, W of the tiled images


def device_line(torch, device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__} "
                f"CUDA {torch.version.cuda}, {os.cpu_count()} CPUs")
    return f"CPU only (dry run), torch {torch.__version__}, {os.cpu_count()} CPUs"


def model_alone(cfg, product, views, n_images, pixels, use_gpu, precision, repeats):
    """views/s, images/s, MP/s of one (device, precision) over ``views``, and the first
    batch's maps (for parity)."""
    import numpy as np
    import torch

    from prn_ray import registry
    from prn_ray.runner import RegisteredModels

    runner = RegisteredModels(cfg.storage, threads=min(8, os.cpu_count() or 1),
                              use_gpu=use_gpu, runtime="torch", precision=precision)
    model = runner.get(product, registry.describe(cfg.storage, product)[0])
    bs = cfg.score.batch_size
    first, _ = runner.probabilities(model, views[:bs])  # warm-up (cuDNN autotuning)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(views), bs):
            runner.probabilities(model, views[i:i + bs])
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    s = (time.perf_counter() - t0) / repeats
    return {"device": runner.device.type, "precision": runner.precision,
            "views_per_s": len(views) / s, "images_per_s": n_images / s,
            "mp_per_s": pixels * n_images / 1e6 / s}, np.asarray(first)


def scoring_part(base_cfg, root, n, h, w, tiles, use_gpu, repeats, job):
    """(rows of the scoring table, parity rows) for N images of h x w."""
    import numpy as np

    from prn_ray import images, registry, storage
    from prn_ray.data.product import product_geometry
    from prn_ray.inference import ScoreRule, stitch_items

    product = f"check_{h}x{w}"
    uris = write_images(f"{root}/in_{product}", product, n, h, w)
    cfg = base_cfg.replace({"data.tiles.mode": tiles, "data.image_size": 256})
    cfg, geometry = product_geometry(cfg, uris)
    register_untrained(cfg, product, geometry, "benchmarks/gpu_check.py", 200)
    views = [geometry.views(images.decode_image(storage.read_bytes(u))) for u in uris]
    per_image = len(views[0])
    stacked = np.concatenate(views)
    label = f"{w}x{h}, {geometry.describe(h, w)} ({per_image} view(s)/image)"
    rows, maps = [], {}
    wanted = [(False, "fp32")] + ([(True, "fp32"), (True, "auto")] if use_gpu else [])
    for gpu, precision in wanted:
        r, first = model_alone(cfg, product, stacked, n, h * w, gpu, precision, repeats)
        r.update(input=label, where="model alone")
        rows.append(r)
        maps[(r["device"], precision)] = first
    if job:
        from prn_ray.scoring import run as scoring

        for precision in ("fp32", "auto") if use_gpu else ("fp32",):
            c = cfg.replace({"score.runtime": "torch", "score.precision": precision,
                             "score.output_uri": f"{root}/scores_{product}_{precision}"})
            t0 = time.perf_counter()
            s = scoring.score(c, f"{root}/in_{product}", date="2026-01-01",
                              say=lambda *a: None)
            dt = time.perf_counter() - t0
            if s.rows != n or s.errors:
                raise SystemExit(f"the scoring job wrote {s.rows} rows ({s.errors} errors) "
                                 f"for {n} images")
            rows.append({"input": label, "where": "scoring job", "precision": precision,
                         "device": "cuda" if use_gpu else "cpu", "views_per_s": n * per_image / dt,
                         "images_per_s": n / dt, "mp_per_s": h * w * n / 1e6 / dt})
    # parity: maps of the first batch, and image scores of the first image stitched
    parity = []
    ref = maps[("cpu", "fp32")]
    rule = ScoreRule.of(registry.load(cfg.storage, product, None).build())
    for (dev, precision), m in maps.items():
        if (dev, precision) == ("cpu", "fp32"):
            continue
        k = min(per_image, len(m))
        score = lambda a: next(iter(stitch_items(  # noqa: E731
            a[:k], np.zeros(k, np.int64), np.arange(k), np.full(k, h), np.full(k, w),
            geometry, rule))).score
        parity.append({"input": label, "against": f"{dev} {precision}",
                       "max_abs_map": float(np.abs(m - ref).max()),
                       "max_abs_score": abs(float(score(m)) - float(score(ref)))})
    return rows, parity


def training_part(config, device, steps, overrides):
    import torch

    from prn_ray.config import load_config
    from prn_ray.engine.trainer import HeadTrainer
    from prn_ray.model.backbone import Backbone

    cfg = load_config(config, ["model.weights=none", *overrides])
    size, bs = cfg.data.image_size, cfg.train.batch_size
    size = size if isinstance(size, int) else size[0]
    backbone = Backbone(cfg.model.backbone, "none", cfg.storage)
    channels, sizes = backbone.channels, backbone.feature_sizes((size, size))
    torch.manual_seed(0)
    feats = [torch.randn(bs, c, h, w, device=device) for c, (h, w) in zip(channels, sizes)]
    mask = (torch.rand(bs, size, size, device=device) > 0.97).float()
    head = ready_head(cfg.model, channels, sizes, size).to(device)
    trainer = HeadTrainer(head, cfg, device, epoch_rows=bs * 1000)
    trainer.start()
    trainer.model.train()
    trainer.step(feats, mask)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(feats, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    s = (time.perf_counter() - t0) / steps
    return {"config": os.path.basename(config), "backbone": cfg.model.backbone, "size": size,
            "batch": bs, "precision": trainer.precision, "device": device.type,
            "s_per_step": s, "samples_per_s": bs / s}


def table(rows, cols) -> str:
    head = "| " + " | ".join(c for c, _ in cols) + " |"
    rule = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(fmt(r) for _, fmt in cols) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: every part on the CPU at a few images and one step")
    p.add_argument("--n", type=int, default=None, help="256-px images (default 512; dry 4)")
    p.add_argument("--n-tiled", type=int, default=None,
                   help="1 500 x 1 000 images (default 64; dry 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; dry 1)")
    p.add_argument("--skip-job", action="store_true", help="model alone, no Ray")
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args()

    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    print(f"device: {device_line(torch, device)}", flush=True)
    root = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        return measure(args, torch, device, dry, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(args, torch, device, dry: bool, root: str) -> int:
    from prn_ray.config import load_config

    n = args.n or (4 if dry else 512)
    n_tiled = args.n_tiled or (2 if dry else 64)
    steps = args.steps or (1 if dry else 10)
    repeats = 1 if dry else 3
    os.environ.setdefault("PRN_RAY_GRAPH_CACHE", f"{root}/graphs")
    base = load_config(str(_common.REPO / "configs" / "cpu.yaml"),
                       [f"storage.models_uri={root}/models", f"storage.runs_uri={root}/runs",
                        f"score.output_uri={root}/scores", "score.runtime=torch",
                        "score.precision=fp32", f"score.cpus_per_actor={2 if dry else 4}"])
    job = not args.skip_job
    if job:
        from prn_ray.runtime import init_ray

        init_ray(base, dashboard=False)
    scoring, parity = [], []
    for count, (h, w), tiles in ((n, (256, 256), "off"), (n_tiled, TILED, "auto")):
        r, pr = scoring_part(base, root, count, h, w, tiles, not dry, repeats, job)
        scoring += r
        parity += pr
        print(f"scored {count} images of {w}x{h}", flush=True)
    if job:
        import ray

        ray.shutdown()
    dry_train = ["data.image_size=64"] if dry else []
    training = [training_part(str(_common.REPO / "configs" / name), device, steps, dry_train)
                for name in ("paper.yaml", "cpu.yaml")]

    print("\n## Scoring\n" + table(scoring, [
        ("input", lambda r: r["input"]), ("where", lambda r: r["where"]),
        ("device", lambda r: r["device"]), ("precision", lambda r: r["precision"]),
        ("views/s", lambda r: f"{r['views_per_s']:.1f}"),
        ("images/s", lambda r: f"{r['images_per_s']:.2f}"),
        ("MP/s", lambda r: f"{r['mp_per_s']:.2f}")]))
    print("\n## Training step (HeadTrainer.step, random features of the real sizes)\n" + table(
        training, [("config", lambda r: r["config"]), ("backbone", lambda r: r["backbone"]),
                   ("px", lambda r: str(r["size"])), ("batch", lambda r: str(r["batch"])),
                   ("device", lambda r: r["device"]), ("precision", lambda r: r["precision"]),
                   ("s/step", lambda r: f"{r['s_per_step']:.3f}"),
                   ("samples/s", lambda r: f"{r['samples_per_s']:.1f}")]))
    print("\n## Parity against the CPU (torch fp32), probabilities\n" + (table(parity, [
        ("input", lambda r: r["input"]), ("device precision", lambda r: r["against"]),
        ("max abs map diff", lambda r: f"{r['max_abs_map']:.2g}"),
        ("abs image score diff", lambda r: f"{r['max_abs_score']:.2g}")])
        if parity else "(dry run: no second device to compare with)"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_line(torch, device), "dry_run": dry,
                       "scoring": scoring, "training": training, "parity": parity}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
