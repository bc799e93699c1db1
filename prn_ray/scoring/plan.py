"""The Ray Data plan of a scoring run: decode at each product's model size, one actor pool of
:class:`~prn_ray.scoring.scorer.Scorer`, error rows for products without a model."""

from __future__ import annotations

import math

import pandas as pd
import ray

from prn_ray.config import Config
from prn_ray.data.ray_data import TallyReporter, cluster_has_gpu, decode_stage, frame_dataset
from prn_ray.scoring.models import ResolvedModel
from prn_ray.scoring.scorer import Scorer, after_decode, no_model_rows


def build_dataset(cfg: Config, frame: pd.DataFrame, models: dict[str, ResolvedModel],
                  pidx: dict[str, int], tally=None):
    """The Ray Data plan: images decoded at each product's model size, an actor pool of
    scorers; rows of products without a model become error rows without being read. Output:
    staging schema. ``tally``: a :class:`~prn_ray.data.ray_data.RetryTally` counting the
    retried storage requests of the reads.

    Where the decode runs depends on the cluster. With GPUs, CPU tasks decode while the
    GPU actors score. On a CPU-only cluster the scorer decodes its own batches: decode tasks
    beside it would take cores from its torch threads, which wait for each other at every
    layer, so one descheduled thread stalls the whole forward pass (measured on 2 cores:
    README "Throughput")."""
    sc = cfg.score
    gpus = ray.cluster_resources().get("GPU", 0) if cluster_has_gpu() else 0
    scored = frame[frame["product"].map(lambda p: models[p].version is not None)]
    out = []
    if len(scored):
        if gpus:
            # decode adds its own error column
            parts = [decode_stage(frame_dataset(rows[["product", "image_uri"]]
                                                .reset_index(drop=True), cfg), cfg,
                                  int(models[product].image_size), tally)
                     .map_batches(after_decode, batch_format="numpy",
                                  num_cpus=cfg.data.task_cpus)
                     for product, rows in scored.groupby("product", sort=True)]
            rows_in = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        else:
            rows_in = frame_dataset(scored[["product", "image_uri"]].reset_index(drop=True),
                                    cfg)
        out.append(rows_in.map_batches(
            Scorer,
            fn_constructor_kwargs={
                "models": models, "storage_cfg": cfg.storage, "pidx": pidx,
                # ceil: on a GPU node the fractional rest of a core is left to decode tasks,
                # which mostly wait on storage; floor would leave 1.5 reserved CPUs running one
                # thread.
                "threads": max(1, math.ceil(sc.cpus_per_actor)), "use_gpu": gpus > 0,
                "data_cfg": None if gpus else cfg.data,
                "on_retries": TallyReporter(tally) if tally is not None else None,
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
