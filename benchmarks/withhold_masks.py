"""A reject-bin copy of a dataset: the same split, the seen defects' masks withheld.

Builds the catalog exactly as training would (``data.seen_anomalies`` carved by the split
rule, validation carved from training data) and writes it as a manifest with every split
fixed, the ``seen`` and ``val`` anomalies' ``mask_uri`` emptied: those defects are then known
by their image label only, and training falls back to the multiple-instance loss for them
(``prn_ray.model.loss``). The test split keeps its masks, so the two runs are evaluated on the
same images and truth.

    python benchmarks/withhold_masks.py --config configs/magnetic_tile.yaml \\
        --out runs/mt/magnetic_tile_image_labels.parquet
    python jobs/train_all.py --config configs/magnetic_tile.yaml \\
        --set data.manifest=runs/mt/magnetic_tile_image_labels.parquet ...
"""

from __future__ import annotations

import argparse
import sys

from prn_ray.config import load_config
from prn_ray.data.catalog import build_catalog, seen_defect_counts
from prn_ray.data.manifest import write_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", required=True, help="manifest to write (.parquet or .csv)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    df = build_catalog(cfg).df.copy()
    withheld = (df["label"] == "anomaly") & df["split"].isin(["seen", "val"])
    df.loc[withheld, "mask_uri"] = ""
    write_manifest(df, args.out)
    for product, (masked, unmasked) in seen_defect_counts(df).items():
        print(f"{product}: {unmasked} seen anomalies with image labels only, {masked} with "
              f"masks; test split unchanged ({int((df['split'] == 'test').sum())} images)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
