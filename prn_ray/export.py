"""Export a registered model as ONE graph: image batch -> (anomaly map, image score).

The graph is the registered :class:`~prn_ray.model.PRN` (frozen backbone with its input
normalisation, head, patch-memory prior, sigmoid, image score) behind the input conversion the
scoring job uses (:func:`prn_ray.model.inputs.pixels_to_input`), so an exported model needs nothing
of this package at run time. Input (``input_dtype``):

* ``uint8``: N x S x S x 3 RGB, 0..255 (NHWC: what image decoders return), the default;
* ``float32``: N x 3 x S x S RGB in [0, 1] (NCHW: what PyTorch pipelines hold).

S is the model's input size (h x w; one tile of a tiled model); the batch size is free.
Outputs: ``anomaly_map`` N x 1 x S x S float32 probabilities and ``score`` N float32; the
decision is ``score > threshold``. A tiled model's graph scores tiles: ``export.json``'s
``geometry`` says how an image is cut and its tile maps stitched, and :func:`predict_image` is
that loop around an exported graph (numpy + OpenCV + the graph's runtime).
Formats: TorchScript (``torch.jit.trace``; load with ``torch.jit.load``) and ONNX
(opset :data:`ONNX_OPSET`, TorchScript-based exporter; needs the ``onnx`` package, run with
onnxruntime). Written next to the model: ``export.json`` (:func:`export_manifest`) with the
preprocessing the graph expects, the threshold and where the model came from. No Ray imports.
"""

from __future__ import annotations

import io
import warnings
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prn_ray import storage
from prn_ray.config import StorageConfig
from prn_ray.contracts import dumps, id_time
from prn_ray.geometry import Geometry
from prn_ray.image_head import ImageHead
from prn_ray.inference import ScoreRule, in_batches, stitch_items
from prn_ray.model.inputs import pixels_to_input
from prn_ray.model.prn import area_kernel
from prn_ray.registry import ModelVersion

FORMATS = ("torchscript", "onnx")
INPUT_DTYPES = ("uint8", "float32")
MODEL_FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}
MANIFEST = "export.json"
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
ONNX_OPSET = 17
EXPORT_FORMAT = "prn_ray.export/1"


class ImageModel(nn.Module):
    """A PRN as one module from pixels to (anomaly map, image score)."""

    def __init__(self, prn: nn.Module, input_dtype: str = "uint8") -> None:
        super().__init__()
        if input_dtype not in INPUT_DTYPES:
            raise ValueError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
        self.prn = prn
        self.input_dtype = input_dtype

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = pixels_to_input(images) if self.input_dtype == "uint8" else images
        out = self.prn(x)
        return out.anomaly_map, out.score


def example_batch(size: tuple[int, int], input_dtype: str, n: int, seed: int = 0) -> Tensor:
    """Random images in the export's input layout (tracing input and self-check)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    if input_dtype == "uint8":
        return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)
    return torch.rand(n, 3, h, w, generator=g)


def export_graph(module: ImageModel, example: Tensor, fmt: str) -> bytes:
    """The serialised graph (``model.pt`` / ``model.onnx`` bytes) of ``module``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    module = module.eval()
    buf = io.BytesIO()
    # Tracing warns about shapes turned into constants: the image size is fixed by design
    # (the batch size is not: nothing in the model's control flow depends on it).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(module, (example,), strict=False), buf)
        else:
            axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
            torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=axes)
    return buf.getvalue()


