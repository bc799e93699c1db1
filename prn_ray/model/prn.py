"""PRN assembled (spec §1, Fig. 3): prototypes → MF#1 → concat → MSA → MF#2 → decoder.

``PRNHead`` works on the four backbone maps (so training can run on cached features);
``PRN`` = optional frozen ``Backbone`` + head and returns ``PRNOutput``. Plain ``nn.Module``s:
no training glue, exportable with ``torch.jit.trace`` / ``torch.onnx.export``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prn_ray.config import ModelConfig, StorageConfig
from prn_ray.model.attention import MultiSizeAttention
from prn_ray.model.backbone import FEATURE_STRIDES, Backbone
from prn_ray.model.decoder import Decoder
from prn_ray.model.fusion import MultiScaleFusion
from prn_ray.model.prototypes import prototype_residual

NUM_SCALES = 3  # prototype / attention scales (strides 4, 8, 16); stride 32 feeds the decoder only
PrototypeState = Literal["unset", "placeholder", "fitted"]


class PRNOutput(NamedTuple):
    logits: Tensor  # N×1×H×W
    anomaly_map: Tensor  # sigmoid(logits), float32
    score: Tensor  # N, image-level anomaly score


# ----------------------------------------------------------------------------- scoring


def area_kernel(image_size: tuple[int, int]) -> int:
    """Window of the ``area`` score: odd, about 1/32 of the shorter side, at least 3."""
    k = max(3, round(min(image_size) / 32))
    return k if k % 2 else k + 1


def image_score(anomaly_map: Tensor, kind: str = "topk_mean", topk: int = 100, kernel: int = 9
                ) -> Tensor:
    """Image score from an N×1×H×W map.

    - ``topk_mean``: mean of the k largest pixels (k capped at H·W) [XY default, k = 100];
    - ``max``: the largest pixel;
    - ``area``: max of the ``kernel``×``kernel`` mean-filtered map (DRAEM uses 21×21 at 256 px).
      The window is small (≈ side/32: 9×9 at 256 px, under the median 0.18 % defect ≈ 11×11
      px of the reference data), so a small defect still scores its full probability while
      an isolated hot pixel is diluted k²-fold; top-100 instead rewards large areas, as the
      paper's limitation slide notes.
    """
    flat = anomaly_map.flatten(1)
    if kind == "topk_mean":
        # sort + slice instead of topk(min(k, H·W)): same values, and a trace stays static.
        return flat.sort(dim=1, descending=True).values[:, :topk].mean(1)
    if kind == "max":
        return flat.amax(1)
    if kind == "area":
        pooled = F.avg_pool2d(anomaly_map, kernel, stride=1, padding=kernel // 2,
                              count_include_pad=False)
        return pooled.flatten(1).amax(1)
    raise ValueError(f"score must be topk_mean, max or area, got {kind!r}")


# ----------------------------------------------------------------------------- head


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


class PRNHead(nn.Module):
    """Trainable part of PRN on the four feature maps (strides 4, 8, 16, 32).

    Prototypes are buffers ``prototypes_0..2`` (K×C×H×W, float32) set by
    :meth:`set_prototypes`. Until then ``prototype_state`` is ``"unset"`` and forward refuses to
    run; :meth:`use_placeholder_prototypes` installs all-zero prototypes explicitly, for shape
    and export tests only. Loading a state dict with prototypes resizes the buffers to the
    stored K and marks them fitted.
    """

    def __init__(self, cfg: ModelConfig, channels: Sequence[int], image_size: int | Sequence[int],
                 feature_sizes: Sequence[tuple[int, int]] | None = None,
                 strides: Sequence[int] = FEATURE_STRIDES) -> None:
        super().__init__()
        if len(channels) != 4 or len(strides) != 4:
            raise ValueError(f"PRNHead needs 4 feature levels, got channels={list(channels)}")
        self.image_size = _size2(image_size)
        self.channels = [int(c) for c in channels]
        self.strides = [int(s) for s in strides]
        # Measured sizes (Backbone.feature_sizes) when known; else the usual ceil(size / stride).
        self.feature_sizes: list[tuple[int, int]] = (
            [(int(h), int(w)) for h, w in feature_sizes] if feature_sizes is not None else
            [(math.ceil(self.image_size[0] / s), math.ceil(self.image_size[1] / s))
             for s in strides])
        self.use_prototypes = cfg.use_prototypes
        self.use_attention = cfg.use_attention
        self.use_fusion = cfg.use_fusion
        self.share_mf1 = cfg.share_mf1
        self.residual: Literal["squared", "absolute"] = cfg.residual
        self.prototype_state: PrototypeState = "unset"

        c3, s3 = self.channels[:NUM_SCALES], self.strides[:NUM_SCALES]
        if self.use_prototypes:
            for j in range(NUM_SCALES):
                placeholder = torch.zeros(1, c3[j], *self.feature_sizes[j])
                self.register_buffer(f"prototypes_{j}", placeholder)
        # MF#1: separate modules for features and residuals unless share_mf1 (spec §2.4, §8 #5).
        z3 = self.feature_sizes[:NUM_SCALES]
        self.mf1 = MultiScaleFusion(c3, s3, z3) if self.use_fusion else None
        self.mf1_residual = (MultiScaleFusion(c3, s3, z3)
                             if self.use_fusion and self.use_prototypes and not self.share_mf1
                             else None)
        # Without prototypes there is no residual stream: MSA sees the fused features alone.
        msa_ch = [2 * c if self.use_prototypes else c for c in c3]
        self.attention = nn.ModuleList(
            MultiSizeAttention(msa_ch[j], self.feature_sizes[j], cfg.attention_patch_sizes,
                               cfg.attention_blocks, cfg.attention_scale, cfg.norm)
            for j in range(NUM_SCALES)) if self.use_attention else None
        self.mf2 = MultiScaleFusion(msa_ch, s3, z3) if self.use_fusion else None
        self.decoder = Decoder(self.channels, msa_ch, cfg.decoder_width, cfg.norm)

    # -- prototypes -------------------------------------------------------------------------

    @property
    def prototypes(self) -> list[Tensor]:
        if not self.use_prototypes:
            return []
        return [getattr(self, f"prototypes_{j}") for j in range(NUM_SCALES)]

    def set_prototypes(self, prototypes: Sequence[Tensor]) -> None:
        """Install fitted prototypes (one K_j×C_j×H_j×W_j tensor per scale)."""
        if not self.use_prototypes:
            raise RuntimeError("this head was built with use_prototypes=False")
        if len(prototypes) != NUM_SCALES:
            raise ValueError(f"expected {NUM_SCALES} prototype tensors, got {len(prototypes)}")
        for j, p in enumerate(prototypes):
            old = getattr(self, f"prototypes_{j}")
            if p.dim() != 4 or p.shape[1] != old.shape[1]:
                raise ValueError(f"scale {j}: prototypes must be K×{old.shape[1]}×H×W, "
                                 f"got {tuple(p.shape)}")
            p = p.detach().to(device=old.device, dtype=torch.float32).clone()
            setattr(self, f"prototypes_{j}", p)
        self.prototype_state = "fitted"

    def use_placeholder_prototypes(self) -> None:
        """All-zero prototypes (K = 1): only for shape/export tests, never for real scores."""
        for j in range(NUM_SCALES if self.use_prototypes else 0):
            old = getattr(self, f"prototypes_{j}")
            setattr(self, f"prototypes_{j}", torch.zeros(1, *old.shape[1:], device=old.device))
        self.prototype_state = "placeholder"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # K is data-dependent: resize the buffers to the stored prototypes before copying.
        keys = [f"{prefix}prototypes_{j}" for j in range(NUM_SCALES)]
        if self.use_prototypes and all(k in state_dict for k in keys):
            for j, k in enumerate(keys):
                old = getattr(self, f"prototypes_{j}")
                setattr(self, f"prototypes_{j}", torch.empty_like(state_dict[k], device=old.device,
                                                                  dtype=old.dtype))
            self.prototype_state = "fitted"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- forward ----------------------------------------------------------------------------

    def forward(self, features: list[Tensor], out_size: Sequence[int] | None = None) -> Tensor:
        """Four maps (strides 4, 8, 16, 32; any float dtype) -> N×1×H×W logits."""
        if self.use_prototypes and self.prototype_state == "unset":
            raise RuntimeError("prototypes are not set: call set_prototypes() (or "
                               "use_placeholder_prototypes() for shape tests)")
        dtype = self.decoder.head.weight.dtype
        feats = [f.to(dtype) for f in features]  # cached features may travel as float16
        scales, deep = feats[:NUM_SCALES], feats[NUM_SCALES]
        x = self.mf1(scales) if self.mf1 is not None else scales
        if self.use_prototypes:
            res = []
            for j, (f, proto) in enumerate(zip(scales, self.prototypes)):
                if not torch.jit.is_tracing() and f.shape[1:] != proto.shape[1:]:
                    raise ValueError(f"scale {j}: features {tuple(f.shape[1:])} do not match "
                                     f"prototypes {tuple(proto.shape[1:])} (image size?)")
                res.append(prototype_residual(f, proto, self.residual))
            mf_res = self.mf1_residual if self.mf1_residual is not None else self.mf1
            if mf_res is not None:
                res = mf_res(res)
            x = [torch.cat([a, r], dim=1) for a, r in zip(x, res)]
        if self.attention is not None:
            x = [block(t) for block, t in zip(self.attention, x)]
        if self.mf2 is not None:
            x = self.mf2(x)
        return self.decoder(deep, x, out_size if out_size is not None else self.image_size)


# ----------------------------------------------------------------------------- model


class PRN(nn.Module):
    """Backbone (optional) + head. ``forward(images)`` or ``forward(features=...)``."""

    def __init__(self, head: PRNHead, backbone: Backbone | None = None,
                 score: str = "topk_mean", score_topk: int = 100) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.score_kind = score
        self.score_topk = score_topk
        self.area_kernel = area_kernel(head.image_size)

    def forward(self, images: Tensor | None = None, features: list[Tensor] | None = None
                ) -> PRNOutput:
        if features is None:
            if images is None or self.backbone is None:
                raise ValueError("pass images (needs a backbone) or features")
            features = self.backbone(images)
        out_size = images.shape[-2:] if images is not None else None
        logits = self.head(features, out_size)
        anomaly_map = torch.sigmoid(logits.float())
        score = image_score(anomaly_map, self.score_kind, self.score_topk, self.area_kernel)
        return PRNOutput(logits, anomaly_map, score)


def build_prn(
    model_cfg: ModelConfig,
    image_size: int | Sequence[int],
    *,
    with_backbone: bool = True,
    storage_cfg: StorageConfig | None = None,
    channels: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
    backbone_state: dict[str, Tensor] | None = None,
) -> PRN:
    """The one factory. ``with_backbone=False`` needs ``channels`` (e.g. ``Backbone.channels``).

    ``backbone_state`` restores saved backbone weights (registry) instead of loading
    ``model_cfg.weights``, which then only names their source.
    """
    size = _size2(image_size)
    backbone = None
    sizes = None
    if with_backbone:
        backbone = Backbone(model_cfg.backbone, model_cfg.weights, storage_cfg,
                            state=backbone_state)
        channels, strides = backbone.channels, backbone.strides
        sizes = backbone.feature_sizes(size)
    elif channels is None:
        raise ValueError("build_prn(with_backbone=False) needs the backbone's channels")
    head = PRNHead(model_cfg, channels, size, sizes, strides or FEATURE_STRIDES)
    return PRN(head, backbone, model_cfg.score, model_cfg.score_topk)
