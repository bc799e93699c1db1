"""Extended anomalies (the paper's EA; CPR-style variant): a seen real defect, augmented, pasted
onto a normal image with E = M̄⊙N + (1−β)(M⊙C) + β(M⊙N), β ~ U(0, extended_beta_max).

Per sample (draw order): p = ``extended_color_prob``: 3 colour ops (DRAEM list without rotate) on
the defect image → horizontal / vertical flip (p = 0.5 each) → rotation U(0°, 360°) and scale
U(0.5, 1.5) about the defect centroid (scale shrunk if the defect would not fit the image) →
translation of the centroid to a random point that keeps the whole defect inside the image
(optionally a point on the estimated foreground) → β → blend. Image and mask are transformed
by one affine warp (image bilinear, mask nearest), so the pasted pixels and the returned mask
coincide. Outside the mask the output is the normal image bit-for-bit.

Foreground estimate (``SynthesisConfig.foreground``): CIE-Lab distance of every pixel to the
median border colour, blurred, Otsu-thresholded, then opened/closed. MVTec objects lie on a
fairly uniform background, so this is cheap and adequate; it is used only when it covers
``FOREGROUND_SHARE`` of the image (textures, where "foreground" is meaningless, give noise
coverage outside that range only by chance, hence the option is off by default).
"""

from __future__ import annotations

import cv2
import numpy as np

from prn_ray.synthesis.simulated import Synthesised, blend
from prn_ray.synthesis.textures import COLOUR_OPS, augment_source, resize_to

FOREGROUND_SHARE = (0.05, 0.95)  # use the estimate only when it covers this share of the image
ROTATION_RANGE = (0.0, 360.0)
SCALE_RANGE = (0.5, 1.5)


