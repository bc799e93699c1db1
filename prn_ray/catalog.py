"""Catalog: products and samples from an MVTec-style tree or a manifest (DESIGN §1).

The sample table (contract) has the columns ``product, image_uri, label (normal|anomaly),
defect_type, mask_uri, split (train|val|test|seen)``; other columns of a manifest are kept.

Split protocol (:func:`assign_splits`, spec §5.1; DRA "general setting" with CPR's sorting):

1. Seen anomalies, per product: the product's anomalous ``test`` images, sorted by their path
   relative to the product's common directory (so a tree on S3 and the same tree on a local disk
   give the same choice), are permuted with ``numpy.random.RandomState(data.split_seed)``; the
   first ``data.seen_anomalies`` become ``seen`` and leave the test set. At most half of a
   product's test anomalies are taken, so some remain for evaluation (reported when capped).
   A manifest that already has ``seen`` rows for a product is respected (nothing carved);
   anomalies listed under ``train`` (datasets with defects in their training split) become
   ``seen``.
2. Validation, from training data only: ``data.val_normal_fraction`` of the ``train`` normals
   (sorted, permuted with ``RandomState(split_seed + 1)``) and the last ``data.val_seen_anomalies``
   of the seen anomalies in their permuted order (at least one stays ``seen``) become ``val``.
   A product that already has ``val`` rows keeps them and nothing is carved.

Test data is never moved into ``train``, ``seen`` or ``val`` except by step 1.

Reporting (:func:`build_catalog`): products without normal training images are dropped; products
without any anomaly stay (they train on synthetic anomalies only and cannot be evaluated on real
defects) with a warning; anomalous images without a mask stay in the table with an empty
``mask_uri`` and are listed (their rows fail in decoding with ``mask_missing``); with
``check_masks=True`` mask and image sizes are compared from their headers. Everything is returned
in ``Catalog.problems`` and logged; :class:`CatalogError` is raised when nothing trainable is left.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from prn_ray import storage
from prn_ray.config import Config, DataConfig, StorageConfig

log = logging.getLogger(__name__)

COLUMNS = ["product", "image_uri", "label", "defect_type", "mask_uri", "split"]
LABELS = ("normal", "anomaly")
SPLITS = ("train", "val", "test", "seen")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MAX_LISTED = 20


class CatalogError(ValueError):
    """Nothing usable could be catalogued (the message lists why)."""


class ManifestError(CatalogError):
    """A manifest with missing columns or bad rows (the message lists the rows)."""


# ----------------------------------------------------------------------------- helpers


def _base_uri(root: str, cfg: StorageConfig | None) -> str:
    loc = storage.resolve(root, cfg)
    return loc.uri()


def _rel_parts(uri: str, base: str) -> list[str] | None:
    if not uri.startswith(base.rstrip("/") + "/"):
        return None
    return uri[len(base.rstrip("/")) + 1 :].split("/")


def _listed(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(storage.redact(str(i)) for i in items[:limit])
    more = len(items) - limit
    return shown + (f", ... and {more} more" if more > 0 else "")


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in COLUMNS})


def relative_keys(uris: Iterable[str]) -> list[str]:
    """Each URI relative to the deepest directory shared by all of them (``/`` separators).

    ``s3://b/data/fabric/test/crack/000.png`` and ``/mnt/data/fabric/test/crack/000.png`` both
    become ``test/crack/000.png`` when listed with their siblings: a sort key that does not depend
    on where the dataset is stored.
    """
    parts = [str(u).replace("\\", "/").split("/") for u in uris]
    if not parts:
        return []
    common = 0
    shortest = min(len(p) for p in parts) - 1  # never strip a file name
    while common < shortest and all(p[common] == parts[0][common] for p in parts):
        common += 1
    return ["/".join(p[common:]) for p in parts]


def _sorted_by_key(df: pd.DataFrame, index: pd.Index, keys: dict) -> list:
    return sorted(index, key=lambda i: (keys[i], df.at[i, "image_uri"]))


# ----------------------------------------------------------------------------- MVTec tree


def scan_mvtec(root: str, storage_cfg: StorageConfig | None = None) -> pd.DataFrame:
    """Samples of an MVTec AD tree (local path or ``s3://``), split ``train``/``test``.

    ``<root>/<product>/train/good/*`` -> normal/train; ``<root>/<product>/train/<defect>/*`` ->
    anomaly/train (becomes ``seen`` in :func:`assign_splits`); ``<root>/<product>/test/good/*`` ->
    normal/test; ``<root>/<product>/test/<defect>/*`` -> anomaly/test, with its mask
    ``<root>/<product>/ground_truth/<defect>/<stem>_mask.<ext>`` (or ``<stem>.<ext>``).
    Image extensions: png/jpg/jpeg/bmp/tif/tiff, any case. One recursive listing.
    """
    base = _base_uri(root, storage_cfg)
    files = storage.list_files(root, storage_cfg)
    if not files:
        raise CatalogError(f"no files under {storage.redact(root)}")
    images: list[dict] = []
    masks: dict[tuple[str, str, str], str] = {}
    exact: dict[tuple[str, str, str], str] = {}
    for uri in files:
        parts = _rel_parts(uri, base)
        if parts is None or len(parts) != 4:
            continue
        product, section, sub, name = parts
        stem, ext = posixpath.splitext(name)
        if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if section == "ground_truth":
            if stem.endswith("_mask"):
                masks[(product, sub, stem[: -len("_mask")])] = uri
            else:
                exact[(product, sub, stem)] = uri
            continue
        if section not in ("train", "test"):
            continue
        normal = sub == "good"
        images.append(
            {
                "product": product,
                "image_uri": uri,
                "label": "normal" if normal else "anomaly",
                "defect_type": "good" if normal else sub,
                "split": section,
                "_stem": stem,
            }
        )
    if not images:
        raise CatalogError(
            f"no images in MVTec layout under {storage.redact(root)} "
            "(expected <root>/<product>/train/good/*.png and <root>/<product>/test/<defect>/*)"
        )
    for row in images:
        key = (row["product"], row["defect_type"], row.pop("_stem"))
        row["mask_uri"] = (
            "" if row["label"] == "normal" else masks.get(key) or exact.get(key) or ""
        )
    df = pd.DataFrame(images, columns=COLUMNS)
    df = df.sort_values(["product", "image_uri"], kind="stable").reset_index(drop=True)
    df.attrs["root"] = base
    return df


# ----------------------------------------------------------------------------- manifests


def _resolve_relative(uri: str, base_dir: str) -> str:
    if not uri:
        return ""
    if storage.is_s3(uri):
        return uri
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if os.path.isabs(uri) or uri.startswith("~"):
        return uri
    if storage.is_s3(base_dir):
        scheme, key = base_dir.split("://", 1)
        return f"s3://{posixpath.normpath(posixpath.join(key, uri))}"
    return os.path.normpath(os.path.join(base_dir, uri))


def validate_samples(df: pd.DataFrame, source: str = "samples") -> pd.DataFrame:
    """Normalise and check a sample table; raises :class:`ManifestError` listing bad rows."""
    missing = [c for c in ("product", "image_uri", "label", "split") if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{source}: missing column(s) {missing}; a manifest needs {COLUMNS} "
            "(defect_type and mask_uri may be omitted)"
        )
    df = df.copy()
    for col in ("defect_type", "mask_uri"):
        if col not in df.columns:
            df[col] = ""
    for col in COLUMNS:
        df[col] = [("" if _is_null(v) else str(v).strip()) for v in df[col]]
    df["label"] = df["label"].str.lower()
    df["split"] = df["split"].str.lower()
    bad: list[str] = []
    for i, row in enumerate(df[COLUMNS].itertuples(index=False)):
        problems = []
        if not row.product:
            problems.append("empty product")
        if not row.image_uri:
            problems.append("empty image_uri")
        if row.label not in LABELS:
            problems.append(f"label {row.label!r} not in {list(LABELS)}")
        if row.split not in SPLITS:
            problems.append(f"split {row.split!r} not in {list(SPLITS)}")
        if problems:
            bad.append(f"row {i} ({storage.redact(row.image_uri) or '?'}): {'; '.join(problems)}")
    dup = df.duplicated(["product", "image_uri"], keep="first")
    for i in np.flatnonzero(dup.to_numpy()):
        bad.append(f"row {i} ({storage.redact(df.iloc[i]['image_uri'])}): duplicate image_uri")
    if bad:
        more = len(bad) - _MAX_LISTED
        raise ManifestError(
            f"{source}: {len(bad)} bad row(s):\n  "
            + "\n  ".join(bad[:_MAX_LISTED])
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    normal_blank = (df["label"] == "normal") & (df["defect_type"] == "")
    df.loc[normal_blank, "defect_type"] = "good"
    rest = [c for c in df.columns if c not in COLUMNS]
    return df[COLUMNS + rest].reset_index(drop=True)


def _is_null(v) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def read_manifest(uri: str, storage_cfg: StorageConfig | None = None) -> pd.DataFrame:
    """A Parquet (``.parquet``/``.pq``) or CSV (``.csv``) manifest -> validated sample table.

    Relative ``image_uri``/``mask_uri`` values are resolved against the manifest's directory.
    """
    lower = uri.lower()
    try:
        data = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:
        raise ManifestError(f"manifest {storage.redact(uri)} does not exist") from None
    except Exception as exc:  # noqa: BLE001
        raise ManifestError(
            f"manifest {storage.redact(uri)} cannot be read: {storage.redact(str(exc))}"
        ) from None
    try:
        if lower.endswith((".parquet", ".pq")):
            df = pq.read_table(pa.BufferReader(data)).to_pandas()
        elif lower.endswith(".csv"):
            df = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        else:
            raise ManifestError(
                f"manifest {storage.redact(uri)}: unknown format (use .parquet, .pq or .csv)"
            )
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ManifestError(f"manifest {storage.redact(uri)} is not valid: {exc}") from None
    df = validate_samples(df, storage.redact(uri))
    loc = storage.resolve(uri, storage_cfg)
    base_dir = loc.uri(posixpath.dirname(loc.path))
    df["image_uri"] = [_resolve_relative(u, base_dir) for u in df["image_uri"]]
    df["mask_uri"] = [_resolve_relative(u, base_dir) for u in df["mask_uri"]]
    df.attrs["manifest"] = loc.uri()
    return df


def write_manifest(
    df: pd.DataFrame,
    uri: str,
    storage_cfg: StorageConfig | None = None,
    *,
    relative: bool = False,
) -> None:
    """Write a sample table as Parquet or CSV (by extension). ``relative=True`` stores URIs under
    the manifest's directory relative to it, so a dataset and its manifest can be moved together.
    """
    out = validate_samples(df, "manifest to write")
    if relative:
        loc = storage.resolve(uri, storage_cfg)
        base_dir = loc.uri(posixpath.dirname(loc.path)).rstrip("/") + "/"
        for col in ("image_uri", "mask_uri"):
            out[col] = [u[len(base_dir) :] if u.startswith(base_dir) else u for u in out[col]]
    lower = uri.lower()
    if lower.endswith((".parquet", ".pq")):
        out = out.astype(str)
        out.attrs = {}
        table = pa.Table.from_pandas(out, preserve_index=False).replace_schema_metadata(None)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(uri, sink.getvalue().to_pybytes(), storage_cfg)
    elif lower.endswith(".csv"):
        storage.write_bytes(uri, out.to_csv(index=False).encode("utf-8"), storage_cfg)
    else:
        raise ManifestError(f"manifest {uri}: unknown format (use .parquet, .pq or .csv)")


# ----------------------------------------------------------------------------- paired masks


def _exts(values: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [values]
    return tuple(v.lower() if v.startswith(".") else "." + v.lower() for v in values)


def paired_mask_manifest(
    root_uri: str,
    storage_cfg: StorageConfig | None = None,
    *,
    product: str,
    normal_dirs: str | Sequence[str],
    image_ext: str | Sequence[str] = (".jpg",),
    mask_ext: str = ".png",
    mask_suffix: str = "",
    subdir: str | None = None,
    test_normal_fraction: float = 0.2,
    split_seed: int = 42,
    test_normal_order: str = "random",
) -> pd.DataFrame:
    """Sample table of a "paired-mask folder": ``<root>/<class>/[<subdir>/]<id><image_ext>``
    next to its mask ``<id><mask_suffix><mask_ext>`` in the same directory.

    Class folders named in ``normal_dirs`` hold normal images (defect_type ``good``); every other
    class folder is a defect type. Splits: normals are sorted and permuted with
    ``RandomState(split_seed)``; ``test_normal_fraction`` of them go to ``test``, the rest to
    ``train`` (``test_normal_order="last"``: no shuffle, the last ones in sorted order go to
    ``test``, e.g. the Magnetic-Tile protocol of the time-to-accuracy runs: the first 752 of 952
    normals by name train, the other 200 test); all anomalies go to ``test`` (seen anomalies
    are carved from there by
    :func:`assign_splits`). With ``subdir=None`` images are taken at any depth below the class
    folder. ``df.attrs["unpaired_masks"]`` lists masks without an image.
    Example (Magnetic-Tile-Defect): ``root=.../magnetic_tile``, ``normal_dirs=["MT_Free"]``,
    ``image_ext=".jpg"``, ``mask_ext=".png"``.
    """
    image_exts = _exts(image_ext)
    mask_ext = _exts(mask_ext)[0]
    if mask_ext in image_exts and not mask_suffix:
        raise ValueError(
            f"images and masks both end with {mask_ext}: give a mask_suffix (e.g. '_mask')"
        )
    normals = {normal_dirs} if isinstance(normal_dirs, str) else set(normal_dirs)
    if not normals:
        raise ValueError("normal_dirs must name at least one class folder of normal images")
    if not 0.0 <= test_normal_fraction < 1.0:
        raise ValueError("test_normal_fraction must be in [0, 1)")
    sub_parts = [p for p in (subdir or "").split("/") if p]
    base = _base_uri(root_uri, storage_cfg)
    files = storage.list_files(root_uri, storage_cfg)
    if not files:
        raise CatalogError(f"no files under {storage.redact(root_uri)}")

    images: list[tuple[str, str, str, str]] = []  # (class, dir, stem, uri)
    masks: dict[tuple[str, str], str] = {}
    classes: set[str] = set()
    for uri in files:
        parts = _rel_parts(uri, base)
        if parts is None or len(parts) < 2:
            continue
        cls, name = parts[0], parts[-1]
        if sub_parts and parts[1:-1] != sub_parts:
            continue
        if name.startswith("."):
            continue
        stem, ext = posixpath.splitext(name)
        ext = ext.lower()
        directory = posixpath.dirname(uri)
        if ext == mask_ext and (not mask_suffix or stem.endswith(mask_suffix)):
            key_stem = stem[: -len(mask_suffix)] if mask_suffix else stem
            masks[(directory, key_stem)] = uri
            continue
        if ext in image_exts:
            images.append((cls, directory, stem, uri))
            classes.add(cls)
    missing_normals = sorted(normals - classes)
    if missing_normals:
        raise CatalogError(
            f"normal class folder(s) {missing_normals} not found under "
            f"{storage.redact(root_uri)}; class folders with images: {sorted(classes)}"
        )
    rows = []
    used: set[str] = set()
    for cls, directory, stem, uri in images:
        mask = masks.get((directory, stem), "")
        if mask:
            used.add(mask)
        normal = cls in normals
        rows.append(
            {
                "product": product,
                "image_uri": uri,
                "label": "normal" if normal else "anomaly",
                "defect_type": "good" if normal else cls,
                "mask_uri": mask,
                "split": "test",
            }
        )
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = df.sort_values("image_uri", kind="stable").reset_index(drop=True)
    normal_idx = df.index[df["label"] == "normal"]
    keys = dict(zip(df.index, relative_keys(df["image_uri"]), strict=True))
    ordered = _sorted_by_key(df, normal_idx, keys)
    n = len(ordered)
    n_test = int(round(test_normal_fraction * n))
    if test_normal_order == "last":
        perm = np.arange(n)[::-1]
    elif test_normal_order == "random":
        perm = np.random.RandomState(split_seed).permutation(n)
    else:
        raise ValueError(f"test_normal_order must be 'random' or 'last', got {test_normal_order!r}")
    test_set = {ordered[j] for j in perm[:n_test]}
    for i in ordered:
        df.at[i, "split"] = "test" if i in test_set else "train"
    df.attrs["root"] = base
    df.attrs["unpaired_masks"] = sorted(set(masks.values()) - used)
    return df


# ----------------------------------------------------------------------------- splits


def _assign_splits(df: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, list[str]]:
    df = df.copy().reset_index(drop=True)
    problems: list[str] = []
    for product, group in df.groupby("product", sort=True):
        keys = dict(zip(group.index, relative_keys(group["image_uri"]), strict=True))
        label, split = group["label"], group["split"]

        train_anom = group.index[(label == "anomaly") & (split == "train")]
        if len(train_anom):
            df.loc[train_anom, "split"] = "seen"
            problems.append(
                f"{product}: {len(train_anom)} anomalous training image(s) used as seen anomalies"
            )
        seen_now = df.loc[group.index, "split"] == "seen"
        if seen_now.any():  # given by the manifest (or its train anomalies): respect it
            seen_idx = _sorted_by_key(df, group.index[seen_now.to_numpy()], keys)
            seen_order = [seen_idx[j] for j in np.random.RandomState(cfg.split_seed).permutation(
                len(seen_idx))]
        else:
            cand = _sorted_by_key(df, group.index[(label == "anomaly") & (split == "test")], keys)
            n = len(cand)
            k = min(cfg.seen_anomalies, n // 2)
            if k < cfg.seen_anomalies and n:
                problems.append(
                    f"{product}: only {n} test anomalies; {k} (not {cfg.seen_anomalies}) taken as "
                    "seen so that half remain for evaluation"
                )
            perm = np.random.RandomState(cfg.split_seed).permutation(n)
            seen_order = [cand[j] for j in perm[:k]]
            df.loc[seen_order, "split"] = "seen"

        if (df.loc[group.index, "split"] == "val").any():
            continue  # the manifest defines validation for this product
        normals = _sorted_by_key(
            df, group.index[(label == "normal") & (df.loc[group.index, "split"] == "train")], keys
        )
        n = len(normals)
        n_val = int(round(cfg.val_normal_fraction * n))
        if cfg.val_normal_fraction > 0 and n >= 2:
            n_val = max(1, n_val)
        n_val = min(n_val, max(0, n - 1))
        perm = np.random.RandomState(cfg.split_seed + 1).permutation(n)
        df.loc[[normals[j] for j in perm[:n_val]], "split"] = "val"
        k_val = min(cfg.val_seen_anomalies, max(0, len(seen_order) - 1))
        if k_val:
            df.loc[seen_order[len(seen_order) - k_val :], "split"] = "val"
    return df, problems


def assign_splits(df: pd.DataFrame, data_cfg: DataConfig) -> pd.DataFrame:
    """Seen-anomaly and validation split (see the module doc). Deterministic, storage-agnostic."""
    out, problems = _assign_splits(df, data_cfg)
    for p in problems:
        log.info("split: %s", p)
    out.attrs["split_problems"] = problems
    return out


# ----------------------------------------------------------------------------- catalog


@dataclass
class Catalog:
    """The sample table of the trainable products plus what was found wrong on the way."""

    df: pd.DataFrame
    products: list[str]
    problems: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.df)

    def for_product(self, name: str) -> pd.DataFrame:
        if name not in self.products:
            raise KeyError(f"product {name!r} is not in the catalog; products: {self.products}")
        return self.df[self.df["product"] == name].reset_index(drop=True)

    def rows(self, product: str, split: str, label: str | None = None) -> pd.DataFrame:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} not in {list(SPLITS)}")
        df = self.for_product(product)
        keep = df["split"] == split
        if label is not None:
            keep &= df["label"] == label
        return df[keep].reset_index(drop=True)

    def normals(self, product: str, split: str = "train") -> pd.DataFrame:
        return self.rows(product, split, "normal")

    def anomalies(self, product: str, split: str = "seen") -> pd.DataFrame:
        return self.rows(product, split, "anomaly")

    def summary(self) -> pd.DataFrame:
        """Image counts per product, split and label."""
        return (
            self.df.groupby(["product", "split", "label"]).size().rename("images").reset_index()
        )


def _check_mask_sizes(df: pd.DataFrame, cfg: StorageConfig | None) -> list[str]:
    from prn_ray.images import ImageError, header_size

    rows = df[df["mask_uri"] != ""]

    def check(item) -> str | None:
        image_uri, mask_uri = item
        try:
            isize = header_size(image_uri, cfg)
            msize = header_size(mask_uri, cfg)
        except (ImageError, OSError) as exc:
            return f"{image_uri}: header unreadable ({storage.redact(str(exc))})"
        if isize and msize and isize != msize:
            return f"{image_uri}: image {isize[0]}x{isize[1]}, mask {msize[0]}x{msize[1]}"
        return None

    items = list(zip(rows["image_uri"], rows["mask_uri"], strict=True))
    with ThreadPoolExecutor(max_workers=8) as pool:
        return [r for r in pool.map(check, items) if r]


def build_catalog(cfg: Config, *, check_masks: bool = False) -> Catalog:
    """Catalog ``cfg.data.root`` (MVTec tree) or ``cfg.data.manifest``, restricted to
    ``cfg.data.products``, with the seen/validation split applied. See the module doc for what
    is reported and when :class:`CatalogError` is raised."""
    data, scfg = cfg.data, cfg.storage
    if data.root and data.manifest:
        raise CatalogError(
            "both data.root and data.manifest are set; use one (e.g. --set data.root= )"
        )
    if data.manifest:
        df, source = read_manifest(data.manifest, scfg), data.manifest
    elif data.root:
        df, source = scan_mvtec(data.root, scfg), data.root
    else:
        raise CatalogError("no data: set data.root (MVTec-style tree) or data.manifest")
    problems: list[str] = []
    found = sorted(df["product"].unique())
    if data.products:
        missing = [p for p in data.products if p not in found]
        if missing:
            problems.append(f"product(s) {missing} not found; available: {found}")
        df = df[df["product"].isin(data.products)]
        if df.empty:
            raise CatalogError(f"none of data.products {data.products} found; available: {found}")
    df, split_problems = _assign_splits(df, data)
    problems.extend(split_problems)

    keep: list[str] = []
    for product, group in df.groupby("product", sort=True):
        normal_train = (group["label"] == "normal") & (group["split"] == "train")
        anomalies = group[group["label"] == "anomaly"]
        if not normal_train.any():
            problems.append(f"{product}: no normal training images; product skipped")
            continue
        keep.append(product)
        if anomalies.empty:
            problems.append(
                f"{product}: no anomalous images; it trains on synthetic anomalies only and "
                "cannot be evaluated on real defects"
            )
        elif not (anomalies["split"] == "test").any():
            problems.append(f"{product}: no test anomalies left for evaluation")
        no_mask = anomalies[anomalies["mask_uri"] == ""]["image_uri"].tolist()
        if no_mask:
            problems.append(
                f"{product}: {len(no_mask)} anomalous image(s) without a mask (rows fail with "
                f"mask_missing): {_listed(no_mask)}"
            )
    df = df[df["product"].isin(keep)].reset_index(drop=True)
    if check_masks and not df.empty:
        bad = _check_mask_sizes(df, scfg)
        if bad:
            problems.append(f"{len(bad)} mask(s) do not match their image: {_listed(bad)}")
    for p in problems:
        log.warning("catalog: %s", p)
    if not keep:
        raise CatalogError(
            f"nothing trainable in {storage.redact(source)}:\n  " + "\n  ".join(problems)
        )
    return Catalog(df=df, products=keep, problems=problems, source=source)
