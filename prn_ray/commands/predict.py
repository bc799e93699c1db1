"""Score a file or a folder with one product's registered model, here, without Ray.

    python jobs/predict.py --config configs/demo.yaml --product fabric \\
        --input demo_data/fabric/test --out runs/predict/fabric [--version v...]

Every file under --input gets one row of <out>/predictions.csv (file, score, is_anomaly =
score > threshold, threshold, map_png, overlay_png, error, model_version); images also get
<out>/maps/<name>.png (16-bit grey at the image's own resolution, 65535 = probability 1: the
scoring job's encoding) and <out>/overlays/<name>.png (the image with its heat map). A file
that cannot be read or decoded (broken image, not an image) is a row with the reason; the
run goes on. Decoding and the model are the nightly scoring job's, so scores are equal.

Exit status: 0 every file handled (rows with errors included); 1 the run failed; 2 bad input
(unknown product or version, no such --input).
"""

from __future__ import annotations

import sys

from prn_ray.cli import Exit, check_runtime, config_from_args, job_parser, print_config


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = job_parser(__doc__, prog, products=False)
    p.add_argument("--product", required=True, help="whose model scores the images")
    p.add_argument("--input", required=True, help="an image file or a folder (local or URI)")
    p.add_argument("--out", required=True, help="output folder (local path or URI)")
    p.add_argument("--version", default=None, help="model version (default: LATEST)")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold (default: the model's calibrated one)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: score.batch_size)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threshold is not None:
        args.overrides = [*args.overrides, f"score.threshold={args.threshold!r}"]
    cfg = config_from_args(args)
    if args.print_config:
        return print_config(cfg)
    check_runtime(cfg)

    from prn_ray import storage
    from prn_ray.console import progress
    from prn_ray.predict import CSV_NAME, input_files, predict

    if not storage.exists(args.input, cfg.storage):
        p.error(f"--input {storage.redact(args.input)}: no such file or folder")
    if not input_files(args.input, cfg.storage)[0]:
        p.error(f"--input {storage.redact(args.input)}: no files in it")
    import torch

    from prn_ray.runtimes import RuntimeMismatch

    try:
        summary = predict(cfg, args.product, args.input, args.out, version=args.version,
                          batch_size=args.batch_size,
                          threads=args.threads or torch.get_num_threads(),
                          say=lambda msg: progress(args.product, msg))
    except RuntimeMismatch as exc:  # the graph disagrees with its model: nothing was written
        print(f"error: {storage.redact(str(exc))}", file=sys.stderr, flush=True)
        return Exit.FAILED
    c = summary.counts
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.errors_by_reason().items()))
    progress(args.product, f"{c['files']} files: {c['scored']} scored, {c['anomalous']} "
                           f"anomalous (score > {summary.threshold:.4f}, model "
                           f"{summary.version}), {c['errors']} errors"
                           + (f" ({reasons})" if reasons else ""))
    progress(args.product, f"wrote {storage.redact(storage.join(args.out, CSV_NAME))}")
    return Exit.DONE
