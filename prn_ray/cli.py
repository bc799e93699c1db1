"""The arguments every job shares (``--config``, ``--set``, ``--products``, ``--print-config``,
``--dry-run``) and its exit codes, in one place.

Jobs (:mod:`prn_ray.commands`) build their parser from :func:`job_parser`, add their own flags,
turn the parsed arguments into a :class:`~prn_ray.config.Config` with :func:`config_from_args`
and run their ``main`` through :func:`run_job`. The library itself never reads ``sys.argv``.

Exit codes: 0 done; 1 the run ran and something failed (a product, a partition); 2 the
user's input is wrong (arguments, config, data location, weights) -- one ``error:`` line (or a
few, listing problems), no traceback, before Ray starts; ``PRN_RAY_DEBUG=1`` shows the
traceback.

This module and what it imports at module level stay light (no torch, Ray, pandas, pyarrow or
timm): ``--help`` of every job answers in well under a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from enum import IntEnum

from prn_ray import console
from prn_ray.config import Config, ConfigError, load_config
from prn_ray.errors import CatalogError, RegistryError, UsageError, WeightsError

# RegistryError: a product or version the user named is not in the registry (export, predict,
# models); the jobs that read many products turn it into a per-product result instead.
USER_ERRORS = (ConfigError, CatalogError, WeightsError, UsageError, RegistryError)
DEBUG_ENV = "PRN_RAY_DEBUG"


class Exit(IntEnum):
    """The exit status of every command (``--help`` prints :data:`EXIT_CODES`)."""

    DONE = 0
    FAILED = 1  # the run failed: a product or partition (the others are done)
    INPUT = 2  # the user's input is wrong: one line saying what to fix, before Ray starts
    PARTIAL = 3  # score: committed, but some product had no usable model
    BUSY = 4  # score: another run of the same date held a partition's commit lease


EXIT_MEANINGS = {
    Exit.DONE: "done",
    Exit.FAILED: "the run failed (a product/partition)",
    Exit.INPUT: ("wrong input (arguments, config, data location; found before Ray starts; "
                 f"{DEBUG_ENV}=1 shows the traceback)"),
    Exit.PARTIAL: ("score: committed, but some product had no usable model or failed, or an "
                   "input's product name was not allowed"),
    Exit.BUSY: "score: another run of the same date holds a partition (retry later)",
}
EXIT_CODES = "exit status: " + "; ".join(f"{int(c)} {m}" for c, m in EXIT_MEANINGS.items())


class JobParser(argparse.ArgumentParser):
    """argparse whose errors read like every other input error: the usage line, then
    ``error: <cause>``, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(Exit.INPUT, f"error: {message}\n")


def names(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; an empty list is an argument error (an empty
    ``--products ''`` must not silently mean "all products")."""
    out = [t.strip() for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return out


def job_parser(description: str | None, prog: str | None = None,
               default_config: str | None = None, dry_run: bool = False,
               products: bool = True) -> JobParser:
    """The shared flags; ``default_config`` is what ``--help`` names as the default
    (the caller sets it with ``set_defaults``), ``dry_run`` adds ``--dry-run``, ``products``
    ``--products`` (jobs about one product have none)."""
    p = JobParser(prog=prog, description=description, epilog=EXIT_CODES,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config",
                   help=f"YAML config (default: {default_config or 'built-in defaults'})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    if products:
        p.add_argument("--products", type=names, default=None,
                       help="comma-separated products (default: data.products, else all)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML, --set applied) and exit")
    if dry_run:
        p.add_argument("--dry-run", action="store_true",
                       help="print the plan (products, images per split, resources, outputs) "
                            "and exit without starting Ray")
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


def print_config(cfg: Config) -> int:
    """``--print-config``: the resolved config as YAML on stdout (credentials redacted)."""
    import yaml

    from prn_ray import storage

    print(storage.redact(yaml.safe_dump(cfg.to_dict(), sort_keys=False)), end="", flush=True)
    return Exit.DONE


def check_backbone(cfg: Config) -> None:
    """``model.backbone`` is a timm model (imports timm: for jobs that build a model, before
    Ray starts)."""
    from prn_ray.config_checks import backbone_problem

    problem = backbone_problem(cfg.model.backbone)
    if problem:
        raise ConfigError(problem)


def check_runtime(cfg: Config) -> None:
    """``score.runtime``'s packages are installed here (for the jobs that score, before Ray
    starts; a cluster's nodes need them too)."""
    from prn_ray.config_checks import runtime_problem

    problem = runtime_problem(cfg.score.runtime)
    if problem:
        raise ConfigError(problem)


def run_job(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit status; a user error becomes status 2 and an ``error:`` line."""
    try:
        return main(argv)
    except USER_ERRORS as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        from prn_ray import storage

        print(f"error: {storage.redact(str(exc))}", file=sys.stderr, flush=True)
        return Exit.INPUT
