"""A procedural multi-product inspection dataset in MVTec AD layout (demo and test data).

``make_dataset(root)`` writes, for each product::

    <root>/<product>/train/good/000.png ...            normal training images
    <root>/<product>/test/good/000.png ...             normal test images
    <root>/<product>/test/<defect>/000.png ...         defective test images
    <root>/<product>/ground_truth/<defect>/000_mask.png  pixel-accurate masks (0/255)

Products: ``fabric`` (woven cloth), ``wood_panel`` (wood grain), ``metal_plate`` (brushed metal,
written as 1-channel greyscale PNG like MVTec's grey classes) and ``bottle_cap`` (a ridged round
cap on a conveyor; defects only on the cap). Every image varies in lighting (gain and gradient),
position (phase shifts, small rotations, object offsets) and sensor noise.

Defects: ``scratch`` (thin bright or dark polylines), ``dent`` (shaded ellipses), ``stain``
(low-contrast colour blobs), ``crack`` (branching dark lines). The defect is drawn into its mask
first and the image is changed only where the mask is set (no anti-aliasing), so masks are
pixel-accurate. Each image is generated from its own RNG seeded by (seed, product, role, index):
the dataset is deterministic and an image does not change when other counts change.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from prn_ray import storage
from prn_ray.config import StorageConfig
from prn_ray.images import encode_png

PRODUCTS = ("fabric", "wood_panel", "metal_plate", "bottle_cap")
DEFECTS = ("scratch", "dent", "stain", "crack")

# ----------------------------------------------------------------------------- helpers


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random lattice upsampled bicubically."""
    cells = max(2, int(cells))
    lattice = rng.random((cells + 1, cells + 1), dtype=np.float32)
    out = cv2.resize(lattice, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(out, 0.0, 1.0)


def _fbm(rng: np.random.Generator, size: int, base: int = 4, octaves: int = 4) -> np.ndarray:
    total = np.zeros((size, size), np.float32)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total += amp * _noise(rng, size, base * 2**o)
        norm += amp
        amp *= 0.5
    return total / norm


def _coords(size: int, angle_deg: float, shift: tuple[float, float]) -> tuple[np.ndarray, ...]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    x = x - size / 2 + shift[0]
    y = y - size / 2 + shift[1]
    a = math.radians(angle_deg)
    tx = x * math.cos(a) + y * math.sin(a)
    ty = -x * math.sin(a) + y * math.cos(a)
    return tx, ty


def _lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multiplicative illumination: global gain times a gentle linear gradient."""
    gain = rng.uniform(0.88, 1.12)
    a = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0.0, 0.10)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    return (gain * (1.0 + amp * (x * math.cos(a) + y * math.sin(a)))).astype(np.float32)


# ----------------------------------------------------------------------------- products
# Each returns (image float32 HxWxC in 0..255 with C in {1, 3}, region mask bool HxW).


def _fabric(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    period = size / rng.uniform(14, 17)
    tx, ty = _coords(size, rng.uniform(-4, 4), tuple(rng.uniform(0, period, 2)))
    cx, cy = np.floor(tx / period), np.floor(ty / period)
    parity = (cx + cy) % 2 == 0
    fx, fy = (tx / period) % 1.0, (ty / period) % 1.0
    warp = 0.55 + 0.45 * np.sin(np.pi * fx)  # thread cross-section shading
    weft = 0.55 + 0.45 * np.sin(np.pi * fy)
    shade = np.where(parity, warp, weft)
    fibres = _noise(rng, size, size // 3)
    value = shade * (0.85 + 0.3 * fibres) * (0.9 + 0.2 * _fbm(rng, size, 3, 2))
    colour = np.array([70, 95, 150], np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    img = value[..., None] * colour[None, None, :] * 1.25
    return img, np.ones((size, size), bool)


def _wood(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    tx, ty = _coords(size, rng.uniform(-5, 5), tuple(rng.uniform(-size / 4, size / 4, 2)))
    warp = (_fbm(rng, size, 2, 3) - 0.5) * size * 0.25
    period = size / rng.uniform(7, 10)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (ty + warp) / period)
    rings = rings**3
    streak = cv2.resize(
        rng.random((size, max(2, size // 16)), dtype=np.float32),
        (size, size),
        interpolation=cv2.INTER_LINEAR,
    )
    t = np.clip(0.75 * rings + 0.25 * streak, 0, 1)[..., None]
    light = np.array([205, 160, 110], np.float32)
    dark = np.array([130, 82, 45], np.float32)
    img = light * (1 - t) + dark * t
    return img.astype(np.float32), np.ones((size, size), bool)


def _metal(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    rows = rng.normal(0, 1, (size, max(2, size // 24))).astype(np.float32)
    streaks = cv2.resize(rows, (size, size), interpolation=cv2.INTER_LINEAR)
    streaks = cv2.blur(streaks, (9, 1))
    y = np.linspace(-1, 1, size, dtype=np.float32)[:, None]
    band_pos = rng.uniform(-0.4, 0.4)
    specular = 25 * np.exp(-((y - band_pos) ** 2) / 0.15)
    img = 150 + 9 * streaks + specular + 10 * (_fbm(rng, size, 2, 2) - 0.5)
    return img[..., None].astype(np.float32), np.ones((size, size), bool)


def _bottle_cap(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    bg = 55 + 20 * _fbm(rng, size, 4, 3)
    img = np.repeat(bg[..., None], 3, axis=2)
    cx = size / 2 + rng.uniform(-0.04, 0.04) * size
    cy = size / 2 + rng.uniform(-0.04, 0.04) * size
    radius = size * rng.uniform(0.31, 0.34)
    dx, dy = x - cx, y - cy
    r = np.sqrt(dx**2 + dy**2) / radius
    phi = np.arctan2(dy, dx) + rng.uniform(0, 2 * np.pi)
    cap = r < 1.0
    shading = 1.0 - 0.25 * r**2 - 0.12 * (dx + dy) / (radius * 2)
    ridges = np.where(r > 0.82, 0.85 + 0.15 * np.sign(np.sin(24 * phi)), 1.0)
    logo = np.where(np.abs(r - 0.45) < 0.04, 0.8, 1.0)
    colour = np.array([185, 40, 35], np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    cap_img = (shading * ridges * logo)[..., None] * colour[None, None, :]
    shadow = np.clip((r - 1.0) / 0.15, 0, 1)[..., None] * 0.4 + 0.6
    img = np.where(cap[..., None], cap_img, img * np.where(r[..., None] < 1.15, shadow, 1.0))
    region = r < 0.95
    return img.astype(np.float32), region


_PRODUCT_FNS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]] = {
    "fabric": _fabric,
    "wood_panel": _wood,
    "metal_plate": _metal,
    "bottle_cap": _bottle_cap,
}

# ----------------------------------------------------------------------------- defects


def _point_in(rng: np.random.Generator, region: np.ndarray, margin: float) -> tuple[int, int]:
    size = region.shape[0]
    m = int(margin * size)
    for _ in range(100):
        x, y = rng.integers(m, size - m, 2)
        if region[y, x]:
            return int(x), int(y)
    ys, xs = np.nonzero(region)
    i = rng.integers(len(xs))
    return int(xs[i]), int(ys[i])


def _scratch(rng, img, region):
    size = img.shape[0]
    mask = np.zeros((size, size), np.uint8)
    x, y = _point_in(rng, region, 0.2)
    pts = [(x, y)]
    ang = rng.uniform(0, 2 * np.pi)
    for _ in range(rng.integers(2, 5)):
        ang += rng.uniform(-0.5, 0.5)
        step = rng.uniform(0.08, 0.16) * size
        x, y = x + step * math.cos(ang), y + step * math.sin(ang)
        pts.append((x, y))
    thickness = 1 if size <= 96 else int(rng.integers(1, 3))
    cv2.polylines(mask, [np.round(pts).astype(np.int32)], False, 1, thickness, cv2.LINE_8)
    m = (mask > 0) & region
    delta = rng.uniform(70, 100) * (1 if rng.random() < 0.5 else -1)
    img[m] = img[m] + delta
    return m


def _dent(rng, img, region):
    size = img.shape[0]
    mask = np.zeros((size, size), np.uint8)
    cx, cy = _point_in(rng, region, 0.15)
    ax = max(2, int(rng.uniform(0.05, 0.10) * size))
    ay = max(2, int(ax * rng.uniform(0.6, 1.0)))
    rot = rng.uniform(0, 180)
    cv2.ellipse(mask, (cx, cy), (ax, ay), rot, 0, 360, 1, -1, cv2.LINE_8)
    m = (mask > 0) & region
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    grad = ((x - cx) * math.cos(a) + (y - cy) * math.sin(a)) / ax  # -1..1 across the dent
    shade = -25 + 55 * grad
    img[m] = img[m] + shade[m][:, None]
    return m


def _stain(rng, img, region):
    size = img.shape[0]
    cx, cy = _point_in(rng, region, 0.15)
    rad = rng.uniform(0.08, 0.15) * size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    env = 1.0 - np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / rad
    blob = env + 0.9 * (_fbm(rng, size, 8, 2) - 0.5)
    m = (blob > 0.15) & region
    if img.shape[2] == 3:
        tint = np.array([60, 45, 10], np.float32) * rng.uniform(0.8, 1.2)
        tint = tint if rng.random() < 0.5 else tint[::-1].copy()
    else:
        tint = np.array([rng.uniform(35, 50) * (1 if rng.random() < 0.5 else -1)], np.float32)
    alpha = 0.55
    img[m] = img[m] * (1 - alpha) + (img[m] + tint) * alpha
    return m


def _crack(rng, img, region):
    size = img.shape[0]
    mask = np.zeros((size, size), np.uint8)
    thickness = 1 if size <= 96 else int(rng.integers(1, 3))

    def walk(x, y, ang, steps):
        pts = [(x, y)]
        for _ in range(steps):
            ang += rng.uniform(-0.6, 0.6)
            step = rng.uniform(0.02, 0.04) * size
            x, y = x + step * math.cos(ang), y + step * math.sin(ang)
            pts.append((x, y))
        cv2.polylines(mask, [np.round(pts).astype(np.int32)], False, 1, thickness, cv2.LINE_8)
        return pts

    x, y = _point_in(rng, region, 0.2)
    main = walk(x, y, rng.uniform(0, 2 * np.pi), int(rng.integers(8, 14)))
    for _ in range(int(rng.integers(1, 3))):
        bx, by = main[int(rng.integers(1, len(main)))]
        walk(bx, by, rng.uniform(0, 2 * np.pi), int(rng.integers(3, 7)))
    m = (mask > 0) & region
    img[m] = img[m] * 0.3
    return m


_DEFECT_FNS = {"scratch": _scratch, "dent": _dent, "stain": _stain, "crack": _crack}

# ----------------------------------------------------------------------------- generation


def _rng(seed: int, product: str, role: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(product.encode()), role, index])


def render(
    product: str, size: int, seed: int, role: int, index: int, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """One image (uint8 H x W x 3, or H x W for greyscale products) and its {0,1} mask."""
    rng = _rng(seed, product, role, index)
    img, region = _PRODUCT_FNS[product](rng, size)
    img = img * _lighting(rng, size)[..., None]
    mask = None
    if defect is not None:
        min_px = max(6, int(0.0015 * size * size))
        for _ in range(20):
            trial = img.copy()
            m = _DEFECT_FNS[defect](rng, trial, region)
            if m.sum() >= min_px:
                break
        img, mask = trial, m.astype(np.uint8)
    img = img + rng.normal(0, 2.5, img.shape).astype(np.float32)
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if out.shape[2] == 1:
        out = out[:, :, 0]
    return out, mask


def _check_dataset_args(
    products: Sequence[str], defects: Sequence[str], image_size: int, n_defect_test: int
) -> None:
    unknown = [p for p in products if p not in _PRODUCT_FNS]
    if unknown:
        raise ValueError(f"unknown demo product(s) {unknown}; available: {list(_PRODUCT_FNS)}")
    bad = [d for d in defects if d not in _DEFECT_FNS]
    if bad:
        raise ValueError(f"unknown defect type(s) {bad}; available: {list(_DEFECT_FNS)}")
    if image_size < 16:
        raise ValueError("image_size must be at least 16")
    if n_defect_test > 0 and not defects:
        raise ValueError("n_defect_test > 0 needs at least one defect type")


def _product_jobs(
    root_uri: str,
    product: str,
    n_train: int,
    n_good_test: int,
    n_defect_test: int,
    defects: Sequence[str],
) -> tuple[list[tuple], dict[str, int]]:
    """One product's render jobs ``(product, role, index, defect, uri)`` and its defect counts."""
    base = storage.join(root_uri, product)
    jobs: list[tuple] = []
    for i in range(n_train):
        jobs.append((product, 0, i, None, storage.join(base, "train/good", f"{i:03d}.png")))
    for i in range(n_good_test):
        jobs.append((product, 1, i, None, storage.join(base, "test/good", f"{i:03d}.png")))
    per_defect: dict[str, int] = {d: 0 for d in defects}
    for k in range(n_defect_test):
        d = defects[k % len(defects)]
        j = per_defect[d]
        per_defect[d] += 1
        jobs.append((product, 2 + list(_DEFECT_FNS).index(d), j, d,
                     storage.join(base, "test", d, f"{j:03d}.png")))
    return jobs, per_defect


def _write_job(
    job: tuple, root_uri: str, image_size: int, seed: int, storage_cfg: StorageConfig | None
) -> int:
    """Render and write one image (and its mask); returns the number of masks written."""
    product, role, index, defect, uri = job
    img, mask = render(product, image_size, seed, role, index, defect)
    storage.write_bytes(uri, encode_png(img), storage_cfg)
    if mask is not None:
        mask_uri = storage.join(
            root_uri, product, "ground_truth", defect, f"{index:03d}_mask.png"
        )
        storage.write_bytes(mask_uri, encode_png(mask * 255), storage_cfg)
        return 1
    return 0


def make_dataset(
    root_uri: str,
    storage_cfg: StorageConfig | None = None,
    *,
    products: Sequence[str] = PRODUCTS,
    n_train: int = 40,
    n_good_test: int = 10,
    n_defect_test: int = 12,
    image_size: int = 128,
    seed: int = 0,
    defects: Sequence[str] = DEFECTS,
    threads: int = 8,
) -> dict:
    """Write the dataset under ``root_uri`` (local path or ``s3://``) and return a summary.

    Defective test images cycle through ``defects`` (12 images, 4 defects -> 3 of each).
    """
    _check_dataset_args(products, defects, image_size, n_defect_test)
    t0 = time.perf_counter()
    jobs: list[tuple] = []
    summary: dict = {
        "root": root_uri,
        "image_size": image_size,
        "seed": seed,
        "defects": list(defects),
        "products": {},
    }
    for product in products:
        product_jobs, per_defect = _product_jobs(
            root_uri, product, n_train, n_good_test, n_defect_test, defects
        )
        jobs += product_jobs
        summary["products"][product] = {
            "train": n_train,
            "test_good": n_good_test,
            "test_defect": {d: c for d, c in per_defect.items() if c},
        }

    def work(job: tuple) -> int:
        return _write_job(job, root_uri, image_size, seed, storage_cfg)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        n_masks = sum(pool.map(work, jobs))
    summary["n_images"] = len(jobs)
    summary["n_masks"] = n_masks
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
