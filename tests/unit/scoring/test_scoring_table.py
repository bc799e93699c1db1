"""The scores contract without Ray: the commit protocol's crash points, readers trusting only
``_SUCCESS`` markers, listing of scoring inputs."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prn_ray import storage
from prn_ray.images import encode_png
from prn_ray.scoring import commit as sc_commit
from prn_ray.scoring import inputs as sc_inputs
from prn_ray.scoring import table as sc_table

DATE = "2024-05-01"


def _table(product: str, uris: list[str], run: str) -> pa.Table:
    n = len(uris)
    return pa.table({
        "product": [product] * n, "image_uri": uris,
        "score": pa.array(np.linspace(0, 1, n), pa.float32()),
        "is_anomaly": [False] * n, "threshold": pa.array([0.5] * n, pa.float32()),
        "anomaly_map_png": [encode_png(np.zeros((8, 8), np.uint8))] * n,
        "height": pa.array([8] * n, pa.int32()), "width": pa.array([8] * n, pa.int32()),
        "model_version": [run] * n,
        "scored_at": pa.array([pd.Timestamp("2024-05-01", tz="UTC")] * n,
                              pa.timestamp("us", tz="UTC")),
        "error": pa.nulls(n, pa.string()),
    }, schema=sc_table.SCORE_SCHEMA)


def _stage(root: str, name: str, table: pa.Table) -> str:
    path = os.path.join(root, "_staging", name + ".parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)
    return path


def test_commit_protocol_crash_points(tmp_path, monkeypatch):
    """Fail each storage step of a commit in turn (as a kill there would): read_scores always
    returns one complete run of the partition, never a mix, and the next commit removes every
    stray file."""
    out = str(tmp_path / "scores")
    uris = [f"s3://b/img{i}.png" for i in range(5)]

    def commit(tag: str, version: str) -> dict:
        staged = [_stage(out, f"{tag}-{k}", _table("p", uris[k::2], version)) for k in (0, 1)]
        return sc_commit.commit_partition(out, None, date=DATE, product="p", staged=staged,
                                        run_id=f"run-{tag}")

    commit("old", "old")
    # (module, function, which call fails, what a reader sees afterwards)
    cases = [(storage, "copy_file", 2, "old"),  # second new file not copied yet
             (storage, "write_text", 1, "old"),  # the marker (commit point) not written
             (storage, "delete_file", 1, "new")]  # committed; the old files not yet removed
    for module, name, fail_at, expected in cases:
        real, calls = getattr(module, name), {"n": 0}

        def flaky(*a, _real=real, _calls=calls, _at=fail_at, **k):
            _calls["n"] += 1
            if _calls["n"] == _at:
                raise OSError("killed here")
            return _real(*a, **k)

        monkeypatch.setattr(module, name, flaky)
        with pytest.raises(OSError, match="killed here"):
            commit(f"{name}", "new")
        monkeypatch.undo()
        df = sc_table.read_scores(out)
        assert sorted(df["image_uri"]) == sorted(uris), name  # complete: never a mix
        assert df["model_version"].unique().tolist() == [expected], name
        if expected == "new":
            commit("old2", "old")  # back to the old run for the next crash point
    # A clean commit leaves exactly the files its marker lists.
    marker = commit("final", "final")
    pdir = sc_table.partition_uri(out, DATE, "p")
    assert sorted(os.listdir(pdir)) == sorted(["_SUCCESS", *[f["name"] for f in marker["files"]]])
    assert marker["rows"] == len(uris)
    assert sc_table.read_scores(out)["model_version"].unique().tolist() == ["final"]


def test_read_scores_trusts_only_success_markers(tmp_path):
    out = str(tmp_path / "scores")
    a = _stage(out, "a", _table("a", ["u1", "u2"], "v1"))
    sc_commit.commit_partition(out, None, date=DATE, product="a", staged=[a], run_id="r1")
    # A partition without a marker (a run died before its commit point) ...
    half = tmp_path / "scores" / f"date={DATE}" / "product=b"
    half.mkdir(parents=True)
    pq.write_table(_table("b", ["u3"], "v1"), half / "part-x.parquet")
    # ... and a stray file in a committed partition.
    pq.write_table(_table("a", ["u9"], "v1"),
                   tmp_path / "scores" / f"date={DATE}" / "product=a" / "stray.parquet")
    df = sc_table.read_scores(out)
    assert sorted(df["image_uri"]) == ["u1", "u2"]
    assert list(df.columns) == [*sc_table.COLUMNS, "date"] and set(df["date"]) == {DATE}
    assert str(df["height"].dtype) == "Int32" and str(df["is_anomaly"].dtype) == "boolean"
    assert sc_table.read_scores(out, products=["b"]).empty
    assert sc_table.read_scores(out, date="2030-01-01").empty
    few = sc_table.read_scores(out, columns=["image_uri", "score"])
    assert list(few.columns) == ["image_uri", "score", "date"]
    # A product name that may not be a path never becomes a partition directory.
    c = _stage(out, "c", _table("line 3/a=b", ["u5"], "v1"))
    for bad in ["line 3/a=b", "../x", "", "a\nb", "."]:
        with pytest.raises(ValueError, match="not allowed"):
            sc_commit.commit_partition(out, None, date=DATE, product=bad, staged=[c],
                                       run_id="r2")
    assert sorted(os.listdir(tmp_path / "scores" / f"date={DATE}")) == ["product=a", "product=b"]


def test_list_inputs_prefix_and_manifest(tmp_path):
    root = tmp_path / "in"
    for rel in ["fab/a/1.png", "fab/2.JPG", "wood/3.png", "wood/_tmp/4.png", "wood/.x.png",
                "loose.png", "fab/readme.txt"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    df = sc_inputs.list_inputs(str(root))
    assert df["product"].tolist() == ["fab", "fab", "wood"]
    assert [u.rsplit("/", 1)[1] for u in df["image_uri"]] == ["2.JPG", "1.png", "3.png"]
    assert df.attrs["ignored"] == {"not an image extension": 1, "not under a product folder": 1}
    assert sc_inputs.list_inputs(str(root), products=["wood"])["product"].tolist() == ["wood"]
    pd.DataFrame({"product": ["fab", "fab", "wood"],
                  "image_uri": ["fab/a/1.png", "fab/a/1.png", str(root / "wood/3.png")]}
                 ).to_parquet(root / "m.parquet")
    m = sc_inputs.list_inputs(str(root / "m.parquet"))
    assert m["image_uri"].tolist() == [str(root / "fab/a/1.png"), str(root / "wood/3.png")]
    assert m.attrs["ignored"] == {"duplicate (product, image_uri)": 1}
    (root / "bad.csv").write_text("image_uri\nx.png\n")
    with pytest.raises(sc_table.ScoringError, match="missing column"):
        sc_inputs.list_inputs(str(root / "bad.csv"))
    with pytest.raises(ValueError):
        sc_table.check_date("2024-02-30")


BAD_NAMES = ["../x", "a/b", "", "line\nfeed", "..", "-dash", "x" * 129]


def test_bad_product_names_become_invalid_rows_never_paths(tmp_path):
    """Manifest rows with names that may not be paths: product ``_invalid`` and a
    ``bad_product_name`` error naming them (escaped); good names pass untouched."""
    uris = [f"s3://b/img{i}.png" for i in range(len(BAD_NAMES) + 2)]
    pd.DataFrame({"product": [*BAD_NAMES, "fab", "fab.v2_x-1"], "image_uri": uris}
                 ).to_parquet(tmp_path / "m.parquet")
    df = sc_inputs.list_inputs(str(tmp_path / "m.parquet"))
    assert len(df) == len(uris)
    good = df[df["error"].isna()]
    assert sorted(good["product"]) == ["fab", "fab.v2_x-1"]
    bad = df[df["error"].notna()].set_index("image_uri")
    assert set(bad["product"]) == {sc_table.INVALID_PRODUCT}
    for name, uri in zip(BAD_NAMES, uris):
        err = bad.loc[uri, "error"]
        assert err.startswith("bad_product_name: ") and repr(name) in err
        assert "\n" not in err  # the newline is escaped, never written raw
    assert sc_table.partition_uri("out", DATE, sc_table.INVALID_PRODUCT).endswith(
        "product=_invalid")


def test_bad_product_folders(s3_bucket, tmp_path):
    """Input folders whose names may not be paths (S3: '-x', 'a b'; locally also a newline):
    error rows under ``_invalid``, the good folder untouched. ('..' and empty folders cannot be
    stored: HTTP clients and filesystems normalise them away; the manifest test covers them.)"""
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for key in ["in/-x/2.png", "in/a b/3.png", "in/ok/4.png"]:
        s3.put_object(Bucket=s3_bucket[len("s3://"):], Key=key, Body=b"x")
    for name in ["-x", "li\nne", "ok"]:
        (tmp_path / "in" / name).mkdir(parents=True)
        (tmp_path / "in" / name / "1.png").write_bytes(b"x")
    for root in (f"{s3_bucket}/in", str(tmp_path / "in")):
        df = sc_inputs.list_inputs(root)
        assert len(df) == 3
        ok = df[df["error"].isna()]
        assert ok["product"].tolist() == ["ok"]
        bad = df[df["error"].notna()]
        assert set(bad["product"]) == {sc_table.INVALID_PRODUCT}
        assert all(e.startswith("bad_product_name: ") for e in bad["error"])
