"""Wrong invocations of the real CLIs exit 2 with an ``error:`` line, no traceback, and before
a Ray session starts (subprocesses; no Ray is started by this test either)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, TINY

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bad_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "bad.yaml"
    path.write_text("train:\n  epochs: [1\n")
    return str(path)


CASES = [
    ("jobs/train_all.py", ["--set", "train.epoch=5"], "unknown key(s) train.epoch"),
    ("jobs/train_all.py", ["--set", "train.epochs=abc"], "train.epochs: expected an integer"),
    ("jobs/train_all.py", ["--set", "data.root=/nonexistent/prn-ray"], "no files under"),
    ("jobs/train_all.py", ["--config", "/nonexistent/prn.yaml"], "config /nonexistent/prn.yaml"),
    ("jobs/train_all.py", ["--config", "BAD_YAML"], "not valid YAML"),
    ("tune/search.py", ["--set", "tune.num_samples=2"], "no data: set data.root"),
    ("jobs/evaluate.py", ["--set", "train.lr=fast"], "train.lr: expected a number"),
    ("jobs/score.py", ["--input", "x", "--set", "score.nope=1"], "unknown key(s) score.nope"),
]


@pytest.mark.parametrize("script,args,message", CASES)
def test_wrong_invocation_exits_2_with_one_line(script, args, message, bad_yaml, tmp_path):
    args = [bad_yaml if a == "BAD_YAML" else a for a in args]
    base = ["--config", str(TINY)] if "--config" not in args else []
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *base, *args,
         "--set", f"storage.runs_uri={tmp_path}/runs", "--set", f"storage.models_uri={tmp_path}/m"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    assert "Started a local Ray" not in out and "ray.init" not in out, out[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert message in errors[0], errors[0]
