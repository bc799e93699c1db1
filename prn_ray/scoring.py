"""Nightly batch scoring: new images -> score, decision and anomaly map -> partitioned Parquet.

Flow of :func:`score` (DESIGN §1, §3)::

    input prefix / manifest -> rows (product, image_uri)          driver: list, dedupe, skip
      -> models resolved ONCE on the driver (product -> version)  (LATEST or pinned)
      -> per product: decode at the model's image size            stateless Ray tasks
      -> union -> Scorer actor pool (models cached per actor)     whole batch per forward
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

One row per input image. Error rows: ``error`` = ``"<reason>: <message>"`` (reasons of
:mod:`prn_ray.images`, plus ``no_model`` and ``scoring_failed``); ``score``,
``anomaly_map_png``, ``height``, ``width`` and ``is_anomaly`` are null (an unreadable image is
neither anomalous nor normal); ``threshold``/``model_version`` are set when the product had a
model (null for ``no_model``).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import secrets
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import date as _date
from datetime import datetime, timezone
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from prn_ray import images, storage
from prn_ray.config import Config, StorageConfig

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
PARTITION_KEYS = ("date", "product")
_PIDX = "_pidx"  # staging-only partition key (product index): never reaches the output files
_STAGING_SCHEMA = SCORE_SCHEMA.append(pa.field(_PIDX, pa.int32()))
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm",
                    ".ppm", ".pnm", ".jp2")
MANIFEST_EXTENSIONS = (".parquet", ".pq", ".csv")
MARKER = "_SUCCESS"
MARKER_FORMAT = "prn_ray.scores/1"
NO_MODEL = "no_model"
SCORING_FAILED = "scoring_failed"
COMMIT_DELAY_ENV = "PRN_SCORE_COMMIT_DELAY_S"
STALE_STAGING_S = 24 * 3600  # staging of a run older than this is a dead run's: removed
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_STAGING_MIN_FILE_BYTES = 32 * 1024 * 1024  # coalesce small blocks into fewer output files
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
    decodes it)."""
    return storage.join(output_uri, f"date={date}",
                        f"product={urllib.parse.quote(product, safe='')}")


def new_run_id() -> str:
    return time.strftime("score-%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


# ----------------------------------------------------------------------------- inputs


def list_inputs(input_uri: str, storage_cfg: StorageConfig | None = None,
                products: Iterable[str] | None = None) -> pd.DataFrame:
    """The images to score as a frame ``(product, image_uri)``, sorted and de-duplicated.

    ``input_uri`` is a prefix (``<input>/<product>/.../<file>`` with an image extension; files
    directly under the prefix, other extensions and ``_``/``.``-prefixed paths are ignored) or a
    manifest (``.parquet``/``.pq``/``.csv`` with columns ``product, image_uri``; relative URIs are
    resolved against the manifest's directory). ``df.attrs`` carries what was ignored.
    """
    ignored: dict[str, int] = {}
    if input_uri.lower().endswith(MANIFEST_EXTENSIONS):
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
    from prn_ray.catalog import _resolve_relative

    try:
        data = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:
        raise ScoringError(f"manifest {storage.redact(uri)} does not exist") from None
    if uri.lower().endswith(".csv"):
        import io

        df = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    else:
        df = pq.read_table(pa.BufferReader(data)).to_pandas()
    missing = [c for c in ("product", "image_uri") if c not in df.columns]
    if missing:
        raise ScoringError(f"manifest {storage.redact(uri)}: missing column(s) {missing}; "
                           "a scoring manifest needs product, image_uri")
    df = df[["product", "image_uri"]].astype(str)
    bad = df[(df["product"].str.strip() == "") | (df["image_uri"].str.strip() == "")]
    if len(bad):
        raise ScoringError(f"manifest {storage.redact(uri)}: {len(bad)} row(s) with an empty "
                           f"product or image_uri (first: line {int(bad.index[0]) + 2})")
    loc = storage.resolve(uri, storage_cfg)
    base_dir = loc.uri(posixpath.dirname(loc.path))
    df["image_uri"] = [_resolve_relative(u, base_dir) for u in df["image_uri"]]
    return df


# ----------------------------------------------------------------------------- models


@dataclass
class ResolvedModel:
    """What the driver decided for one product; shipped to every actor (plain, picklable)."""

    product: str
    version: str | None = None  # None: no usable model (see error)
    threshold: float | None = None  # the threshold applied (override, else calibrated)
    calibrated_threshold: float | None = None
    image_size: int | None = None
    error: str | None = None  # "no_model: <registry message>"


def pinned_versions(spec: str | None) -> tuple[str | None, dict[str, str]]:
    """``score.model_version``: ``"v1"`` pins every product to v1; ``"a=v1,b=v2"`` pins per
    product (others use LATEST). Returns (global pin, per-product pins)."""
    if not spec or not spec.strip():
        return None, {}
    if "=" not in spec:
        return spec.strip(), {}
    pins = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"score.model_version: mix of 'product=version' and {item!r}")
        product, version = item.split("=", 1)
        pins[product.strip()] = version.strip()
    return None, pins


