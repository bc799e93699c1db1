"""Connecting to Ray the same way locally, in CI and on a cluster.

* Inside ``ray job submit`` (``RAY_ADDRESS`` is set by Ray) or with ``ray.address`` configured,
  jobs connect to that cluster.
* Otherwise they start a local Ray whose dashboard (if any) listens on 127.0.0.1 only, and whose
  workers inherit this process's environment (S3 endpoint and credentials).
"""

from __future__ import annotations

import os

import ray

from prn_ray.config import Config


def init_ray(cfg: Config) -> None:
    """Start or connect to Ray once per process, and quiet Ray Data's progress bars."""
    # Workers of a local Ray inherit this; on a cluster, set it in the job's runtime_env.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # The dashboard serves Ray's State API, which Ray Train needs to release the
            # placement groups of trainers that Tune stopped; it listens on 127.0.0.1 only.
            ray.init(
                num_cpus=cfg.ray.num_cpus,
                dashboard_host=cfg.ray.dashboard_host,
                include_dashboard=True,
                log_to_driver=True,
            )
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Our progress lines are per product; Ray Data's bars interleave unreadably across them."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # The high-memory detector repeats a 15-line warning every 30 s per pipeline for the
    # backbone actor (~0.8 GiB by design: one frozen backbone each); other detectors stay on.
    try:
        ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    except AttributeError:  # older Ray without issue detectors
        pass
