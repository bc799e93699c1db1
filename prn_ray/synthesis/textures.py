"""Texture bank for simulated anomalies and the DRAEM-style source augmentation (DRAEM).

Texture sources, in the order they fill the bank (``load_texture_bank``):

1. user images under ``SynthesisConfig.texture_uri`` (e.g. DTD copied to storage), read through
   :mod:`prn_ray.storage` and decoded with ``cv2.imdecode``; undecodable files are skipped;
2. scikit-image's *bundled* sample files (brick, grass, gravel textures and CC0 / public-domain
   photos), only the files present in the installed package: ``skimage.data`` fetchers are never
   called, so nothing is downloaded;
3. seeded procedural textures (fractal noise, stripes, checkers, marble, coloured noise, cells)
   to fill the bank up to ``max_items``.

All images are uint8 RGB, ``size x size``. The augmentation (:func:`augment_source`) draws 3 ops
without replacement from DRAEM's list, implemented in numpy / OpenCV (no imgaug / PIL).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from prn_ray.config import StorageConfig, SynthesisConfig
from prn_ray.synthesis.perlin import fractal_noise

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Bundled scikit-image files usable as foreign textures (gray ones are replicated to RGB).
# Excluded: binary/mostly-flat images (horse, logo, phantom, chessboard, text, clock_motion).
SKIMAGE_FILES = (
    "brick.png",
    "grass.png",
    "gravel.png",
    "astronaut.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "color.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
)


# ----------------------------------------------------------------------------- helpers


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Any decoded array (gray, BGR(A) already converted, 16-bit, float) -> uint8 H x W x 3."""
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img.astype(np.float32), 0, 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def without_color_profile(data: bytes) -> bytes:
    """PNG bytes without their ``iCCP`` chunk (other formats unchanged). OpenCV ignores colour
    profiles, so the pixels are the same; libpng, though, prints a warning for a malformed one
    (scikit-image's bundled page.png has one) on every decode."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    out, pos = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length  # length, type, data, CRC
        if data[pos + 4:pos + 8] != b"iCCP":
            out.append(data[pos:end])
        pos = end
    return b"".join(out)


def decode_rgb(data: bytes) -> np.ndarray | None:
    """Encoded bytes -> uint8 RGB, or ``None`` when OpenCV cannot decode them."""
    arr = np.frombuffer(without_color_profile(data), dtype=np.uint8)
    img = cv2.imdecode(arr, cv2.IMREAD_COLOR)  # 8-bit BGR; drops alpha, converts gray / 16-bit
    if img is None or img.size == 0:
        return None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize_to(img: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
    if img.shape[0] == height and img.shape[1] == width:
        return img
    if nearest:
        interp = cv2.INTER_NEAREST
    elif img.shape[0] >= height and img.shape[1] >= width:
        interp = cv2.INTER_AREA
    else:
        interp = cv2.INTER_LINEAR
    return cv2.resize(img, (width, height), interpolation=interp)


def random_square_crop(
    img: np.ndarray, size: int, rng: np.random.Generator, min_frac: float = 0.5
) -> np.ndarray:
    """A random square crop (side U(min_frac, 1) x the short side) resized to ``size``."""
    h, w = img.shape[:2]
    side = max(1, int(round(min(h, w) * rng.uniform(min_frac, 1.0))))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    return resize_to(img[y0 : y0 + side, x0 : x0 + side], size, size)


# ----------------------------------------------------------------------------- procedural


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=(n, 3)).astype(np.float32)


def _colourise(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map a [0, 1] field onto a gradient between two random colours."""
    c0, c1 = _colours(rng, 2)
    return t[..., None] * c1 + (1.0 - t[..., None]) * c0


def _normalise(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo + 1e-6)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32)
    return np.meshgrid(c, c, indexing="ij")


