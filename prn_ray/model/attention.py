"""Multi-size self-attention (PRN's MSA block).

For each patch size p, the map is cut into non-overlapping p×p patches, each patch is one token
of dimension d = C·p², and single-head attention runs over the tokens. Q/K/V are depthwise
(a learned per-dimension scale and bias, i.e. a 1×1 Conv1d with groups = d as in github.com/xcyao00/PRNet): a dense
d×d projection is infeasible for d up to 5·10⁵. The branches are concatenated and reduced by a
residual conv block. Patch sizes derive from the map size at build time, p = ceil(h / div); the
map is zero-padded to a multiple of p, so odd sizes work.

Two options spend the block's compute where it buys something (both exact rewrites or cheaper
layers, each behind a flag so the paper's layout stays available):

* ``single_token_affine``: the p = h branch has one token, its softmax is identically 1 and its
  output is V itself, an element-wise affine copy of the input: computed as that, with no Q/K.
* ``bottleneck``: a 1×1 convolution reduces the concatenated branches (branches × C channels)
  to C before the residual 3×3 block, instead of running the first 3×3 convolution on the full
  concatenation (which held most of the head's FLOPs).

``input_norm`` puts a GroupNorm in front of each block: the squared prototype residual is heavy
tailed (a few positions carry most of its energy), and without a norm the attention logits of
such maps reach std in the hundreds, the softmax saturates and Q/K stop receiving gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prn_ray.model.layers import NormKind, make_norm


def patch_sizes(size: tuple[int, int], divisors: Sequence[int]) -> list[tuple[int, int]]:
    """(ph, pw) = (ceil(h / div), ceil(w / div)) per divisor, duplicates removed (small maps)."""
    h, w = size
    out: list[tuple[int, int]] = []
    for div in divisors:
        if div < 1:
            raise ValueError(f"attention patch divisors must be >= 1, got {div}")
        p = (math.ceil(h / div), math.ceil(w / div))
        if p not in out:
            out.append(p)
    return out


class TokenAffine(nn.Module):
    """The one-token branch (p = h): softmax over one token is 1, so the output is V."""

    def __init__(self, channels: int, patch: tuple[int, int]) -> None:
        super().__init__()
        self.patch = patch
        # V of the depthwise projection, initialised like PatchAttention's (fan-in 1).
        self.weight = nn.Parameter(torch.empty(channels, *patch).uniform_(-1.0, 1.0))
        self.bias = nn.Parameter(torch.empty(channels, *patch).uniform_(-1.0, 1.0))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ph, pw = self.patch
        pad_h, pad_w = (-h) % ph, (-w) % pw
        x = F.pad(x, (0, pad_w, 0, pad_h))
        out = x * self.weight.to(x.dtype) + self.bias.to(x.dtype)
        return out[:, :, :h, :w]


class PatchAttention(nn.Module):
    """Self-attention among the p×p patches of a map, one token per patch."""

    def __init__(self, channels: int, patch: tuple[int, int],
                 scale: Literal["sqrt_d", "d"]) -> None:
        super().__init__()
        self.patch = patch
        dim = channels * patch[0] * patch[1]
        # Depthwise QKV initialised like Conv1d(d, d, 1, groups=d): fan-in 1 -> U(-1, 1).
        self.qkv_weight = nn.Parameter(torch.empty(3, dim).uniform_(-1.0, 1.0))
        self.qkv_bias = nn.Parameter(torch.empty(3, dim).uniform_(-1.0, 1.0))
        # 1/sqrt(d) is the standard choice; 1/d reproduces github.com/xcyao00/PRNet.
        self.scale = dim ** -0.5 if scale == "sqrt_d" else 1.0 / dim

    def _tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        b, c, h, w = x.shape
        ph, pw = self.patch
        pad_h, pad_w = (-h) % ph, (-w) % pw
        x = F.pad(x, (0, pad_w, 0, pad_h))  # no-op when p divides the map; no branch (tracing)
        nh, nw = (h + pad_h) // ph, (w + pad_w) // pw
        tokens = x.reshape(b, c, nh, ph, nw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, nh * nw, -1)
        return tokens, (nh, nw)

    def _weights(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        w_, b_ = self.qkv_weight.to(tokens.dtype), self.qkv_bias.to(tokens.dtype)
        q = tokens * w_[0] + b_[0]
        k = tokens * w_[1] + b_[1]
        v = tokens * w_[2] + b_[2]
        # Softmax in float32: the logits sum over d up to 10⁵ terms.
        attn = torch.softmax((q @ k.transpose(1, 2)).float() * self.scale, dim=-1).to(v.dtype)
        return attn, v

    def attention_weights(self, x: Tensor) -> Tensor:
        """B×L×L softmax weights this branch applies to the map ``x`` (diagnostics, tests)."""
        return self._weights(self._tokens(x)[0])[0]

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        ph, pw = self.patch
        tokens, (nh, nw) = self._tokens(x)
        attn, v = self._weights(tokens)
        out = (attn @ v).reshape(b, nh, nw, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
        out = out.reshape(b, c, nh * ph, nw * pw)
        return out[:, :, :h, :w]


class ResidualConvBlock(nn.Module):
    """conv3×3 → norm → ReLU → conv3×3 → norm, plus a 1×1 projection shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, norm: NormKind) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_ch)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class BottleneckBlock(nn.Module):
    """1×1 conv (in -> out) -> norm -> ReLU, then a residual conv3×3 pair at ``out`` channels."""

    def __init__(self, in_ch: int, out_ch: int, norm: NormKind) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False),
                                    make_norm(norm, out_ch), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_ch)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce(x)
        y = self.act(self.norm1(self.conv1(x)))
        return self.act(x + self.norm2(self.conv2(y)))


def _single_token(size: tuple[int, int], patch: tuple[int, int]) -> bool:
    return math.ceil(size[0] / patch[0]) == 1 and math.ceil(size[1] / patch[1]) == 1


class MSABlock(nn.Module):
    """One multi-size attention block: attention branches, concat, residual conv block."""

    def __init__(self, channels: int, patches: Sequence[tuple[int, int]],
                 scale: Literal["sqrt_d", "d"], norm: NormKind, *, size: tuple[int, int],
                 single_token_affine: bool = False, bottleneck: bool = False,
                 input_norm: bool = False) -> None:
        super().__init__()
        self.norm = make_norm("group", channels) if input_norm else nn.Identity()
        self.branches = nn.ModuleList(
            TokenAffine(channels, p) if single_token_affine and _single_token(size, p)
            else PatchAttention(channels, p, scale) for p in patches)
        block = BottleneckBlock if bottleneck else ResidualConvBlock
        self.fuse = block(channels * len(patches), channels, norm)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))


class MultiSizeAttention(nn.Sequential):
    """N stacked MSA blocks for one scale (independent weights per block)."""

    def __init__(self, channels: int, size: tuple[int, int], divisors: Sequence[int],
                 num_blocks: int, scale: Literal["sqrt_d", "d"] = "sqrt_d",
                 norm: NormKind = "group", *, single_token_affine: bool = False,
                 bottleneck: bool = False, input_norm: bool = False) -> None:
        patches = patch_sizes(size, divisors)
        super().__init__(*(MSABlock(channels, patches, scale, norm, size=size,
                                    single_token_affine=single_token_affine,
                                    bottleneck=bottleneck, input_norm=input_norm)
                           for _ in range(num_blocks)))
        self.patches = patches
