"""The Ray Train worker: the training engine fed by cached features and a Ray Data stream of
the synthetic rows, reporting checkpoints.

Everything the worker needs travels in one typed :class:`WorkerArgs`; the loop itself is
:class:`prn_ray.engine.trainer.HeadTrainer`, its batches :func:`prn_ray.data.feature_cache
.merge_batches` of the plan this worker walks. With ``train.features_in: trainer`` the streams
carry images and the worker runs the frozen backbone on them between its steps.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prn_ray.config import Config
from prn_ray.console import detail, progress
from prn_ray.contracts import FEATURE_COLUMNS
from prn_ray.data.feature_cache import merge_batches
from prn_ray.data.product import ProductData
from prn_ray.data.stages import FeatureExtractor, shard_plan
from prn_ray.engine.state import write_progress
from prn_ray.engine.trainer import HeadTrainer
from prn_ray.engine.validation import ValidationSet
from prn_ray.geometry import Geometry
from prn_ray.model import PRNHead
from prn_ray.model.inputs import as_tensor
from prn_ray.runtime import quiet_train_worker
from prn_ray.train.datasets import TRAIN_COLUMNS, VALIDATION_COLUMNS


@dataclass
class WorkerArgs:
    cfg: Config
    data: ProductData  # the plan's images (after the reference pass's quarantine)
    channels: list[int]
    feature_sizes: list[tuple[int, int]]
    geometry: Geometry  # the product's (cfg has it pinned)
    reference: Any  # ObjectRef of the product's NormalReference (fitted once, on the driver)
    features: Any  # ObjectRef of its FeatureCache (the rows every epoch repeats)
    run_uri: str  # where the resume point lives


def train_dataset_name(rank: int) -> str:
    """Each worker streams its own dataset (no split coordinator between them)."""
    return f"train_{rank}"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: PRN head on cached + streamed features."""
    import ray.train
    import ray.train.torch

    quiet_train_worker()
    args: WorkerArgs = config["args"]
    cfg, tc, product = args.cfg, args.cfg.train, args.data.product
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = tc.torch_threads or max(1, round(tc.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(tc.seed + rank)
    np.random.seed(tc.seed + rank)
    device = ray.train.torch.get_device()
    say = (lambda msg: progress(product, msg)) if rank == 0 else (lambda msg: None)
    say_detail = (lambda msg: detail(product, msg)) if rank == 0 else (lambda msg: None)

    trainer = _trainer(args, device, world, say, say_detail)
    # The stream expands epochs lazily and skips those before this point: record it before
    # reading, so a restarted run streams from its restored checkpoint, not from epoch 0.
    start = trainer.state.epoch + 1
    if rank == 0:
        write_progress(args.run_uri, trainer.state.epoch, cfg.storage)
    trainer.state.node_id = ray.get_runtime_context().get_node_id()
    if world > 1:
        torch.distributed.barrier()  # no rank reads its stream before the point is recorded
        trainer.model = ray.train.torch.prepare_model(trainer.head)
    # The backbone on the step's threads, between steps (train.features_in: trainer).
    extract = (FeatureExtractor(cfg.model, cfg.storage, args.geometry.size, threads)
               if tc.features_in == "trainer" else None)
    val = ray.train.get_dataset_shard("val").iter_batches(batch_size=64, batch_format="numpy")
    trainer.val = ValidationSet.from_batches(
        as_tensors(b) for b in with_features(val, extract, VALIDATION_COLUMNS))
    cache = ray.get(args.features)
    say_detail(f"training: {trainer.epoch_rows} samples/epoch ({cache.nbytes / 2**20:.0f} MiB of "
        f"cached features), {trainer.steps_per_epoch} steps/epoch, budget "
        f"{trainer.total_steps} steps, {len(trainer.val)} validation views, "
        f"{device} {trainer.precision}, streamed rows' features in the "
        f"{'worker' if extract is not None else 'actor pool'}")

    def report(metrics_row: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                trainer.save(d)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics_row, checkpoint=ckpt)

    plans = (shard_plan(args.data, cfg, epoch, rank, world)
             for epoch in range(start, trainer.budget.planned_epochs))
    stream = with_features(ray.train.get_dataset_shard(train_dataset_name(rank)).iter_batches(
        batch_size=tc.feature_batch_size, batch_format="numpy", prefetch_batches=2),
        extract, TRAIN_COLUMNS)
    trainer.fit(on_device(merge_batches(plans, cache, stream, tc.batch_size), device), report)


def _trainer(args: WorkerArgs, device: torch.device, world: int, say, say_detail) -> HeadTrainer:
    """The product's head and its trainer, restored from the run's last checkpoint if any."""
    import ray.train

    cfg = args.cfg
    head = PRNHead(cfg.model, args.channels, args.geometry.size, args.feature_sizes)
    head.set_reference(ray.get(args.reference))
    trainer = HeadTrainer(head, cfg, device, args.data.epoch_rows(cfg), world, say, say_detail)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.restore(d)
        say(f"resumed from checkpoint after epoch {trainer.state.epoch} "
            f"(step {trainer.state.step})")
    return trainer


def with_features(batches: Iterable[dict[str, np.ndarray]], extract: FeatureExtractor | None,
                  keep: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
    """``keep`` and the features of each batch: computed here by ``extract``, or (``None``)
    already computed by the stream's actor pool."""
    for batch in batches:
        out = extract(batch) if extract is not None else batch
        yield {k: out[k] for k in (*keep, *FEATURE_COLUMNS)}


def as_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: as_tensor(v) for k, v in batch.items()}


def on_device(batches: Iterator[dict[str, torch.Tensor]], device: torch.device
              ) -> Iterator[dict[str, torch.Tensor]]:
    for batch in batches:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
