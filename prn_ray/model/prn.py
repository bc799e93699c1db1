"""PRN assembled (Zhang et al., CVPR 2023, Fig. 3): prototypes → MF#1 → concat → MSA → MF#2 → decoder.

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
from prn_ray.model.layers import autocast_off
from prn_ray.model.memory import PatchMemory
from prn_ray.model.prototypes import prototype_residual
from prn_ray.model.reference import NormalReference

NUM_SCALES = 3  # prototype / attention scales (strides 4, 8, 16); stride 32 feeds the decoder only
ReferenceState = Literal["unset", "placeholder", "fitted"]


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

    - ``topk_mean``: mean of the k largest pixels (k capped at H·W) (k = 100 in github.com/xcyao00/PRNet);
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

    What the head knows of the product's normal images (a :class:`NormalReference`: channel
    statistics, prototypes, patch-memory banks) is installed by :meth:`set_reference`; until
    then ``reference_state`` is ``"unset"`` and forward refuses to run.
    :meth:`use_placeholder_reference` installs neutral values explicitly, for shape and export
    tests only. Loading a state dict with a reference resizes the data-sized buffers (K
    prototypes, M memory rows) and marks it fitted.

    With ``residual_prior`` the logits are ``prior + correction``: the prior is the patch
    memory's calibrated z-maps, weighted per level, smoothed and shifted (a handful of learned
    scalars initialised by :meth:`calibrate`), and the correction is the PRN decoder's output,
    whose last convolution starts at zero. An untrained head therefore ranks pixels exactly as
    the memory does, and training can only start from there.
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
        self.standardize = cfg.standardize
        self.residual: Literal["squared", "absolute"] = cfg.residual
        self.reference_state: ReferenceState = "unset"

        # Channel statistics of the normal features, per level: the head standardises its
        # inputs with them (``standardize``) and the patch memory always does.
        for j, c in enumerate(self.channels):
            self.register_buffer(f"input_mean_{j}", torch.zeros(c))
            self.register_buffer(f"input_std_{j}", torch.ones(c))
        c3, s3 = self.channels[:NUM_SCALES], self.strides[:NUM_SCALES]
        if self.use_prototypes:
            for j in range(NUM_SCALES):
                placeholder = torch.zeros(1, c3[j], *self.feature_sizes[j])
                self.register_buffer(f"prototypes_{j}", placeholder)
        # MF#1: separate modules for features and residuals (Fig. 3 fuses them "separately")
        # unless share_mf1 (github.com/xcyao00/PRNet shares one).
        z3 = self.feature_sizes[:NUM_SCALES]
        self.mf1 = MultiScaleFusion(c3, s3, z3) if self.use_fusion else None
        self.mf1_residual = (MultiScaleFusion(c3, s3, z3)
                             if self.use_fusion and self.use_prototypes and not self.share_mf1
                             else None)
        # Without prototypes there is no residual stream: MSA sees the fused features alone.
        msa_ch = [2 * c if self.use_prototypes else c for c in c3]
        self.attention = nn.ModuleList(
            MultiSizeAttention(msa_ch[j], self.feature_sizes[j], cfg.attention_patch_sizes,
                               cfg.attention_blocks, cfg.attention_scale, cfg.norm,
                               single_token_affine=cfg.single_token_affine,
                               bottleneck=cfg.msa_bottleneck, input_norm=cfg.msa_input_norm)
            for j in range(NUM_SCALES)) if self.use_attention else None
        self.mf2 = MultiScaleFusion(msa_ch, s3, z3) if self.use_fusion else None
        self.memory = (PatchMemory(self.channels, cfg.prior_levels, cfg.prior_pool)
                       if cfg.residual_prior else None)
        self.decoder = Decoder(self.channels, msa_ch, cfg.decoder_width, cfg.norm,
                               logit_stride=cfg.logit_stride, zero_init=self.memory is not None,
                               extra_channels=len(cfg.prior_levels) if cfg.residual_prior else 0)
        if self.memory is not None:
            n = len(self.memory.levels)
            self.prior_weight = nn.Parameter(torch.ones(n))
            self.prior_bias = nn.Parameter(torch.zeros(1))
            self.prior_vote = float(cfg.prior_vote)
            sigma = cfg.prior_blur_sigma * min(self.image_size) / 256.0
            self.register_buffer("blur_kernel", gaussian_kernel(sigma), persistent=False)

    # -- the normal reference ---------------------------------------------------------------

    @property
    def prototypes(self) -> list[Tensor]:
        if not self.use_prototypes:
            return []
        return [getattr(self, f"prototypes_{j}") for j in range(NUM_SCALES)]

    def set_reference(self, ref: NormalReference) -> None:
        """Install fitted statistics, prototypes (K_j×C_j×H_j×W_j) and memory banks."""
        if len(ref.means) != 4 or len(ref.stds) != 4:
            raise ValueError("a normal reference needs channel statistics for 4 levels")
        for j, (m, sd) in enumerate(zip(ref.means, ref.stds)):
            if m.shape != (self.channels[j],) or sd.shape != (self.channels[j],):
                raise ValueError(f"level {j}: statistics must have {self.channels[j]} channels, "
                                 f"got {tuple(m.shape)}")
            getattr(self, f"input_mean_{j}").copy_(m)
            getattr(self, f"input_std_{j}").copy_(sd.clamp_min(1e-6))
        if self.use_prototypes:
            if len(ref.prototypes) != NUM_SCALES:
                raise ValueError(f"expected {NUM_SCALES} prototype tensors, "
                                 f"got {len(ref.prototypes)}")
            for j, p in enumerate(ref.prototypes):
                old = getattr(self, f"prototypes_{j}")
                if p.dim() != 4 or p.shape[1] != old.shape[1]:
                    raise ValueError(f"scale {j}: prototypes must be K×{old.shape[1]}×H×W, "
                                     f"got {tuple(p.shape)}")
                setattr(self, f"prototypes_{j}",
                        p.detach().to(device=old.device, dtype=torch.float32).clone())
        if self.memory is not None:
            self.memory.set_banks(ref.banks)
        self.reference_state = "fitted"

    def use_placeholder_reference(self) -> None:
        """Neutral reference (zero prototypes, K = 1; one zero memory row, identity
        calibration): only for shape/export tests, never for real scores."""
        for j in range(NUM_SCALES if self.use_prototypes else 0):
            old = getattr(self, f"prototypes_{j}")
            setattr(self, f"prototypes_{j}", torch.zeros(1, *old.shape[1:], device=old.device))
        if self.memory is not None:
            self.memory.set_banks([torch.zeros(1, b.shape[1]) for b in self.memory.banks])
            self.memory.mark(calibrated=True)
        self.reference_state = "placeholder"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # K and M are data-dependent: resize those buffers to the stored ones before copying.
        keys = [f"{prefix}prototypes_{j}" for j in range(NUM_SCALES)]
        if self.use_prototypes and all(k in state_dict for k in keys):
            for j, k in enumerate(keys):
                old = getattr(self, f"prototypes_{j}")
                setattr(self, f"prototypes_{j}", torch.empty_like(state_dict[k], device=old.device,
                                                                  dtype=old.dtype))
        if f"{prefix}input_mean_0" in state_dict:
            self.reference_state = "fitted"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def standardized(self, features: Sequence[Tensor]) -> list[Tensor]:
        """(F − mean) / std per channel with the normal features' statistics."""
        out = []
        for j, f in enumerate(features):
            m = getattr(self, f"input_mean_{j}").to(f.dtype).view(1, -1, 1, 1)
            sd = getattr(self, f"input_std_{j}").to(f.dtype).view(1, -1, 1, 1)
            out.append((f - m) / sd)
        return out

    # -- the prior --------------------------------------------------------------------------

    @torch.no_grad()
    def calibrate(self, normal_features: Sequence[Tensor], sharpness: float = 0.5) -> None:
        """Calibrate the prior on held-out normal images' features (4 levels, N×C×H×W).

        Sets the memory's per-level location/scale, then the prior's weights and bias so that
        the prior logit is ``sharpness`` × (S − q) / spread, where S is the smoothed sum of the
        z-maps, q its 99.9th percentile over the held-out normal pixels and spread its std: a
        pixel beyond almost every normal one starts above probability 0.5. The slope is gentle
        on purpose (normals start around logit −2, not −10): with saturated prior logits the
        loss of every defect the memory misses is huge while normal pixels get no gradient, and
        on Magnetic-Tile the correction then learned slowly and scrambled the normal ranking
        (AUPRO fell from 75 to 51 in 100 steps with slope 2; it rose to 77 with 0.5).
        Without a prior this does nothing.
        """
        if self.memory is None:
            return
        if self.reference_state == "unset":
            raise RuntimeError("set_reference() must come before calibrate()")
        feats = self.standardized([f.float() for f in normal_features])
        self.memory.calibrate([feats[lv] for lv in self.memory.levels])
        n = feats[0].shape[0]
        if n == 0:
            raise ValueError("calibrating the prior needs at least one held-out normal image")
        total = torch.cat([self._prior_sum(self._z([f[i:i + 16] for f in feats]),
                                           self.image_size).flatten() for i in range(0, n, 16)])
        sample = total[torch.randperm(total.numel(), generator=torch.Generator().manual_seed(0))
                       [:1_000_000]].double()
        spread = max(float(sample.std()), 1e-6)
        q = float(torch.quantile(sample, 0.999))
        self.prior_weight.fill_(sharpness / spread)
        self.prior_bias.fill_(-sharpness * q / spread)

    def _z(self, normed: Sequence[Tensor]) -> list[Tensor]:
        assert self.memory is not None
        return self.memory([normed[lv] for lv in self.memory.levels])

    def _prior_sum(self, z: Sequence[Tensor], out_size: Sequence[int],
                   weight: Tensor | None = None) -> Tensor:
        """Σ_l w_l · z_l at ``out_size``, smoothed (N×1×H×W, float32)."""
        total = None
        for i, zi in enumerate(z):
            zi = F.interpolate(zi, size=tuple(out_size), mode="bilinear", align_corners=False)
            term = zi if weight is None else zi * weight[i]
            total = term if total is None else total + term
        return blur(total, self.blur_kernel)

    def prior_logits(self, features: Sequence[Tensor], out_size: Sequence[int] | None = None
                     ) -> Tensor:
        """The prior alone (what the head predicts before any training), N×1×H×W."""
        if self.memory is None:
            raise RuntimeError("this head was built without a residual prior")
        size = out_size if out_size is not None else self.image_size
        z = self._z(self.standardized([f.float() for f in features]))
        return self._prior_sum(z, size, self.prior_weight.float()) + self.prior_bias.float()

    # -- forward ----------------------------------------------------------------------------

    def forward(self, features: list[Tensor], out_size: Sequence[int] | None = None,
                parts: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """Four maps (strides 4, 8, 16, 32; any float dtype) -> N×1×H×W logits.

        ``parts=True`` returns (learned correction, prior logits or None) instead of their sum
        (training supervises the correction on its own too)."""
        correction, prior = self._parts(features, out_size)
        if parts:
            return correction, prior
        if prior is None:
            return correction
        return voted_logits(correction.float() + prior, prior, self.prior_vote)

    def _parts(self, features: list[Tensor], out_size: Sequence[int] | None
               ) -> tuple[Tensor, Tensor | None]:
        if self.reference_state == "unset":
            raise RuntimeError("the normal reference is not set: call set_reference() (or "
                               "use_placeholder_reference() for shape tests)")
        size = out_size if out_size is not None else self.image_size
        dtype = self.decoder.head.weight.dtype
        feats = [f.to(dtype) for f in features]  # cached features may travel as float16
        normed = self.standardized(feats)
        inputs = normed if self.standardize else feats
        scales, deep = inputs[:NUM_SCALES], inputs[NUM_SCALES]
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
        if self.memory is None:
            return self.decoder(deep, x, size), None
        z = self._z(normed)
        # The head sees the prior's z-maps too (on its logit grid), so its correction can
        # depend on what the memory already says.
        grid = z[0].shape[-2:]
        extra = torch.cat([F.interpolate(zi, size=grid, mode="bilinear", align_corners=False)
                           for zi in z], dim=1)
        logits = self.decoder(deep, x, size, extra)
        with autocast_off(logits.device.type):  # the ranking of pixels is the product
            prior = self._prior_sum(z, size, self.prior_weight.float()) + self.prior_bias.float()
        return logits, prior


def voted_logits(logits: Tensor, prior: Tensor, vote: float) -> Tensor:
    """The logits of (1 - vote) x sigmoid(logits) + vote x sigmoid(prior), computed in log
    space so that nothing saturates: pixels keep their order where either term is near 0 or 1
    (pixel metrics rank logits)."""
    if vote <= 0.0:
        return logits
    if vote >= 1.0:
        return prior
    a, b = math.log1p(-vote), math.log(vote)
    num = _logaddexp(a - F.softplus(-logits), b - F.softplus(-prior))  # softplus(-x) = -log σ(x)
    den = _logaddexp(a - F.softplus(logits), b - F.softplus(prior))
    return num - den


def _logaddexp(x: Tensor, y: Tensor) -> Tensor:
    # Spelled out: torch.logaddexp has no ONNX export.
    top = torch.maximum(x, y)
    return top + torch.log1p(torch.exp(-(x - y).abs()))


def gaussian_kernel(sigma: float) -> Tensor:
    """1-D Gaussian of width ≈ 4σ (odd), normalised; a single tap (no blur) for σ < 0.5."""
    if sigma < 0.5:
        return torch.ones(1)
    radius = int(2 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-t.pow(2) / (2 * sigma * sigma))
    return g / g.sum()


def blur(x: Tensor, kernel: Tensor) -> Tensor:
    """Separable Gaussian smoothing of N×1×H×W maps (reflect padding, same size).

    The nearest-patch map is blocky (one value per stride-8/16 cell, bilinearly upsampled);
    smoothing it, as PatchCore does, follows defect shapes better at pixel level."""
    k = kernel.numel()
    if k == 1:
        return x
    r = k // 2
    pad_h, pad_w = min(r, x.shape[-2] - 1), min(r, x.shape[-1] - 1)
    kern = kernel.to(x.dtype)
    y = F.conv2d(F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect"),
                 kern[r - pad_w:r + pad_w + 1].view(1, 1, 1, -1))
    return F.conv2d(F.pad(y, (0, 0, pad_h, pad_h), mode="reflect"),
                    kern[r - pad_h:r + pad_h + 1].view(1, 1, -1, 1))


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
