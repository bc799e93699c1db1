"""Helpers shared by the unit and integration tests (plain functions, no fixtures)."""

from __future__ import annotations

import importlib.util
import io
import socket
import struct
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label as sk_label

from prn_ray.images import encode_png

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY = REPO / "configs" / "tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def new_bucket(endpoint: str, prefix: str = "test") -> str:
    """A fresh bucket on the loopback S3 server; returns ``s3://<bucket>``."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def shared_data(name: str) -> Path:
    """Path of a real dataset under ../shared/data, or skip the test with a message."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {path} is absent (development-only dataset); skipping")
    return path


def job_main(script: str):
    """``main`` of ``jobs/<script>.py``, imported from its file (as ``python jobs/X.py`` runs)."""
    spec = importlib.util.spec_from_file_location(script, REPO / "jobs" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ----------------------------------------------------------------------------- image files


def rgb(h=40, w=56, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def pil_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A real small PNG whose IHDR is patched to claim width x height (valid CRC)."""
    data = bytearray(encode_png(np.zeros((8, 8), np.uint8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF  # type + 13 data bytes
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def bad_files() -> dict[str, tuple[bytes, str | None]]:
    """The crafted inputs: name -> (bytes, expected error reason or None for a good file)."""
    img = rgb(48, 64, seed=3)
    jpg = pil_bytes(Image.fromarray(img), "JPEG")
    png = encode_png(img)
    return {
        "good.png": (png, None),
        "grey.png": (encode_png(img[:, :, 0]), None),
        "deep16.png": (encode_png(img[:, :, 0].astype(np.uint16) * 257), None),
        "rgba.png": (pil_bytes(Image.fromarray(np.dstack([img, img[:, :, :1]]), "RGBA"), "PNG"),
                     None),
        "cmyk.jpg": (pil_bytes(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG"), None),
        "empty.png": (b"", "empty_file"),
        "trunc.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "trunc.png": (png[: len(png) // 2], "truncated"),
        "text.png": (b"just some text, not an image\n" * 4, "not_an_image"),
        "tiny.png": (encode_png(np.zeros((1, 1, 3), np.uint8)), "too_small"),
        "bomb.png": (png_with_size(50_000, 50_000), "too_large"),
    }


# ----------------------------------------------------------------------------- metrics


def clipped_area(x: list[float], y: list[float], limit: float) -> float:
    """Area under the polyline (x, y) over [0, limit]; x nondecreasing from 0."""
    area = 0.0
    for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:]):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
    return area


def ref_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """AUPRO@limit from its definition: every distinct score a threshold, 8-connected regions
    weighed equally, FPR over all normal pixels, trapezoid with interpolation at the limit."""
    masks = np.asarray(masks) > 0
    maps = np.asarray(maps, dtype=np.float64)
    regions = []
    for m, s in zip(masks, maps):
        lab = sk_label(m, connectivity=2)
        regions += [s[lab == r] for r in range(1, lab.max() + 1)]
    normal = maps[~masks]
    fprs, pros = [], []
    for t in [*np.unique(maps)[::-1], -np.inf]:  # score > t; first t = max gives (0, 0)
        fprs.append(float(np.mean(normal > t)))
        pros.append(float(np.mean([np.mean(r > t) for r in regions])))
    return clipped_area(fprs, pros, limit) / limit


# ----------------------------------------------------------------------------- registry


def publish_fitted(cfg, product: str, normals: list[np.ndarray], *, seed: int = 0,
                   version: str | None = None, geometry=None, check_views: bool = False,
                   calibration: dict | None = None) -> str:
    """Register a PRN for ``product`` without training: its normal reference and patch-memory
    prior fitted on ``normals`` (H x W x 3 uint8, any size; the last quarter calibrates the
    prior), the decoder's zero-initialised last convolution randomised so the head's own path
    reaches the output too, and the threshold at the median score of the calibration normals. With
    ``model.weights=none`` the backbone is random: scores mean nothing (plumbing and
    export-equivalence tests only). ``geometry`` (default: the whole image stretched to
    ``data.image_size``) cuts the normals into the views the reference is fitted on.
    ``check_views``: register the calibration normals' views as the version's check views
    (as training registers held-out views). ``calibration``: keys added to the version's
    calibration (e.g. an ``image_head``). Returns the version."""
    import torch

    from prn_ray import registry
    from prn_ray.geometry import Geometry, as_size
    from prn_ray.model import build_prn
    from prn_ray.model.inputs import images_to_tensor
    from prn_ray.model.reference import fit_reference

    geometry = geometry or Geometry(as_size(cfg.data.image_size))
    torch.manual_seed(seed)
    prn = build_prn(cfg.model, geometry.size, storage_cfg=cfg.storage)
    views = np.concatenate([geometry.views(im) for im in normals])
    x = images_to_tensor(views)
    k = max(1, len(x) * 3 // 4)
    with torch.no_grad():
        feats = prn.backbone(x)
        prn.head.set_reference(fit_reference([f[:k] for f in feats], cfg.model, seed=seed))
        prn.head.calibrate([f[k:] for f in feats])
        torch.nn.init.normal_(prn.head.decoder.head.weight, std=0.05)
        threshold = float(prn.eval()(x[k:]).score.median())
    return registry.publish(
        cfg, product, head_state=prn.head.state_dict(), backbone_state=prn.backbone.state_dict(),
        geometry=geometry, calibration={"threshold": threshold, "rule": "median (tests)",
                                        **(calibration or {})},
        metrics={"note": "tests/helpers.publish_fitted: fitted reference, no training"},
        version=version, check_views=views[k:] if check_views else None)


def demo_images(product: str, n: int, size: int, seed: int, role: int = 1,
                defect: str | None = None) -> list[np.ndarray]:
    """Demo-generator images as the decoder returns them (H x W x 3 uint8, via PNG)."""
    from prn_ray.demo_data import render
    from prn_ray.images import decode_image

    return [decode_image(encode_png(render(product, size, seed, role, i, defect)[0]))
            for i in range(n)]
