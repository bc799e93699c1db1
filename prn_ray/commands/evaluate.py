"""Evaluate registered models on the test split (the paper's table), or nightly scores.

    python jobs/evaluate.py --config configs/demo.yaml              # or: prn-ray evaluate ...
    python jobs/evaluate.py --config configs/demo.yaml --scores runs/demo/scores --date 2026-11-29

Per product and as the mean: image AUROC, pixel AUROC, AUPRO@0.3, pixel AP and ms/image, as
JSON (results.json) and Markdown (results.md), plus a self-contained HTML report
(report.html with ROC/PRO curves, score histograms with the threshold and heat-map grids).
With --scores, a scoring job's committed Parquet output is checked against the ground-truth
masks at each image's own resolution instead.
"""

from __future__ import annotations

from prn_ray.cli import Exit, config_from_args, job_parser, print_config


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = job_parser(__doc__, prog)
    p.add_argument("--out", default=None,
                   help="output URI (default: <storage.runs_uri>/eval/<timestamp>)")
    p.add_argument("--scores", default=None,
                   help="evaluate this scoring output (score.output_uri) instead of the models")
    p.add_argument("--date", default=None, help="with --scores: only this date's partitions")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--no-maps", action="store_true", help="do not save maps/<product>.npz")
    args = p.parse_args(argv)
    if args.date and not args.scores:
        p.error("--date selects partitions of --scores; give --scores too")
    if args.date:
        from prn_ray.scoring.table import check_date

        try:
            check_date(args.date)
        except ValueError as exc:
            p.error(f"--date {args.date}: {exc}")
    cfg = config_from_args(args)
    if args.print_config:
        return print_config(cfg)

    from prn_ray import storage
    from prn_ray.console import progress
    from prn_ray.data.catalog import build_catalog
    from prn_ray.evaluation import evaluate_models, evaluate_scores
    from prn_ray.report import markdown_table
    from prn_ray.runtime import init_ray

    catalog = build_catalog(cfg)  # a wrong data location fails here, before Ray starts
    init_ray(cfg, dashboard=False)  # no Train or Tune: no State API needed
    if args.scores:
        evaluations, out = evaluate_scores(cfg, args.scores, args.date, args.products, args.out,
                                           report=not args.no_report, catalog=catalog)
    else:
        evaluations, out = evaluate_models(cfg, args.products, args.out,
                                           save=not args.no_maps, report=not args.no_report,
                                           catalog=catalog)
    if not evaluations:
        progress("evaluate", "nothing to evaluate (no registered model / no test images)")
        return Exit.FAILED
    print(markdown_table(evaluations), flush=True)
    report = "" if args.no_report else f", report: {storage.redact(out)}/report.html"
    progress("evaluate", f"results: {storage.redact(out)}/results.json{report}")
    return Exit.DONE
