"""Training one PRN per product with Ray Train, all products at once.

Shape of a run (``train_all``):

* one Ray Tune trial per product (Ray's many-model pattern) runs :func:`train_product`, a small
  driver that builds the product's synthesis banks and prototypes (k-means on streamed
  backbone features), then launches a ``TorchTrainer`` (Train V2) whose workers run
  :func:`train_loop_per_worker` on the Ray Data shard of features;
* after training it calibrates a threshold on validation data and publishes the model to the
  registry. One product's failure is recorded in the run summary and never stops the others.

The loop counts steps, not epochs (reference run notes: steps decide): warm-up + cosine
schedule sized by the step budget, bf16 autocast + channels_last on CPU, validation on held-out
real and synthetic anomalies, best-epoch selection on validation only (the test split never
reaches this module), checkpoints through ``ray.train.report`` for resumption.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_save

from prn_ray import images, metrics, registry, storage
from prn_ray.config import Config, from_dict
from prn_ray.model import Backbone, PRNHead, PRNLoss, image_score
from prn_ray.model.prn import area_kernel
from prn_ray.model.reference import NormalReference, fit_reference
from prn_ray.pipeline import (
    FEATURE_COLUMNS,
    GROUP_NORMAL,
    GROUP_SYNTHETIC,
    REAL_GROUPS,
    ProductData,
    budget_epochs,
    build_banks,
    epoch_size,
    planned_epochs,
    prototype_dataset,
    steps_per_epoch,
    train_dataset,
    validation_dataset,
)
from prn_ray.runtime import progress, quiet_ray_data

STATE_FILE = "state.json"

# ----------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs (stored as JSON in checkpoints)."""

    epoch: int = -1  # last completed epoch
    step: int = 0
    elapsed_s: float = 0.0  # training time spent so far (for time budgets across restarts)
    best_score: float = -math.inf
    best_epoch: int = -1
    best_metrics: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stale_validations: int = 0
    stopped: str = ""  # why training stopped early ("" = ran to the end)
    restarts: int = 0
    node_id: str = ""  # Ray node of the rank-0 worker (placement, for scale checks)
    first_batch_at: float = 0.0  # unix time of the first training batch (start-up cost)
    resumes: list[dict[str, int]] = field(default_factory=list)  # data/checkpoint mismatches

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        doc = json.loads(text)
        doc["best_score"] = -math.inf if doc.get("best_score") is None else doc["best_score"]
        return cls(**doc)

    def to_json(self) -> str:
        doc = asdict(self)
        doc["best_score"] = None if math.isinf(self.best_score) else self.best_score
        return json.dumps(doc, indent=1, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(type(obj).__name__)


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str,
              time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 1 % (or constant) over the budget.

    The budget is whichever runs out first: steps, or wall-clock time (``time_fraction`` =
    elapsed / time budget), so a run stopped by its time budget has already annealed instead
    of stopping at a high learning rate.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total_steps <= warmup:
        return 1.0
    t = min(1.0, max((step - warmup) / max(1, total_steps - warmup), time_fraction))
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: str, head: torch.nn.Module, best: dict[str, torch.Tensor] | None,
                    optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    save_file(_cpu_state(head.state_dict()), os.path.join(directory, "head.safetensors"))
    if best is not None:
        save_file(best, os.path.join(directory, "best.safetensors"))
    # Optimizer state is tensors and plain containers: readable with weights_only=True.
    torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        f.write(state.to_json())


def load_checkpoint(directory: str, head: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                    ) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    head.load_state_dict(load_file(os.path.join(directory, "head.safetensors")))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"),
                                             weights_only=True, map_location="cpu"))
    best_path = os.path.join(directory, "best.safetensors")
    best = load_file(best_path) if os.path.exists(best_path) else None
    with open(os.path.join(directory, STATE_FILE)) as f:
        return TrainState.from_json(f.read()), best


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def last_completed_epoch(run_uri: str, cfg: Config) -> int:
    """Epoch of the run's latest *registered* checkpoint (-1 if none): where data resumes.

    Ray Train's checkpoint-manager snapshot lists the checkpoints it registered, with the
    metrics we reported (``epoch`` among them): exactly what ``get_checkpoint()`` hands the
    restarted workers. Checkpoint folders on storage that are not in it (a worker killed
    between upload and registration) are ignored, so data and model state cannot disagree.
    """
    snapshot = storage.join(run_uri, "checkpoint_manager_snapshot.json")
    if not storage.exists(snapshot, cfg.storage):
        return -1
    try:
        doc = json.loads(storage.read_text(snapshot, cfg.storage))
        return max((int(r["metrics"]["epoch"]) for r in doc["checkpoint_results"]), default=-1)
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"unreadable checkpoint snapshot {snapshot}: {exc}") from exc


# ----------------------------------------------------------------------------- validation


@dataclass
class ValidationSet:
    """Validation features held in worker memory (computed once by the feature actors)."""

    features: list[torch.Tensor]  # per level: N x C x H x W (float16/32)
    masks: torch.Tensor  # N x S x S uint8
    groups: torch.Tensor  # N int (GROUP_*)

    @classmethod
    def from_shard(cls, shard) -> ValidationSet:
        feats: list[list[torch.Tensor]] = [[] for _ in FEATURE_COLUMNS]
        masks, groups = [], []
        for batch in shard.iter_torch_batches(batch_size=64):
            for i, c in enumerate(FEATURE_COLUMNS):
                feats[i].append(batch[c])
            masks.append(batch["mask"])
            groups.append(batch["group"])
        if not masks:
            raise RuntimeError("the validation set is empty: no readable held-out images")
        return cls([torch.cat(f) for f in feats], torch.cat(masks), torch.cat(groups))

    def __len__(self) -> int:
        return int(self.masks.shape[0])


