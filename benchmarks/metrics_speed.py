"""Speed and memory of prn_ray.metrics.aupro (exact, one sort) vs. a naive per-threshold loop.

Run: ``python benchmarks/metrics_speed.py [--sizes 100 200] [--naive-thresholds 200]``.
The naive loop (the definition: per threshold, FPR over all normal pixels and the mean per-region
overlap) is run on a subset of the exact thresholds and extrapolated to all of them; its values
are checked against the exact curve at those thresholds. Peak memory (tracemalloc, numpy
allocations included) is reported for continuous maps (every pixel a distinct threshold) and for
maps quantised to 256 levels (256 thresholds) to show that it follows pixels, not thresholds.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from prn_ray import metrics as M  # noqa: E402


def make_data(n: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` maps with 0-4 elliptic blob defects each (about 1/3 of images defect-free)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(0, 5) if i % 3 else 0):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(2, 25, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    noise = ndimage.gaussian_filter(rng.random((n, size, size), dtype=np.float32), (0, 2, 2))
    signal = ndimage.gaussian_filter(masks.astype(np.float32), (0, 3, 3))
    maps = (noise + 0.12 * signal + 0.02 * rng.standard_normal(masks.shape, dtype=np.float32))
    return masks, maps.astype(np.float32)


def naive_points(masks: np.ndarray, maps: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(FPR, PRO) of ``score > t`` for each t, straight from the definition."""
    ids, sizes = M.label_regions(masks)
    normal = maps[~masks]
    out = np.empty((thresholds.size, 2))
    for j, t in enumerate(thresholds):
        above = maps > t
        out[j, 0] = np.mean(normal > t)
        out[j, 1] = np.mean(np.bincount(ids[above], minlength=sizes.size + 1)[1:] / sizes)
    return out


def peak_mib(fn) -> tuple[float, float]:
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (peak - base) / 2**20, base


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def accumulate(masks: np.ndarray, maps: np.ndarray, batch: int = 16, **kw) -> dict[str, float]:
    acc = M.PixelMetricAccumulator(**kw)
    for a in range(0, len(maps), batch):
        acc.update(maps[a : a + batch], masks[a : a + batch], maps[a : a + batch].max(axis=(1, 2)))
    return acc.compute()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 200])
    ap.add_argument("--naive-thresholds", type=int, default=200)
    args = ap.parse_args()

    for n in args.sizes:
        masks, maps = make_data(n)
        npx = maps.size
        _, sizes = M.label_regions(masks)
        print(f"\n== {n} maps 256x256: {npx / 1e6:.2f} M pixels, {sizes.size} regions, "
              f"{int(masks.sum())} anomalous px, "
              f"inputs {(maps.nbytes + masks.nbytes) / 2**20:.0f} MiB")

        val, t_aupro = timed(lambda: M.aupro(masks, maps))
        fpr, _, thr = M.pro_curve(masks, maps)
        n_thr = thr.size - 1
        print(f"aupro (exact)           : {val:.6f} in {t_aupro:.2f} s, "
              f"{n_thr} thresholds used (= {np.unique(maps).size} distinct scores)")
        res, t_acc = timed(lambda: accumulate(masks, maps))
        print(f"accumulator (16/batch)  : aupro {res['aupro']:.6f}, pixel_auroc "
              f"{res['pixel_auroc']:.6f}, pixel_ap {res['pixel_ap']:.6f}, image_auroc "
              f"{res['image_auroc']:.4f} in {t_acc:.2f} s (all four metrics, one sort)")
        resb, t_bin = timed(lambda: accumulate(masks, maps, bins=4096, score_range=(-0.2, 1.4)))
        print(f"accumulator bins=4096   : aupro {resb['aupro']:.6f} "
              f"(|diff| {abs(resb['aupro'] - res['aupro']):.1e}) in {t_bin:.2f} s")

        mem_exact, _ = peak_mib(lambda: M.aupro(masks, maps))
        q = np.round(maps * 255) / 255
        mem_q, _ = peak_mib(lambda: M.aupro(masks, q))
        acc = M.PixelMetricAccumulator()
        acc.update(maps, masks)
        print(f"peak memory aupro       : {mem_exact:.0f} MiB with {n_thr} thresholds, "
              f"{mem_q:.0f} MiB with {np.unique(q).size} thresholds "
              f"({mem_exact * 2**20 / npx:.1f} B/pixel); accumulator state "
              f"{acc.nbytes / 2**20:.0f} MiB")

        if n == args.sizes[0] and args.naive_thresholds > 0:
            rng = np.random.default_rng(1)
            j = np.sort(rng.choice(np.arange(1, n_thr + 1), args.naive_thresholds, replace=False))
            pts, t_naive = timed(lambda: naive_points(masks, maps, thr[j]))
            _, pro, _ = M.pro_curve(masks, maps)
            err = max(np.abs(pts[:, 0] - fpr[j - 1]).max(), np.abs(pts[:, 1] - pro[j - 1]).max())
            per = t_naive / args.naive_thresholds
            print(f"naive loop              : {args.naive_thresholds} thresholds in "
                  f"{t_naive:.2f} s "
                  f"= {per * 1e3:.1f} ms/threshold -> {per * n_thr / 3600:.1f} h for all "
                  f"{n_thr} ({per * n_thr / t_aupro:.0f}x aupro); max |diff| vs exact curve "
                  f"at those thresholds {err:.1e}")


if __name__ == "__main__":
    main()
