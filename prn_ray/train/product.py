"""One product's training driver: normal reference, a ``TorchTrainer`` over the streamed
features, then the best validated weights and their threshold published to the registry.

Runs inside a Tune trial (:mod:`prn_ray.train.fleet`) or a tuning trial
(:mod:`prn_ray.train.tuning`, which publishes nothing). Never raises: a failure comes back as
a result with the reason, so one product never stops the others.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

import pandas as pd
import ray

from prn_ray import registry, storage
from prn_ray.config import Config
from prn_ray.console import detail, progress
from prn_ray.data.catalog import describe_seen, seen_defect_counts
from prn_ray.data.product import ProductData, image_sizes, product_geometry
from prn_ray.data.stages import SynthesisBanks, build_banks
from prn_ray.engine.reference import build_feature_cache, compute_reference, describe
from prn_ray.engine.state import load_checkpoint
from prn_ray.geometry import Geometry
from prn_ray.model import Backbone, PRNHead
from prn_ray.runtime import quiet_ray_data, train_logging
from prn_ray.train.datasets import reference_dataset, train_dataset, validation_dataset
from prn_ray.train.worker import WorkerArgs, train_dataset_name, train_loop_per_worker


@dataclass
class ProductResult:
    product: str
    status: str  # ok | failed
    version: str | None = None
    epochs: int = 0
    steps: int = 0
    best_epoch: int = -1
    metrics: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    wall_s: float = 0.0
    start: float = 0.0
    end: float = 0.0
    quarantined: int = 0
    error: str | None = None
    stopped: str = ""
    node_id: str = ""
    startup_s: float = 0.0  # trainer.fit() call -> first training batch (fixed cost)


def storage_filesystem(cfg: Config, uri: str):
    """(filesystem, path) for Ray's ``storage_path``/``storage_filesystem`` (S3 endpoints)."""
    loc = storage.resolve(uri, cfg.storage)
    return (loc.fs, loc.path) if loc.scheme == "s3" else (None, loc.path)


@dataclass
class Prepared:
    """What a product's training run needs before its first step (the driver's part)."""

    cfg: Config
    data: ProductData
    geometry: Geometry
    banks: SynthesisBanks
    backbone: Backbone
    args: WorkerArgs
    seen_counts: tuple[int, int]


def train_product(cfg: Config, product: str, catalog: pd.DataFrame, run_id: str,
                  others: dict[str, list[str]] | None = None, *, publish: bool = True,
                  callbacks: list | None = None) -> ProductResult:
    """Normal reference -> TorchTrainer -> calibration -> registry, for one product.

    Never raises: failures come back as ``status="failed"`` with the reason and the
    traceback on the console (one product's failure never stops the others). Tuning trials
    pass ``publish=False`` (nothing is registered) and a ``TuneReportCallback``.
    """
    t0 = time.time()
    result = ProductResult(product=product, status="failed", start=t0)
    quiet_ray_data()  # this runs in a trial's process: its datasets take this context along
    try:
        prep = prepare(cfg, product, catalog, run_id, others)
        t_fit = time.time()
        state, best = fit(prep, run_id, callbacks)
        version = register(prep, product, state, best, run_id) if publish else None
        result = ProductResult(
            product=product, status="ok", version=version, epochs=state.epoch + 1,
            steps=state.step, best_epoch=state.best_epoch, metrics=state.best_metrics,
            threshold=state.calibration["threshold"], quarantined=len(prep.data.quarantine),
            stopped=state.stopped, node_id=state.node_id, start=t0,
            startup_s=round(state.first_batch_at - t_fit, 1) if state.first_batch_at else 0.0)
        progress(product, (f"registered version {version}" if version else "trained")
                 + f" (best epoch {state.best_epoch + 1}, threshold {result.threshold:.4f})")
    except Exception as exc:  # one product's failure never stops the others
        result.error = storage.redact(f"{type(exc).__name__}: {exc}")
        progress(product, f"FAILED: {result.error}")
        traceback.print_exc()
    result.end = time.time()
    result.wall_s = round(result.end - t0, 1)
    return result


