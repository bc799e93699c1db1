"""The data stages run in this process, without Ray: decode -> synthesis -> features, batch by
batch. Used by single-process training (:func:`prn_ray.engine.local.train_local`), the
benchmarks' bare loops and tests; production streams through
:mod:`prn_ray.train.datasets`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from prn_ray import images
from prn_ray.config import Config
from prn_ray.contracts import FEATURE_COLUMNS
from prn_ray.data.stages import SynthesisBanks, backbone_features, feature_dtype
from prn_ray.geometry import Geometry
from prn_ray.model import Backbone


def feature_batches(frame: pd.DataFrame, banks: SynthesisBanks, cfg: Config,
                    geometry: Geometry, backbone: Backbone, batch_size: int,
                    extra: tuple[str, ...] = (), drop_last: bool = False,
                    validation: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of torch tensors: ``feat0..3``, ``mask`` and the ``extra`` columns (of
    ``frame``, or the decode's: ``view``, ``orig_height``, ``orig_width``), one row per view
    (``batch_size`` rows of ``frame`` at a time).

    Rows that fail to decode are dropped here (the Ray path reports them upstream)."""
    synth = (banks.validation_synthesizer if validation else banks.synthesizer)(cfg, geometry)
    stop = len(frame) - batch_size + 1 if drop_last else len(frame)
    dtype = feature_dtype(cfg.model)
    for i in range(0, max(stop, 0), batch_size):
        rows = frame.iloc[i:i + batch_size]
        batch = {c: rows[c].to_numpy() for c in rows.columns}
        batch = images.decode_batch(batch, storage_cfg=cfg.storage, data_cfg=cfg.data,
                                    geometry=geometry)
        ok = images.error_free(batch["error"])
        batch = synth({k: v[ok] for k, v in batch.items()})
        feats = backbone_features(backbone, batch["image"], None, dtype)
        out = {c: torch.from_numpy(f) for c, f in zip(FEATURE_COLUMNS, feats)}
        out["mask"] = torch.from_numpy(np.ascontiguousarray(batch["mask"]))
        for c in extra:
            out[c] = torch.as_tensor(np.asarray(batch[c]))
        yield out


def streamed_batches(frame: pd.DataFrame, banks: SynthesisBanks, cfg: Config,
                     geometry: Geometry, backbone: Backbone, batch_size: int
                     ) -> Iterator[dict[str, np.ndarray]]:
    """The streamed (synthetic) rows of a plan as the training stream delivers them: numpy
    ``epoch, pos, error, mask, feat0..3``, failed rows kept with ``error`` set (the in-process
    twin of :func:`prn_ray.train.datasets.train_dataset`)."""
    synth = banks.synthesizer(cfg, geometry)
    dtype = feature_dtype(cfg.model)
    for i in range(0, len(frame), batch_size):
        rows = frame.iloc[i:i + batch_size]
        batch = images.decode_batch({c: rows[c].to_numpy() for c in rows.columns},
                                    storage_cfg=cfg.storage, data_cfg=cfg.data,
                                    geometry=geometry)
        batch = synth(batch)
        feats = backbone_features(backbone, batch["image"], batch["error"], dtype)
        out = {c: np.asarray(batch[c]) for c in ("epoch", "pos", "error", "mask")}
        out.update(zip(FEATURE_COLUMNS, feats))
        yield out


def reference_batches(normals: list[str], cfg: Config, geometry: Geometry, backbone: Backbone,
                      batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every view's features with ``image_uri``, ``view`` and ``error`` kept (the in-process
    twin of :func:`prn_ray.train.datasets.reference_dataset`)."""
    dtype = feature_dtype(cfg.model)
    for i in range(0, len(normals), batch_size):
        batch = {"image_uri": np.array(normals[i:i + batch_size], dtype=object),
                 "mask_uri": np.array([""] * len(normals[i:i + batch_size]), dtype=object)}
        batch = images.decode_batch(batch, storage_cfg=cfg.storage, data_cfg=cfg.data,
                                    geometry=geometry)
        out = {"image_uri": batch["image_uri"], "view": batch["view"], "error": batch["error"]}
        feats = backbone_features(backbone, batch["image"], batch["error"], dtype)
        out.update(zip(FEATURE_COLUMNS, feats))
        yield out
