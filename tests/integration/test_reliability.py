"""What a nightly scoring job meets on a real plant, end to end on the loopback S3 server and a
real local Ray: flaky object storage (tests/faultproxy.py in front of moto_server), permanent
faults on some keys, two runs of one date at once, and product folders that may not be paths.

One small world for the module: a ``fabric`` model trained for one epoch at 64 px (random
backbone: only the machinery matters), 24 input images, one folder with a bad product name.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from faultproxy import FaultProxy
from helpers import REPO, TINY, new_bucket

from prn_ray import registry, storage
from prn_ray.cli import Exit
from prn_ray.config import load_config
from prn_ray.data.catalog import build_catalog
from prn_ray.demo_data import make_dataset, render
from prn_ray.engine.local import train_local
from prn_ray.geometry import Geometry
from prn_ray.images import encode_png
from prn_ray.scoring import lease as sc_lease
from prn_ray.scoring import run as sc_run
from prn_ray.scoring import table as sc_table

DATE = "2024-06-01"
FAST_RETRIES = ["storage.retries=8", "storage.retry_max_s=0.05"]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def world(s3_endpoint, ray_local):
    bucket = new_bucket(s3_endpoint, "reliab")
    torch.set_num_threads(1)
    make_dataset(f"{bucket}/train", products=("fabric",), n_train=8, n_good_test=0,
                 n_defect_test=6, image_size=64)
    models = f"{bucket}/models"
    cfg = load_config(TINY, [f"data.root={bucket}/train", f"storage.models_uri={models}",
                             "train.epochs=1"])
    trainer, backbone = train_local(cfg, build_catalog(cfg).df, "fabric")
    registry.publish(cfg, "fabric", head_state=trainer.best,
                     backbone_state=backbone.state_dict(), geometry=Geometry((64, 64)),
                     calibration=trainer.state.calibration, metrics={})
    images = {}
    for i in range(20):
        images[f"{bucket}/incoming/fabric/good_{i:02d}.png"] = "fabric"
    for i in range(4):
        images[f"{bucket}/incoming/fabric/defect_{i}.png"] = "fabric"
    images[f"{bucket}/incoming/-bad name/x.png"] = sc_table.INVALID_PRODUCT
    for k, uri in enumerate(images):
        img, _ = render("fabric", 64, 7, 1 if "good" in uri else 2, k,
                        None if "good" in uri else "scratch")
        storage.write_bytes(uri, encode_png(img))
    return {"bucket": bucket, "models": models, "images": images,
            "input": f"{bucket}/incoming", "endpoint": s3_endpoint}


def _cfg(world, output: str, *extra: str):
    return load_config(TINY, [f"storage.models_uri={world['models']}",
                              f"score.output_uri={output}", *FAST_RETRIES, *extra])


def _rows(output: str) -> pd.DataFrame:
    df = sc_table.read_scores(output, date=DATE, columns=["product", "image_uri", "score",
                                                          "error"])
    return df.sort_values("image_uri").reset_index(drop=True)


def _check_one_row_per_image(df: pd.DataFrame, world) -> None:
    assert len(df) == len(world["images"]), (len(df), len(world["images"]))
    assert not df.duplicated("image_uri").any()
    assert dict(zip(df["image_uri"], df["product"])) == world["images"]


@pytest.fixture(scope="module")
def clean(world):
    out = f"{world['bucket']}/clean"
    summary = sc_run.score(_cfg(world, out), world["input"], date=DATE)
    df = _rows(out)
    _check_one_row_per_image(df, world)
    bad = df[df["product"] == sc_table.INVALID_PRODUCT]
    assert len(bad) == 1 and bad["error"].iloc[0].startswith("bad_product_name: ")
    assert "'-bad name'" in bad["error"].iloc[0]
    assert df[df["product"] == "fabric"]["error"].isna().all()
    assert summary.status == "partial" and summary.errors_by_reason == {"bad_product_name": 1}
    # The bad name became no path: only the reserved partition holds its row.
    parts = {p.product for p in sc_table.committed_partitions(out, date=DATE)}
    assert parts == {"fabric", sc_table.INVALID_PRODUCT}
    return df


def test_transient_faults_lose_nothing(world, clean):
    """≈ 5 % of requests fail (503 SlowDown or a connection dropped mid-response): the run
    ends with exactly the clean run's rows (no image lost, no error row, no duplicate)."""
    out = f"{world['bucket']}/flaky"
    with FaultProxy(world["endpoint"], rate=0.05, seed=15) as proxy:
        summary = sc_run.score(_cfg(world, out, f"storage.endpoint_url={proxy.url}"),
                               world["input"], date=DATE)
    faults = proxy.counts["status503"] + proxy.counts["drop"]
    assert faults >= 3, proxy.counts
    df = _rows(out)
    _check_one_row_per_image(df, world)
    pd.testing.assert_series_equal(df["error"], clean["error"])
    np.testing.assert_allclose(df["score"].astype(float), clean["score"].astype(float),
                               atol=1e-5)
    assert summary.errors_by_reason == {"bad_product_name": 1}
    assert 1 <= summary.retried_requests <= faults, (summary.retried_requests, proxy.counts)


