"""Models on their device for inference, set up one way for every consumer: the backbone in
the feature stage, registered PRN models in the scoring and evaluation actors, ``predict``.

No Ray imports; the Ray adapters construct these inside their actors.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from prn_ray.config import StorageConfig
from prn_ray.model.inputs import images_to_tensor, inference_device, prepare


class RegisteredModels:
    """Registered PRN models on this process's device, each built once per (product, version).

    ``get`` raises what :func:`prn_ray.registry.load` raises (callers turn it into error rows);
    ``run`` returns the model's output and the forward time per image in milliseconds.
    """

    def __init__(self, storage_cfg: StorageConfig, threads: int = 1, use_gpu: bool = True,
                 runtime: str = "torch", precision: str = "fp32", streams: int = 1):
        from prn_ray.runtimes import resolve

        torch.set_num_threads(max(1, int(threads)))
        self.storage_cfg = storage_cfg
        self.threads = threads
        self.device = inference_device(use_gpu)
        # exported graphs are CPU runtimes: on a GPU the eager model is the fast path
        self.runtime, self.precision = resolve(runtime, precision, self.device)
        self.streams = streams  # calls that run the model at once (the graph runtimes' pools)
        self._models: dict[tuple[str, str], Any] = {}
        self.loads = 0  # models built by this process (tests check "once per actor")

    def get(self, product: str, version: str) -> Any:
        """The model of (product, version): an ``nn.Module`` on ``torch``, else a
        :class:`~prn_ray.runtimes.GraphModel`; both go to :meth:`probabilities`."""
        key = (product, version)
        if key not in self._models:
            from prn_ray import registry

            mv = registry.load(self.storage_cfg, product, version)
            prn = prepare(mv.build(), self.device, self.threads)
            if self.runtime != "torch":
                from prn_ray.runtimes import build_graph_model

                prn = build_graph_model(prn, product, version, mv.image_size, self.runtime,
                                        self.precision, self.threads, self.streams,
                                        mv.check_views)
            self._models[key] = prn
            self.loads += 1
        return self._models[key]

    @torch.inference_mode()
    def run(self, model: nn.Module, images: np.ndarray):
        """(PRNOutput, ms per image) of the eager ``model`` for B x H x W x 3 uint8 images at
        the model's size (bf16 autocast when the precision says so)."""
        from prn_ray.engine.optim import autocast

        x = images_to_tensor(images, self.device)
        t0 = time.perf_counter()
        with autocast(self.device, self.precision):
            out = model(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out, 1e3 * (time.perf_counter() - t0) / max(1, len(images))

    def probabilities(self, model: Any, views: np.ndarray) -> tuple[np.ndarray, float]:
        """(anomaly maps B x h x w float32, ms per view) of views at the model's size."""
        if not isinstance(model, nn.Module):  # an exported graph
            return model.probabilities(views)
        out, ms = self.run(model, views)
        return out.anomaly_map[:, 0].float().cpu().numpy(), ms
