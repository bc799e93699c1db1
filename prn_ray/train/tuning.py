"""Hyperparameter studies with Ray Tune: one study per product, products in parallel.

* The search space is defined once, in ``tune.search_space`` of the config (dotted config keys
  -> ``{"uniform": [lo, hi]}``, ``{"loguniform": [lo, hi]}``, ``{"choice": [...]}``,
  ``{"randint": [lo, hi]}``); see ``TuneConfig`` and the README.
* A trial is the product's normal training (:func:`prn_ray.train.product.train_product`, which
  launches the product's ``TorchTrainer``: Train V2 inside a function trainable) with the
  sampled overrides and ``publish=False``; a ``TuneReportCallback`` forwards every validation
  to Tune so ASHA can stop weak trials early.
* The objective is the training run's own best-epoch rule (``val_selection``: by default the
  mean of the four metrics on the held-out real defects and their extended copies), or any
  validation metric named in ``tune.metric``. The test split never reaches a trial: trials get
  the catalog without its test rows (``training_inputs``).
* Results: ``<output>/<study>/<product>/best.json`` (best overrides and their validation
  metrics) and ``<output>/<study>/summary.json``; a study with the same id resumes
  (``Tuner.restore``) instead of starting over. ``jobs/train_all.py --use-tuned`` trains the
  final models from the ``best.json`` files.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from typing import Any

import pandas as pd
import ray

from prn_ray import storage
from prn_ray.config import Config, from_dict
from prn_ray.config_checks import search_space as check_search_space
from prn_ray.console import format_table, progress
from prn_ray.contracts import dumps, new_id
from prn_ray.data.catalog import training_inputs
from prn_ray.data.product import Budget, ProductData
from prn_ray.engine.validation import metric_key
from prn_ray.runtime import quiet_ray_data, quiet_worker_exit
from prn_ray.studies import tune_root
from prn_ray.study_budget import StudyBudget
from prn_ray.train.fleet import max_concurrent_products
from prn_ray.train.product import storage_filesystem, train_product


def search_space(cfg: Config) -> dict[str, Any]:
    """The config's search space as Ray Tune sampling objects, keyed by dotted config key."""
    from ray import tune

    out: dict[str, Any] = {}
    problem = check_search_space(cfg.tune.search_space)  # the config check's own rule
    if problem:
        raise ValueError(f"tune.search_space {problem}")
    for key, spec in cfg.tune.search_space.items():
        kind, args = next(iter(spec.items()))
        cfg.replace({key: args[0]})  # fails early, with the valid keys, on a typo
        out[key] = {
            "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a),
            # Tune cannot carry lists as categories (points_to_evaluate breaks): JSON strings.
            "choice": lambda a: tune.choice([_encode(v) for v in a]),
            "randint": lambda a: tune.randint(*a),
            "grid": lambda a: tune.grid_search(list(a)),
        }[kind](args)
    return out


