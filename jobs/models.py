"""List registered models: versions, LATEST, threshold, metrics.

The job is :mod:`prn_ray.commands.models` (``prn-ray models`` once installed; same flags); this
file runs it from a checkout. ``python jobs/models.py --help`` lists the flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import prn_ray  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prn_ray.cli import run_job
from prn_ray.commands.models import main

if __name__ == "__main__":
    sys.exit(run_job(main))