def estimate_foreground(
    image: np.ndarray, border: int = 2, min_contrast: float = 8.0
) -> np.ndarray:
    """Cheap object-foreground estimate, bool ``H x W`` (all False when the image is uniform).

    Lab distance to the median colour of a ``border``-pixel frame, Gaussian blur, Otsu threshold,
    morphological open + close. ``min_contrast``: below this Lab distance (max over the image)
    nothing is foreground.
    """
    h, w = image.shape[:2]
    b = max(1, min(border, h // 4 or 1, w // 4 or 1))
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    frame = np.concatenate(
        [
            lab[:b].reshape(-1, 3),
            lab[-b:].reshape(-1, 3),
            lab[:, :b].reshape(-1, 3),
            lab[:, -b:].reshape(-1, 3),
        ]
    )
    ref = np.median(frame, axis=0)
    dist = np.sqrt(((lab - ref) ** 2).sum(axis=2))
    k = max(3, (min(h, w) // 64) * 2 + 1)
    dist = cv2.GaussianBlur(dist, (k, k), 0)
    peak = float(dist.max())
    if peak < min_contrast:
        return np.zeros((h, w), dtype=bool)
    d8 = np.clip(dist * (255.0 / peak), 0, 255).astype(np.uint8)
    _, fg = cv2.threshold(d8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    se = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, se)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, se)
    return fg.astype(bool)


def _affine(cx: float, cy: float, angle: float, scale: float) -> np.ndarray:
    return cv2.getRotationMatrix2D((cx, cy), angle, scale)


def _augment_defect(
    c: np.ndarray, m: np.ndarray, rng: np.random.Generator, color_prob: float
) -> tuple[np.ndarray, np.ndarray]:
    """Colour ops (with probability ``color_prob``), then horizontal and vertical flips."""
    if rng.random() < color_prob:
        c = augment_source(c, rng, n_ops=3, ops=COLOUR_OPS)
    if rng.random() < 0.5:
        c, m = c[:, ::-1], m[:, ::-1]
    if rng.random() < 0.5:
        c, m = c[::-1], m[::-1]
    return np.ascontiguousarray(c), np.ascontiguousarray(m)


_Range = tuple[float, float]  # (low, high)
_Point = tuple[float, float]  # (x, y)


def _fit_in_image(
    m: np.ndarray, angle: float, scale: float, h: int, w: int
) -> tuple[_Point, float, _Range, _Range]:
    """(defect centroid, scale shrunk so the defect fits, x and y ranges for the centroid)."""
    ys, xs = np.nonzero(m)
    cx, cy = float(xs.mean()), float(ys.mean())
    pts = np.stack([xs.astype(np.float64), ys.astype(np.float64), np.ones(xs.size)])

    def bbox(s: float) -> tuple[float, float, float, float]:
        t = _affine(cx, cy, angle, s) @ pts
        return float(t[0].min()), float(t[0].max()), float(t[1].min()), float(t[1].max())

    x0, x1, y0, y1 = bbox(scale)
    span = max((x1 - x0 + 1) / w, (y1 - y0 + 1) / h)
    if span > 1.0:  # would not fit: shrink (bbox extent is linear in the scale)
        scale *= 0.98 / span
        x0, x1, y0, y1 = bbox(scale)
    # Allowed range for the centroid so that the transformed bbox stays inside [0, W-1] x [0, H-1].
    tx_lo, tx_hi = cx - x0, (w - 1) - (x1 - cx)
    ty_lo, ty_hi = cy - y0, (h - 1) - (y1 - cy)
    if tx_hi < tx_lo:
        tx_lo = tx_hi = (tx_lo + tx_hi) / 2.0
    if ty_hi < ty_lo:
        ty_lo = ty_hi = (ty_lo + ty_hi) / 2.0
    return (cx, cy), scale, (tx_lo, tx_hi), (ty_lo, ty_hi)


def _foreground_target(
    normal: np.ndarray, rng: np.random.Generator, tx: _Range, ty: _Range
) -> _Point | None:
    """A foreground pixel inside the allowed centroid ranges; ``None`` when the estimate is
    unusable or no such pixel exists (no random draw then)."""
    fg = estimate_foreground(normal)
    share = float(fg.mean())
    if not FOREGROUND_SHARE[0] <= share <= FOREGROUND_SHARE[1]:
        return None
    fy, fx = np.nonzero(fg)
    ok = (fx >= tx[0]) & (fx <= tx[1]) & (fy >= ty[0]) & (fy <= ty[1])
    if not ok.any():
        return None
    i = int(rng.choice(np.flatnonzero(ok)))
    return float(fx[i]), float(fy[i])


def _target(
    normal: np.ndarray, rng: np.random.Generator, foreground: bool, tx: _Range, ty: _Range
) -> _Point:
    """Where the defect centroid goes: on the foreground when asked and possible, else uniform."""
    target = _foreground_target(normal, rng, tx, ty) if foreground else None
    if target is None:
        target = (float(rng.uniform(*tx)), float(rng.uniform(*ty)))
    return target


def _warp_defect(c: np.ndarray, m: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image (bilinear) and mask (nearest) through one affine warp, so they coincide."""
    h, w = m.shape[:2]
    cw = cv2.warpAffine(c, a, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    mw = cv2.warpAffine(
        m, a, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    mw = (mw > 0).astype(np.uint8)
    if not mw.any():  # degenerate (a 1-pixel defect lost to rounding): paste it untransformed
        mw, cw = m, c
    return cw, mw


def extended_anomaly(
    normal: np.ndarray,
    defect_image: np.ndarray,
    defect_mask: np.ndarray,
    rng: np.random.Generator,
    beta_max: float = 0.5,
    color_prob: float = 0.5,
    foreground: bool = False,
) -> Synthesised | None:
    """Paste an augmented seen defect onto ``normal``; ``None`` when the defect mask is empty.

    ``defect_image`` / ``defect_mask`` are resized to the normal image's size when they differ.
    """
    h, w = normal.shape[:2]
    defect_image = resize_to(np.ascontiguousarray(defect_image), h, w)
    m = resize_to(np.ascontiguousarray((defect_mask > 0).astype(np.uint8)), h, w, nearest=True)
    if not m.any():
        return None
    c, m = _augment_defect(defect_image, m, rng, color_prob)
    angle = float(rng.uniform(*ROTATION_RANGE))
    scale = float(rng.uniform(*SCALE_RANGE))
    (cx, cy), scale, tx, ty = _fit_in_image(m, angle, scale, h, w)
    target = _target(normal, rng, foreground, tx, ty)
    a = _affine(cx, cy, angle, scale)
    a[0, 2] += target[0] - cx
    a[1, 2] += target[1] - cy
    cw, mw = _warp_defect(c, m, a)
    beta = float(rng.uniform(0.0, beta_max)) if beta_max > 0 else 0.0
    return Synthesised(blend(normal, cw, mw, beta), mw, beta, "extended", normal)