def tex_fractal(size: int, rng: np.random.Generator) -> np.ndarray:
    t = _normalise(fractal_noise((size, size), rng, base_res=int(rng.integers(1, 5)),
                                 octaves=int(rng.integers(3, 6))))
    return _colourise(t, rng)


def tex_stripes(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid(size)
    a = rng.uniform(0, np.pi)
    period = rng.uniform(4.0, size / 4.0)
    phase = (np.cos(a) * xx + np.sin(a) * yy) * np.float32(2 * np.pi / period)
    t = 0.5 + 0.5 * np.sin(phase)
    if rng.random() < 0.5:
        t = (t > rng.uniform(0.3, 0.7)).astype(np.float32)  # hard stripes
    return _colourise(t.astype(np.float32), rng)


def tex_checkers(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid(size)
    a = rng.uniform(0, np.pi / 2)
    cell = rng.uniform(4.0, size / 4.0)
    u = (np.cos(a) * xx + np.sin(a) * yy) / cell
    v = (-np.sin(a) * xx + np.cos(a) * yy) / cell
    t = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    return _colourise(t, rng)


def tex_marble(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid(size)
    a = rng.uniform(0, np.pi)
    freq = rng.uniform(2.0, 10.0) * 2 * np.pi / size
    turb = fractal_noise((size, size), rng, base_res=2, octaves=4)
    t = 0.5 + 0.5 * np.sin((np.cos(a) * xx + np.sin(a) * yy) * np.float32(freq)
                           + turb * np.float32(rng.uniform(3.0, 10.0)))
    return _colourise(t.astype(np.float32) ** np.float32(rng.uniform(0.3, 2.0)), rng)


def tex_colour_noise(size: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal((size, size, 3)).astype(np.float32)
    sigma = float(rng.uniform(0.5, 4.0))
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    noise = (noise - noise.mean()) / (noise.std() + 1e-6)
    mean = _colours(rng, 1)[0]
    return mean + noise * np.float32(rng.uniform(0.1, 0.35))


def tex_cells(size: int, rng: np.random.Generator) -> np.ndarray:
    """Voronoi-like cells: nearest of a few random seeds, each with its own colour."""
    n = int(rng.integers(6, 40))
    pts = rng.uniform(0, size, size=(n, 2)).astype(np.float32)
    small = max(8, size // 4)  # nearest-seed search at low resolution, then upscale
    c = (np.arange(small, dtype=np.float32) + 0.5) * np.float32(size / small)
    d = (c[:, None, None] - pts[None, None, :, 0]) ** 2 + (
        c[None, :, None] - pts[None, None, :, 1]
    ) ** 2
    label = np.argmin(d, axis=2)
    cols = _colours(rng, n)
    img = cols[label]
    edges = (np.sort(d, axis=2)[..., 1] - d.min(axis=2)) < np.float32((size / small) ** 2 * 4)
    img[edges] *= np.float32(0.3)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_NEAREST)


PROCEDURAL: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "fractal": tex_fractal,
    "stripes": tex_stripes,
    "checkers": tex_checkers,
    "marble": tex_marble,
    "colour_noise": tex_colour_noise,
    "cells": tex_cells,
}


def procedural_texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    img = PROCEDURAL[kind](size, rng)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def procedural_textures(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    kinds = list(PROCEDURAL)
    return [procedural_texture(kinds[i % len(kinds)], size, rng) for i in range(n)]


# ----------------------------------------------------------------------------- file sources


def skimage_data_dir() -> str | None:
    """Folder of scikit-image's bundled sample files, or ``None`` without scikit-image."""
    try:
        import skimage.data  # noqa: PLC0415 (optional dependency)
    except Exception:  # pragma: no cover - scikit-image is installed in this project
        return None
    return os.path.dirname(os.path.abspath(skimage.data.__file__))


def skimage_textures(size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random square crops of the bundled scikit-image files that exist (no downloads)."""
    folder = skimage_data_dir()
    if folder is None:
        return []
    out = []
    for name in SKIMAGE_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            img = decode_rgb(f.read())
        if img is None:
            continue
        out.append(random_square_crop(img, size, rng))
    return out


def user_textures(
    uri: str,
    size: int,
    rng: np.random.Generator,
    limit: int,
    storage_cfg: StorageConfig | None = None,
) -> list[np.ndarray]:
    """Up to ``limit`` images under ``uri`` (seeded subsample), as ``size x size`` RGB crops."""
    from prn_ray import storage  # noqa: PLC0415 (keeps pyarrow out of light imports)

    files = storage.list_files(uri, storage_cfg, recursive=True, extensions=IMAGE_EXTENSIONS)
    if not files:
        log.warning("texture_uri %s holds no images; using built-in textures", storage.redact(uri))
        return []
    order = rng.permutation(len(files))
    out: list[np.ndarray] = []
    for i in order:
        if len(out) >= limit:
            break
        try:
            img = decode_rgb(storage.read_bytes(files[i], storage_cfg))
        except Exception as exc:  # unreadable object: skip, keep going
            log.warning("texture %s unreadable: %s", storage.redact(files[i]), exc)
            continue
        if img is None or min(img.shape[:2]) < 8:
            log.warning("texture %s is not a decodable image; skipped", storage.redact(files[i]))
            continue
        out.append(random_square_crop(img, size, rng, min_frac=0.7))
    return out


def load_texture_bank(
    cfg: SynthesisConfig,
    size: int,
    storage_cfg: StorageConfig | None = None,
    max_items: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """``T x size x size x 3`` uint8 texture bank, deterministic for a given ``seed``.

    User textures (``cfg.texture_uri``) come first, then the bundled scikit-image files, then
    procedural textures up to ``max_items`` (at least one procedural texture of each kind when
    there is room, so the bank is never empty).
    """
    if size <= 0 or max_items <= 0:
        raise ValueError("load_texture_bank: size and max_items must be positive")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x7E47])))
    bank: list[np.ndarray] = []
    if cfg.texture_uri:
        bank += user_textures(cfg.texture_uri, size, rng, max_items, storage_cfg)
    if len(bank) < max_items:
        bank += skimage_textures(size, rng)[: max_items - len(bank)]
    if len(bank) < max_items:
        bank += procedural_textures(max_items - len(bank), size, rng)
    return np.stack(bank[:max_items]).astype(np.uint8, copy=False)


# ----------------------------------------------------------------------------- augmentation
# Each op: (uint8 H x W x 3 RGB, rng) -> uint8 H x W x 3 RGB.


def _lut_apply(img: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """Per-channel lookup tables (3 x 256 uint8)."""
    return cv2.LUT(np.ascontiguousarray(img), np.ascontiguousarray(luts.T.reshape(256, 1, 3)))


def op_gamma(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma contrast, gamma ~ U(0.5, 2) per channel."""
    g = rng.uniform(0.5, 2.0, size=3)
    x = np.arange(256, dtype=np.float64) / 255.0
    luts = np.clip(np.round(255.0 * x[None, :] ** g[:, None]), 0, 255).astype(np.uint8)
    return _lut_apply(img, luts)


def op_brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multiply by U(0.8, 1.2) and add U(-30, 30)."""
    m, a = rng.uniform(0.8, 1.2), rng.uniform(-30.0, 30.0)
    lut = np.clip(np.round(np.arange(256) * m + a), 0, 255).astype(np.uint8)
    return cv2.LUT(img, lut)


def op_sharpness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL ``ImageEnhance.Sharpness`` with factor U(0, 2): blend with PIL's smooth filter."""
    f = np.float32(rng.uniform(0.0, 2.0))
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
    x = img.astype(np.float32)
    smooth = cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REPLICATE)
    return np.clip(smooth + f * (x - smooth) + 0.5, 0, 255).astype(np.uint8)


def op_hue_saturation(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add U(-50, 50) to hue and, independently, to saturation (imgaug's 0-255 hue scale)."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # H in [0, 180)
    dh = int(round(rng.uniform(-50, 50) * 180.0 / 255.0))
    ds = int(round(rng.uniform(-50, 50)))
    lut_h = ((np.arange(256) + dh) % 180).astype(np.uint8)
    lut_s = np.clip(np.arange(256) + ds, 0, 255).astype(np.uint8)
    hsv[..., 0] = lut_h[hsv[..., 0]]
    hsv[..., 1] = lut_s[hsv[..., 1]]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def op_solarize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """With p=0.5, invert pixels above a threshold U(32, 128) (imgaug ``Solarize(0.5, ...)``)."""
    thr = rng.uniform(32.0, 128.0)
    if rng.random() >= 0.5:
        return img
    x = np.arange(256)
    lut = np.where(x >= thr, 255 - x, x).astype(np.uint8)
    return cv2.LUT(img, lut)


def op_posterize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep 2-7 of the 8 bits per channel."""
    bits = int(rng.integers(2, 8))
    mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
    return img & mask


def op_invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - img


def op_autocontrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stretch each channel's min..max onto 0..255 (PIL autocontrast, cutoff 0)."""
    ext = [cv2.minMaxLoc(np.ascontiguousarray(img[..., c]))[:2] for c in range(3)]
    lo = np.array([e[0] for e in ext], np.float32)
    hi = np.array([e[1] for e in ext], np.float32)
    scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1e-6), 1.0)
    offset = np.where(hi > lo, lo, 0.0)
    x = np.arange(256, dtype=np.float32)
    luts = np.clip(np.round((x[None, :] - offset[:, None]) * scale[:, None]), 0, 255)
    return _lut_apply(img, luts.astype(np.uint8))


def op_equalize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(img)
    for c in range(3):
        out[..., c] = cv2.equalizeHist(np.ascontiguousarray(img[..., c]))
    return out


def op_rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Affine rotate by U(-45, 45) degrees. Reflected borders (DRAEM fills black corners, which
    would paste black wedges into the anomaly)."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), float(rng.uniform(-45.0, 45.0)), 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


AUGMENTATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "gamma": op_gamma,
    "brightness": op_brightness,
    "sharpness": op_sharpness,
    "hue_saturation": op_hue_saturation,
    "solarize": op_solarize,
    "posterize": op_posterize,
    "invert": op_invert,
    "autocontrast": op_autocontrast,
    "equalize": op_equalize,
    "rotate": op_rotate,
}
COLOUR_OPS: tuple[str, ...] = tuple(k for k in AUGMENTATIONS if k != "rotate")


def augment_source(
    img: np.ndarray, rng: np.random.Generator, n_ops: int = 3, ops: Sequence[str] | None = None
) -> np.ndarray:
    """DRAEM source augmentation: ``n_ops`` ops drawn without replacement from ``ops``
    (default: all ten), applied in the drawn order. uint8 RGB in and out."""
    names = list(ops) if ops is not None else list(AUGMENTATIONS)
    k = min(n_ops, len(names))
    picks = rng.choice(len(names), size=k, replace=False)
    out = np.ascontiguousarray(img)
    for i in picks:
        out = AUGMENTATIONS[names[int(i)]](out, rng)
    return out


def ensure_bank_size(textures: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize every texture of a bank to ``height x width`` (no-op when it already fits)."""
    if textures.shape[1] == height and textures.shape[2] == width:
        return textures
    return np.stack([resize_to(t, height, width) for t in textures])


__all__ = [
    "AUGMENTATIONS",
    "COLOUR_OPS",
    "PROCEDURAL",
    "augment_source",
    "decode_rgb",
    "ensure_bank_size",
    "load_texture_bank",
    "procedural_texture",
    "procedural_textures",
    "skimage_textures",
    "to_rgb_uint8",
    "user_textures",
]
