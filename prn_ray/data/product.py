"""One product's training data as the pipelines see it, and the one rule for how long a run is.

:class:`ProductData` is what a product's training needs from the catalog (its test rows never
enter). :class:`Budget` turns an epoch's size and the ``train`` section into steps per epoch,
the step budget, the epochs the run trains and the epochs the data stream must hold: every
part of the system (the trainer, the stream, tuning's rung count) asks it, nothing recomputes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from prn_ray import geometry as geom
from prn_ray.config import Config
from prn_ray.data.epoch_plan import epoch_plan

SIZE_SAMPLE = 16  # normal images whose headers decide tiles: auto for a product
# Held-out images whose views are kept with a registered model for the graph runtimes' parity
# check (normals, which set the threshold, and defects, where the maps are steepest), and the
# most views kept: 12 views of 256 px are 2.4 MB beside a ~31 MB model.
CHECK_IMAGES = {"normal": 4, "anomaly": 2}
CHECK_VIEWS = 12


@dataclass
class ProductData:
    """What the pipelines need for one product, taken from the catalog (test rows never enter)."""

    product: str
    train_normals: list[str]
    seen: list[tuple[str, str]]  # (image_uri, mask_uri) of seen anomalies used for training
    val: pd.DataFrame  # image_uri, mask_uri, label of the validation split
    quarantine: list[dict] = field(default_factory=list)  # rows excluded, with their reason

    @classmethod
    def from_catalog(cls, frame: pd.DataFrame, product: str) -> ProductData:
        rows = frame[frame["product"] == product]
        normals = rows[(rows["split"] == "train") & (rows["label"] == "normal")]
        seen = rows[rows["split"] == "seen"]
        val = rows[rows["split"] == "val"]
        return cls(
            product=product,
            train_normals=sorted(normals["image_uri"].tolist()),
            seen=sorted(zip(seen["image_uri"], seen["mask_uri"].fillna(""))),
            val=val[["image_uri", "mask_uri", "label"]].sort_values("image_uri").reset_index(
                drop=True
            ),
        )

    def exclude(self, bad: dict[str, str]) -> None:
        """Drop images found unreadable (uri -> reason) and remember them for the report."""
        if not bad:
            return
        self.quarantine.extend({"product": self.product, "image_uri": u, "error": r}
                               for u, r in sorted(bad.items()))
        self.train_normals = [u for u in self.train_normals if u not in bad]
        self.seen = [(u, m) for u, m in self.seen if u not in bad]
        self.val = self.val[~self.val["image_uri"].isin(bad)].reset_index(drop=True)

    def check_views(self, cfg: Config, geometry: geom.Geometry) -> np.ndarray | None:
        """Views (V x h x w x 3 uint8, V <= :data:`CHECK_VIEWS`) of a few held-out images, as
        the model sees them, or None without readable held-out images. A tiled image gives
        tiles spread over its grid. Reads happen here, on the driver, once per trained model."""
        from prn_ray import images

        picked: list[np.ndarray] = []
        per_image = max(1, CHECK_VIEWS // sum(CHECK_IMAGES.values()))
        for label, count in CHECK_IMAGES.items():
            for uri in self.val[self.val["label"] == label]["image_uri"].tolist()[:count]:
                try:
                    img, _ = images.load_pair(uri, None, "skip", cfg.storage, cfg.data)
                    v = geometry.views(img)
                except Exception:  # noqa: BLE001 - an unreadable image is only not a check view
                    continue
                picked += [v[i] for i in np.linspace(0, len(v) - 1, min(per_image, len(v)))
                           .round().astype(int)]
        return np.stack(picked[:CHECK_VIEWS]) if picked else None

    def epoch_rows(self, cfg: Config) -> int:
        """Samples in one training epoch (normals + real + simulated slots)."""
        return len(epoch_plan(len(self.train_normals), len(self.seen), cfg.synthesis, 0,
                              cfg.train.seed)["kind"])


@dataclass(frozen=True)
class Budget:
    """How long a run is, derived once from ``train.epochs``, ``train.max_steps``, the batch
    size, the number of data-parallel workers and the epoch's size. (A wall-clock budget,
    ``train.time_budget_s``, can end a run earlier still; the trainer checks it per step.)"""

    epoch_rows: int
    world: int
    steps_per_epoch: int  # full global batches per epoch
    total_steps: int  # the step budget: epochs x steps, capped by max_steps
    epochs: int  # epochs the run trains (fewer than train.epochs under a step budget)
    planned_epochs: int  # epochs the training stream holds

    @classmethod
    def of(cls, cfg: Config, epoch_rows: int, world: int | None = None) -> Budget:
        tc = cfg.train
        world = max(1, tc.num_workers if world is None else world)
        per_epoch = max(1, epoch_rows // (tc.batch_size * world))
        total = per_epoch * tc.epochs
        epochs = tc.epochs
        if tc.max_steps:
            total = min(total, tc.max_steps)
            epochs = min(tc.epochs, -(-tc.max_steps // per_epoch))  # the epoch it ends in counts
        # One more epoch in the stream for batches that straddle an epoch boundary under a step
        # budget (and never all of a 10000-epoch config: it would plan millions of rows).
        planned = min(tc.epochs, epochs + (1 if tc.max_steps else 0))
        return cls(epoch_rows, world, per_epoch, total, epochs, planned)


def image_sizes(uris: list[str], cfg: Config, n: int = SIZE_SAMPLE) -> list[tuple[int, int]]:
    """(height, width) of up to ``n`` images spread evenly over ``uris``, from their headers
    (a ranged read each); unreadable ones are skipped (the decode reports them)."""
    from prn_ray.images import header_size

    if not uris:
        return []
    step = max(1, len(uris) // n)
    out = []
    for uri in uris[::step][:n]:
        try:
            size = header_size(uri, cfg.storage)
        except Exception:  # noqa: BLE001 - a bad file is the decode's to report
            size = None
        if size:
            out.append((int(size[1]), int(size[0])))
    return out


def product_geometry(cfg: Config, normals: list[str]) -> tuple[Config, geom.Geometry]:
    """The product's :class:`~prn_ray.geometry.Geometry` (``data.tiles.mode: auto`` decided
    from its normal images' sizes) and its config with that choice pinned, so the training
    run, its checkpoints and the registered model all read the same geometry."""
    needs_sizes = cfg.data.tiles.mode == "auto" or (
        cfg.data.tiles.mode == "on" and cfg.data.tiles.scale == "auto")
    sizes = image_sizes(normals, cfg) if needs_sizes else None
    if needs_sizes and not sizes:
        raise RuntimeError("no normal image header could be read to choose data.tiles")
    g = geom.resolve(cfg.data, sizes)
    return cfg.replace(geom.pinned(cfg.data, g)), g

