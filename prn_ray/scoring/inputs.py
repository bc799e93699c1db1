"""What a scoring run reads: the images under an input prefix, or a manifest's rows."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from prn_ray import storage
from prn_ray.config import StorageConfig
from prn_ray.contracts import IMAGE_EXTENSIONS
from prn_ray.data.manifest import TABLE_EXTENSIONS, ManifestError, read_table
from prn_ray.scoring.table import ScoringError


def list_inputs(input_uri: str, storage_cfg: StorageConfig | None = None,
                products: Iterable[str] | None = None) -> pd.DataFrame:
    """The images to score as a frame ``(product, image_uri)``, sorted and de-duplicated.

    ``input_uri`` is a prefix (``<input>/<product>/.../<file>`` with an image extension; files
    directly under the prefix, other extensions and ``_``/``.``-prefixed paths are ignored) or a
    manifest (``.parquet``/``.pq``/``.csv`` with columns ``product, image_uri``; relative URIs are
    resolved against the manifest's directory). ``df.attrs`` carries what was ignored.
    """
    ignored: dict[str, int] = {}
    if input_uri.lower().endswith(TABLE_EXTENSIONS):
        df = _read_manifest(input_uri, storage_cfg)
    else:
        base = storage.resolve(input_uri, storage_cfg)
        rows = []
        n_other = n_loose = 0
        for uri in storage.list_files(input_uri, storage_cfg, recursive=True):
            rel = storage.resolve(uri, storage_cfg).path[len(base.path):].strip("/")
            parts = rel.split("/")
            if any(p.startswith(("_", ".")) for p in parts):
                continue
            if not rel.lower().endswith(IMAGE_EXTENSIONS):
                n_other += 1
                continue
            if len(parts) < 2:
                n_loose += 1
                continue
            rows.append((parts[0], uri))
        if n_other:
            ignored["not an image extension"] = n_other
        if n_loose:
            ignored["not under a product folder"] = n_loose
        df = pd.DataFrame(rows, columns=["product", "image_uri"])
    wanted = list(products) if products else None
    if wanted is not None:
        df = df[df["product"].isin(wanted)]
    n = len(df)
    df = df.drop_duplicates(["product", "image_uri"])
    if len(df) < n:
        ignored["duplicate (product, image_uri)"] = n - len(df)
    df = df.sort_values(["product", "image_uri"]).reset_index(drop=True)
    df.attrs["ignored"] = ignored
    return df


def _read_manifest(uri: str, storage_cfg: StorageConfig | None) -> pd.DataFrame:
    try:
        df = read_table(uri, storage_cfg, required=("product", "image_uri"))
    except ManifestError as exc:
        raise ScoringError(f"{exc} (a scoring manifest needs product, image_uri)") from None
    df = df[["product", "image_uri"]].astype(str)
    bad = df[(df["product"].str.strip() == "") | (df["image_uri"].str.strip() == "")]
    if len(bad):
        raise ScoringError(f"manifest {storage.redact(uri)}: {len(bad)} row(s) with an empty "
                           f"product or image_uri (first: line {int(bad.index[0]) + 2})")
    return df
