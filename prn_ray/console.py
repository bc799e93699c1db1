"""What a person reads: per-product progress lines, end-of-run tables, logging set-up.

No Ray imports: the training engine and the data stages report progress from inside Ray
workers and in plain processes alike.

Levels: progress lines are INFO (the story of a run); ``detail`` lines (every epoch, every
model resolved, every partition committed) are DEBUG. A job sets the level once
(:func:`setup_logging`, from ``--log-level``/``--verbose``); the level travels to the Ray
workers of a local Ray through the environment (a cluster's workers see the default, INFO,
unless the job's ``runtime_env`` sets ``PRN_RAY_LOG_LEVEL``).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

LEVEL_ENV = "PRN_RAY_LOG_LEVEL"  # the project's own level, in this process and its workers
VERBOSE_ENV = "PRN_RAY_VERBOSE"  # "1": Ray's own console output too (runtime.init_ray)
LEVELS = ("debug", "info", "warning", "error")


def log_level() -> int:
    """This process's level for the project's own lines (INFO unless a job set another)."""
    name = os.environ.get(LEVEL_ENV, "INFO").upper()
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.INFO


def verbose() -> bool:
    """Whether Ray's own INFO/WARNING console output is wanted (``--verbose``)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def progress(product: str, message: str, level: int = logging.INFO) -> None:
    """One progress line a person can follow (``HH:MM:SS [product] message``), flushed;
    nothing when ``level`` is below this process's level (:func:`log_level`).

    Written to stdout directly: Ray Train patches ``print`` on its workers, which would echo
    every line twice through the driver.
    """
    if level < log_level():
        return
    sys.stdout.write(f"{time.strftime('%H:%M:%S')} [{product}] {message}\n")
    sys.stdout.flush()


def detail(product: str, message: str) -> None:
    """A progress line shown at ``--log-level debug`` (or ``--verbose``) only."""
    progress(product, message, logging.DEBUG)


def setup_logging(level: str | None = None, verbose: bool = False) -> None:
    """Once per job, before anything logs: the project's level (``level``, default INFO, DEBUG
    with ``verbose``) for progress lines and library log records (``prn_ray.*`` as
    ``HH:MM:SS LEVEL name: message`` on stderr), and whether Ray's own console output is
    wanted. Both are exported to the environment, which the workers of a local Ray inherit."""
    name = (level or ("debug" if verbose else "info")).upper()
    os.environ[LEVEL_ENV] = name
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    # Our library at the chosen level; other libraries (torch, timm, urllib3) stay at WARNING.
    logging.getLogger("prn_ray").setLevel(name)


class Every:
    """Rate-limits progress lines of a long step: :meth:`due` is true at most every
    ``seconds`` (and never for the first call), so a pass over thousands of images prints a
    line every few seconds, not one per image or batch."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds
        self.start = self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def rate_line(done: int, total: int, elapsed_s: float, unit: str = "images") -> str:
    """``"120/400 images, 3.1/s, ETA 1m30s"`` (no ETA before the first item)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    text = f"{done}/{total} {unit}, {rate:.1f}/s"
    if 0 < done < total and rate > 0:
        eta = int((total - done) / rate)
        text += f", ETA {eta // 60}m{eta % 60:02d}s" if eta >= 60 else f", ETA {eta}s"
    return text


def cell(value: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, NaN/None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 align: str | None = None) -> str:
    """A plain-text table: one header line, a rule, one line per row.

    ``align`` has one letter per column, ``l`` or ``r`` (default: first column left, the
    others right). The last column is never padded (it may hold long messages)."""
    text = [[cell(v) for v in row] for row in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = []
        for i, (v, w, a) in enumerate(zip(values, widths, align)):
            if i == len(values) - 1:
                parts.append(v)
            else:
                parts.append(v.ljust(w) if a == "l" else v.rjust(w))
        return "  ".join(parts).rstrip()

    head = line(headers)
    return "\n".join([head, "-" * len(head), *(line(r) for r in text)])
