"""``prn-ray <command> [flags]``: every job behind one console script, with the same flags as
``python jobs/<job>.py``.

Each command is a module here with ``main(argv, prog)``; the table below maps a command name
to its module and a one-line summary. A module is imported only when its command runs, so
``prn-ray --help`` never loads torch or Ray. Adding a command is one line in :data:`COMMANDS`.
"""

from __future__ import annotations

import difflib
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("prn_ray.commands.train", "train one model per product, all in parallel"),
    "tune": ("prn_ray.commands.tune", "hyperparameter search per product (Ray Tune, ASHA)"),
    "score": ("prn_ray.commands.score", "nightly batch scoring of new images into Parquet"),
    "evaluate": ("prn_ray.commands.evaluate", "metrics and HTML report of models or scores"),
    "demo": ("prn_ray.commands.demo", "the demo end to end: data, train, score, evaluate"),
    "export": ("prn_ray.commands.export", "export a model as TorchScript/ONNX (one graph)"),
    "predict": ("prn_ray.commands.predict", "score files or a folder without Ray"),
    "models": ("prn_ray.commands.models", "list registered models, versions, LATEST, thresholds"),
    "make-manifest": ("prn_ray.commands.make_manifest", "write a manifest for a dataset layout"),
    "make-demo-data": ("prn_ray.commands.make_demo_data", "write the procedural demo dataset"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: prn-ray <command> [flags]   (prn-ray <command> --help for its flags)", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    from prn_ray.cli import EXIT_CODES

    return "\n".join([*lines, "", EXIT_CODES])


def main(argv: list[str] | None = None) -> int:
    from prn_ray.cli import Exit, run_job

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return Exit.DONE if argv else Exit.INPUT  # no command: a usage error
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"usage: prn-ray <command> [flags]\nerror: unknown command {name!r}"
              + (f" (did you mean {close[0]}?)" if close else
                 f"; commands: {', '.join(COMMANDS)}"), file=sys.stderr)
        return Exit.INPUT
    module = importlib.import_module(COMMANDS[name][0])
    return run_job(lambda args: module.main(args, prog=f"prn-ray {name}"), rest)