def _encode(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def decode(hp: dict[str, Any]) -> dict[str, Any]:
    """Sampled values back to config values (list-valued choices travel as JSON strings)."""
    out = {}
    for key, value in hp.items():
        if isinstance(value, str) and value[:1] in "[{":
            value = json.loads(value)
        out[key] = value
    return out


def default_point(cfg: Config) -> dict[str, Any]:
    """The searched keys at their configured values (the baseline trial), as Tune samples."""
    flat = cfg.to_dict()
    out = {}
    for key in cfg.tune.search_space:
        node: Any = flat
        for part in key.split("."):
            node = node[part]
        out[key] = _encode(node)
    return out


def objective(cfg: Config) -> str:
    """The reported metric Tune maximises: ``val_selection`` (the training run's own
    best-epoch rule) unless ``tune.metric`` names another validation metric."""
    return metric_key(cfg.tune.metric)


def _trial(config: dict[str, Any]) -> None:
    """One trial: train the product with the sampled overrides; Tune sees every validation."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    quiet_ray_data()
    quiet_worker_exit()
    overrides = decode(config["hp"])
    cfg = from_dict(config["cfg"]).replace(overrides)
    trial_id = tune.get_context().get_trial_id()
    cfg = cfg.replace({"storage.runs_uri": storage.join(config["study_uri"], "train")})
    result = train_product(cfg, config["product"], ray.get(config["catalog"]),
                           run_id=f"trial-{trial_id}", others=config["others"], publish=False,
                           callbacks=[TuneReportCallback()])
    doc = {"trial_id": trial_id, "overrides": overrides, **asdict(result)}
    storage.write_text(storage.join(config["study_uri"], "trials", f"{trial_id}.json"),
                       dumps(doc), cfg.storage)
    if result.status != "ok":
        raise RuntimeError(result.error)


def run_study(cfg: Config, product: str, catalog: pd.DataFrame, others: dict[str, list[str]],
              study_uri: str, samples: int, concurrency: int) -> dict[str, Any]:
    """Tune one product; resumes the study at ``study_uri`` if one is there."""
    from ray import tune

    quiet_ray_data()
    t0 = time.time()
    metric = objective(cfg)
    budget = StudyBudget.from_config(cfg.tune, samples, concurrency)
    if budget is not None:
        cfg = cfg.replace({"train.time_budget_s": budget.trial_s})
        progress(product, budget.describe())
    # Validations a full trial reports (the last epoch always validates; a step budget may end
    # the run before train.epochs): what "stopped early" is measured against.
    data = ProductData.from_catalog(catalog, product)
    epochs = Budget.of(cfg, data.epoch_rows(cfg)).epochs
    reports = max(1, -(-epochs // max(1, cfg.train.val_every_epochs)))
    fs, path = storage_filesystem(cfg, study_uri)
    trainable = tune.with_resources(_trial, {"cpu": cfg.train.driver_cpus})
    experiment = storage.join(path, "tuner")
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        progress(product, f"resuming study {study_uri}")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, storage_filesystem=fs,
                                   resume_errored=True, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"hp": search_space(cfg), "cfg": cfg.to_dict(), "product": product,
                         "catalog": ray.put(catalog), "others": others,
                         "study_uri": study_uri},
            tune_config=_tune_config(cfg, metric, samples, concurrency, reports, budget),
            run_config=tune.RunConfig(name="tuner", storage_path=path, storage_filesystem=fs,
                                      verbose=0),
        )
    # A time budget leaves a full trial's validations open: _study_result counts the most
    # that any trial made.
    doc = _study_result(cfg, product, tuner.fit(), metric, samples,
                        reports if budget is None else None)
    doc["study_s"] = round(time.time() - t0, 1)
    if budget is not None:
        doc["budget"] = {**asdict(budget), "trial_s": round(budget.trial_s, 1),
                         "grace_s": round(budget.grace_s, 1)}
    storage.write_text(storage.join(study_uri, "best.json"), dumps(doc), cfg.storage)
    return doc


def _tune_config(cfg: Config, metric: str, samples: int, concurrency: int, reports: int,
                 budget: StudyBudget | None):
    """Samples, the default configuration as the first trial, and ASHA over validations
    (over seconds of the trial's clock under a study budget)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if budget is not None:
        scheduler = ASHAScheduler(time_attr="time_total_s", metric=metric, mode="max",
                                  max_t=budget.max_t, grace_period=budget.grace_s,
                                  reduction_factor=budget.reduction_factor)
    else:
        # max_t one past the last report: trials end on their own; ASHA only cuts
        # (stopping a trial at max_t would kill its trainer before it cleans up).
        scheduler = ASHAScheduler(metric=metric, mode="max", max_t=reports + 1,
                                  grace_period=min(cfg.tune.grace_period, reports),
                                  reduction_factor=cfg.tune.reduction_factor)
    return tune.TuneConfig(
        num_samples=samples,
        # The first trial is the current configuration: the table shows the gain.
        # (Tune ignores max_concurrent_trials with a given BasicVariantGenerator.)
        search_alg=tune.search.BasicVariantGenerator(
            points_to_evaluate=[{"hp": default_point(cfg)}], max_concurrent=concurrency),
        scheduler=scheduler,
    )


def _study_result(cfg: Config, product: str, grid, metric: str, samples: int,
                  reports: int | None) -> dict[str, Any]:
    """The study's ``best.json``: every trial's best validation value, the winner, the
    default configuration's value beside it."""
    trials = []
    for res in grid:
        history = res.metrics_dataframe
        best = (float(history[metric].max()) if history is not None and metric in history
                and history[metric].notna().any() else math.nan)
        trials.append({
            "trial_id": res.metrics.get("trial_id") if res.metrics else None,
            "overrides": decode(res.config["hp"]), "best": best,
            "reports": 0 if history is None else len(history),
            "status": "error" if res.error else "ok",
            "error": storage.redact(str(res.error))[:300] if res.error else None,
        })
    ok = [t for t in trials if not math.isnan(t["best"])]
    if not ok:
        raise RuntimeError(f"{product}: no trial produced a validation result")
    winner = max(ok, key=lambda t: t["best"])
    full = reports if reports is not None else max(t["reports"] for t in trials)
    baseline = decode(default_point(cfg))
    default = next((t["best"] for t in trials if t["overrides"] == baseline), math.nan)
    return {"product": product, "metric": metric, "best_value": winner["best"],
            "default_value": default, "default_overrides": baseline,
            "overrides": winner["overrides"], "trials": trials, "samples": samples,
            "stopped_early": sum(t["reports"] < full for t in trials),
            "max_reports": full}


def tune_all(cfg: Config, products: list[str] | None = None, samples: int | None = None,
             study_id: str | None = None) -> list[dict[str, Any]]:
    """Run one study per product, studies in parallel; returns each product's best.json doc
    (or ``{"product", "error"}`` for a product whose study failed)."""
    cfg = cfg.with_absolute_paths()  # trials run in their own working directories
    study_id = study_id or new_id("study-")
    samples = samples or cfg.tune.num_samples
    frame, others, wanted = training_inputs(cfg, products)
    root = tune_root(cfg, study_id)
    total = max_concurrent_products(cfg, 10**6)
    per_product = cfg.tune.max_concurrent_trials or max(1, total // len(wanted))
    progress("tune", f"study {study_id}: {len(wanted)} product(s), {samples} trials each, "
                     f"{per_product} concurrent trial(s) per product, objective "
                     f"{objective(cfg)}")
    catalog_ref = ray.put(frame)  # resolved to the frame inside each study task
    study = ray.remote(num_cpus=0)(run_study)
    refs = {p: study.remote(cfg, p, catalog_ref, others, storage.join(root, p), samples,
                            per_product) for p in wanted}
    out = []
    for product, ref in refs.items():
        try:
            doc = ray.get(ref)
        except Exception as exc:  # one product's study failing leaves the others intact
            doc = {"product": product, "error": storage.redact(f"{exc}")[-800:]}
        out.append({**doc, "study": study_id})
    storage.write_text(storage.join(root, "summary.json"),
                       dumps(out), cfg.storage)
    return out


def format_summary(docs: list[dict[str, Any]]) -> str:
    """Per product: objective of the default configuration and of the best, trials, winner."""
    rows = []
    for d in docs:
        if "error" in d:
            rows.append([d["product"], None, None, None, None, f"FAILED: {d['error']}"])
            continue
        hp = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(d["overrides"].items()))
        rows.append([d["product"], round(d["default_value"], 4), round(d["best_value"], 4),
                     len(d["trials"]), d["stopped_early"], hp])
    return format_table(["product", "default", "best", "trials", "stopped", "best overrides"],
                        rows)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