def prepare(cfg: Config, product: str, catalog: pd.DataFrame, run_id: str,
            others: dict[str, list[str]] | None) -> Prepared:
    """The product's data, geometry, synthesis banks, normal reference and feature cache, and
    the arguments its Train workers get (the reference and cache in the object store)."""
    data = ProductData.from_catalog(catalog, product)
    cfg, geometry = product_geometry(cfg, data.train_normals)
    tc = cfg.train
    seen_counts = seen_defect_counts(catalog).get(product, (0, 0))
    counts = (f"{len(data.train_normals)} train normals, " + describe_seen(*seen_counts)
              + f", {len(data.val)} validation images")
    detail(product, counts)
    sample = image_sizes(data.train_normals[:1], cfg)
    progress(product, "input: " + geometry.describe(*(sample[0] if sample else ())))
    banks = build_banks(data, others or {}, cfg, geometry)
    t_ref = time.time()
    # Batches of the feature actor's size: the pass's progress line moves as they come.
    reference, normals = compute_reference(
        data, cfg, geometry, lambda: reference_dataset(data, cfg, geometry).iter_batches(
            batch_size=tc.feature_batch_size, batch_format="numpy"))
    if data.quarantine:
        progress(product, f"quarantined {len(data.quarantine)} unreadable image(s)")
    progress(product, f"{counts}; {describe(reference)} ({time.time() - t_ref:.0f}s)")
    backbone = Backbone(cfg.model.backbone, cfg.model.weights, cfg.storage)
    features = build_feature_cache(normals, banks, backbone, cfg, geometry, data, reference)
    args = WorkerArgs(cfg=cfg, data=data, channels=backbone.channels,
                      feature_sizes=backbone.feature_sizes(geometry.size), geometry=geometry,
                      reference=ray.put(reference), features=ray.put(features),
                      run_uri=storage.join(cfg.storage.runs_uri, f"{run_id}-{product}"))
    return Prepared(cfg, data, geometry, banks, backbone, args, seen_counts)


def fit(prep: Prepared, run_id: str, callbacks: list | None):
    """The TorchTrainer run of a prepared product: (the best checkpoint's state, its head
    weights). Raises when there is nothing to register."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, data, banks, geometry, args = prep.cfg, prep.data, prep.banks, prep.geometry, prep.args
    tc = cfg.train
    run_name = f"{run_id}-{data.product}"
    fs, path = storage_filesystem(cfg, cfg.storage.runs_uri)
    use_gpu = tc.use_gpu == "true" or (
        tc.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)

    def stream(rank: int):
        # Called by Ray Train at every (re)start of the worker group; the epochs the
        # worker's checkpoint already covers expand to nothing (see train_dataset).
        return lambda: train_dataset(data, banks, cfg, geometry, args.run_uri, rank,
                                     tc.num_workers)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            callbacks=callbacks,
            logging_config=train_logging(),
        ),
        datasets={"val": validation_dataset(data, banks, cfg, geometry),
                  **{train_dataset_name(r): stream(r) for r in range(tc.num_workers)}},
        # Nothing is split: each worker reads its own stream, and with one worker no split
        # coordinator sits between the stream and the trainer.
        # Explicit options: Train's defaults copy a deprecated field (exclude_resources) and
        # warn about it in every run.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[],
            execution_options=ray.data.ExecutionOptions(
                preserve_order=ray.data.DataContext.get_current()
                .execution_options.preserve_order)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint ({result.error})")
    with result.checkpoint.as_directory() as d:
        head = PRNHead(cfg.model, args.channels, geometry.size, args.feature_sizes)
        state, best = load_checkpoint(d, head, None)
    if best is None or state.calibration is None:
        raise RuntimeError("no validation result was ever better than nothing "
                           "(metrics were NaN); nothing to register")
    return state, best


def register(prep: Prepared, product: str, state, best, run_id: str) -> str:
    """Publish the best weights, their calibration and the run's record; the version."""
    return registry.publish(
        prep.cfg, product, head_state=best, backbone_state=prep.backbone.state_dict(),
        geometry=prep.geometry, calibration=state.calibration,
        metrics={"validation": state.best_metrics, "best_epoch": state.best_epoch,
                 "epochs": state.epoch + 1, "steps": state.step,
                 "history": state.history, "restarts": state.restarts,
                 "resumes": state.resumes,
                 "stopped": state.stopped, "run_id": run_id,
                 "quarantined": prep.data.quarantine,
                 "seen_anomalies": {"with_masks": prep.seen_counts[0],
                                    "image_labels_only": prep.seen_counts[1]},
                 "backbone_weights": prep.backbone.weights_label},
        check_views=prep.data.check_views(prep.cfg, prep.geometry),
    )
