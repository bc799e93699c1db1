"""PRN loss (Zhang et al., CVPR 2023): SmoothL1(sigmoid(logits), mask) + λ · Focal(logits, mask).

The focal term is the binary focal loss −α_t (1 − p_t)^γ log p_t, written on logits with
logsigmoid so it stays finite for saturated logits (no log(sigmoid(x)) and no 1e-5 clamp as in
the public re-implementation). α weights the anomalous class and 1 − α the normal one; α = 0.5 reproduces the public code's
constant 0.5 factor. Soft masks interpolate linearly between the two class terms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prn_ray.config import TrainConfig


class LossOutput(NamedTuple):
    total: Tensor
    smooth_l1: Tensor
    focal: Tensor


def focal_loss_with_logits(logits: Tensor, target: Tensor, gamma: float = 4.0, alpha: float = 0.5
                           ) -> Tensor:
    """Mean binary focal loss; (1 − p_t)^γ is computed as exp(γ · logsigmoid(∓z))."""
    log_p = F.logsigmoid(logits)  # log p
    log_q = F.logsigmoid(-logits)  # log (1 − p)
    pos = -alpha * torch.exp(gamma * log_q) * log_p  # y = 1: p_t = p
    neg = -(1.0 - alpha) * torch.exp(gamma * log_p) * log_q  # y = 0: p_t = 1 − p
    return (target * pos + (1.0 - target) * neg).mean()


class PRNLoss(nn.Module):
    def __init__(self, gamma: float = 4.0, alpha: float = 0.5, lam: float = 5.0,
                 smooth_l1_beta: float = 1.0) -> None:
        super().__init__()
        self.gamma, self.alpha, self.lam, self.beta = gamma, alpha, lam, smooth_l1_beta

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> PRNLoss:
        return cls(gamma=cfg.focal_gamma, alpha=cfg.focal_alpha, lam=cfg.loss_lambda)

    def forward(self, logits: Tensor, mask: Tensor) -> LossOutput:
        """``logits`` N×1×H×W, ``mask`` N×1×H×W (or N×H×W) in [0, 1]."""
        if mask.dim() == logits.dim() - 1:
            mask = mask.unsqueeze(1)
        if mask.shape != logits.shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not match "
                             f"logits {tuple(logits.shape)}")
        z = logits.float()  # loss in float32 even under bf16 autocast
        y = mask.to(z.dtype)
        sl1 = F.smooth_l1_loss(torch.sigmoid(z), y, beta=self.beta)
        focal = focal_loss_with_logits(z, y, self.gamma, self.alpha)
        return LossOutput(sl1 + self.lam * focal, sl1, focal)
