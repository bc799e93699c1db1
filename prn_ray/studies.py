"""Tuning studies and training runs by id: where they live and what a job that reuses one
finds there. Read before Ray starts, so that a mistyped id is an input error (exit status 2)
rather than a silent fresh start."""

from __future__ import annotations

import json
from typing import Any

from prn_ray import storage
from prn_ray.config import Config
from prn_ray.errors import UsageError

SHOWN = 5  # existing ids listed in an error message


def tune_dir(cfg: Config) -> str:
    """Where studies live: ``tune.output_uri``, else ``<storage.runs_uri>/tune``."""
    return cfg.tune.output_uri or storage.join(cfg.storage.runs_uri, "tune")


def tune_root(cfg: Config, study_id: str) -> str:
    return storage.join(tune_dir(cfg), study_id)


def load_best(cfg: Config, study_id: str, products: list[str]) -> dict[str, dict[str, Any]]:
    """Per-product best overrides of a study (products without a best.json are left out)."""
    out = {}
    for product in products:
        uri = storage.join(tune_root(cfg, study_id), product, "best.json")
        if storage.exists(uri, cfg.storage):
            out[product] = json.loads(storage.read_text(uri, cfg.storage))["overrides"]
    return out


def existing(uri: str, cfg: Config, prefix: str) -> str:
    """The last few ids under ``uri`` starting with ``prefix``, for an error message."""
    ids = [d for d in storage.list_dirs(uri, cfg.storage) if d.startswith(prefix)]
    return ", ".join(ids[-SHOWN:]) if ids else "none"


def best_of_study(cfg: Config, study_id: str, products: list[str]) -> dict[str, dict[str, Any]]:
    """:func:`load_best`, or :class:`UsageError` when the study has no result for any of
    ``products`` (a mistyped id, another ``tune.output_uri``, or a study that never finished
    a product)."""
    best = load_best(cfg, study_id, products)
    if not best:
        raise UsageError(
            f"--use-tuned {study_id}: no best.json for {', '.join(products)} under "
            f"{storage.redact(tune_root(cfg, study_id))} (studies there: "
            f"{existing(tune_dir(cfg), cfg, '')})")
    return best


def check_train_run(cfg: Config, run_id: str) -> None:
    """:class:`UsageError` unless ``<storage.runs_uri>/<run_id>`` exists (a run to resume)."""
    if not storage.exists(storage.join(cfg.storage.runs_uri, run_id), cfg.storage):
        raise UsageError(
            f"--run-id {run_id}: no training run under {storage.redact(cfg.storage.runs_uri)} "
            f"to resume (runs there: {existing(cfg.storage.runs_uri, cfg, 'train-')}); "
            "leave --run-id out to start a new run")
