"""PRN assembly: frozen backbone, shapes, ablation switches, prototypes, scores, export."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from prn_ray.config import ModelConfig
from prn_ray.model import PRN, PRNHead, PRNLoss, build_prn, image_score
from prn_ray.model.attention import patch_sizes
from prn_ray.model.fusion import MultiScaleFusion
from prn_ray.model.reference import NormalReference, fit_reference

torch.set_num_threads(1)

R18 = [64, 128, 256, 512]


def small_cfg(**kw) -> ModelConfig:
    base = dict(backbone="resnet18", weights="none", attention_blocks=1, decoder_width=0.25,
                attention_patch_sizes=[1, 2, 4], prior_bank_size=64)
    base.update(kw)
    return ModelConfig(**base)


def fit_from_images(prn: PRN, cfg: ModelConfig, n: int = 6, ratio: float = 0.4,
                    size: int = 64) -> None:
    """Reference from n random images, prior calibrated on 3 others (random init: shapes and
    plumbing only)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        feats = prn.backbone(torch.rand(n + 3, 3, size, size, generator=g))
    cfg = ModelConfig(**{**cfg.__dict__, "prototype_ratio": ratio, "kmeans_iters": 5})
    prn.head.set_reference(fit_reference([f[:n].half() for f in feats], cfg))
    prn.head.calibrate([f[n:] for f in feats])