def describe_model(storage_cfg: StorageConfig, product: str, version: str | None = None
                   ) -> tuple[str, int, float]:
    """(version, image_size, calibrated threshold) of a registered model without reading its
    weights (the actors read those). Raises :class:`~prn_ray.registry.RegistryError` with the
    registry's own message when the product has no (complete) model."""
    from prn_ray import registry

    version = version or registry.latest_version(storage_cfg, product)
    root = storage.join(storage_cfg.models_uri, product, version) if version else None
    if root is None or not all(storage.exists(storage.join(root, f), storage_cfg)
                               for f in registry.REQUIRED_FILES):
        mv = registry.load(storage_cfg, product, version)  # raises, with the registry's reason
        return mv.version, mv.image_size, mv.threshold
    config_doc = json.loads(storage.read_text(storage.join(root, "config.json"), storage_cfg))
    calibration = json.loads(storage.read_text(storage.join(root, "calibration.json"),
                                               storage_cfg))
    return version, int(config_doc["image_size"]), float(calibration["threshold"])


def resolve_models(cfg: Config, products: Iterable[str]) -> dict[str, ResolvedModel]:
    """Product -> version, read once here so every row of a run uses the same version even if
    ``LATEST`` moves while the run is going. Only metadata is read (no weights)."""
    from prn_ray import registry

    everywhere, pins = pinned_versions(cfg.score.model_version)
    out = {}
    for product in products:
        try:
            version, size, calibrated = describe_model(cfg.storage, product,
                                                       pins.get(product, everywhere))
        except Exception as exc:  # noqa: BLE001 - RegistryError, or unreadable files
            msg = str(exc) if isinstance(exc, registry.RegistryError) else \
                f"{type(exc).__name__}: {exc}"
            out[product] = ResolvedModel(product, error=storage.redact(f"{NO_MODEL}: {msg}"))
            continue
        threshold = cfg.score.threshold if cfg.score.threshold is not None else calibrated
        out[product] = ResolvedModel(product, version, float(threshold), calibrated, size)
    return out


# ----------------------------------------------------------------------------- actor


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
    return images.encode_png(np.rint(np.clip(full, 0.0, 1.0) * MAP_PNG_MAX).astype(np.uint16))


