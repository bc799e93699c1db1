"""The README's first command, ``jobs/demo.py``, end to end in a fresh directory.

Run as a real process with the demo config's *relative* local paths (``demo_data``,
``runs/demo/...``), shrunk to 2 products, 64 px and 2 epochs. Ray Tune runs each product's trial
in its own working directory, so this is also the test that relative paths land where the
user ran the command, not inside Ray's session folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO

from prn_ray.scoring import read_scores

pytestmark = pytest.mark.timeout(900)


def test_demo_runs_end_to_end_with_relative_paths(tmp_path: Path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(REPO / "jobs" / "demo.py"), "--products", "fabric,wood_panel",
           "--n-train", "10", "--set", "data.image_size=64", "--set", "train.epochs=2",
           "--set", "train.val_every_epochs=1", "--set", "ray.num_cpus=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=840)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # Everything lives under the directory the command ran in.
    for product in ("fabric", "wood_panel"):
        latest = tmp_path / "runs" / "demo" / "models" / product / "LATEST"
        assert latest.is_file(), out[-3000:]
        version = latest.read_text().strip()
        assert (latest.parent / version / "model.safetensors").is_file()
    summaries = list((tmp_path / "runs" / "demo" / "models" / "_runs").glob("*.json"))
    assert len(summaries) == 1
    doc = json.loads(summaries[0].read_text())
    assert sorted(p["status"] for p in doc["products"]) == ["ok", "ok"]
    # Nightly scores: one row per test image of the two products, committed.
    scores = read_scores(str(tmp_path / "runs" / "demo" / "scores"))
    warehouse = pd.read_csv(tmp_path / "runs" / "demo" / "train" / "warehouse.csv")
    assert sorted(scores["image_uri"]) == sorted(warehouse["image_uri"])
    assert scores["error"].isna().all()
    # Evaluation tables and the report the demo points to.
    report = [line for line in out.splitlines() if "[demo] report:" in line]
    assert report, out[-3000:]
    path = Path(report[-1].split("report:", 1)[1].strip())
    assert path.is_file() and path.is_relative_to(tmp_path)
    results = json.loads((path.parent / "results.json").read_text())
    assert set(results["products"]) == {"fabric", "wood_panel"}
    assert not any((tmp_path / "runs").rglob("working_dirs"))  # nothing from Ray's folders
