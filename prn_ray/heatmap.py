"""Heat maps over images, shared by the evaluation report and ``predict``: a fixed 0..1 colour
scale (never normalised per image, which would make every normal image look anomalous)."""

from __future__ import annotations

import cv2
import matplotlib
import numpy as np


def coerce_image(img: np.ndarray) -> np.ndarray:
    """Any image array (grey, 16-bit, float 0..1, RGBA) -> H x W x 3 uint8 RGB."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:  # e.g. 16-bit
        a = a.astype(np.float64) * (255.0 / max(int(np.iinfo(a.dtype).max), 1))
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if np.nanmax(a, initial=0.0) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image must be H x W x 3, got {a.shape}")
    return np.ascontiguousarray(a[:, :, :3])


_LUTS: dict[str, np.ndarray] = {}


def lut(cmap: str) -> np.ndarray:
    """256 x 3 uint8 RGB colours of a matplotlib colour map (cached)."""
    if cmap not in _LUTS:
        rgba = matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))
        _LUTS[cmap] = (rgba[:, :3] * 255.0).round().astype(np.uint8)
    return _LUTS[cmap]


def fit(a: np.ndarray, h: int, w: int, interp: int) -> np.ndarray:
    if a.shape[:2] == (h, w):
        return a
    return cv2.resize(a, (w, h), interpolation=interp)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None = None,
            alpha: float = 0.5, cmap: str = "inferno") -> np.ndarray:
    """H x W x 3 uint8: the image with its heat map blended on top (fixed 0..1 scale) and the
    ground-truth outline in white when a mask is given. For ``predict`` and notebooks."""
    img = coerce_image(image)
    h, w = img.shape[:2]
    amap = np.clip(np.nan_to_num(np.asarray(anomaly_map, np.float32).squeeze()), 0.0, 1.0)
    amap = fit(amap, h, w, cv2.INTER_LINEAR)
    heat = lut(cmap)[(amap * 255.0 + 0.5).astype(np.uint8)]
    out = (img.astype(np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if mask is not None and np.asarray(mask).any():
        m = fit((np.asarray(mask) > 0).astype(np.uint8), h, w, cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, round(min(h, w) / 128)),
                         lineType=cv2.LINE_AA)
    return out
