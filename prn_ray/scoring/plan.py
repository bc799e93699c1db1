"""The Ray Data plan of a scoring run: per-product decode at the model's size, one actor pool
of :class:`~prn_ray.scoring.scorer.Scorer`, error rows for products without a model."""

from __future__ import annotations

import math

import pandas as pd
import ray

from prn_ray.config import Config
from prn_ray.data.ray_data import cluster_has_gpu, decode_stage, frame_dataset
from prn_ray.scoring.models import ResolvedModel
from prn_ray.scoring.scorer import Scorer, after_decode, no_model_rows


def build_dataset(cfg: Config, frame: pd.DataFrame, models: dict[str, ResolvedModel],
                  pidx: dict[str, int], tally=None):
    """The Ray Data plan: per-product decode at the model's size, union, actor pool; rows of
    products without a model become error rows without being read. Output: staging schema.
    ``tally``: a :class:`~prn_ray.data.ray_data.RetryTally` counting the decode reads' retries."""
    sc = cfg.score
    parts = []
    for product, rows in frame.groupby("product", sort=True):
        res = models[product]
        if res.version is None:
            continue
        rows = rows[["product", "image_uri"]]  # decode adds its own error column
        ds = decode_stage(frame_dataset(rows.reset_index(drop=True), cfg), cfg,
                          int(res.image_size), tally)
        parts.append(ds.map_batches(after_decode, batch_format="numpy",
                                    num_cpus=cfg.data.task_cpus))
    out = []
    if parts:
        decoded = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        gpus = ray.cluster_resources().get("GPU", 0) if cluster_has_gpu() else 0
        out.append(decoded.map_batches(
            Scorer,
            fn_constructor_kwargs={
                "models": models, "storage_cfg": cfg.storage, "pidx": pidx,
                # ceil: the fractional rest of a core is left to decode tasks, which mostly
                # wait on storage; floor would leave 1.5 reserved CPUs running one thread.
                "threads": max(1, math.ceil(sc.cpus_per_actor)), "use_gpu": gpus > 0,
            },
            compute=ray.data.ActorPoolStrategy(size=sc.actors),
            batch_size=sc.batch_size,
            batch_format="numpy",
            num_cpus=sc.cpus_per_actor,
            num_gpus=min(1.0, gpus / max(1, sc.actors)) if gpus else 0,
        ))
    missing = frame[frame["product"].map(lambda p: models[p].version is None)]
    if len(missing):
        out.append(frame_dataset(missing.reset_index(drop=True), cfg).map_batches(
            no_model_rows, fn_kwargs={"models": models, "pidx": pidx},
            batch_format="pandas", num_cpus=cfg.data.task_cpus))
    if not out:
        return None
    return out[0].union(*out[1:]) if len(out) > 1 else out[0]
