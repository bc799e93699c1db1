"""The data stages as plain batch functions (no Ray): what each row of a stream is, the small
image banks synthesis draws from, and the backbone applied to a batch.

The same functions run inside Ray Data (:mod:`prn_ray.train.datasets`) and in one
process (:mod:`prn_ray.data.local`):

* **prototypes / reference**: train normals -> decode -> backbone features;
* **validation**: held-out normals + held-out real anomalies + fixed synthetic anomalies
  -> decode -> synthesis -> features (computed once per run);
* **training**: an epoch plan (:func:`prn_ray.data.epoch_plan.epoch_plan`) -> decode -> synthesis
  (fresh draws each epoch, seeded by (seed, epoch, row)) -> features, for the synthetic rows
  only: the rows every epoch repeats come from :mod:`prn_ray.data.feature_cache`.

Every stage keeps failed rows (``error`` set) instead of raising, so one unreadable file never
stops a run; consumers decide what to do with them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from prn_ray import images
from prn_ray.config import Config, ModelConfig, StorageConfig
from prn_ray.contracts import (
    FEATURE_COLUMNS,
    GROUP_NORMAL,
    GROUP_REAL,
    GROUP_REAL_EXTENDED,
    GROUP_SYNTHETIC,
    image_labelled,
)
from prn_ray.data.epoch_plan import epoch_plan, row_seed
from prn_ray.data.product import ProductData
from prn_ray.geometry import VIEW_ALL, VIEW_RANDOM, Geometry, view_seed
from prn_ray.model.inputs import images_to_tensor, inference_device, prepare
from prn_ray.synthesis import Synthesizer, load_texture_bank

VAL_EPOCH = 2**31 - 1  # seed namespace of the fixed validation anomalies (no training epoch)


# ----------------------------------------------------------------------------- rows


def plan_frame(data: ProductData, cfg: Config, epochs: range) -> pd.DataFrame:
    """The rows of the given epochs, in training order: ``epoch``, ``pos`` (position in its
    epoch), ``kind``, the image each row starts from (``image_uri``/``mask_uri``, and
    ``normal_index``/``source_index`` into ``train_normals``/``seen``), its ``seed`` and its
    ``view``: a grid view of the image drawn from the seed (tiled: a fresh tile of the normal
    image every epoch; untiled: the one whole-image view)."""
    frames = []
    for epoch in epochs:
        plan = epoch_plan(len(data.train_normals), len(data.seen), cfg.synthesis, epoch,
                          cfg.train.seed)
        kind = plan["kind"]
        is_seen = kind == "seen"
        normal_idx = np.maximum(plan["normal_index"], 0)
        src = np.maximum(plan["source_index"], 0)
        seen_uris = [data.seen[i] for i in src] if data.seen else [("", "")] * len(kind)
        image_uri = np.where(
            is_seen,
            np.array([u for u, _ in seen_uris], dtype=object),
            np.array([data.train_normals[i] for i in normal_idx], dtype=object),
        )
        mask_uri = np.where(is_seen, np.array([m for _, m in seen_uris], dtype=object), "")
        frames.append(pd.DataFrame({
            "epoch": np.full(len(kind), epoch, dtype=np.int64),
            "pos": np.arange(len(kind), dtype=np.int64),
            "kind": kind.astype(object),
            "image_uri": image_uri,
            "mask_uri": mask_uri,
            "seed": plan["seed"],
            "view": np.full(len(kind), VIEW_RANDOM, dtype=np.int64),
            "normal_index": plan["normal_index"],
            "source_index": plan["source_index"],
        }))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def shard_plan(data: ProductData, cfg: Config, epoch: int, rank: int = 0, world: int = 1
               ) -> pd.DataFrame:
    """One epoch's rows that data-parallel worker ``rank`` of ``world`` trains on (every
    ``world``-th position), in order."""
    plan = plan_frame(data, cfg, range(epoch, epoch + 1))
    return plan[plan["pos"] % world == rank].reset_index(drop=True)


def validation_frame(data: ProductData, banks: SynthesisBanks, cfg: Config) -> pd.DataFrame:
    """Held-out normals and real anomalies, plus one fixed synthetic anomaly per held-out normal,
    seeded apart from every training epoch: alternately a simulated anomaly and (when the
    product has held-out real defects) an extended copy of a held-out real defect.

    Each row is one ``item`` (an image, as scoring would see it): normals and real defects
    with all their views (``VIEW_ALL``), so their image scores come from stitched maps as in
    scoring; a synthetic anomaly is one view of its normal (``VIEW_RANDOM``)."""
    val = data.val
    normals = val[val["label"] == "normal"]["image_uri"].tolist()
    real = val[val["label"] == "anomaly"]
    rows = [{"image_uri": u, "mask_uri": "", "kind": "normal", "group": GROUP_NORMAL}
            for u in normals]
    rows += [{"image_uri": u, "mask_uri": m if isinstance(m, str) else "", "kind": "seen",
              "group": GROUP_REAL} for u, m in zip(real["image_uri"], real["mask_uri"])]
    for i, uri in enumerate(normals):
        extended = bool(i % 2 and banks.val_seen)
        rows.append({"image_uri": uri, "mask_uri": "", "kind": "extended" if extended
                     else "simulated", "group": GROUP_REAL_EXTENDED if extended
                     else GROUP_SYNTHETIC})
    frame = pd.DataFrame(rows, columns=["image_uri", "mask_uri", "kind", "group"])
    # The decode reads a real defect's mask, or marks it image-labelled when it has none.
    frame["label"] = np.where(frame["kind"] == "seen", "anomaly", "normal").astype(object)
    frame["item"] = np.arange(len(frame), dtype=np.int64)
    frame["view"] = np.where(frame["kind"].isin(["normal", "seen"]), VIEW_ALL,
                             VIEW_RANDOM).astype(np.int64)
    frame["seed"] = np.array([row_seed(cfg.train.seed, VAL_EPOCH, i) for i in range(len(frame))],
                             dtype=np.int64)
    n_seen = max(1, len(banks.val_seen))
    frame["source_index"] = np.array(
        [i % n_seen if k == "extended" else -1 for i, k in enumerate(frame["kind"])], dtype=np.int64
    )
    return frame



# ----------------------------------------------------------------------------- banks


@dataclass
class SynthesisBanks:
    """Small decoded image banks the synthesis tasks carry (a few MB, shipped once per op)."""

    textures: np.ndarray
    seen: list[tuple[np.ndarray, np.ndarray]]  # the training defects
    homologous: np.ndarray | None
    heterologous: np.ndarray | None
    val_seen: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # held-out

    def synthesizer(self, cfg: Config, geometry: Geometry) -> Synthesizer:
        """Training synthesis: extended anomalies from the training defects."""
        return Synthesizer(cfg.synthesis, geometry.size, textures=self.textures, seen=self.seen,
                           homologous=self.homologous, heterologous=self.heterologous)

    def validation_synthesizer(self, cfg: Config, geometry: Geometry) -> Synthesizer:
        """Validation synthesis: extended anomalies only from the held-out real defects, so
        validation never rewards fitting the training defects."""
        return Synthesizer(cfg.synthesis, geometry.size, textures=self.textures,
                           seen=self.val_seen, homologous=self.homologous,
                           heterologous=self.heterologous)


def decode_uris(uris: list[tuple[str, str]], cfg: Config, geometry: Geometry,
                views: str = "defect") -> tuple[list[list[tuple[np.ndarray, np.ndarray]]],
                                                dict[str, str]]:
    """Decode (image, mask) pairs in-process (the small banks) and cut the views a bank keeps:
    ``defect`` -- anomalous images: the views that show the mask
    (:meth:`Geometry.defect_views`; untiled, the whole image), and for an image without a mask
    (an image-level label: :data:`~prn_ray.contracts.MASK_UNKNOWN` everywhere) every grid view,
    since where its defect lies is not known; ``one`` -- normal images: one view per image,
    drawn from a seed of its position. Returns the views of each readable image, in order, and
    the errors (uri -> reason)."""
    mode = "anomaly" if views == "defect" else "optional"

    def load(pair: tuple[str, str]):
        try:
            return images.load_pair(pair[0], pair[1], mode, cfg.storage, cfg.data)
        except Exception as exc:  # noqa: BLE001 - reported (quarantined), never a crash
            return images.row_error(exc)

    with ThreadPoolExecutor(max_workers=8) as pool:  # object-store latency overlaps
        loaded = list(pool.map(load, uris))
    out: list[list[tuple[np.ndarray, np.ndarray]]] = []
    bad: dict[str, str] = {}
    for i, ((uri, _), got) in enumerate(zip(uris, loaded)):
        if isinstance(got, str):
            bad[uri] = got
            continue
        img, mask = got
        mask = np.zeros(img.shape[:2], np.uint8) if mask is None else mask
        if views == "defect" and image_labelled(mask):
            out.append(list(zip(geometry.views(img), geometry.views(mask, nearest=True))))
        elif views == "defect":
            out.append(geometry.defect_views(img, mask))
        else:
            k = view_seed(row_seed(cfg.train.seed, VAL_EPOCH, i), geometry.n_views(*img.shape[:2]))
            out.append([(geometry.views(img, [k])[0], geometry.views(mask, [k], True)[0])])
    return out, bad


def build_banks(data: ProductData, others: dict[str, list[str]], cfg: Config,
                geometry: Geometry, bank_size: int = 16) -> SynthesisBanks:
    """Textures, the product's seen defects, and same-/other-product normals for HOA/HEA, all
    at the model's input size. Tiled, each seen defect becomes the views that show it, and
    ``data.seen`` one entry per view (the epoch plan's raw seen rows and extended anomalies
    index the views)."""
    rng = np.random.default_rng(cfg.train.seed)
    seen_views, bad_seen = decode_uris(data.seen, cfg, geometry)
    data.exclude(bad_seen)  # keeps the order of the rest: one-to-one with seen_views
    seen = [v for views in seen_views for v in views]
    if geometry.tiled:
        data.seen = [pair for pair, views in zip(data.seen, seen_views) for _ in views]

    def pick(uris: list[str]) -> list[tuple[str, str]]:
        if not uris:
            return []
        idx = rng.choice(len(uris), size=min(bank_size, len(uris)), replace=False)
        return [(uris[i], "") for i in sorted(idx)]

    held_out = data.val[data.val["label"] == "anomaly"]
    val_views, bad_val = decode_uris(list(zip(held_out["image_uri"],
                                              held_out["mask_uri"].fillna(""))), cfg, geometry)
    data.exclude(bad_val)
    homo, _ = decode_uris(pick(data.train_normals), cfg, geometry, views="one")
    other_uris = [u for p, us in sorted(others.items()) if p != data.product for u in us]
    hetero, _ = decode_uris(pick(other_uris), cfg, geometry, views="one")
    return SynthesisBanks(
        textures=load_texture_bank(cfg.synthesis, max(geometry.size), storage_cfg=cfg.storage,
                                   seed=cfg.train.seed),
        seen=seen,
        homologous=np.stack([v[0][0] for v in homo]) if homo else None,
        heterologous=np.stack([v[0][0] for v in hetero]) if hetero else None,
        # Extended copies paste a defect's pixels: only defects with a drawn mask can give them.
        val_seen=[v for views in val_views for v in views if not image_labelled(v[1])],
    )


# ----------------------------------------------------------------------------- features


def feature_dtype(model_cfg: ModelConfig) -> type[np.floating]:
    """The dtype features travel in (``model.feature_dtype``): numpy's float16 or float32."""
    return np.float16 if model_cfg.feature_dtype == "float16" else np.float32


