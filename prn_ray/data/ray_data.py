"""Ray Data wiring of the data stages (:mod:`prn_ray.data.stages`): streaming datasets from
object storage to a training worker, a k-means pass or a scorer.

Decode and synthesis are stateless tasks; the frozen backbone runs in an actor pool
(``ActorPoolStrategy``, one model load per actor, GPU when the cluster has one), so training
workers only run the PRN head. Resources are fractional and explicit (``data.task_cpus``,
``train.feature_actor_cpus``): on a small machine, trainer workers, Tune trial drivers and data
actors must all fit at once or the run deadlocks.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import ray

from prn_ray import images, storage
from prn_ray.config import Config
from prn_ray.data.feature_cache import streamed_rows
from prn_ray.data.product import Budget, ProductData
from prn_ray.data.stages import FeatureExtractor, SynthesisBanks, shard_plan, validation_frame
from prn_ray.engine.state import resume_epoch


class IdleBackoff:
    """A Ray Data execution callback: pause the scheduling loop briefly after a step that
    returned at once. When every operator is back-pressured (the consumer is the slow part, as
    a training step is) no task is in flight and the loop does not block on ``ray.wait``: it
    spins, measured at ≈ 45 % of a core on a 2-core node, holding the GIL that the training
    thread in the same process needs between its torch calls. A 20 ms pause delays dispatch
    by at most that, against batches that take seconds."""

    SPIN_S = 0.002
    PAUSE_S = 0.02

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


# Actor pools are not restarted by Ray when an actor dies: Ray Data passes an actor its
# constructor arguments through the object store, and Ray cannot guarantee a restart with such
# arguments (it logs an error for every actor that asks for one; ray-project/ray#53727). Our
# recovery is one level up: a training run resumes from its checkpoint (train.max_failures), a
# scoring or evaluation run is rerun (a rerun replaces a date's partitions).
def no_actor_restarts() -> dict[str, int]:
    """``map_batches(ray_remote_args_fn=...)`` of every actor pool (see above)."""
    return {"max_restarts": 0, "max_task_retries": 0}


def actor_pool_map(ds: ray.data.Dataset, fn, **kwargs) -> ray.data.Dataset:
    """``ds.map_batches(fn, **kwargs)`` in an actor pool whose actors Ray does not restart."""
    with warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args_fn in favour of named parameters but has none
        # for max_restarts yet: until it does, this is the one way to turn restarts off.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.* is deprecated")
        return ds.map_batches(fn, ray_remote_args_fn=no_actor_restarts, **kwargs)


def cluster_has_gpu() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


RETRIED = "retried_requests"  # the RunTally kind of retried storage requests
SCORED = "scored"  # the RunTally kind of rows scored, per product


@ray.remote(num_cpus=0)
class RunTally:
    """What a run's Ray workers count, summed across their processes (the counter of
    :mod:`prn_ray.storage` is per process): per kind (:data:`RETRIED`, :data:`SCORED`), a
    count per key. One small actor per run serves every kind."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {}

    def add(self, kind: str, counts: dict[str, int]) -> None:
        self.counts.setdefault(kind, Counter()).update(counts)

    def snapshot(self, kind: str) -> dict[str, int]:
        return dict(self.counts.get(kind, {}))


class TallyReporter:
    """A picklable ``callback(n)`` that adds ``n`` retried requests to a :class:`RunTally`,
    for core classes that run in actors (the scorer) and must not import Ray."""

    def __init__(self, tally) -> None:
        self.tally = tally

    def __call__(self, n: int) -> None:
        if n:  # waited for: counted before the dataset finishes
            ray.get(self.tally.add.remote(RETRIED, {RETRIED: int(n)}))


def retried_total(tally) -> int:
    """The retried requests the workers reported to ``tally``."""
    return int(ray.get(tally.snapshot.remote(RETRIED)).get(RETRIED, 0))


def decode_tallied(batch: dict[str, np.ndarray], *, tally, **kwargs) -> dict[str, np.ndarray]:
    """:func:`prn_ray.images.decode_batch`, reporting the requests it retried to ``tally``
    (a worker process runs one task at a time, so the counter's difference is this batch's)."""
    before = storage.retried_requests()
    out = images.decode_batch(batch, **kwargs)
    TallyReporter(tally)(storage.retried_requests() - before)
    return out


