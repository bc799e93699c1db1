"""U-Net-like decoder (PRN Fig. 3): from the deepest encoder map up through the fused skips.

Widths follow the encoder: stage j outputs round(width · C_j) channels, so ResNet18 at width 1
gives the paper's 256 / 128 / 64 (Fig. 3). Every upsampling goes to the skip map's actual size (bilinear,
align_corners=True as in github.com/xcyao00/PRNet), so sizes that are not powers of two work.

``logit_stride`` > 1 computes the last conv block and the logits on a grid ``stride`` times
coarser than the output and resizes the logits bilinearly: the paper's full-resolution last
block is ≈ 15 % of the head's FLOPs for a map whose detail the stride-4 skip already bounds.
The loss still sees logits at image resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prn_ray.model.layers import ConvNormAct, NormKind, autocast_off


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class UpStage(nn.Module):
    """Upsample to the skip's size, conv to ``out_ch``, concat the skip, two conv-norm-ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, norm: NormKind) -> None:
        super().__init__()
        self.up = ConvNormAct(in_ch, out_ch, norm)
        self.merge = nn.Sequential(ConvNormAct(out_ch + skip_ch, out_ch, norm),
                                   ConvNormAct(out_ch, out_ch, norm))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(_resize(x, skip.shape[-2:]))
        return self.merge(torch.cat([x, skip], dim=1))


class Decoder(nn.Module):
    """``deep`` (stride 32) + skips (strides 4, 8, 16) -> 1-channel logits at ``out_size``."""

    def __init__(self, encoder_channels: Sequence[int], skip_channels: Sequence[int],
                 width: float = 1.0, norm: NormKind = "group", logit_stride: int = 1,
                 zero_init: bool = False, extra_channels: int = 0) -> None:
        super().__init__()
        if len(encoder_channels) != 4 or len(skip_channels) != 3:
            raise ValueError("decoder needs 4 encoder widths and 3 skip widths")
        widths = [max(1, round(width * c)) for c in encoder_channels[:3]]
        deep = encoder_channels[3]
        # Coarse to fine: (in, skip, out) per stage.
        self.stages = nn.ModuleList([
            UpStage(deep, skip_channels[2], widths[2], norm),
            UpStage(widths[2], skip_channels[1], widths[1], norm),
            UpStage(widths[1], skip_channels[0], widths[0], norm),
        ])
        # ``extra`` maps (e.g. the prior's z-maps) join the last block on the logit grid.
        self.final = ConvNormAct(widths[0] + extra_channels, widths[0], norm)
        self.head = nn.Conv2d(widths[0], 1, 3, padding=1)
        if logit_stride < 1:
            raise ValueError(f"logit_stride must be >= 1, got {logit_stride}")
        self.logit_stride = int(logit_stride)
        if zero_init:  # a correction on top of a prior: the model starts as the prior
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, deep: Tensor, skips: list[Tensor], out_size: Sequence[int],
                extra: Tensor | None = None) -> Tensor:
        x = deep
        for stage, skip in zip(self.stages, reversed(skips)):
            x = stage(x, skip)
        h, w = int(out_size[0]), int(out_size[1])
        grid = (-(-h // self.logit_stride), -(-w // self.logit_stride))
        if tuple(x.shape[-2:]) != grid:
            x = _resize(x, grid)
        if extra is not None:
            x = torch.cat([x, _resize(extra.to(x.dtype), grid)], dim=1)
        x = self.final(x)
        # The logits in float32 even under bf16 autocast: an 8-bit mantissa would tie the
        # pixels whose ranking the pixel metrics measure.
        with autocast_off(x.device.type):
            logits = self.head(x.float())
            return logits if grid == (h, w) else _resize(logits, (h, w))
