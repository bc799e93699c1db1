"""PRN loss against a from-definition float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from prn_ray.config import TrainConfig
from prn_ray.model.loss import PRNLoss

torch.set_num_threads(1)


def reference(logits: torch.Tensor, mask: torch.Tensor, gamma: float, alpha: float, lam: float):
    """Explicit formulas on probabilities, float64, element by element."""
    z, y = logits.double().flatten().tolist(), mask.double().flatten().tolist()
    sl1 = foc = 0.0
    for zi, yi in zip(z, y):
        p = 1.0 / (1.0 + math.exp(-zi))
        d = abs(p - yi)
        sl1 += 0.5 * d * d if d < 1.0 else d - 0.5
        # Binary focal: -alpha_t (1 - p_t)^gamma log(p_t), linear in the (soft) label.
        foc += -(alpha * yi * (1 - p) ** gamma * math.log(p)
                 + (1 - alpha) * (1 - yi) * p ** gamma * math.log(1 - p))
    n = len(z)
    return sl1 / n + lam * foc / n, sl1 / n, foc / n


@pytest.mark.parametrize(("gamma", "alpha", "lam"),
                         [(4.0, 0.5, 5.0), (2.0, 0.25, 1.0), (0.0, 0.75, 3.0)])
def test_matches_definition(gamma, alpha, lam):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 6, 7, generator=g) * 4
    mask = (torch.rand(2, 1, 6, 7, generator=g) > 0.7).float()
    mask[0, 0, 0, :3] = 0.5  # soft labels are interpolated
    cfg = TrainConfig(focal_gamma=gamma, focal_alpha=alpha, loss_lambda=lam)
    out = PRNLoss.from_config(cfg)(logits, mask)
    total, sl1, foc = reference(logits, mask, gamma, alpha, lam)
    assert out.total.item() == pytest.approx(total, rel=1e-5, abs=1e-7)
    assert out.smooth_l1.item() == pytest.approx(sl1, rel=1e-5, abs=1e-7)
    assert out.focal.item() == pytest.approx(foc, rel=1e-5, abs=1e-7)


def test_smooth_l1_is_half_mse_here():
    logits, mask = torch.randn(1, 1, 5, 5), torch.ones(1, 1, 5, 5)
    out = PRNLoss()(logits, mask)
    torch.testing.assert_close(out.smooth_l1, 0.5 * ((torch.sigmoid(logits) - mask) ** 2).mean())


def test_finite_for_saturated_logits():
    logits = torch.tensor([100.0, -100.0, 100.0, -100.0]).view(1, 1, 2, 2).requires_grad_()
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    loss = PRNLoss(gamma=4.0, alpha=0.5, lam=5.0)
    out = loss(logits, mask)
    out.total.backward()
    assert torch.isfinite(out.total) and torch.isfinite(logits.grad).all()
    # Two right (≈0) and two confidently wrong pixels: focal ≈ 0.5·100 each, SmoothL1 = 0.5 each.
    assert out.focal.item() == pytest.approx(2 * 0.5 * 100 / 4, rel=1e-4)
    assert out.smooth_l1.item() == pytest.approx(2 * 0.5 / 4, rel=1e-4)
    right = loss(torch.tensor([100.0, -100.0]).view(1, 1, 1, 2),
                 torch.tensor([1.0, 0.0]).view(1, 1, 1, 2))
    assert right.total.item() == pytest.approx(0.0, abs=1e-12)


def test_mask_shapes():
    loss = PRNLoss()
    logits = torch.zeros(2, 1, 4, 4)
    a = loss(logits, torch.ones(2, 4, 4))
    b = loss(logits, torch.ones(2, 1, 4, 4))
    assert torch.equal(a.total, b.total)
    with pytest.raises(ValueError):
        loss(logits, torch.ones(2, 1, 4, 5))


def test_decreases_under_sgd():
    torch.manual_seed(0)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:9, 6:12] = 1
    # A tiny conv "model" on a fixed input that carries the mask signal plus noise.
    x = torch.cat([mask, torch.randn(1, 2, 16, 16)], 1)
    model = torch.nn.Conv2d(3, 1, 3, padding=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = PRNLoss()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        out = loss_fn(model(x), mask)
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(losses[5:], losses[6:]))
