"""Inference runtimes for registered models: PyTorch eager (always), or the model's exported
ONNX graph run by onnxruntime or OpenVINO (``score.runtime``).

A graph is built from the registered model on the node that runs it, once per (product,
version) — a version never changes, so the file is cached by version in a local folder shared
by the node's processes — and checked before use: the views of held-out images registered
with the version (``check_views``; a version registered before them: the first views it is
asked to score) also go through the eager model, and the graph is refused
(:class:`RuntimeMismatch`, which the scorer turns into error rows naming the setting to
change) when the largest difference in any map pixel or view score exceeds :data:`TOLERANCE`
for its precision. So a runtime that disagrees with the model it was built from never writes
a row.

Precision: ``fp32``, ``bf16`` (OpenVINO's CPU plugin, or torch autocast; onnxruntime has no
bf16 CPU kernels and refuses it) or ``auto``; ``runtime: auto`` picks by the chip
(:func:`resolve`). No Ray imports.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prn_ray.config_checks import runtime_problem
from prn_ray.engine.optim import native_bf16

RUNTIMES = ("torch", "onnxruntime", "openvino")  # and "auto" (see resolve)
# Largest |difference| in probability accepted against the eager fp32 model, (any map pixel,
# any view's score). fp32 graphs only reorder sums (1e-6 seen). bf16 keeps 8 mantissa bits
# through a deep network, and a pixel on the steep part of the sigmoid moves most: on 120 real
# VisA tiles of a trained model 0.035 (pixel) / 0.030 (score), on out-of-distribution renders
# 0.106 / 0.011; a graph of another model differs by tenths to 1.
TOLERANCE = {"fp32": (1e-3, 1e-3), "bf16": (0.15, 0.05)}
CACHE_ENV = "PRN_RAY_GRAPH_CACHE"  # where built graphs are kept on a node


class RuntimeMismatch(RuntimeError):
    """An exported graph whose maps differ from its eager model beyond the tolerance."""


def resolve(runtime: str, precision: str, device: torch.device,
            native: bool | None = None) -> tuple[str, str]:
    """(runtime, precision) that ``score.runtime`` / ``score.precision`` mean on ``device``.

    Measured on 2 cores with AMX (``benchmarks/runtime_speed.py``, VisA tiles, trained model):
    against torch fp32, OpenVINO bf16 ran the model 2.4x as fast, OpenVINO fp32 1.2x,
    onnxruntime fp32 1.1x and torch bf16 autocast 1.2x; in the scoring job (graph build
    included) only OpenVINO bf16 was faster. So ``auto`` is OpenVINO in bf16 where the CPU has
    native bf16 and OpenVINO is installed, torch fp32 otherwise; ``precision: auto`` is bf16
    only where it pays: OpenVINO on such a CPU, or a CUDA GPU (which always runs torch)."""
    native = native_bf16(device) if native is None else native
    if device.type == "cuda":
        runtime = "torch"
    elif runtime == "auto":  # OpenVINO only where it can run: its package and onnx (export)
        can = runtime_problem("openvino") is None
        runtime = "openvino" if native and can and precision != "fp32" else "torch"
    if precision == "auto":
        fast = device.type == "cuda" or runtime == "openvino"
        precision = "bf16" if native and fast else "fp32"
    if precision == "bf16" and runtime == "onnxruntime":
        raise ValueError("onnxruntime has no bf16 CPU kernels: use score.precision fp32 or auto, "
                         "or score.runtime openvino")
    return runtime, precision


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "prn_ray_graphs")


def graph_file(prn: nn.Module, product: str, version: str, image_size: tuple[int, int]) -> Path:
    """The ONNX graph of ``prn`` (uint8 NHWC in, as :mod:`prn_ray.export` writes it), built
    once per version on this node; written to a temporary name and renamed, so concurrent
    builders on one node never read half a file."""
    from prn_ray.export import ONNX_OPSET, ImageModel, example_batch, export_graph

    path = cache_dir() / product / f"{version}-opset{ONNX_OPSET}-torch{torch.__version__}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        module = ImageModel(prn, "uint8").eval()
        data = export_graph(module, example_batch(image_size, "uint8", 2), "onnx")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


class GraphModel:
    """A registered model's exported graph on one runtime: ``probabilities`` like the eager
    model's, and the score rule's attributes (``score_kind``, ``score_topk``, ``area_kernel``)
    of the model it was built from. Thread-safe (OpenVINO: one inference request per stream,
    taken by a call for its duration)."""

    def __init__(self, prn: nn.Module, path: Path, runtime: str, precision: str,
                 threads: int, streams: int = 1, check_views: np.ndarray | None = None) -> None:
        self.score_kind, self.score_topk = prn.score_kind, prn.score_topk
        self.area_kernel = prn.area_kernel
        self.image_head = getattr(prn, "image_head", None)
        self.runtime, self.precision, self.path = runtime, precision, path
        self._eager: nn.Module | None = prn  # kept until the first views have been compared
        self._check = threading.Lock()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()  # OpenVINO's, one per stream
        self.check: dict[str, float] | None = None
        if runtime == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = max(1, threads), 1
            self._session = ort.InferenceSession(str(path), so,
                                                 providers=["CPUExecutionProvider"])
        elif runtime == "openvino":
            import openvino as ov

            core = ov.Core()
            # OpenVINO's own cache of the compiled model, beside the graph: the next actor on
            # this node (every nightly run starts new ones) loads it instead of compiling.
            core.set_property({"CACHE_DIR": str(path.parent / "openvino")})
            self._compiled = core.compile_model(str(path), "CPU", {
                "INFERENCE_NUM_THREADS": max(1, threads) * max(1, streams),
                "NUM_STREAMS": max(1, streams),
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"})
            # Requests owned here, not per calling thread: OpenVINO objects freed while a
            # thread's state is torn down crashed Ray's actor processes at exit.
            for _ in range(max(1, streams)):
                self._requests.put(self._compiled.create_infer_request())
        else:
            raise ValueError(f"runtime must be one of {RUNTIMES[1:]}, got {runtime!r}")
        if check_views is not None and len(check_views):  # checked here, before any row
            views = np.ascontiguousarray(check_views, dtype=np.uint8)
            self._compare(views, self._maps(views).astype(np.float32, copy=False),
                          "held-out check views")

    def _maps(self, views: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(views, dtype=np.uint8)
        if self.runtime == "onnxruntime":
            return self._session.run(["anomaly_map"], {"images": x})[0][:, 0]
        request = self._requests.get()  # blocks while every stream is busy
        try:
            return np.array(request.infer({0: x})[self._compiled.output(0)])[:, 0]
        finally:
            self._requests.put(request)

    def probabilities(self, views: np.ndarray) -> tuple[np.ndarray, float]:
        """(anomaly maps B x h x w float32, ms per view)."""
        t0 = time.perf_counter()
        maps = self._maps(views).astype(np.float32, copy=False)
        ms = 1e3 * (time.perf_counter() - t0) / max(1, len(views))
        if self._eager is not None:
            self._compare(views, maps, "the first views scored")
        return maps, ms

    def _compare(self, views: np.ndarray, maps: np.ndarray, what: str) -> None:
        from prn_ray.inference import ScoreRule
        from prn_ray.model.inputs import images_to_tensor

        with self._check:
            if self._eager is None:
                return
            with torch.inference_mode():
                want = self._eager(images_to_tensor(views)).anomaly_map[:, 0].float().numpy()
            rule = ScoreRule.of(self)
            d_map = float(np.abs(want - maps).max()) if len(views) else 0.0
            d_score = max((abs(rule(a) - rule(b)) for a, b in zip(want, maps)), default=0.0)
            tol_map, tol_score = TOLERANCE[self.precision]
            self.check = {"on": what, "views": len(views), "max_abs_map": d_map,
                          "max_abs_score": d_score, "tolerance_map": tol_map,
                          "tolerance_score": tol_score}
            if not (d_map <= tol_map and d_score <= tol_score):  # NaN fails too
                raise RuntimeMismatch(
                    f"score.runtime {self.runtime} ({self.precision}) differs from the eager "
                    f"model on {len(views)} views ({what}): max |map| {d_map:.3g} (tolerance "
                    f"{tol_map:g}), max |score| {d_score:.3g} (tolerance {tol_score:g}); use "
                    "score.runtime=torch or score.precision=fp32")
            self._eager = None  # checked: the eager model's memory goes back


def build_graph_model(prn: nn.Module, product: str, version: str, image_size: tuple[int, int],
                      runtime: str, precision: str, threads: int, streams: int = 1,
                      check_views: np.ndarray | None = None) -> GraphModel:
    """``prn``'s graph on ``runtime``, checked on ``check_views`` when given, with a clear
    error when its package is missing."""
    problem = runtime_problem(runtime)
    if problem:
        raise ImportError(problem)
    path = graph_file(prn, product, version, image_size)
    return GraphModel(prn, path, runtime, precision, threads, streams, check_views)