@torch.no_grad()
def predict_logits(head: torch.nn.Module, features: list[torch.Tensor], batch_size: int,
                   device: torch.device, precision: str) -> torch.Tensor:
    """Logit maps (N x S x S float32) of cached features, in eval mode, batch by batch.

    Logits, not probabilities: the sigmoid is 1.0 in float32 beyond logit ≈ 17, and ties at
    the top would distort the pixel metrics that validation selects on."""
    was_training = head.training
    head.eval()
    out = []
    try:
        for i in range(0, features[0].shape[0], batch_size):
            chunk = [f[i:i + batch_size].to(device) for f in features]
            with _autocast(device, precision):
                logits = head(chunk)
            out.append(logits.float()[:, 0].cpu())
    finally:
        head.train(was_training)
    return torch.cat(out)


def validation_metrics(logits: torch.Tensor, val: ValidationSet, cfg: Config
                       ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Metrics on all validation images and on the real / synthetic subsets.

    Returns (metrics, image scores, image labels). Keys: ``val_<metric>``,
    ``val_real_<metric>`` (held-out normals + held-out real defects and their extended copies),
    ``val_synth_<metric>`` (held-out normals + simulated anomalies), for image_auroc,
    pixel_auroc, aupro and pixel_ap, plus ``val_real_mean`` / ``val_mean``, the mean of the
    four (the default selection rule).
    """
    scores = image_score(torch.sigmoid(logits[:, None]), cfg.model.score, cfg.model.score_topk,
                         area_kernel(tuple(logits.shape[-2:]))).numpy()
    masks = val.masks.numpy().astype(bool)
    groups = val.groups.numpy()
    labels = masks.reshape(len(masks), -1).any(1)
    m = logits.numpy()  # pixel metrics rank pixels: logits rank them without sigmoid ties
    out: dict[str, float] = {}
    real = np.isin(groups, REAL_GROUPS)
    subsets = {"val": np.ones_like(labels),
               "val_real": (groups == GROUP_NORMAL) | real,
               "val_synth": (groups == GROUP_NORMAL) | (groups == GROUP_SYNTHETIC)}
    for prefix, sel in subsets.items():
        if not (sel & labels).any():
            continue  # no anomaly in this subset (e.g. no held-out real defect)
        acc = metrics.PixelMetricAccumulator(fpr_limit=0.3)
        acc.update(m[sel], masks[sel], scores=scores[sel], labels=labels[sel])
        values = {k: float(v) for k, v in acc.compute().items()}
        out.update({f"{prefix}_{k}": v for k, v in values.items()})
        four = [values[k] for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")]
        out[f"{prefix}_mean"] = float(np.mean(four)) if not np.isnan(four).any() else math.nan
    return out, scores, labels


def calibrate(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, cfg: Config
              ) -> dict[str, Any]:
    """Decision threshold on validation image scores (``is_anomaly = score > threshold``).

    ``f1``: the F1-optimal threshold over held-out normals vs. the anomalies that come from
    held-out *real* defects (raw and extended copies); only when a product has none, vs. the
    simulated ones. ``fpr``: the threshold that flags at most ``calibration_target_fpr`` of the
    held-out normals.
    """
    normals = scores[~labels]
    real = labels & np.isin(groups, REAL_GROUPS)
    doc: dict[str, Any] = {"rule": cfg.train.calibration, "n_normal": int((~labels).sum()),
                           "n_anomalous": int(labels.sum()),
                           "n_real_anomalous": int(real.sum())}
    if real.any():  # weigh real defects only: synthetic ones are easier and would lower it
        keep = ~labels | real
        scores, labels = scores[keep], labels[keep]
    if cfg.train.calibration == "fpr" or not labels.any():
        t = metrics.threshold_at_fpr(normals, cfg.train.calibration_target_fpr)
        doc.update(rule="fpr", threshold=t, target_fpr=cfg.train.calibration_target_fpr)
    else:
        t, f1 = metrics.f1_optimal_threshold(labels, scores)
        doc.update(threshold=t, f1=f1)
    doc["val_fpr"] = float((normals > doc["threshold"]).mean()) if normals.size else math.nan
    doc["val_tpr"] = float((scores[labels] > doc["threshold"]).mean()) if labels.any() else math.nan
    doc["score_rule"] = cfg.model.score
    return doc


# ----------------------------------------------------------------------------- worker loop


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls/convolutions run natively (CUDA, AVX-512 BF16 or AMX CPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def metric_key(name: str) -> str:
    """``pixel_ap`` -> ``val_pixel_ap`` (names may be given with or without the prefix)."""
    return name if name.startswith("val") else f"val_{name}"


def selection_score(vm: dict[str, float], cfg: Config) -> float:
    """The value best-epoch selection (and, by default, tuning) maximises.

    ``train.selection_metric`` (default ``real_mean``: the mean of image AUROC, pixel AUROC,
    AUPRO and pixel AP on held-out normals + held-out real defects and their extended copies).
    A product without held-out real defects falls back to the same metric on all validation
    images."""
    key = metric_key(cfg.train.selection_metric)
    if key not in vm and key.startswith("val_real_"):
        key = "val_" + key.removeprefix("val_real_")
    return float(vm.get(key, math.nan))


def _stop_everywhere(flag: bool, world: int) -> bool:
    """Workers must agree on stopping (a lone stop deadlocks the others' all-reduce)."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _shown(record: dict[str, Any]) -> str:
    """The validation figures of a progress line: the real held-out defects first."""
    keys = ("val_real_pixel_ap", "val_real_aupro", "val_real_image_auroc", "val_pixel_ap",
            "val_synth_pixel_ap")
    return " ".join(f"{k} {record[k]:.3f}" for k in keys if k in record)


def make_optimizer(head: torch.nn.Module, tc) -> torch.optim.Optimizer:
    """AdamW with decoupled decay on convolution and linear weights only (``adamw``), or the
    public code's Adam with coupled L2 on every parameter (``adam``).

    Norm scales/shifts, biases, the attention's depthwise Q/K/V (a per-dimension scale and
    shift) and the prior's few scalars are not decayed: with coupled L2 after gradient
    clipping, their decay term was two orders of magnitude larger than the loss gradient and
    they shrank instead of learning.
    """
    if tc.optimizer == "adam":
        return torch.optim.Adam(head.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    decay, no_decay = parameter_groups(head)
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)


def parameter_groups(head: torch.nn.Module) -> tuple[list[torch.nn.Parameter],
                                                     list[torch.nn.Parameter]]:
    """(decayed, not decayed): the weights of Conv/Linear layers vs everything else."""
    decayed = {id(m.weight) for m in head.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Conv1d))}
    params = [p for p in head.parameters() if p.requires_grad]
    return ([p for p in params if id(p) in decayed], [p for p in params if id(p) not in decayed])


