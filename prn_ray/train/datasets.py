"""Ray Data wiring of a training run's data stages (:mod:`prn_ray.data.stages`): streaming
datasets from object storage to a training worker or a k-means pass.

Decode and synthesis are stateless tasks. The frozen backbone runs where
``train.features_in`` says: in the training worker between its steps (the streams then carry
images, see :func:`streamed_features`), or in an actor pool beside it (``ActorPoolStrategy``,
one model load per actor, GPU when the cluster has one). Resources are fractional and explicit
(``data.task_cpus``, ``train.feature_actor_cpus``): on a small machine, trainer workers, Tune
trial drivers and data actors must all fit at once or the run deadlocks.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import ray

from prn_ray import images
from prn_ray.config import Config
from prn_ray.data.feature_cache import streamed_rows
from prn_ray.data.product import Budget, ProductData
from prn_ray.data.ray_data import actor_pool_map, cluster_has_gpu, decode_stage, frame_dataset
from prn_ray.data.stages import FeatureExtractor, SynthesisBanks, shard_plan, validation_frame
from prn_ray.engine.state import resume_epoch
from prn_ray.geometry import Geometry


class IdleBackoff:
    """A Ray Data execution callback: pause the scheduling loop briefly after a step that
    returned at once. When every operator is back-pressured (the consumer is the slow part, as
    a training step is) no task is in flight and the loop does not block on ``ray.wait``: it
    spins, measured at ≈ 45 % of a core on a 2-core node, holding the GIL that the training
    thread in the same process needs between its torch calls. A 100 ms pause delays dispatch
    by at most that, against batches that take seconds (with 20 ms the loop still took
    ≈ 6.5 % of a core beside a training step, with 100 ms ≈ 1.8 %)."""

    SPIN_S = 0.002
    PAUSE_S = 0.1

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def before_execution_starts(self, executor) -> None:
        self.last = time.perf_counter()

    def on_execution_step(self, executor) -> None:
        now = time.perf_counter()
        if now - self.last < self.SPIN_S:
            time.sleep(self.PAUSE_S)
            now = time.perf_counter()
        self.last = now

    def after_execution_succeeds(self, executor) -> None:
        pass

    def after_execution_fails(self, executor, error: Exception) -> None:
        pass


def with_idle_backoff(ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds`` executing with :class:`IdleBackoff` (its context travels with it to the process
    that executes it: the training worker)."""
    callbacks = ds.context.custom_execution_callback_classes
    if IdleBackoff not in callbacks:
        callbacks.append(IdleBackoff)
    return ds


def feature_stage(ds: ray.data.Dataset, cfg: Config, geometry: Geometry,
                  keep: tuple[str, ...] | None = None) -> ray.data.Dataset:
    """Backbone features (``feat0..3``) for each row; ``keep`` names the other columns kept.

    Every stage of these pipelines requests explicit fractional CPUs: a default 1-CPU
    operator (``select_columns``, ``filter``) can starve forever on a small busy cluster."""
    gpu = cluster_has_gpu()
    cpus = cfg.train.feature_actor_cpus
    return actor_pool_map(
        ds, FeatureExtractor,
        fn_constructor_kwargs={
            "model_cfg": cfg.model,
            "storage_cfg": cfg.storage,
            "image_size": geometry.size,
            # A 1.5-CPU actor runs 2 threads: the decode tasks beside it are mostly I/O waits.
            "threads": max(1, math.ceil(cpus)),
            "keep": keep,
        },
        compute=ray.data.ActorPoolStrategy(size=cfg.train.feature_actors),
        batch_size=cfg.train.feature_batch_size,
        batch_format="numpy",
        num_cpus=cpus,
        num_gpus=cfg.train.feature_actor_gpus if gpu else 0,
    )


def streamed_features(ds: ray.data.Dataset, cfg: Config, geometry: Geometry,
                      keep: tuple[str, ...]) -> ray.data.Dataset:
    """A training worker's stream: features from the actor pool, or (``features_in:
    trainer``) the rows with their images, which the worker turns into features itself with
    the same :class:`FeatureExtractor` and ``keep``."""
    if cfg.train.features_in == "actors":
        return feature_stage(ds, cfg, geometry, keep=keep)
    return ds


