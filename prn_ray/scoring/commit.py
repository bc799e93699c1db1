"""Committing a scoring run: staged files become a partition in one step, and what a dead
run left behind is cleaned up.

Per partition: (1) copy the run's staged files into the partition under new names, (2) write
``_SUCCESS`` listing exactly those files (one PUT on S3, a rename locally: the commit point),
(3) delete every other file of the partition (the previous run's, strays of killed runs).
Readers (:func:`prn_ray.scoring.table.read_scores`) read only the files a ``_SUCCESS`` lists.
"""

from __future__ import annotations

import json
import posixpath
import secrets
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from prn_ray import storage
from prn_ray.config import StorageConfig
from prn_ray.contracts import id_time
from prn_ray.scoring.table import (
    MARKER,
    MARKER_FORMAT,
    PIDX,
    SCORE_SCHEMA,
    ScoringError,
    committed_partitions,
    partition_uri,
    read_partition,
)

STALE_STAGING_S = 24 * 3600  # staging of a run older than this is a dead run's: removed


def _write_table(table: pa.Table, uri: str, cfg: StorageConfig | None) -> None:
    loc = storage.resolve(uri, cfg, sdk_retries=False)

    def once() -> None:
        if loc.scheme == "file":
            loc.fs.create_dir(posixpath.dirname(loc.path), recursive=True)
        pq.write_table(table.cast(SCORE_SCHEMA), loc.path, filesystem=loc.fs)
    storage.call(once, cfg)


def _file_rows(uri: str, cfg: StorageConfig | None) -> int:
    loc = storage.resolve(uri, cfg, sdk_retries=False)
    return storage.call(
        lambda: pq.ParquetFile(loc.path, filesystem=loc.fs).metadata.num_rows, cfg)


def commit_partition(output_uri: str, cfg: StorageConfig | None, *, date: str, product: str,
                     staged: list[str], run_id: str, carry: pa.Table | None = None,
                     extra: dict[str, Any] | None = None,
                     before_marker: Callable[[], None] | None = None) -> dict[str, Any]:
    """Replace one partition with the run's staged files (protocol in the module doc).
    ``before_marker`` runs just before the commit point (the run's lease check: a run that
    lost its lease must not commit). Returns the marker written."""
    pdir = partition_uri(output_uri, date, product)
    before = {u.rsplit("/", 1)[1] for u in storage.list_files(pdir, cfg, recursive=False)}
    files = []
    names = [f"part-{run_id}-{k:05d}.parquet" for k in range(len(staged))] + \
        [f"part-{run_id}-carry.parquet"]
    if before & set(names):  # a re-used run id: never overwrite a file a marker may list
        tag = secrets.token_hex(3)
        names = [n.replace(f"part-{run_id}-", f"part-{run_id}-{tag}-") for n in names]
    for src, name in zip(staged, names):
        storage.copy_file(src, storage.join(pdir, name), cfg)
        files.append({"name": name, "rows": _file_rows(src, cfg)})
    if carry is not None and carry.num_rows:
        name = names[-1]
        _write_table(carry, storage.join(pdir, name), cfg)
        files.append({"name": name, "rows": carry.num_rows})
    marker = {
        "format": MARKER_FORMAT, "run_id": run_id, "date": date, "product": product,
        "rows": sum(f["rows"] for f in files), "files": files,
        "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    if before_marker is not None:
        before_marker()
    storage.write_text(storage.join(pdir, MARKER), json.dumps(marker, indent=1) + "\n", cfg)
    keep = {f["name"] for f in files} | {MARKER}
    for name in sorted(before - keep):
        storage.delete_file(storage.join(pdir, name), cfg)
    return marker


def staged_by_product(staging_uri: str, cfg: StorageConfig | None,
                       names: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    prefix = storage.resolve(staging_uri, cfg).path
    for uri in storage.list_files(staging_uri, cfg, recursive=True, extensions=(".parquet",)):
        rel = storage.resolve(uri, cfg).path[len(prefix):].strip("/")
        head = rel.split("/", 1)[0]
        if not head.startswith(PIDX + "="):
            raise ScoringError(f"unexpected staged file {storage.redact(uri)}")
        out.setdefault(names[int(head.split("=", 1)[1])], []).append(uri)
    return {k: sorted(v) for k, v in out.items()}


def staged_stats(files: list[str], cfg: StorageConfig | None) -> pd.DataFrame:
    cols = ["product", "image_uri", "score", "is_anomaly", "error"]
    tables = []
    for uri in files:
        loc = storage.resolve(uri, cfg, sdk_retries=False)
        tables.append(storage.call(
            lambda loc=loc: pq.read_table(loc.path, filesystem=loc.fs, columns=cols), cfg))
    if not tables:
        return pd.DataFrame(columns=cols)
    return pa.concat_tables(tables).to_pandas()


def clean_stale_staging(output_uri: str, cfg: StorageConfig | None, date: str,
                        older_than_s: float = STALE_STAGING_S,
                        now: datetime | None = None) -> list[str]:
    """Delete ``_staging/<date>/<run_id>`` folders of runs started more than ``older_than_s``
    ago (runs that died: a live run commits long before). Returns the run ids removed."""
    now = now or datetime.now(timezone.utc)
    base = storage.join(output_uri, "_staging", date)
    removed = []
    for run_id in storage.list_dirs(base, cfg):
        started = id_time(run_id)
        if started is not None and (now - started).total_seconds() > older_than_s:
            storage.delete_dir(storage.join(base, run_id), cfg)
            removed.append(run_id)
    return removed


def versions(table: pa.Table | None) -> set[str]:
    if table is None or not table.num_rows:
        return set()
    return {v for v in table.column("model_version").to_pylist() if v}


def carry_over(out_uri: str, cfg: StorageConfig | None, date: str, product: str,
                rescored: set[str]) -> pa.Table | None:
    """Incremental: rows of the partition's current commit whose image is not re-scored now."""
    parts = committed_partitions(out_uri, cfg, date, [product])
    if not parts:
        return None
    table = read_partition(parts[0], cfg, None).drop_columns(["date"])
    keep = ~np.isin(np.asarray(table.column("image_uri").to_pylist(), dtype=object),
                    np.asarray(sorted(rescored), dtype=object))
    return table.filter(pa.array(keep))