class HeadTrainer:
    """Optimisation of one PRN head: steps, epoch ends (validation, best-epoch selection,
    calibration, stopping) and checkpoint state. Shared by the Ray Train worker loop and the
    single-process loop (:func:`train_local`), so both train exactly the same way.

    ``report(record, stop)`` is called at every epoch end that validated or stops; the Ray
    loop turns it into ``ray.train.report`` with a checkpoint.
    """

    def __init__(self, head: PRNHead, cfg: Config, device: torch.device, epoch_rows: int,
                 world: int = 1, say=lambda msg: None):
        tc = cfg.train
        self.cfg, self.device, self.world, self.say = cfg, device, world, say
        self.precision = resolve_precision(tc.precision, device)
        self.head = head.to(device)
        if tc.channels_last and device.type == "cpu":
            self.head = self.head.to(memory_format=torch.channels_last)
        self.model: torch.nn.Module = self.head
        self.optimizer = make_optimizer(self.head, tc)
        self.loss_fn = PRNLoss.from_config(tc)
        self.state, self.best = TrainState(), None
        self.epoch_rows = epoch_rows
        self.steps_per_epoch = steps_per_epoch(cfg, epoch_rows, world)
        self.budget_epochs = budget_epochs(cfg, epoch_rows, world)  # fewer under a step budget
        self.total_steps = self.steps_per_epoch * tc.epochs
        if tc.max_steps:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.val: ValidationSet | None = None
        self._mark = 0.0
        self.say_every_s = 120.0

    # -- state ------------------------------------------------------------------------------

    def restore(self, directory: str) -> None:
        self.state, self.best = load_checkpoint(directory, self.head, self.optimizer)
        self.state.restarts += 1

    def save(self, directory: str) -> None:
        save_checkpoint(directory, self.head, self.best, self.optimizer, self.state)

    def _start(self) -> None:
        tc = self.cfg.train
        if self.state.step == 0 and self.state.best_epoch < 0:
            self._calibrate_prior()
            self._initial_validation()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, self.total_steps, tc.warmup_steps, tc.schedule,
                                self.time_fraction()),
            last_epoch=self.state.step - 1 if self.state.step else -1,
        )

    def elapsed(self) -> float:
        """Training seconds so far, including the running epoch (restarts keep theirs)."""
        return self.state.elapsed_s + (time.time() - self._mark if self._mark else 0.0)

    def time_fraction(self) -> float:
        budget = self.cfg.train.time_budget_s
        return self.elapsed() / budget if budget else 0.0

    # -- one step ---------------------------------------------------------------------------

    def step(self, feats: list[torch.Tensor], mask: torch.Tensor) -> float:
        tc = self.cfg.train
        if tc.channels_last and self.device.type == "cpu":
            feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
        target = mask.float()[:, None]
        with _autocast(self.device, self.precision):
            correction, prior = self.model(feats, parts=True)
        if prior is None:
            loss = self.loss_fn(correction.float(), target).total
        else:
            # Deep supervision of the correction alone: on top of the prior, normal pixels
            # start near probability 0 and give the focal loss almost no gradient (p^γ), so
            # the correction learned slowly and erratically; supervised on its own it gets the
            # whole signal from the first step (demo data, 128 px: validation pixel AUROC
            # 0.80 -> 0.79 without, 0.80 -> 0.87 with, 240 steps).
            loss = self.loss_fn(correction.float() + prior, target).total
            if tc.correction_loss_weight:
                loss = loss + tc.correction_loss_weight * self.loss_fn(correction.float(),
                                                                       target).total
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.state.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), tc.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        return float(loss.detach())

    # -- before the first step --------------------------------------------------------------

    def _calibrate_prior(self) -> None:
        """The residual prior is calibrated on the held-out normals before any step."""
        if self.head.memory is None:
            return
        normals = (self.val.groups == GROUP_NORMAL) if self.val is not None else None
        if normals is None or not bool(normals.any()):
            raise RuntimeError("the residual prior needs held-out normal images to calibrate "
                               "on: set data.val_normal_fraction > 0 (or split=val normals in "
                               "the manifest), or model.residual_prior=false")
        feats = [f[normals].to(self.device) for f in self.val.features]
        self.head.calibrate(feats)

    def _initial_validation(self) -> None:
        """Validate the untrained head (epoch -1): with a residual prior this is the floor,
        and it is a candidate for the best epoch like any other, so a run whose training
        never beats its starting point keeps the starting point."""
        if self.val is None:
            return
        record: dict[str, Any] = {"epoch": -1, "step": 0, "lr": 0.0, "loss": math.nan,
                                  "elapsed_s": 0.0, "train_s": 0.0}
        t0 = time.time()
        self._validate_and_select(-1, record)
        record["val_s"] = round(time.time() - t0, 3)
        self.state.history.append(record)
        self.say("before training: " + _shown(record))

    # -- epoch end --------------------------------------------------------------------------

    def _validate_and_select(self, epoch: int, record: dict[str, Any]) -> None:
        state = self.state
        vm, scores, labels = self.validate()
        score = selection_score(vm, self.cfg)
        vm["val_selection"] = score
        record.update(vm)
        if not math.isnan(score) and score > state.best_score:
            state.best_score, state.best_epoch, state.best_metrics = score, epoch, vm
            state.calibration = calibrate(scores, labels, self.val.groups.numpy(), self.cfg)
            self.best = _cpu_state(self.head.state_dict())
            state.stale_validations = 0
        else:
            state.stale_validations += 1

    def validate(self) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        maps = predict_logits(self.head, self.val.features, self.cfg.train.batch_size, self.device,
                            self.precision)
        return validation_metrics(maps, self.val, self.cfg)

    def end_epoch(self, epoch: int, mean_loss: float, report) -> bool:
        """Validate/select/calibrate as configured, call ``report``. True = stop training."""
        tc, state = self.cfg.train, self.state
        state.epoch = epoch
        now = time.time()
        train_s = now - self._mark  # steps and data waits of this epoch, no validation
        state.elapsed_s += train_s
        self._mark = now
        last = state.step >= self.total_steps or epoch >= tc.epochs - 1
        over_time = self.time_fraction() >= 1.0  # one definition of the time budget
        due = (epoch + 1) % tc.val_every_epochs == 0 or last or over_time
        record: dict[str, Any] = {"epoch": epoch, "step": state.step,
                                  "lr": self.optimizer.param_groups[0]["lr"], "loss": mean_loss,
                                  "elapsed_s": round(state.elapsed_s, 1),
                                  "train_s": round(train_s, 3)}
        stop = last or over_time
        if due:
            self._validate_and_select(epoch, record)
            record["val_s"] = round(time.time() - now, 3)
            if tc.early_stop_patience and state.stale_validations >= tc.early_stop_patience:
                stop, state.stopped = True, "early_stop"
        if over_time and not state.stopped:
            state.stopped = "time_budget"
        stop = _stop_everywhere(stop, self.world)
        state.history.append(record)
        self.say(f"epoch {epoch + 1}/{self.budget_epochs} step {state.step}/{self.total_steps} "
                 f"loss {mean_loss:.4f} lr {record['lr']:.2e} " + _shown(record)
                 + f" ({state.elapsed_s:.0f}s)")
        if due or stop:
            out = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            out.update(best_score=state.best_score if state.best_epoch >= 0 else math.nan,
                       best_epoch=state.best_epoch)
            report(out)
        state.elapsed_s += time.time() - self._mark  # validation and reporting count too
        self._mark = time.time()
        return stop

    # -- the loop ---------------------------------------------------------------------------

    def fit(self, batches, report) -> TrainState:
        """Consume batches (dicts with ``feat0..3``, ``mask``, ``epoch``) until the budget."""
        self._mark = time.time()  # prior calibration and the first validation count too
        self._start()
        loss_sum, n, in_epoch, skipped = 0.0, 0, 0, 0
        epoch = self.state.epoch + 1  # the checkpoint, not the data stream, says where we are
        first = True
        stopped = (self.state.step >= self.total_steps or epoch >= self.cfg.train.epochs
                   or bool(self.state.stopped))  # restored from a finished run: nothing to do
        last_say = time.time()
        self.model.train()
        for batch in ([] if stopped else batches):
            if first:
                # The stream restarts at the epoch after the last *registered* checkpoint; if
                # that is behind the checkpoint we restored, skip what was trained already.
                if int(batch["epoch"].max()) < epoch:
                    skipped += 1
                    continue
                data_epoch, first = int(batch["epoch"].min()), False
                if skipped or data_epoch != epoch:
                    self.say(f"data stream at epoch {data_epoch + 1}, checkpoint after epoch "
                             f"{epoch}: skipped {skipped} replayed batch(es)")
                    self.state.resumes.append({"epoch": epoch, "data_epoch": data_epoch,
                                               "skipped_batches": skipped})
                epoch = max(epoch, data_epoch)
                self.state.first_batch_at = self.state.first_batch_at or time.time()
            loss_sum += self.step([batch[c] for c in FEATURE_COLUMNS], batch["mask"])
            n, in_epoch = n + 1, in_epoch + 1
            if time.time() - last_say >= self.say_every_s:  # long epochs: show life
                last_say = time.time()
                self.say(f"epoch {epoch + 1} step {in_epoch}/{self.steps_per_epoch} "
                         f"loss {loss_sum / n:.4f} ({self.elapsed():.0f}s)")
            # A time budget ends the epoch early rather than overshooting by up to an epoch.
            if (in_epoch >= self.steps_per_epoch or self.state.step >= self.total_steps
                    or self.time_fraction() >= 1.0):
                if self.end_epoch(epoch, loss_sum / n, report):
                    stopped = True
                    break
                epoch, in_epoch, loss_sum, n = epoch + 1, 0, 0.0, 0
        if not stopped and n:
            self.end_epoch(epoch, loss_sum / n, report)  # data ran out mid-epoch
        return self.state


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: PRN head on the features streamed by the ``train`` dataset shard."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(config["cfg"])
    product, tc = config["product"], cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc.torch_threads or max(1, round(tc.cpus_per_worker)))
    torch.manual_seed(tc.seed + rank)
    np.random.seed(tc.seed + rank)
    device = ray.train.torch.get_device()
    say = (lambda msg: progress(product, msg)) if rank == 0 else (lambda msg: None)

    head = PRNHead(cfg.model, config["channels"], config["image_size"], config["feature_sizes"])
    head.set_reference(ray.get(config["reference"]))
    trainer = HeadTrainer(head, cfg, device, config["epoch_rows"], world, say)
    checkpoint = ray.train.get_checkpoint()
    node_id = ray.get_runtime_context().get_node_id()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.restore(d)
        say(f"resumed from checkpoint after epoch {trainer.state.epoch} "
            f"(step {trainer.state.step})")
    trainer.state.node_id = node_id
    if world > 1:
        trainer.model = ray.train.torch.prepare_model(trainer.head)
    trainer.val = ValidationSet.from_shard(ray.train.get_dataset_shard("val"))
    say(f"training: {trainer.epoch_rows} samples/epoch, {trainer.steps_per_epoch} steps/epoch, "
        f"budget {trainer.total_steps} steps, {len(trainer.val)} validation images, "
        f"{device} {trainer.precision}")

    def report(metrics_row: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                trainer.save(d)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics_row, checkpoint=ckpt)

    batches = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=tc.batch_size, drop_last=True, device=device, prefetch_batches=2)
    trainer.fit(batches, report)


