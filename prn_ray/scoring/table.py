"""The scores contract (no Ray, no torch): the Parquet schema, how a row is built, anomaly maps
as 16-bit PNG, where partitions live and how committed partitions are read back.

Flow of :func:`prn_ray.scoring.run.score`::

    input prefix / manifest -> rows (product, image_uri)          driver: list, dedupe, skip
      -> models resolved ONCE on the driver (product -> version)  (LATEST or pinned)
      -> decode at each product's model size                      in the Scorer (CPU-only),
                                                                  Ray tasks (GPU cluster)
      -> Scorer actor pool (models cached per actor)              whole batch per forward;
                                                                  next batch read meanwhile
      -> staging Parquet (``<output>/_staging/<date>/<run_id>/``) Ray write_parquet
      -> verify row count -> commit each partition                driver: copy, _SUCCESS
      -> run summary (``<output>/_runs/<date>/<run_id>.json``)

Output layout (contract)::

    <output>/date=YYYY-MM-DD/product=<name>/part-<run_id>-00000.parquet ...
    <output>/date=YYYY-MM-DD/product=<name>/_SUCCESS      JSON: run id, versions, rows, files
    <output>/_runs/<date>/<run_id>.json                   run summary
    <output>/_staging/<date>/<run_id>/...                 in-flight files (removed on success;
                                                          a dead run's after STALE_STAGING_S)

Every file holds exactly :data:`SCORE_SCHEMA` (``product`` included, so a single partition
directory is self-describing); ``date`` exists only as the hive directory key. Paths starting
with ``_`` are ignored by pyarrow/pandas dataset discovery.

Commit protocol, per partition: (1) copy the run's staged files into the partition under new
names, (2) write ``_SUCCESS`` listing exactly those files (one PUT on S3, a rename locally: the
commit point), (3) delete every other file of the partition (the previous run's, strays of
killed runs). :func:`read_scores` reads only partitions that have a ``_SUCCESS`` and only the
files it lists, so it always sees one complete run per partition: the previous one until the
marker is replaced, the new one after. Nothing is committed unless the staged row count equals
the number of input images to score.

``anomaly_map_png`` is a 16-bit greyscale PNG at the image's own resolution, 65535 =
probability 1 (:func:`map_to_png` / :func:`png_to_map`).

One row per input image. Error rows: ``error`` = ``"<reason>: <message>"`` (reasons of
:mod:`prn_ray.images`, plus ``no_model``, ``scoring_failed`` and ``bad_product_name``: a
product name that may not become a path puts its rows, with ``product`` = ``_invalid``, in the
reserved partition ``product=_invalid``); ``score``,
``anomaly_map_png``, ``height``, ``width`` and ``is_anomaly`` are null (an unreadable image is
neither anomalous nor normal); ``threshold``/``model_version`` are set when the product had a
model (null for ``no_model``).
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date as _date
from datetime import datetime, timezone
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from prn_ray import images, storage
from prn_ray.config import StorageConfig
from prn_ray.contracts import product_name_problem

SCORE_SCHEMA = pa.schema([
    pa.field("product", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("is_anomaly", pa.bool_()),
    pa.field("threshold", pa.float32()),
    pa.field("anomaly_map_png", pa.binary()),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("model_version", pa.string()),
    pa.field("scored_at", pa.timestamp("us", tz="UTC")),
    pa.field("error", pa.string()),
])
COLUMNS = tuple(SCORE_SCHEMA.names)
PIDX = "_pidx"  # staging-only partition key (product index): never reaches the output files
STAGING_SCHEMA = SCORE_SCHEMA.append(pa.field(PIDX, pa.int32()))
MARKER = "_SUCCESS"
MARKER_FORMAT = "prn_ray.scores/1"
NO_MODEL = "no_model"
SCORING_FAILED = "scoring_failed"
BAD_PRODUCT_NAME = "bad_product_name"
# Rows whose product name cannot be a path (prn_ray.contracts.PRODUCT_NAME) are committed under
# this reserved name (never a valid product name: it starts with '_'), product column included,
# so read_scores still returns one row per input image; the rejected name is in the error.
INVALID_PRODUCT = "_invalid"
STALE_STAGING_S = 24 * 3600  # staging of a run older than this is a dead run's: removed
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_PANDAS_TYPES = {pa.int32(): pd.Int32Dtype(), pa.bool_(): pd.BooleanDtype()}




class ScoringError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- layout


def today_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def check_date(value: str) -> str:
    if not isinstance(value, str) or not _DATE_RE.match(value):
        raise ValueError(f"date must be YYYY-MM-DD, got {value!r}")
    _date.fromisoformat(value)  # raises on 2024-02-30
    return value


def partition_uri(output_uri: str, date: str, product: str) -> str:
    """``<output>/date=D/product=P`` (the product percent-encoded, as pyarrow's hive reader
    decodes it). A product name that is not allowed never becomes a path: ValueError."""
    problem = None if product == INVALID_PRODUCT else product_name_problem(product)
    if problem:
        raise ValueError(problem)
    return storage.join(output_uri, f"date={date}",
                        f"product={urllib.parse.quote(product, safe='')}")


# ----------------------------------------------------------------------------- rows


def _resize_map(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """S x S probabilities -> height x width (the whole image: the map covers it, no crop)."""
    if prob.shape == (height, width):
        return prob
    shrink = height < prob.shape[0] and width < prob.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(prob, (int(width), int(height)), interpolation=interp)


MAP_PNG_MAX = 65535  # anomaly_map_png: 16-bit greyscale, 65535 = probability 1


def map_to_png(prob: np.ndarray, height: int, width: int) -> bytes:
    """Probability map -> 16-bit greyscale PNG at the image's own size (65535 = probability 1).

    16 bits, not 8: with 8 every probability below 0.002 became 0 and the step was 0.004, and
    the ties distorted pixel AUROC / AP computed from the stored maps."""
    full = _resize_map(np.asarray(prob, np.float32), height, width)
    return images.encode_png(np.rint(np.clip(full, 0.0, 1.0) * MAP_PNG_MAX).astype(np.uint16),
                             fast=True)


def png_to_map(data: bytes) -> np.ndarray:
    """``anomaly_map_png`` bytes -> H×W float32 probabilities (16-bit maps; 8-bit maps written
    by earlier versions are read too, 255 = probability 1)."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 2:
        raise ValueError("anomaly_map_png is not a single-channel PNG")
    scale = MAP_PNG_MAX if arr.dtype == np.uint16 else 255
    return arr.astype(np.float32) / scale