def test_permanent_faults_fail_only_their_images(world, clean):
    """A key that always answers 500 and one that answers 403: those two images, and only
    those, become error rows, each saying how many tries were made."""
    out = f"{world['bucket']}/perm"
    broken = f"{world['input']}/fabric/good_03.png"
    denied = f"{world['input']}/fabric/defect_1.png"
    with FaultProxy(world["endpoint"], permanent={"fabric/good_03.png": 500,
                                                  "fabric/defect_1.png": 403}) as proxy:
        summary = sc_run.score(_cfg(world, out, f"storage.endpoint_url={proxy.url}",
                                    "storage.retries=3"), world["input"], date=DATE)
    df = _rows(out)
    _check_one_row_per_image(df, world)
    errors = df.set_index("image_uri")["error"]
    assert errors[broken].startswith("unreadable: ") and "[4 tries]" in errors[broken]
    assert errors[denied].startswith("unreadable: ") and "[1 try]" in errors[denied]
    assert "ACCESS_DENIED" in errors[denied]
    others = df[~df["image_uri"].isin([broken, denied])].reset_index(drop=True)
    expected = clean[~clean["image_uri"].isin([broken, denied])].reset_index(drop=True)
    pd.testing.assert_series_equal(others["error"], expected["error"])
    np.testing.assert_allclose(others["score"].astype(float), expected["score"].astype(float),
                               atol=1e-5)
    assert summary.errors_by_reason == {"bad_product_name": 1, "unreadable": 2}
    assert summary.retried_requests >= 3  # the 500 key's retries (the 403 one: none)
    assert proxy.counts["status403"] == 1  # never retried


# ----------------------------------------------------------------------------- two runs


def _job_args(world, output: str, *extra: str) -> list[str]:
    sets = [f"storage.models_uri={world['models']}", f"score.output_uri={output}",
            *FAST_RETRIES, *extra]
    # debug: the per-partition "committed" lines the two-runs test times are detail lines
    return ["--config", str(TINY), "--input", world["input"], "--date", DATE,
            "--log-level", "debug", *[a for s in sets for a in ("--set", s)]]