# ----------------------------------------------------------------------------- per product


@dataclass
class ProductResult:
    product: str
    status: str  # ok | failed
    version: str | None = None
    epochs: int = 0
    steps: int = 0
    best_epoch: int = -1
    metrics: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    wall_s: float = 0.0
    start: float = 0.0
    end: float = 0.0
    quarantined: int = 0
    error: str | None = None
    stopped: str = ""
    node_id: str = ""
    startup_s: float = 0.0  # trainer.fit() call -> first training batch (fixed cost)


def _storage_filesystem(cfg: Config, uri: str):
    """(filesystem, path) for Ray's ``storage_path``/``storage_filesystem`` (S3 endpoints)."""
    loc = storage.resolve(uri, cfg.storage)
    return (loc.fs, loc.path) if loc.scheme == "s3" else (None, loc.path)


def feature_geometry(cfg: Config, image_size: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Channels and map sizes of the backbone's four levels (random init: shapes only)."""
    probe = Backbone(cfg.model.backbone, "none")
    return probe.channels, probe.feature_sizes((image_size, image_size))


_REFERENCE_CACHE_VERSION = 2  # bump when feature extraction or the reference fit change


def reference_cache_uri(data: ProductData, cfg: Config, image_size: int) -> str:
    """Where the normal reference of these images and settings is cached (content-keyed)."""
    m = cfg.model
    weights = m.weights
    key_doc = {
        "v": _REFERENCE_CACHE_VERSION,  # no product name: same images, same reference
        "normals": storage.fingerprint(data.train_normals, cfg.storage),
        "backbone": m.backbone, "weights": weights,
        # a weights file is keyed by its content too, not only by its name
        "weights_file": (storage.fingerprint([weights], cfg.storage)
                         if "/" in weights or "://" in weights else None),
        "image_size": image_size, "feature_dtype": m.feature_dtype,
        "prototypes": m.use_prototypes, "standardize": m.standardize,
        "ratio": m.prototype_ratio, "max_images": m.prototype_max_images,
        "iters": m.kmeans_iters, "seed": cfg.train.seed,
        "prior": ([m.prior_levels, m.prior_bank_size, m.prior_pool]
                  if m.residual_prior else None),
        "max_image_pixels": cfg.data.max_image_pixels, "min_side": cfg.data.min_image_side,
    }
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:32]
    return storage.join(cfg.storage.runs_uri, "prototype_cache", f"{key}.safetensors")