def decode_stage(ds: ray.data.Dataset, cfg: Config, image_size: int,
                 tally=None) -> ray.data.Dataset:
    """Read bytes from storage and decode/resize; failures become rows with ``error`` set.
    ``tally``: a :class:`RunTally` that counts the retried requests of these reads."""
    kwargs = {"storage_cfg": cfg.storage, "data_cfg": cfg.data, "image_size": image_size}
    if tally is not None:
        kwargs["tally"] = tally
    return ds.map_batches(
        decode_tallied if tally is not None else images.decode_batch,
        fn_kwargs=kwargs,
        batch_size=cfg.data.read_batch_size,
        batch_format="numpy",
        num_cpus=cfg.data.task_cpus,
    )


def feature_stage(ds: ray.data.Dataset, cfg: Config, image_size: int,
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
            "image_size": image_size,
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


def frame_dataset(frame: pd.DataFrame, cfg: Config) -> ray.data.Dataset:
    """A small driver-side table as a dataset of several blocks, so decode tasks stream.

    ``from_items`` builds its blocks in this process. (``from_pandas``/``from_arrow`` run a
    1-CPU metadata task per block: inside a Train controller or a Tune trial on a busy small
    cluster that task may never find a free CPU, and the run hangs.)
    """
    # Blocks of at most a whole number of batches: a 17-row block under a 16-row consumer
    # (the scoring actor) became a batch of 16 and a forward pass over one image.
    batch = max(1, cfg.data.read_batch_size)
    rows = batch * max(1, math.ceil(len(frame) / (200 * batch)))  # at most 200 blocks
    blocks = max(1, math.ceil(len(frame) / rows))
    return ray.data.from_items(frame.to_dict("records"), override_num_blocks=blocks)


def reference_dataset(data: ProductData, cfg: Config, image_size: int) -> ray.data.Dataset:
    """Train normals -> features; keeps ``image_uri`` and ``error`` so bad files are reported."""
    frame = pd.DataFrame({"image_uri": data.train_normals, "mask_uri": ""})
    ds = decode_stage(frame_dataset(frame, cfg), cfg, image_size)
    return feature_stage(ds, cfg, image_size, keep=("image_uri", "error"))


STREAM_COLUMNS = ("epoch", "pos", "kind", "image_uri", "mask_uri", "seed", "source_index")


def epoch_rows_to_stream(batch: dict[str, np.ndarray], data: ProductData, cfg: Config,
                         run_uri: str, rank: int, world: int) -> dict[str, np.ndarray]:
    """Expand epoch numbers into the rows of those epochs that must be streamed (synthetic rows
    of this worker's positions). Runs when the stream reaches the epoch: epochs before the
    worker's resume point (recorded by the worker before it reads, after restoring its
    checkpoint) expand to nothing, so a restarted run streams from where its checkpoint is."""
    start = resume_epoch(run_uri, cfg.storage)
    frames = [streamed_rows(shard_plan(data, cfg, int(e), rank, world))
              for e in batch["epoch"] if int(e) >= start]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {c: np.zeros(0, np.int64) for c in STREAM_COLUMNS})
    for c in ("kind", "image_uri", "mask_uri"):
        frame[c] = frame[c].astype(object) if len(frame) else np.zeros(0, object)
    return {c: frame[c].to_numpy() for c in STREAM_COLUMNS}


def train_dataset(data: ProductData, banks: SynthesisBanks, cfg: Config, image_size: int,
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
                                   "world": world}, num_cpus=cfg.data.task_cpus)
    ds = decode_stage(ds, cfg, image_size)
    ds = ds.map_batches(banks.synthesizer(cfg, image_size), batch_size=cfg.data.read_batch_size,
                        batch_format="numpy", num_cpus=cfg.data.task_cpus)
    return with_idle_backoff(
        feature_stage(ds, cfg, image_size, keep=("mask", "epoch", "pos", "error")))


def validation_dataset(data: ProductData, banks: SynthesisBanks, cfg: Config,
                       image_size: int) -> ray.data.Dataset:
    frame = validation_frame(data, banks, cfg)
    ds = decode_stage(frame_dataset(frame, cfg), cfg, image_size)
    ds = ds.map_batches(images.keep_error_free, batch_format="numpy",
                        num_cpus=cfg.data.task_cpus)  # reported by the catalog's reader
    ds = ds.map_batches(banks.validation_synthesizer(cfg, image_size),
                        batch_size=cfg.data.read_batch_size,
                        batch_format="numpy", num_cpus=cfg.data.task_cpus)
    return feature_stage(ds, cfg, image_size, keep=("mask", "group"))