def placeholder_feats(n: int = 1, channels=R18, size: int = 64) -> list[torch.Tensor]:
    return [torch.rand(n, c, size // s, size // s) for c, s in zip(channels, [4, 8, 16, 32])]


@pytest.fixture(scope="module")
def r18_prn() -> PRN:
    prn = build_prn(small_cfg(), 64)
    fit_from_images(prn, small_cfg())
    return prn


# ----------------------------------------------------------------------------- backbone


def test_backbone_stays_eval_and_frozen(r18_prn):
    prn = r18_prn
    bn_stats = {k: v.clone() for k, v in prn.backbone.state_dict().items() if "running" in k}
    assert bn_stats
    prn.train()
    assert prn.head.training
    assert not prn.backbone.training
    assert not any(m.training for m in prn.backbone.modules())
    out = prn(torch.rand(2, 3, 64, 64))
    PRNLoss()(out.logits, torch.zeros_like(out.logits)).total.backward()
    for k, v in prn.backbone.state_dict().items():
        if k in bn_stats:
            assert torch.equal(v, bn_stats[k]), f"{k} changed in train mode"
    assert all(p.grad is None and not p.requires_grad for p in prn.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in prn.head.parameters())
    prn.zero_grad(set_to_none=True)
    prn.eval()


def test_random_backbone_is_labelled(caplog):
    with caplog.at_level("WARNING"):
        prn = build_prn(small_cfg(), 64)
    assert "RANDOM" in prn.backbone.weights_label
    assert any("random weights" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("backbone", "size", "divisors", "channels"),
    [
        ("resnet18", 64, [1, 2, 4], R18),
        ("tf_efficientnet_lite0", 64, [1, 2, 4], [24, 40, 112, 320]),
        ("resnet18", 96, [1, 2, 4, 8], R18),  # not a power of two
        ("tf_efficientnet_lite0", 100, [1, 2, 4, 8], [24, 40, 112, 320]),  # odd map sizes
    ],
)
def test_output_shapes(backbone, size, divisors, channels):
    cfg = small_cfg(backbone=backbone, attention_patch_sizes=divisors)
    prn = build_prn(cfg, size)
    assert prn.backbone.channels == channels
    assert prn.backbone.strides == [4, 8, 16, 32]
    fit_from_images(prn, cfg, n=4, ratio=0.5, size=size)
    prn.eval()
    with torch.no_grad():
        out = prn(torch.rand(3, 3, size, size))
    assert out.logits.shape == out.anomaly_map.shape == (3, 1, size, size)
    assert out.score.shape == (3,)
    assert ((out.anomaly_map >= 0) & (out.anomaly_map <= 1)).all()
    torch.testing.assert_close(out.anomaly_map, torch.sigmoid(out.logits))


def test_patch_sizes_pad_odd_maps():
    assert patch_sizes((16, 16), [1, 2, 4, 8]) == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert patch_sizes((25, 25), [1, 2, 4, 8]) == [(25, 25), (13, 13), (7, 7), (4, 4)]
    assert patch_sizes((2, 2), [1, 2, 4, 8]) == [(2, 2), (1, 1)]  # duplicates dropped


def test_features_path_and_fp16_features(r18_prn):
    prn = r18_prn.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a = prn(images)
        feats = prn.backbone(images)
        b = prn(features=feats)
        c = prn(features=[f.half() for f in feats])
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.logits, c.logits, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError):
        PRN(prn.head)(images)  # images without a backbone


def test_head_without_backbone_from_channels():
    prn = build_prn(small_cfg(), 64, with_backbone=False, channels=R18)
    assert prn.backbone is None
    with pytest.raises(ValueError):
        build_prn(small_cfg(), 64, with_backbone=False)


def test_reference_must_be_set_explicitly():
    head = build_prn(small_cfg(), 64, with_backbone=False, channels=R18).head
    feats = placeholder_feats()
    assert head.reference_state == "unset"
    with pytest.raises(RuntimeError, match="normal reference is not set"):
        head(feats)
    head.use_placeholder_reference()
    assert head.reference_state == "placeholder"
    assert head(feats).shape == (1, 1, 64, 64)
    bad = NormalReference([torch.zeros(c) for c in R18], [torch.ones(c) for c in R18],
                          [torch.zeros(2, 3, 16, 16)] * 3, [], 2)  # wrong channel count
    with pytest.raises(ValueError):
        head.set_reference(bad)


def test_prior_must_be_calibrated_before_scoring(r18_prn):
    head = build_prn(small_cfg(), 64, with_backbone=False, channels=R18).head
    src = r18_prn.head
    head.set_reference(NormalReference(
        [getattr(src, f"input_mean_{j}") for j in range(4)],
        [getattr(src, f"input_std_{j}") for j in range(4)], src.prototypes,
        src.memory.banks, 6))
    with pytest.raises(RuntimeError, match="not calibrated"):
        head(placeholder_feats())


def test_state_dict_roundtrip_restores_the_reference(r18_prn):
    src = r18_prn.head
    k = src.prototypes[0].shape[0]
    assert k == 2
    assert [b.shape[0] for b in src.memory.banks] == [64, 64, 24]  # 6 images x 2x2 at stride 32
    dst = build_prn(small_cfg(), 64, with_backbone=False, channels=R18).head
    dst.load_state_dict(src.state_dict())
    assert dst.reference_state == "fitted" and dst.memory.ready
    assert all(torch.equal(a, b) for a, b in zip(dst.prototypes, src.prototypes))
    assert all(torch.equal(a, b) for a, b in zip(dst.memory.banks, src.memory.banks))
    torch.testing.assert_close(dst.memory.calibration, src.memory.calibration)
    feats = placeholder_feats(2)
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(src(feats), dst(feats))


# ----------------------------------------------------------------------------- fusion


def test_fusion_handles_non_multiple_channels_and_odd_sizes():
    mf = MultiScaleFusion([24, 40, 112], [4, 8, 16])
    xs = [torch.rand(1, 24, 25, 25), torch.rand(1, 40, 13, 13), torch.rand(1, 112, 7, 7)]
    out = mf(xs)
    assert [tuple(o.shape) for o in out] == [tuple(x.shape) for x in xs]
    down = mf.paths[2][0].conv  # 24 -> 112 (x4): 112 % 24 != 0, so groups = gcd = 8
    assert down.groups == 8 and down.kernel_size == (5, 5) and down.stride == (4, 4)
    r18 = MultiScaleFusion([64, 128, 256], [4, 8, 16])
    assert r18.paths[1][0].conv.groups == 64 and r18.paths[1][0].conv.kernel_size == (3, 3)


# ----------------------------------------------------------------------------- ablations


def _names(head: PRNHead) -> set[str]:
    return {n.split(".")[0] for n, _ in head.named_parameters()} | {
        n for n, _ in head.named_buffers() if n.startswith("prototypes_")}


def _fuse_in(head: PRNHead) -> int:
    fuse = head.attention[0][0].fuse
    return fuse.reduce[0].in_channels if hasattr(fuse, "reduce") else fuse.conv1.in_channels


@pytest.mark.parametrize("flag", ["use_prototypes", "use_attention", "use_fusion", "share_mf1"])
def test_ablation_switches_change_structure_and_run(flag):
    full = build_prn(small_cfg(), 64, with_backbone=False, channels=R18).head
    value = flag == "share_mf1"  # share_mf1 defaults to False; the others default to True
    abl = build_prn(small_cfg(**{flag: value}), 64, with_backbone=False, channels=R18).head
    n_full = sum(p.numel() for p in full.parameters())
    n_abl = sum(p.numel() for p in abl.parameters())
    assert n_abl < n_full
    names = _names(abl)
    if flag == "use_prototypes":
        assert not any(n.startswith("prototypes_") for n in names) and "mf1_residual" not in names
        # MSA sees the fused features alone: C_j channels per branch, not 2·C_j.
        assert _fuse_in(abl) == 3 * 64
        assert _fuse_in(full) == 3 * 128
    elif flag == "use_attention":
        assert "attention" not in names
    elif flag == "use_fusion":
        assert not {"mf1", "mf1_residual", "mf2"} & names
    else:
        assert "mf1_residual" not in names and "mf1" in names
    abl.use_placeholder_reference()
    assert abl(placeholder_feats(2)).shape == (2, 1, 64, 64)


def test_group_norm_default_and_batch_option():
    head = build_prn(small_cfg(), 64, with_backbone=False, channels=R18).head
    assert any(isinstance(m, nn.GroupNorm) for m in head.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in head.modules())
    head_bn = build_prn(small_cfg(norm="batch"), 64, with_backbone=False, channels=R18).head
    assert any(isinstance(m, nn.BatchNorm2d) for m in head_bn.modules())


# ----------------------------------------------------------------------------- scores


def test_image_scores():
    amap = torch.zeros(2, 1, 32, 32)
    amap[0, 0, 10:15, 10:15] = 1.0  # a compact 5×5 defect
    amap[1, 0, 3, 3] = 1.0  # one hot pixel
    assert torch.allclose(image_score(amap, "max"), torch.ones(2))
    topk = image_score(amap, "topk_mean", topk=100)
    torch.testing.assert_close(topk, torch.tensor([25 / 100, 1 / 100]))
    # k is capped at H·W: top-10000 of a 32×32 map is the plain mean.
    torch.testing.assert_close(image_score(amap, "topk_mean", topk=10_000), amap.flatten(1).mean(1))
    # area: the compact defect keeps its full probability, the lone pixel is diluted to 1/9.
    torch.testing.assert_close(image_score(amap, "area", kernel=3), torch.tensor([1.0, 1 / 9]))
    with pytest.raises(ValueError):
        image_score(amap, "median")


# ----------------------------------------------------------------------------- export


def _trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation + GroupNorm's internal TracerWarnings
        return torch.jit.trace(model, (example,), strict=False)


def test_torchscript_trace_matches_eager():
    cfg = small_cfg(attention_patch_sizes=[1, 2, 4, 8])
    prn = build_prn(cfg, 64)
    assert "RANDOM" in prn.backbone.weights_label  # random-init weights, labelled
    fit_from_images(prn, cfg, n=6, ratio=0.5)  # K = 3 per scale, so matching matters
    prn.eval()
    traced = _trace(prn, torch.rand(2, 3, 64, 64))
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        eager = prn(x)
        got = traced(x)
    for a, b in zip(eager, got):
        torch.testing.assert_close(a, b)


def test_torch_export_matches_eager(r18_prn):
    prn = r18_prn.eval()
    program = torch.export.export(prn, (torch.rand(2, 3, 64, 64),))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        eager = prn(x)
        got = program.module()(x)
    for a, b in zip(eager, got):
        torch.testing.assert_close(a, b)


def test_memory_search_of_exported_graphs_matches_eager():
    """Exported graphs search the patch memory in blocks of positions (any batch size), eager
    code in blocks of rows: same distances, and both equal the brute-force nearest distance."""
    from prn_ray.model.memory import nearest_distance, nearest_distance_map, patch_rows

    g = torch.Generator().manual_seed(0)
    x, bank = torch.randn(3, 8, 20, 20, generator=g), torch.randn(300, 8, generator=g)
    sq = bank.pow(2).sum(1)
    rows = nearest_distance(patch_rows(x), bank, sq, chunk=100).view(3, 20, 20)
    brute = torch.cdist(patch_rows(x), bank).amin(1).view(3, 20, 20)
    torch.testing.assert_close(rows, brute, atol=1e-4, rtol=0)
    for positions in (7, 400, None):  # blocks that straddle images' rows, one block, default
        got = nearest_distance_map(x, bank, sq, positions)
        torch.testing.assert_close(got, rows, atol=1e-5, rtol=0)


# ONNX (and TorchScript from pixels to map + score, loaded back and compared on real images):
# tests/unit/model/test_export.py.


def test_forward_is_device_agnostic():
    """No tensor is created on a fixed device inside forward: the model runs on 'meta'."""
    prn = build_prn(small_cfg(), 64)
    prn.head.use_placeholder_reference()
    prn = prn.to("meta")
    out = prn(torch.rand(2, 3, 64, 64, device="meta"))
    assert out.logits.device.type == out.score.device.type == "meta"
    assert out.anomaly_map.shape == (2, 1, 64, 64)
    loss = PRNLoss()(out.logits, torch.zeros(2, 1, 64, 64, device="meta"))
    assert loss.total.device.type == "meta"


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_folded_backbone_gives_the_same_features_without_batchnorm(name):
    """Random-init weights (model.weights=none) with non-trivial BatchNorm statistics, so a
    wrong fold cannot agree by accident."""
    from prn_ray.model import Backbone

    backbone = Backbone(name, "none")
    gen = torch.Generator().manual_seed(1)
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    folded = backbone.folded()
    assert folded is not backbone
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())  # original untouched
    x = torch.rand(3, 3, 96, 96, generator=gen)
    with torch.no_grad():
        for a, b in zip(backbone(x), folded(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_a_fold_that_changes_features_is_not_used(monkeypatch):
    import prn_ray.model.backbone as backbone_module

    real = backbone_module.fold_batchnorm

    def wrong(module):  # folds, then scales one convolution twice
        n = real(module)
        next(m for m in module.modules() if isinstance(m, nn.Conv2d)).weight.mul_(2)
        return n

    monkeypatch.setattr(backbone_module, "fold_batchnorm", wrong)
    backbone = backbone_module.Backbone("resnet18", "none")
    assert backbone.folded() is backbone


def test_voted_logits_are_the_mixture_of_probabilities_and_keep_order_in_the_tails():
    from prn_ray.model.prn import voted_logits

    g = torch.Generator().manual_seed(0)
    logits, prior = torch.randn(4096, generator=g) * 12, torch.randn(4096, generator=g) * 12
    for vote in (0.0, 0.25, 0.5, 1.0):
        want = (1 - vote) * torch.sigmoid(logits.double()) + vote * torch.sigmoid(prior.double())
        got = torch.sigmoid(voted_logits(logits, prior, vote).double())
        assert torch.allclose(got, want, atol=1e-6), vote
    # Deep in the tails float32 probabilities tie at 0 or 1; the voted logits still order them.
    deep = voted_logits(torch.tensor([-90.0, -95.0, 90.0, 95.0]),
                        torch.tensor([-90.0, -90.0, 90.0, 90.0]), 0.25)
    assert deep[0] > deep[1] and deep[3] > deep[2] and torch.isfinite(deep).all()
    # An untrained head (correction 0) keeps the prior's map.
    assert torch.allclose(voted_logits(prior, prior, 0.25), prior, atol=1e-4)
