"""The scoring actor: registered PRN models loaded once per actor (per (product, version)),
each product's rows of a batch run through its model in one forward pass; rows for products
without a model become error rows without being read. Plain classes and functions: the Ray Data
plan (:mod:`prn_ray.scoring.plan`) runs them in an actor pool and in tasks."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from prn_ray import images, storage
from prn_ray.config import DataConfig, StorageConfig
from prn_ray.inference import ScoreRule, in_batches, stitch_items
from prn_ray.scoring.models import ResolvedModel
from prn_ray.scoring.table import NO_MODEL, SCORING_FAILED, map_to_png, score_table


def no_model_rows(batch: pd.DataFrame, *, models: dict[str, ResolvedModel],
                  pidx: dict[str, int]) -> pa.Table:
    """Rows of products without a model: error rows, nothing is read or decoded. A row's own
    ``error`` (a bad product name, from the inputs) wins over its product's."""
    products = batch["product"].astype(str).tolist()
    own = batch["error"].tolist() if "error" in batch else [None] * len(products)
    errors = [e if isinstance(e, str) and e else
              models[p].error if p in models and models[p].error else
              f"{NO_MODEL}: product {p!r} has no resolved model" for p, e in zip(products, own)]
    return score_table(products, batch["image_uri"].astype(str).tolist(), errors, models, pidx,
                       datetime.now(timezone.utc))


def model_streams(threads: int, use_gpu: bool) -> int:
    """Batches an actor runs through the model at once.

    On a CPU, two, each on half the actor's threads: a forward pass alternates wide operators
    (convolutions, the attention matmuls) with narrow ones (reductions, element-wise steps on
    small maps), and its intra-op threads meet at a barrier after every operator, so
    one batch alone leaves cores waiting; a second batch fills them (on 2 cores, 1 thread x 2
    batches ran the shipped CPU model 1.1x faster than 2 threads x 1 batch). On a GPU, one:
    the device runs one batch at a time anyway, and two would hold two batches' activations.
    """
    return 1 if use_gpu or threads < 2 else 2


def concurrent_calls(streams: int) -> int:
    """Calls an actor takes at once: one more than it runs through the model, so the next
    batch is read and decoded while the model works."""
    return streams + 1