@torch.inference_mode()
def backbone_features(backbone: torch.nn.Module, images_hwc: np.ndarray, errors: np.ndarray,
                      dtype: type[np.floating], device: torch.device | str = "cpu"
                      ) -> list[np.ndarray]:
    """The backbone's four maps of a batch of B x H x W x 3 uint8 images, as ``dtype``; rows
    whose ``error`` is set get zero features without running the backbone (their image is a
    black placeholder: it is filtered downstream, and must not cost a forward pass). One
    implementation for the Ray actor (:class:`FeatureExtractor`) and the in-process runner."""
    ok = images.error_free(errors) if errors is not None else np.ones(len(images_hwc), bool)
    if ok.all():
        return [f.float().cpu().numpy().astype(dtype, copy=False)
                for f in backbone(images_to_tensor(images_hwc, device))]
    if not ok.any():
        shapes = _feature_shapes(backbone, images_hwc.shape[1:3], device)
        return [np.zeros((len(ok), *s), dtype) for s in shapes]
    good = backbone(images_to_tensor(images_hwc[ok], device))
    out = []
    for f in good:
        full = np.zeros((len(ok), *f.shape[1:]), dtype)
        full[ok] = f.float().cpu().numpy().astype(dtype, copy=False)
        out.append(full)
    return out


