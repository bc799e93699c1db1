"""Train one PRN per product, all products in parallel, and register the models.

    python jobs/train_all.py --config configs/demo.yaml
    ray job submit --working-dir . -- python jobs/train_all.py --config configs/demo.yaml
        --set storage.models_uri=s3://bucket/models --products fabric,wood_panel

Progress lines are per product (``[product] epoch ...``); a final table lists every product's
status, best validation metrics, wall time and model version, and is written as JSON next to the
models (``<models_uri>/_runs/<run_id>.json``). Exit status 0 done, 1 when any product
failed, 2 when the arguments, config or data location are wrong (found before Ray starts).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import prn_ray  # noqa: F401
except ImportError:  # run from a checkout (ray job submit --working-dir .) without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prn_ray.cli import config_from_args, job_parser, run_job
from prn_ray.console import progress
from prn_ray.runtime import init_ray
from prn_ray.train.fleet import format_summary, train_all, training_inputs
from prn_ray.train.tuning import load_best


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--run-id", default=None,
                   help="resume this run (same run id: products continue from their last "
                        "checkpoint) instead of starting a new one")
    p.add_argument("--use-tuned", metavar="STUDY_ID", default=None,
                   help="train each product with the best configuration of this tuning study "
                        "(tune/search.py); products without a result use the config as is")
    args = p.parse_args(argv)
    cfg = config_from_args(args).with_absolute_paths()
    inputs = training_inputs(cfg, args.products)  # a wrong data location fails before Ray
    init_ray(cfg)
    overrides = None
    if args.use_tuned:
        products = inputs[2]
        overrides = load_best(cfg, args.use_tuned, products)
        for product, hp in sorted(overrides.items()):
            progress(product, f"tuned configuration from {args.use_tuned}: {hp}")
    results = train_all(cfg, args.products, run_id=args.run_id, overrides=overrides,
                        inputs=inputs)
    print(format_summary(results), flush=True)
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(run_job(main))
