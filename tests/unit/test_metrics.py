"""prn_ray.metrics against independent oracles.

AUROC / AP: scikit-learn. AUPRO: a naive from-definition reference written here (a loop over
every distinct score, skimage 8-connected regions, segment-wise trapezoid clipped at the limit).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import ref_aupro
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from prn_ray import curves
from prn_ray import metrics as M

# ------------------------------------------------------------------------------------------------
# independent reference and data


def make_case(
    rng: np.random.Generator, n: int = 5, size: int = 24, levels: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Masks with rectangles, single pixels, diagonal-touching pairs; some images defect-free."""
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if i % 3 == 2:
            continue  # defect-free image
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, r : r + h, c : c + w] = True
        r, c = rng.integers(0, size - 1, 2)
        masks[i, r, c] = True  # maybe isolated pixel
        r, c = rng.integers(0, size - 2, 2)
        masks[i, r, c] = masks[i, r + 1, c + 1] = True  # diagonal pair
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    if levels is not None:
        maps = np.round(maps * levels / 1.6) / levels  # many ties
    return masks, maps.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# AUROC / AP vs scikit-learn


@pytest.mark.parametrize("levels", [None, 7, 50])
@pytest.mark.parametrize("seed", range(4))
def test_image_auroc_matches_sklearn(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.3
    s = rng.random(200) + 0.4 * y
    if levels:
        s = np.round(s * levels) / levels
    assert M.image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert M.image_auroc(y.astype(int), torch.tensor(s)) == pytest.approx(
        roc_auc_score(y, s), abs=1e-9
    )


@pytest.mark.parametrize("levels", [None, 5, 100])
@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_ap_match_sklearn(seed: int, levels: int | None) -> None:
    masks, maps = make_case(np.random.default_rng(seed), n=6, size=32, levels=levels)
    y, s = masks.ravel(), maps.astype(np.float64).ravel()
    auc, ap = roc_auc_score(y, s), average_precision_score(y, s)
    assert M.pixel_auroc(masks, maps) == pytest.approx(auc, abs=1e-9)
    assert M.pixel_ap(masks, maps) == pytest.approx(ap, abs=1e-9)
    # other mask encodings / layouts / containers give the same numbers
    m255 = masks.astype(np.uint8)[:, None] * 255
    assert M.pixel_auroc(m255, maps[:, None]) == pytest.approx(auc, abs=1e-9)
    got = M.pixel_ap(torch.from_numpy(masks), torch.from_numpy(maps))
    assert got == pytest.approx(ap, abs=1e-9)


def test_all_tied_scores_and_float16() -> None:
    y = np.array([0, 1, 0, 1, 1, 0, 0, 0])
    s = np.zeros(8)
    assert M.image_auroc(y, s) == pytest.approx(0.5, abs=1e-12)
    assert M.pixel_ap(y.reshape(1, 2, 4), s.reshape(1, 2, 4)) == pytest.approx(3 / 8, abs=1e-12)
    rng = np.random.default_rng(0)
    masks, maps = make_case(rng, n=3)
    m16 = maps.astype(np.float16)  # coarse dtype: many ties
    assert M.pixel_auroc(masks, m16) == pytest.approx(
        roc_auc_score(masks.ravel(), m16.astype(np.float64).ravel()), abs=1e-9
    )


def test_roc_curve_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.4
    s = np.round(rng.random(300) + 0.3 * y, 2)
    fpr, tpr, thr = M.roc_curve(y, s)
    f2, t2, th2 = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2, atol=1e-12)
    np.testing.assert_allclose(tpr, t2, atol=1e-12)
    np.testing.assert_allclose(thr[1:], th2[1:])
    assert thr[0] == np.inf
    fd, td, _ = M.roc_curve(y, s, max_points=20)
    assert len(fd) <= 20 and fd[0] == 0 and fd[-1] == 1 and td[-1] == 1


# ------------------------------------------------------------------------------------------------
# AUPRO vs the from-definition reference


