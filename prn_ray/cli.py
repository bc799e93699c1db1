"""The arguments every job shares (``--config``, ``--set``, ``--products``), in one place.

Jobs build their parser from :func:`job_parser`, add their own flags, and turn the parsed
arguments into a :class:`~prn_ray.config.Config` with :func:`config_from_args`. The library
itself never reads ``sys.argv``.
"""

from __future__ import annotations

import argparse

from prn_ray.config import Config, load_config


def names(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def job_parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--products", type=names, default=None,
                   help="comma-separated products (default: data.products, else all)")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
