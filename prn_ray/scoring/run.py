"""A nightly scoring run, end to end: list the inputs, resolve the models, stream the images
through the scorer into staging, check the row count, commit each partition, write the summary.

Rerunning a date replaces it and never duplicates rows; a run that dies leaves the previous
complete partition in place; ``score.incremental`` skips images already scored without error by
the same model version.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from prn_ray import storage
from prn_ray.config import Config
from prn_ray.console import detail, format_table, progress
from prn_ray.contracts import new_id
from prn_ray.data.ray_data import RunTally, retried_total
from prn_ray.scoring.commit import (
    carry_over,
    clean_stale_staging,
    commit_partition,
    staged_by_product,
    staged_stats,
    versions,
)
from prn_ray.scoring.inputs import list_inputs
from prn_ray.scoring.lease import LeaseBusy, hold_partitions
from prn_ray.scoring.models import ResolvedModel, resolve_models
from prn_ray.scoring.table import (
    BAD_PRODUCT_NAME,
    INVALID_PRODUCT,
    NO_MODEL,
    PIDX,
    SCORING_FAILED,
    STAGING_SCHEMA,
    ScoringError,
    check_date,
    error_reason,
    partition_uri,
    read_scores,
    today_utc,
)

_STAGING_MIN_FILE_BYTES = 32 * 1024 * 1024  # coalesce small blocks into fewer output files


@dataclass
class ProductSummary:
    product: str
    model_version: str | None
    threshold: float | None
    images: int = 0  # input images of this product
    skipped: int = 0  # incremental: already scored by this version
    rows: int = 0  # rows written by this run (scored + errors)
    scored: int = 0
    errors: int = 0
    anomalies: int = 0
    carried: int = 0  # incremental: rows kept from the partition's previous commit
    error: str | None = None  # product-level problem (no model)


@dataclass
class RunSummary:
    run_id: str
    date: str
    input_uri: str
    output_uri: str
    status: str = "ok"  # ok | partial (a product had no model / failed) | empty
    incremental: bool = False
    threshold_override: float | None = None
    images: int = 0
    skipped: int = 0
    rows: int = 0
    scored: int = 0
    errors: int = 0
    anomalies: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    ignored_inputs: dict[str, int] = field(default_factory=dict)
    # Object-storage requests that failed transiently and were tried again: the driver's and
    # the decode tasks' (not the scorer actors' model loads, nor Ray Data's staging writes,
    # which the SDK's own strategy retries uncounted).
    retried_requests: int = 0
    products: list[ProductSummary] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    pipeline_s: float = 0.0
    images_per_s: float = 0.0
    summary_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(cfg: Config, input_uri: str, *, date: str | None = None,
          products: list[str] | None = None, run_id: str | None = None,
          say: Callable[[str, str], None] | None = None) -> RunSummary:
    """Score every image under ``input_uri`` for ``date`` (default today, UTC) and commit the
    date's partitions under ``cfg.score.output_uri``. Needs Ray (``runtime.init_ray``)."""
    t0 = time.perf_counter()
    retried0 = storage.retried_requests()
    run = _Run.start(cfg, input_uri, check_date(date or today_utc()),
                     run_id or new_id("score-"), products or cfg.data.products, say or progress)
    if cfg.score.incremental and len(run.frame):
        run.skip_scored()
    tally = run.stage() if len(run.frame) else None
    run.commit()
    run.finish(t0, storage.retried_requests() - retried0 + (
        retried_total(tally) if tally is not None else 0))
    return run.summary