def score_table(products: Sequence[str], uris: Sequence[str], errors: Sequence[str | None],
                models: Mapping[str, Any], pidx: Mapping[str, int], now: datetime, *,
                scores: np.ndarray | None = None, maps: Sequence[bytes | None] | None = None,
                heights: Sequence[int | None] | None = None,
                widths: Sequence[int | None] | None = None) -> pa.Table:
    """The one way a batch of rows is built (staging schema: the contract plus ``_pidx``).

    ``models[product]`` has ``version`` and ``threshold`` (None when the product has no
    model). A row is *scored* when its error is None and its score finite; every other row is
    an error row: no score, map, size or decision (an unreadable image is neither anomalous
    nor normal), but the model version and threshold when the product had a model.
    """
    n = len(uris)
    res = [models.get(p) for p in products]
    score = (np.asarray(scores, np.float32) if scores is not None
             else np.full(n, np.nan, np.float32))
    scored = np.array([e is None for e in errors], bool) & np.isfinite(score)
    thr = np.array([r.threshold if r is not None and r.version and r.threshold is not None
                    else np.nan for r in res], np.float32)
    maps = list(maps) if maps is not None else [None] * n
    heights = list(heights) if heights is not None else [None] * n
    widths = list(widths) if widths is not None else [None] * n
    keep = scored.tolist()
    return pa.table({
        "product": pa.array(list(products), pa.string()),
        "image_uri": pa.array(list(uris), pa.string()),
        "score": pa.array(score, pa.float32(), mask=~scored),
        "is_anomaly": pa.array(score > thr, pa.bool_(), mask=~scored),
        "threshold": pa.array(thr, pa.float32(), mask=~np.isfinite(thr)),
        "anomaly_map_png": pa.array([m if k else None for m, k in zip(maps, keep)], pa.binary()),
        "height": pa.array([h if k else None for h, k in zip(heights, keep)], pa.int32()),
        "width": pa.array([w if k else None for w, k in zip(widths, keep)], pa.int32()),
        "model_version": pa.array([r.version if r is not None else None for r in res],
                                  pa.string()),
        "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        "error": pa.array(list(errors), pa.string()),
        PIDX: pa.array([pidx[p] for p in products], pa.int32()),
    }, schema=STAGING_SCHEMA)


