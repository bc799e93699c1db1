"""Write a sample manifest (Parquet or CSV, by the --out extension) for a dataset layout.

    # class folders holding images and same-name masks (e.g. Magnetic-Tile-Defect)
    python jobs/make_manifest.py paired-mask --root ../shared/data/magnetic_tile \\
        --product magnetic_tile --normal MT_Free --test-normal-fraction 0.2101 \\
        --test-normal-order last --out runs/mt/magnetic_tile.parquet
    # VisA's layout and its official one-class split (one product per object)
    python jobs/make_manifest.py visa --root ../shared/data/visa_macaroni1 \\
        --out runs/visa/macaroni1.parquet
    # freeze the listing of an MVTec-style tree (splits as in the tree)
    python jobs/make_manifest.py mvtec --root s3://bucket/mvtec --out s3://bucket/mvtec.parquet \\
        --endpoint-url http://minio:9000
    # ELPV solar cells (pip install elpv-dataset): defect probability 0 / 1, cell type = product
    python jobs/make_manifest.py elpv --out runs/elpv/elpv.parquet
    (or: prn-ray make-manifest ...)

Use the manifest with ``--set data.manifest=<out>``; the seen/validation split is applied when
the catalog is built. --endpoint-url may come before or after the layout.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from prn_ray.cli import EXIT_CODES, Exit, JobParser, names

if TYPE_CHECKING:
    import pandas as pd

    from prn_ray.config import StorageConfig


def _add_paired_mask(sub: argparse._SubParsersAction, shared: argparse.ArgumentParser) -> None:
    pm = sub.add_parser("paired-mask", parents=[shared],
                        help="<root>/<class>/[subdir/]<id>.<ext> + <id>.<mask ext>")
    pm.add_argument("--root", required=True)
    pm.add_argument("--product", required=True)
    pm.add_argument("--normal", action="append", type=names, required=True,
                    help="class folder(s) of normal images (repeat or comma-separate)")
    pm.add_argument("--image-ext", type=names, default=[".jpg"], help="default .jpg")
    pm.add_argument("--mask-ext", default=".png", help="default .png")
    pm.add_argument("--mask-suffix", default="", help="mask name = <id><suffix><mask ext>")
    pm.add_argument("--subdir", default=None, help="folder inside each class folder (e.g. Imgs)")
    pm.add_argument("--test-normal-fraction", type=float, default=0.2)
    pm.add_argument("--test-normal-order", choices=("random", "last"), default="random",
                    help="which normals go to test: a seeded random share, or the last ones "
                         "in name order")
    pm.add_argument("--split-seed", type=int, default=42)
    pm.add_argument("--out", required=True, help="manifest URI ending in .parquet or .csv")
    pm.add_argument("--relative", action="store_true",
                    help="store URIs under the manifest's folder relative to it")


def _add_mvtec(sub: argparse._SubParsersAction, shared: argparse.ArgumentParser) -> None:
    mv = sub.add_parser("mvtec", parents=[shared],
                        help="<root>/<product>/{train,test,ground_truth}/...")
    mv.add_argument("--root", required=True)
    mv.add_argument("--out", required=True)
    mv.add_argument("--relative", action="store_true")


def _add_visa(sub: argparse._SubParsersAction, shared: argparse.ArgumentParser) -> None:
    vs = sub.add_parser("visa", parents=[shared],
                        help="VisA: <root>/split_csv/1cls.csv + <root>/<object>/Data/...")
    vs.add_argument("--root", required=True, help="the folder holding split_csv/ and the objects")
    vs.add_argument("--split-csv", default=None,
                    help="default <root>/split_csv/1cls.csv (VisA's one-class split)")
    vs.add_argument("--objects", type=names, default=None,
                    help="only these objects (comma-separated; default all)")
    vs.add_argument("--out", required=True)
    vs.add_argument("--relative", action="store_true")


def _add_elpv(sub: argparse._SubParsersAction, shared: argparse.ArgumentParser) -> None:
    ev = sub.add_parser("elpv", parents=[shared],
                        help="ELPV solar cells: labels.csv (path, defect probability, type)")
    ev.add_argument("--labels", default=None,
                    help="ELPV's labels.csv (default: the one of the installed elpv-dataset "
                         "package: pip install elpv-dataset)")
    ev.add_argument("--test-normal-fraction", type=float, default=0.3)
    ev.add_argument("--split-seed", type=int, default=42)
    ev.add_argument("--out", required=True)
    ev.add_argument("--relative", action="store_true")


def _parser(prog: str | None) -> JobParser:
    p = JobParser(prog=prog, description=__doc__, epilog=EXIT_CODES,
                  formatter_class=argparse.RawTextHelpFormatter)
    endpoint_help = "S3-compatible endpoint (else AWS env)"
    p.add_argument("--endpoint-url", default=None, help=endpoint_help)
    # The same flag after the layout; SUPPRESS keeps a value given before it.
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--endpoint-url", default=argparse.SUPPRESS, help=endpoint_help)
    sub = p.add_subparsers(dest="layout", required=True)
    _add_paired_mask(sub, shared)
    _add_mvtec(sub, shared)
    _add_visa(sub, shared)
    _add_elpv(sub, shared)
    return p


def _check_args(p: JobParser, args: argparse.Namespace) -> None:
    """Range checks argparse cannot do, and ELPV's default labels file (exits on a problem)."""
    if args.layout == "paired-mask" and not 0 <= args.test_normal_fraction < 1:
        p.error(f"--test-normal-fraction must be >= 0 and < 1, got {args.test_normal_fraction}")
    if args.layout == "elpv" and not 0 < args.test_normal_fraction < 1:
        p.error(f"--test-normal-fraction must be > 0 and < 1, got {args.test_normal_fraction}")
    if args.layout == "elpv" and args.labels is None:
        import importlib.util
        import os

        spec = importlib.util.find_spec("elpv_dataset")
        if spec is None or not spec.origin:
            p.error("no --labels and the elpv-dataset package is not installed "
                    "(pip install elpv-dataset)")
        args.labels = os.path.join(os.path.dirname(spec.origin), "data", "labels.csv")


