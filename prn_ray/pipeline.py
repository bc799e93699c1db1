"""Ray Data datasets that move images from object storage to a training worker or a scorer.

Three flows (DESIGN §1), all streaming, all built from the same stages:

* **prototypes**: train normals -> decode -> backbone features (consumed by k-means);
* **validation**: held-out normals + held-out real seen anomalies + fixed synthetic anomalies
  -> decode -> synthesis -> features (computed once per run);
* **training**: an epoch plan (spec §3.4) -> decode -> synthesis (fresh draws each epoch, seeded
  by (seed, epoch, row)) -> features.

Decode and synthesis are stateless tasks; the frozen backbone runs in an actor pool
(``ActorPoolStrategy``, one model load per actor, GPU when the cluster has one), so training
workers only run the PRN head. Every stage keeps failed rows (``error`` set) instead of raising,
so one unreadable file never stops a run; consumers decide what to do with them.

Resources are fractional and explicit (``data.task_cpus``, ``train.feature_actor_cpus``): on a
small machine, trainer workers, Tune trial drivers and data actors must all fit at once or the
run deadlocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import ray
import torch

from prn_ray import images
from prn_ray.config import Config, ModelConfig, StorageConfig
from prn_ray.synthesis import Synthesizer, epoch_plan, load_texture_bank, row_seed

FEATURE_COLUMNS = ("feat0", "feat1", "feat2", "feat3")
# Validation groups. Synthetic defects are learned long before real ones, so validation keeps
# what comes from the held-out *real* defects apart: the raw defects (REAL) and copies of them
# pasted onto held-out normals (REAL_EXTENDED: more positions and backgrounds for the same few
# real defects, never the training defects). SYNTHETIC = simulated anomalies.
GROUP_NORMAL, GROUP_REAL, GROUP_SYNTHETIC, GROUP_REAL_EXTENDED = 0, 1, 2, 3
REAL_GROUPS = (GROUP_REAL, GROUP_REAL_EXTENDED)
_VAL_EPOCH = 2**31 - 1  # seed namespace of the fixed validation anomalies (no training epoch)


# ----------------------------------------------------------------------------- product data


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


# ----------------------------------------------------------------------------- stages


def cluster_has_gpu() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def decode_stage(ds: ray.data.Dataset, cfg: Config, image_size: int) -> ray.data.Dataset:
    """Read bytes from storage and decode/resize; failures become rows with ``error`` set."""
    return ds.map_batches(
        images.decode_batch,
        fn_kwargs={"storage_cfg": cfg.storage, "data_cfg": cfg.data, "image_size": image_size},
        batch_size=cfg.data.read_batch_size,
        batch_format="numpy",
        num_cpus=cfg.data.task_cpus,
    )


class FeatureExtractor:
    """Ray Data actor: the frozen backbone, loaded once per actor, applied to image batches.

    Rows with ``error`` set pass through with zero features (they are filtered downstream),
    so a bad image never fails a batch of good ones.
    """

    def __init__(self, model_cfg: ModelConfig, storage_cfg: StorageConfig, image_size: int,
                 threads: int = 1, keep: tuple[str, ...] | None = None):
        from prn_ray.model import Backbone

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backbone = Backbone(model_cfg.backbone, model_cfg.weights, storage_cfg).to(self.device).eval()
        if self.device.type == "cpu":
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.dtype = np.float16 if model_cfg.feature_dtype == "float16" else np.float32
        self.image_size = image_size
        self.keep = keep

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = images_to_tensor(batch["image"], self.device)
        feats = self.backbone(x)
        out = {k: v for k, v in batch.items() if k != "image"}
        for name, f in zip(FEATURE_COLUMNS, feats):
            out[name] = f.float().cpu().numpy().astype(self.dtype, copy=False)
        if self.keep is not None:  # select here: a select_columns op would want a whole CPU
            out = {k: out[k] for k in (*self.keep, *FEATURE_COLUMNS)}
        return out


def images_to_tensor(batch_images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """B x H x W x 3 uint8 -> B x 3 x H x W float in [0, 1] (the backbone normalises itself)."""
    # Ray hands read-only views of the object store; copy only then (torch warns otherwise).
    t = torch.from_numpy(np.require(batch_images, requirements=("C", "W"))).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)


def feature_stage(ds: ray.data.Dataset, cfg: Config, image_size: int,
                  keep: tuple[str, ...] | None = None) -> ray.data.Dataset:
    """Backbone features (``feat0..3``) for each row; ``keep`` names the other columns kept.

    Every stage of these pipelines requests explicit fractional CPUs: a default 1-CPU
    operator (``select_columns``, ``filter``) can starve forever on a small busy cluster."""
    gpu = cluster_has_gpu()
    cpus = cfg.train.feature_actor_cpus
    return ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={
            "model_cfg": cfg.model,
            "storage_cfg": cfg.storage,
            "image_size": image_size,
            # A 1.5-CPU actor runs 2 threads: the decode tasks beside it are mostly I/O waits.
            "threads": max(1, math.ceil(cpus)),
            "keep": keep,
        },
        compute=ray.data.ActorPoolStrategy(size=cfg.train.feature_actors),
        batch_size=cfg.train.feature_batch_size,
        batch_format="numpy",
        num_cpus=cpus,
        num_gpus=cfg.train.feature_actor_gpus if gpu else 0,
    )


def drop_errors(ds: ray.data.Dataset, cfg: Config) -> ray.data.Dataset:
    """Rows that failed to decode leave the training stream (they were reported upstream)."""
    return ds.map_batches(images.keep_error_free, batch_format="numpy",
                          num_cpus=cfg.data.task_cpus)


def _frame_dataset(frame: pd.DataFrame, cfg: Config) -> ray.data.Dataset:
    """A small driver-side table as a dataset of several blocks, so decode tasks stream.

    ``from_items`` builds its blocks in this process. (``from_pandas``/``from_arrow`` run a
    1-CPU metadata task per block: inside a Train controller or a Tune trial on a busy small
    cluster that task may never find a free CPU, and the run hangs.)
    """
    blocks = max(1, min(len(frame) // max(1, cfg.data.read_batch_size), 200))
    return ray.data.from_items(frame.to_dict("records"), override_num_blocks=blocks)


# ----------------------------------------------------------------------------- banks


@dataclass
class SynthesisBanks:
    """Small decoded image banks the synthesis tasks carry (a few MB, shipped once per op)."""

    textures: np.ndarray
    seen: list[tuple[np.ndarray, np.ndarray]]  # the training defects
    homologous: np.ndarray | None
    heterologous: np.ndarray | None
    val_seen: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # held-out

    def synthesizer(self, cfg: Config, image_size: int) -> Synthesizer:
        """Training synthesis: extended anomalies from the training defects."""
        return Synthesizer(cfg.synthesis, image_size, textures=self.textures, seen=self.seen,
                           homologous=self.homologous, heterologous=self.heterologous)

    def validation_synthesizer(self, cfg: Config, image_size: int) -> Synthesizer:
        """Validation synthesis: extended anomalies only from the held-out real defects, so
        validation never rewards fitting the training defects."""
        return Synthesizer(cfg.synthesis, image_size, textures=self.textures, seen=self.val_seen,
                           homologous=self.homologous, heterologous=self.heterologous)


def decode_uris(uris: list[tuple[str, str]], cfg: Config, image_size: int
                ) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """Decode (image, mask) pairs in-process (for the small banks). Returns pairs and errors."""
    if not uris:
        return [], {}
    batch = {"image_uri": np.array([u for u, _ in uris], dtype=object),
             "mask_uri": np.array([m or "" for _, m in uris], dtype=object)}
    out = images.decode_batch(batch, storage_cfg=cfg.storage, data_cfg=cfg.data,
                              image_size=image_size)
    pairs, bad = [], {}
    for i, (uri, _) in enumerate(uris):
        err = out["error"][i]
        if err:
            bad[uri] = err
        else:
            pairs.append((out["image"][i], out["mask"][i]))
    return pairs, bad


def build_banks(data: ProductData, others: dict[str, list[str]], cfg: Config, image_size: int,
                bank_size: int = 16) -> SynthesisBanks:
    """Textures, the product's seen defects, and same-/other-product normals for HOA/HEA."""
    rng = np.random.default_rng(cfg.train.seed)
    seen, bad_seen = decode_uris(data.seen, cfg, image_size)
    data.exclude(bad_seen)

    def pick(uris: list[str]) -> list[tuple[str, str]]:
        if not uris:
            return []
        idx = rng.choice(len(uris), size=min(bank_size, len(uris)), replace=False)
        return [(uris[i], "") for i in sorted(idx)]

    held_out = data.val[data.val["label"] == "anomaly"]
    val_seen, bad_val = decode_uris(list(zip(held_out["image_uri"],
                                             held_out["mask_uri"].fillna(""))), cfg, image_size)
    data.exclude(bad_val)
    homo, _ = decode_uris(pick(data.train_normals), cfg, image_size)
    other_uris = [u for p, us in sorted(others.items()) if p != data.product for u in us]
    hetero, _ = decode_uris(pick(other_uris), cfg, image_size)
    return SynthesisBanks(
        textures=load_texture_bank(cfg.synthesis, image_size, storage_cfg=cfg.storage,
                                   seed=cfg.train.seed),
        seen=seen,
        homologous=np.stack([im for im, _ in homo]) if homo else None,
        heterologous=np.stack([im for im, _ in hetero]) if hetero else None,
        val_seen=val_seen,
    )


