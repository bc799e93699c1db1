"""One product trained in this process, without Ray: the same reference fit, synthesis,
steps, validation and selection as the Ray job. For smoke tests, benchmarks (the "bare loop")
and quick experiments; production training is :func:`prn_ray.train.fleet.train_all`."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch

from prn_ray.config import Config
from prn_ray.data.feature_cache import merge_batches, streamed_rows
from prn_ray.data.local import feature_batches, reference_batches, streamed_batches
from prn_ray.data.product import ProductData, product_geometry
from prn_ray.data.stages import build_banks, plan_frame, validation_frame
from prn_ray.engine.reference import build_feature_cache, compute_reference
from prn_ray.engine.trainer import HeadTrainer
from prn_ray.engine.validation import VALIDATION_EXTRA, ValidationSet
from prn_ray.model import Backbone, PRNHead


def train_local(cfg: Config, catalog: pd.DataFrame, product: str,
                others: dict[str, list[str]] | None = None, say=lambda msg: None,
                report: Callable[[HeadTrainer, dict], None] | None = None
                ) -> tuple[HeadTrainer, Backbone]:
    """Train ``product`` of ``catalog`` (its test rows are never read). Returns the trainer
    (its state, best weights, validation set) and the backbone it used. ``report(trainer,
    record)`` is called at every epoch end that validated (the Ray worker's report), with the
    head as that epoch left it."""
    torch.manual_seed(cfg.train.seed)
    data = ProductData.from_catalog(catalog, product)
    cfg, geometry = product_geometry(cfg, data.train_normals)
    tc = cfg.train
    banks = build_banks(data, others or {}, cfg, geometry)
    backbone = Backbone(cfg.model.backbone, cfg.model.weights, cfg.storage)
    reference, normals = compute_reference(
        data, cfg, geometry, lambda: reference_batches(data.train_normals, cfg, geometry,
                                                       backbone, tc.batch_size))
    cache = build_feature_cache(normals, banks, backbone, cfg, geometry, data, reference)
    head = PRNHead(cfg.model, backbone.channels, geometry.size,
                   backbone.feature_sizes(geometry.size))
    head.set_reference(reference)
    trainer = HeadTrainer(head, cfg, torch.device("cpu"), data.epoch_rows(cfg), say=say)
    trainer.val = ValidationSet.from_batches(feature_batches(
        validation_frame(data, banks, cfg), banks, cfg, geometry, backbone, tc.batch_size,
        extra=VALIDATION_EXTRA, validation=True))

    plans = (plan_frame(data, cfg, range(epoch, epoch + 1)) for epoch in range(tc.epochs))

    def stream():
        for epoch in range(tc.epochs):
            frame = streamed_rows(plan_frame(data, cfg, range(epoch, epoch + 1)), geometry.tiled)
            yield from streamed_batches(frame, banks, cfg, geometry, backbone, tc.batch_size)

    trainer.fit(merge_batches(plans, cache, stream(), tc.batch_size),
                report=(lambda row: None) if report is None else (lambda row: report(trainer, row)))
    return trainer, backbone