@dataclass
class _Run:
    """One scoring run's state between its steps: the images still to score, the models
    resolved for them, the per-product and run summaries, and what staging holds."""

    cfg: Config
    date: str
    run_id: str
    say: Callable[[str, str], None]
    frame: Any  # pd.DataFrame of product, image_uri: what is left to score
    names: list[str]
    models: dict[str, ResolvedModel]
    per: dict[str, ProductSummary]
    summary: RunSummary
    staged: dict[str, list[str]] = field(default_factory=dict)
    stats: Any = None  # pd.DataFrame: one row per staged row (product, image_uri, error, ...)
    reasons: Counter = field(default_factory=Counter)

    @property
    def staging(self) -> str:
        return storage.join(self.cfg.score.output_uri, "_staging", self.date, self.run_id)

    @classmethod
    def start(cls, cfg: Config, input_uri: str, date: str, run_id: str,
              wanted: list[str] | None, say: Callable[[str, str], None]) -> _Run:
        """List the inputs and resolve one model version per product, once, on the driver."""
        summary = RunSummary(run_id, date, storage.redact(input_uri),
                             storage.redact(cfg.score.output_uri),
                             incremental=bool(cfg.score.incremental),
                             threshold_override=cfg.score.threshold)
        frame = list_inputs(input_uri, cfg.storage, wanted)
        summary.ignored_inputs = dict(frame.attrs.get("ignored", {}))
        summary.images = len(frame)
        names = sorted(frame["product"].unique().tolist())
        say("score", f"run {run_id} date {date}: {len(frame)} image(s) of {len(names)} "
                     f"product(s) from {storage.redact(input_uri)}")
        models = resolve_models(cfg, [p for p in names if p != INVALID_PRODUCT])
        if INVALID_PRODUCT in names:  # never looked up: the name is not a path
            models[INVALID_PRODUCT] = ResolvedModel(
                INVALID_PRODUCT, error=f"{BAD_PRODUCT_NAME}: product name(s) not allowed")
        per: dict[str, ProductSummary] = {}
        for p in names:
            m = models[p]
            per[p] = ProductSummary(p, m.version, m.threshold,
                                    images=int((frame["product"] == p).sum()), error=m.error)
            if m.version:
                # Tiles multiply an image's cost: say so where the run's speed is read.
                (say if m.geometry.tiled else detail)(
                    p, f"model {m.version} ({m.geometry.describe()}, threshold "
                       f"{m.threshold:.4f})")
            else:
                say(p, m.error or NO_MODEL)
        return cls(cfg, date, run_id, say, frame, names, models, per, summary)

    def skip_scored(self) -> None:
        """Incremental: leave out images already scored without error by the version
        resolved now."""
        previous = read_scores(self.cfg.score.output_uri, self.cfg.storage, products=self.names,
                               columns=["product", "image_uri", "model_version", "error"])
        ok_prev = previous[previous["error"].isna()]
        done = set(zip(ok_prev["product"], ok_prev["image_uri"], ok_prev["model_version"]))
        frame = self.frame
        key = [(p, u, self.models[p].version) for p, u in zip(frame["product"],
                                                              frame["image_uri"])]
        skip = np.array([k in done for k in key], dtype=bool)
        for p, n in Counter(frame["product"][skip]).items():
            self.per[p].skipped = int(n)
        self.summary.skipped = int(skip.sum())
        self.frame = frame[~skip].reset_index(drop=True)
        self.say("score", f"incremental: {self.summary.skipped} image(s) already scored by the "
                          f"same model version, {len(self.frame)} to score")

    def stage(self):
        """Stream the images through the scorer into this run's staging; check that every
        image has exactly one row there. Returns the run's tally actor (retry counts)."""
        from prn_ray.runtime import quiet_ray_data
        from prn_ray.scoring.plan import ScoringProgress, build_dataset

        cfg, scfg, frame = self.cfg, self.cfg.storage, self.frame
        t1 = time.perf_counter()
        quiet_ray_data()
        tally = RunTally.remote()  # retried requests and rows scored, from every worker
        totals = {p: int(n) for p, n in frame["product"].value_counts().sort_index().items()
                  if self.models[p].version}  # products without a model are not scored
        watch = ScoringProgress(tally, totals, self.say)
        pidx = {p: i for i, p in enumerate(self.names)}
        ds = build_dataset(cfg, frame, self.models, pidx, tally, watch.callback())
        loc = storage.resolve(self.staging, scfg)
        with watch.reporting():
            ds.write_parquet(loc.path, filesystem=loc.fs, partition_cols=[PIDX],
                             min_bytes_per_file=_STAGING_MIN_FILE_BYTES,
                             schema=STAGING_SCHEMA,
                             # explicit: a default 1-CPU write task can starve on a busy cluster
                             ray_remote_args={"num_cpus": cfg.data.task_cpus})
        self.summary.pipeline_s = round(time.perf_counter() - t1, 3)
        self.staged = staged_by_product(self.staging, scfg, self.names)
        self.stats = staged_stats([u for fs_ in self.staged.values() for u in fs_], scfg)
        # Never commit a run that lost or duplicated rows.
        if len(self.stats) != len(frame) or self.stats.duplicated(["product",
                                                                    "image_uri"]).any():
            raise ScoringError(f"staged {len(self.stats)} row(s) for {len(frame)} image(s) to "
                               f"score (run {self.run_id}); nothing committed, staging left at "
                               f"{storage.redact(self.staging)}")
        pipeline_s = self.summary.pipeline_s
        self.say("score", f"staged {len(self.stats)} row(s) in {pipeline_s:.1f}s "
                          f"({len(self.stats) / max(pipeline_s, 1e-9):.1f} images/s); "
                          "committing")
        return tally

    def commit(self) -> None:
        """Commit each product's partition under the date's leases: one committer per
        partition; another run of this date waits here, or gives up (LeaseBusy)."""
        cfg = self.cfg
        try:
            with hold_partitions(cfg.score.output_uri, cfg.storage, self.date, self.names,
                                 self.run_id, ttl_s=cfg.score.lease_s,
                                 wait_s=cfg.score.lease_wait_s, say=self.say) as leases:
                for p in self.names:
                    self.commit_product(p, leases)
        except LeaseBusy:
            storage.delete_dir(self.staging, cfg.storage)  # nothing of this run is committed
            raise

    def commit_product(self, p: str, leases) -> None:
        """Count the product's staged rows and commit its partition (the run holds its lease)."""
        scfg, out_uri = self.cfg.storage, self.cfg.score.output_uri
        incremental = bool(self.cfg.score.incremental)
        rows = self.stats[self.stats["product"] == p] if self.stats is not None else []
        ps = self.per[p]
        ps.rows = len(rows)
        if not len(rows):
            return  # incremental: nothing new for this product; its partition is untouched
        ok = rows["error"].isna()
        ps.scored, ps.errors = int(ok.sum()), int((~ok).sum())
        ps.anomalies = int(rows["is_anomaly"].eq(True).sum())
        self.reasons.update(r for r in map(error_reason, rows["error"]) if r)
        carry = None
        if incremental:
            carry = carry_over(out_uri, scfg, self.date, p, set(rows["image_uri"]))
            ps.carried = carry.num_rows if carry is not None else 0
        model = self.models[p]
        used = sorted({model.version or "", *versions(carry)} - {""})
        leases.check()
        marker = commit_partition(
            out_uri, scfg, date=self.date, product=p, staged=self.staged.get(p, []),
            run_id=self.run_id, carry=carry,
            extra={"model_versions": used, "threshold": model.threshold,
                   "threshold_override": self.cfg.score.threshold is not None,
                   "errors": ps.errors, "anomalies": ps.anomalies,
                   "incremental": incremental},
            before_marker=leases.check)
        self.summary.partitions.append(partition_uri(out_uri, self.date, p))
        detail(p, f"committed {marker['rows']} row(s) to date={self.date}/product={p}")

    def finish(self, t0: float, retried: int) -> None:
        """Totals and status; staging cleaned; the run's summary written beside the scores."""
        scfg, out_uri, summary = self.cfg.storage, self.cfg.score.output_uri, self.summary
        for ps in (self.per[p] for p in self.names):
            summary.rows += ps.rows
            summary.scored += ps.scored
            summary.errors += ps.errors
            summary.anomalies += ps.anomalies
        summary.errors_by_reason = dict(sorted(self.reasons.items()))
        summary.products = [self.per[p] for p in self.names]
        if not len(self.frame) and not summary.skipped:
            summary.status = "empty"
        elif any(self.per[p].error for p in self.names) or any(
                self.reasons.get(r) for r in (SCORING_FAILED, NO_MODEL, BAD_PRODUCT_NAME)):
            summary.status = "partial"
        # This run's staging is no longer needed; nor is that of runs of this date that died
        # long ago (a concurrent run's staging, e.g. other products of the same date, is kept).
        storage.delete_dir(self.staging, scfg)
        clean_stale_staging(out_uri, scfg, self.date)
        summary.retried_requests = retried
        summary.wall_s = round(time.perf_counter() - t0, 3)
        summary.images_per_s = round(summary.rows / summary.wall_s, 2) if summary.wall_s else 0.0
        uri = storage.join(out_uri, "_runs", self.date, f"{self.run_id}.json")
        storage.write_text(uri, json.dumps(summary.to_dict(), indent=1) + "\n", scfg)
        summary.summary_uri = storage.redact(uri)


