"""Catalog: MVTec tree scan, manifests, the seen/validation split, paired-mask folders.

Every storage-facing test runs twice: on a local temp dir and on the loopback S3 server.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import REPO, new_bucket, shared_data

from prn_ray import storage
from prn_ray.cli import run_job
from prn_ray.config import Config, DataConfig, StorageConfig
from prn_ray.data.catalog import assign_splits, build_catalog, scan_mvtec
from prn_ray.data.manifest import (
    COLUMNS,
    CatalogError,
    ManifestError,
    elpv_manifest,
    paired_mask_manifest,
    read_manifest,
    visa_manifest,
    write_manifest,
)
from prn_ray.data.paths import relative_keys
from prn_ray.demo_data import make_dataset
from prn_ray.images import decode_batch, encode_png

PRODUCTS = ("fabric", "bottle_cap", "metal_plate")
N_TRAIN, N_GOOD, N_DEFECT, SIZE = 10, 4, 8, 48
DEFECTS = ("scratch", "crack", "stain")  # 8 defect images -> 3 + 3 + 2


@pytest.fixture(scope="module")
def trees(s3_endpoint, tmp_path_factory):
    """The same tiny demo dataset on a local disk and on S3."""
    out = {
        "local": str(tmp_path_factory.mktemp("demo") / "mvtec"),
        "s3": storage.join(new_bucket(s3_endpoint, "cat"), "datasets/mvtec"),
    }
    for root in out.values():
        make_dataset(
            root,
            products=PRODUCTS,
            n_train=N_TRAIN,
            n_good_test=N_GOOD,
            n_defect_test=N_DEFECT,
            image_size=SIZE,
            defects=DEFECTS,
            seed=1,
        )
    return out


@pytest.fixture(params=["local", "s3"])
def root(request, trees):
    return trees[request.param]


def _data_cfg(**kw) -> DataConfig:
    base = dict(seen_anomalies=3, val_normal_fraction=0.2, val_seen_anomalies=1, split_seed=42)
    base.update(kw)
    return DataConfig(**base)


# ----------------------------------------------------------------------------- MVTec scan


def test_scan_mvtec_content(root):
    df = scan_mvtec(root)
    assert list(df.columns) == COLUMNS
    assert sorted(df["product"].unique()) == sorted(PRODUCTS)
    base = storage.resolve(root).uri()
    assert len(df) == len(PRODUCTS) * (N_TRAIN + N_GOOD + N_DEFECT)
    for product in PRODUCTS:
        p = df[df["product"] == product]
        train = p[p["split"] == "train"]
        assert len(train) == N_TRAIN and set(train["label"]) == {"normal"}
        assert set(train["defect_type"]) == {"good"} and set(train["mask_uri"]) == {""}
        assert train["image_uri"].tolist() == [
            f"{base}/{product}/train/good/{i:03d}.png" for i in range(N_TRAIN)
        ]
        test = p[p["split"] == "test"]
        normal = test[test["label"] == "normal"]
        assert len(normal) == N_GOOD and set(normal["mask_uri"]) == {""}
        anom = test[test["label"] == "anomaly"]
        counts = anom["defect_type"].value_counts().to_dict()
        assert counts == {"scratch": 3, "crack": 3, "stain": 2}
        for row in anom.itertuples():
            stem = row.image_uri.rsplit("/", 1)[1][:-4]
            assert row.image_uri == f"{base}/{product}/test/{row.defect_type}/{stem}.png"
            gt = f"{base}/{product}/ground_truth/{row.defect_type}"
            assert row.mask_uri == f"{gt}/{stem}_mask.png"
    if root.startswith("s3://"):
        assert df["image_uri"].str.startswith(root + "/").all()


def test_catalog_masks_decode_to_right_shapes(root):
    df = scan_mvtec(root)
    rows = pd.concat([df[df["label"] == "anomaly"].head(4), df[df["label"] == "normal"].head(2)])
    batch = {c: rows[c].to_numpy(dtype=object) for c in COLUMNS}
    out = decode_batch(batch, storage_cfg=StorageConfig(), data_cfg=DataConfig(), geometry=32)
    assert list(out["error"]) == [None] * 6, out["error"]
    assert out["image"].shape == (6, 32, 32, 3) and out["image"].dtype == np.uint8
    assert out["mask"].shape == (6, 32, 32) and out["mask"].dtype == np.uint8
    assert set(np.unique(out["mask"])) <= {0, 1}
    assert all(out["mask"][i].any() for i in range(4))  # every defect has mask pixels
    assert not out["mask"][4:].any()
    assert (out["orig_height"] == SIZE).all() and (out["orig_width"] == SIZE).all()


def test_scan_extensions_case_insensitive_and_masks_by_stem(tmp_path):
    root = tmp_path / "tree"
    img = encode_png(np.zeros((16, 16, 3), np.uint8))
    for rel in ("p/train/good/a.PNG", "p/train/good/b.JPG", "p/test/good/c.tiff",
                "p/test/hole/d.png", "p/test/hole/e.Bmp", "p/ground_truth/hole/d_mask.png",
                "p/ground_truth/hole/e.png", "p/readme.txt", "license.txt", "p/train/good/.x.png"):
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(img)
    df = scan_mvtec(str(root))
    names = sorted(u.rsplit("/", 1)[1] for u in df["image_uri"])
    assert names == ["a.PNG", "b.JPG", "c.tiff", "d.png", "e.Bmp"]
    masks = dict(zip(df["image_uri"].str.rsplit("/", n=1).str[1], df["mask_uri"], strict=True))
    assert masks["d.png"].endswith("ground_truth/hole/d_mask.png")
    assert masks["e.Bmp"].endswith("ground_truth/hole/e.png")  # BTAD-style same-name mask
    with pytest.raises(CatalogError, match="no files"):
        scan_mvtec(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- splits


def _check_protocol(before: pd.DataFrame, after: pd.DataFrame, cfg: DataConfig) -> None:
    merged = before.merge(after, on=["product", "image_uri"], suffixes=("_0", "_1"))
    assert len(merged) == len(before) == len(after)
    for product, m in merged.groupby("product"):
        test_anom = m[(m["label_0"] == "anomaly") & (m["split_0"] == "test")]
        # the DRA/CPR recipe, spelled out: sort (by relative path), permute, take the first N
        keys = relative_keys(test_anom["image_uri"])
        ordered = [u for _, u in sorted(zip(keys, test_anom["image_uri"], strict=True))]
        perm = np.random.RandomState(cfg.split_seed).permutation(len(ordered))
        chosen = [ordered[j] for j in perm[: cfg.seen_anomalies]]
        moved = m[m["split_1"].isin(["seen", "val"]) & (m["label_1"] == "anomaly")]
        assert sorted(moved["image_uri"]) == sorted(chosen)
        # the held-out seen anomalies are the last ones of the permuted order
        val_anom = moved[moved["split_1"] == "val"]["image_uri"].tolist()
        assert val_anom == chosen[len(chosen) - cfg.val_seen_anomalies :]
        # seen anomalies left the test set; nothing else left it
        still_test = m[m["split_1"] == "test"]
        assert not set(still_test["image_uri"]) & set(chosen)
        assert set(m[m["split_0"] == "test"]["image_uri"]) - set(chosen) == set(
            still_test["image_uri"]
        )
        # validation comes from training data only
        val = m[m["split_1"] == "val"]
        assert set(val["split_0"]) <= {"train", "test"}
        assert set(val[val["label_1"] == "normal"]["split_0"]) == {"train"}
        assert set(val[val["label_1"] == "anomaly"]["image_uri"]) <= set(chosen)
        n_train = int(((m["split_0"] == "train") & (m["label_0"] == "normal")).sum())
        assert (val["label_1"] == "normal").sum() == round(cfg.val_normal_fraction * n_train)
        # test normals untouched
        assert (m[(m["split_0"] == "test")]["split_1"].isin(["test", "seen", "val"])).all()


def test_assign_splits_protocol(root):
    cfg = _data_cfg()
    before = scan_mvtec(root)
    after = assign_splits(before, cfg)
    _check_protocol(before, after, cfg)
    counts = after.groupby(["product", "split", "label"]).size()
    for p in PRODUCTS:
        assert counts[(p, "seen", "anomaly")] == 2
        assert counts[(p, "val", "anomaly")] == 1
        assert counts[(p, "val", "normal")] == 2
        assert counts[(p, "train", "normal")] == N_TRAIN - 2
        assert counts[(p, "test", "anomaly")] == N_DEFECT - 3
        assert counts[(p, "test", "normal")] == N_GOOD
    # row order does not matter; the seed does
    shuffled = before.sample(frac=1.0, random_state=3).reset_index(drop=True)
    again = assign_splits(shuffled, cfg).sort_values("image_uri").reset_index(drop=True)
    pd.testing.assert_frame_equal(again, after.sort_values("image_uri").reset_index(drop=True))
    other = assign_splits(before, _data_cfg(split_seed=7))
    assert set(other[other["split"] == "seen"]["image_uri"]) != set(
        after[after["split"] == "seen"]["image_uri"]
    )


def test_seen_set_identical_on_s3_and_local(trees):
    cfg = _data_cfg(seen_anomalies=4, val_seen_anomalies=1)
    chosen = {}
    for name, root in trees.items():
        df = assign_splits(scan_mvtec(root), cfg)
        base = storage.resolve(root).uri()
        rel = df.assign(rel=[u[len(base) + 1 :] for u in df["image_uri"]])
        chosen[name] = {
            split: sorted(rel[rel["split"] == split]["rel"]) for split in ("seen", "val", "test")
        }
    assert chosen["local"] == chosen["s3"]
    assert len(chosen["s3"]["seen"]) == 3 * len(PRODUCTS)


def test_split_caps_and_respects_manifest(tmp_path):
    df = scan_mvtec(str(_mini_tree(tmp_path)))
    # Only 4 anomalies: at most half become seen, and it is reported.
    out = assign_splits(df, _data_cfg(seen_anomalies=10, val_seen_anomalies=0))
    assert (out["split"] == "seen").sum() == 2
    assert any("half remain" in p for p in out.attrs["split_problems"])
    # Existing val / seen rows are respected: nothing carved.
    given = df.copy()
    anomalies = given.index[given["label"] == "anomaly"]
    given.loc[anomalies[0], "split"] = "seen"
    given.loc[given.index[given["label"] == "normal"][0], "split"] = "val"
    out = assign_splits(given, _data_cfg(seen_anomalies=3, val_seen_anomalies=1))
    assert out["split"].tolist() == given["split"].tolist()
    # Anomalies in a training split (DAGM-like) become seen; test anomalies stay in test.
    dagm = df.copy()
    dagm.loc[anomalies[:2], "split"] = "train"
    out = assign_splits(dagm, _data_cfg(seen_anomalies=3, val_seen_anomalies=1))
    assert set(out.loc[anomalies[:2], "split"]) == {"seen", "val"}
    assert set(out.loc[anomalies[2:], "split"]) == {"test"}


def _mini_tree(tmp_path: Path) -> Path:
    root = tmp_path / "mini"
    img = encode_png(np.zeros((16, 16, 3), np.uint8))
    mask = encode_png(np.full((16, 16), 255, np.uint8))
    files = {f"p/train/good/{i}.png": img for i in range(5)}
    files.update({f"p/test/good/{i}.png": img for i in range(2)})
    for i in range(4):
        files[f"p/test/dent/{i}.png"] = img
        files[f"p/ground_truth/dent/{i}_mask.png"] = mask
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


# ----------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_manifest_roundtrip_relative_uris(root, ext):
    df = scan_mvtec(root)
    uri = storage.join(root, f"manifest.{ext}")
    write_manifest(df, uri, relative=True)
    raw = storage.read_bytes(uri)
    base = storage.resolve(root).uri()
    assert base.encode() not in raw  # stored relative to the manifest's folder
    back = read_manifest(uri)
    pd.testing.assert_frame_equal(back[COLUMNS], df[COLUMNS])
    write_manifest(df, uri)  # absolute
    pd.testing.assert_frame_equal(read_manifest(uri)[COLUMNS], df[COLUMNS])


def test_bad_manifest_lists_bad_rows(tmp_path):
    good = {"product": "p", "image_uri": "a.png", "label": "normal", "defect_type": "",
            "mask_uri": "", "split": "train"}
    rows = [
        good,
        {**good, "image_uri": "b.png", "label": "defect"},
        {**good, "image_uri": "c.png", "split": "holdout"},
        {**good, "image_uri": ""},
        {**good},  # duplicate of row 0
    ]
    path = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path))
    msg = str(info.value)
    assert "4 bad row(s)" in msg
    assert "row 1 (b.png)" in msg and "label 'defect'" in msg
    assert "row 2 (c.png)" in msg and "split 'holdout'" in msg
    assert "row 3" in msg and "empty image_uri" in msg
    assert "row 4 (a.png): duplicate" in msg
    pd.DataFrame([good]).drop(columns=["split"]).to_csv(path, index=False)
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['split'\]"):
        read_manifest(str(path))
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(str(tmp_path / "nope.parquet"))
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(ManifestError, match="unknown format"):
        read_manifest(str(tmp_path / "m.json"))
    # relative URIs resolve against the manifest's folder; normal defect_type defaults to good
    pd.DataFrame([good]).to_csv(path, index=False)
    df = read_manifest(str(path))
    assert df.loc[0, "image_uri"] == str(tmp_path / "a.png")
    assert df.loc[0, "defect_type"] == "good"


# ----------------------------------------------------------------------------- build_catalog


def test_build_catalog_from_tree_and_manifest(root):
    cfg = Config()
    cfg.data = _data_cfg(root=root, products=["fabric", "bottle_cap", "nonesuch"])
    cat = build_catalog(cfg, check_masks=True)
    assert cat.products == ["bottle_cap", "fabric"]
    assert any("nonesuch" in p for p in cat.problems)
    assert not any("do not match" in p for p in cat.problems)
    assert set(cat.df["product"]) == {"bottle_cap", "fabric"}
    assert len(cat.normals("fabric")) == N_TRAIN - 2
    assert len(cat.normals("fabric", "val")) == 2 and len(cat.anomalies("fabric")) == 2
    assert len(cat.anomalies("fabric", "test")) == N_DEFECT - 3
    assert len(cat.for_product("bottle_cap")) == N_TRAIN + N_GOOD + N_DEFECT
    with pytest.raises(KeyError, match="metal_plate"):
        cat.for_product("metal_plate")
    # the same catalog through a manifest of the tree
    uri = storage.join(root, "cat.parquet")
    write_manifest(scan_mvtec(root), uri)
    cfg2 = Config()
    cfg2.data = _data_cfg(manifest=uri, products=["fabric", "bottle_cap"])
    cat2 = build_catalog(cfg2)
    pd.testing.assert_frame_equal(cat2.df[COLUMNS], cat.df[COLUMNS])
    cfg2.data.root = root
    with pytest.raises(CatalogError, match="both"):
        build_catalog(cfg2)


def test_build_catalog_reports_problems(tmp_path):
    img = encode_png(np.zeros((16, 16, 3), np.uint8))
    rows = []

    def add(product, name, label, split, mask=b"", defect=""):
        f = tmp_path / product / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(img)
        mask_uri = ""
        if mask:
            (tmp_path / product / f"{name}.mask.png").write_bytes(mask)
            mask_uri = f"{product}/{name}.mask.png"
        rows.append(dict(product=product, image_uri=f"{product}/{name}", label=label,
                         defect_type=defect, mask_uri=mask_uri, split=split))

    good_mask = encode_png(np.full((16, 16), 255, np.uint8))
    for i in range(4):
        add("ok", f"n{i}.png", "normal", "train")
        add("nonormal", f"a{i}.png", "anomaly", "test", good_mask, "dent")
        add("noanom", f"n{i}.png", "normal", "train")
    add("ok", "a0.png", "anomaly", "test", good_mask, "dent")
    add("ok", "a1.png", "anomaly", "test", b"", "dent")  # no mask
    add("ok", "a2.png", "anomaly", "test", encode_png(np.zeros((8, 9), np.uint8)), "dent")
    add("ok", "a3.png", "anomaly", "test", good_mask, "dent")
    manifest = tmp_path / "m.parquet"
    write_manifest(pd.DataFrame(rows), str(manifest))
    cfg = Config()
    cfg.data = _data_cfg(manifest=str(manifest), seen_anomalies=1, val_seen_anomalies=0)
    cat = build_catalog(cfg, check_masks=True)
    assert cat.products == ["noanom", "ok"]
    text = "\n".join(cat.problems)
    assert "nonormal: no normal training images; product skipped" in text
    assert "noanom: no anomalous images" in text
    # a1 has no mask: an image-labelled seen defect, or a test anomaly for image metrics only
    seen_a1 = cat.df.loc[cat.df["image_uri"].str.endswith("a1.png"), "split"].item() == "seen"
    assert (("ok: 1 of 1 seen anomalies have no mask" in text) if seen_a1
            else ("ok: 1 test anomalies have no mask" in text and "a1.png" in text)), text
    assert "1 mask(s) do not match" in text and "a2.png" in text and "mask 9x8" in text
    assert "nonormal" not in set(cat.df["product"])
    # nothing trainable -> CatalogError listing why
    cfg.data.products = ["nonormal"]
    with pytest.raises(CatalogError, match="(?s)nothing trainable.*no normal training images"):
        build_catalog(cfg)
    with pytest.raises(CatalogError, match="none of data.products"):
        cfg.data.products = ["zzz"]
        build_catalog(cfg)
    with pytest.raises(CatalogError, match="set data.root"):
        build_catalog(Config())


# ----------------------------------------------------------------------------- paired masks


def _paired_tree(root: str) -> None:
    img = encode_png(np.zeros((12, 20), np.uint8))
    mask = encode_png(np.zeros((12, 20), np.uint8))
    layout = {"Good_A": 6, "Good_B": 4, "Scratch": 3, "Pit": 2}
    for cls, n in layout.items():
        for i in range(n):
            storage.write_bytes(storage.join(root, cls, "Imgs", f"id{i}.jpg"), img)
            if not (cls == "Pit" and i == 1):
                storage.write_bytes(storage.join(root, cls, "Imgs", f"id{i}.png"), mask)
    storage.write_bytes(storage.join(root, "Scratch", "Imgs", "orphan.png"), mask)
    storage.write_bytes(storage.join(root, "README.md"), b"# readme")


@pytest.fixture(params=["local", "s3"])
def paired_root(request, tmp_path, s3_bucket):
    root = str(tmp_path / "paired") if request.param == "local" else storage.join(s3_bucket, "pm")
    _paired_tree(root)
    return root


def test_paired_mask_manifest(paired_root):
    df = paired_mask_manifest(
        paired_root, None, product="tile", normal_dirs=["Good_A", "Good_B"], subdir="Imgs",
        test_normal_fraction=0.2,
    )
    base = storage.resolve(paired_root).uri()
    assert list(df.columns) == COLUMNS and set(df["product"]) == {"tile"}
    assert len(df) == 15
    normals = df[df["label"] == "normal"]
    assert len(normals) == 10 and set(normals["defect_type"]) == {"good"}
    assert normals["split"].value_counts().to_dict() == {"train": 8, "test": 2}
    anom = df[df["label"] == "anomaly"]
    assert anom["defect_type"].value_counts().to_dict() == {"Scratch": 3, "Pit": 2}
    assert set(anom["split"]) == {"test"}
    for row in df.itertuples():
        if row.image_uri == f"{base}/Pit/Imgs/id1.jpg":
            assert row.mask_uri == ""
        else:
            assert row.mask_uri == row.image_uri[:-4] + ".png"
    assert df.attrs["unpaired_masks"] == [f"{base}/Scratch/Imgs/orphan.png"]
    # deterministic, and subdir=None finds the same images at any depth
    again = paired_mask_manifest(paired_root, None, product="tile",
                                 normal_dirs=["Good_A", "Good_B"])
    pd.testing.assert_frame_equal(again, df)
    with pytest.raises(CatalogError, match="Nope"):
        paired_mask_manifest(paired_root, None, product="t", normal_dirs="Nope")
    with pytest.raises(ValueError, match="mask_suffix"):
        paired_mask_manifest(paired_root, None, product="t", normal_dirs="Good_A",
                             image_ext=(".png", ".jpg"))


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_manifest_cli(tmp_path, capsys):
    root = str(tmp_path / "paired")
    _paired_tree(root)
    out = tmp_path / "out" / "tile.parquet"
    rc = _load_job("make_manifest").main(
        ["paired-mask", "--root", root, "--product", "tile", "--normal", "Good_A,Good_B",
         "--out", str(out)]
    )
    assert rc == 0
    df = read_manifest(str(out))
    assert len(df) == 15 and (df["label"] == "anomaly").sum() == 5
    assert "15 images (1 anomalies without a mask)" in capsys.readouterr().out


@pytest.mark.realdata
def test_magnetic_tile_paired_manifest(tmp_path):
    root = shared_data("magnetic_tile")
    df = paired_mask_manifest(str(root), None, product="magnetic_tile", normal_dirs="MT_Free",
                              image_ext=".jpg", mask_ext=".png")
    counts = df.groupby(["label", "defect_type"]).size().to_dict()
    assert counts == {
        ("normal", "good"): 952,
        ("anomaly", "MT_Blowhole"): 115,
        ("anomaly", "MT_Break"): 85,
        ("anomaly", "MT_Crack"): 57,
        ("anomaly", "MT_Fray"): 32,
        ("anomaly", "MT_Uneven"): 103,
    }
    assert (df["mask_uri"] != "").all()  # every image has its mask...
    assert df.attrs["unpaired_masks"] == []  # ...and every mask its image
    assert (df["mask_uri"].str[:-4] == df["image_uri"].str[:-4]).all()
    assert set(df[df["label"] == "anomaly"]["split"]) == {"test"}
    # a manifest of it builds a catalog with the seen split
    uri = str(tmp_path / "mt.parquet")
    write_manifest(df, uri)
    cfg = Config()
    cfg.data = DataConfig(manifest=uri)
    cat = build_catalog(cfg, check_masks=False)
    assert cat.products == ["magnetic_tile"]
    assert len(cat.anomalies("magnetic_tile", "seen")) == 8
    assert len(cat.anomalies("magnetic_tile", "val")) == 2
    assert len(cat.anomalies("magnetic_tile", "test")) == 392 - 10
    # masks of a few anomalies decode against their images (soft edges binarised)
    rows = cat.anomalies("magnetic_tile", "test").head(4)
    batch = {c: rows[c].to_numpy(dtype=object) for c in COLUMNS}
    out = decode_batch(batch, data_cfg=DataConfig(), geometry=64)
    assert list(out["error"]) == [None] * 4
    assert out["mask"].max() == 1


@pytest.mark.parametrize("bad", ["../x", "a/b", "bad\tname", ".hidden", "x" * 129, "é",
                                 "line\nfeed", "..", "."])
def test_product_names_that_would_be_paths_are_skipped_and_reported(tmp_path, bad):
    rows = [{"product": p, "image_uri": f"{p.encode().hex()}_{i}.png", "label": "normal",
             "defect_type": "", "mask_uri": "", "split": "train"}
            for p in ("ok-1.b_2", bad) for i in range(2)]
    path = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    cat = build_catalog(Config(data=DataConfig(manifest=str(path), seen_anomalies=0,
                                               val_normal_fraction=0.0)))
    assert cat.products == ["ok-1.b_2"]
    assert set(cat.df["product"]) == {"ok-1.b_2"}
    assert any(f"product name {bad!r} is not allowed" in p for p in cat.problems)
    pd.DataFrame([r for r in rows if r["product"] == bad]).to_csv(path, index=False)
    with pytest.raises(CatalogError, match="nothing trainable"):
        build_catalog(Config(data=DataConfig(manifest=str(path), seen_anomalies=0)))


def test_empty_product_name_is_a_manifest_error(tmp_path):
    """An empty product never becomes a path: the manifest is rejected row by row (exit 2)."""
    rows = [{"product": p, "image_uri": f"{i}.png", "label": "normal", "defect_type": "",
             "mask_uri": "", "split": "train"} for i, p in enumerate(["ok", "", "ok"])]
    path = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(CatalogError, match="empty product"):
        build_catalog(Config(data=DataConfig(manifest=str(path), seen_anomalies=0)))


def _visa_tree(root: Path) -> None:
    """Two objects in VisA's layout: 3 train + 1 test normals and 2 test anomalies each."""
    split = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        anno = ["image,label,mask"]
        img_dir, mask_dir = root / obj / "Data" / "Images", root / obj / "Data" / "Masks"
        for i in range(4):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            split.append(f"{obj},{'train' if i < 3 else 'test'},normal,{rel},")
            anno.append(f"{rel},normal,")
        for i, label in enumerate(["chip", '"scratch,crack"']):
            rel, mrel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            split.append(f"{obj},test,anomaly,{rel},{mrel}")
            anno.append(f"{rel},{label},{mrel}")
        for d in (img_dir / "Normal", img_dir / "Anomaly", mask_dir / "Anomaly"):
            d.mkdir(parents=True)
        (root / obj / "image_anno.csv").write_text("\n".join(anno) + "\n")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(split) + "\n")


