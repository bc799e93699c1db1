"""Catalog: products and samples from an MVTec-style tree or a manifest.

The sample table (contract) has the columns ``product, image_uri, label (normal|anomaly),
defect_type, mask_uri, split (train|val|test|seen)``; other columns of a manifest are kept.

Split protocol (:func:`assign_splits`; DRA's "general setting" with CPR's sorting):

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
``mask_uri``: a seen one is a defect known by its image label (it trains through the
multiple-instance loss, :mod:`prn_ray.model.loss`), a test one counts in the image metrics only
(both are counted in the problems); a seen defect's mask file of 0 bytes is listed (it is
neither kind: its image is quarantined when training decodes it); with
``check_masks=True`` mask and image sizes are compared from their headers. Everything is returned
in ``Catalog.problems`` and logged; :class:`CatalogError` is raised when nothing trainable is left.
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from prn_ray import storage
from prn_ray.config import Config, DataConfig, StorageConfig
from prn_ray.contracts import IMAGE_EXTENSIONS, SPLITS, product_name_problem, sample_row
from prn_ray.data.manifest import COLUMNS, CatalogError, read_manifest
from prn_ray.data.paths import base_uri, listed, rel_parts, relative_keys, sorted_by_key

log = logging.getLogger(__name__)
_LOGGED: set[tuple[str, str]] = set()  # (source, problem) already logged by this process

# ----------------------------------------------------------------------------- MVTec tree


def scan_mvtec(root: str, storage_cfg: StorageConfig | None = None) -> pd.DataFrame:
    """Samples of an MVTec AD tree (local path or ``s3://``), split ``train``/``test``.

    ``<root>/<product>/train/good/*`` -> normal/train; ``<root>/<product>/train/<defect>/*`` ->
    anomaly/train (becomes ``seen`` in :func:`assign_splits`); ``<root>/<product>/test/good/*`` ->
    normal/test; ``<root>/<product>/test/<defect>/*`` -> anomaly/test, with its mask
    ``<root>/<product>/ground_truth/<defect>/<stem>_mask.<ext>`` (or ``<stem>.<ext>``).
    Image extensions: :data:`prn_ray.contracts.IMAGE_EXTENSIONS`, any case. One recursive
    listing.
    """
    base = base_uri(root, storage_cfg)
    files = storage.list_files(root, storage_cfg)
    if not files:
        raise CatalogError(f"no files under {storage.redact(root)}")
    images: list[dict] = []
    masks: dict[tuple[str, str, str], str] = {}
    exact: dict[tuple[str, str, str], str] = {}
    for uri in files:
        parts = rel_parts(uri, base)
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
        images.append(sample_row(product, uri, None if sub == "good" else sub, section,
                                 _stem=stem))
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
            seen_idx = sorted_by_key(df, group.index[seen_now.to_numpy()], keys)
            seen_order = [seen_idx[j] for j in np.random.RandomState(cfg.split_seed).permutation(
                len(seen_idx))]
        else:
            cand = sorted_by_key(df, group.index[(label == "anomaly") & (split == "test")], keys)
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
        normals = sorted_by_key(
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


def _empty_masks(uris: list[str], cfg: StorageConfig | None) -> list[str]:
    """The mask files among ``uris`` that exist with 0 bytes (a missing one is the decode's
    ``mask_missing``). One metadata request each: only the few seen defects are asked."""
    def empty(uri: str) -> bool:
        try:
            return storage.size(uri, cfg) == 0
        except OSError:
            return False  # unreadable: the decode reports it

    with ThreadPoolExecutor(max_workers=8) as pool:
        return [u for u, e in zip(uris, pool.map(empty, uris)) if e]


def seen_defect_counts(df: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """Per product, the seen anomalies (training and validation) with a mask and with an image
    label only."""
    rows = df[(df["label"] == "anomaly") & df["split"].isin(["seen", "val"])]
    out = {}
    for product, group in rows.groupby("product", sort=True):
        unmasked = int((group["mask_uri"].fillna("") == "").sum())
        out[str(product)] = (len(group) - unmasked, unmasked)
    return out


def describe_seen(masked: int, unmasked: int) -> str:
    """``12 seen anomalies (10 with masks, 2 with image labels only)``."""
    return (f"{masked + unmasked} seen anomalies ({masked} with masks, {unmasked} with image "
            "labels only)")


def _load_samples(data: DataConfig, scfg: StorageConfig) -> tuple[pd.DataFrame, str]:
    """The sample table of ``data.manifest`` or ``data.root`` (exactly one is set) and its
    source."""
    if data.root and data.manifest:
        raise CatalogError(
            "both data.root and data.manifest are set; use one (e.g. --set data.root= )"
        )
    if data.manifest:
        return read_manifest(data.manifest, scfg), data.manifest
    if data.root:
        return scan_mvtec(data.root, scfg), data.root
    raise CatalogError("no data: set data.root (MVTec-style tree) or data.manifest")


def _select_products(df: pd.DataFrame, products: list[str] | None, problems: list[str]
                     ) -> pd.DataFrame:
    """The rows of ``products`` (all when empty); a missing one is added to ``problems``."""
    found = sorted(df["product"].unique())
    if products:
        missing = [p for p in products if p not in found]
        if missing:
            problems.append(f"product(s) {missing} not found; available: {found}")
        df = df[df["product"].isin(products)]
        if df.empty:
            raise CatalogError(f"none of data.products {products} found; available: {found}")
    return df


def _anomaly_problems(product: str, anomalies: pd.DataFrame,
                      scfg: StorageConfig) -> list[str]:
    """What a kept product's anomalies lack: test anomalies, masks, non-empty mask files."""
    problems: list[str] = []
    if anomalies.empty:
        problems.append(
            f"{product}: no anomalous images; it trains on synthetic anomalies only and "
            "cannot be evaluated on real defects"
        )
    elif not (anomalies["split"] == "test").any():
        problems.append(f"{product}: no test anomalies left for evaluation")
    trained = anomalies[anomalies["split"].isin(["seen", "val"])]
    unmasked = int((trained["mask_uri"] == "").sum())
    if unmasked:
        problems.append(
            f"{product}: {unmasked} of {len(trained)} seen anomalies have no mask: they "
            "train from their image label only"
        )
    untested = anomalies[(anomalies["split"] == "test") & (anomalies["mask_uri"] == "")]
    if len(untested):
        problems.append(
            f"{product}: {len(untested)} test anomalies have no mask: they count in the "
            "image metrics only"
        )
    empty = _empty_masks(trained[trained["mask_uri"] != ""]["mask_uri"].tolist(), scfg)
    if empty:
        problems.append(
            f"{product}: {len(empty)} seen anomaly mask file(s) are empty (0 bytes): "
            f"neither a mask nor an image label, those images are quarantined: "
            f"{listed(empty)}"
        )
    return problems


def _trainable_products(df: pd.DataFrame, scfg: StorageConfig,
                        problems: list[str]) -> list[str]:
    """The products with a valid name and normal training images; the rest, and what the kept
    ones lack, are added to ``problems``."""
    keep: list[str] = []
    for product, group in df.groupby("product", sort=True):
        bad_name = product_name_problem(product)
        if bad_name:  # never turned into a path
            problems.append(f"{bad_name}; its {len(group)} image(s) skipped")
            continue
        normal_train = (group["label"] == "normal") & (group["split"] == "train")
        anomalies = group[group["label"] == "anomaly"]
        if not normal_train.any():
            problems.append(f"{product}: no normal training images; product skipped")
            continue
        keep.append(product)
        problems.extend(_anomaly_problems(product, anomalies, scfg))
    return keep


def _log_problems(source: str, problems: list[str]) -> None:
    for p in problems:
        # Jobs build the catalog more than once (train, then score and evaluate, in the demo);
        # the same problem is said once per process.
        if (source, p) not in _LOGGED:
            _LOGGED.add((source, p))
            log.warning("catalog: %s", p)


def build_catalog(cfg: Config, *, check_masks: bool = False) -> Catalog:
    """Catalog ``cfg.data.root`` (MVTec tree) or ``cfg.data.manifest``, restricted to
    ``cfg.data.products``, with the seen/validation split applied. See the module doc for what
    is reported and when :class:`CatalogError` is raised."""
    data, scfg = cfg.data, cfg.storage
    df, source = _load_samples(data, scfg)
    problems: list[str] = []
    df = _select_products(df, data.products, problems)
    df, split_problems = _assign_splits(df, data)
    problems.extend(split_problems)
    keep = _trainable_products(df, scfg, problems)
    df = df[df["product"].isin(keep)].reset_index(drop=True)
    if check_masks and not df.empty:
        bad = _check_mask_sizes(df, scfg)
        if bad:
            problems.append(f"{len(bad)} mask(s) do not match their image: {listed(bad)}")
    if not keep:  # the error lists the problems: not logged as well
        raise CatalogError(
            f"nothing trainable in {storage.redact(source)}:\n  " + "\n  ".join(problems)
        )
    _log_problems(source, problems)
    return Catalog(df=df, products=keep, problems=problems, source=source)


def training_inputs(cfg: Config, products: list[str] | None = None,
                    catalog: Catalog | None = None
                    ) -> tuple[pd.DataFrame, dict[str, list[str]], list[str]]:
    """The catalog without its test split, every product's train normals (heterologous
    sources for the others), and the products to train. Test rows never leave this function.
    No Ray: jobs call it before Ray starts, so a wrong data location is an input error."""
    catalog = catalog or build_catalog(cfg)  # logs its problems (a warning each)
    wanted = list(products or cfg.data.products or catalog.products)
    missing = sorted(set(wanted) - set(catalog.products))
    if missing:
        raise CatalogError(f"unknown product(s) {missing}; the catalog has {catalog.products}")
    frame = catalog.df[catalog.df["split"] != "test"].reset_index(drop=True)
    others = {p: frame[(frame["product"] == p) & (frame["split"] == "train")
                       & (frame["label"] == "normal")]["image_uri"].tolist()
              for p in catalog.products}
    return frame, others, wanted
