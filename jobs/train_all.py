"""Train one PRN per product, all products in parallel, and register the models.

The job is :mod:`prn_ray.commands.train` (``prn-ray train`` once installed; same flags); this file
runs it from a checkout, e.g. ``ray job submit --working-dir . -- python jobs/train_all.py ...``.
``python jobs/train_all.py --help`` lists the flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import prn_ray  # noqa: F401
except ImportError:  # run from a checkout (ray job submit --working-dir .) without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prn_ray.cli import run_job
from prn_ray.commands.train import main

if __name__ == "__main__":
    sys.exit(run_job(main))