def png_to_map(data: bytes) -> np.ndarray:
    """``anomaly_map_png`` bytes -> H×W float32 probabilities (16-bit maps; 8-bit maps written
    by earlier versions are read too, 255 = probability 1)."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 2:
        raise ValueError("anomaly_map_png is not a single-channel PNG")
    scale = MAP_PNG_MAX if arr.dtype == np.uint16 else 255
    return arr.astype(np.float32) / scale


def _error_table(products, uris, errors, models: dict[str, ResolvedModel],
                 pidx: dict[str, int], now: datetime) -> pa.Table:
    n = len(uris)
    res = [models.get(p) for p in products]
    return pa.table({
        "product": pa.array(list(products), pa.string()),
        "image_uri": pa.array(list(uris), pa.string()),
        "score": pa.nulls(n, pa.float32()),
        "is_anomaly": pa.nulls(n, pa.bool_()),
        "threshold": pa.array([r.threshold if r and r.version else None for r in res],
                              pa.float32()),
        "anomaly_map_png": pa.nulls(n, pa.binary()),
        "height": pa.nulls(n, pa.int32()),
        "width": pa.nulls(n, pa.int32()),
        "model_version": pa.array([r.version if r else None for r in res], pa.string()),
        "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        "error": pa.array(list(errors), pa.string()),
        _PIDX: pa.array([pidx[p] for p in products], pa.int32()),
    }, schema=_STAGING_SCHEMA)


def no_model_rows(batch: pd.DataFrame, *, models: dict[str, ResolvedModel],
                  pidx: dict[str, int]) -> pa.Table:
    """Ray Data UDF for products without a model: error rows, nothing is read or decoded."""
    products = batch["product"].astype(str).tolist()
    errors = [models[p].error if p in models and models[p].error else
              f"{NO_MODEL}: product {p!r} has no resolved model" for p in products]
    return _error_table(products, batch["image_uri"].astype(str).tolist(), errors, models, pidx,
                        datetime.now(timezone.utc))


class Scorer:
    """Ray Data actor: PRN models loaded once per actor (cached per (product, version)), each
    product's rows of a batch run through its model in one forward pass.

    Input rows come from :func:`prn_ray.images.decode_batch` (``image`` at the product's model
    size, ``orig_height``/``orig_width``, ``error``); a batch may mix products (and therefore
    image sizes). Output: a pyarrow table in the staging schema (contract + ``_pidx``).
    """

    def __init__(self, models: dict[str, ResolvedModel], storage_cfg: StorageConfig,
                 pidx: dict[str, int], threads: int = 1, use_gpu: bool = False):
        import torch

        from prn_ray import registry

        self.registry = registry
        torch.set_num_threads(max(1, int(threads)))
        self.torch = torch
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.models = models
        self.storage_cfg = storage_cfg
        self.pidx = pidx
        self._cache: dict[tuple[str, str], Any] = {}  # (product, version) -> PRN | error str
        self.loads = 0  # models built by this actor (tests check "once per actor")

    def _model(self, product: str):
        res = self.models.get(product)
        if res is None or res.version is None:
            return None, (res.error if res is not None and res.error else
                          f"{NO_MODEL}: product {product!r} has no resolved model")
        key = (product, res.version)
        if key not in self._cache:
            try:
                prn = self.registry.load(self.storage_cfg, product,
                                          res.version).build(self.device)
                if self.device.type == "cpu":
                    prn = prn.to(memory_format=self.torch.channels_last)
                self._cache[key] = prn
                self.loads += 1
            except Exception as exc:  # noqa: BLE001 - becomes error rows, never a crash
                self._cache[key] = storage.redact(f"{NO_MODEL}: {type(exc).__name__}: {exc}")
        value = self._cache[key]
        return (None, value) if isinstance(value, str) else (value, None)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from prn_ray.pipeline import images_to_tensor

        torch = self.torch
        now = datetime.now(timezone.utc)
        products = np.asarray([str(p) for p in batch["product"]], dtype=object)
        n = len(products)
        uris = [str(u) for u in batch["image_uri"]]
        ok_decode = images.error_free(batch["error"])
        errors: list[str | None] = [None if ok_decode[i] else str(batch["error"][i])
                                    for i in range(n)]
        score = np.full(n, np.nan, np.float32)
        maps: list[bytes | None] = [None] * n
        heights: list[int | None] = [None] * n
        widths: list[int | None] = [None] * n
        oh, ow = batch["orig_height"], batch["orig_width"]
        for product in sorted(set(products)):
            idx = np.nonzero(products == product)[0]
            model, err = self._model(product)
            if err is not None:
                for i in idx:
                    errors[i] = err
                continue
            good = idx[ok_decode[idx]]
            if len(good) == 0:
                continue
            try:
                x = np.stack([np.asarray(batch["image"][i]) for i in good])
                with torch.inference_mode():
                    out = model(images_to_tensor(x, self.device))
                probs = out.anomaly_map[:, 0].float().cpu().numpy()
                scores = out.score.float().cpu().numpy()
                for j, i in enumerate(good):
                    if not np.isfinite(scores[j]):
                        errors[i] = f"{SCORING_FAILED}: the model returned a non-finite score"
                        continue
                    h, w = int(oh[i]), int(ow[i])
                    maps[i] = map_to_png(probs[j], h, w)
                    heights[i], widths[i] = h, w
                    score[i] = scores[j]
            except Exception as exc:  # noqa: BLE001 - the rows say why, the run goes on
                msg = storage.redact(f"{SCORING_FAILED}: {type(exc).__name__}: {exc}")
                for i in good:
                    errors[i], maps[i], heights[i], widths[i] = msg, None, None, None
                    score[i] = np.nan
        res = [self.models.get(p) for p in products]
        thr = np.array([r.threshold if r is not None and r.threshold is not None else np.nan
                        for r in res], np.float32)
        scored = np.array([e is None for e in errors]) & np.isfinite(score)
        return pa.table({
            "product": pa.array(products.tolist(), pa.string()),
            "image_uri": pa.array(uris, pa.string()),
            "score": pa.array(score, pa.float32(), mask=~scored),
            "is_anomaly": pa.array(score > thr, pa.bool_(), mask=~scored),
            "threshold": pa.array(thr, pa.float32(), mask=~np.isfinite(thr)),
            "anomaly_map_png": pa.array(maps, pa.binary()),
            "height": pa.array(heights, pa.int32()),
            "width": pa.array(widths, pa.int32()),
            "model_version": pa.array([r.version if r is not None else None for r in res],
                                      pa.string()),
            "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            "error": pa.array(errors, pa.string()),
            _PIDX: pa.array([self.pidx[p] for p in products], pa.int32()),
        }, schema=_STAGING_SCHEMA)


def _after_decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop decode_batch's all-zero masks (scoring has none) and make ``error`` a string in
    every block: an all-success block would otherwise carry an Arrow ``null`` column that
    cannot be concatenated with a ``string`` one when the actor's batcher merges blocks."""
    batch.pop("mask", None)
    ok = images.error_free(batch["error"])
    batch["error"] = np.array(["" if good else str(e) for good, e in zip(ok, batch["error"])],
                              dtype=object)
    return batch


