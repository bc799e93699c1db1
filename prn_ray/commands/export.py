"""Export a registered model as one graph (backbone + head + image score) for serving.

    python jobs/export.py --config configs/demo.yaml --product fabric --format onnx \\
        --out runs/export/fabric [--version v...] [--input-dtype uint8|float32]

The graph takes an image batch at the model's input size S and returns (anomaly_map
N x 1 x S x S float32 probabilities, score N float32); the batch size is free. Input
(--input-dtype): uint8 N x S x S x 3 RGB 0..255 (default) or float32 N x 3 x S x S RGB in
[0, 1]; the backbone's mean/std normalisation is inside the graph. Writes <out>/model.pt
(TorchScript: torch.jit.load) or <out>/model.onnx (ONNX opset 17: onnxruntime; needs the
onnx package, pip install 'prn_ray[export]'), then <out>/export.json: the input it expects
(size, layout, dtype, channel order, how to resize), mean/std, the threshold
(is_anomaly = score > threshold), product, version, created-at, and a check of the written
file against the eager model. No Ray.
"""

from __future__ import annotations

import importlib.util

from prn_ray.cli import Exit, config_from_args, job_parser, print_config


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = job_parser(__doc__, prog, products=False)
    p.add_argument("--product", required=True, help="the product whose model is exported")
    p.add_argument("--version", default=None, help="model version (default: LATEST)")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    p.add_argument("--out", required=True, help="output folder (local path or URI)")
    p.add_argument("--input-dtype", default="uint8", choices=("uint8", "float32"),
                   help="uint8: N x S x S x 3 RGB 0..255 (default); "
                        "float32: N x 3 x S x S RGB in [0, 1]")
    p.add_argument("--no-check", action="store_true",
                   help="skip loading the written model back and comparing it with the eager one")
    args = p.parse_args(argv)
    if args.format == "onnx" and importlib.util.find_spec("onnx") is None:
        p.error("--format onnx needs the onnx package: pip install 'prn_ray[export]'")
    cfg = config_from_args(args)
    if args.print_config:
        return print_config(cfg)

    from prn_ray import registry, storage
    from prn_ray.console import progress
    from prn_ray.export import export_model

    mv = registry.load(cfg.storage, args.product, args.version)
    progress(args.product, f"exporting {mv.version} ({mv.geometry.describe()}) as {args.format}")
    doc = export_model(mv, args.format, args.out, input_dtype=args.input_dtype,
                       storage_cfg=cfg.storage, check=not args.no_check)
    check = doc.get("check")
    if isinstance(check, dict):
        progress(args.product, f"check on {check['images']} images: max |difference| map "
                               f"{check['anomaly_map']:.2e}, score {check['score']:.2e}")
    out = storage.redact(args.out)
    progress(args.product, f"wrote {out}/{doc['file']} and {out}/export.json "
                           f"(threshold {doc['threshold']:.4f})")
    return Exit.DONE
