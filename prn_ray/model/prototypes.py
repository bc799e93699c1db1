"""Multi-scale prototypes (PRN's MP block): seeded k-means over whole flattened feature maps.

A prototype is a whole C×H×W map, not a pixel vector. Each scale gets its own k-means with
K = max(1, round(ratio · N_normal)) centroids; at inference each image picks, per scale, the
prototype nearest in squared L2 over the flattened map, and the residual (F − P*)² (or |F − P*|)
is what the head sees.

Memory: the fit set stays in its own dtype (float16 is fine) and only ``chunk`` rows at a time
are promoted to float32 for distance computation, so the peak is ≈ N·D·2 bytes for float16
features plus K·D·4 bytes of centroids.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from prn_ray.model.layers import autocast_off

_CHUNK_ELEMENTS = 1 << 24  # float32 elements promoted at once (64 MiB)


def num_prototypes(n: int, ratio: float) -> int:
    """K = max(1, round(ratio · n)), rounding halves up (not banker's rounding), and K ≤ n."""
    if n < 1:
        raise ValueError("need at least one normal image to build prototypes")
    if ratio <= 0:
        raise ValueError(f"prototype ratio must be > 0, got {ratio}")
    return min(n, max(1, math.floor(ratio * n + 0.5)))


def _chunk_rows(dim: int, chunk: int | None) -> int:
    return chunk if chunk is not None else max(1, _CHUNK_ELEMENTS // max(dim, 1))


def _float_chunks(x: Tensor, chunk: int):
    """(start, rows as float32) over ``x``, promoted into one reused buffer: a fresh 64 MiB
    tensor per chunk fragments glibc's heap (see :func:`prn_ray.model.memory.nearest_distance`)."""
    if x.dtype == torch.float32:
        for start in range(0, x.shape[0], chunk):
            yield start, x[start:start + chunk]
        return
    buf = torch.empty(min(chunk, x.shape[0]), x.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk):
        part = x[start:start + chunk]
        yield start, buf[:part.shape[0]].copy_(part)


def _sq_norms(x: Tensor, chunk: int) -> Tensor:
    return torch.cat([c.pow(2).sum(1) for _, c in _float_chunks(x, chunk)])


def _assign(x: Tensor, x_sq: Tensor, centers: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Nearest center and squared distance per row, chunked over rows."""
    c_sq = centers.pow(2).sum(1)
    labels, dists = [], []
    for start, xc in _float_chunks(x, chunk):
        d = (x_sq[start:start + chunk, None] - 2.0 * xc @ centers.T + c_sq[None]).clamp_min_(0)
        best, idx = d.min(1)
        labels.append(idx)
        dists.append(best)
    return torch.cat(labels), torch.cat(dists)


def _kmeans_pp(x: Tensor, x_sq: Tensor, k: int, gen: torch.Generator, chunk: int) -> Tensor:
    """k-means++ seeding: each new center drawn with probability ∝ D(x)²."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first].float()]
    _, closest = _assign(x, x_sq, centers[0][None], chunk)
    for _ in range(1, k):
        weights = closest.double().cpu()  # sampling on CPU: the generator is a CPU generator
        if weights.sum() <= 0:  # every point already coincides with a center
            weights = torch.ones(n, dtype=torch.float64)
        idx = int(torch.multinomial(weights, 1, generator=gen))
        centers.append(x[idx].float())
        _, d_new = _assign(x, x_sq, centers[-1][None], chunk)
        closest = torch.minimum(closest, d_new)
    return torch.stack(centers)


@torch.no_grad()
def kmeans(x: Tensor, k: int, seed: int = 0, iters: int = 50, chunk: int | None = None
           ) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ init on the rows of ``x`` (N×D, any float dtype).

    Returns (centers K×D float32, labels N). Empty clusters are re-seeded with the point
    farthest from its center (as scikit-learn does), so exactly K centers come back.
    """
    n, dim = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    rows = _chunk_rows(dim, chunk)
    gen = torch.Generator().manual_seed(seed)
    x_sq = _sq_norms(x, rows)
    centers = _kmeans_pp(x, x_sq, k, gen, rows)
    labels = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(iters):
        new_labels, dists = _assign(x, x_sq, centers, rows)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centers)
        for start, xc in _float_chunks(x, rows):
            sums.index_add_(0, labels[start:start + rows], xc)
        counts = torch.bincount(labels, minlength=k)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            far = dists.argsort(descending=True)
            for j, cluster in enumerate(empty):
                point = int(far[j])
                sums[cluster] = x[point].float()
                counts[cluster] = 1
                labels[point] = cluster
        centers = sums / counts[:, None].to(sums.dtype)
    return centers, labels


def fit_prototypes(
    features_per_scale: list[Tensor],
    ratio: float,
    seed: int = 0,
    iters: int = 50,
    max_images: int | None = None,
    chunk: int | None = None,
    n_images: int | None = None,
) -> list[Tensor]:
    """Per-scale prototypes from the normal images' feature maps.

    ``features_per_scale[j]`` is N×C_j×H_j×W_j (float16 is fine). K is derived from
    ``n_images`` (default the full N; tiles: N counts tiles, n_images images); when N exceeds
    ``max_images`` the same seeded subsample of rows is used at every scale.
    Returns K×C_j×H_j×W_j float32 tensors.
    """
    if not features_per_scale:
        raise ValueError("no feature maps given")
    n = features_per_scale[0].shape[0]
    if any(f.shape[0] != n for f in features_per_scale):
        raise ValueError("every scale needs the same number of images")
    k = min(n, num_prototypes(n if n_images is None else n_images, ratio))
    idx = None
    if max_images is not None and n > max_images:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=gen)[:max_images].sort().values
        k = min(k, max_images)
    out = []
    for j, feats in enumerate(features_per_scale):
        sub = feats if idx is None else feats[idx.to(feats.device)]
        flat = sub.reshape(sub.shape[0], -1)
        centers, _ = kmeans(flat, k, seed=seed + j, iters=iters, chunk=chunk)
        out.append(centers.reshape(k, *feats.shape[1:]))
    return out


# ----------------------------------------------------------------------------- matching


def nearest_prototype(features: Tensor, prototypes: Tensor) -> Tensor:
    """Index of the nearest prototype (squared L2 over the whole flattened map) per image.

    Runs in float32 with autocast off: a bf16 matmul over 10⁵-dimensional maps would be too
    coarse to rank distances. ||f||² is the same for every prototype, so it is left out.
    """
    with torch.no_grad(), autocast_off(features.device.type):
        f = features.detach().flatten(1).float()
        p = prototypes.flatten(1).float()
        scores = p.pow(2).sum(1)[None] - 2.0 * f @ p.T
        return scores.argmin(1)


def prototype_residual(
    features: Tensor, prototypes: Tensor, kind: Literal["squared", "absolute"] = "squared"
) -> Tensor:
    """D(F − P*) with P* the nearest prototype of each image (no gradient through the match)."""
    matched = prototypes.index_select(0, nearest_prototype(features, prototypes)).to(features.dtype)
    diff = features - matched
    if kind == "squared":
        return diff * diff
    if kind == "absolute":
        return diff.abs()
    raise ValueError(f"residual must be 'squared' or 'absolute', got {kind!r}")
