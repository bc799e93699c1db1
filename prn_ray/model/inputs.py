"""A model's input and its device, one way for every consumer (the feature stage, the scoring
and evaluation actors, ``predict``, the exported graph's first step): uint8 images to the
backbone's float input, and a module set up on its device for inference."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def inference_device(use_gpu: bool = True) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def prepare(module: nn.Module, device: torch.device, threads: int = 1) -> nn.Module:
    """Threads set, on ``device``, eval mode, channels_last on CPU (oneDNN's fast layout)."""
    torch.set_num_threads(max(1, int(threads)))
    module = module.to(device).eval()
    if device.type == "cpu":
        module = module.to(memory_format=torch.channels_last)
    return module


def pixels_to_input(pixels: torch.Tensor) -> torch.Tensor:
    """B x H x W x 3 uint8 RGB -> B x 3 x H x W float in [0, 1] (the backbone normalises
    itself). Traceable: it is also the first step of the exported models (:mod:`prn_ray.export`)."""
    return pixels.permute(0, 3, 1, 2).float().div(255.0)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a CPU tensor without a copy where it can be: Ray hands read-only views
    of the object store, and only those (or non-contiguous arrays) are copied (torch warns on
    a read-only buffer and may not write through it)."""
    return torch.from_numpy(np.require(array, requirements=("C", "W")))


def images_to_tensor(batch_images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """B x H x W x 3 uint8 -> B x 3 x H x W float in [0, 1] (the backbone normalises itself)."""
    t = as_tensor(batch_images).to(device)
    return pixels_to_input(t).contiguous(memory_format=torch.channels_last)
