"""Logging set-up, progress levels and rate-limited progress lines (no Ray)."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys

import pytest
import yaml
from helpers import REPO

from prn_ray import console
from prn_ray.synthesis.textures import PNG_SIGNATURE, decode_rgb, without_color_profile


@pytest.fixture
def restore_env():
    saved = {k: os.environ.get(k) for k in (console.LEVEL_ENV, console.VERBOSE_ENV)}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    logging.getLogger("prn_ray").setLevel(logging.NOTSET)


def test_detail_lines_only_at_debug(restore_env, capsys):
    console.setup_logging("info")
    console.progress("fabric", "story line")
    console.detail("fabric", "epoch detail")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].endswith("[fabric] story line")
    console.setup_logging("debug")
    console.detail("fabric", "epoch detail")
    assert capsys.readouterr().out.rstrip().endswith("[fabric] epoch detail")
    console.setup_logging("warning")
    console.progress("fabric", "story line")
    assert capsys.readouterr().out == ""


def test_verbose_implies_debug_and_is_exported_for_workers(restore_env):
    console.setup_logging(None, verbose=True)
    assert console.verbose() and console.log_level() == logging.DEBUG
    assert logging.getLogger("prn_ray").level == logging.DEBUG
    console.setup_logging(None)
    assert not console.verbose() and console.log_level() == logging.INFO
    assert console.VERBOSE_ENV not in os.environ


def test_a_worker_process_inherits_the_level(restore_env):
    """Ray workers of a local Ray are child processes: the level travels in the environment."""
    console.setup_logging("warning")
    code = ("from prn_ray import console\n"
            "console.progress('p', 'hidden')\n"
            "console.progress('p', 'problem', 30)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60).stdout
    assert "hidden" not in out and out.rstrip().endswith("[p] problem")


def test_every_is_rate_limited(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    clock = console.Every(10.0)
    due = []
    for _ in range(25):  # 25 s in 1 s steps
        now[0] += 1.0
        due.append(clock.due())
    assert sum(due) == 2 and due[9] and due[19]
    assert clock.elapsed() == 25.0


def test_rate_line():
    assert console.rate_line(30, 120, 10.0) == "30/120 images, 3.0/s, ETA 30s"
    assert console.rate_line(10, 1000, 10.0) == "10/1000 images, 1.0/s, ETA 16m30s"
    assert console.rate_line(120, 120, 10.0) == "120/120 images, 12.0/s"  # done: no ETA
    assert console.rate_line(0, 5, 0.0) == "0/5 images, 0.0/s"


def test_ray_data_quiet_logging_config_names_importable_classes():
    """The YAML handed to Ray Data (RAY_DATA_LOGGING_CONFIG) names Ray classes by path; a Ray
    upgrade that moves them must fail here, not in every worker."""
    doc = yaml.safe_load((REPO / "prn_ray" / "ray_data_logging.yaml").read_text())
    paths = [h["class"] for h in doc["handlers"].values()]
    paths += [f["()"] for f in doc["filters"].values()]
    for path in paths:
        module, name = path.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), path
    assert doc["handlers"]["console"]["level"] == "ERROR"
    assert doc["loggers"]["ray.data"]["handlers"] == ["file", "console"]


def test_png_colour_profile_is_dropped_pixels_unchanged():
    import cv2
    import numpy as np

    img = (np.arange(24 * 16 * 3) % 251).astype(np.uint8).reshape(24, 16, 3)
    ok, buf = cv2.imencode(".png", img)
    data = buf.tobytes()
    # A malformed iCCP chunk (what libpng warns about) right after IHDR (8 + 25 bytes).
    body = b"iCCP" + b"ICC Profile\x00\x00" + b"junk"
    chunk = (len(body) - 4).to_bytes(4, "big") + body + b"\x00\x00\x00\x00"
    with_profile = data[:33] + chunk + data[33:]
    assert with_profile.startswith(PNG_SIGNATURE) and b"iCCP" in with_profile
    assert without_color_profile(with_profile) == data
    assert (decode_rgb(with_profile) == img[:, :, ::-1]).all()
    assert without_color_profile(b"\xff\xd8jpeg") == b"\xff\xd8jpeg"


def test_an_orderly_worker_exit_prints_no_traceback():
    """Ray stops a Tune trial's process with SIGTERM, whose handler raises SystemExit; raised
    inside a garbage-collection callback, Python would print it as an ignored exception."""
    code = ("import gc, sys\n"
            "from prn_ray.runtime import quiet_worker_exit\n"
            "quiet_worker_exit()\n"
            "class Exits:\n"
            "    def __del__(self):\n"
            "        raise SystemExit(1)\n"
            "class Fails:\n"
            "    def __del__(self):\n"
            "        raise ValueError('a real problem')\n"
            "Exits(); Fails(); gc.collect()\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120).stderr
    assert "SystemExit" not in err
    assert "ValueError: a real problem" in err  # other unraisable exceptions still show
