"""The embedded demo, end to end on a laptop-class CPU: generate -> train -> score -> evaluate.

    python jobs/demo.py                      # configs/demo.yaml: local Ray, local storage
    python jobs/demo.py --set data.root=s3://bucket/demo --set storage.models_uri=s3://...
    (or: prn-ray demo ...)

1. writes the procedural 4-product dataset (MVTec layout) to data.root unless it is there;
2. trains one PRN per product, all products in parallel (jobs/train_all.py);
3. scores the test images as a nightly batch (jobs/score.py) into Parquet;
4. evaluates the registered models on the test split and the nightly scores against the
   ground truth (jobs/evaluate.py), and prints where the HTML report is.
"""

from __future__ import annotations

import time
from pathlib import Path

from prn_ray.cli import Exit, check_backbone, config_from_args, job_parser, print_config
from prn_ray.config import ConfigError

DEMO_CONFIG = "configs/demo.yaml"


def default_config() -> str:
    """``configs/demo.yaml`` of this checkout, else (an installed package) of the current
    directory."""
    checkout = Path(__file__).resolve().parents[2] / DEMO_CONFIG
    return str(checkout) if checkout.is_file() else DEMO_CONFIG


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = job_parser(__doc__, prog, default_config=DEMO_CONFIG)
    p.set_defaults(config=default_config())
    p.add_argument("--n-train", type=int, default=40, help="normal training images per product")
    args = p.parse_args(argv)
    if args.n_train < 1:
        p.error(f"--n-train must be >= 1, got {args.n_train}")
    cfg = config_from_args(args)
    if args.print_config:
        return print_config(cfg)

    from prn_ray import demo_data, storage
    from prn_ray.console import progress
    from prn_ray.evaluation import evaluate_models, evaluate_scores
    from prn_ray.report import markdown_table, mean_metrics
    from prn_ray.runtime import init_ray
    from prn_ray.train.fleet import format_summary as train_summary
    from prn_ray.train.fleet import train_all

    check_backbone(cfg)
    t0 = time.time()
    root = cfg.data.root
    if not root:
        raise ConfigError("the demo writes its dataset to data.root: set it")
    if not storage.list_files(root, cfg.storage):
        progress("demo", f"1/4 writing the demo dataset to {storage.redact(root)}")
        demo_data.make_dataset(root, cfg.storage, products=args.products or demo_data.PRODUCTS,
                               n_train=args.n_train, image_size=cfg.data.image_size)
    else:
        progress("demo", f"1/4 using the dataset already at {storage.redact(root)}")

    init_ray(cfg)
    progress("demo", "2/4 training every product in parallel")
    results = train_all(cfg, args.products)
    print(train_summary(results), flush=True)
    if not any(r.status == "ok" for r in results):
        return Exit.FAILED

    progress("demo", "3/4 nightly scoring of the test images")
    summary = _score_test_images(cfg, args.products)

    progress("demo", "4/4 evaluation and report")
    evaluations, out = evaluate_models(cfg, args.products)
    print(markdown_table(evaluations).rstrip(), flush=True)
    nightly, scores_out = evaluate_scores(cfg, cfg.score.output_uri, date=summary.date,
                                    products=args.products)
    progress("demo", f"done in {time.time() - t0:.0f}s")
    progress("demo", f"report: {storage.redact(out)}/report.html")
    auroc, n = mean_metrics(nightly).get("image_auroc", (float("nan"), 0))
    progress("demo", f"nightly scores vs ground truth (image AUROC {auroc:.3f}, mean of {n} "
                     f"product(s)): {storage.redact(scores_out)}/report.html")
    return Exit.DONE


def _score_test_images(cfg, products: list[str] | None):
    """The demo's "new images" (its test split) scored as a nightly run of today."""
    from prn_ray import storage
    from prn_ray.console import progress
    from prn_ray.data.catalog import build_catalog
    from prn_ray.scoring.run import score
    from prn_ray.scoring.table import today_utc

    catalog = build_catalog(cfg).df
    test = catalog[catalog["split"] == "test"][["product", "image_uri"]]
    warehouse = storage.join(cfg.storage.runs_uri, "warehouse.csv")
    storage.write_text(warehouse, test.to_csv(index=False), cfg.storage)
    summary = score(cfg, warehouse, date=today_utc(), products=products)
    # One line of the run's table (jobs/score.py prints it whole; the JSON has everything).
    progress("demo", f"scoring run {summary.run_id}: {summary.status}, {summary.scored} of "
                     f"{summary.images} image(s) scored, {summary.anomalies} flagged anomalous, "
                     f"{summary.errors} error(s); summary {summary.summary_uri}")
    return summary
