"""Sample tables on disk: manifests (Parquet/CSV) read, validated and written, and the
converter for "paired-mask" folders (each class folder holds images and same-name masks, e.g.
the Magnetic-Tile dataset).

A manifest (contract) has the columns ``product, image_uri, label (normal|anomaly),
defect_type, mask_uri, split (train|val|test|seen)``; other columns are kept. Relative URIs are
resolved against the manifest's folder. :func:`read_table` is the one reader of tabular files
(the catalog's manifests and scoring's input lists both use it).
"""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from prn_ray import storage
from prn_ray.config import StorageConfig
from prn_ray.contracts import CATALOG_COLUMNS, LABELS, SPLITS, sample_row
from prn_ray.data.paths import MAX_LISTED, base_uri, rel_parts, relative_keys, sorted_by_key
from prn_ray.errors import CatalogError

COLUMNS = list(CATALOG_COLUMNS)
TABLE_EXTENSIONS = (".parquet", ".pq", ".csv")


class ManifestError(CatalogError):
    """A manifest with missing columns or bad rows (the message lists the rows)."""


def resolve_relative(uri: str, base_dir: str) -> str:
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
        more = len(bad) - MAX_LISTED
        raise ManifestError(
            f"{source}: {len(bad)} bad row(s):\n  "
            + "\n  ".join(bad[:MAX_LISTED])
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


def read_table(uri: str, storage_cfg: StorageConfig | None = None,
               required: Sequence[str] = (), *, resolve: bool = True) -> pd.DataFrame:
    """A ``.parquet``/``.pq``/``.csv`` file as strings-or-native columns, its relative
    ``image_uri``/``mask_uri`` values resolved against the file's folder.

    Raises :class:`ManifestError` naming the file (never the credentials) when it is missing,
    unreadable, of an unknown format or lacks a ``required`` column."""
    name = storage.redact(uri)
    if not uri.lower().endswith(TABLE_EXTENSIONS):
        raise ManifestError(f"manifest {name}: unknown format (use .parquet, .pq or .csv)")
    try:
        data = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:
        raise ManifestError(f"manifest {name} does not exist") from None
    except Exception as exc:  # noqa: BLE001
        raise ManifestError(f"manifest {name} cannot be read: {storage.redact(str(exc))}"
                            ) from None
    try:
        if uri.lower().endswith(".csv"):
            df = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        else:
            df = pq.read_table(pa.BufferReader(data)).to_pandas()
    except Exception as exc:  # noqa: BLE001
        raise ManifestError(f"manifest {name} is not valid: {exc}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest {name}: missing column(s) {missing}; it needs "
                            f"{list(required)}")
    return resolve_uris(df, uri, storage_cfg) if resolve else df


def resolve_uris(df: pd.DataFrame, uri: str,
                 storage_cfg: StorageConfig | None = None) -> pd.DataFrame:
    """Resolve ``df``'s relative ``image_uri``/``mask_uri`` values against the folder of the
    table file ``uri`` (in place; the file's URI is kept in ``df.attrs["manifest"]``)."""
    loc = storage.resolve(uri, storage_cfg)
    base_dir = loc.uri(posixpath.dirname(loc.path))
    for col in ("image_uri", "mask_uri"):
        if col in df.columns:
            df[col] = [resolve_relative("" if _is_null(u) else str(u), base_dir)
                       for u in df[col]]
    df.attrs["manifest"] = loc.uri()
    return df


def read_manifest(uri: str, storage_cfg: StorageConfig | None = None) -> pd.DataFrame:
    """A Parquet (``.parquet``/``.pq``) or CSV (``.csv``) manifest -> validated sample table."""
    # Validated before resolving, so bad rows are named as the file spells them.
    df = validate_samples(read_table(uri, storage_cfg, resolve=False), storage.redact(uri))
    return resolve_uris(df, uri, storage_cfg)


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


def _paired_options(
    image_ext: str | Sequence[str], mask_ext: str, mask_suffix: str,
    normal_dirs: str | Sequence[str], test_normal_fraction: float,
) -> tuple[tuple[str, ...], str, set[str]]:
    """Checked options of :func:`paired_mask_manifest`: image extensions, mask extension and
    normal class folders."""
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
    return image_exts, mask_ext, normals


def _paired_files(
    files: Iterable[str], base: str, sub_parts: list[str], image_exts: tuple[str, ...],
    mask_ext: str, mask_suffix: str,
) -> tuple[list[tuple[str, str, str, str]], dict[tuple[str, str], str], set[str]]:
    """The listing sorted into images ``(class, dir, stem, uri)``, masks by ``(dir, stem)`` and
    the class folders holding images."""
    images: list[tuple[str, str, str, str]] = []  # (class, dir, stem, uri)
    masks: dict[tuple[str, str], str] = {}
    classes: set[str] = set()
    for uri in files:
        parts = rel_parts(uri, base)
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
    return images, masks, classes


def _paired_table(
    images: list[tuple[str, str, str, str]], masks: dict[tuple[str, str], str],
    normals: set[str], product: str,
) -> tuple[pd.DataFrame, set[str]]:
    """The images as a sample table sorted by URI, all in ``test``, and the masks used."""
    rows = []
    used: set[str] = set()
    for cls, directory, stem, uri in images:
        mask = masks.get((directory, stem), "")
        if mask:
            used.add(mask)
        rows.append(sample_row(product, uri, None if cls in normals else cls, "test",
                               mask_uri=mask))
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values("image_uri", kind="stable").reset_index(drop=True), used


def _split_paired_normals(df: pd.DataFrame, test_normal_fraction: float, split_seed: int,
                          test_normal_order: str) -> None:
    """Send ``test_normal_fraction`` of the normals to ``test`` and the rest to ``train``
    (in place)."""
    normal_idx = df.index[df["label"] == "normal"]
    keys = dict(zip(df.index, relative_keys(df["image_uri"]), strict=True))
    ordered = sorted_by_key(df, normal_idx, keys)
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
    image_exts, mask_ext, normals = _paired_options(
        image_ext, mask_ext, mask_suffix, normal_dirs, test_normal_fraction
    )
    sub_parts = [p for p in (subdir or "").split("/") if p]
    base = base_uri(root_uri, storage_cfg)
    files = storage.list_files(root_uri, storage_cfg)
    if not files:
        raise CatalogError(f"no files under {storage.redact(root_uri)}")
    images, masks, classes = _paired_files(
        files, base, sub_parts, image_exts, mask_ext, mask_suffix
    )
    missing_normals = sorted(normals - classes)
    if missing_normals:
        raise CatalogError(
            f"normal class folder(s) {missing_normals} not found under "
            f"{storage.redact(root_uri)}; class folders with images: {sorted(classes)}"
        )
    df, used = _paired_table(images, masks, normals, product)
    _split_paired_normals(df, test_normal_fraction, split_seed, test_normal_order)
    df.attrs["root"] = base
    df.attrs["unpaired_masks"] = sorted(set(masks.values()) - used)
    return df


def visa_manifest(root_uri: str, storage_cfg: StorageConfig | None = None, *,
                  split_csv: str | None = None, objects: Sequence[str] | None = None
                  ) -> pd.DataFrame:
    """Sample table of the VisA layout (Zou et al., ECCV 2022): ``<root>/split_csv/1cls.csv``
    (``object, split, label, image, mask``, paths relative to ``<root>``) is the official
    one-class split; one product per object. ``train`` normals train, ``test`` images test (the
    seen anomalies are carved from those by :func:`assign_splits`, as for any manifest). Each
    object's ``<object>/image_anno.csv``, where present, gives the defect types (several joined
    by ``+``); else ``anomaly``."""
    root_uri = base_uri(root_uri, storage_cfg)  # absolute: the manifest may live elsewhere
    split_uri = split_csv or storage.join(root_uri, "split_csv", "1cls.csv")
    try:
        split = pd.read_csv(io.BytesIO(storage.read_bytes(split_uri, storage_cfg)), dtype=str,
                            keep_default_na=False)
    except FileNotFoundError:
        raise CatalogError(f"no VisA split file {storage.redact(split_uri)} (give --split-csv)"
                           ) from None
    missing = {"object", "split", "label", "image", "mask"} - set(split.columns)
    if missing:
        raise CatalogError(f"{storage.redact(split_uri)}: missing column(s) {sorted(missing)}")
    if objects:
        unknown = sorted(set(objects) - set(split["object"]))
        if unknown:
            raise CatalogError(f"object(s) {unknown} not in {storage.redact(split_uri)}; "
                               f"objects: {sorted(set(split['object']))}")
        split = split[split["object"].isin(objects)]
    types: dict[str, str] = {}
    for obj in sorted(set(split["object"])):
        anno_uri = storage.join(root_uri, obj, "image_anno.csv")
        if storage.exists(anno_uri, storage_cfg):
            anno = pd.read_csv(io.BytesIO(storage.read_bytes(anno_uri, storage_cfg)), dtype=str,
                               keep_default_na=False)
            # paths as in 1cls.csv (relative to the root), or relative to the object
            types.update({i if i.startswith(obj + "/") else posixpath.join(obj, i):
                          lab.replace(",", "+") for i, lab in zip(anno["image"], anno["label"])})
    rows = []
    for r in split.itertuples(index=False):
        anomaly = r.label != "normal"
        rows.append({"product": r.object, "image_uri": storage.join(root_uri, r.image),
                     "label": "anomaly" if anomaly else "normal",
                     "defect_type": types.get(r.image, "anomaly") if anomaly else "good",
                     "mask_uri": storage.join(root_uri, r.mask) if r.mask else "",
                     "split": "train" if r.split == "train" else "test"})
    df = pd.DataFrame(rows, columns=COLUMNS).sort_values(["product", "image_uri"],
                                                         kind="stable").reset_index(drop=True)
    df.attrs["root"] = root_uri
    return df


def elpv_manifest(labels_uri: str, storage_cfg: StorageConfig | None = None, *,
                  test_normal_fraction: float = 0.3, split_seed: int = 42) -> pd.DataFrame:
    """Sample table of ELPV (Buerhop-Lutz et al. 2018; Deitsch et al. 2019): 2 624 300 x 300
    electroluminescence images of solar cells, each with the experts' defect probability
    (0, 1/3, 2/3, 1) and its cell type, listed in ``labels.csv`` (``<path> <probability>
    <type>`` per line, paths relative to the file) -- there are no masks.

    Protocol: the cell type is the product (``elpv_mono``, ``elpv_poly``); probability 0 is
    normal, 1 is defective (defect_type ``defective``, an image label: empty ``mask_uri``), the
    uncertain 1/3 and 2/3 are left out (counted in ``df.attrs["left_out"]``). Normals are
    sorted and permuted with ``RandomState(split_seed)``; ``test_normal_fraction`` of them test,
    the rest train; every defective cell goes to ``test``, and the catalog carves the seen
    defects from there (:func:`~prn_ray.data.catalog.assign_splits`)."""
    if not 0.0 < test_normal_fraction < 1.0:
        raise ValueError("test_normal_fraction must be in (0, 1)")
    try:
        text = storage.read_text(labels_uri, storage_cfg)
    except FileNotFoundError:
        raise CatalogError(f"no ELPV labels file {storage.redact(labels_uri)}") from None
    folder = posixpath.dirname(base_uri(labels_uri, storage_cfg))
    rows, left_out = [], 0
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            path, prob, cell = parts[0], float(parts[1]), parts[2]
        except (IndexError, ValueError):
            raise CatalogError(f"{storage.redact(labels_uri)} line {n}: expected '<path> "
                               f"<probability> <type>', got {line!r}") from None
        if 0.0 < prob < 1.0:
            left_out += 1
            continue
        rows.append({"product": f"elpv_{cell}", "image_uri": storage.join(folder, path),
                     "label": "normal" if prob == 0.0 else "anomaly",
                     "defect_type": "good" if prob == 0.0 else "defective", "mask_uri": "",
                     "split": "test"})
    df = pd.DataFrame(rows, columns=COLUMNS).sort_values(["product", "image_uri"],
                                                         kind="stable").reset_index(drop=True)
    for _, group in df[df["label"] == "normal"].groupby("product", sort=True):
        idx = group.index.to_numpy()
        perm = np.random.RandomState(split_seed).permutation(len(idx))
        train = idx[perm[int(round(test_normal_fraction * len(idx))):]]
        df.loc[train, "split"] = "train"
    df.attrs["root"] = folder
    df.attrs["left_out"] = left_out
    return df
