"""Small building blocks shared by the head modules (attention, decoder)."""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
from torch import nn
from torch.amp.autocast_mode import is_autocast_available

NormKind = Literal["group", "batch"]


def group_count(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """GroupNorm groups for any width (timm widths like 24/40/112 are not multiples of 32)."""
    groups = math.gcd(max_groups, channels)
    while groups > 1 and channels // groups < min_per_group:
        groups //= 2
    return max(groups, 1)


def make_norm(kind: NormKind, channels: int) -> nn.Module:
    # GroupNorm is the default: it has no running statistics, so eval-mode output equals what
    # training saw (BatchNorm running stats lagging the weights flattened eval maps in the
    # first CPU run of this project).
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be 'group' or 'batch', got {kind!r}")


class ConvNormAct(nn.Sequential):
    """conv3x3 -> norm -> ReLU (bias-free conv: the norm has its own shift)."""

    def __init__(self, in_ch: int, out_ch: int, norm: NormKind, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
            make_norm(norm, out_ch),
            nn.ReLU(inplace=True),
        )


def autocast_off(device_type: str):
    """A context with autocast disabled (float32 math inside a bf16/fp16 autocast region):
    for distances over long vectors and for the final logits, whose ranking is the product."""
    return (torch.autocast(device_type, enabled=False) if is_autocast_available(device_type)
            else contextlib.nullcontext())


def exporting() -> bool:
    """True while ``torch.jit.trace``, ``torch.export`` or the ONNX exporter records the model:
    Python control flow then becomes a fixed graph, so it must not depend on the batch size."""
    return (torch.jit.is_tracing() or torch.compiler.is_exporting()
            or torch.onnx.is_in_onnx_export())
