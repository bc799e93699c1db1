"""URI helpers shared by the catalog and the manifest readers: relative keys for
storage-independent sorting, the tree's base URI, short listings for messages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

from prn_ray import storage
from prn_ray.config import StorageConfig

MAX_LISTED = 20


def base_uri(root: str, cfg: StorageConfig | None) -> str:
    loc = storage.resolve(root, cfg)
    return loc.uri()


def rel_parts(uri: str, base: str) -> list[str] | None:
    if not uri.startswith(base.rstrip("/") + "/"):
        return None
    return uri[len(base.rstrip("/")) + 1 :].split("/")


def listed(items: Sequence[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(storage.redact(str(i)) for i in items[:limit])
    more = len(items) - limit
    return shown + (f", ... and {more} more" if more > 0 else "")


def relative_keys(uris: Iterable[str]) -> list[str]:
    """Each URI relative to the deepest directory shared by all of them (``/`` separators).

    ``s3://b/data/fabric/test/crack/000.png`` and ``/mnt/data/fabric/test/crack/000.png`` both
    become ``test/crack/000.png`` when listed with their siblings: a sort key that does not depend
    on where the dataset is stored.
    """
    parts = [str(u).replace("\\", "/").split("/") for u in uris]
    if not parts:
        return []
    common = 0
    shortest = min(len(p) for p in parts) - 1  # never strip a file name
    while common < shortest and all(p[common] == parts[0][common] for p in parts):
        common += 1
    return ["/".join(p[common:]) for p in parts]


def sorted_by_key(df: pd.DataFrame, index: pd.Index, keys: dict) -> list:
    return sorted(index, key=lambda i: (keys[i], df.at[i, "image_uri"]))
