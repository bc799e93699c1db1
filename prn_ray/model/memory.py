"""A nonparametric anomaly map from the normal images' patches: the floor under the trained head.

PRN's residual compares an image with its nearest *whole-map* prototype, so a normal surface
that is shifted, rotated or textured differently from every prototype leaves a large residual
everywhere. A patch memory does not care where a normal patch sits: each position's feature
(locally averaged over 3×3 neighbours, channel-standardised) is compared with the nearest of a
coreset of *all* normal training patches (PatchCore, Roth et al., CVPR 2022). That map needs no
training and is already a strong detector; PRN's head learns a correction on top of it (see
:class:`~prn_ray.model.prn.PRNHead`), so a trained model starts from this floor instead of from
noise.

* :func:`greedy_coreset` picks a bank that covers the normal patches (k-center greedy on a
  random projection, a block of the farthest points per round), so rare but normal patches stay
  in it; a random subsample of the same size loses them and raises false alarms.
* :class:`PatchMemory` holds one bank per backbone level and turns features into per-level
  z-maps: the L2 distance to the nearest bank patch, centred and scaled by the distances seen on
  *held-out* normals (training normals are in the bank, so their own distances are too small).

No Ray imports; exportable (the bank is a buffer, the search a chunked matmul).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prn_ray.model.layers import autocast_off, exporting

# Elements of one query-chunk × bank distance block: ≈ 16 MB of float32 stays near the cache
# (a 4096 × 16384 block was twice as slow for 40-channel features: memory-bound).
_BLOCK_ELEMENTS = 1 << 22


def channel_stats(features: Tensor, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of N×C×H×W features (float64 sums, any input dtype)."""
    c = features.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    count = 0
    for part in features.split(chunk):
        x = part.double().transpose(0, 1).reshape(c, -1)
        s += x.sum(1)
        s2 += x.pow(2).sum(1)
        count += x.shape[1]
    mean = s / max(count, 1)
    var = (s2 / max(count, 1) - mean.pow(2)).clamp_min(0)
    # A dead channel (constant over every normal image) must not divide by zero.
    std = var.sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def local_average(x: Tensor, pool: int) -> Tensor:
    """3×3 (``pool``) mean over neighbours, same size: a patch descriptor, as in PatchCore."""
    if pool <= 1:
        return x
    return F.avg_pool2d(x, pool, stride=1, padding=pool // 2, count_include_pad=False)


def patch_rows(x: Tensor) -> Tensor:
    """N×C×H×W -> (N·H·W)×C."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


@torch.no_grad()
def greedy_coreset(x: Tensor, size: int, *, proj_dim: int = 64, block: int = 32,
                   seed: int = 0) -> Tensor:
    """Indices of ``size`` rows of ``x`` (M×C) that cover it: k-center greedy.

    Each round adds the ``block`` rows farthest from the current selection (one at a time is
    the textbook rule; a block makes it a matrix product and changes the cover little) and
    updates every row's distance to its nearest selected row. Distances are computed on a
    seeded Gaussian random projection to ``proj_dim`` dimensions (Johnson-Lindenstrauss), as
    PatchCore does. Cost: M × size × proj_dim multiply-adds.
    """
    n, dim = x.shape
    if size >= n:
        return torch.arange(n)
    if size < 1:
        raise ValueError(f"coreset size must be >= 1, got {size}")
    gen = torch.Generator().manual_seed(seed)
    z = x.float()
    if dim > proj_dim:
        z = z @ (torch.randn(dim, proj_dim, generator=gen) / proj_dim ** 0.5)
    z_sq = z.pow(2).sum(1)
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [torch.tensor([first])]
    nearest = (z_sq - 2.0 * z @ z[first] + z_sq[first]).clamp_min_(0)
    taken = 1
    buf = torch.empty(n, block)  # one distance block for every round (see nearest_distance)
    while taken < size:
        b = min(block, size - taken)
        idx = nearest.topk(b).indices
        d = buf[:, :b]
        torch.addmm(z_sq[idx][None], z, z[idx].T, alpha=-2.0, out=d)
        d.add_(z_sq[:, None]).clamp_min_(0)
        nearest = torch.minimum(nearest, d.amin(1))
        chosen.append(idx)
        taken += b
    return torch.cat(chosen)[:size]


def nearest_distance(queries: Tensor, bank: Tensor, bank_sq: Tensor,
                     chunk: int | None = None) -> Tensor:
    """L2 distance of each query row to its nearest bank row (float32, chunked over queries).

    Every chunk's distance block goes into one buffer: a fresh 16 MB block per chunk, freed
    between allocations of small results, fragmented glibc's heap (a freed hole did not always
    take the next block), and a held-out calibration over 1.1 M patches grew the process to
    24 GB in some runs and not in others."""
    chunk = chunk or max(64, _BLOCK_ELEMENTS // max(1, bank.shape[0]))
    n = queries.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=queries.device)
    block = torch.empty(min(chunk, max(n, 1)), bank.shape[0], dtype=torch.float32,
                        device=queries.device)
    for start in range(0, n, chunk):
        q = queries[start:start + chunk]
        d = block[:q.shape[0]]
        torch.addmm(bank_sq[None], q, bank.T, alpha=-2.0, out=d)
        torch.amin(d, 1, out=out[start:start + q.shape[0]])
    return out.add_(queries.pow(2).sum(1)).clamp_min_(0).sqrt_()


def nearest_distance_map(x: Tensor, bank: Tensor, bank_sq: Tensor,
                         positions: int | None = None) -> Tensor:
    """:func:`nearest_distance` for N×C×H×W descriptors as an N×H×W map, in blocks of
    *positions* rather than of rows: the number of blocks depends on H·W and the bank only, so
    a traced or exported graph serves any batch size (blocks of N·H·W rows would bake the
    tracing batch into the graph). Same formula; memory per block grows with N."""
    n, _, h, w = x.shape
    q = x.flatten(2).transpose(1, 2)  # N × HW × C
    step = positions or max(1, _BLOCK_ELEMENTS // max(1, bank.shape[0]))
    out = []
    for start in range(0, h * w, step):
        qb = q[:, start:start + step]
        d = torch.matmul(qb, bank.T).mul(-2.0).add(bank_sq)
        out.append((d.amin(2) + qb.pow(2).sum(2)).clamp_min(0).sqrt())
    return torch.cat(out, 1).view(n, h, w)


class PatchMemory(nn.Module):
    """Per-level banks of normal patch descriptors and their held-out-normal calibration.

    ``levels`` index the backbone's feature levels (0..3 = strides 4, 8, 16, 32). Inputs to
    :meth:`forward` are the *channel-standardised* features of those levels; each is locally
    averaged (``pool``), compared with its bank, and returned as z = (d − loc) / scale, where
    loc/scale are the mean/std of d over held-out normal positions (:meth:`calibrate`).
    Until :meth:`set_banks` and :meth:`calibrate` have run the memory refuses to score.
    """

    def __init__(self, channels: Sequence[int], levels: Sequence[int], pool: int = 3) -> None:
        super().__init__()
        self.levels = [int(lv) for lv in levels]
        if not self.levels:
            raise ValueError("a patch memory needs at least one feature level")
        self.pool = int(pool)
        for i, lv in enumerate(self.levels):
            self.register_buffer(f"bank_{i}", torch.zeros(1, int(channels[lv])))
        # loc, scale per level (calibrated on held-out normals)
        self.register_buffer("calibration", torch.tensor([[0.0, 1.0]] * len(self.levels)))
        # [banks set, calibrated] as 0/1, persisted with the weights; mirrored in Python
        # attributes so forward never reads a tensor value (tracing, meta tensors).
        self.register_buffer("state", torch.zeros(2))
        self.has_banks = False
        self.calibrated = False

    @property
    def banks(self) -> list[Tensor]:
        return [getattr(self, f"bank_{i}") for i in range(len(self.levels))]

    @property
    def ready(self) -> bool:
        return self.has_banks and self.calibrated

    def mark(self, *, banks: bool | None = None, calibrated: bool | None = None) -> None:
        if banks is not None:
            self.has_banks = banks
            self.state[0] = float(banks)
        if calibrated is not None:
            self.calibrated = calibrated
            self.state[1] = float(calibrated)

    def set_banks(self, banks: Sequence[Tensor]) -> None:
        if len(banks) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} banks, got {len(banks)}")
        for i, bank in enumerate(banks):
            old = getattr(self, f"bank_{i}")
            if bank.dim() != 2 or bank.shape[1] != old.shape[1]:
                raise ValueError(f"bank {i}: expected M×{old.shape[1]}, got {tuple(bank.shape)}")
            setattr(self, f"bank_{i}", bank.detach().to(old.device, torch.float32).contiguous())
        self.mark(banks=True)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args,
                              **kwargs) -> None:
        # Banks are data-sized: take the stored shapes before the state dict is copied in.
        for i in range(len(self.levels)):
            key = f"{prefix}bank_{i}"
            if key in state_dict:
                old = getattr(self, f"bank_{i}")
                setattr(self, f"bank_{i}", torch.empty_like(state_dict[key], device=old.device,
                                                            dtype=old.dtype))
        flags = state_dict.get(prefix + "state")
        if flags is not None and flags.device.type != "meta":
            self.has_banks, self.calibrated = bool(flags[0] > 0), bool(flags[1] > 0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def distances(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Nearest-bank L2 distance per position, one N×1×H×W map per level (no gradient)."""
        if not self.has_banks:
            raise RuntimeError("the patch memory has no banks: fit the normal reference first")
        out = []
        dev = features[0].device.type
        with torch.no_grad(), autocast_off(dev):
            for f, bank in zip(features, self.banks):
                x = local_average(f.detach().float(), self.pool)
                n, _, h, w = x.shape
                bank_sq = bank.pow(2).sum(1)
                if exporting():  # a graph for any batch size; eager keeps the row blocks
                    d = nearest_distance_map(x, bank, bank_sq)
                else:
                    d = nearest_distance(patch_rows(x), bank, bank_sq).view(n, h, w)
                out.append(d[:, None])
        return out

    @torch.no_grad()
    def calibrate(self, features: Sequence[Tensor]) -> None:
        """Set loc/scale per level from the distances of held-out normal images' features."""
        for i, d in enumerate(self.distances(features)):
            d = d.flatten().double()
            self.calibration[i, 0] = float(d.mean())
            self.calibration[i, 1] = max(float(d.std()), 1e-6) if d.numel() > 1 else 1.0
        self.mark(calibrated=True)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Calibrated z-maps (N×1×H_l×W_l float32), one per level."""
        if not self.ready:
            raise RuntimeError("the patch memory is not calibrated: call calibrate() on "
                               "held-out normal features before scoring")
        cal = self.calibration
        return [(d - cal[i, 0]) / cal[i, 1] for i, d in enumerate(self.distances(features))]


def fit_banks(features: Sequence[Tensor], means: Sequence[Tensor], stds: Sequence[Tensor],
              bank_size: int, pool: int = 3, seed: int = 0,
              candidates_per_slot: int = 16) -> list[Tensor]:
    """Coreset banks from normal features (one N×C×H×W tensor per memory level, any dtype).

    Features are standardised with the given per-channel statistics and locally averaged; at
    most ``candidates_per_slot × bank_size`` patches (a seeded random subsample: neighbouring
    positions are near-duplicates) enter the greedy coreset of ``bank_size`` rows.
    """
    banks = []
    for i, (f, mean, std) in enumerate(zip(features, means, stds)):
        rows = []
        for part in f.split(64):
            x = (part.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
            rows.append(patch_rows(local_average(x, pool)))
        x = torch.cat(rows)
        gen = torch.Generator().manual_seed(seed + 101 * i)
        limit = candidates_per_slot * bank_size
        if x.shape[0] > limit:
            x = x[torch.randperm(x.shape[0], generator=gen)[:limit]]
        banks.append(x[greedy_coreset(x, bank_size, seed=seed + i)].contiguous())
    return banks