TRAIN_COLUMNS = ("mask", "epoch", "pos", "error")  # a streamed row's columns besides features
VALIDATION_COLUMNS = ("mask", "group", "item", "view", "orig_height", "orig_width")


def reference_dataset(data: ProductData, cfg: Config, geometry: Geometry) -> ray.data.Dataset:
    """Train normals -> every view's features; keeps ``image_uri``, ``view`` and ``error`` so
    bad files are reported."""
    frame = pd.DataFrame({"image_uri": data.train_normals, "mask_uri": ""})
    ds = decode_stage(frame_dataset(frame, cfg), cfg, geometry)
    return feature_stage(ds, cfg, geometry, keep=("image_uri", "view", "error"))


STREAM_COLUMNS = ("epoch", "pos", "kind", "image_uri", "mask_uri", "seed", "view",
                  "source_index")


def epoch_rows_to_stream(batch: dict[str, np.ndarray], data: ProductData, cfg: Config,
                         run_uri: str, rank: int, world: int, tiled: bool
                         ) -> dict[str, np.ndarray]:
    """Expand epoch numbers into the rows of those epochs that must be streamed (synthetic rows
    of this worker's positions). Runs when the stream reaches the epoch: epochs before the
    worker's resume point (recorded by the worker before it reads, after restoring its
    checkpoint) expand to nothing, so a restarted run streams from where its checkpoint is."""
    start = resume_epoch(run_uri, cfg.storage)
    frames = [streamed_rows(shard_plan(data, cfg, int(e), rank, world), tiled)
              for e in batch["epoch"] if int(e) >= start]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {c: np.zeros(0, np.int64) for c in STREAM_COLUMNS})
    for c in ("kind", "image_uri", "mask_uri"):
        frame[c] = frame[c].astype(object) if len(frame) else np.zeros(0, object)
    return {c: frame[c].to_numpy() for c in STREAM_COLUMNS}


def train_dataset(data: ProductData, banks: SynthesisBanks, cfg: Config, geometry: Geometry,
                  run_uri: str, rank: int = 0, world: int = 1) -> ray.data.Dataset:
    """The synthetic rows of every planned epoch for worker ``rank`` (the rows every epoch
    repeats come from the feature cache): epochs are expanded into rows lazily, as the stream
    reaches them (a 1000-epoch time-budgeted config never plans millions of rows up front), and
    decode failures stay in the stream (``error`` set) for the worker to skip."""
    budget = Budget.of(cfg, data.epoch_rows(cfg), world)
    epochs = list(range(budget.planned_epochs))
    ds = ray.data.from_items([{"epoch": e} for e in epochs], override_num_blocks=len(epochs))
    ds = ds.map_batches(epoch_rows_to_stream, batch_size=None, batch_format="numpy",
                        fn_kwargs={"data": data, "cfg": cfg, "run_uri": run_uri, "rank": rank,
                                   "world": world, "tiled": geometry.tiled},
                        num_cpus=cfg.data.task_cpus)
    ds = decode_stage(ds, cfg, geometry)
    ds = ds.map_batches(banks.synthesizer(cfg, geometry), batch_size=cfg.data.read_batch_size,
                        batch_format="numpy", num_cpus=cfg.data.task_cpus)
    return with_idle_backoff(streamed_features(ds, cfg, geometry, TRAIN_COLUMNS))


def validation_dataset(data: ProductData, banks: SynthesisBanks, cfg: Config,
                       geometry: Geometry) -> ray.data.Dataset:
    frame = validation_frame(data, banks, cfg)
    ds = decode_stage(frame_dataset(frame, cfg), cfg, geometry)
    ds = ds.map_batches(images.keep_error_free, batch_format="numpy",
                        num_cpus=cfg.data.task_cpus)  # reported by the catalog's reader
    ds = ds.map_batches(banks.validation_synthesizer(cfg, geometry),
                        batch_size=cfg.data.read_batch_size,
                        batch_format="numpy", num_cpus=cfg.data.task_cpus)
    return streamed_features(ds, cfg, geometry, VALIDATION_COLUMNS)
