"""Anomaly synthesis for PRN training (the paper's anomaly generation strategies), built for Ray Data ``map_batches``.

Two entry points:

* :func:`epoch_plan` — the rows of one training epoch: which rows are normal, raw
  seen, extended or simulated, which normal image / seen defect each uses, and one int64 seed
  per row derived from ``(seed, epoch, row)``. Deterministic and shuffled.
* :class:`Synthesizer` — a small picklable callable, ``batch dict -> batch dict`` (numpy in and
  out), that synthesises the ``extended`` and ``simulated`` rows of a batch from their seeds and
  leaves ``normal`` and ``seen`` rows (and every other column) untouched. A row's result depends
  only on its seed, its input image and the banks given at construction, never on the other rows
  of the batch, so it is reproducible whatever Ray's batch boundaries are.

Example::

    plan = epoch_plan(n_normal, n_seen, cfg.synthesis, epoch, seed)
    # join plan rows with decoded images: image = normals[normal_index] (or seen image for
    # "seen" rows), mask = zeros (or the seen mask), kind, seed, source_index
    synth = Synthesizer(cfg.synthesis, image_size, textures=load_texture_bank(cfg.synthesis, size),
                        seen=[(img, mask), ...], heterologous=other_products_or_None)
    ds = ds.map_batches(synth, batch_format="numpy")
"""

from __future__ import annotations

import math
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
_PLAN_TAG = 0x504C414E  # "PLAN": separates the shuffle stream from the row seeds


def sample_rng(seed: int) -> np.random.Generator:
    """The generator of one sample: ``Generator(PCG64(seed))`` (negative seeds taken mod 2**64)."""
    return np.random.Generator(np.random.PCG64(int(seed) & _U64))


def row_seed(seed: int, epoch: int, row: int) -> int:
    """Non-negative int64 seed of plan row ``row``: ``SeedSequence([seed, epoch, row])``."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(row)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))  # 63 bits: fits int64, never negative


def _share(n: int, share: float) -> int:
    # floor, so real_share = 0.5 gives exactly the paper's N_n // 2 (209 -> 104, 105 -> 52)
    return max(0, int(math.floor(n * float(share) + 1e-9)))


def _cycled_permutations(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """``count`` indices in [0, n): concatenated random permutations (balanced coverage)."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    reps = -(-count // n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:count].astype(np.int64)


def epoch_plan(
    n_normal: int, n_seen: int, cfg: SynthesisConfig, epoch: int, seed: int
) -> dict[str, np.ndarray]:
    """The shuffled sample plan of one epoch, as numpy columns.

    Counts, for ``N_n = n_normal``: ``floor(N_n * normal_share)`` normals (each normal image once
    per epoch at share 1, random permutations cycled otherwise); ``slots = floor(N_n * real_share)``
    real slots, of which the first ``min(slots, n_seen * raw_seen_reuse)`` are raw seen anomalies
    (seen indices cycled 0, 1, ..., n_seen-1, 0, ...) and the rest extended anomalies (seen
    defect drawn by cycled random permutations); ``floor(N_n * simulated_share)`` simulated
    anomalies. With ``n_seen == 0`` (no real anomalies), the real slots become simulated ones so
    the anomalous share of the epoch is kept.

    Columns: ``row`` (int64, slot before the shuffle), ``kind`` (str), ``normal_index`` (int64,
    the normal image the row starts from; -1 for raw seen rows), ``source_index`` (int64, the seen
    anomaly for ``seen`` and ``extended`` rows; -1 otherwise), ``seed`` (int64,
    :func:`row_seed` of ``(seed, epoch, row)``, unique per row in practice).
    """
    if n_normal <= 0:
        raise ValueError("epoch_plan needs at least one normal image")
    if n_seen < 0 or epoch < 0 or seed < 0:
        raise ValueError("epoch_plan: n_seen, epoch and seed must be non-negative")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, _PLAN_TAG])))
    n_norm = _share(n_normal, cfg.normal_share)
    slots = _share(n_normal, cfg.real_share)
    n_sim = _share(n_normal, cfg.simulated_share)
    if n_seen == 0:
        n_raw, n_ext, n_sim = 0, 0, n_sim + slots
    else:
        n_raw = min(slots, n_seen * max(0, int(cfg.raw_seen_reuse)))
        n_ext = slots - n_raw
    kind = np.array(
        ["normal"] * n_norm + ["seen"] * n_raw + ["extended"] * n_ext + ["simulated"] * n_sim,
        dtype="<U9",
    )
    normal_index = np.concatenate(
        [
            _cycled_permutations(rng, n_normal, n_norm),
            np.full(n_raw, -1, dtype=np.int64),
            _cycled_permutations(rng, n_normal, n_ext + n_sim),
        ]
    )
    source_index = np.concatenate(
        [
            np.full(n_norm, -1, dtype=np.int64),
            np.arange(n_raw, dtype=np.int64) % max(n_seen, 1),
            _cycled_permutations(rng, max(n_seen, 1), n_ext),
            np.full(n_sim, -1, dtype=np.int64),
        ]
    )
    total = kind.size
    row = np.arange(total, dtype=np.int64)
    seeds = np.array([row_seed(seed, epoch, r) for r in range(total)], dtype=np.int64)
    order = rng.permutation(total)
    return {
        "row": row[order],
        "kind": kind[order],
        "normal_index": normal_index[order],
        "source_index": source_index[order],
        "seed": seeds[order],
    }


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
    "epoch_plan",
    "estimate_foreground",
    "extended_anomaly",
    "load_texture_bank",
    "perlin_mask",
    "perlin_noise",
    "row_seed",
    "sample_rng",
    "simulated_anomaly",
    "source_probabilities",
]
