"""What a scoring run reads: the images under an input prefix, or a manifest's rows."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from prn_ray import storage
from prn_ray.config import StorageConfig
from prn_ray.contracts import IMAGE_EXTENSIONS, product_name_problem
from prn_ray.data.manifest import TABLE_EXTENSIONS, ManifestError, read_table
from prn_ray.scoring.table import BAD_PRODUCT_NAME, INVALID_PRODUCT, ScoringError


def list_inputs(input_uri: str, storage_cfg: StorageConfig | None = None,
                products: Iterable[str] | None = None) -> pd.DataFrame:
    """The images to score as a frame ``(product, image_uri)``, sorted and de-duplicated.

    ``input_uri`` is a prefix (``<input>/<product>/.../<file>`` with an image extension; files
    directly under the prefix, other extensions and ``_``/``.``-prefixed paths are ignored) or a
    manifest (``.parquet``/``.pq``/``.csv`` with columns ``product, image_uri``; relative URIs are
    resolved against the manifest's directory). ``df.attrs`` carries what was ignored.

    A product name that may not become a path (``..``, ``a/b``, empty, control characters:
    :func:`prn_ray.contracts.product_name_problem`) is never used as one: its rows get product
    ``_invalid`` and an ``error`` (``bad_product_name: ...``, the name escaped); the ``error``
    column is None for every other row.
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
        df = pd.DataFrame(rows, columns=["product", "image_uri"], dtype=object)
    wanted = list(products) if products else None
    if wanted is not None:
        df = df[df["product"].isin(wanted)]
    problems = {p: product_name_problem(p) for p in df["product"].unique()}
    df = df.assign(error=[f"{BAD_PRODUCT_NAME}: {storage.redact(problems[p])}" if problems[p]
                          else None for p in df["product"]])
    df.loc[df["error"].notna(), "product"] = INVALID_PRODUCT
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
    # An empty product is a bad product name (an error row); an empty image_uri is no input.
    bad = df[df["image_uri"].str.strip() == ""]
    if len(bad):
        raise ScoringError(f"manifest {storage.redact(uri)}: {len(bad)} row(s) with an empty "
                           f"image_uri (first: line {int(bad.index[0]) + 2})")
    return df