class Scorer:
    """Callable over batches of rows (``product``, ``image_uri``); a batch may mix products (and
    therefore image sizes). Output: a pyarrow table in the staging schema.

    With ``data_cfg`` the scorer reads and decodes each product's images itself and cuts them
    into views by that product's geometry (:func:`prn_ray.images.decode_batch`); without it
    the rows arrive decoded (``image``, ``orig_height``/``orig_width``, ``error``: one
    whole-image view each) by tasks upstream. Views run through the model ``batch_size`` at a
    time and their maps come back stitched (:mod:`prn_ray.inference`).
    ``on_retries(n)`` is told the storage requests retried since its last call (model loads
    included); ``on_scored`` how many rows of each product it finished (the run's progress
    lines, :class:`prn_ray.scoring.plan.ScoringProgress`).

    Thread-safe, for :func:`concurrent_calls` calls at once: one batch's reads, decoding and
    map encoding run while other batches are in the model, at most :func:`model_streams` of
    them at a time (``_compute``), each on ``threads // streams`` intra-op threads.
    """

    def __init__(self, models: dict[str, ResolvedModel], storage_cfg: StorageConfig,
                 pidx: dict[str, int], threads: int = 1, use_gpu: bool = False,
                 data_cfg: DataConfig | None = None,
                 on_retries: Callable[[int], None] | None = None,
                 on_scored: Callable[[dict[str, int]], None] | None = None,
                 batch_size: int = 16, runtime: str = "torch", precision: str = "fp32"):
        from prn_ray.runner import RegisteredModels

        streams = model_streams(threads, use_gpu)
        self.runner = RegisteredModels(storage_cfg, threads=max(1, threads // streams),
                                       use_gpu=use_gpu, runtime=runtime, precision=precision,
                                       streams=streams)
        self._compute = threading.BoundedSemaphore(streams)  # batches in the model at once
        self.models = models
        self.pidx = pidx
        self.storage_cfg = storage_cfg
        self.data_cfg = data_cfg
        self.on_retries = on_retries
        self.on_scored = on_scored
        self.batch_size = batch_size  # views per forward pass (a tiled image is several)
        self._failed: dict[tuple[str, str], str] = {}  # (product, version) -> why it won't load
        self._loading = threading.Lock()
        self._tally = threading.Lock()
        self._retried_told = storage.retried_requests()

    @property
    def loads(self) -> int:
        return self.runner.loads  # models built by this actor (tests check "once per actor")

    def _model(self, product: str) -> tuple[Any, str | None]:
        res = self.models.get(product)
        if res is None or res.version is None:
            return None, (res.error if res is not None and res.error else
                          f"{NO_MODEL}: product {product!r} has no resolved model")
        key = (product, res.version)
        with self._loading:  # a model is built once, however many calls want it first
            if key in self._failed:
                return None, self._failed[key]
            try:
                return self.runner.get(product, res.version), None
            except Exception as exc:  # noqa: BLE001 - becomes error rows, never a crash
                from prn_ray.runtimes import RuntimeMismatch

                # a graph that disagrees with its model: the model is there, scoring failed
                why = SCORING_FAILED if isinstance(exc, RuntimeMismatch) else NO_MODEL
                self._failed[key] = storage.redact(f"{why}: {type(exc).__name__}: {exc}")
                return None, self._failed[key]

    def _decoded(self, batch: dict[str, np.ndarray], idx: np.ndarray, product: str):
        """The views of the rows ``idx``: (pixels V x h x w x 3, grid index V, the row of
        ``idx`` each came from V, original heights V, widths V, errors V)."""
        if self.data_cfg is None:  # decoded upstream: one whole-image view per row
            return (np.stack([np.asarray(batch["image"][i]) for i in idx]),
                    np.zeros(len(idx), np.int64), np.arange(len(idx)),
                    batch["orig_height"][idx], batch["orig_width"][idx], batch["error"][idx])
        uris = np.asarray([str(batch["image_uri"][i]) for i in idx], dtype=object)
        out = images.decode_batch({"image_uri": uris, "item": np.arange(len(idx))},
                                  storage_cfg=self.storage_cfg, data_cfg=self.data_cfg,
                                  geometry=self.models[product].geometry)
        return (out["image"], out["view"], out["item"], out["orig_height"], out["orig_width"],
                out["error"])

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        table = self._score(batch)
        if self.on_retries is not None:
            # the process counter also counts concurrent calls: tell what is new since the last
            # telling, so the run's sum is exact
            with self._tally:
                now = storage.retried_requests()
                new, self._retried_told = now - self._retried_told, now
            self.on_retries(new)
        if self.on_scored is not None:
            self.on_scored(dict(Counter(str(p) for p in batch["product"])))
        return table

    def _score(self, batch: dict[str, np.ndarray]) -> pa.Table:
        now = datetime.now(timezone.utc)
        products = np.asarray([str(p) for p in batch["product"]], dtype=object)
        n = len(products)
        uris = [str(u) for u in batch["image_uri"]]
        errors: list[str | None] = [None] * n
        score = np.full(n, np.nan, np.float32)
        maps: list[bytes | None] = [None] * n
        heights: list[int | None] = [None] * n
        widths: list[int | None] = [None] * n
        for product in sorted(set(products)):
            idx = np.nonzero(products == product)[0]
            model, err = self._model(product)
            if err is not None:  # nothing is read for a product without a usable model
                for i in idx:
                    errors[i] = err
                continue
            pixels, views, rows, oh, ow, decode_errors = self._decoded(batch, idx, product)
            ok = images.error_free(decode_errors)
            for j in np.nonzero(~ok)[0]:
                errors[idx[rows[j]]] = str(decode_errors[j])
            if not ok.any():
                continue
            try:
                with self._compute:
                    probs, _ = in_batches(lambda v: self.runner.probabilities(model, v),
                                          pixels[ok], self.batch_size)
                for m in stitch_items(probs, rows[ok], views[ok], oh[ok], ow[ok],
                                      self.models[product].geometry, ScoreRule.of(model)):
                    i = idx[m.item]
                    if not np.isfinite(m.score):
                        errors[i] = f"{SCORING_FAILED}: the model returned a non-finite score"
                        continue
                    first = np.flatnonzero(rows == m.item)[0]
                    h, w = int(oh[first]), int(ow[first])
                    maps[i] = map_to_png(m.amap, h, w)
                    heights[i], widths[i] = h, w
                    score[i] = m.score
            except Exception as exc:  # noqa: BLE001 - the rows say why, the run goes on
                msg = storage.redact(f"{SCORING_FAILED}: {type(exc).__name__}: {exc}")
                for r in set(int(r) for r in rows[ok]):
                    errors[idx[r]] = msg
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