def error_reason(error: Any) -> str | None:
    if error is None or (isinstance(error, float) and math.isnan(error)) or error == "":
        return None
    return str(error).split(":", 1)[0].strip()


# ----------------------------------------------------------------------------- reading


@dataclass
class Partition:
    date: str
    product: str
    uri: str
    marker: dict[str, Any]

    @property
    def files(self) -> list[str]:
        return [storage.join(self.uri, f["name"]) for f in self.marker.get("files", [])]


def read_marker(uri: str, cfg: StorageConfig | None) -> dict[str, Any] | None:
    try:
        doc = json.loads(storage.read_text(storage.join(uri, MARKER), cfg))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable or half-written marker: not a complete partition
    return doc if isinstance(doc, dict) and isinstance(doc.get("files"), list) else None


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def committed_partitions(output_uri: str, storage_cfg: StorageConfig | None = None,
                         date: str | Iterable[str] | None = None,
                         products: str | Iterable[str] | None = None) -> list[Partition]:
    """Complete partitions (those with a readable ``_SUCCESS``), sorted by (date, product)."""
    dates = _as_list(date)
    if dates is None:
        dates = [d[len("date="):] for d in storage.list_dirs(output_uri, storage_cfg)
                 if d.startswith("date=")]
    wanted = set(_as_list(products)) if products is not None else None
    out = []
    for d in sorted(dates):
        base = storage.join(output_uri, f"date={d}")
        for name in storage.list_dirs(base, storage_cfg):
            if not name.startswith("product="):
                continue
            product = urllib.parse.unquote(name[len("product="):])
            if wanted is not None and product not in wanted:
                continue
            uri = storage.join(base, name)
            marker = read_marker(uri, storage_cfg)
            if marker is not None:
                out.append(Partition(d, product, uri, marker))
    return out


def read_partition(part: Partition, cfg: StorageConfig | None, columns: list[str] | None
                    ) -> pa.Table:
    tables = []
    for uri in part.files:
        loc = storage.resolve(uri, cfg, sdk_retries=False)
        tables.append(storage.call(lambda loc=loc: pq.read_table(
            loc.path, filesystem=loc.fs, columns=columns, schema=SCORE_SCHEMA), cfg))
    schema = pa.schema([SCORE_SCHEMA.field(c) for c in (columns or COLUMNS)])
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return table.append_column("date", pa.array([part.date] * table.num_rows, pa.string()))


def read_scores(output_uri: str, storage_cfg: StorageConfig | None = None,
                date: str | Iterable[str] | None = None,
                products: str | Iterable[str] | None = None,
                columns: Iterable[str] | None = None) -> pd.DataFrame:
    """Committed scores as a DataFrame: the contract columns plus ``date`` (string).

    Only partitions with a ``_SUCCESS`` marker are read, and only the files that marker lists
    (files of a run that died, or of a commit in progress, are never returned). ``columns``
    selects a subset (e.g. leave out ``anomaly_map_png`` for a fast summary).
    """
    cols = list(columns) if columns is not None else None
    if cols is not None:
        unknown = sorted(set(cols) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; columns are {list(COLUMNS)}")
    tables = []
    for part in committed_partitions(output_uri, storage_cfg, date, products):
        for attempt in range(3):
            try:
                tables.append(read_partition(part, storage_cfg, cols))
                break
            except FileNotFoundError:
                # A commit replaced the partition between reading its marker and its files.
                marker = read_marker(part.uri, storage_cfg)
                if marker is None or attempt == 2:
                    if marker is None:
                        break  # being rewritten right now: not complete, not returned
                    raise
                part = Partition(part.date, part.product, part.uri, marker)
    schema = pa.schema([SCORE_SCHEMA.field(c) for c in (cols or COLUMNS)]).append(
        pa.field("date", pa.string()))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    # Nullable integer/boolean dtypes: error rows keep height/width/is_anomaly as <NA>
    # instead of turning the columns into float64/object.
    return table.to_pandas(types_mapper=_PANDAS_TYPES.get)
