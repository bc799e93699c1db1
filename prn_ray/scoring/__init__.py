"""Nightly batch scoring: every new warehouse image -> one Parquet row.

The contract (schema, rows, maps, partitions, reading) is :mod:`.table`, Ray-free and
torch-free; :mod:`.commit` makes a run's output visible in one step per partition;
:mod:`.scorer` is the model actor, :mod:`.plan` its Ray Data wiring, :mod:`.run` the run.
``read_scores`` is what readers use::

    from prn_ray.scoring import read_scores
"""

from prn_ray.scoring.table import SCORE_SCHEMA, png_to_map, read_scores

__all__ = ["SCORE_SCHEMA", "png_to_map", "read_scores"]
