"""Write the procedural demo dataset (MVTec layout) to a local path or s3:// URI.

    python jobs/make_demo_data.py --out demo_data --size 128      # or: prn-ray make-demo-data
    python jobs/make_demo_data.py --out s3://bucket/demo --products fabric,bottle_cap --n-train 40
"""

from __future__ import annotations

import argparse

from prn_ray.cli import EXIT_CODES, Exit, JobParser, names


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = JobParser(prog=prog, description=__doc__, epilog=EXIT_CODES,
                  formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="dataset root URI (local path or s3://...)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--products", type=names, default=None,
                   help="comma-separated (default: every demo product)")
    p.add_argument("--defects", type=names, default=None,
                   help="comma-separated (default: every demo defect)")
    p.add_argument("--n-train", type=int, default=40, help="normal training images per product")
    p.add_argument("--n-good-test", type=int, default=10, help="normal test images per product")
    p.add_argument("--n-defect-test", type=int, default=12,
                   help="defective test images per product (cycling through the defects)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (else AWS env)")
    args = p.parse_args(argv)

    import json

    from prn_ray import demo_data, storage
    from prn_ray.config import StorageConfig

    unknown = sorted(set(args.products or ()) - set(demo_data.PRODUCTS)) + \
        sorted(set(args.defects or ()) - set(demo_data.DEFECTS))
    if unknown:
        p.error(f"unknown product/defect {unknown}; products: {', '.join(demo_data.PRODUCTS)}; "
                f"defects: {', '.join(demo_data.DEFECTS)}")
    summary = demo_data.make_dataset(
        args.out,
        StorageConfig(endpoint_url=args.endpoint_url),
        products=args.products or list(demo_data.PRODUCTS),
        n_train=args.n_train,
        n_good_test=args.n_good_test,
        n_defect_test=args.n_defect_test,
        image_size=args.size,
        seed=args.seed,
        defects=args.defects or list(demo_data.DEFECTS),
    )
    summary["root"] = storage.redact(summary["root"])
    print(json.dumps(summary, indent=2))
    return Exit.DONE
