"""Features that every epoch repeats, computed once: the train normals and the raw seen defects
enter every epoch unchanged (PRN's epoch plan: ``N_n`` normals and ``5 x`` each seen defect),
so only the synthetic rows need decode -> synthesis -> backbone each epoch. With tiles a normal
row is a fresh tile of its image every epoch, so normals are streamed too and only the seen
defects' views are cached (:func:`cached_kinds`).

:class:`FeatureCache` holds those rows' backbone features (float16); :func:`merge_batches`
walks the epoch plan in order and fills each position either from the cache or from the
stream of synthetic rows (matched by ``(epoch, pos)``), so the batches are the ones the full
stream would give for the same seed. Both the Ray worker and the in-process loop use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from prn_ray import images
from prn_ray.contracts import FEATURE_COLUMNS


def cached_kinds(tiled: bool) -> tuple[str, ...]:
    """Plan rows whose features are the same every epoch: normals (untiled: the whole image)
    and raw seen defects (a fixed view each); with tiles a normal row is a fresh tile."""
    return ("seen",) if tiled else ("normal", "seen")


@dataclass
class FeatureCache:
    """Backbone features (per level ``[N, C, h, w]``) of the train normals, in
    ``ProductData.train_normals`` order (``None`` when they are streamed: tiles), and of the
    seen defects (``ProductData.seen`` order) with their masks at the model's input size."""

    normals: list[np.ndarray] | None
    seen: list[np.ndarray]
    seen_masks: np.ndarray  # [S, H, W] uint8
    image_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*(self.normals or ()), *self.seen, self.seen_masks))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"normal.{i}": torch.from_numpy(np.ascontiguousarray(a))
               for i, a in enumerate(self.normals or ())}
        out.update({f"seen.{i}": torch.from_numpy(np.ascontiguousarray(a))
                    for i, a in enumerate(self.seen)})
        out["seen_masks"] = torch.from_numpy(np.ascontiguousarray(self.seen_masks))
        out["image_size"] = torch.tensor(list(self.image_size))
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> FeatureCache:
        levels = len(FEATURE_COLUMNS)
        size = [int(v) for v in t["image_size"]]
        return cls(normals=([t[f"normal.{i}"].numpy() for i in range(levels)]
                            if "normal.0" in t else None),
                   seen=[t[f"seen.{i}"].numpy() for i in range(levels)],
                   seen_masks=t["seen_masks"].numpy(),
                   image_size=(size[0], size[-1]))


def seen_features(pairs: list[tuple[np.ndarray, np.ndarray]], backbone: torch.nn.Module,
                  dtype: np.dtype, batch_size: int = 16) -> tuple[list[np.ndarray], np.ndarray]:
    """Features and masks of decoded ``(image, mask)`` pairs (the few seen defects; at least
    one pair)."""
    from prn_ray.model.inputs import images_to_tensor

    feats: list[list[np.ndarray]] = [[] for _ in FEATURE_COLUMNS]
    for i in range(0, len(pairs), batch_size):
        chunk = np.stack([im for im, _ in pairs[i:i + batch_size]])
        with torch.inference_mode():
            out = backbone(images_to_tensor(chunk))
        for j, f in enumerate(out):
            feats[j].append(f.float().numpy().astype(dtype))
    masks = np.stack([np.asarray(m, np.uint8) for _, m in pairs])
    return [np.concatenate(level) for level in feats], masks


def streamed_rows(plan: pd.DataFrame, tiled: bool) -> pd.DataFrame:
    """The plan rows that must be decoded, synthesised and featurised (not cached)."""
    return plan[~plan["kind"].isin(cached_kinds(tiled))].reset_index(drop=True)


def merge_batches(plans: pd.DataFrame | Iterable[pd.DataFrame], cache: FeatureCache,
                  stream: Iterable[dict[str, np.ndarray]], batch_size: int,
                  drop_last: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches in plan order: cached rows from ``cache``, the others from ``stream``.

    ``plans`` (one frame, or one per epoch, generated as they are needed) have ``epoch, pos,
    kind, normal_index, source_index``: the rows this consumer trains on, in order. ``stream``
    yields numpy batches with ``epoch, pos, error, mask, feat0..3`` of the streamed rows, in
    any order. A streamed row whose decode failed (``error`` set) is skipped, as the full
    stream drops it. Batches may straddle epochs. Yields ``feat0..3`` (cache dtype), ``mask``
    (uint8) and ``epoch`` (int64) tensors.
    """
    source = iter(stream)
    waiting: dict[tuple[int, int], tuple[list[np.ndarray], np.ndarray] | None] = {}

    def take(key: tuple[int, int]):
        while key not in waiting:
            try:
                batch = next(source)
            except StopIteration:
                raise RuntimeError(f"the feature stream ended before row {key} "
                                   "(epoch, position) of the plan") from None
            ok = images.error_free(batch["error"])
            for r in range(len(ok)):
                k = (int(batch["epoch"][r]), int(batch["pos"][r]))
                waiting[k] = ([np.asarray(batch[c][r]) for c in FEATURE_COLUMNS],
                              np.asarray(batch["mask"][r])) if ok[r] else None
        return waiting.pop(key)

    blank = np.zeros(cache.image_size, np.uint8)  # a normal's mask
    rows: list[tuple[list[np.ndarray], np.ndarray, int]] = []
    for plan in ([plans] if isinstance(plans, pd.DataFrame) else plans):
        for epoch, pos, kind, n_idx, s_idx in zip(
                plan["epoch"].to_numpy(), plan["pos"].to_numpy(), plan["kind"].to_numpy(),
                plan["normal_index"].to_numpy(), plan["source_index"].to_numpy()):
            if kind == "normal" and cache.normals is not None:
                feats, mask = [level[n_idx] for level in cache.normals], blank
            elif kind == "seen":
                feats, mask = [level[s_idx] for level in cache.seen], cache.seen_masks[s_idx]
            else:
                got = take((int(epoch), int(pos)))
                if got is None:
                    continue
                feats, mask = got
            rows.append((feats, mask, int(epoch)))
            if len(rows) == batch_size:
                yield _collate(rows)
                rows = []
    if rows and not drop_last:
        yield _collate(rows)


def _collate(rows: list[tuple[list[np.ndarray], np.ndarray, int]]) -> dict[str, torch.Tensor]:
    out = {c: torch.from_numpy(np.stack([f[j] for f, _, _ in rows]))
           for j, c in enumerate(FEATURE_COLUMNS)}
    out["mask"] = torch.from_numpy(np.stack([m for _, m, _ in rows]))
    out["epoch"] = torch.tensor([e for _, _, e in rows], dtype=torch.int64)
    return out
