"""Train one PRN per product, all products in parallel, and register the models.

    python jobs/train_all.py --config configs/demo.yaml        # or: prn-ray train ...
    python jobs/train_all.py --config configs/demo.yaml --dry-run
    ray job submit --working-dir . -- python jobs/train_all.py --config configs/demo.yaml
        --set storage.models_uri=s3://bucket/models --products fabric,wood_panel

Progress lines are per product (``[product] epoch ...``); a final table lists every product's
status, best validation metrics, wall time and model version, and is written as JSON next to the
models (``<models_uri>/_runs/<run_id>.json``). Exit status 0 done, 1 when any product
failed, 2 when the arguments, config, data location, --run-id or --use-tuned study are wrong
(found before Ray starts).
"""

from __future__ import annotations

from prn_ray.cli import Exit, check_backbone, config_from_args, job_parser, print_config


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = job_parser(__doc__, prog, dry_run=True)
    p.add_argument("--run-id", default=None,
                   help="resume this run (same run id: products continue from their last "
                        "checkpoint) instead of starting a new one; it must exist")
    p.add_argument("--use-tuned", metavar="STUDY_ID", default=None,
                   help="train each product with the best configuration of this tuning study "
                        "(tune/search.py); products without a result use the config as is; "
                        "a study with no result for any of them is an error")
    args = p.parse_args(argv)
    cfg = config_from_args(args).with_absolute_paths()
    if args.print_config:
        return print_config(cfg)

    from prn_ray.console import progress
    from prn_ray.data.catalog import build_catalog, training_inputs
    from prn_ray.studies import best_of_study, check_train_run

    if args.run_id:
        check_train_run(cfg, args.run_id)
    check_backbone(cfg)
    catalog = build_catalog(cfg)  # a wrong data location fails here, before Ray starts
    inputs = training_inputs(cfg, args.products, catalog)
    overrides = best_of_study(cfg, args.use_tuned, inputs[2]) if args.use_tuned else None
    if args.dry_run:
        from prn_ray.plans import train_plan

        print(train_plan(cfg, catalog.df, inputs[2], args.run_id, overrides), flush=True)
        return Exit.DONE

    from prn_ray.runtime import init_ray
    from prn_ray.train.fleet import format_summary, train_all

    init_ray(cfg)
    for product, hp in sorted((overrides or {}).items()):
        progress(product, f"tuned configuration from {args.use_tuned}: {hp}")
    results = train_all(cfg, args.products, run_id=args.run_id, overrides=overrides,
                        inputs=inputs)
    print(format_summary(results), flush=True)
    return Exit.DONE if all(r.status == "ok" for r in results) else Exit.FAILED
