"""What PRN keeps of a product's normal training images, fitted once without learning.

A :class:`NormalReference` holds, per backbone level, the channel mean/std of the normal
features (the head standardises its inputs with them: EfficientNet block outputs are
pre-activation with per-channel scales from ≈ 0.1 to ≈ 10, and a squared residual of such
features saturates attention); the multi-scale prototypes (k-means over whole
flattened maps, in the head's input space); and the patch-memory banks of the residual prior
(:mod:`prn_ray.model.memory`). :func:`fit_reference` builds it from the normal images' features;
it travels as a flat dict of tensors (prototype cache, checkpoints) and ends up as buffers of the
head (registry).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prn_ray.config import ModelConfig
from prn_ray.model.memory import channel_stats, fit_banks
from prn_ray.model.prototypes import fit_prototypes


@dataclass
class NormalReference:
    means: list[Tensor]  # per level (4): C_j, float32
    stds: list[Tensor]
    prototypes: list[Tensor]  # per prototype scale (3): K×C_j×H_j×W_j; [] without prototypes
    banks: list[Tensor]  # per memory level: M×C; [] without a prior
    n_normal: int

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for j, (m, s) in enumerate(zip(self.means, self.stds)):
            out[f"mean{j}"], out[f"std{j}"] = m.contiguous(), s.contiguous()
        for j, p in enumerate(self.prototypes):
            out[f"prototypes{j}"] = p.contiguous()
        for j, b in enumerate(self.banks):
            out[f"bank{j}"] = b.contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], n_normal: int) -> NormalReference:
        def series(prefix: str) -> list[Tensor]:
            out, j = [], 0
            while f"{prefix}{j}" in tensors:
                out.append(tensors[f"{prefix}{j}"])
                j += 1
            return out

        return cls(series("mean"), series("std"), series("prototypes"), series("bank"), n_normal)


def standardize(features: Tensor, mean: Tensor, std: Tensor, chunk: int = 64) -> Tensor:
    """(F − mean) / std per channel, chunked, keeping the input dtype (float16 stays small)."""
    shape = (1, -1, 1, 1)
    return torch.cat([((c.float() - mean.view(shape)) / std.view(shape)).to(features.dtype)
                      for c in features.split(chunk)])


def fit_reference(features: list[Tensor], cfg: ModelConfig, seed: int = 0,
                  n_images: int | None = None) -> NormalReference:
    """Fit statistics, prototypes and memory banks from the normal images' features.

    ``features``: the four backbone levels, each N×C×H×W (float16 is fine): one row per
    view, ``n_images`` images (default N: one view each). Prototypes are fitted in the space
    the head compares in: standardised features when ``cfg.standardize``, raw ones otherwise;
    their number is ``prototype_ratio`` times the number of *images* (the paper's K / N), so a
    tiled product keeps the model size of an untiled one while its prototypes are fitted on
    (and cover) every tile position.
    """
    if len(features) != 4:
        raise ValueError(f"expected 4 feature levels, got {len(features)}")
    n = features[0].shape[0]
    if n < 1:
        raise ValueError("need at least one normal image to fit the reference")
    n_images = n if n_images is None else n_images
    stats = [channel_stats(f) for f in features]
    means, stds = [m for m, _ in stats], [s for _, s in stats]
    prototypes: list[Tensor] = []
    if cfg.use_prototypes:
        space = ([standardize(f, m, s) for f, m, s in zip(features[:3], means, stds)]
                 if cfg.standardize else features[:3])
        prototypes = fit_prototypes(space, cfg.prototype_ratio, seed=seed,
                                    iters=cfg.kmeans_iters, max_images=cfg.prototype_max_images,
                                    n_images=n_images)
    banks: list[Tensor] = []
    if cfg.residual_prior:
        lv = cfg.prior_levels
        banks = fit_banks([features[j] for j in lv], [means[j] for j in lv],
                          [stds[j] for j in lv], cfg.prior_bank_size, cfg.prior_pool, seed)
    return NormalReference(means, stds, prototypes, banks, n_images)
