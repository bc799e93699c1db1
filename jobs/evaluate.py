"""Evaluate registered models on the test split (the paper's table), or nightly scores.

    python jobs/evaluate.py --config configs/demo.yaml
    python jobs/evaluate.py --config configs/demo.yaml --scores runs/demo/scores --date 2026-11-29

Per product and as the mean: image AUROC, pixel AUROC, AUPRO@0.3, pixel AP and ms/image, as
JSON (results.json) and Markdown (results.md), plus a self-contained HTML report
(report.html with ROC/PRO curves, score histograms with the threshold and heat-map grids).
With --scores, a scoring job's committed Parquet output is checked against the ground-truth
masks at each image's own resolution instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import prn_ray  # noqa: F401
except ImportError:  # run from a checkout (ray job submit --working-dir .) without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prn_ray import storage
from prn_ray.cli import config_from_args, job_parser, run_job
from prn_ray.console import progress
from prn_ray.evaluation import evaluate_models, evaluate_scores
from prn_ray.report import markdown_table
from prn_ray.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--out", default=None,
                   help="output URI (default: <storage.runs_uri>/eval/<timestamp>)")
    p.add_argument("--scores", default=None,
                   help="evaluate this scoring output (score.output_uri) instead of the models")
    p.add_argument("--date", default=None, help="with --scores: only this date's partitions")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--no-maps", action="store_true", help="do not save maps/<product>.npz")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    init_ray(cfg)
    if args.scores:
        evaluations, out = evaluate_scores(cfg, args.scores, args.date, args.products, args.out,
                                           report=not args.no_report)
    else:
        evaluations, out = evaluate_models(cfg, args.products, args.out,
                                           save=not args.no_maps, report=not args.no_report)
    if not evaluations:
        progress("evaluate", "nothing to evaluate (no registered model / no test images)")
        return 1
    print(markdown_table(evaluations), flush=True)
    progress("evaluate", f"results: {storage.redact(out)}/results.json"
                         + ("" if args.no_report else f", report: {storage.redact(out)}/report.html"))
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
