"""Soak test of nightly scoring: N small images in ONE run through flaky object storage.

    nice -n 19 python benchmarks/soak_scoring.py [--n 5000] [--size 64] [--rate 0.05]
        [--seed 15] [--every 500]

A moto S3 server on loopback behind the tests' fault proxy (tests/faultproxy.py: a seeded
``--rate`` share of requests answered 503 SlowDown or cut mid-response); the registered model
is the tiny config's (configs/tiny.yaml: random backbone, 1 attention block) with an untrained
head, so speed and memory are real and scores meaningless. Every request of the run (listing,
image reads, model loads, staging writes, commit, summary) goes through the proxy.

Reports: rows committed (must equal the inputs, with no error row), the peak summed PSS of the
process tree (driver + Ray's processes; moto excluded) in each window of ``--every`` images
read (an image counts once the proxy has served its whole body), which must stay flat, the
faults injected and the requests retried (run summary), and the wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from _common import REPO, MemorySampler, mib, start_moto
from score_throughput import PRODUCT, register_untrained, write_images

sys.path.insert(0, str(REPO / "tests"))  # the fault proxy lives with the tests
from faultproxy import FaultProxy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rate", type=float, default=0.05, help="share of requests failed")
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--every", type=int, default=500, help="memory window, in images read")
    p.add_argument("--cpus", type=int, default=2, help="local Ray CPUs")
    args = p.parse_args(argv)

    moto, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        import boto3
        import ray

        from prn_ray.config import load_config
        from prn_ray.scoring.run import format_summary, score
        from prn_ray.scoring.table import read_scores

        bucket = f"s3://soak-{os.getpid()}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket[5:])
        base = [f"storage.models_uri={bucket}/models", f"score.output_uri={bucket}/scores",
                f"data.image_size={args.size}"]
        cfg = load_config(REPO / "configs" / "tiny.yaml", base)
        t = time.perf_counter()
        register_untrained(cfg, args.size)
        write_images(f"{bucket}/incoming", args.n, args.size)
        print(f"setup: {args.n} images of {args.size} px on the loopback S3 "
              f"({time.perf_counter() - t:.0f}s)", flush=True)

        with FaultProxy(endpoint, rate=args.rate, seed=args.seed, watch="/incoming/") as proxy:
            cfg = load_config(REPO / "configs" / "tiny.yaml",
                              [*base, f"storage.endpoint_url={proxy.url}"])
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            sampler = MemorySampler(os.getpid(), {moto.pid})
            windows: dict[int, int] = {}
            stop = threading.Event()

            def watch_memory() -> None:
                while not stop.is_set():
                    pss, _, _ = sampler.sample()
                    w = min(proxy.counts["watched"], args.n - 1) // args.every
                    windows[w] = max(windows.get(w, 0), pss)
                    stop.wait(0.5)

            thread = threading.Thread(target=watch_memory, daemon=True)
            thread.start()
            t0 = time.perf_counter()
            summary = score(cfg, f"{bucket}/incoming", date="2024-07-01",
                            say=lambda *_: None)
            wall = time.perf_counter() - t0
            stop.set()
            thread.join()
            ray.shutdown()
        df = read_scores(f"{bucket}/scores", date="2024-07-01",
                         columns=["product", "image_uri", "error"])
        print(format_summary(summary))
        print(f"\ninputs {args.n}  rows {len(df)}  unique images "
              f"{df['image_uri'].nunique()}  error rows {int(df['error'].notna().sum())}  "
              f"product {sorted(set(df['product']))} (want {PRODUCT})")
        print(f"proxy: {proxy.counts['requests']} requests, {proxy.counts['status503']} "
              f"answered 503, {proxy.counts['drop']} cut mid-response; retried requests "
              f"counted by the run: {summary.retried_requests}")
        print(f"wall {wall:.0f}s ({args.n / wall:.1f} images/s)")
        print("peak PSS of the process tree per window of images read:")
        for w in sorted(windows):
            lo, hi = w * args.every, min(args.n, (w + 1) * args.every)
            print(f"  images {lo:>5}-{hi:<5} {mib(windows[w])}")
        ok = len(df) == args.n and df["image_uri"].nunique() == args.n and \
            df["error"].isna().all()
        print("RESULT", "ok" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        moto.terminate()


if __name__ == "__main__":
    sys.exit(main())