def _feature_shapes(backbone: torch.nn.Module, size: tuple[int, int],
                    device: torch.device | str) -> list[tuple[int, ...]]:
    x = np.zeros((1, *size, 3), np.uint8)
    return [tuple(f.shape[1:]) for f in backbone(images_to_tensor(x, device))]


class FeatureExtractor:
    """The frozen backbone, loaded once, applied to image batches (a Ray Data actor, or in-process).

    Rows with ``error`` set pass through with zero features (:func:`backbone_features`; they
    are filtered downstream), so a bad image never fails a batch of good ones.
    """

    def __init__(self, model_cfg: ModelConfig, storage_cfg: StorageConfig, image_size: int,
                 threads: int = 1, keep: tuple[str, ...] | None = None):
        from prn_ray.model import Backbone

        self.device = inference_device()
        backbone = Backbone(model_cfg.backbone, model_cfg.weights, storage_cfg).folded()
        self.backbone = prepare(backbone, self.device, threads)
        self.dtype = feature_dtype(model_cfg)
        self.image_size = image_size
        self.keep = keep

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feats = backbone_features(self.backbone, batch["image"], batch.get("error"),
                                  self.dtype, self.device)
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(zip(FEATURE_COLUMNS, feats))
        if self.keep is not None:  # select here: a select_columns op would want a whole CPU
            out = {k: out[k] for k in (*self.keep, *FEATURE_COLUMNS)}
        return out
