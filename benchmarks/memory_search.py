"""The patch memory's nearest-neighbour search: today's exact search against cheaper options,
on speed and (with a trained model) on test accuracy.

    python benchmarks/memory_search.py [--threads 2]                       # speed only
    python benchmarks/memory_search.py --config configs/magnetic_tile.yaml \
        --models-uri runs/mt/models_bf16 --product magnetic_tile            # + test accuracy

Options (each a drop-in for ``prn_ray.model.memory.nearest_distance``):

* ``exact fp32`` -- today: chunked fp32 ``addmm`` against the whole bank, row minimum;
* ``coreset 8192`` / ``4096`` -- a smaller bank. The greedy coreset is stored in the order it
  was picked (k-center greedy), so its first M rows are the greedy coreset of size M;
* ``bf16 GEMM + exact`` -- the distance block as a bf16 matmul (AMX / AVX-512 BF16 where the
  chip has them), its row argmin, then the exact fp32 distance to that row;
* ``faiss flat`` -- faiss's exact L2 search (``IndexFlatL2``);
* ``faiss HNSW`` / ``faiss IVF`` -- approximate indexes, built once per bank (the build time is
  printed: it would be paid once per model and saved with it).

(a) Speed, always: the search for one batch of 16 images at 256 px with
    ``configs/cpu.yaml``'s memory (Lite0 levels at strides 8/16/32, 40/112/320 channels,
    16 384-row banks) on random data, ms per image, against exact fp32 in the same run.
(b) Accuracy, with ``--models-uri``: the registered model with its memory's search replaced
    (and, for the smaller coresets, its bank cut), the memory's location/scale recalibrated on
    the product's held-out normals -- the rest of the head as trained on the full bank --, the
    test split scored in this process at the model's resolution: image AUROC, pixel AUROC,
    AUPRO@0.3, pixel AP (``prn_ray.metrics``), and the model's ms per image.
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (repo on sys.path, quiet Ray Data)
import numpy as np
import torch

import prn_ray.model.memory as memory

EXACT = memory.nearest_distance
LEVELS = ((32 * 32, 40), (16 * 16, 112), (8 * 8, 320))  # Lite0 at 256 px, strides 8/16/32


def bf16_then_exact(queries, bank, bank_sq, chunk=None):
    """Nearest row by a bf16 distance block, its distance recomputed exactly in fp32."""
    chunk = chunk or 256
    qb, bb, sqb = queries.bfloat16(), bank.bfloat16(), bank_sq.bfloat16()[None]
    idx = torch.empty(queries.shape[0], dtype=torch.long)
    for s in range(0, queries.shape[0], chunk):
        idx[s:s + chunk] = torch.addmm(sqb, qb[s:s + chunk], bb.T, alpha=-2.0).argmin(1)
    return (queries - bank[idx]).pow(2).sum(1).sqrt_()


class FaissSearch:
    """nearest_distance through a faiss index per bank (built on first use, kept)."""

    def __init__(self, kind: str):
        import faiss

        self.faiss, self.kind, self.indexes, self.build_s = faiss, kind, {}, 0.0

    def index(self, bank):
        key = (bank.data_ptr(), tuple(bank.shape))
        if key not in self.indexes:
            t0 = time.perf_counter()
            x = np.ascontiguousarray(bank.numpy(), np.float32)
            d = x.shape[1]
            if self.kind == "flat":
                ix = self.faiss.IndexFlatL2(d)
            elif self.kind == "hnsw":
                ix = self.faiss.IndexHNSWFlat(d, 32)
                ix.hnsw.efSearch = 64
            else:
                ix = self.faiss.IndexIVFFlat(self.faiss.IndexFlatL2(d), d, 128)
                ix.train(x)
                ix.nprobe = 8
            ix.add(x)
            self.indexes[key] = ix
            self.build_s += time.perf_counter() - t0
        return self.indexes[key]

    def __call__(self, queries, bank, bank_sq, chunk=None):
        dist, _ = self.index(bank).search(np.ascontiguousarray(queries.numpy(), np.float32), 1)
        return torch.from_numpy(dist[:, 0]).clamp_min_(0).sqrt_()


def options(has_faiss: bool):
    out = [("exact fp32 (today)", EXACT, None), ("coreset 8192", EXACT, 8192),
           ("coreset 4096", EXACT, 4096), ("bf16 GEMM + exact", bf16_then_exact, None)]
    if has_faiss:
        out += [(f"faiss {k}", FaissSearch(k), None) for k in ("flat", "hnsw", "ivf")]
    return out


def speed(threads: int, has_faiss: bool, reps: int = 3) -> None:
    g = torch.Generator().manual_seed(0)
    banks = [torch.randn(16384, c, generator=g) for _, c in LEVELS]
    queries = [torch.randn(16 * hw, c, generator=g) for hw, c in LEVELS]
    # queries near bank rows, as real normal patches are (the approximate indexes care)
    queries = [q * 0.3 + b[torch.randint(len(b), (len(q),), generator=g)]
               for q, b in zip(queries, banks)]
    print(f"(a) search for 16 images at 256 px (Lite0 levels, 16384-row banks, random data), "
          f"{threads} threads")
    print("| option | ms/image | x exact | first-use build s | max rel. error of d |")
    print("|---|---:|---:|---:|---:|")
    ref = ref_ms = None
    for name, fn, size in options(has_faiss):
        bs = [b[:size] if size else b for b in banks]
        sq = [b.pow(2).sum(1) for b in bs]
        t0 = time.perf_counter()
        out = [fn(q, b, s) for q, b, s in zip(queries, bs, sq)]  # warm-up / index build
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(reps):
            for q, b, s in zip(queries, bs, sq):
                fn(q, b, s)
        ms = (time.perf_counter() - t0) / reps / 16 * 1e3
        if ref is None:
            ref, ref_ms = out, ms
        err = max(float(((o - r).abs() / r.clamp_min(1e-6)).max()) for o, r in zip(out, ref))
        build = getattr(fn, "build_s", 0.0)
        print(f"| {name} | {ms:.2f} | {ref_ms / ms:.2f} | {build or first:.2f} | {err:.3g} |",
              flush=True)


def accuracy(args, has_faiss: bool) -> None:
    from prn_ray import images, metrics, registry, storage
    from prn_ray.config import load_config
    from prn_ray.data.catalog import build_catalog
    from prn_ray.data.product import ProductData
    from prn_ray.evaluation import EvalScorer
    from prn_ray.model.inputs import images_to_tensor

    cfg = load_config(args.config, [f"storage.models_uri={args.models_uri}", *args.overrides])
    catalog = build_catalog(cfg).df
    test = catalog[(catalog["product"] == args.product) & (catalog["split"] == "test")]
    if args.limit:
        test = test.sample(n=min(args.limit, len(test)), random_state=0)
    val = ProductData.from_catalog(catalog[catalog["split"] != "test"], args.product).val
    val_normals = val[val["label"] == "normal"]["image_uri"].tolist()
    version, geometry, _ = registry.describe(cfg.storage, args.product)
    val_views = np.concatenate([geometry.views(images.decode_image(storage.read_bytes(u)))
                                for u in val_normals])
    print(f"\n(b) {args.product} {version}: test split {len(test)} images, memory recalibrated "
          f"on {len(val_normals)} held-out normals ({len(val_views)} views), {args.threads} "
          "threads")
    print("| option | image AUROC | pixel AUROC | AUPRO@0.3 | pixel AP | model ms/image |")
    print("|---|---:|---:|---:|---:|---:|")
    batch = {k: test[k].to_numpy(dtype=object)
             for k in ("image_uri", "mask_uri", "label", "defect_type")}
    for name, fn, size in options(has_faiss):
        scorer = EvalScorer(cfg.storage, cfg.data, args.product, version, threads=args.threads,
                            batch_size=cfg.score.batch_size)
        head = scorer.model.head
        if size:
            head.memory.set_banks([b[:size] for b in head.memory.banks])
        memory.nearest_distance = fn
        try:
            with torch.inference_mode():
                feats = [torch.cat(parts) for parts in zip(*(
                    scorer.model.backbone(images_to_tensor(val_views[i:i + 16]))
                    for i in range(0, len(val_views), 16)))]
                normed = head.standardized([f.float() for f in feats])
                head.memory.calibrate([normed[lv] for lv in head.memory.levels])
            out = {k: [] for k in ("map", "mask", "score", "label", "ms")}
            for s in range(0, len(test), 32):
                r = scorer({k: v[s:s + 32] for k, v in batch.items()})
                bad = [e for e in r["error"] if e]
                if bad:
                    raise SystemExit(f"test images failed: {bad[:3]}")
                for i in range(len(r["score"])):
                    hw = (int(r["height"][i]), int(r["width"][i]))
                    out["map"].append(np.frombuffer(r["map"][i], np.float32).reshape(hw))
                    out["mask"].append(np.frombuffer(r["mask"][i], np.uint8).reshape(hw) > 0)
                out["score"] += list(r["score"])
                out["label"] += [lb == "anomaly" for lb in r["label"]]
                out["ms"] += list(r["ms"])
        finally:
            memory.nearest_distance = EXACT
        maps, masks = np.stack(out["map"]), np.stack(out["mask"])
        labels = np.asarray(out["label"])
        figures = (metrics.image_auroc(labels, np.asarray(out["score"])),
                   metrics.pixel_auroc(masks, maps), metrics.aupro(masks, maps),
                   metrics.pixel_ap(masks, maps))
        print(f"| {name} | " + " | ".join(f"{100 * f:.1f}" for f in figures)
              + f" | {np.mean(out['ms']):.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", default=None)
    p.add_argument("--models-uri", default=None)
    p.add_argument("--product", default=None)
    p.add_argument("--limit", type=int, default=0, help="score a seeded sample of the test split")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import faiss  # noqa: F401

        has_faiss = True
    except ImportError:
        has_faiss = False
        print("faiss is not installed (pip install faiss-cpu): its rows are left out")
    if not args.skip_speed:
        speed(args.threads, has_faiss)
    if args.models_uri:
        if not (args.config and args.product):
            raise SystemExit("--models-uri needs --config and --product")
        accuracy(args, has_faiss)


if __name__ == "__main__":
    main()