@pytest.mark.parametrize("levels", [None, 6, 40])
@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_reference(seed: int, levels: int | None) -> None:
    masks, maps = make_case(np.random.default_rng(100 + seed), levels=levels)
    assert M.aupro(masks, maps) == pytest.approx(ref_aupro(masks, maps), abs=1e-6)


@pytest.mark.parametrize("limit", [0.01, 0.05, 0.3, 1.0])
def test_aupro_other_limits(limit: float) -> None:
    masks, maps = make_case(np.random.default_rng(7), levels=30)
    assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(
        ref_aupro(masks, maps, limit), abs=1e-6
    )


def test_diagonal_touch_is_one_region() -> None:
    mask = np.zeros((1, 8, 8), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # one 8-connected region (two 4-connected ones)
    mask[0, 5, 5] = True  # a second region
    smap = np.zeros((1, 8, 8), dtype=np.float32)
    smap[0, 0, 0] = smap[0, 5, 5] = 1.0  # detect half of region 1 and all of region 2
    smap[0, 1, 1] = -1.0  # the other half scores below every normal pixel
    fpr, pro, _ = M.pro_curve(mask, smap)
    # 8-connectivity: (1/2 + 1) / 2 = 0.75 at FPR 0; 4-connectivity would give (1 + 0 + 1) / 3
    assert fpr[1] == 0.0 and pro[1] == pytest.approx(0.75, abs=1e-12)
    _, sizes = M.label_regions(mask)
    assert sizes.tolist() == [2, 1]
    assert M.aupro(mask, smap) == pytest.approx(0.75, abs=1e-12)
    assert ref_aupro(mask, smap) == pytest.approx(0.75, abs=1e-12)


def test_region_size_does_not_matter() -> None:
    mask = np.zeros((1, 64, 64), dtype=bool)
    mask[0, 2, 2] = True  # size 1
    mask[0, 20:45, 10:50] = True  # size 1000
    assert M.label_regions(mask)[1].tolist() == [1, 1000]
    smap = np.full((1, 64, 64), 0.5, dtype=np.float32)
    smap[0, 2, 2] = 1.0  # only the tiny region is found
    smap[0, 20:45, 10:50] = 0.0
    _, pro, _ = M.pro_curve(mask, smap)
    assert pro[1] == pytest.approx(0.5, abs=1e-12)
    assert M.aupro(mask, smap) == pytest.approx(0.5, abs=1e-12)
    assert M.pixel_auroc(mask, smap) < 0.01  # pixel-weighted metrics see almost nothing


def test_perfect_inverted_random_maps() -> None:
    rng = np.random.default_rng(11)
    masks, _ = make_case(rng, n=6, size=32)
    perfect = masks.astype(np.float32)
    assert M.aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert M.aupro(masks, 1.0 - perfect) == pytest.approx(0.0, abs=1e-12)
    # random uniform map: PRO(t) ~ FPR(t), area ~ 0.3^2 / 2 / 0.3 = 0.15
    big = np.zeros((40, 64, 64), dtype=bool)
    for i in range(40):
        for _ in range(5):
            r, c = rng.integers(0, 56, 2)
            big[i, r : r + rng.integers(1, 8), c : c + rng.integers(1, 8)] = True
    vals = [M.aupro(big, rng.random(big.shape).astype(np.float32)) for _ in range(3)]
    assert np.mean(vals) == pytest.approx(0.15, abs=0.01)


def test_pro_curve_truncation() -> None:
    masks, maps = make_case(np.random.default_rng(5))
    fpr, pro, thr = M.pro_curve(masks, maps, fpr_limit=0.3)
    assert fpr[0] == 0 and pro[0] == 0 and thr[0] == np.inf
    assert fpr[-1] == pytest.approx(0.3) and np.isnan(thr[-1])
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    assert np.trapezoid(pro, fpr) / 0.3 == pytest.approx(M.aupro(masks, maps), abs=1e-12)
    full_f, full_p, _ = M.pro_curve(masks, maps)
    assert full_f[-1] == pytest.approx(1.0) and full_p[-1] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# edge cases and inputs


def test_undefined_cases_give_nan_with_warning() -> None:
    normal = np.zeros((2, 8, 8), dtype=bool)
    smap = np.random.default_rng(0).random((2, 8, 8))
    for fn in (M.aupro, M.pixel_auroc, M.pixel_ap):
        with pytest.warns(M.UndefinedMetricWarning):
            assert math.isnan(fn(normal, smap))
    with pytest.warns(M.UndefinedMetricWarning):
        assert math.isnan(M.aupro(np.ones((1, 4, 4)), smap[:1, :4, :4]))
    with pytest.warns(M.UndefinedMetricWarning):
        assert math.isnan(M.image_auroc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="soft mask"):
        M.aupro(np.full((1, 4, 4), 0.5), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        M.pixel_auroc(np.eye(4)[None], np.full((1, 4, 4), np.nan))
    with pytest.raises(ValueError, match="shape"):
        M.aupro(np.eye(4)[None], np.zeros((1, 4, 5)))
    with pytest.raises(ValueError):
        M.aupro(np.eye(4)[None], np.eye(4)[None], fpr_limit=0.0)


# ------------------------------------------------------------------------------------------------
# accumulator


def _batches(masks: np.ndarray, maps: np.ndarray, scores: np.ndarray, cuts: list[int]):
    edges = [0, *cuts, len(masks)]
    for a, b in zip(edges[:-1], edges[1:]):
        yield masks[a:b], maps[a:b], scores[a:b]


def test_accumulator_equals_one_shot_and_merge() -> None:
    rng = np.random.default_rng(21)
    masks, maps = make_case(rng, n=9, size=32, levels=60)
    labels = masks.reshape(9, -1).any(1)
    scores = maps.reshape(9, -1).max(1)
    one = {
        "image_auroc": M.image_auroc(labels, scores),
        "pixel_auroc": M.pixel_auroc(masks, maps),
        "aupro": M.aupro(masks, maps),
        "pixel_ap": M.pixel_ap(masks, maps),
    }
    acc = M.PixelMetricAccumulator()
    for i, (m, s, sc) in enumerate(_batches(masks, maps, scores, [2, 3, 7])):
        if i % 2:  # torch batches (N, 1, H, W), labels derived from masks
            acc.update(torch.from_numpy(s)[:, None], torch.from_numpy(m)[:, None], torch.tensor(sc))
        else:
            acc.update(s, m.astype(np.uint8), scores=sc, labels=m.reshape(len(m), -1).any(1))
    got = acc.compute()
    assert got.keys() == one.keys()
    for k in one:
        assert got[k] == pytest.approx(one[k], abs=1e-12), k

    a, b = M.PixelMetricAccumulator(), M.PixelMetricAccumulator()
    a.update(maps[:4], masks[:4], scores[:4])
    b.update(maps[4:6], masks[4:6], scores[4:6])
    b.update(maps[6:], masks[6:], scores[6:])
    merged = b.merge(a).compute()  # order does not matter
    for k in one:
        assert merged[k] == pytest.approx(one[k], abs=1e-12), k

    curves = acc.curves(max_points=50)
    assert set(curves) == {"pixel_roc", "pro", "image_roc"}
    assert len(curves["pro"][0]) <= 50 and curves["pro"][0][-1] == pytest.approx(0.3)


def test_accumulator_without_image_scores_and_empty() -> None:
    assert all(math.isnan(v) for v in M.PixelMetricAccumulator().compute().values())
    masks, maps = make_case(np.random.default_rng(2))
    acc = M.PixelMetricAccumulator()
    acc.update(maps, masks)
    out = acc.compute()
    assert math.isnan(out["image_auroc"]) and out["aupro"] == pytest.approx(M.aupro(masks, maps))


def test_binned_accumulator_is_exact_on_quantised_scores() -> None:
    rng = np.random.default_rng(8)
    masks, maps = make_case(rng, n=8, size=32)
    maps = maps / 1.6  # in [0, 1)
    bins = 64
    quant = np.floor(maps.astype(np.float64) * bins)  # what the binned mode sees
    acc = M.PixelMetricAccumulator(bins=bins)
    other = M.PixelMetricAccumulator(bins=bins)
    acc.update(maps[:5], masks[:5])
    other.update(maps[5:], masks[5:])
    out = acc.merge(other).compute()
    assert acc.nbytes == 3 * bins * 8  # constant memory
    auc = roc_auc_score(masks.ravel(), quant.ravel())
    assert out["pixel_auroc"] == pytest.approx(auc, abs=1e-9)
    assert out["pixel_ap"] == pytest.approx(
        average_precision_score(masks.ravel(), quant.ravel()), abs=1e-9
    )
    assert out["aupro"] == pytest.approx(ref_aupro(masks, quant), abs=1e-6)
    exact = M.aupro(masks, maps)
    assert abs(out["aupro"] - exact) < 0.02  # and close to the exact value


# ------------------------------------------------------------------------------------------------
# calibration helpers


def test_f1_optimal_threshold_brute_force() -> None:
    rng = np.random.default_rng(4)
    y = rng.random(400) < 0.3
    s = np.round(rng.random(400) + 0.5 * y, 2)
    thr, f1 = M.f1_optimal_threshold(y, s)

    def f1_of(t: float) -> float:
        p = s > t
        tp = np.sum(p & y)
        return 2 * tp / (np.sum(p) + np.sum(y))

    best = max(f1_of(t) for t in [*np.unique(s), -np.inf])
    assert f1 == pytest.approx(best, abs=1e-12)
    assert f1_of(thr) == pytest.approx(best, abs=1e-12)


def test_threshold_at_fpr() -> None:
    rng = np.random.default_rng(9)
    normal = np.round(rng.random(1000), 2)  # ties
    for fpr in (0.0, 0.01, 0.05, 0.29, 0.5):
        t = M.threshold_at_fpr(normal, fpr)
        assert np.mean(normal > t) <= fpr + 1e-12
        lower = normal[normal < t]
        if lower.size:  # the next lower observed score would exceed the budget
            assert np.mean(normal > lower.max()) > fpr
    assert M.threshold_at_fpr(normal, 0.0) == normal.max()
    assert np.mean(normal > M.threshold_at_fpr(normal, 1.0)) == 1.0


def test_no_sklearn_in_library() -> None:
    import inspect

    src = inspect.getsource(M)
    assert "import sklearn" not in src and "from sklearn" not in src
    masks, maps = make_case(np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-posed case emits no warning
        M.aupro(masks, maps)


def test_chunked_walk_matches_oracles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks: tie groups straddle chunk boundaries; results must not change."""
    masks, maps = make_case(np.random.default_rng(31), levels=25)
    expected = (M.pixel_auroc(masks, maps), M.pixel_ap(masks, maps), M.aupro(masks, maps))
    curve = M.pro_curve(masks, maps)
    monkeypatch.setattr(curves, "CHUNK", 7)
    y, s = masks.ravel(), maps.astype(np.float64).ravel()
    assert M.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert M.pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert M.aupro(masks, maps) == pytest.approx(ref_aupro(masks, maps), abs=1e-6)
    got = (M.pixel_auroc(masks, maps), M.pixel_ap(masks, maps), M.aupro(masks, maps))
    np.testing.assert_allclose(got, expected, atol=1e-12)
    for a, b in zip(M.pro_curve(masks, maps), curve):
        np.testing.assert_allclose(a, b, atol=1e-12)
    acc = M.PixelMetricAccumulator()
    acc.update(maps, masks)
    assert acc.compute()["aupro"] == pytest.approx(expected[2], abs=1e-12)
