"""How the head is optimised: AdamW parameter groups, the learning-rate schedule, precision."""

from __future__ import annotations

import contextlib
import math

import torch

from prn_ray.config import TrainConfig


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str,
              time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 1 % (or constant) over the budget.

    The budget is whichever runs out first: steps, or wall-clock time (``time_fraction`` =
    elapsed / time budget), so a run stopped by its time budget has already annealed instead
    of stopping at a high learning rate.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total_steps <= warmup:
        return 1.0
    t = min(1.0, max((step - warmup) / max(1, total_steps - warmup), time_fraction))
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(head: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled decay on convolution and linear weights only (``adamw``), or the
    Adam of github.com/xcyao00/PRNet with coupled L2 on every parameter (``adam``).

    Norm scales/shifts, biases, the attention's depthwise Q/K/V (a per-dimension scale and
    shift) and the prior's few scalars are not decayed: with coupled L2 after gradient
    clipping, their decay term was two orders of magnitude larger than the loss gradient and
    they shrank instead of learning.
    """
    if tc.optimizer == "adam":
        return torch.optim.Adam(head.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    decay, no_decay = parameter_groups(head)
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)


def parameter_groups(head: torch.nn.Module) -> tuple[list[torch.nn.Parameter],
                                                     list[torch.nn.Parameter]]:
    """(decayed, not decayed): the weights of Conv/Linear layers vs everything else."""
    decayed = {id(m.weight) for m in head.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Conv1d))}
    params = [p for p in head.parameters() if p.requires_grad]
    return ([p for p in params if id(p) in decayed], [p for p in params if id(p) not in decayed])


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls/convolutions run natively (CUDA, AVX-512 BF16 or AMX CPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