def build_dataset(cfg: Config, frame: pd.DataFrame, models: dict[str, ResolvedModel],
                  pidx: dict[str, int]):
    """The Ray Data plan: per-product decode at the model's size, union, actor pool; rows of
    products without a model become error rows without being read. Output: staging schema."""
    import ray

    from prn_ray.pipeline import _frame_dataset, cluster_has_gpu, decode_stage

    sc = cfg.score
    parts = []
    for product, rows in frame.groupby("product", sort=True):
        res = models[product]
        if res.version is None:
            continue
        ds = decode_stage(_frame_dataset(rows.reset_index(drop=True), cfg), cfg,
                          int(res.image_size))
        parts.append(ds.map_batches(_after_decode, batch_format="numpy",
                                    num_cpus=cfg.data.task_cpus))
    out = []
    if parts:
        decoded = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        gpus = ray.cluster_resources().get("GPU", 0) if cluster_has_gpu() else 0
        out.append(decoded.map_batches(
            Scorer,
            fn_constructor_kwargs={
                "models": models, "storage_cfg": cfg.storage, "pidx": pidx,
                # ceil: the fractional rest of a core is left to decode tasks, which mostly
                # wait on storage; floor would leave 1.5 reserved CPUs running one thread.
                "threads": max(1, math.ceil(sc.cpus_per_actor)), "use_gpu": gpus > 0,
            },
            compute=ray.data.ActorPoolStrategy(size=sc.actors),
            batch_size=sc.batch_size,
            batch_format="numpy",
            num_cpus=sc.cpus_per_actor,
            num_gpus=min(1.0, gpus / max(1, sc.actors)) if gpus else 0,
        ))
    missing = frame[frame["product"].map(lambda p: models[p].version is None)]
    if len(missing):
        out.append(_frame_dataset(missing.reset_index(drop=True), cfg).map_batches(
            no_model_rows, fn_kwargs={"models": models, "pidx": pidx},
            batch_format="pandas", num_cpus=cfg.data.task_cpus))
    if not out:
        return None
    return out[0].union(*out[1:]) if len(out) > 1 else out[0]


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


