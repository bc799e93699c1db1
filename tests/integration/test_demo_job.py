"""The README's first command, ``jobs/demo.py``, end to end in a fresh directory.

Run as a real process with the demo config's *relative* local paths (``demo_data``,
``runs/demo/...``), shrunk to 2 products, 64 px and 2 epochs. Ray Tune runs each product's trial
in its own working directory, so this is also the test that relative paths land where the
user ran the command, not inside Ray's session folder. Its console is the user's first
impression: a short story (train -> score -> evaluate -> report) without one line of Ray's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO

from prn_ray.scoring import read_scores

pytestmark = pytest.mark.timeout(900)

# What Ray prints when it is not told to be quiet (log records, C++ error lines, raylet
# warnings, Python warnings, tracebacks, Tune's tables, Ray Data's progress).
RAY_NOISE = re.compile(r"(?i:warning)|\bINFO\b|\bERROR\b|\] E |core_worker|\(raylet\)|Traceback|"
                       r"Warning:|DeprecationWarning|Checkpoint successfully|View detailed "
                       r"results|execution finished|Progress bars")
# The story, in order (2 products: at most ~40 lines; the 4-product demo stays under 60).
STORY = ["[demo] 1/4", "[demo] 2/4", "[train_all] run", "registered version", "[demo] 3/4",
         "[score] staged", "[demo] scoring run", "[demo] 4/4", "test: image_auroc", "| **Mean**",
         "[demo] done", "[demo] report:", "[demo] nightly scores vs ground truth"]


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
    # The console: short, a story, nothing of Ray's.
    lines = out.splitlines()
    assert len(lines) <= 45, f"{len(lines)} console lines:\n{out}"
    noise = [line for line in lines if RAY_NOISE.search(line)]
    assert not noise, "\n".join(noise) + "\n\nwhole console:\n" + out
    pos = [next((i for i, line in enumerate(lines) if step in line), -1) for step in STORY]
    assert -1 not in pos and pos == sorted(pos), list(zip(STORY, pos))
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