def test_visa_manifest_follows_the_official_split(tmp_path, capsys):
    root = tmp_path / "visa"
    _visa_tree(root)
    out = tmp_path / "visa.parquet"
    assert _load_job("make_manifest").main(["visa", "--root", str(root), "--out", str(out)]) == 0
    df = read_manifest(str(out))
    assert sorted(set(df["product"])) == ["candle", "pcb1"]
    for obj, rows in df.groupby("product"):
        by = rows.groupby(["split", "label"]).size().to_dict()
        assert by == {("train", "normal"): 3, ("test", "normal"): 1, ("test", "anomaly"): 2}, by
        anom = rows[rows["label"] == "anomaly"].sort_values("image_uri")
        # defect types from image_anno.csv, several joined by "+"; masks paired by the split file
        assert list(anom["defect_type"]) == ["chip", "scratch+crack"]
        assert [Path(u).name for u in anom["mask_uri"]] == ["000.png", "001.png"]
        assert all(f"/{obj}/Data/Masks/Anomaly/" in u for u in anom["mask_uri"])
        assert set(rows[rows["label"] == "normal"]["defect_type"]) == {"good"}
        assert (rows[rows["label"] == "normal"]["mask_uri"] == "").all()
    # only the objects asked for; an unknown one is named with the choices
    one = _load_job("make_manifest").main(
        ["visa", "--root", str(root), "--objects", "pcb1", "--out", str(tmp_path / "p.parquet")])
    assert one == 0 and set(read_manifest(str(tmp_path / "p.parquet"))["product"]) == {"pcb1"}
    capsys.readouterr()
    assert run_job(_load_job("make_manifest").main, [
        "visa", "--root", str(root), "--objects", "pcb9", "--out", str(tmp_path / "q.parquet")]) == 2
    err = capsys.readouterr().err
    assert "pcb9" in err and "candle" in err and "Traceback" not in err


