"""Nightly batch scoring: score new images with each product's registered model.

    python jobs/score.py --config configs/demo.yaml --input s3://plant/incoming/2024-05-01 \\
        --set score.output_uri=s3://plant/scores [--date 2024-05-01] [--products a,b] \\
        [--threshold 0.5] [--model-version v...] [--incremental] [--dry-run]
    ray job submit --working-dir . -- python jobs/score.py --config configs/demo.yaml \\
        --input s3://plant/incoming/2024-05-01 --set score.output_uri=s3://plant/scores
    (or: prn-ray score ...)

--input is a prefix whose first path component is the product
(<input>/<product>/.../*.png|jpg|...) or a manifest (.parquet/.csv with columns
product, image_uri). Output: Parquet partitioned date=YYYY-MM-DD/product=<name>/ under
score.output_uri; a rerun of the same date replaces that date's partitions. The run summary
is printed and written to <output>/_runs/<date>/<run_id>.json.

Exit status: 0 all products scored; 3 committed, but some product had no usable model
(its rows carry error "no_model: ...") or failed to score, or some input had a product name
that is not allowed ("bad_product_name: ...", partition product=_invalid); 1 the run failed
(nothing of it was committed unless a partition's _SUCCESS says so); 2 wrong input
(arguments, config, a local --input or manifest that does not exist), before Ray starts;
4 another run of the same date held a partition's commit lease for longer than
score.lease_wait_s (nothing of this run was committed).
"""

from __future__ import annotations

import argparse
import sys

from prn_ray.cli import Exit, check_runtime, config_from_args, job_parser, print_config
from prn_ray.config import Config
from prn_ray.errors import UsageError


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = _parser(prog)
    args = p.parse_args(argv)

    from prn_ray.scoring.table import check_date, today_utc

    try:
        date = check_date(args.date or today_utc())
    except ValueError as exc:
        p.error(f"--date {args.date}: {exc}")
    overrides = list(args.overrides)
    if args.threshold is not None:
        overrides.append(f"score.threshold={args.threshold!r}")
    if args.model_version:
        overrides.append(f"score.model_version={args.model_version}")
    if args.incremental:
        overrides.append("score.incremental=true")
    args.overrides = overrides
    cfg = config_from_args(args)
    if args.print_config:
        return print_config(cfg)

    check_runtime(cfg)
    check_input(args.input, cfg)
    if args.dry_run:
        return _dry_run(cfg, args.input, args.products, date)

    from prn_ray.runtime import init_ray
    from prn_ray.scoring.lease import LeaseBusy
    from prn_ray.scoring.run import format_summary, score

    init_ray(cfg, dashboard=False)  # no Train or Tune: no State API needed
    try:
        summary = score(cfg, args.input, date=date, products=args.products, run_id=args.run_id)
    except LeaseBusy as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return Exit.BUSY
    print(format_summary(summary), flush=True)
    return Exit.PARTIAL if summary.status == "partial" else Exit.DONE


def _parser(prog: str | None) -> argparse.ArgumentParser:
    p = job_parser(__doc__, prog, dry_run=True)
    p.add_argument("--input", required=True,
                   help="prefix of new images (<input>/<product>/...) or a .parquet/.csv "
                        "manifest with columns product, image_uri")
    p.add_argument("--date", default=None,
                   help="partition date YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold for every product (default: each model's "
                        "calibrated threshold; same as --set score.threshold=X)")
    p.add_argument("--model-version", default=None,
                   help="pin a model version instead of LATEST: 'v...' for every product or "
                        "'product=v...,other=v...' (same as --set score.model_version=...)")
    p.add_argument("--incremental", action="store_true",
                   help="skip images already scored without error by the same model version")
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)  # tests, re-runs by hand
    return p


def _dry_run(cfg: Config, input_uri: str, products: list[str] | None, date: str) -> int:
    """The plan: images per product, the model version each would be scored with."""
    from prn_ray.plans import score_plan
    from prn_ray.scoring.inputs import list_inputs
    from prn_ray.scoring.models import resolve_models

    frame = list_inputs(input_uri, cfg.storage, products or cfg.data.products)
    models = resolve_models(cfg, sorted(frame["product"].unique()))
    versions = {p: m.version for p, m in models.items()}
    inputs = {p: m.geometry.describe() for p, m in models.items() if m.geometry}
    print(score_plan(cfg, frame, input_uri, date, versions, inputs), flush=True)
    return Exit.DONE


def check_input(input_uri: str, cfg: Config) -> None:
    """A manifest must exist, and so must a local folder; an empty object-store prefix is a
    night without new images (status "empty"), not an error."""
    from prn_ray import storage
    from prn_ray.config_checks import local_path
    from prn_ray.data.manifest import TABLE_EXTENSIONS

    is_manifest = input_uri.lower().endswith(TABLE_EXTENSIONS)
    if (is_manifest or local_path(input_uri)) and not storage.exists(input_uri, cfg.storage):
        raise UsageError(f"--input {storage.redact(input_uri)}: no such "
                         f"{'manifest' if is_manifest else 'folder'}")
