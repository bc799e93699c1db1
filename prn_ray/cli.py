"""The arguments every job shares (``--config``, ``--set``, ``--products``) and its exit codes,
in one place.

Jobs build their parser from :func:`job_parser`, add their own flags, turn the parsed
arguments into a :class:`~prn_ray.config.Config` with :func:`config_from_args` and run their
``main`` through :func:`run_job`. The library itself never reads ``sys.argv``.

Exit codes: 0 done; 1 the run ran and something failed (a product, a partition); 2 the
user's input is wrong (arguments, config, data location, weights) -- one ``error:`` line (or a
few, listing problems), no traceback; ``PRN_RAY_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from prn_ray import console, storage
from prn_ray.config import Config, ConfigError, load_config
from prn_ray.data.manifest import CatalogError
from prn_ray.model.backbone import WeightsError

USER_ERRORS = (ConfigError, CatalogError, WeightsError)
EXIT_CODES = "exit status: 0 done, 1 the run failed (a product/partition), 2 bad input"


def names(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def job_parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--products", type=names, default=None,
                   help="comma-separated products (default: data.products, else all)")
    p.add_argument("--log-level", choices=console.LEVELS, default=None,
                   help="the project's own lines: debug adds every epoch and step detail, "
                        "warning keeps only problems and the final tables (default: info)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own console output (INFO/WARNING of Ray Core, Data, "
                        "Train, Tune; worker logs); implies --log-level debug")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """The job's config; also sets up its logging, once (``--log-level``, ``--verbose``)."""
    console.setup_logging(getattr(args, "log_level", None), getattr(args, "verbose", False))
    return load_config(args.config, args.overrides)


def run_job(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit status; a user error becomes status 2 and an ``error:`` line."""
    try:
        return main(argv)
    except USER_ERRORS as exc:
        if os.environ.get("PRN_RAY_DEBUG"):
            raise
        print(f"error: {storage.redact(str(exc))}", file=sys.stderr, flush=True)
        return 2
