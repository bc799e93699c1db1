"""Anomaly synthesis (prn_ray.synthesis): Perlin masks, textures, simulated / extended anomalies,
the per-epoch plan. Fast (a few seconds), no Ray needed."""

from __future__ import annotations

import dataclasses
import pickle

import cv2
import numpy as np
import pytest

from prn_ray.config import SynthesisConfig
from prn_ray.data.epoch_plan import epoch_plan
from prn_ray.synthesis import (
    SOURCES,
    Synthesizer,
    blend,
    estimate_foreground,
    extended_anomaly,
    load_texture_bank,
    perlin_mask,
    perlin_noise,
    sample_rng,
    simulated_anomaly,
    source_probabilities,
)
from prn_ray.synthesis.simulated import make_source
from prn_ray.synthesis.textures import AUGMENTATIONS, augment_source, procedural_textures


def cfg_with(**kw) -> SynthesisConfig:
    return dataclasses.replace(SynthesisConfig(), **kw)


def noise_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def object_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Grey background, a dark-blue disc in the middle, light noise."""
    img = np.full((h, w, 3), 200, np.uint8)
    cv2.circle(img, (w // 2, h // 2), int(min(h, w) * 0.3), (60, 90, 120), -1)
    noise = np.random.default_rng(seed).normal(0, 3, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def red_defect(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with a pure-red filled rectangle as the defect, and its mask."""
    img = np.full((h, w, 3), 128, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    y0, x0 = h // 5, w // 5
    mask[y0 : y0 + max(4, h // 6), x0 : x0 + max(4, w // 5)] = 1
    img[mask > 0] = (255, 0, 0)
    return img, mask


def make_batch(images: np.ndarray, kinds: list[str], seeds, source_index=None) -> dict:
    b = len(images)
    return {
        "image": images,
        "mask": np.zeros(images.shape[:3], np.uint8),
        "kind": np.array(kinds),
        "seed": np.asarray(seeds, dtype=np.int64),
        "source_index": np.asarray([-1] * b if source_index is None else source_index, np.int64),
        "uri": np.array([f"img{i}.png" for i in range(b)], dtype=object),
    }


@pytest.fixture(scope="module")
def small_bank() -> np.ndarray:
    return np.stack(procedural_textures(8, 64, np.random.default_rng(1)))


# ----------------------------------------------------------------------------- Perlin


@pytest.mark.parametrize("shape", [(37, 53), (100, 80), (256, 256), (5, 300)])
def test_perlin_mask_any_size(shape):
    cfg = SynthesisConfig()
    for seed in range(5):
        m = perlin_mask(shape, sample_rng(seed), cfg)
        assert m.shape == shape and m.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 1}
        assert m.sum() >= min(cfg.min_anomaly_pixels, shape[0] * shape[1] // 4)
        assert np.array_equal(m, perlin_mask(shape, sample_rng(seed), cfg))  # reproducible
    m1, m2 = perlin_mask(shape, sample_rng(1), cfg), perlin_mask(shape, sample_rng(2), cfg)
    assert not np.array_equal(m1, m2)


def test_perlin_coverage_plausible():
    cfg = SynthesisConfig()
    cov = np.array([perlin_mask((128, 128), sample_rng(s), cfg).mean() for s in range(60)])
    # DRAEM-like: a few percent of the image on average, never the whole image
    assert 0.01 < np.median(cov) < 0.25, np.median(cov)
    assert cov.max() < 0.7
    assert len(np.unique(np.round(cov, 3))) > 30  # shapes vary


def test_perlin_noise_smooth_and_rotated():
    n0 = perlin_noise((128, 128), (2, 16), sample_rng(3), 0.0)
    assert n0.dtype == np.float32 and -1.5 < n0.min() < 0 < n0.max() < 1.5
    # anisotropic lattice: 16 cells across x, 2 across y -> varies mostly along x
    dx = np.abs(np.diff(n0, axis=1)).mean()
    dy = np.abs(np.diff(n0, axis=0)).mean()
    assert dx > 3 * dy
    n90 = perlin_noise((128, 128), (2, 16), sample_rng(3), 89.0)
    dx90 = np.abs(np.diff(n90, axis=1)).mean()
    dy90 = np.abs(np.diff(n90, axis=0)).mean()
    assert dy90 > 3 * dx90  # rotated by ~90 degrees: now varies mostly along y
    # continuity: neighbouring pixels are close (no lattice seams)
    assert np.abs(np.diff(n0, axis=1)).max() < 0.5


def test_perlin_masks_take_many_orientations():
    """Masks from a fixed anisotropic lattice show different dominant orientations."""
    cfg = cfg_with(perlin_min_scale=4, perlin_max_scale=4, perlin_threshold=0.3)
    angles = []
    for s in range(12):
        m = perlin_mask((96, 96), sample_rng(s), cfg).astype(np.float32)
        gy, gx = np.gradient(cv2.GaussianBlur(m, (5, 5), 0))
        angles.append(np.degrees(0.5 * np.arctan2(2 * (gx * gy).sum(), ((gx**2) - (gy**2)).sum())))
    assert np.ptp(angles) > 30


# ----------------------------------------------------------------------------- textures


def test_texture_bank_builtin_and_deterministic():
    cfg = SynthesisConfig()
    bank = load_texture_bank(cfg, 48, max_items=40, seed=3)
    assert bank.shape == (40, 48, 48, 3) and bank.dtype == np.uint8
    assert np.array_equal(bank, load_texture_bank(cfg, 48, max_items=40, seed=3))
    assert not np.array_equal(bank, load_texture_bank(cfg, 48, max_items=40, seed=4))
    stds = bank.reshape(len(bank), -1).std(axis=1)
    assert (stds > 2).all()  # no blank textures
    # bundled scikit-image files come first when no user textures: brick is gray
    assert np.array_equal(bank[0][..., 0], bank[0][..., 1])


def test_texture_bank_reads_user_folder(tmp_path):
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    for i, c in enumerate(colours):
        img = np.zeros((40, 60, 3), np.uint8)
        img[:] = c[::-1]  # BGR on disk
        img[::4] = 0
        cv2.imwrite(str(tmp_path / f"t{i}.png"), img)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    cfg = cfg_with(texture_uri=str(tmp_path))
    bank = load_texture_bank(cfg, 32, max_items=6)
    assert bank.shape == (6, 32, 32, 3)
    dominant = sorted(int(np.argmax(t.reshape(-1, 3).mean(axis=0))) for t in bank[:3])
    assert dominant == [0, 1, 2]  # the three user images first, decoded as RGB; broken file skipped
    assert all(t.reshape(-1, 3).mean(axis=0).max() > 150 for t in bank[:3])
    # an empty folder falls back to built-ins
    empty = tmp_path / "empty"
    empty.mkdir()
    fallback = load_texture_bank(cfg_with(texture_uri=str(empty)), 32, max_items=4)
    assert fallback.shape == (4, 32, 32, 3)


def test_augment_source_ops(small_bank):
    img = small_bank[0]
    for name, op in AUGMENTATIONS.items():
        out = op(img, sample_rng(1))
        assert out.shape == img.shape and out.dtype == np.uint8, name
    a = augment_source(img, sample_rng(5))
    assert np.array_equal(a, augment_source(img, sample_rng(5)))
    assert np.array_equal(AUGMENTATIONS["invert"](img, sample_rng(0)), 255 - img)


# ----------------------------------------------------------------------------- simulated


def test_blend_same_scale_not_darkened():
    """Spec trap #4: the texture must show; it must not become beta * N (a darkened normal)."""
    black = np.zeros((20, 20, 3), np.uint8)
    bright = np.full((20, 20, 3), 230, np.uint8)
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 1
    out = blend(black, bright, mask, 0.0)
    assert (out[mask > 0] == 230).all() and (out[mask == 0] == 0).all()
    half = blend(black, np.full_like(black, 255), mask, 0.5)
    assert (half[mask > 0] == 128).all()  # (1 - 0.5) * 1.0 -> 0.5 -> 128 (not 0 = beta * N)
    gray = np.full_like(black, 100)
    assert (blend(gray, bright, mask, 1.0)[mask > 0] == 100).all()  # beta = 1: N unchanged


def test_texture_really_shows_inside_mask():
    """beta ~ 0, black normal image, bright texture: the masked pixels are the augmented source."""
    s = 64
    rng = np.random.default_rng(7)
    tex = rng.integers(150, 256, size=(3, s, s, 3), dtype=np.uint8)
    cfg = cfg_with(beta_max=1e-6, rotate_normal_prob=0.0, source_weights={"texture": 1.0})
    syn = Synthesizer(cfg, s, textures=tex)
    black = np.zeros((6, s, s, 3), np.uint8)
    seeds = np.arange(6) + 40
    out = syn(make_batch(black, ["simulated"] * 6, seeds))
    probs = source_probabilities(cfg.source_weights, {"texture": True})
    bright_rows = 0
    for i, seed in enumerate(seeds):
        m = out["mask"][i] > 0
        assert m.sum() >= cfg.min_anomaly_pixels
        assert (out["image"][i][~m] == 0).all()  # outside: untouched black
        # replay the documented draw order to get the exact augmented source A
        r = sample_rng(int(seed))
        r.random()  # rotate-normal draw
        r.choice(len(SOURCES), p=probs)
        src = make_source("texture", r, s, s, textures=tex)
        inside, expected = out["image"][i][m].astype(int), src[m].astype(int)
        assert np.abs(inside - expected).max() <= 1  # = A (1 - beta) + beta * 0, beta ~ 0
        if expected.std() > 0:
            assert np.corrcoef(inside.ravel(), expected.ravel())[0, 1] > 0.99
        bright_rows += int(inside.mean() > 100)
    assert bright_rows >= 4  # not a darkened blob: bright texture pixels on a black image


def test_simulated_rotation_and_base():
    s = 48
    img = np.full((s, s, 3), 220, np.uint8)
    cfg = cfg_with(rotate_normal_prob=1.0)
    probs = source_probabilities(cfg.source_weights, {"texture": True, "homologous": True})
    tex = np.stack(procedural_textures(2, s, sample_rng(0)))
    res = simulated_anomaly(img, sample_rng(1), cfg, probs, textures=tex)
    assert res.base[0, 0].sum() == 0 or res.base[-1, -1].sum() == 0  # rotated: black corner
    m = res.mask > 0
    assert np.array_equal(res.image[~m], res.base[~m])


@pytest.mark.parametrize("shape", [(37, 53), (100, 80), (256, 256)])
def test_synthesizer_any_size_outside_unchanged(shape, small_bank):
    h, w = shape
    dimg, dmask = red_defect(h, w)
    cfg = cfg_with(rotate_normal_prob=0.0)
    het = noise_images(2, 30, 30, seed=9)
    syn = Synthesizer(cfg, 64, textures=small_bank, seen=[(dimg, dmask)], heterologous=het)
    imgs = noise_images(8, h, w, seed=1)
    kinds = ["normal", "seen"] + ["simulated"] * 3 + ["extended"] * 2 + ["simulated"]
    batch = make_batch(imgs, kinds, np.arange(8) * 11 + 5, [-1, -1, -1, -1, -1, 0, 0, -1])
    batch["mask"][1] = dmask  # a raw seen row keeps its mask
    out = syn(batch)
    assert out["image"].shape == imgs.shape and out["mask"].shape == (8, h, w)
    assert out["image"].dtype == np.uint8 and out["mask"].dtype == np.uint8
    assert set(np.unique(out["mask"])) <= {0, 1}
    assert np.array_equal(out["uri"], batch["uri"]) and np.array_equal(out["seed"], batch["seed"])
    assert np.array_equal(out["image"][:2], imgs[:2]) and np.array_equal(out["mask"][1], dmask)
    assert not out["mask"][0].any()
    changed_share = []
    for i in range(2, 8):
        m = out["mask"][i] > 0
        assert m.any()
        assert np.array_equal(out["image"][i][~m], imgs[i][~m])  # bit-for-bit outside the mask
        changed = (out["image"][i] != imgs[i]).any(axis=2)
        assert not (changed & ~m).any()  # every changed pixel is in the mask
        changed_share.append(changed[m].mean())
    assert np.mean(changed_share) > 0.5  # and the mask marks pixels that really changed
    assert np.array_equal(batch["image"], imgs)  # input not mutated


def test_reproducible_per_seed_and_epoch(small_bank):
    s = 64
    cfg = SynthesisConfig()
    dimg, dmask = red_defect(s, s)
    syn = Synthesizer(cfg, s, textures=small_bank, seen=[(dimg, dmask)])
    imgs = np.stack([object_image(s, s, i) for i in range(6)])
    kinds = ["simulated"] * 3 + ["extended"] * 3
    src = [-1] * 3 + [0] * 3
    plan0 = epoch_plan(6, 1, cfg, epoch=0, seed=1)["seed"][:6]
    plan1 = epoch_plan(6, 1, cfg, epoch=1, seed=1)["seed"][:6]
    a = syn(make_batch(imgs, kinds, plan0, src))
    b = pickle.loads(pickle.dumps(syn))(make_batch(imgs, kinds, plan0, src))  # as in a Ray task
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    # row order within the batch does not matter: each row depends on its own seed only
    rev = syn(make_batch(imgs[::-1].copy(), kinds[::-1], plan0[::-1], src[::-1]))
    assert np.array_equal(rev["image"][::-1], a["image"])
    c = syn(make_batch(imgs, kinds, plan1, src))
    for i in range(6):
        assert not np.array_equal(a["mask"][i], c["mask"][i])


def test_source_mix_follows_weights():
    s = 24
    tex = np.stack(procedural_textures(4, s, sample_rng(0)))
    het = noise_images(3, s, s, seed=2)
    n = 600
    imgs = noise_images(1, s, s)[np.zeros(n, int)]
    seeds = np.arange(n, dtype=np.int64) * 7919 + 13
    cfg = SynthesisConfig()  # texture 0.6, homologous 0.2, heterologous 0.2
    batch = make_batch(imgs, ["simulated"] * n, seeds)
    out = Synthesizer(cfg, s, tex, heterologous=het, annotate=True)(batch)
    freq = {k: float(np.mean(out["synth_source"] == k)) for k in SOURCES}
    for k, p in cfg.source_weights.items():
        assert abs(freq[k] - p) < 0.07, freq  # ~3.5 sigma at n=600
    # no heterologous bank: renormalised over texture / homologous -> 0.75 / 0.25
    out = Synthesizer(cfg, s, tex, annotate=True)(batch)
    assert not (out["synth_source"] == "heterologous").any()
    assert abs(np.mean(out["synth_source"] == "texture") - 0.75) < 0.07
    with pytest.raises(ValueError):
        Synthesizer(cfg_with(source_weights={"heterologous": 1.0}), s, tex)
    with pytest.raises(ValueError):
        source_probabilities({"dtd": 1.0}, {"texture": True})


# ----------------------------------------------------------------------------- extended


@pytest.mark.parametrize("shape", [(64, 64), (37, 53)])
def test_extended_pastes_defect_inside_mask(shape):
    h, w = shape
    dimg, dmask = red_defect(h, w)
    normal = np.zeros((h, w, 3), np.uint8)
    normal[..., 2] = np.random.default_rng(0).integers(100, 200, size=(h, w))  # bluish, no red
    area = dmask.sum()
    angles_differ = set()
    for seed in range(12):
        r = extended_anomaly(normal, dimg, dmask, sample_rng(seed), beta_max=1e-6, color_prob=0.0)
        m = r.mask > 0
        assert np.array_equal(r.image[~m], normal[~m])  # rest unchanged
        red = (r.image[..., 0] > 200) & (r.image[..., 1] < 60)
        assert red[m].mean() > 0.6  # the pasted pixels are the defect's (bilinear rims aside)
        assert not red[~m].any()
        assert 0.2 * area <= m.sum() <= 2.4 * area  # scale 0.5-1.5 (area x 0.25-2.25)
        ys, xs = np.nonzero(m)
        angles_differ.add((int(ys.mean()) // 4, int(xs.mean()) // 4))
    assert len(angles_differ) > 6  # placed at different positions


def test_extended_via_synthesizer_and_fallback(small_bank):
    s = 48
    dimg, dmask = red_defect(s, s)
    imgs = noise_images(3, s, s)
    cfg = cfg_with(rotate_normal_prob=0.0)
    seen = [(dimg, dmask), (dimg, np.zeros_like(dmask))]  # the second has an empty mask
    syn = Synthesizer(cfg, s, small_bank, seen=seen, annotate=True)
    out = syn(make_batch(imgs, ["extended"] * 3, [1, 2, 3], [0, 1, 5]))
    assert list(out["synth_source"][:1]) == ["extended"]
    assert out["synth_source"][1] in SOURCES and out["synth_source"][2] in SOURCES  # fallbacks
    assert all(out["mask"][i].any() for i in range(3))


def test_foreground_estimate_and_restriction():
    s = 96
    img = object_image(s, s)
    yy, xx = np.mgrid[:s, :s]
    disc = (yy - s // 2) ** 2 + (xx - s // 2) ** 2 <= int(s * 0.3) ** 2
    fg = estimate_foreground(img)
    assert (fg & disc).sum() / (fg | disc).sum() > 0.9
    assert not estimate_foreground(np.full((s, s, 3), 77, np.uint8)).any()
    small = np.zeros((s, s), np.uint8)
    small[5:9, 5:9] = 1
    dimg = img.copy()
    dimg[small > 0] = (255, 0, 0)
    for seed in range(15):
        r = extended_anomaly(img, dimg, small, sample_rng(seed), foreground=True)
        ys, xs = np.nonzero(r.mask)
        assert disc[int(round(ys.mean())), int(round(xs.mean()))]


# ----------------------------------------------------------------------------- epoch plan


def _counts(plan):
    kinds, counts = np.unique(plan["kind"], return_counts=True)
    return dict(zip(kinds.tolist(), counts.tolist()))


def test_epoch_plan_bottle_counts():
    cfg = SynthesisConfig()
    plan = epoch_plan(209, 10, cfg, epoch=0, seed=42)
    assert _counts(plan) == {"normal": 209, "seen": 50, "extended": 54, "simulated": 104}
    n = len(plan["kind"])
    assert all(len(v) == n for v in plan.values())
    assert plan["seed"].dtype == np.int64 and (plan["seed"] >= 0).all()
    assert len(np.unique(plan["seed"])) == n
    normal_rows = plan["kind"] == "normal"
    assert sorted(plan["normal_index"][normal_rows]) == list(range(209))  # each normal once
    seen_rows = plan["kind"] == "seen"
    assert np.bincount(plan["source_index"][seen_rows]).tolist() == [5] * 10
    assert (plan["normal_index"][seen_rows] == -1).all()
    ext = plan["kind"] == "extended"
    assert ((plan["source_index"][ext] >= 0) & (plan["source_index"][ext] < 10)).all()
    sim = plan["kind"] == "simulated"
    assert (plan["source_index"][sim] == -1).all()
    assert ((plan["normal_index"][sim | ext] >= 0) & (plan["normal_index"][sim | ext] < 209)).all()
    # shuffled, deterministic, epoch-dependent
    assert not (plan["kind"][:209] == "normal").all()
    again = epoch_plan(209, 10, cfg, epoch=0, seed=42)
    assert all(np.array_equal(plan[k], again[k]) for k in plan)
    other = epoch_plan(209, 10, cfg, epoch=1, seed=42)
    assert not np.intersect1d(plan["seed"], other["seed"]).size
    assert not np.array_equal(plan["kind"], other["kind"])


def test_epoch_plan_small_and_no_seen():
    cfg = SynthesisConfig()
    assert _counts(epoch_plan(60, 10, cfg, 0, 0)) == {"normal": 60, "seen": 30, "simulated": 30}
    assert _counts(epoch_plan(209, 0, cfg, 0, 0)) == {"normal": 209, "simulated": 208}
    no_raw = epoch_plan(7, 3, cfg_with(raw_seen_reuse=0), 0, 0)
    assert _counts(no_raw) == {"normal": 7, "extended": 3, "simulated": 3}
    with pytest.raises(ValueError):
        epoch_plan(0, 1, cfg, 0, 0)


# ----------------------------------------------------------------------------- a full batch


def test_a_mixed_batch_gives_every_row_an_anomaly_where_its_mask_says():
    """32 rows at 256 px, simulated and extended (its speed: benchmarks/data_pipeline.py)."""
    s = 256
    cfg = SynthesisConfig()
    bank = np.stack(procedural_textures(8, s, sample_rng(0)))
    dimg, dmask = red_defect(s, s)
    syn = Synthesizer(cfg, s, bank, seen=[(dimg, dmask)], heterologous=noise_images(2, s, s))
    imgs = np.stack([object_image(s, s, i) for i in range(32)])
    kinds = ["simulated"] * 24 + ["extended"] * 8
    out = syn(make_batch(imgs.copy(), kinds, np.arange(32), [-1] * 24 + [0] * 8))
    assert out["image"].shape == imgs.shape and out["mask"].shape == imgs.shape[:3]
    for i in range(32):
        m = out["mask"][i] > 0
        assert m.any(), f"row {i} ({kinds[i]}) has an empty mask"
        changed = (out["image"][i] != imgs[i]).any(-1)
        assert changed[m].mean() > 0.5, f"row {i}: the image did not change under its mask"
