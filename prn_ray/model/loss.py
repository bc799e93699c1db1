"""PRN loss (Zhang et al., CVPR 2023): SmoothL1(sigmoid(logits), mask) + λ · Focal(logits, mask).

The focal term is the binary focal loss −α_t (1 − p_t)^γ log p_t, written on logits with
logsigmoid so it stays finite for saturated logits (no log(sigmoid(x)) and no 1e-5 clamp as in
github.com/xcyao00/PRNet). α weights the anomalous class and 1 − α the normal one; α = 0.5 reproduces that code's
constant 0.5 factor. Soft masks interpolate linearly between the two class terms.

Image-level labels (PRN's first limitation: it needs a mask for every seen defect): a row whose
mask is :data:`~prn_ray.contracts.MASK_UNKNOWN` is a defective image whose defect was never
drawn. Its pixels leave the pixel terms (what they are is not known), and a multiple-instance
term says the one thing that is known -- the image is defective somewhere: the mean of its
``topk`` highest logits (the image score's own pooling, so training asks for what scoring
reads) must be high, ``−log σ(pooled)``, averaged over the batch's rows and weighted by
``image_weight``. A bag's top-k are its most anomalous instances, so the gradient reaches the
defect if the map already ranks it near the top, and otherwise the image's most unusual region
(the classic MIL max-instance assumption).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prn_ray.config import TrainConfig
from prn_ray.contracts import MASK_UNKNOWN


class LossOutput(NamedTuple):
    total: Tensor
    smooth_l1: Tensor
    focal: Tensor
    image: Tensor  # the image-level (multiple-instance) term, 0 without image-labelled rows


def focal_loss_with_logits(logits: Tensor, target: Tensor, gamma: float = 4.0, alpha: float = 0.5,
                           weight: Tensor | None = None) -> Tensor:
    """Mean binary focal loss; (1 − p_t)^γ is computed as exp(γ · logsigmoid(∓z)). With
    ``weight`` (0/1 per pixel) the mean is over the weighted pixels."""
    log_p = F.logsigmoid(logits)  # log p
    log_q = F.logsigmoid(-logits)  # log (1 − p)
    pos = -alpha * torch.exp(gamma * log_q) * log_p  # y = 1: p_t = p
    neg = -(1.0 - alpha) * torch.exp(gamma * log_p) * log_q  # y = 0: p_t = 1 − p
    return _mean(target * pos + (1.0 - target) * neg, weight)


def _mean(x: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return x.mean()
    return (x * weight).sum() / weight.sum().clamp_min(1.0)


def topk_mean(logits: Tensor, k: int) -> Tensor:
    """Per row (N×1×H×W -> N) the mean of the ``k`` highest values."""
    flat = logits.flatten(1)
    return flat.topk(min(int(k), flat.shape[1]), dim=1).values.mean(1)


class PRNLoss(nn.Module):
    def __init__(self, gamma: float = 4.0, alpha: float = 0.5, lam: float = 5.0,
                 smooth_l1_beta: float = 1.0, image_weight: float = 1.0, topk: int = 100
                 ) -> None:
        super().__init__()
        self.gamma, self.alpha, self.lam, self.beta = gamma, alpha, lam, smooth_l1_beta
        self.image_weight, self.topk = image_weight, topk

    @classmethod
    def from_config(cls, cfg: TrainConfig, topk: int = 100) -> PRNLoss:
        return cls(gamma=cfg.focal_gamma, alpha=cfg.focal_alpha, lam=cfg.loss_lambda,
                   image_weight=cfg.image_label_weight, topk=topk)

    def forward(self, logits: Tensor, mask: Tensor) -> LossOutput:
        """``logits`` N×1×H×W, ``mask`` N×1×H×W (or N×H×W) in [0, 1], or
        :data:`~prn_ray.contracts.MASK_UNKNOWN` where a pixel's label is not known."""
        if mask.dim() == logits.dim() - 1:
            mask = mask.unsqueeze(1)
        if mask.shape != logits.shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not match "
                             f"logits {tuple(logits.shape)}")
        z = logits.float()  # loss in float32 even under bf16 autocast
        # No branch on the data (the graph stays static: meta-device and compiled runs).
        unknown = mask == MASK_UNKNOWN
        weight = (~unknown).to(z.dtype)
        y = mask.to(z.dtype) * weight
        bags = unknown.flatten(1).any(1).to(z.dtype)
        image = (-F.logsigmoid(topk_mean(z, self.topk)) * bags).sum() / z.shape[0]
        sl1 = _mean(F.smooth_l1_loss(torch.sigmoid(z), y, beta=self.beta, reduction="none"),
                    weight)
        focal = focal_loss_with_logits(z, y, self.gamma, self.alpha, weight)
        return LossOutput(sl1 + self.lam * focal + self.image_weight * image, sl1, focal, image)