def run_exported(data: bytes, fmt: str, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly maps, scores) of a serialised export on ``images`` (its input layout)."""
    if fmt == "torchscript":
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        with torch.no_grad():
            amap, score = module(images)
        return amap.numpy(), score.numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    amap, score = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})
    return amap, score


def max_differences(module: ImageModel, data: bytes, fmt: str, images: Tensor
                    ) -> dict[str, float]:
    """Largest absolute differences between the eager module and its export on ``images``."""
    with torch.no_grad():
        amap, score = module(images)
    got_map, got_score = run_exported(data, fmt, images)
    return {"anomaly_map": float(np.abs(amap.numpy() - got_map).max()),
            "score": float(np.abs(score.numpy() - got_score).max())}


def export_manifest(mv: ModelVersion, module: ImageModel, fmt: str) -> dict[str, Any]:
    """``export.json``: what the graph expects and returns, the threshold and the provenance."""
    h, w = mv.image_size
    g = mv.geometry
    backbone = module.prn.backbone
    mean = [round(float(v), 6) for v in backbone.mean.flatten()]
    std = [round(float(v), 6) for v in backbone.std.flatten()]
    if module.input_dtype == "uint8":
        inp = {"dtype": "uint8", "layout": "NHWC", "shape": ["batch", h, w, 3],
               "value_range": [0, 255]}
        in_graph = "x / 255, NHWC -> NCHW, then (x - mean) / std per channel"
    else:
        inp = {"dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, h, w],
               "value_range": [0.0, 1.0]}
        in_graph = "(x - mean) / std per channel"
    model_cfg = mv.config.model
    created = id_time(mv.version)
    return {
        "format_version": EXPORT_FORMAT,
        "format": fmt,
        "file": MODEL_FILES[fmt],
        "product": mv.product,
        "version": mv.version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_created_at": created.isoformat() if created else None,
        "input": {"name": INPUT_NAME, "channel_order": "RGB", **inp},
        "preprocessing": {
            "size": [h, w],
            "decode": "8-bit RGB; grey to 3 channels, alpha dropped, 16-bit / 257 "
                      "(prn_ray.images.decode_image)",
            "resize": RESIZE_TEXT,
            "in_graph": in_graph, "mean": mean, "std": std,
        },
        "geometry": {**g.to_doc(), "how": TILES_TEXT if g.tiled else (
            "one view per image: " + ("stretched to size" if g.fit == "stretch" else
                                      "fitted into size, aspect kept, reflect-padded at the "
                                      "bottom/right; the map is cropped to the fitted part"))},
        "outputs": {
            "anomaly_map": {"shape": ["batch", 1, h, w], "dtype": "float32",
                            "meaning": "anomaly probability per pixel at the model's size"},
            "score": {"shape": ["batch"], "dtype": "float32", "rule": model_cfg.score,
                      "topk": model_cfg.score_topk,
                      "meaning": ("the score of one tile: the image's score is the rule "
                                  "applied to the stitched map") if g.tiled else
                                 "the image's score",
                      **({"head": mv.image_head.to_doc(),
                          "image_score": ("the model has an image head: the image's score "
                                          "is head applied to the (stitched) anomaly_map, "
                                          "not this output (prn_ray.image_head)")}
                         if mv.image_head is not None else {})},
        },
        "threshold": mv.threshold,
        "decision": "is_anomaly = score > threshold",
        "calibration": mv.calibration,
        "backbone": model_cfg.backbone,
        "weights": model_cfg.weights,
        "torch": torch.__version__,
        **({"opset": ONNX_OPSET} if fmt == "onnx" else {}),
    }


RESIZE_TEXT = ("cv2.INTER_AREA on a shrinking axis, cv2.INTER_LINEAR on an enlarging one "
               "(prn_ray.geometry.resize_to)")
TILES_TEXT = (
    "resize the image by scale (working size = round(h * scale) x round(w * scale)), pad it "
    "at the bottom/right to at least one tile by reflection (cv2.BORDER_REFLECT_101), cut "
    "tiles of size at the origins of prn_ray.geometry.Geometry.boxes (per side: the fewest "
    "tiles overlapping by >= overlap px, spread evenly, the last flush with the border), run "
    "the graph on the tiles, blend their maps with weights falling linearly over overlap px "
    "towards each tile edge (prn_ray.geometry.Geometry.stitch), crop to the working size "
    "and score that map with outputs.score.rule; prn_ray.export.predict_image is this loop")


def predict_image(data: bytes, fmt: str, manifest: dict[str, Any], image: np.ndarray,
                  batch_size: int = 16) -> tuple[np.ndarray, float]:
    """(anomaly map at the image's working size, score) of one decoded RGB image through an
    exported graph, cut and stitched as ``manifest["geometry"]`` says: the loop a deployment
    without this package re-implements (a test holds it equal to the scoring job)."""
    g = Geometry.from_doc(manifest["geometry"])
    out = manifest["outputs"]["score"]
    h, w = image.shape[:2]
    rule = ScoreRule(out["rule"], int(out["topk"]), area_kernel(g.size),
                     ImageHead.from_doc(out["head"]) if out.get("head") else None)
    uint8 = manifest["input"]["dtype"] == "uint8"

    def run(views: np.ndarray) -> tuple[np.ndarray, float]:
        x = torch.from_numpy(views) if uint8 else torch.from_numpy(
            views.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
        amap, _ = run_exported(data, fmt, x)
        return amap[:, 0], 0.0

    views = g.views(image)
    probs, _ = in_batches(run, views, batch_size)
    m = stitch_items(probs, np.zeros(len(views), np.int64), np.arange(len(views)),
                     np.full(len(views), h), np.full(len(views), w), g, rule)[0]
    return m.amap, m.score


def export_model(mv: ModelVersion, fmt: str, out_uri: str, *, input_dtype: str = "uint8",
                 storage_cfg: StorageConfig | None = None, check: bool = True
                 ) -> dict[str, Any]:
    """Write ``<out_uri>/model.pt|model.onnx`` and then ``<out_uri>/export.json``; return the
    manifest. ``check`` loads the written graph back and records its largest difference from
    the eager model on random images at another batch size (``check`` in the manifest; skipped
    for ONNX without onnxruntime)."""
    module = ImageModel(mv.build().float().eval(), input_dtype).eval()
    data = export_graph(module, example_batch(mv.image_size, input_dtype, 2), fmt)
    doc = export_manifest(mv, module, fmt)
    if check:
        try:
            images = example_batch(mv.image_size, input_dtype, 3, seed=1)
            doc["check"] = {"images": "3 random", **max_differences(module, data, fmt, images)}
        except ImportError as exc:
            doc["check"] = f"skipped: {exc}"
    storage.write_bytes(storage.join(out_uri, MODEL_FILES[fmt]), data, storage_cfg)
    storage.write_text(storage.join(out_uri, MANIFEST), dumps(doc, indent=2) + "\n", storage_cfg)
    return doc