def _load_cached_reference(uri: str, cfg: Config
                           ) -> tuple[NormalReference, dict[str, str]] | None:
    if not storage.exists(uri, cfg.storage):
        return None
    blob = storage.read_bytes(uri, cfg.storage)
    header_len = int.from_bytes(blob[:8], "little")  # safetensors: u64 length + JSON header
    meta = json.loads(blob[8:8 + header_len])["__metadata__"]
    ref = NormalReference.from_tensors(safetensors_load(blob), int(meta["n_normal"]))
    return ref, json.loads(meta["quarantine"])


def compute_reference(data: ProductData, cfg: Config, image_size: int) -> NormalReference:
    """The product's normal reference (statistics, prototypes, memory banks): from the cache
    when the same images and settings were fitted before, else stream features, quarantine
    unreadable images and fit."""
    # Random backbone weights differ from process to process: nothing worth caching.
    cacheable = cfg.train.prototype_cache and cfg.model.weights != "none"
    cache = reference_cache_uri(data, cfg, image_size) if cacheable else None
    hit = _load_cached_reference(cache, cfg) if cache else None
    if hit is not None:
        ref, bad = hit
        data.exclude(bad)
        progress(data.product, f"normal reference: cached ({cache.rsplit('/', 1)[-1][:12]}…)")
        return ref
    progress(data.product, "normal reference: streaming normal features (statistics, "
                           "prototypes, patch memory)")
    ref, bad = _fit_reference_streamed(data, cfg, image_size)
    if cache:
        blob = safetensors_save(ref.tensors(), metadata={"n_normal": str(ref.n_normal),
                                                         "quarantine": json.dumps(bad)})
        storage.write_bytes(cache, blob, cfg.storage)  # atomic: readers see all or nothing
    return ref


