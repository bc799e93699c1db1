"""The Ray Data plan of a scoring run: decode at each product's model size, one actor pool of
:class:`~prn_ray.scoring.scorer.Scorer`, error rows for products without a model."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import pandas as pd
import ray

from prn_ray.config import Config
from prn_ray.console import Every, rate_line
from prn_ray.data.ray_data import (
    SCORED,
    TallyReporter,
    actor_pool_map,
    cluster_has_gpu,
    decode_stage,
    frame_dataset,
)
from prn_ray.scoring.models import ResolvedModel
from prn_ray.scoring.scorer import (
    Scorer,
    after_decode,
    concurrent_calls,
    model_streams,
    no_model_rows,
)


def tell_scored(tally, counts: dict[str, int]) -> None:
    tally.add.remote(SCORED, counts)  # fire and forget: a batch never waits on the count


class ScoringProgress:
    """Progress lines while the plan runs inside ``write_parquet`` (which reports nothing until
    it returns): the scorer actors count finished rows per product in the run's
    :class:`~prn_ray.data.ray_data.RunTally`, and a driver thread prints the counts every
    ``every_s`` seconds."""

    def __init__(self, tally, totals: dict[str, int], say: Callable[[str, str], None],
                 every_s: float = 10.0):
        self.tally, self.totals, self.say, self.every_s = tally, totals, say, every_s

    def callback(self) -> Callable[[dict[str, int]], None] | None:
        return partial(tell_scored, self.tally) if self.totals else None

    def line(self, done: dict[str, int], elapsed_s: float) -> str:
        total = sum(self.totals.values())
        per = ", ".join(f"{p} {done.get(p, 0)}/{n}" for p, n in self.totals.items())
        return rate_line(sum(done.values()), total, elapsed_s) + f" ({per})"

    @contextmanager
    def reporting(self) -> Iterator[None]:
        if not self.totals:  # nothing to score (every product lacks a model)
            yield
            return
        stop = threading.Event()
        clock = Every(self.every_s)

        def loop() -> None:
            said = 0
            while not stop.wait(self.every_s):
                done = ray.get(self.tally.snapshot.remote(SCORED))
                if sum(done.values()) > said:  # nothing new (start-up): no line
                    said = sum(done.values())
                    self.say("score", self.line(done, clock.elapsed()))

        thread = threading.Thread(target=loop, name="scoring-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def build_dataset(cfg: Config, frame: pd.DataFrame, models: dict[str, ResolvedModel],
                  pidx: dict[str, int], tally=None,
                  on_scored: Callable[[dict[str, int]], None] | None = None):
    """The Ray Data plan: images decoded and cut by each product's geometry, an actor pool of
    scorers; rows of products without a model become error rows without being read. Output:
    staging schema. ``tally``: a :class:`~prn_ray.data.ray_data.RunTally` counting the
    retried storage requests of the reads; ``on_scored`` is passed to every scorer actor
    (:class:`ScoringProgress`).

    Where the decode runs depends on the cluster. With GPUs, CPU tasks decode while the
    GPU actors score (untiled products: one view per image). On a CPU-only cluster the
    scorer decodes its own batches: decode tasks
    beside it would take cores from its torch threads, which wait for each other at every
    layer, so one descheduled thread stalls the whole forward pass (measured on 2 cores by
    ``benchmarks/score_throughput.py``)."""
    gpus = ray.cluster_resources().get("GPU", 0) if cluster_has_gpu() else 0
    has_model = frame["product"].map(lambda p: models[p].version is not None)
    scored = frame[has_model]
    # Tiled products' images become a varying number of tiles each: the scorer cuts them.
    upstream = bool(gpus) and not any(models[p].geometry.tiled
                                      for p in scored["product"].unique())
    out = []
    if len(scored):
        rows_in = (_decoded_upstream(scored, models, cfg, tally) if upstream else
                   frame_dataset(scored[["product", "image_uri"]].reset_index(drop=True), cfg))
        out.append(_scorer_pool(rows_in, cfg, models, pidx, gpus, upstream, tally, on_scored))
    missing = frame[~has_model]
    if len(missing):
        out.append(frame_dataset(missing.reset_index(drop=True), cfg).map_batches(
            no_model_rows, fn_kwargs={"models": models, "pidx": pidx},
            batch_format="pandas", num_cpus=cfg.data.task_cpus))
    if not out:
        return None
    return out[0].union(*out[1:]) if len(out) > 1 else out[0]


def _decoded_upstream(scored: pd.DataFrame, models: dict[str, ResolvedModel], cfg: Config,
                      tally):
    """Images decoded by CPU tasks, per product at its model's geometry (GPU clusters)."""
    parts = [decode_stage(frame_dataset(rows[["product", "image_uri"]].reset_index(drop=True),
                                        cfg), cfg, models[product].geometry, tally)
             .map_batches(after_decode, batch_format="numpy", num_cpus=cfg.data.task_cpus)
             for product, rows in scored.groupby("product", sort=True)]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _scorer_pool(rows_in, cfg: Config, models: dict[str, ResolvedModel], pidx: dict[str, int],
                 gpus: float, upstream: bool, tally, on_scored):
    """The actor pool of :class:`Scorer` over ``rows_in`` (decoded rows when ``upstream``,
    else image URIs the scorer reads and cuts itself)."""
    sc = cfg.score
    # ceil: on a GPU node the fractional rest of a core is left to decode tasks, which
    # mostly wait on storage; floor would leave 1.5 reserved CPUs running one thread.
    threads = max(1, math.ceil(sc.cpus_per_actor))
    return actor_pool_map(
        rows_in, Scorer,
        fn_constructor_kwargs={
            "models": models, "storage_cfg": cfg.storage, "pidx": pidx,
            "threads": threads, "use_gpu": gpus > 0,
            "data_cfg": None if upstream else cfg.data,
            "on_retries": TallyReporter(tally) if tally is not None else None,
            "on_scored": on_scored, "batch_size": sc.batch_size,
            "runtime": sc.runtime, "precision": sc.precision,
        },
        # Several calls per actor: the next batch is read and decoded while others are in
        # the model (the scorer bounds its forward passes itself).
        compute=ray.data.ActorPoolStrategy(
            size=sc.actors, enable_true_multi_threading=True,
            max_concurrent_calls_per_actor=concurrent_calls(model_streams(threads, gpus > 0))),
        batch_size=sc.batch_size,
        batch_format="numpy",
        num_cpus=sc.cpus_per_actor,
        num_gpus=min(1.0, gpus / max(1, sc.actors)) if gpus else 0,
    )