# ----------------------------------------------------------------------------- datasets


def prototype_dataset(data: ProductData, cfg: Config, image_size: int) -> ray.data.Dataset:
    """Train normals -> features; keeps ``image_uri`` and ``error`` so bad files are reported."""
    frame = pd.DataFrame({"image_uri": data.train_normals, "mask_uri": ""})
    ds = decode_stage(_frame_dataset(frame, cfg), cfg, image_size)
    return feature_stage(ds, cfg, image_size, keep=("image_uri", "error"))


def plan_frame(data: ProductData, cfg: Config, epochs: range) -> pd.DataFrame:
    """The rows of the given epochs: which image each row starts from, its kind and seed."""
    frames = []
    for epoch in epochs:
        plan = epoch_plan(len(data.train_normals), len(data.seen), cfg.synthesis, epoch,
                          cfg.train.seed)
        kind = plan["kind"]
        is_seen = kind == "seen"
        normal_idx = np.maximum(plan["normal_index"], 0)
        src = np.maximum(plan["source_index"], 0)
        image_uri = np.where(
            is_seen,
            np.array([data.seen[i][0] for i in src] if data.seen else [""] * len(kind), dtype=object),
            np.array([data.train_normals[i] for i in normal_idx], dtype=object),
        )
        mask_uri = np.where(
            is_seen,
            np.array([data.seen[i][1] for i in src] if data.seen else [""] * len(kind), dtype=object),
            "",
        )
        frames.append(pd.DataFrame({
            "epoch": np.full(len(kind), epoch, dtype=np.int32),
            "kind": kind.astype(object),
            "image_uri": image_uri,
            "mask_uri": mask_uri,
            "seed": plan["seed"],
            "source_index": plan["source_index"],
        }))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def epoch_size(data: ProductData, cfg: Config) -> int:
    return len(epoch_plan(len(data.train_normals), len(data.seen), cfg.synthesis, 0,
                          cfg.train.seed)["kind"])


