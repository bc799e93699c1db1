"""HRNet-style multi-scale fusion (PRN's MF block): out_j = Σ_i f_ij(x_i).

f_ij is the identity for i = j; for a coarser source a 1×1 conv then a bilinear resize to the
target's size; for a finer source a grouped strided conv. No norm, no activation (as in github.com/xcyao00/PRNet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Up(nn.Module):
    """Coarse -> fine: 1×1 conv, then bilinear resize to the target map's actual size.

    The unofficial code (github.com/xcyao00/PRNet) resizes first, then convolves; both are linear and the interpolation weights sum
    to one, so the order does not change the result, and convolving the small map is cheaper.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return F.interpolate(self.proj(x), size=size, mode="bilinear", align_corners=True)


class Down(nn.Module):
    """Fine -> coarse by ``factor`` (a power of two): one grouped conv, kernel factor+1.

    factor 2: kernel 3 / pad 1; factor 4: kernel 5 / pad 2. github.com/xcyao00/PRNet uses
    groups = C_in (each input channel feeds C_out / C_in outputs); timm widths such as
    EfficientNet's 24/40/112 are not multiples of each other, so then groups = gcd(C_in, C_out).
    """

    def __init__(self, in_ch: int, out_ch: int, factor: int, resize: bool = False) -> None:
        super().__init__()
        groups = in_ch if out_ch % in_ch == 0 else math.gcd(in_ch, out_ch)
        self.conv = nn.Conv2d(in_ch, out_ch, factor + 1, stride=factor, padding=factor // 2,
                              groups=groups)
        # The conv gives ceil(h / factor), which is what timm CNNs produce; a backbone that
        # rounds differently gets a final resize (decided at build time, so traces are static).
        self.resize = resize

    @staticmethod
    def out_size(h: int, factor: int) -> int:
        return (h + 2 * (factor // 2) - (factor + 1)) // factor + 1

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        y = self.conv(x)
        if self.resize or (not torch.jit.is_tracing() and y.shape[-2:] != size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
        return y


class Same(nn.Module):
    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return x


class MultiScaleFusion(nn.Module):
    """Fuse maps with ``channels[j]`` channels at ``strides[j]``; channels are kept per scale.

    ``sizes`` (the maps' H×W at the configured image size) lets downsampling paths whose conv
    arithmetic misses the target size resize statically.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int],
                 sizes: Sequence[tuple[int, int]] | None = None) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError("channels and strides must have the same length")
        rows = []
        for j, (c_out, s_out) in enumerate(zip(channels, strides)):
            row = []
            for i, (c_in, s_in) in enumerate(zip(channels, strides)):
                if i == j:
                    row.append(Same())
                elif s_in > s_out:
                    row.append(Up(c_in, c_out))
                else:
                    f = s_out // s_in
                    resize = sizes is not None and any(
                        Down.out_size(a, f) != b for a, b in zip(sizes[i], sizes[j]))
                    row.append(Down(c_in, c_out, f, resize))
            rows.append(nn.ModuleList(row))
        self.paths = nn.ModuleList(rows)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        out = []
        for j, row in enumerate(self.paths):
            size = xs[j].shape[-2:]
            acc = xs[j]
            for i, op in enumerate(row):
                if i != j:
                    acc = acc + op(xs[i], size)
            out.append(acc)
        return out
