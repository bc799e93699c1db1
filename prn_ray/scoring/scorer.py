"""The scoring actor: registered PRN models loaded once per actor (per (product, version)),
each product's rows of a batch run through its model in one forward pass; rows for products
without a model become error rows without being read. Plain classes and functions: the Ray Data
plan (:mod:`prn_ray.scoring.plan`) runs them in an actor pool and in tasks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from prn_ray import images, storage
from prn_ray.config import StorageConfig
from prn_ray.scoring.models import ResolvedModel
from prn_ray.scoring.table import NO_MODEL, SCORING_FAILED, map_to_png, score_table


def no_model_rows(batch: pd.DataFrame, *, models: dict[str, ResolvedModel],
                  pidx: dict[str, int]) -> pa.Table:
    """Rows of products without a model: error rows, nothing is read or decoded."""
    products = batch["product"].astype(str).tolist()
    errors = [models[p].error if p in models and models[p].error else
              f"{NO_MODEL}: product {p!r} has no resolved model" for p in products]
    return score_table(products, batch["image_uri"].astype(str).tolist(), errors, models, pidx,
                       datetime.now(timezone.utc))


class Scorer:
    """Callable over decoded batches (:func:`prn_ray.images.decode_batch` rows: ``image`` at the
    product's model size, ``orig_height``/``orig_width``, ``error``); a batch may mix products
    (and therefore image sizes). Output: a pyarrow table in the staging schema.

    ``on_scored`` is told, after each batch, how many rows of each product it finished (the
    run's progress lines, :class:`prn_ray.scoring.plan.ScoringProgress`)."""

    def __init__(self, models: dict[str, ResolvedModel], storage_cfg: StorageConfig,
                 pidx: dict[str, int], threads: int = 1, use_gpu: bool = False,
                 on_scored: Callable[[dict[str, int]], None] | None = None):
        from prn_ray.runner import RegisteredModels

        self.runner = RegisteredModels(storage_cfg, threads=threads, use_gpu=use_gpu)
        self.models = models
        self.pidx = pidx
        self.on_scored = on_scored
        self._failed: dict[tuple[str, str], str] = {}  # (product, version) -> why it won't load

    @property
    def loads(self) -> int:
        return self.runner.loads  # models built by this actor (tests check "once per actor")

    def _model(self, product: str) -> tuple[Any, str | None]:
        res = self.models.get(product)
        if res is None or res.version is None:
            return None, (res.error if res is not None and res.error else
                          f"{NO_MODEL}: product {product!r} has no resolved model")
        key = (product, res.version)
        if key in self._failed:
            return None, self._failed[key]
        try:
            return self.runner.get(product, res.version), None
        except Exception as exc:  # noqa: BLE001 - becomes error rows, never a crash
            self._failed[key] = storage.redact(f"{NO_MODEL}: {type(exc).__name__}: {exc}")
            return None, self._failed[key]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        now = datetime.now(timezone.utc)
        products = np.asarray([str(p) for p in batch["product"]], dtype=object)
        n = len(products)
        uris = [str(u) for u in batch["image_uri"]]
        ok_decode = images.error_free(batch["error"])
        errors: list[str | None] = [None if ok_decode[i] else str(batch["error"][i])
                                    for i in range(n)]
        score = np.full(n, np.nan, np.float32)
        maps: list[bytes | None] = [None] * n
        heights: list[int | None] = [None] * n
        widths: list[int | None] = [None] * n
        oh, ow = batch["orig_height"], batch["orig_width"]
        for product in sorted(set(products)):
            idx = np.nonzero(products == product)[0]
            model, err = self._model(product)
            if err is not None:
                for i in idx:
                    errors[i] = err
                continue
            good = idx[ok_decode[idx]]
            if len(good) == 0:
                continue
            try:
                out, _ = self.runner.run(model, np.stack([np.asarray(batch["image"][i])
                                                          for i in good]))
                probs = out.anomaly_map[:, 0].float().cpu().numpy()
                scores = out.score.float().cpu().numpy()
                for j, i in enumerate(good):
                    if not np.isfinite(scores[j]):
                        errors[i] = f"{SCORING_FAILED}: the model returned a non-finite score"
                        continue
                    h, w = int(oh[i]), int(ow[i])
                    maps[i] = map_to_png(probs[j], h, w)
                    heights[i], widths[i] = h, w
                    score[i] = scores[j]
            except Exception as exc:  # noqa: BLE001 - the rows say why, the run goes on
                msg = storage.redact(f"{SCORING_FAILED}: {type(exc).__name__}: {exc}")
                for i in good:
                    errors[i] = msg
        if self.on_scored is not None:
            self.on_scored(dict(Counter(products.tolist())))
        return score_table(products.tolist(), uris, errors, self.models, self.pidx, now,
                           scores=score, maps=maps, heights=heights, widths=widths)


def after_decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop decode_batch's all-zero masks (scoring has none) and make ``error`` a string in
    every block: an all-success block would otherwise carry an Arrow ``null`` column that
    cannot be concatenated with a ``string`` one when the actor's batcher merges blocks."""
    batch.pop("mask", None)
    ok = images.error_free(batch["error"])
    batch["error"] = np.array(["" if good else str(e) for good, e in zip(ok, batch["error"])],
                              dtype=object)
    return batch
