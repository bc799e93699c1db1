"""The rows of one training epoch (which rows are normal, raw seen, extended or simulated, which
normal image / seen defect each starts from) and the seed of every row.

Deterministic and shuffled: a row's seed is derived from ``(seed, epoch, row)`` alone, so a
synthesised sample (:class:`prn_ray.synthesis.Synthesizer`) depends on nothing else, whatever
Ray's batch boundaries are, and a resumed run replays the same epochs.
"""

from __future__ import annotations

import math

import numpy as np

from prn_ray.config import SynthesisConfig

_PLAN_TAG = 0x504C414E  # "PLAN": separates the shuffle stream from the row seeds


def row_seed(seed: int, epoch: int, row: int) -> int:
    """Non-negative int64 seed of plan row ``row``: ``SeedSequence([seed, epoch, row])``."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(row)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))  # 63 bits: fits int64, never negative


def _share(n: int, share: float) -> int:
    # floor, so real_share = 0.5 gives exactly the paper's N_n // 2 (209 -> 104, 105 -> 52)
    return max(0, int(math.floor(n * float(share) + 1e-9)))


def _cycled_permutations(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """``count`` indices in [0, n): concatenated random permutations (balanced coverage)."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    reps = -(-count // n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:count].astype(np.int64)


def _kind_counts(n_normal: int, n_seen: int, cfg: SynthesisConfig) -> tuple[int, int, int, int]:
    """Rows of each kind in an epoch: normal, raw seen, extended, simulated."""
    n_norm = _share(n_normal, cfg.normal_share)
    slots = _share(n_normal, cfg.real_share)
    n_sim = _share(n_normal, cfg.simulated_share)
    if n_seen == 0:  # no real anomalies: their slots become simulated ones
        return n_norm, 0, 0, n_sim + slots
    n_raw = min(slots, n_seen * max(0, int(cfg.raw_seen_reuse)))
    return n_norm, n_raw, slots - n_raw, n_sim


def epoch_plan(
    n_normal: int, n_seen: int, cfg: SynthesisConfig, epoch: int, seed: int
) -> dict[str, np.ndarray]:
    """The shuffled sample plan of one epoch, as numpy columns.

    Counts, for ``N_n = n_normal``: ``floor(N_n * normal_share)`` normals (each normal image once
    per epoch at share 1, random permutations cycled otherwise); ``slots = floor(N_n * real_share)``
    real slots, of which the first ``min(slots, n_seen * raw_seen_reuse)`` are raw seen anomalies
    (seen indices cycled 0, 1, ..., n_seen-1, 0, ...) and the rest extended anomalies (seen
    defect drawn by cycled random permutations); ``floor(N_n * simulated_share)`` simulated
    anomalies. With ``n_seen == 0`` (no real anomalies), the real slots become simulated ones so
    the anomalous share of the epoch is kept.

    Columns: ``row`` (int64, slot before the shuffle), ``kind`` (str), ``normal_index`` (int64,
    the normal image the row starts from; -1 for raw seen rows), ``source_index`` (int64, the seen
    anomaly for ``seen`` and ``extended`` rows; -1 otherwise), ``seed`` (int64,
    :func:`row_seed` of ``(seed, epoch, row)``, unique per row in practice).
    """
    if n_normal <= 0:
        raise ValueError("epoch_plan needs at least one normal image")
    if n_seen < 0 or epoch < 0 or seed < 0:
        raise ValueError("epoch_plan: n_seen, epoch and seed must be non-negative")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, _PLAN_TAG])))
    n_norm, n_raw, n_ext, n_sim = _kind_counts(n_normal, n_seen, cfg)
    kind = np.array(
        ["normal"] * n_norm + ["seen"] * n_raw + ["extended"] * n_ext + ["simulated"] * n_sim,
        dtype="<U9",
    )
    normal_index = np.concatenate(
        [
            _cycled_permutations(rng, n_normal, n_norm),
            np.full(n_raw, -1, dtype=np.int64),
            _cycled_permutations(rng, n_normal, n_ext + n_sim),
        ]
    )
    source_index = np.concatenate(
        [
            np.full(n_norm, -1, dtype=np.int64),
            np.arange(n_raw, dtype=np.int64) % max(n_seen, 1),
            _cycled_permutations(rng, max(n_seen, 1), n_ext),
            np.full(n_sim, -1, dtype=np.int64),
        ]
    )
    total = kind.size
    row = np.arange(total, dtype=np.int64)
    seeds = np.array([row_seed(seed, epoch, r) for r in range(total)], dtype=np.int64)
    order = rng.permutation(total)
    return {
        "row": row[order],
        "kind": kind[order],
        "normal_index": normal_index[order],
        "source_index": source_index[order],
        "seed": seeds[order],
    }
