"""Names and small helpers every layer shares, defined once.

* Catalog vocabulary: labels and splits of a sample, image file extensions.
* Batch columns of the feature streams (one column per backbone level) and the validation
  groups that keep held-out *real* defects apart from synthetic ones.
* JSON for numpy/torch scalars, CPU copies of tensors for safetensors, and run ids.

No Ray, no torch at import time.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from datetime import datetime, timezone
from typing import Any

# ----------------------------------------------------------------------------- catalog

LABELS = ("normal", "anomaly")
SPLITS = ("train", "val", "test", "seen")
CATALOG_COLUMNS = ("product", "image_uri", "label", "defect_type", "mask_uri", "split")


def sample_row(product: str, image_uri: str, defect: str | None, split: str,
               **extra: Any) -> dict[str, Any]:
    """One row of the sample table: ``defect`` is the defect type, None for a normal image
    (its ``defect_type`` is ``good``, as MVTec names the class)."""
    return {"product": product, "image_uri": image_uri,
            "label": "normal" if defect is None else "anomaly",
            "defect_type": "good" if defect is None else defect, "split": split, **extra}


# Product names become path parts (<models_uri>/<product>/…, product=<product>/ partitions):
# letters, digits, '.', '_', '-', starting with a letter or digit, at most 128 characters.
PRODUCT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def product_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a product name, or None when it can."""
    if PRODUCT_NAME.fullmatch(name or ""):
        return None
    return (f"product name {name!r} is not allowed (use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters)")
# Files treated as images when listing a tree or an input prefix (one list for training and
# scoring); one the decoder cannot read becomes an error row, never a silent skip.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm",
                    ".ppm", ".pnm", ".jp2")

# ----------------------------------------------------------------------------- batches

FEATURE_COLUMNS = ("feat0", "feat1", "feat2", "feat3")  # backbone levels, strides 4..32
# Validation groups. Synthetic defects are learned long before real ones, so validation keeps
# what comes from the held-out *real* defects apart: the raw defects (REAL) and copies of them
# pasted onto held-out normals (REAL_EXTENDED: more positions and backgrounds for the same few
# real defects, never the training defects). SYNTHETIC = simulated anomalies.
GROUP_NORMAL, GROUP_REAL, GROUP_SYNTHETIC, GROUP_REAL_EXTENDED = 0, 1, 2, 3
REAL_GROUPS = (GROUP_REAL, GROUP_REAL_EXTENDED)
# Mask value of a pixel whose label is not known: an anomalous image without a drawn mask
# (an image-level label, e.g. from a reject bin) has this value everywhere. Masks are uint8
# {0, 1} otherwise, so the value cannot be mistaken for a defect pixel; every consumer of masks
# (the loss, validation, evaluation, synthesis) treats it as "not known", never as 0 or 1.
MASK_UNKNOWN = 255


def image_labelled(mask) -> bool:
    """Whether a mask (array-like) carries an image-level label only (any pixel unknown)."""
    import numpy as np

    return bool((np.asarray(mask) == MASK_UNKNOWN).any())

# ----------------------------------------------------------------------------- JSON, tensors


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy / torch scalars and arrays."""
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(doc: Any, *, indent: int = 1, sort_keys: bool = False) -> str:
    return json.dumps(doc, indent=indent, sort_keys=sort_keys, default=json_default)


def cpu_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """Detached, contiguous CPU copies: what safetensors accepts (no shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}

# ----------------------------------------------------------------------------- ids

_ID_TIME = "%Y%m%d-%H%M%S"
_ID_RE = re.compile(r"(\d{8}-\d{6})")


def new_id(prefix: str) -> str:
    """``<prefix><UTC yyyymmdd-HHMMSS>-<6 hex>``: sortable by time, unique across processes
    started in the same second (train-…, score-…, study-…, eval-…, ablate-…, v… versions)."""
    return f"{prefix}{time.strftime(_ID_TIME, time.gmtime())}-{secrets.token_hex(3)}"


def id_time(run_id: str) -> datetime | None:
    """When an id made by :func:`new_id` was created (UTC), or None for other names."""
    m = _ID_RE.search(run_id)
    if not m:
        return None
    return datetime.strptime(m.group(1), _ID_TIME).replace(tzinfo=timezone.utc)
