"""Shared fixtures: a real S3 server on loopback (moto_server) and a real local Ray.

Nothing here mocks S3 or Ray: the S3 fixture starts the ``moto_server`` executable on a free
loopback port and points the standard AWS environment variables at it; the Ray fixture starts a
real local Ray with a fixed CPU count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, new_bucket, wait_port

# Dummy credentials for the loopback server; set before anything imports boto/pyarrow S3.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# Tests must not try to reach the internet for weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a real S3 API server (moto) on a free loopback port, for the whole session."""
    # The interpreter's own moto first: a `moto_server` earlier on PATH may be another install.
    local = Path(sys.executable).parent / "moto_server"
    exe = str(local) if local.exists() else shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found: install the dev extra (pip install -e '.[dev]')")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        url = f"http://127.0.0.1:{port}"
        old = os.environ.get("AWS_ENDPOINT_URL")
        os.environ["AWS_ENDPOINT_URL"] = url
        yield url
        if old is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = old
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the loopback server; yields ``s3://<bucket>``."""
    yield new_bucket(s3_endpoint)


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A real local Ray (2 CPUs) shared by the tests of one session.

    Started after the S3 server so its workers inherit the endpoint and test credentials. The
    dashboard (127.0.0.1) serves the State API that Ray Train uses to release the placement
    groups of trainers stopped by Tune.
    """
    import ray

    if ray.is_initialized():
        # A Ray that an earlier test's in-process job started: its workers lack the S3
        # endpoint and credentials of this session (and the dashboard): start this one anew.
        ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": _ray_env()},
    )
    yield ray
    ray.shutdown()


def _ray_env() -> dict[str, str]:
    keys = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "HF_HUB_OFFLINE",
    )
    return {k: os.environ[k] for k in keys if k in os.environ}
