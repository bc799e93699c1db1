"""Ray Data wiring shared by every job: a driver-side table as a streaming dataset, the decode
stage (reads from object storage as stateless tasks), actor pools that Ray does not restart,
and the run's tally of what its workers count. The datasets of a training run are
:mod:`prn_ray.train.datasets`. Torch-free, so a scoring driver does not import it.

Resources are fractional and explicit (``data.task_cpus``): on a small machine, trainer
workers, Tune trial drivers and data actors must all fit at once or the run deadlocks.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import ray

from prn_ray import images, storage
from prn_ray.config import Config


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


def decode_stage(ds: ray.data.Dataset, cfg: Config, geometry, tally=None) -> ray.data.Dataset:
    """Read bytes from storage, decode and cut into views (``geometry``: a
    :class:`~prn_ray.geometry.Geometry` or a size); failures become rows with ``error`` set.
    ``tally``: a :class:`RunTally` that counts the retried requests of these reads."""
    kwargs = {"storage_cfg": cfg.storage, "data_cfg": cfg.data, "geometry": geometry}
    if tally is not None:
        kwargs["tally"] = tally
    return ds.map_batches(
        decode_tallied if tally is not None else images.decode_batch,
        fn_kwargs=kwargs,
        batch_size=cfg.data.read_batch_size,
        batch_format="numpy",
        num_cpus=cfg.data.task_cpus,
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
