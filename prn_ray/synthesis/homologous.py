"""Homologous (HOA) and heterologous (HEA) anomaly sources (our reading of the paper's HOA / HEA names).

* **Homologous**: the source A is a *normal image of the same product*, geometrically rearranged
  so that, inside the Perlin mask, the object's own structure appears at the wrong place
  (misplaced / duplicated parts, "unseen variance close to the domain"). One of: a tiling of
  random same-size patches, a wrap-around shift with flips, or a zoomed crop. With p=0.5 one
  mild photometric op (gamma / brightness / sharpness) is added; the strong DRAEM ops (invert,
  solarize, ...) are deliberately not used here, they would turn HOA into TA.
* **Heterologous**: A is an image of *another product* (from a small bank), random crop + flips
  and, with p=0.5, the DRAEM 3-op augmentation.

Which normal image feeds HOA is decided by the caller (:class:`prn_ray.synthesis.Synthesizer`):
a bank of same-product normals when one is given, else the row's own normal image. Other rows
of the Ray batch are *not* used: batch boundaries depend on Ray's block layout, and a sample
must be reproducible from its seed alone.
"""

from __future__ import annotations

import numpy as np

from prn_ray.synthesis.textures import AUGMENTATIONS, augment_source, resize_to

MILD_OPS = ("gamma", "brightness", "sharpness")


def _random_crop(img: np.ndarray, ch: int, cw: int, rng: np.random.Generator) -> np.ndarray:
    """A ``ch x cw`` window of ``img`` at a random place (a view, not a copy)."""
    y0 = int(rng.integers(0, img.shape[0] - ch + 1))
    x0 = int(rng.integers(0, img.shape[1] - cw + 1))
    return img[y0 : y0 + ch, x0 : x0 + cw]


def _random_flips(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Left-right, then up-down, each with p=0.5 (views)."""
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.5:
        img = img[::-1]
    return img


def _cuts(n: int, parts: int) -> np.ndarray:
    return np.linspace(0, n, parts + 1).round().astype(np.int64)


def patch_tiling(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Output grid of g_y x g_x cells (g in 2..8), each filled with a random crop of the same size
    taken anywhere in ``img`` (randomly flipped). Works for any image size."""
    h, w = img.shape[:2]
    gy = int(rng.integers(2, min(8, h) + 1)) if h >= 2 else 1
    gx = int(rng.integers(2, min(8, w) + 1)) if w >= 2 else 1
    ys, xs = _cuts(h, gy), _cuts(w, gx)
    out = np.empty_like(img)
    for i in range(gy):
        ch = int(ys[i + 1] - ys[i])
        for j in range(gx):
            cw = int(xs[j + 1] - xs[j])
            out[ys[i] : ys[i + 1], xs[j] : xs[j + 1]] = _random_flips(
                _random_crop(img, ch, cw, rng), rng)
    return out


def shift_flip(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Wrap-around shift by 1/8..7/8 of each side, plus random flips."""
    h, w = img.shape[:2]
    dy = int(rng.integers(max(1, h // 8), max(2, h - h // 8 + 1)))
    dx = int(rng.integers(max(1, w // 8), max(2, w - w // 8 + 1)))
    return np.ascontiguousarray(_random_flips(np.roll(img, (dy, dx), axis=(0, 1)), rng))


def zoom_crop(
    img: np.ndarray, rng: np.random.Generator, lo: float = 0.25, hi: float = 0.7
) -> np.ndarray:
    """A random crop of ``lo..hi`` of each side, resized back to the full size (wrong scale)."""
    h, w = img.shape[:2]
    ch = max(1, int(round(h * rng.uniform(lo, hi))))
    cw = max(1, int(round(w * rng.uniform(lo, hi))))
    return resize_to(np.ascontiguousarray(_random_crop(img, ch, cw, rng)), h, w)


HOMOLOGOUS_OPS = (patch_tiling, shift_flip, zoom_crop)


def homologous_source(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """HOA source from a same-product normal ``image`` (uint8 H x W x 3 -> same shape)."""
    op = HOMOLOGOUS_OPS[int(rng.integers(len(HOMOLOGOUS_OPS)))]
    out = op(np.ascontiguousarray(image), rng)
    if rng.random() < 0.5:
        out = AUGMENTATIONS[MILD_OPS[int(rng.integers(len(MILD_OPS)))]](out, rng)
    return np.ascontiguousarray(out)


def heterologous_source(
    image: np.ndarray, rng: np.random.Generator, height: int, width: int
) -> np.ndarray:
    """HEA source from another product's image: random crop (50-100 % of each side), flips,
    resize to ``height x width``, DRAEM 3-op augmentation with p=0.5."""
    h, w = image.shape[:2]
    ch = max(1, int(round(h * rng.uniform(0.5, 1.0))))
    cw = max(1, int(round(w * rng.uniform(0.5, 1.0))))
    out = _random_flips(_random_crop(image, ch, cw, rng), rng)
    out = resize_to(np.ascontiguousarray(out), height, width)
    if rng.random() < 0.5:
        out = augment_source(out, rng)
    return np.ascontiguousarray(out)