def test_visa_manifest_without_its_split_file_says_which(tmp_path, capsys):
    (tmp_path / "visa").mkdir()
    rc = run_job(_load_job("make_manifest").main, [
        "visa", "--root", str(tmp_path / "visa"), "--out", str(tmp_path / "v.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and "1cls.csv" in err and "--split-csv" in err, err


@pytest.mark.realdata
def test_visa_macaroni1_manifest_has_the_official_split():
    df = visa_manifest(str(shared_data("visa_macaroni1")))
    counts = df.groupby(["split", "label"]).size().to_dict()
    assert counts == {("train", "normal"): 900, ("test", "normal"): 100, ("test", "anomaly"): 100}
    anom = df[df["label"] == "anomaly"]
    assert (anom["mask_uri"] != "").all() and (anom["defect_type"] != "anomaly").all()
    assert all(Path(u).is_file() for u in [*df["image_uri"][:5], *anom["mask_uri"][:5]])


def test_elpv_manifest_follows_the_stated_protocol(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    lines = []
    for i in range(40):
        prob = [0.0, 0.0, 1.0, 1 / 3, 2 / 3][i % 5]
        cell = "mono" if i < 20 else "poly"
        (tmp_path / "images" / f"cell{i:04d}.png").write_bytes(b"")
        lines.append(f"images/cell{i:04d}.png  {prob}  {cell}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "elpv.parquet"
    rc = _load_job("make_manifest").main(["elpv", "--labels", str(tmp_path / "labels.csv"),
                                          "--out", str(out)])
    assert rc == 0 and "left out 16 cells" in capsys.readouterr().out
    df = read_manifest(str(out))
    assert sorted(set(df["product"])) == ["elpv_mono", "elpv_poly"]
    for _, rows in df.groupby("product"):
        by = rows.groupby(["split", "label"]).size().to_dict()
        # 8 normals (30 % test: round(2.4) = 2), 4 defective cells, all of them test
        assert by == {("train", "normal"): 6, ("test", "normal"): 2, ("test", "anomaly"): 4}, by
        assert (rows["mask_uri"] == "").all()  # image labels only
        assert set(rows[rows["label"] == "anomaly"]["defect_type"]) == {"defective"}
    assert all(Path(u).is_file() for u in df["image_uri"])  # resolved against labels.csv
    again = elpv_manifest(str(tmp_path / "labels.csv"))  # the split is fixed by the seed
    assert again.equals(elpv_manifest(str(tmp_path / "labels.csv")))
    assert list(again.sort_values("image_uri")["split"]) == list(
        df.sort_values("image_uri")["split"])
    (tmp_path / "bad.csv").write_text("images/cell0000.png mono\n")
    capsys.readouterr()
    assert run_job(_load_job("make_manifest").main, [
        "elpv", "--labels", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "b.csv")]) == 2
    err = capsys.readouterr().err
    assert "line 1" in err and "Traceback" not in err
