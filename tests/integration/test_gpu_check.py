"""benchmarks/gpu_check.sh, the prepared GPU measurement, must keep working where no GPU is:
its --dry-run runs every part (scoring alone and through the job, training steps at both
configs, parity) on the CPU at tiny sizes, and without --dry-run on a CPU-only machine it
refuses with exit 2 instead of measuring the CPU as if it were the GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prn_ray.cli import Exit

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.timeout(600)


def run(args, tmp_path, timeout):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_dry_run_measures_every_part(tmp_path):
    out = tmp_path / "figures.json"
    proc = run(["--dry-run", "--out", str(out)], tmp_path, 540)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures["dry_run"] is True
    where = {(r["input"].split(",")[0], r["where"]) for r in figures["scoring"]}
    assert where == {("256x256", "model alone"), ("256x256", "scoring job"),
                     ("1500x1000", "model alone"), ("1500x1000", "scoring job")}
    tiled = [r for r in figures["scoring"] if r["input"].startswith("1500x1000")]
    # the tiled input is cut into several views per image by cpu.yaml's auto rule
    assert all(r["views_per_s"] > 2 * r["images_per_s"] for r in tiled)
    assert all(r["images_per_s"] > 0 and r["mp_per_s"] > 0 for r in figures["scoring"])
    assert [t["config"] for t in figures["training"]] == ["paper.yaml", "cpu.yaml"]
    assert [t["backbone"] for t in figures["training"]] == ["resnet18", "tf_efficientnet_lite0"]
    assert all(t["s_per_step"] > 0 for t in figures["training"])
    for title in ("## Scoring", "## Training step", "## Parity"):
        assert title in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_gpu_it_refuses(tmp_path):
    proc = run([], tmp_path, 120)
    assert proc.returncode == Exit.INPUT
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
