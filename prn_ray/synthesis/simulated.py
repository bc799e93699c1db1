"""Simulated anomalies (DRAEM-style, as PRN uses them): S = M̄⊙N + (1−β)(M⊙A) + β(M⊙N).

N (the normal image) and A (the anomaly source) are blended on the same [0, 1] float32 scale
(a trap of github.com/xcyao00/PRNet: it divides only A by 255, so the "anomaly" is a darkened copy of
N; here the source really shows inside the mask). Outside the mask the output is the input
bit-for-bit (it is copied, not recomputed).

Order of random draws for one sample (all from the sample's own generator):
rotate N? (p = ``rotate_normal_prob``, angle U(-90°, 90°)) → source kind (``source_weights``,
renormalised over the available sources) → source image A → Perlin mask M →
β ~ U(0, beta_max).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np

from prn_ray.config import SynthesisConfig
from prn_ray.synthesis.homologous import heterologous_source, homologous_source
from prn_ray.synthesis.perlin import perlin_mask
from prn_ray.synthesis.textures import augment_source, resize_to

SOURCES: tuple[str, ...] = ("texture", "homologous", "heterologous")


@dataclass
class Synthesised:
    """One synthesised sample. ``base`` is N as blended (after the optional rotation), so
    ``image == base`` wherever ``mask == 0``."""

    image: np.ndarray  # uint8 H x W x 3
    mask: np.ndarray  # uint8 H x W, {0, 1}
    beta: float
    source: str  # texture | homologous | heterologous | extended
    base: np.ndarray  # uint8 H x W x 3


def source_probabilities(weights: Mapping[str, float], available: Mapping[str, bool]) -> np.ndarray:
    """Probabilities over :data:`SOURCES`: ``weights`` restricted to the available sources and
    renormalised. Raises when no available source has a positive weight."""
    unknown = sorted(set(weights) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown synthesis source(s) {unknown}; valid: {list(SOURCES)}")
    w = np.array(
        [max(0.0, float(weights.get(s, 0.0))) if available.get(s, False) else 0.0 for s in SOURCES],
        dtype=np.float64,
    )
    if not np.isfinite(w).all() or w.sum() <= 0:
        avail = [s for s in SOURCES if available.get(s, False)]
        raise ValueError(
            f"source_weights {dict(weights)} give no positive weight to an available source "
            f"(available: {avail})"
        )
    return w / w.sum()


def rotate_image(img: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate about the centre, zero-filled corners (as DRAEM's imgaug ``Affine(rotate=...)``)."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), float(angle_deg), 1.0)
    return cv2.warpAffine(
        img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def blend(normal: np.ndarray, source: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """``M̄⊙N + (1−β)(M⊙A) + β(M⊙N)`` with N and A both scaled to [0, 1] (float32).

    Only the pixels under the mask are computed; the rest is a copy of ``normal``.
    """
    if normal.shape != source.shape:
        raise ValueError(f"blend: normal {normal.shape} and source {source.shape} differ")
    out = normal.copy()
    idx = np.flatnonzero(mask)  # pixels under the mask (row-major, H*W)
    if idx.size:
        b = np.float32(beta)
        c = normal.shape[2]
        n = normal.reshape(-1, c)[idx].astype(np.float32) * np.float32(1.0 / 255.0)
        a = source.reshape(-1, c)[idx].astype(np.float32) * np.float32(1.0 / 255.0)
        s = (np.float32(1.0) - b) * a + b * n
        out.reshape(-1, c)[idx] = np.clip(np.rint(s * np.float32(255.0)), 0, 255).astype(np.uint8)
    return out


def make_source(
    kind: str,
    rng: np.random.Generator,
    height: int,
    width: int,
    textures: np.ndarray | None = None,
    homologous: np.ndarray | None = None,
    own_image: np.ndarray | None = None,
    heterologous: np.ndarray | None = None,
) -> np.ndarray:
    """The anomaly source A (uint8 ``height x width x 3``) of the given kind.

    texture: a random bank texture + DRAEM 3-op augmentation; homologous: a random image of the
    same-product bank (else ``own_image``) rearranged; heterologous: a random bank image of another
    product, cropped/flipped/augmented.
    """
    if kind == "texture":
        if textures is None or len(textures) == 0:
            raise ValueError("texture source requested without a texture bank")
        tex = resize_to(textures[int(rng.integers(len(textures)))], height, width)
        return augment_source(tex, rng)
    if kind == "homologous":
        if homologous is not None and len(homologous) > 0:
            img = resize_to(homologous[int(rng.integers(len(homologous)))], height, width)
        elif own_image is not None:
            img = own_image
        else:
            raise ValueError("homologous source requested without a same-product image")
        return homologous_source(img, rng)
    if kind == "heterologous":
        if heterologous is None or len(heterologous) == 0:
            raise ValueError("heterologous source requested without a bank of other products")
        img = heterologous[int(rng.integers(len(heterologous)))]
        return heterologous_source(img, rng, height, width)
    raise ValueError(f"unknown source kind {kind!r}; valid: {list(SOURCES)}")


def simulated_anomaly(
    normal: np.ndarray,
    rng: np.random.Generator,
    cfg: SynthesisConfig,
    probs: np.ndarray,
    textures: np.ndarray | None = None,
    homologous: np.ndarray | None = None,
    heterologous: np.ndarray | None = None,
) -> Synthesised:
    """One simulated anomaly on ``normal`` (uint8 H x W x 3). ``probs`` from
    :func:`source_probabilities` (over :data:`SOURCES`)."""
    h, w = normal.shape[:2]
    base = normal
    if rng.random() < cfg.rotate_normal_prob:
        base = rotate_image(normal, rng.uniform(-90.0, 90.0))
    kind = SOURCES[int(rng.choice(len(SOURCES), p=probs))]
    source = make_source(kind, rng, h, w, textures, homologous, normal, heterologous)
    mask = perlin_mask((h, w), rng, cfg)
    beta = float(rng.uniform(0.0, cfg.beta_max)) if cfg.beta_max > 0 else 0.0
    return Synthesised(blend(base, source, mask, beta), mask, beta, kind, base)
