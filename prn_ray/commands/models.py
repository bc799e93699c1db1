"""List the registered models: products, versions, which is LATEST, threshold, validation
metrics, created-at.

    python jobs/models.py --config configs/demo.yaml [--product fabric] [--json]

Reads only the registry's JSON files under storage.models_uri (no weights, no Ray). The
table shows, per version: LATEST (*), the calibrated threshold, its rule
(``score.threshold_rule``) and the false-alarm rate and recall it gave on the held-out images
it was chosen on, with how many images each rests on, the selection metric the
training run maximised (train.selection_metric) and its validation value, validation image
AUROC, pixel AUROC, AUPRO and pixel AP on held-out real defects (val_real_*), and when it was
registered (UTC). --json prints the same as a JSON list for scripts.

Exit status: 0 listed (also when the registry is empty); 2 bad input (a --product without a
model, config errors).
"""

from __future__ import annotations

from prn_ray.cli import Exit, config_from_args, job_parser, names, print_config

# The metric columns follow registry.LISTED_METRICS.
HEADERS = ("product", "version", "latest", "threshold", "rule", "false alarms", "recall",
           "selection", "value", "img AUROC", "pix AUROC", "AUPRO", "pix AP", "created (UTC)")


def rate(value: float | None, n: int | None) -> str:
    """``1.1 % of 90``: an expected rate with the number of held-out images it rests on."""
    if value is None or n is None or value != value:
        return "-"
    return f"{100 * value:.1f} % of {n}"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = job_parser(__doc__, prog, products=False)
    p.add_argument("--product", type=names, default=None,
                   help="only this product (comma-separated for several; default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.print_config:
        return print_config(cfg)

    from dataclasses import asdict

    from prn_ray import registry, storage
    from prn_ray.console import format_table
    from prn_ray.contracts import dumps

    models = registry.list_models(cfg.storage, args.product)
    if args.json:
        print(dumps([asdict(m) for m in models], indent=2), flush=True)
        return Exit.DONE
    if not models:
        print(f"no models under {storage.redact(cfg.storage.models_uri)}", flush=True)
        return Exit.DONE
    rows = [(m.product, m.version, "*" if m.latest else "", m.threshold,
             m.threshold_rule or "-", rate(m.expected_fpr, m.n_normal),
             rate(m.expected_recall, m.n_anomalous), m.selection_metric,
             *(m.metrics.get(k) for k in registry.LISTED_METRICS),
             (m.created_at or "-").replace("+00:00", ""))
            for m in models]
    print(format_table(HEADERS, rows, align="lllrlrrlrrrrrl"), flush=True)
    return Exit.DONE
