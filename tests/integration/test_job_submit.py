"""`ray job submit` to a head started by the test, exactly as a cluster user runs the job.

The head runs with token authentication (Ray's default); the test generates its own token and
hands it to `ray start` and `ray job submit` through RAY_AUTH_TOKEN. The S3 endpoint and
credentials are in the head's environment (the README's advice for a cluster), never on the
job's command line.
The working directory upload stays small thanks to .rayignore.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import REPO, free_port, new_bucket

from prn_ray import registry, storage
from prn_ray.config import load_config
from prn_ray.demo_data import make_dataset

pytestmark = pytest.mark.timeout(900)
BIN = Path(sys.executable).parent


def _ray(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _stop_head(temp_dir: str) -> None:
    """Stop only this head: its processes carry its temp dir on their command line.

    (`ray stop` would also stop the local Ray that other tests in this session share.)
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if temp_dir.encode() in (proc / "cmdline").read_bytes():
                        pids.append(int(proc.name))
                except OSError:
                    continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not pids:
            return
        time.sleep(3)


@pytest.fixture
def head(s3_endpoint):
    """A Ray head on free loopback ports with token auth; stopped afterwards. The object
    storage's credentials and endpoint are in the head's own environment (as the README asks
    of a cluster), so no job carries them on its command line."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # AF_UNIX paths must stay short
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    # Every agent gets its own free port: the defaults (e.g. the dashboard agent's 52365) are
    # already bound by the local Ray the other tests share, and an agent that cannot bind dies
    # silently, leaving the head answering "No available agent" forever.
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}",
                   f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}",
                   f"--metrics-export-port={free_port()}"]
    started = _ray(["start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
                    *agent_ports, f"--temp-dir={temp_dir}", "--disable-usage-stats"], env, 180)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield f"http://127.0.0.1:{dash}", env, temp_dir
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_and_registers(head, s3_endpoint):
    address, env, temp_dir = head
    bucket = new_bucket(s3_endpoint, "submit")
    make_dataset(f"{bucket}/data", products=("fabric",), n_train=12, n_good_test=2,
                 n_defect_test=6, image_size=64)
    runtime_env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}
    overrides = [f"data.root={bucket}/data", f"storage.models_uri={bucket}/models",
                 f"storage.runs_uri={bucket}/runs", "train.epochs=1"]
    cmd = ["job", "submit", f"--address={address}", "--working-dir=.",
           f"--runtime-env-json={json.dumps(runtime_env)}", "--",
           sys.executable, "jobs/train_all.py", "--config", "configs/tiny.yaml"]
    for o in overrides:
        cmd += ["--set", o]
    assert not any(os.environ["AWS_SECRET_ACCESS_KEY"] in c for c in cmd)  # not on the line
    # The head's job agent comes up some seconds after `ray start` (a minute or more on a
    # loaded machine); until then the server answers 500 "No available agent".
    deadline = time.time() + 300
    while True:
        done = _ray(cmd, env, 800)
        out = done.stdout + done.stderr
        if "No available agent" not in out or time.time() > deadline:
            break
        time.sleep(3)
    if "No available agent" in out:  # say why the agent is missing, not just that it is
        logs = sorted(Path(temp_dir).glob("session_*/logs/dashboard_agent.log"))
        out += "\n--- dashboard_agent.log ---\n" + (logs[-1].read_text()[-3000:] if logs else "")
    assert done.returncode == 0, out[-6000:]
    assert "succeeded" in out
    assert "[fabric] registered version" in out
    # The secret never appears in the job's output.
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in out
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    mv = registry.load(cfg.storage, "fabric")
    assert storage.read_text(f"{bucket}/models/fabric/LATEST").strip() == mv.version
    assert mv.metrics["epochs"] == 1
