"""Hyperparameter search per product with Ray Tune (ASHA on a validation metric).

    python tune/search.py --config configs/demo.yaml --samples 8     # or: prn-ray tune ...
    python tune/search.py --config configs/demo.yaml --study-id study-20261129 # resume a study
    python tune/search.py --config configs/magnetic_tile.yaml --budget-s 3600  # one hour a product
    python tune/search.py --config configs/demo.yaml --dry-run
    ray job submit --working-dir . -- python tune/search.py --config configs/demo.yaml

The search space is `tune.search_space` in the config (see README). Each product's best
overrides go to <tune output>/<study>/<product>/best.json; train the final models with
`python jobs/train_all.py --config ... --use-tuned <study>`.
"""

from __future__ import annotations

from prn_ray.cli import Exit, check_backbone, config_from_args, job_parser, print_config


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = job_parser(__doc__, prog, dry_run=True)
    p.add_argument("--samples", type=int, default=None,
                   help="trials per product (default: tune.num_samples)")
    p.add_argument("--study-id", default=None,
                   help="resume this study instead of starting a new one")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock seconds for each product's whole study: sets every "
                        "trial's train.time_budget_s from the trials, their concurrency and "
                        "ASHA's rungs (same as --set tune.budget_s=X)")
    args = p.parse_args(argv)
    if args.samples is not None and args.samples < 1:
        p.error(f"--samples must be >= 1, got {args.samples}")
    if args.budget_s is not None:
        args.overrides = [*args.overrides, f"tune.budget_s={args.budget_s!r}"]
    cfg = config_from_args(args)
    if args.print_config:
        return print_config(cfg)

    from prn_ray import storage
    from prn_ray.console import progress
    from prn_ray.data.catalog import build_catalog, training_inputs
    from prn_ray.errors import UsageError
    from prn_ray.study_budget import StudyBudget

    check_backbone(cfg)
    samples = args.samples or cfg.tune.num_samples
    try:  # the fewest concurrent trials give the shortest ones: checked for that case
        StudyBudget.from_config(cfg.tune, samples, cfg.tune.max_concurrent_trials or 1)
    except ValueError as exc:
        raise UsageError(f"--budget-s / tune.budget_s: {exc}") from None
    catalog = build_catalog(cfg)  # a wrong data location fails here, before Ray starts
    _, _, products = training_inputs(cfg, args.products, catalog)
    if args.dry_run:
        from prn_ray.plans import tune_plan

        print(tune_plan(cfg, catalog.df, products, samples, args.study_id), flush=True)
        return Exit.DONE

    from prn_ray.runtime import init_ray
    from prn_ray.studies import tune_root
    from prn_ray.train.tuning import format_summary, tune_all

    init_ray(cfg)
    docs = tune_all(cfg, args.products, samples=args.samples, study_id=args.study_id)
    print(format_summary(docs), flush=True)
    if docs:
        progress("tune", f"results under {storage.redact(tune_root(cfg, docs[0]['study']))}")
    return Exit.DONE if all("error" not in d for d in docs) else Exit.FAILED
