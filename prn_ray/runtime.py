"""Connecting to Ray the same way locally, in CI and on a cluster.

* Inside ``ray job submit`` (``RAY_ADDRESS`` is set by Ray) or with ``ray.address`` configured,
  jobs connect to that cluster.
* Otherwise they start a local Ray whose dashboard (if any) listens on 127.0.0.1 only, and whose
  workers inherit this process's environment (S3 endpoint and credentials).

Ray's own console output (INFO/WARNING of Ray Core, Data, Train and Tune) is off unless the job
runs with ``--verbose`` (:func:`prn_ray.console.verbose`); the project's progress lines, which
Ray streams from its workers, stay. Everything Ray logs still reaches the session's log files
(``/tmp/ray/session_latest/logs``).
"""

from __future__ import annotations

import logging
import logging.config
import os
import socket
import sys
from pathlib import Path

import ray
import yaml

from prn_ray import console
from prn_ray.config import Config

RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")


def quiet_ray_env(local: bool) -> dict[str, str]:
    """The environment that keeps Ray's console to errors, for this process and the workers of
    a local Ray (which inherit it; on a cluster, put it in the job's ``runtime_env``).

    ``local``: also what only holds on one machine started here -- no node can be preempted
    (Ray Train's preemption watcher, one more process per trainer, has nothing to watch), and
    the fractional CPU requests of the small configs start many worker processes at once on
    few cores, by design (the raylet warns from 4 x its start-up concurrency, the CPU count).
    """
    env = {
        "RAY_LOGGER_LEVEL": "error",  # the "ray" logger of every worker (Train, Tune, Core)
        "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING),  # Ray Data: console at ERROR
        "RAY_AIR_NEW_OUTPUT": "0",  # Tune's legacy reporter is silent at verbose=0
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    if local:
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        env["RAY_worker_maximum_startup_concurrency"] = str(max(8, os.cpu_count() or 1))
    return env


def init_ray(cfg: Config, dashboard: bool = True) -> None:
    """Start or connect to Ray once per process, quiet unless ``--verbose``.

    ``dashboard``: whether a local Ray started here serves the dashboard (Ray's State API).
    Jobs without Ray Train or Tune (scoring, evaluation) do without it: ten fewer processes
    (≈ 0.9 GiB of resident memory on 2 cores) and a faster start."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    loud = console.verbose()
    if not loud:
        for key, value in quiet_ray_env(local=not address).items():
            os.environ.setdefault(key, value)
        # This process imported Ray Data (and configured its logging) before the variable
        # was set: apply the same configuration here.
        logging.config.dictConfig(yaml.safe_load(RAY_DATA_LOGGING.read_text()))
        logging.getLogger("ray").setLevel(logging.ERROR)  # before ray.init logs anything
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    level = logging.INFO if loud else logging.ERROR
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True, logging_level=level)
        else:
            # The dashboard serves Ray's State API, which Ray Train needs to release the
            # placement groups of trainers that Tune stopped; it listens on 127.0.0.1 only.
            # Ray's processes find it by auto-detection, which fails ("multiple active Ray
            # instances") when another local Ray runs on the machine: name it for them.
            served = {}
            if dashboard:
                port = free_port()
                host = "127.0.0.1" if cfg.ray.dashboard_host in ("0.0.0.0", "") else \
                    cfg.ray.dashboard_host
                os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{host}:{port}"
                served = {"dashboard_host": cfg.ray.dashboard_host, "dashboard_port": port}
            ray.init(
                num_cpus=cfg.ray.num_cpus,
                include_dashboard=dashboard,
                **served,
                log_to_driver=True,  # the project's progress lines come from workers
                logging_level=level,
            )
    quiet_ray_data()


def free_port() -> int:
    """A TCP port free on this machine now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_worker_exit() -> None:
    """In a long-lived Ray worker (a Tune trial): when Ray stops the process with SIGTERM, its
    handler raises ``SystemExit`` wherever Python is; inside a garbage-collection callback
    Python cannot raise it and prints "Exception ignored in: ... Traceback ... SystemExit" (an
    orderly stop, not an error). Those exits are dropped; every other unraisable exception is
    reported as before."""
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            default(unraisable)

    sys.unraisablehook = hook


def quiet_train_worker() -> None:
    """In a Ray Train worker, unless ``--verbose``: the root logger back to WARNING. Ray Train
    sets it to INFO on its workers, and one of its loggers is named by file path rather than
    under ``ray.train``, so ``train_logging``'s level does not hold it (every reported result
    and checkpoint would be echoed to the console)."""
    if not console.verbose():
        logging.getLogger().setLevel(logging.WARNING)


def train_logging():
    """Ray Train's own console level (``RunConfig(logging_config=...)``): ERROR, INFO with
    ``--verbose`` (checkpoint paths, worker-group start-up, every reported result)."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if console.verbose() else "ERROR")


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
