"""Many products on a multi-node cluster, simulated on one machine.

    python benchmarks/scale_simulation.py [--nodes 3] [--cpus-per-node 1] [--products 6]

Starts a ``ray.cluster_utils.Cluster`` with a CPU-less head (like a real head that runs only
drivers) and N virtual worker nodes, writes P tiny procedural products to a local folder (the
"object store" of the simulation), and runs ``train_all`` on it with the tiny config. Prints,
per product, its status, the node its training worker ran on and its start/end times, then the
number of distinct nodes used and the peak number of products training at once. Exit status 1
if a product failed or only one node was used.

The numbers are about placement and completion, not speed: every virtual node shares the same
two cores here. Backbone weights are random (configs/tiny.yaml).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from prn_ray.config import load_config  # noqa: E402
from prn_ray.demo_data import PRODUCTS, make_dataset  # noqa: E402
from prn_ray.runtime import quiet_ray_data  # noqa: E402
from prn_ray.train.fleet import train_all  # noqa: E402


def peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--cpus-per-node", type=float, default=1.0)
    p.add_argument("--products", type=int, default=6)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="prn-scale-"))
    names = [f"{PRODUCTS[i % len(PRODUCTS)]}_{i}" for i in range(args.products)]
    t0 = time.time()
    (work / "data").mkdir()
    for i, name in enumerate(names):  # P products from the demo generator, renamed
        base = PRODUCTS[i % len(PRODUCTS)]
        make_dataset(str(work / "gen" / str(i)), products=(base,), n_train=10, n_good_test=2,
                     n_defect_test=6, image_size=32, seed=i)
        (work / "gen" / str(i) / base).rename(work / "data" / name)
    print(f"data: {args.products} products in {time.time() - t0:.1f}s under {work}", flush=True)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus_per_node)
    ray.init(address=cluster.address, log_to_driver=False)
    quiet_ray_data()
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.root={work / 'data'}", f"storage.models_uri={work / 'models'}",
        f"storage.runs_uri={work / 'runs'}", f"train.epochs={args.epochs}",
        "data.image_size=32", "model.attention_patch_sizes=[1]",
        "data.seen_anomalies=2", "data.val_seen_anomalies=1",
    ])
    t1 = time.time()
    try:
        results = train_all(cfg, run_id="scale")
    finally:
        ray.shutdown()
        cluster.shutdown()
    wall = time.time() - t1
    nodes = {r.node_id for r in results if r.status == "ok"}
    peak = peak_concurrency([(r.start, r.end) for r in results if r.status == "ok"])
    print(f"\n{'product':<16} {'status':<7} {'node':<10} {'start s':>8} {'end s':>8}")
    for r in sorted(results, key=lambda r: r.start):
        print(f"{r.product:<16} {r.status:<7} {r.node_id[:8]:<10} {r.start - t1:>8.1f} "
              f"{r.end - t1:>8.1f}" + (f"  {r.error}" if r.error else ""))
    ok = sum(r.status == "ok" for r in results)
    print(f"\n{ok}/{len(results)} products ok on {args.nodes} virtual nodes x "
          f"{args.cpus_per_node} CPU; distinct nodes used: {len(nodes)}; peak concurrent "
          f"products: {peak}; wall {wall:.0f}s")
    return 0 if ok == len(results) and len(nodes) > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
