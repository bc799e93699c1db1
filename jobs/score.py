"""Nightly batch scoring: score new images with each product's registered model.

The job is :mod:`prn_ray.commands.score` (``prn-ray score`` once installed; same flags); this file
runs it from a checkout, e.g. ``ray job submit --working-dir . -- python jobs/score.py ...``.
``python jobs/score.py --help`` lists the flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import prn_ray  # noqa: F401
except ImportError:  # run from a checkout (ray job submit --working-dir .) without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prn_ray.cli import run_job
from prn_ray.commands.score import main

if __name__ == "__main__":
    sys.exit(run_job(main))