def _fit_reference_streamed(data: ProductData, cfg: Config, image_size: int
                            ) -> tuple[NormalReference, dict[str, str]]:
    per_level: list[list[np.ndarray]] = [[] for _ in FEATURE_COLUMNS]
    uris: list[np.ndarray] = []
    bad: dict[str, str] = {}
    for batch in prototype_dataset(data, cfg, image_size).iter_batches(
            batch_size=64, batch_format="numpy"):
        err = batch["error"]
        ok = images.error_free(err)
        for uri, e in zip(batch["image_uri"][~ok], err[~ok]):
            bad[str(uri)] = str(e)
        uris.append(batch["image_uri"][ok])
        for j, col in enumerate(FEATURE_COLUMNS):
            per_level[j].append(batch[col][ok])
    data.exclude(bad)
    if not data.train_normals:
        raise RuntimeError(f"product {data.product}: no readable normal training image")
    # Ray Data streams blocks in completion order: sort by URI so the seeded fits (k-means
    # init, subsamples, coreset) see the same order every run and are reproducible.
    order = np.argsort(np.concatenate(uris).astype(str), kind="stable")
    feats = [torch.from_numpy(np.concatenate(level)[order]) for level in per_level]
    return fit_reference(feats, cfg.model, seed=cfg.train.seed), bad


def describe_reference(ref: NormalReference) -> str:
    parts = [f"normal reference from {ref.n_normal} normals"]
    if ref.prototypes:
        parts.append(f"K={ref.prototypes[0].shape[0]} prototypes per scale")
    if ref.banks:
        parts.append("memory " + "/".join(str(b.shape[0]) for b in ref.banks) + " patches")
    return ", ".join(parts)


def train_product(cfg: Config, product: str, catalog: pd.DataFrame, run_id: str,
                  others: dict[str, list[str]] | None = None, *, publish: bool = True,
                  callbacks: list | None = None) -> ProductResult:
    """Prototypes -> TorchTrainer -> calibration -> registry, for one product.

    Never raises: failures come back as ``status="failed"`` with the reason. Tuning trials
    pass ``publish=False`` (nothing is registered) and a ``TuneReportCallback``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.time()
    result = ProductResult(product=product, status="failed", start=t0)
    try:
        tc, size = cfg.train, cfg.data.image_size
        data = ProductData.from_catalog(catalog, product)
        progress(product, f"{len(data.train_normals)} train normals, {len(data.seen)} seen "
                          f"anomalies, {len(data.val)} validation images")
        banks = build_banks(data, others or {}, cfg, size)
        reference = compute_reference(data, cfg, size)
        if data.quarantine:
            progress(product, f"quarantined {len(data.quarantine)} unreadable image(s)")
        progress(product, describe_reference(reference))
        channels, feature_sizes = feature_geometry(cfg, size)
        rows = epoch_size(data, cfg)
        run_name = f"{run_id}-{product}"
        fs, path = _storage_filesystem(cfg, cfg.storage.runs_uri)
        run_uri = storage.join(cfg.storage.runs_uri, run_name)
        use_gpu = tc.use_gpu == "true" or (
            tc.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)

        def train_data():
            # Called by Ray Train at every (re)start of the worker group: resume the stream
            # at the epoch after the last complete checkpoint instead of replaying epoch 0.
            start = last_completed_epoch(run_uri, cfg) + 1
            last = planned_epochs(cfg, rows) - 1
            return train_dataset(data, banks, cfg, size, start_epoch=min(start, last))

        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": cfg.to_dict(), "product": product, "channels": channels,
                "feature_sizes": feature_sizes, "image_size": size, "epoch_rows": rows,
                "reference": ray.put(reference),
            },
            scaling_config=ScalingConfig(
                num_workers=tc.num_workers, use_gpu=use_gpu,
                resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            ),
            run_config=RunConfig(
                name=run_name, storage_path=path, storage_filesystem=fs,
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=tc.max_failures),
                callbacks=callbacks,
            ),
            datasets={"train": train_data,
                      "val": validation_dataset(data, banks, cfg, size)},
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        )
        t_fit = time.time()
        fit = trainer.fit()
        if fit.checkpoint is None:
            raise RuntimeError(f"training produced no checkpoint ({fit.error})")
        with fit.checkpoint.as_directory() as d:
            head = PRNHead(cfg.model, channels, size, feature_sizes)
            state, best = load_checkpoint(d, head, None)
        if best is None or state.calibration is None:
            raise RuntimeError("no validation result was ever better than nothing "
                               "(metrics were NaN); nothing to register")
        version = None
        if publish:
            backbone = Backbone(cfg.model.backbone, cfg.model.weights, cfg.storage)
            version = registry.publish(
                cfg, product, head_state=best, backbone_state=backbone.state_dict(),
                image_size=size, calibration=state.calibration,
                metrics={"validation": state.best_metrics, "best_epoch": state.best_epoch,
                         "epochs": state.epoch + 1, "steps": state.step,
                         "history": state.history, "restarts": state.restarts,
                         "resumes": state.resumes,
                         "stopped": state.stopped, "run_id": run_id,
                         "quarantined": data.quarantine,
                         "backbone_weights": backbone.weights_label},
            )
        result = ProductResult(
            product=product, status="ok", version=version, epochs=state.epoch + 1,
            steps=state.step, best_epoch=state.best_epoch, metrics=state.best_metrics,
            threshold=state.calibration["threshold"], quarantined=len(data.quarantine),
            stopped=state.stopped, node_id=state.node_id, start=t0,
            startup_s=round(state.first_batch_at - t_fit, 1) if state.first_batch_at else 0.0)
        progress(product, (f"registered version {version}" if version else "trained")
                 + f" (best epoch {state.best_epoch + 1}, threshold {result.threshold:.4f})")
    except Exception as exc:  # one product's failure never stops the others
        result.error = storage.redact(f"{type(exc).__name__}: {exc}")
        progress(product, f"FAILED: {result.error}")
        traceback.print_exc()
    result.end = time.time()
    result.wall_s = round(result.end - t0, 1)
    return result


# ----------------------------------------------------------------------------- all products


def new_run_id() -> str:
    return time.strftime("train-%Y%m%d-%H%M%S", time.gmtime())


def _product_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one product's driver. Writes its result as JSON, then reports."""
    from ray import tune

    quiet_ray_data()
    cfg = from_dict(config["cfg"]).replace(config["overrides"].get(config["product"], {}))
    catalog = ray.get(config["catalog"])
    result = train_product(cfg, config["product"], catalog, config["run_id"], config["others"])
    doc = asdict(result)
    storage.write_text(storage.join(config["summary_uri"], f"{result.product}.json"),
                       json.dumps(doc, indent=1, default=_json_default), cfg.storage)
    with tempfile.TemporaryDirectory() as d:
        # Tune keeps trial metrics only when reported with a checkpoint (Ray 2.60).
        with open(os.path.join(d, "result.json"), "w") as f:
            json.dump(doc, f, default=_json_default)
        tune.report({"ok": int(result.status == "ok")},
                    checkpoint=tune.Checkpoint.from_directory(d))