def _paired_mask_table(args: argparse.Namespace, scfg: StorageConfig) -> pd.DataFrame:
    """The paired-mask layout's sample table; warns about masks without an image."""
    from prn_ray import storage
    from prn_ray.data import manifest

    df = manifest.paired_mask_manifest(
        args.root,
        scfg,
        product=args.product,
        normal_dirs=[n for group in args.normal for n in group],
        image_ext=args.image_ext,
        mask_ext=args.mask_ext,
        mask_suffix=args.mask_suffix,
        subdir=args.subdir,
        test_normal_fraction=args.test_normal_fraction,
        test_normal_order=args.test_normal_order,
        split_seed=args.split_seed,
    )
    unpaired = df.attrs.get("unpaired_masks", [])
    if unpaired:
        print(f"warning: {len(unpaired)} mask(s) without an image, e.g. "
              f"{storage.redact(unpaired[0])}", file=sys.stderr)
    return df


def _layout_table(args: argparse.Namespace, scfg: StorageConfig) -> pd.DataFrame:
    """The sample table of ``args.layout``."""
    from prn_ray.data import manifest
    from prn_ray.data.catalog import scan_mvtec

    if args.layout == "paired-mask":
        return _paired_mask_table(args, scfg)
    if args.layout == "visa":
        return manifest.visa_manifest(args.root, scfg, split_csv=args.split_csv,
                                      objects=args.objects)
    if args.layout == "elpv":
        df = manifest.elpv_manifest(args.labels, scfg,
                                    test_normal_fraction=args.test_normal_fraction,
                                    split_seed=args.split_seed)
        print(f"left out {df.attrs['left_out']} cells of uncertain label (probability 1/3, 2/3)")
        return df
    return scan_mvtec(args.root, scfg)


def _print_summary(df: pd.DataFrame, out: str) -> None:
    from prn_ray import storage

    counts = df.groupby(["product", "split", "label", "defect_type"]).size()
    print(counts.to_string())
    no_mask = int(((df["label"] == "anomaly") & (df["mask_uri"] == "")).sum())
    print(f"{len(df)} images ({no_mask} anomalies without a mask) -> {storage.redact(out)}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = _parser(prog)
    args = p.parse_args(argv)
    _check_args(p, args)

    from prn_ray.config import StorageConfig
    from prn_ray.data import manifest

    scfg = StorageConfig(endpoint_url=args.endpoint_url)
    df = _layout_table(args, scfg)
    manifest.write_manifest(df, args.out, scfg, relative=args.relative)
    _print_summary(df, args.out)
    return Exit.DONE