def _read_marker(uri: str, cfg: StorageConfig | None) -> dict[str, Any] | None:
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
            marker = _read_marker(uri, storage_cfg)
            if marker is not None:
                out.append(Partition(d, product, uri, marker))
    return out


def _read_partition(part: Partition, cfg: StorageConfig | None, columns: list[str] | None
                    ) -> pa.Table:
    tables = []
    for uri in part.files:
        loc = storage.resolve(uri, cfg)
        tables.append(pq.read_table(loc.path, filesystem=loc.fs, columns=columns,
                                    schema=SCORE_SCHEMA))
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
                tables.append(_read_partition(part, storage_cfg, cols))
                break
            except FileNotFoundError:
                # A commit replaced the partition between reading its marker and its files.
                marker = _read_marker(part.uri, storage_cfg)
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


# ----------------------------------------------------------------------------- commit


def _copy(src: str, dst: str, cfg: StorageConfig | None) -> None:
    a, b = storage.resolve(src, cfg), storage.resolve(dst, cfg)
    if b.scheme == "file":
        b.fs.create_dir(posixpath.dirname(b.path), recursive=True)
    a.fs.copy_file(a.path, b.path)  # S3: server-side CopyObject


def _write_table(table: pa.Table, uri: str, cfg: StorageConfig | None) -> None:
    loc = storage.resolve(uri, cfg)
    if loc.scheme == "file":
        loc.fs.create_dir(posixpath.dirname(loc.path), recursive=True)
    pq.write_table(table.cast(SCORE_SCHEMA), loc.path, filesystem=loc.fs)


def _file_rows(uri: str, cfg: StorageConfig | None) -> int:
    loc = storage.resolve(uri, cfg)
    return pq.ParquetFile(loc.path, filesystem=loc.fs).metadata.num_rows