def max_concurrent_products(cfg: Config, n_products: int) -> int:
    """How many products fit at once: each holds its workers, its feature actor and a driver."""
    if cfg.train.max_concurrent_products:
        return max(1, min(cfg.train.max_concurrent_products, n_products))
    cpus = ray.cluster_resources().get("CPU", 1.0)
    tc = cfg.train
    per_product = (tc.driver_cpus + tc.num_workers * tc.cpus_per_worker
                   + tc.feature_actors * tc.feature_actor_cpus + 2 * cfg.data.task_cpus)
    return max(1, min(n_products, int(cpus // per_product)))


def training_inputs(cfg: Config, products: list[str] | None = None
                    ) -> tuple[pd.DataFrame, dict[str, list[str]], list[str]]:
    """The catalog without its test split, every product's train normals (heterologous
    sources for the others), and the products to train. Test rows never leave this function."""
    from prn_ray.catalog import build_catalog

    catalog = build_catalog(cfg)
    for problem in catalog.problems:
        progress("catalog", problem)
    wanted = list(products or cfg.data.products or catalog.products)
    missing = sorted(set(wanted) - set(catalog.products))
    if missing:
        raise ValueError(f"unknown product(s) {missing}; the catalog has {catalog.products}")
    frame = catalog.df[catalog.df["split"] != "test"].reset_index(drop=True)
    others = {p: frame[(frame["product"] == p) & (frame["split"] == "train")
                       & (frame["label"] == "normal")]["image_uri"].tolist()
              for p in catalog.products}
    return frame, others, wanted


def train_all(cfg: Config, products: list[str] | None = None, run_id: str | None = None,
              overrides: dict[str, dict[str, Any]] | None = None) -> list[ProductResult]:
    """Train every product of the catalog in parallel; returns one result per product.

    ``overrides`` maps a product to dotted config overrides for it alone (e.g. the best
    configuration a tuning study found, see :func:`prn_ray.tuning.load_best`).

    Writes ``<runs_uri>/<run_id>/summary/<product>.json`` as products finish and
    ``<runs_uri>/<run_id>/summary.json`` plus ``<models_uri>/_runs/<run_id>.json`` at the end.
    """
    cfg = cfg.with_absolute_paths()  # trials run in their own working directories
    run_id = run_id or new_run_id()
    frame, others, wanted = training_inputs(cfg, products)
    summary_uri = storage.join(cfg.storage.runs_uri, run_id, "summary")
    done = _finished_products(cfg, summary_uri, wanted)  # a resumed run keeps what succeeded
    todo = [p for p in wanted if p not in done]
    concurrency = max_concurrent_products(cfg, max(1, len(todo)))
    progress("train_all", f"run {run_id}: {len(wanted)} product(s) {wanted}, "
                          f"{concurrency} at a time"
                          + (f", {len(done)} already trained in this run" if done else ""))
    if todo:
        _run_products(cfg, todo, run_id, frame, others, overrides or {}, summary_uri,
                      concurrency)
    results = []
    for product in wanted:
        uri = storage.join(summary_uri, f"{product}.json")
        if storage.exists(uri, cfg.storage):
            results.append(ProductResult(**json.loads(storage.read_text(uri, cfg.storage))))
        else:  # the trial itself died (e.g. its process was killed) before writing a result
            results.append(ProductResult(product=product, status="failed",
                                         error="trial died before reporting (see Ray logs)"))
    table = [asdict(r) for r in results]
    doc = json.dumps({"run_id": run_id, "products": table}, indent=1, default=_json_default)
    storage.write_text(storage.join(cfg.storage.runs_uri, run_id, "summary.json"), doc, cfg.storage)
    storage.write_text(storage.join(cfg.storage.models_uri, "_runs", f"{run_id}.json"), doc,
                       cfg.storage)
    return results


def _finished_products(cfg: Config, summary_uri: str, products: list[str]) -> set[str]:
    done = set()
    for product in products:
        uri = storage.join(summary_uri, f"{product}.json")
        if storage.exists(uri, cfg.storage):
            if json.loads(storage.read_text(uri, cfg.storage)).get("status") == "ok":
                done.add(product)
    return done


def _run_products(cfg: Config, products: list[str], run_id: str, frame: pd.DataFrame,
                  others: dict[str, list[str]], overrides: dict[str, dict[str, Any]],
                  summary_uri: str, concurrency: int) -> None:
    """One Tune trial per product (Ray's many-model pattern), ``concurrency`` at a time."""
    from ray import tune

    fs, path = _storage_filesystem(cfg, storage.join(cfg.storage.runs_uri, run_id))
    tuner = tune.Tuner(
        tune.with_resources(_product_trial, {"cpu": cfg.train.driver_cpus}),
        param_space={
            "product": tune.grid_search(list(products)),
            "cfg": cfg.to_dict(), "catalog": ray.put(frame), "run_id": run_id,
            "overrides": overrides, "others": others, "summary_uri": summary_uri,
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=time.strftime("products-%Y%m%d-%H%M%S", time.gmtime()),
                                  storage_path=path, storage_filesystem=fs,
                                  verbose=0),
    )
    tuner.fit()


def format_summary(results: list[ProductResult]) -> str:
    """The final table a person reads at the end of a run."""
    head = (f"{'product':<16} {'status':<7} {'epochs':>6} {'best':>5} {'val pAP':>8} "
            f"{'val AUPRO':>9} {'val iAUROC':>10} {'wall s':>7}  version / error")
    lines = [head, "-" * len(head)]
    for r in results:
        m = r.metrics or {}

        def f(k: str) -> str:
            v = m.get(k)
            return f"{v:.3f}" if isinstance(v, (int, float)) and not math.isnan(v) else "-"

        tail = r.version if r.status == "ok" else (r.error or "")[:80]
        lines.append(f"{r.product:<16} {r.status:<7} {r.epochs:>6} {r.best_epoch + 1:>5} "
                     f"{f('val_pixel_ap'):>8} {f('val_aupro'):>9} {f('val_image_auroc'):>10} "
                     f"{r.wall_s:>7.0f}  {tail}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- single process


def _local_feature_batches(frame: pd.DataFrame, banks, cfg: Config, size: int,
                           backbone: Backbone, batch_size: int, extra: tuple[str, ...] = (),
                           drop_last: bool = False, validation: bool = False):
    """decode -> synthesis -> features in this process (no Ray): batches of torch tensors."""
    from prn_ray.pipeline import images_to_tensor

    synth = (banks.validation_synthesizer if validation else banks.synthesizer)(cfg, size)
    stop = len(frame) - batch_size + 1 if drop_last else len(frame)
    for i in range(0, max(stop, 0), batch_size):
        rows = frame.iloc[i:i + batch_size]
        batch = {c: rows[c].to_numpy() for c in rows.columns}
        batch = images.decode_batch(batch, storage_cfg=cfg.storage, data_cfg=cfg.data,
                                    image_size=size)
        ok = images.error_free(batch["error"])
        batch = synth({k: v[ok] for k, v in batch.items()})
        with torch.inference_mode():
            feats = backbone(images_to_tensor(batch["image"]))
        out = {c: f.to(torch.float16 if cfg.model.feature_dtype == "float16" else torch.float32)
               for c, f in zip(FEATURE_COLUMNS, feats)}
        out["mask"] = torch.from_numpy(np.ascontiguousarray(batch["mask"]))
        for c in extra:
            out[c] = torch.as_tensor(np.asarray(batch[c]))
        yield out


def train_local(cfg: Config, catalog: pd.DataFrame, product: str,
                others: dict[str, list[str]] | None = None, say=lambda msg: None
                ) -> tuple[HeadTrainer, Backbone]:
    """Train one product's head in this process, without Ray: the same steps, synthesis,
    validation and selection as the Ray job. For smoke tests, benchmarks (the "bare loop")
    and quick experiments; production training is :func:`train_all`."""
    from prn_ray.pipeline import plan_frame, validation_frame

    tc, size = cfg.train, cfg.data.image_size
    torch.manual_seed(tc.seed)
    data = ProductData.from_catalog(catalog, product)
    banks = build_banks(data, others or {}, cfg, size)
    backbone = Backbone(cfg.model.backbone, cfg.model.weights, cfg.storage)
    normals = pd.DataFrame({"image_uri": data.train_normals, "mask_uri": "",
                            "kind": "normal", "seed": 0, "source_index": -1, "epoch": 0})
    per_level: list[list[torch.Tensor]] = [[] for _ in FEATURE_COLUMNS]
    for b in _local_feature_batches(normals, banks, cfg, size, backbone, tc.batch_size):
        for j, col in enumerate(FEATURE_COLUMNS):
            per_level[j].append(b[col])
    reference = fit_reference([torch.cat(p) for p in per_level], cfg.model, seed=tc.seed)
    channels, sizes = backbone.channels, backbone.feature_sizes((size, size))
    head = PRNHead(cfg.model, channels, size, sizes)
    head.set_reference(reference)
    trainer = HeadTrainer(head, cfg, torch.device("cpu"), epoch_size(data, cfg), say=say)
    vframe = validation_frame(data, banks, cfg)
    vb = list(_local_feature_batches(vframe, banks, cfg, size, backbone, tc.batch_size,
                                     extra=("group",), validation=True))
    trainer.val = ValidationSet([torch.cat([b[c] for b in vb]) for c in FEATURE_COLUMNS],
                                torch.cat([b["mask"] for b in vb]),
                                torch.cat([b["group"] for b in vb]))

    def batches():
        for epoch in range(tc.epochs):
            frame = plan_frame(data, cfg, range(epoch, epoch + 1))
            yield from _local_feature_batches(frame, banks, cfg, size, backbone, tc.batch_size,
                                              extra=("epoch",), drop_last=True)

    trainer.fit(batches(), report=lambda row: None)
    return trainer, backbone