def format_summary(s: RunSummary) -> str:
    """The table a person reads at the end of a nightly run."""
    rows = [[p.product, p.images, p.skipped, p.scored, p.errors, p.anomalies, p.threshold,
             p.model_version or (p.error or "")[:90]] for p in s.products]
    rows.append(["total", s.images, s.skipped, s.scored, s.errors, s.anomalies, None, ""])
    lines = [f"scoring run {s.run_id}  date {s.date}  status {s.status}",
             format_table(["product", "images", "skipped", "scored", "errors", "anomalies",
                           "threshold", "model version / problem"], rows)]
    if s.errors_by_reason:
        lines.append("errors by reason: " + ", ".join(f"{k} {v}"
                                                      for k, v in s.errors_by_reason.items()))
    if s.ignored_inputs:
        lines.append("ignored inputs: " + ", ".join(f"{k} {v}" for k, v in
                                                   s.ignored_inputs.items()))
    lines.append(f"{s.rows} row(s) written in {s.wall_s:.1f}s ({s.images_per_s:.1f} images/s; "
                 f"pipeline {s.pipeline_s:.1f}s)" +
                 (f"; threshold override {s.threshold_override}" if s.threshold_override
                  is not None else ""))
    if s.retried_requests:
        lines.append(f"object-storage requests retried: {s.retried_requests}")
    lines.append(f"summary: {s.summary_uri}")
    return "\n".join(lines)
