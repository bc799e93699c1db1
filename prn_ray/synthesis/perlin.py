"""Vectorised 2-D Perlin noise and the DRAEM-style Perlin anomaly mask (DRAEM).

Works for any ``H x W`` (no power-of-two or divisibility restriction): the noise is evaluated at
every pixel centre on a gradient lattice that covers the (rotated) image, so there is nothing to
crop and no padding artefact. The lattice has ``res_y x res_x`` cells across the image
(``res = 2**r``, ``r`` uniform in ``[perlin_min_scale, perlin_max_scale]``, drawn independently per
axis), exactly like DRAEM's ``rand_perlin_2d_np``.

Rotation (DRAEM rotates the noise *image* by U(-90°, 90°) with imgaug, which leaves zero-filled
corners that can never become anomalous) is done here by rotating the sampling coordinates
instead: same distribution of shapes, no dead corners.
"""

from __future__ import annotations

import math

import numpy as np

from prn_ray.config import SynthesisConfig

SQRT2 = np.float32(math.sqrt(2.0))


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int],
    res: tuple[float, float],
    rng: np.random.Generator,
    angle_deg: float = 0.0,
) -> np.ndarray:
    """Perlin gradient noise, float32 ``H x W`` with values in about [-1, 1].

    ``res = (res_y, res_x)``: number of lattice cells across the image height / width (any positive
    number, not necessarily integer). ``angle_deg`` rotates the noise field about the image centre.
    Fully vectorised: a handful of numpy ops over ``H*W`` elements.
    """
    h, w = int(shape[0]), int(shape[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"perlin_noise: invalid shape {shape}")
    ry, rx = float(res[0]), float(res[1])
    if ry <= 0 or rx <= 0:
        raise ValueError(f"perlin_noise: invalid lattice resolution {res}")
    y = np.arange(h, dtype=np.float32) + np.float32(0.5 - h / 2.0)
    x = np.arange(w, dtype=np.float32) + np.float32(0.5 - w / 2.0)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    if angle_deg:
        a = math.radians(angle_deg)
        c, s = np.float32(math.cos(a)), np.float32(math.sin(a))
        xx, yy = c * xx - s * yy, s * xx + c * yy
    # Lattice coordinates (cells of W/res_x by H/res_y pixels), shifted to start at 0.
    gx = xx * np.float32(rx / w)
    gy = yy * np.float32(ry / h)
    gx -= gx.min()
    gy -= gy.min()
    fgx = np.floor(gx)
    fgy = np.floor(gy)
    fx = gx - fgx  # float32 fractional part
    fy = gy - fgy
    ix = fgx.astype(np.int32)
    iy = fgy.astype(np.int32)
    ny, nx = int(iy.max()) + 2, int(ix.max()) + 2
    theta = rng.uniform(0.0, 2.0 * np.pi, size=ny * nx).astype(np.float32)
    gcos, gsin = np.cos(theta), np.sin(theta)
    base = (iy * nx + ix).astype(np.intp)  # flat lattice index: np.take is ~10x a 2-D gather

    def corner(dy: int, dx: int) -> np.ndarray:
        idx = base + (dy * nx + dx) if (dy or dx) else base
        return np.take(gcos, idx) * (fx - dx) + np.take(gsin, idx) * (fy - dy)

    n00, n10, n01, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    tx, ty = _fade(fx), _fade(fy)
    n0 = n00 + tx * (n10 - n00)
    n1 = n01 + tx * (n11 - n01)
    return (SQRT2 * (n0 + ty * (n1 - n0))).astype(np.float32, copy=False)


def fractal_noise(
    shape: tuple[int, int], rng: np.random.Generator, base_res: int = 2, octaves: int = 4,
    persistence: float = 0.5,
) -> np.ndarray:
    """Sum of Perlin octaves (used by the procedural textures). float32, about [-1, 1]."""
    out = np.zeros(shape, dtype=np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        res = base_res * (2**o)
        out += np.float32(amp) * perlin_noise(shape, (res, res), rng)
        total += amp
        amp *= persistence
    return out / np.float32(total)


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    cfg: SynthesisConfig,
    max_attempts: int = 10,
) -> np.ndarray:
    """Binary Perlin anomaly mask (uint8 ``H x W``, values {0, 1}).

    Per attempt: ``r_y, r_x ~ U{perlin_min_scale..perlin_max_scale}``, angle ~ U(-90, 90),
    ``M = noise > perlin_threshold``. Masks with fewer than ``min_anomaly_pixels`` pixels are
    redrawn, at most ``max_attempts`` times; if every attempt is too small (e.g. coarse lattices
    on a tiny image) the last noise map is thresholded at the quantile that keeps
    ``max(min_anomaly_pixels, 2 % of the image)`` pixels, which is still one smooth Perlin blob.
    The minimum is capped at a quarter of the image so tiny images stay satisfiable.
    """
    h, w = int(shape[0]), int(shape[1])
    n_pix = h * w
    min_pix = max(1, min(int(cfg.min_anomaly_pixels), n_pix // 4))
    lo, hi = int(cfg.perlin_min_scale), int(cfg.perlin_max_scale)
    if hi < lo:
        raise ValueError(f"perlin_max_scale ({hi}) < perlin_min_scale ({lo})")
    noise = None
    for _ in range(max(1, max_attempts)):
        ry = 2 ** int(rng.integers(lo, hi + 1))
        rx = 2 ** int(rng.integers(lo, hi + 1))
        angle = float(rng.uniform(-90.0, 90.0))
        noise = perlin_noise((h, w), (ry, rx), rng, angle)
        mask = noise > np.float32(cfg.perlin_threshold)
        if int(np.count_nonzero(mask)) >= min_pix:
            return mask.astype(np.uint8)
    keep = max(min_pix, int(round(0.02 * n_pix)))
    flat = noise.ravel()
    thr = np.partition(flat, n_pix - keep)[n_pix - keep]
    return (noise >= thr).astype(np.uint8)
