"""k-means prototypes and nearest-prototype matching (PRN's multi-scale prototypes)."""

from __future__ import annotations

import pytest
import torch

from prn_ray.model.prototypes import (
    fit_prototypes,
    kmeans,
    nearest_prototype,
    num_prototypes,
    prototype_residual,
)

torch.set_num_threads(1)


def planted(seed: int, k: int = 3, per: int = 10, shape: tuple[int, ...] = (2, 4, 4)):
    """k well-separated clusters of ``per`` maps each; returns (features, labels, true means)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, *shape, generator=g) * 50
    labels = torch.arange(k).repeat_interleave(per)
    x = centers[labels] + 0.1 * torch.randn(k * per, *shape, generator=g)
    means = torch.stack([x[labels == c].mean(0) for c in range(k)])
    perm = torch.randperm(k * per, generator=g)
    return x[perm], labels[perm], means


@pytest.mark.parametrize(
    ("n", "ratio", "k"),
    [(209, 0.1, 21), (60, 0.1, 6), (5, 0.1, 1), (1, 0.1, 1), (10, 0.25, 3), (30, 0.1, 3),
     (4, 2.0, 4)],
)
def test_num_prototypes(n, ratio, k):
    assert num_prototypes(n, ratio) == k


def test_num_prototypes_rejects_empty():
    with pytest.raises(ValueError):
        num_prototypes(0, 0.1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_planted_clusters(seed):
    x, labels, means = planted(seed)
    protos = fit_prototypes([x], ratio=0.1, seed=seed, iters=20)[0]  # K = round(0.1 · 30) = 3
    assert protos.shape == (3, 2, 4, 4) and protos.dtype == torch.float32
    # Each recovered prototype is exactly one planted cluster's mean (up to order).
    d = torch.cdist(protos.flatten(1), means.flatten(1))
    match = d.argmin(1)
    assert sorted(match.tolist()) == [0, 1, 2]
    torch.testing.assert_close(protos, means[match], atol=1e-4, rtol=0)
    # And the labels partition the data as planted.
    _, lab = kmeans(x.flatten(1), 3, seed=seed, iters=20)
    for c in range(3):
        assert lab[labels == c].unique().numel() == 1


def test_kmeans_is_seeded_and_deterministic():
    x = torch.randn(40, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    a = fit_prototypes([x], ratio=0.2, seed=7, iters=10)[0]
    b = fit_prototypes([x], ratio=0.2, seed=7, iters=10)[0]
    c = fit_prototypes([x], ratio=0.2, seed=8, iters=10)[0]
    assert torch.equal(a, b)
    assert a.shape == c.shape == (8, 3, 5, 5)


def test_chunked_equals_unchunked():
    x = torch.randn(37, 150, generator=torch.Generator().manual_seed(4))
    c_full, l_full = kmeans(x, 5, seed=0, iters=15, chunk=None)
    c_one, l_one = kmeans(x, 5, seed=0, iters=15, chunk=1)
    c_odd, l_odd = kmeans(x, 5, seed=0, iters=15, chunk=7)
    assert torch.equal(l_full, l_one) and torch.equal(l_full, l_odd)
    torch.testing.assert_close(c_full, c_one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_full, c_odd, atol=1e-5, rtol=1e-5)


def test_float16_features_and_per_scale_shapes():
    g = torch.Generator().manual_seed(5)
    feats = [torch.randn(12, 4, 8, 8, generator=g).half(),
             torch.randn(12, 8, 4, 4, generator=g).half()]
    protos = fit_prototypes(feats, ratio=0.25, seed=0, iters=5)
    assert [p.shape for p in protos] == [(3, 4, 8, 8), (3, 8, 4, 4)]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in protos)


def test_fit_set_cap_uses_seeded_subsample():
    x, _, _ = planted(0, k=3, per=20)
    a = fit_prototypes([x], ratio=0.1, seed=1, iters=10, max_images=15)[0]
    b = fit_prototypes([x], ratio=0.1, seed=1, iters=10, max_images=15)[0]
    assert a.shape[0] == num_prototypes(60, 0.1) == 6  # K from the full N, fit on 15 images
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        fit_prototypes([x, x[:5]], ratio=0.1)


def test_duplicate_points_keep_k_centers():
    x = torch.cat([torch.zeros(6, 10), torch.ones(2, 10)])
    centers, labels = kmeans(x, 4, seed=0, iters=10)
    assert centers.shape == (4, 10) and torch.isfinite(centers).all()
    assert labels.max() < 4


def test_nearest_prototype_matches_brute_force():
    g = torch.Generator().manual_seed(6)
    f = torch.randn(9, 4, 3, 5, generator=g)
    p = torch.randn(7, 4, 3, 5, generator=g)
    ref = ((f.double()[:, None] - p.double()[None]) ** 2).flatten(2).sum(-1).argmin(1)
    assert torch.equal(nearest_prototype(f, p), ref)
    # Autocast must not coarsen the ranking (matching runs in float32 regardless).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(nearest_prototype(f, p), ref)
    sq = prototype_residual(f, p, "squared")
    ab = prototype_residual(f, p, "absolute")
    torch.testing.assert_close(sq, (f - p[ref]) ** 2)
    torch.testing.assert_close(ab, (f - p[ref]).abs())
    with pytest.raises(ValueError):
        prototype_residual(f, p, "cubic")  # type: ignore[arg-type]