def _start_job(args: list[str], endpoint: str) -> tuple[subprocess.Popen, list]:
    """The score job as a process of its own, talking to object storage at ``endpoint``."""
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    args = [*args, "--set", f"storage.endpoint_url={endpoint}"]
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "score.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=str(REPO))
    lines: list[tuple[float, str]] = []  # (when it arrived, line)

    def pump():
        for line in proc.stdout:
            lines.append((time.monotonic(), line))

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _poll_readers(procs, out: str, world) -> tuple[list[dict], list[str]]:
    """Read the date's scores as a reader would until every job exits: the committed
    markers seen at each read, and anything a reader should never see."""
    seen, problems = [], []
    while any(p.poll() is None for p, _ in procs):
        try:
            df = sc_table.read_scores(out, date=DATE, columns=["product", "image_uri"])
            markers = {p.product: p.marker["run_id"]
                       for p in sc_table.committed_partitions(out, date=DATE)}
        except Exception as exc:  # noqa: BLE001 - a reader error is what must never happen
            problems.append(repr(exc))
            continue
        for product, group in df.groupby("product"):
            want = sorted(u for u, p in world["images"].items() if p == product)
            if sorted(group["image_uri"]) != want:
                problems.append(f"{product}: {len(group)} rows")
        seen.append(markers)
        time.sleep(0.3)
    time.sleep(0.5)  # the pumps read the last lines
    return seen, problems


def test_two_runs_of_one_date_never_interleave_commits(world, clean):
    """Two real jobs of the same date: A stages, takes the date's leases and commits through
    an object store whose copies into the date's partitions take 60 s each (the fault proxy);
    B, started once A is committing, stages and finds the leases taken: it waits, then
    commits after A's last commit. Readers polling all along only ever see whole runs, and the
    end state is one run's complete output."""
    out = f"{world['bucket']}/twice"
    args = _job_args(world, out, "score.lease_wait_s=400")
    slow = FaultProxy(world["endpoint"], slow_copies={f"date={DATE}/product=": 60.0})
    quick = FaultProxy(world["endpoint"], slow_copies={f"date={DATE}/product=": 1.0})
    with slow, quick:
        a = _start_job(args, slow.url)
        deadline = time.time() + 300
        while not any("committing" in line for _, line in a[1]):
            assert a[0].poll() is None and time.time() < deadline, "".join(x for _, x in a[1])
            time.sleep(0.5)
        procs = [a, _start_job(args, quick.url)]
        seen, problems = _poll_readers(procs, out, world)
    assert slow.counts["slow_copies"] and quick.counts["slow_copies"]
    logs = ["".join(line for _, line in lines) for _, lines in procs]
    assert [p.returncode for p, _ in procs] == [Exit.PARTIAL] * 2, logs  # the bad name
    assert not problems, problems[:5]
    assert "waiting up to" in logs[1], logs[1][-3000:]  # B really waited for A
    df = _rows(out)
    _check_one_row_per_image(df, world)
    final = {p.product: p.marker["run_id"] for p in sc_table.committed_partitions(out, date=DATE)}
    assert len(set(final.values())) == 1  # every partition from one run
    assert len(seen) > 3 and len({r for m in seen for r in m.values()}) <= 2
    # The commits did not overlap: one run's first commit came after the other's last.
    spans = [(min(t for t, line in lines if "committed" in line),
              max(t for t, line in lines if "committed" in line)) for _, lines in procs]
    assert spans[0][1] < spans[1][0], spans
    b_run = next(line for _, line in procs[1][1] if " run score-" in line).split(" run ")[1]
    assert set(final.values()) == {b_run.split()[0]}  # the later run's output
    assert not storage.list_files(f"{out}/_leases")  # both released


def test_busy_partition_exits_4_and_commits_nothing(world, clean, capsys):
    """Another run holds the date's lease longer than score.lease_wait_s: exit 4, one error
    line, nothing committed, no staging left."""
    out = f"{world['bucket']}/busy"
    spec = importlib.util.spec_from_file_location("score_job", REPO / "jobs" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with sc_lease.hold_partitions(out, None, DATE, ["fabric"], "score-other-run", ttl_s=60,
                                  wait_s=0):
        rc = module.main(_job_args(world, out, "score.lease_wait_s=1"))
    err = capsys.readouterr().err
    assert rc == Exit.BUSY, err
    assert "another run holds a partition" in err and "score-other-run" in err
    assert sc_table.read_scores(out, date=DATE).empty
    assert not storage.list_files(f"{out}/_staging")