def steps_per_epoch(cfg: Config, epoch_rows: int, world: int | None = None) -> int:
    """Optimizer steps per epoch: full global batches of ``epoch_rows`` (``world`` workers,
    default ``train.num_workers``)."""
    world = max(1, cfg.train.num_workers if world is None else world)
    return max(1, epoch_rows // (cfg.train.batch_size * world))


def budget_epochs(cfg: Config, epoch_rows: int, world: int | None = None) -> int:
    """Epochs a run trains: ``train.epochs``, or fewer when the step budget (``train.max_steps``)
    ends it sooner (the epoch it ends in counts)."""
    tc = cfg.train
    if not tc.max_steps:
        return tc.epochs
    return min(tc.epochs, -(-tc.max_steps // steps_per_epoch(cfg, epoch_rows, world)))


def planned_epochs(cfg: Config, epoch_rows: int) -> int:
    """Epochs the training stream holds: :func:`budget_epochs` plus one for batches that
    straddle an epoch boundary. (A step-budgeted run with ``epochs: 10000`` would otherwise
    plan 10000 epochs of rows.)"""
    extra = 1 if cfg.train.max_steps else 0
    return min(cfg.train.epochs, budget_epochs(cfg, epoch_rows) + extra)


def train_dataset(data: ProductData, banks: SynthesisBanks, cfg: Config, image_size: int,
                  start_epoch: int = 0) -> ray.data.Dataset:
    """Epochs ``start_epoch ..`` :func:`planned_epochs` - 1, each with fresh seeded synthesis."""
    frame = plan_frame(data, cfg, range(start_epoch, planned_epochs(cfg, epoch_size(data, cfg))))
    ds = decode_stage(_frame_dataset(frame, cfg), cfg, image_size)
    ds = drop_errors(ds, cfg)
    ds = ds.map_batches(banks.synthesizer(cfg, image_size), batch_size=cfg.data.read_batch_size,
                        batch_format="numpy", num_cpus=cfg.data.task_cpus)
    return feature_stage(ds, cfg, image_size, keep=("mask", "epoch"))


def validation_frame(data: ProductData, banks: SynthesisBanks, cfg: Config) -> pd.DataFrame:
    """Held-out normals and real anomalies, plus one fixed synthetic anomaly per held-out normal,
    seeded apart from every training epoch: alternately a simulated anomaly and (when the
    product has held-out real defects) an extended copy of a held-out real defect."""
    val = data.val
    normals = val[val["label"] == "normal"]["image_uri"].tolist()
    real = val[val["label"] == "anomaly"]
    rows = [{"image_uri": u, "mask_uri": "", "kind": "normal", "group": GROUP_NORMAL}
            for u in normals]
    rows += [{"image_uri": u, "mask_uri": m or "", "kind": "seen", "group": GROUP_REAL}
             for u, m in zip(real["image_uri"], real["mask_uri"])]
    for i, uri in enumerate(normals):
        extended = bool(i % 2 and banks.val_seen)
        rows.append({"image_uri": uri, "mask_uri": "", "kind": "extended" if extended
                     else "simulated", "group": GROUP_REAL_EXTENDED if extended
                     else GROUP_SYNTHETIC})
    frame = pd.DataFrame(rows, columns=["image_uri", "mask_uri", "kind", "group"])
    frame["seed"] = np.array([row_seed(cfg.train.seed, _VAL_EPOCH, i) for i in range(len(frame))],
                             dtype=np.int64)
    n_seen = max(1, len(banks.val_seen))
    frame["source_index"] = np.array(
        [i % n_seen if k == "extended" else -1 for i, k in enumerate(frame["kind"])], dtype=np.int64
    )
    return frame


def validation_dataset(data: ProductData, banks: SynthesisBanks, cfg: Config,
                       image_size: int) -> ray.data.Dataset:
    frame = validation_frame(data, banks, cfg)
    ds = decode_stage(_frame_dataset(frame, cfg), cfg, image_size)
    ds = drop_errors(ds, cfg)
    ds = ds.map_batches(banks.validation_synthesizer(cfg, image_size),
                        batch_size=cfg.data.read_batch_size,
                        batch_format="numpy", num_cpus=cfg.data.task_cpus)
    return feature_stage(ds, cfg, image_size, keep=("mask", "group"))

