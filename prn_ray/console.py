"""What a person reads: per-product progress lines, end-of-run tables, logging set-up.

No Ray imports: the training engine and the data stages report progress from inside Ray
workers and in plain processes alike.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any


def progress(product: str, message: str) -> None:
    """One progress line a person can follow (``HH:MM:SS [product] message``), flushed.

    Written to stdout directly: Ray Train patches ``print`` on its workers, which would echo
    every line twice through the driver.
    """
    sys.stdout.write(f"{time.strftime('%H:%M:%S')} [{product}] {message}\n")
    sys.stdout.flush()


def setup_logging(level: int | str = logging.INFO) -> None:
    """Library log records (``prn_ray.*``) as ``HH:MM:SS LEVEL name: message`` on stderr."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)


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