def commit_partition(output_uri: str, cfg: StorageConfig | None, *, date: str, product: str,
                     staged: list[str], run_id: str, carry: pa.Table | None = None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Replace one partition with the run's staged files (protocol in the module doc).
    Returns the marker written."""
    pdir = partition_uri(output_uri, date, product)
    before = {u.rsplit("/", 1)[1] for u in storage.list_files(pdir, cfg, recursive=False)}
    files = []
    names = [f"part-{run_id}-{k:05d}.parquet" for k in range(len(staged))] + \
        [f"part-{run_id}-carry.parquet"]
    if before & set(names):  # a re-used run id: never overwrite a file a marker may list
        tag = secrets.token_hex(3)
        names = [n.replace(f"part-{run_id}-", f"part-{run_id}-{tag}-") for n in names]
    for src, name in zip(staged, names):
        _copy(src, storage.join(pdir, name), cfg)
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
    storage.write_text(storage.join(pdir, MARKER), json.dumps(marker, indent=1) + "\n", cfg)
    keep = {f["name"] for f in files} | {MARKER}
    for name in sorted(before - keep):
        storage.delete_file(storage.join(pdir, name), cfg)
    return marker


# ----------------------------------------------------------------------------- run


@dataclass
class ProductSummary:
    product: str
    model_version: str | None
    threshold: float | None
    images: int = 0  # input images of this product
    skipped: int = 0  # incremental: already scored by this version
    rows: int = 0  # rows written by this run (scored + errors)
    scored: int = 0
    errors: int = 0
    anomalies: int = 0
    carried: int = 0  # incremental: rows kept from the partition's previous commit
    error: str | None = None  # product-level problem (no model)


@dataclass
class RunSummary:
    run_id: str
    date: str
    input_uri: str
    output_uri: str
    status: str = "ok"  # ok | partial (a product had no model / failed) | empty
    incremental: bool = False
    threshold_override: float | None = None
    images: int = 0
    skipped: int = 0
    rows: int = 0
    scored: int = 0
    errors: int = 0
    anomalies: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    ignored_inputs: dict[str, int] = field(default_factory=dict)
    products: list[ProductSummary] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    pipeline_s: float = 0.0
    images_per_s: float = 0.0
    summary_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def error_reason(error: Any) -> str | None:
    if error is None or (isinstance(error, float) and math.isnan(error)) or error == "":
        return None
    return str(error).split(":", 1)[0].strip()


def _staged_by_product(staging_uri: str, cfg: StorageConfig | None,
                       names: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    prefix = storage.resolve(staging_uri, cfg).path
    for uri in storage.list_files(staging_uri, cfg, recursive=True, extensions=(".parquet",)):
        rel = storage.resolve(uri, cfg).path[len(prefix):].strip("/")
        head = rel.split("/", 1)[0]
        if not head.startswith(_PIDX + "="):
            raise ScoringError(f"unexpected staged file {storage.redact(uri)}")
        out.setdefault(names[int(head.split("=", 1)[1])], []).append(uri)
    return {k: sorted(v) for k, v in out.items()}


def _staged_stats(files: list[str], cfg: StorageConfig | None) -> pd.DataFrame:
    cols = ["product", "image_uri", "score", "is_anomaly", "error"]
    tables = []
    for uri in files:
        loc = storage.resolve(uri, cfg)
        tables.append(pq.read_table(loc.path, filesystem=loc.fs, columns=cols))
    if not tables:
        return pd.DataFrame(columns=cols)
    return pa.concat_tables(tables).to_pandas()


def score(cfg: Config, input_uri: str, *, date: str | None = None,
          products: list[str] | None = None, run_id: str | None = None,
          say: Callable[[str, str], None] | None = None) -> RunSummary:
    """Score every image under ``input_uri`` for ``date`` (default today, UTC) and commit the
    date's partitions under ``cfg.score.output_uri``. Needs Ray (``runtime.init_ray``)."""
    import ray

    from prn_ray.runtime import progress, quiet_ray_data

    say = say or progress
    t0 = time.perf_counter()
    date = check_date(date or today_utc())
    run_id = run_id or new_run_id()
    scfg, out_uri = cfg.storage, cfg.score.output_uri
    incremental = bool(cfg.score.incremental)
    summary = RunSummary(run_id, date, storage.redact(input_uri), storage.redact(out_uri),
                         incremental=incremental, threshold_override=cfg.score.threshold)
    wanted = products or cfg.data.products
    frame = list_inputs(input_uri, scfg, wanted)
    summary.ignored_inputs = dict(frame.attrs.get("ignored", {}))
    summary.images = len(frame)
    names = sorted(frame["product"].unique().tolist())
    say("score", f"run {run_id} date {date}: {len(frame)} image(s) of {len(names)} product(s) "
                 f"from {storage.redact(input_uri)}")

    models = resolve_models(cfg, names)
    per: dict[str, ProductSummary] = {}
    for p in names:
        m = models[p]
        per[p] = ProductSummary(p, m.version, m.threshold,
                                images=int((frame["product"] == p).sum()), error=m.error)
        say(p, f"model {m.version} (image size {m.image_size}, threshold {m.threshold:.4f})"
            if m.version else m.error or NO_MODEL)

    # Incremental: images already scored without error by the version resolved now.
    if incremental and len(frame):
        previous = read_scores(out_uri, scfg, products=names,
                               columns=["product", "image_uri", "model_version", "error"])
        ok_prev = previous[previous["error"].isna()]
        done = set(zip(ok_prev["product"], ok_prev["image_uri"], ok_prev["model_version"]))
        key = [(p, u, models[p].version) for p, u in zip(frame["product"], frame["image_uri"])]
        skip = np.array([k in done for k in key], dtype=bool)
        for p, n in Counter(frame["product"][skip]).items():
            per[p].skipped = int(n)
        summary.skipped = int(skip.sum())
        frame = frame[~skip].reset_index(drop=True)
        say("score", f"incremental: {summary.skipped} image(s) already scored by the same "
                     f"model version, {len(frame)} to score")

    staging = storage.join(out_uri, "_staging", date, run_id)
    pidx = {p: i for i, p in enumerate(names)}
    t1 = time.perf_counter()
    if len(frame):
        quiet_ray_data()
        ds = build_dataset(cfg, frame, models, pidx)
        loc = storage.resolve(staging, scfg)
        ds.write_parquet(loc.path, filesystem=loc.fs, partition_cols=[_PIDX],
                         min_bytes_per_file=_STAGING_MIN_FILE_BYTES,
                         schema=_STAGING_SCHEMA,
                         # explicit: a default 1-CPU write task can starve on a busy cluster
                         ray_remote_args={"num_cpus": cfg.data.task_cpus})
    summary.pipeline_s = round(time.perf_counter() - t1, 3)
    staged = _staged_by_product(staging, scfg, names) if len(frame) else {}
    stats = _staged_stats([u for fs_ in staged.values() for u in fs_], scfg)
    # Never commit a run that lost or duplicated rows.
    if len(stats) != len(frame) or stats.duplicated(["product", "image_uri"]).any():
        raise ScoringError(f"staged {len(stats)} row(s) for {len(frame)} image(s) to score "
                           f"(run {run_id}); nothing committed, staging left at "
                           f"{storage.redact(staging)}")
    say("score", f"staged {len(stats)} row(s) in {summary.pipeline_s:.1f}s; committing")

    reasons: Counter = Counter()
    # Ops/test hook: pause before each partition commit, so a kill can be aimed between
    # commits (tests/test_scoring.py kills a real job there). Unset in production.
    commit_delay = float(os.environ.get(COMMIT_DELAY_ENV) or 0)
    for p in names:
        rows = stats[stats["product"] == p]
        ps = per[p]
        ps.rows = len(rows)
        ok = rows["error"].isna()
        ps.scored, ps.errors = int(ok.sum()), int((~ok).sum())
        ps.anomalies = int(rows["is_anomaly"].eq(True).sum())
        reasons.update(r for r in map(error_reason, rows["error"]) if r)
        if not len(rows):
            continue  # incremental: nothing new for this product; its partition is untouched
        carry = None
        if incremental:
            carry = _carry_over(out_uri, scfg, date, p, set(rows["image_uri"]))
            ps.carried = carry.num_rows if carry is not None else 0
        versions = sorted({models[p].version or "", *(_versions(carry))} - {""})
        if commit_delay:
            time.sleep(commit_delay)
        marker = commit_partition(
            out_uri, scfg, date=date, product=p, staged=staged.get(p, []), run_id=run_id,
            carry=carry,
            extra={"model_versions": versions, "threshold": models[p].threshold,
                   "threshold_override": cfg.score.threshold is not None,
                   "errors": ps.errors, "anomalies": ps.anomalies,
                   "incremental": incremental})
        summary.partitions.append(partition_uri(out_uri, date, p))
        say(p, f"committed {marker['rows']} row(s) to date={date}/product={p}")

    for p in names:
        ps = per[p]
        summary.rows += ps.rows
        summary.scored += ps.scored
        summary.errors += ps.errors
        summary.anomalies += ps.anomalies
    summary.errors_by_reason = dict(sorted(reasons.items()))
    summary.products = [per[p] for p in names]
    if not len(frame) and not summary.skipped:
        summary.status = "empty"
    elif any(per[p].error for p in names) or reasons.get(SCORING_FAILED) or reasons.get(NO_MODEL):
        summary.status = "partial"
    # This run's staging is no longer needed; nor is that of runs of this date that died
    # long ago (a concurrent run's staging, e.g. other products of the same date, is kept).
    storage.delete_dir(staging, scfg)
    clean_stale_staging(out_uri, scfg, date)
    summary.wall_s = round(time.perf_counter() - t0, 3)
    summary.images_per_s = round(summary.rows / summary.wall_s, 2) if summary.wall_s else 0.0
    summary.summary_uri = storage.join(out_uri, "_runs", date, f"{run_id}.json")
    storage.write_text(summary.summary_uri, json.dumps(summary.to_dict(), indent=1) + "\n", scfg)
    summary.summary_uri = storage.redact(summary.summary_uri)
    return summary


def _run_started(run_id: str) -> datetime | None:
    m = re.match(r"^score-(\d{8}T\d{6}Z)-", run_id)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


def clean_stale_staging(output_uri: str, cfg: StorageConfig | None, date: str,
                        older_than_s: float = STALE_STAGING_S,
                        now: datetime | None = None) -> list[str]:
    """Delete ``_staging/<date>/<run_id>`` folders of runs started more than ``older_than_s``
    ago (runs that died: a live run commits long before). Returns the run ids removed."""
    now = now or datetime.now(timezone.utc)
    base = storage.join(output_uri, "_staging", date)
    removed = []
    for run_id in storage.list_dirs(base, cfg):
        started = _run_started(run_id)
        if started is not None and (now - started).total_seconds() > older_than_s:
            storage.delete_dir(storage.join(base, run_id), cfg)
            removed.append(run_id)
    return removed


def _versions(table: pa.Table | None) -> set[str]:
    if table is None or not table.num_rows:
        return set()
    return {v for v in table.column("model_version").to_pylist() if v}


def _carry_over(out_uri: str, cfg: StorageConfig | None, date: str, product: str,
                rescored: set[str]) -> pa.Table | None:
    """Incremental: rows of the partition's current commit whose image is not re-scored now."""
    parts = committed_partitions(out_uri, cfg, date, [product])
    if not parts:
        return None
    table = _read_partition(parts[0], cfg, None).drop_columns(["date"])
    keep = ~np.isin(np.asarray(table.column("image_uri").to_pylist(), dtype=object),
                    np.asarray(sorted(rescored), dtype=object))
    return table.filter(pa.array(keep))


def format_summary(s: RunSummary) -> str:
    """The table a person reads at the end of a nightly run."""
    head = (f"{'product':<16} {'images':>6} {'skipped':>7} {'scored':>6} {'errors':>6} "
            f"{'anomalies':>9} {'threshold':>9}  model version / problem")
    lines = [f"scoring run {s.run_id}  date {s.date}  status {s.status}", head, "-" * len(head)]
    for p in s.products:
        thr = f"{p.threshold:.4f}" if p.threshold is not None else "-"
        tail = p.model_version or (p.error or "")[:90]
        lines.append(f"{p.product:<16} {p.images:>6} {p.skipped:>7} {p.scored:>6} "
                     f"{p.errors:>6} {p.anomalies:>9} {thr:>9}  {tail}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<16} {s.images:>6} {s.skipped:>7} {s.scored:>6} {s.errors:>6} "
                 f"{s.anomalies:>9}")
    if s.errors_by_reason:
        lines.append("errors by reason: " + ", ".join(f"{k} {v}"
                                                      for k, v in s.errors_by_reason.items()))
    if s.ignored_inputs:
        lines.append("ignored inputs: " + ", ".join(f"{k} {v}" for k, v in
                                                   s.ignored_inputs.items()))
    lines.append(f"{s.rows} row(s) written in {s.wall_s:.1f}s ({s.images_per_s:.1f} images/s; "
                 f"pipeline {s.pipeline_s:.1f}s)" +
                 (f"; threshold override {s.threshold_override}" if s.threshold_override
                  is not None else ""))
    lines.append(f"summary: {s.summary_uri}")
    return "\n".join(lines)
