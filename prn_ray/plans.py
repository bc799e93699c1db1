"""What a job will do, worked out without Ray: the ``--dry-run`` plans of train, tune and score
(products, images per split, resources per stage, where outputs go) and the one formula for
how many products train at once.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from prn_ray import storage
from prn_ray.config import Config
from prn_ray.console import format_table
from prn_ray.contracts import LABELS, SPLITS
from prn_ray.data.catalog import describe_seen, seen_defect_counts
from prn_ray.studies import tune_root
from prn_ray.study_budget import StudyBudget


def product_cpus(cfg: Config) -> float:
    """CPUs one product holds while it trains: its driver, its trainer's workers, its
    feature actors and (about) two data tasks in flight."""
    tc = cfg.train
    return (tc.driver_cpus + tc.num_workers * tc.cpus_per_worker
            + tc.feature_actors * tc.feature_actor_cpus + 2 * cfg.data.task_cpus)


def products_at_once(cfg: Config, n_products: int, cpus: float) -> int:
    """How many products fit at once on ``cpus`` (``train.max_concurrent_products`` wins)."""
    if cfg.train.max_concurrent_products:
        return max(1, min(cfg.train.max_concurrent_products, n_products))
    return max(1, min(n_products, int(cpus // product_cpus(cfg))))


def planned_cpus(cfg: Config) -> tuple[float | None, str]:
    """The CPUs a local Ray would have (``ray.num_cpus``, else this machine's), or None when
    the job would connect to a cluster (known only once connected)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        return None, f"the cluster at {storage.redact(address)}"
    n = cfg.ray.num_cpus or os.cpu_count() or 1
    return float(n), f"a local Ray with {n} CPU(s)"


def split_counts(catalog: pd.DataFrame) -> str:
    """A table of images per product and (split, label)."""
    counts = catalog.groupby(["product", "split", "label"]).size()
    columns = [(s, lb) for s in SPLITS for lb in LABELS
               if ((counts.index.get_level_values(1) == s)
                   & (counts.index.get_level_values(2) == lb)).any()]
    rows = [[p, *(int(counts.get((p, s, lb), 0)) for s, lb in columns)]
            for p in sorted(catalog["product"].unique())]
    return format_table(["product", *(f"{s} {lb}" for s, lb in columns)], rows)


def resources(cfg: Config, n_products: int) -> list[str]:
    tc, g = cfg.train, cfg.train.use_gpu
    stream = " and the training stream" if tc.features_in == "actors" else ""
    cpus, where = planned_cpus(cfg)
    at_once = (f"{products_at_once(cfg, n_products, cpus)} product(s) at a time on {where}"
               if cpus is not None else f"as many products as fit on {where}")
    return [
        (f"resources per product: driver {tc.driver_cpus} CPU; trainer {tc.num_workers} "
        f"worker(s) x {tc.cpus_per_worker} CPU (GPU: {g}); feature actors {tc.feature_actors} "
        f"x {tc.feature_actor_cpus} CPU (+{tc.feature_actor_gpus} GPU where there are GPUs) "
        f"for the normal reference{stream}; "
        f"decode/synthesis tasks {cfg.data.task_cpus} CPU each"),
        f"  = about {product_cpus(cfg):.2f} CPU per product: {at_once}",
    ]


def budget(cfg: Config) -> str:
    tc = cfg.train
    return (f"budget per product: {tc.epochs} epoch(s), max_steps {tc.max_steps or '-'}, "
            f"time_budget_s {tc.time_budget_s or '-'}; backbone {cfg.model.backbone} "
            f"({cfg.model.weights}), image size {cfg.data.image_size}")


def inputs(cfg: Config, catalog: pd.DataFrame, products: list[str]) -> list[str]:
    """How each product's images become the model's inputs (``data.tiles: auto`` decided
    here from a few headers, as the training run will decide it)."""
    from prn_ray.data.product import image_sizes, product_geometry

    lines = ["input per product (data.image_size, data.resize, data.tiles):"]
    for product in products:
        rows = catalog[(catalog["product"] == product) & (catalog["split"] == "train")
                       & (catalog["label"] == "normal")]
        normals = sorted(rows["image_uri"].tolist())
        try:
            _, g = product_geometry(cfg, normals)
            sample = image_sizes(normals[:1], cfg)
            lines.append(f"  {product}: " + g.describe(*(sample[0] if sample else ())))
        except Exception as exc:  # noqa: BLE001 - the plan says so; training will fail alike
            lines.append(f"  {product}: cannot choose ({storage.redact(str(exc))})")
    return lines


def train_plan(cfg: Config, catalog: pd.DataFrame, products: list[str], run_id: str | None,
               tuned: dict[str, dict[str, Any]] | None = None) -> str:
    runs = storage.join(cfg.storage.runs_uri, run_id or "train-<new id>")
    lines = [f"dry run: train {len(products)} product(s): {', '.join(products)}",
             split_counts(catalog[catalog["product"].isin(products)]),
             "(test images are never read by training)",
             "seen anomalies per product (data.seen_anomalies):",
             *(f"  {p}: " + describe_seen(*c) for p, c in
               seen_defect_counts(catalog[catalog["product"].isin(products)]).items()),
             budget(cfg),
             *inputs(cfg, catalog, products), *resources(cfg, len(products))]
    for product, hp in sorted((tuned or {}).items()):
        lines.append(f"tuned overrides for {product}: {hp}")
    lines += [(f"models -> {storage.redact(cfg.storage.models_uri)}/<product>/<version> "
              "(LATEST updated per product)"),
              f"checkpoints and run summary -> {storage.redact(runs)}",
              "nothing was started (--dry-run)"]
    return "\n".join(lines)


def tune_plan(cfg: Config, catalog: pd.DataFrame, products: list[str], samples: int,
              study_id: str | None) -> str:
    tc = cfg.tune
    space = [f"  {k}: {v}" for k, v in sorted(tc.search_space.items())]
    lines = [f"dry run: tune {len(products)} product(s): {', '.join(products)}",
             split_counts(catalog[catalog["product"].isin(products)]),
             f"{samples} trial(s) per product, objective {tc.metric}"
             + (f" (= train.selection_metric {cfg.train.selection_metric})"
                if tc.metric == "selection" else "")
             + (f", ASHA grace {tc.grace_period} reduction {tc.reduction_factor}"
                if tc.budget_s is None else "")
             + f", at most {tc.max_concurrent_trials or 'a fair share of'} concurrent "
               "trial(s) per product",
             "search space:", *space, budget(cfg), *study_lines(cfg, samples),
             *inputs(cfg, catalog, products),
             "each trial trains one product:",
             *resources(cfg, len(products) * samples),
             (f"results -> {storage.redact(tune_root(cfg, study_id or 'study-<new id>'))}"
             "/<product>/best.json"),
             "nothing was started (--dry-run)"]
    return "\n".join(lines)


def study_lines(cfg: Config, samples: int) -> list[str]:
    """The study budget's split into trial budgets, at the concurrency the plan can know."""
    concurrency = cfg.tune.max_concurrent_trials or 1
    budget = StudyBudget.from_config(cfg.tune, samples, concurrency)
    if budget is None:
        return []
    return [f"{budget.describe()}; at {concurrency} concurrent trial(s) per product (more "
            "concurrency: longer trials)"]


def score_plan(cfg: Config, frame: pd.DataFrame, input_uri: str, date: str,
               versions: dict[str, str | None], inputs: dict[str, str] | None = None) -> str:
    sc = cfg.score
    inputs = inputs or {}
    rows = [[p, int((frame["product"] == p).sum()), versions.get(p) or "NO MODEL (rows: no_model)",
             inputs.get(p, "-")] for p in sorted(frame["product"].unique())]
    ignored = frame.attrs.get("ignored") or {}
    lines = [(f"dry run: score {len(frame)} image(s) of {len(rows)} product(s) from "
             f"{storage.redact(input_uri)} for date {date}"),
             format_table(["product", "images", "model version", "input"], rows, align="lrll")]
    if ignored:
        lines.append("ignored inputs: " + ", ".join(f"{k} {v}" for k, v in ignored.items()))
    lines += [f"resources: {sc.actors} scoring actor(s) x {sc.cpus_per_actor} CPU, batches of "
              f"{sc.batch_size}; decode tasks {cfg.data.task_cpus} CPU each; model on "
              + (f"{sc.runtime} {sc.precision}" if sc.runtime != "auto" else
                 "OpenVINO bf16 where a node's CPU has native bf16 and OpenVINO is installed, "
                 "else torch fp32")
              + (f"; threshold override {sc.threshold}" if sc.threshold is not None else "")
              + ("; incremental" if sc.incremental else ""),
              (f"output -> {storage.redact(sc.output_uri)}/date={date}/product=<product>/ "
              f"(summary under _runs/{date}/)"),
              "nothing was started (--dry-run)"]
    return "\n".join(lines)
