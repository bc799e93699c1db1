"""Anomaly synthesis for PRN training (the paper's anomaly generation strategies), built for
Ray Data ``map_batches``.

:class:`Synthesizer` is a small picklable callable, ``batch dict -> batch dict`` (numpy in and
out), that synthesises the ``extended`` and ``simulated`` rows of a batch from their seeds and
leaves ``normal`` and ``seen`` rows (and every other column) untouched. A row's result depends
only on its seed, its input image and the banks given at construction, never on the other rows
of the batch, so it is reproducible whatever Ray's batch boundaries are. Which rows an epoch
has, and their seeds, is :func:`prn_ray.data.epoch_plan.epoch_plan`.

Example::

    plan = epoch_plan(n_normal, n_seen, cfg.synthesis, epoch, seed)
    # join plan rows with decoded images: image = normals[normal_index] (or seen image for
    # "seen" rows), mask = zeros (or the seen mask), kind, seed, source_index
    synth = Synthesizer(cfg.synthesis, image_size, textures=load_texture_bank(cfg.synthesis, size),
                        seen=[(img, mask), ...], heterologous=other_products_or_None)
    ds = ds.map_batches(synth, batch_format="numpy")
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prn_ray.config import SynthesisConfig
from prn_ray.contracts import MASK_UNKNOWN
from prn_ray.synthesis.extended import estimate_foreground, extended_anomaly
from prn_ray.synthesis.perlin import perlin_mask, perlin_noise
from prn_ray.synthesis.simulated import (
    SOURCES,
    Synthesised,
    blend,
    simulated_anomaly,
    source_probabilities,
)
from prn_ray.synthesis.textures import (
    augment_source,
    ensure_bank_size,
    load_texture_bank,
    procedural_textures,
)

KINDS: tuple[str, ...] = ("normal", "seen", "extended", "simulated")
_U64 = (1 << 64) - 1


def sample_rng(seed: int) -> np.random.Generator:
    """The generator of one sample: ``Generator(PCG64(seed))`` (negative seeds taken mod 2**64)."""
    return np.random.Generator(np.random.PCG64(int(seed) & _U64))



class Synthesizer:
    """Batch synthesiser for Ray Data ``map_batches`` (numpy batches, picklable).

    Args:
        cfg: the synthesis section.
        image_size: working size S or (h, w); banks are resized to it once here (rows of
            another size are handled too, by resizing the source per row).
        textures: texture bank ``T x S x S x 3`` uint8 (e.g. :func:`load_texture_bank`); ``None``
            -> 16 seeded procedural textures.
        seen: seen defects ``[(image H x W x 3 uint8, mask H x W {0,1}), ...]`` at the working
            size, indexed by the ``source_index`` column of ``extended`` rows.
        heterologous: ``K x H x W x 3`` uint8 images of *other* products (HEA source), or ``None``
            (then HEA is unavailable and ``source_weights`` are renormalised).
        homologous: optional ``K x H x W x 3`` uint8 same-product normals (HOA source). Without
            it, HOA rearranges the row's own normal image (reproducible per row; see
            :mod:`prn_ray.synthesis.homologous`).
        annotate: add columns ``synth_source`` (str; "" for untouched rows) and ``synth_beta``
            (float32) for diagnostics.

    ``__call__(batch)``: columns ``image`` (B x S x S x 3 uint8), ``mask`` (B x S x S uint8),
    ``kind`` (B str), ``seed`` (B int64), ``source_index`` (B int64). Returns a new dict with the
    same columns, ``image`` and ``mask`` replaced by new arrays: ``normal`` / ``seen`` rows
    unchanged, ``simulated`` / ``extended`` rows synthesised. Other columns pass through.
    An ``extended`` row falls back to a simulated anomaly (same seed) when there is no usable seen
    defect (no seen list, index out of range, an empty defect mask, or a defect known only by
    its image label).
    """

    def __init__(
        self,
        cfg: SynthesisConfig,
        image_size: int | Sequence[int],
        textures: np.ndarray | None = None,
        seen: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
        heterologous: np.ndarray | None = None,
        homologous: np.ndarray | None = None,
        annotate: bool = False,
    ) -> None:
        self.cfg = cfg
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.image_size = (int(h), int(w))
        s = max(self.image_size)
        if textures is None or len(textures) == 0:
            rng = np.random.Generator(np.random.PCG64(0))
            textures = np.stack(procedural_textures(16, s, rng))
        self.textures = ensure_bank_size(np.asarray(textures, dtype=np.uint8), *self.image_size)
        # A defect known only by its image label (mask all MASK_UNKNOWN) has no pixels to
        # paste: its mask is empty here, so an extended row drawn on it becomes simulated.
        self.seen = [
            (np.asarray(i, dtype=np.uint8),
             ((np.asarray(m) > 0) & (np.asarray(m) != MASK_UNKNOWN)).astype(np.uint8))
            for i, m in seen or []
        ]
        self.heterologous = (
            np.asarray(heterologous, dtype=np.uint8)
            if heterologous is not None and len(heterologous) > 0
            else None
        )
        self.homologous = (
            np.asarray(homologous, dtype=np.uint8)
            if homologous is not None and len(homologous) > 0
            else None
        )
        self.annotate = annotate
        self.probs = source_probabilities(
            cfg.source_weights,
            {"texture": True, "homologous": True, "heterologous": self.heterologous is not None},
        )

    # -- one row
    def synthesise(
        self, image: np.ndarray, kind: str, seed: int, source_index: int = -1
    ) -> Synthesised:
        """Synthesise one ``extended`` / ``simulated`` row (reproducible from ``seed``)."""
        rng = sample_rng(seed)
        if kind == "extended" and 0 <= source_index < len(self.seen):
            d_img, d_mask = self.seen[source_index]
            out = extended_anomaly(
                image, d_img, d_mask, rng,
                beta_max=self.cfg.extended_beta_max,
                color_prob=self.cfg.extended_color_prob,
                foreground=self.cfg.foreground,
            )
            if out is not None:
                return out
            rng = sample_rng(seed)
        elif kind not in ("extended", "simulated"):
            raise ValueError(f"cannot synthesise kind {kind!r}")
        return simulated_anomaly(
            image, rng, self.cfg, self.probs, self.textures, self.homologous, self.heterologous
        )

    # -- a batch
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.asarray(batch["image"])
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"image column must be B x H x W x 3 uint8, got {images.shape} {images.dtype}"
            )
        b, h, w = images.shape[:3]
        masks = batch.get("mask")
        masks = np.zeros((b, h, w), np.uint8) if masks is None else np.asarray(masks)
        if masks.ndim == 4 and masks.shape[-1] == 1:
            masks = masks[..., 0]
        kinds = [
            k.decode() if isinstance(k, bytes) else str(k)
            for k in np.asarray(batch["kind"]).ravel()
        ]
        seeds = np.asarray(batch["seed"]).astype(np.int64).ravel()
        src = batch.get("source_index")
        src = np.full(b, -1, np.int64) if src is None else np.asarray(src).astype(np.int64).ravel()
        out_images = images.copy()
        out_masks = masks.astype(np.uint8, copy=True)
        sources = np.full(b, "", dtype="<U12")
        betas = np.zeros(b, np.float32)
        for i, kind in enumerate(kinds):
            if kind in ("normal", "seen"):
                continue
            if kind not in KINDS:
                raise ValueError(f"row {i}: unknown kind {kind!r}; valid: {list(KINDS)}")
            res = self.synthesise(images[i], kind, int(seeds[i]), int(src[i]))
            out_images[i] = res.image
            out_masks[i] = res.mask
            sources[i] = res.source
            betas[i] = res.beta
        out = dict(batch)
        out["image"] = out_images
        out["mask"] = out_masks
        if self.annotate:
            out["synth_source"] = sources
            out["synth_beta"] = betas
        return out


__all__ = [
    "KINDS",
    "SOURCES",
    "Synthesised",
    "Synthesizer",
    "augment_source",
    "blend",
    "estimate_foreground",
    "extended_anomaly",
    "load_texture_bank",
    "perlin_mask",
    "perlin_noise",
    "sample_rng",
    "simulated_anomaly",
    "source_probabilities",
]
