"""Hyperparameter search per product with Ray Tune (ASHA on a validation metric).

    python tune/search.py --config configs/demo.yaml --samples 8
    python tune/search.py --config configs/demo.yaml --study-id study-20261129 # resume a study
    ray job submit --working-dir . -- python tune/search.py --config configs/demo.yaml

The search space is `tune.search_space` in the config (see README). Each product's best
overrides go to <tune output>/<study>/<product>/best.json; train the final models with
`python jobs/train_all.py --config ... --use-tuned <study>`.
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
from prn_ray.runtime import init_ray
from prn_ray.train.fleet import training_inputs
from prn_ray.train.tuning import format_summary, tune_all, tune_root


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--samples", type=int, default=None,
                   help="trials per product (default: tune.num_samples)")
    p.add_argument("--study-id", default=None,
                   help="resume this study instead of starting a new one")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    training_inputs(cfg, args.products)  # a wrong data location fails before Ray starts
    init_ray(cfg)
    docs = tune_all(cfg, args.products, samples=args.samples, study_id=args.study_id)
    print(format_summary(docs), flush=True)
    if docs:
        progress("tune", f"results under {storage.redact(tune_root(cfg, docs[0]['study']))}")
    return 0 if all("error" not in d for d in docs) else 1


if __name__ == "__main__":
    sys.exit(run_job(main))
