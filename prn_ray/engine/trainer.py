"""The training engine: one PRN head's optimisation from a stream of feature batches.

:class:`HeadTrainer` owns the steps, the epoch ends (validation, best-epoch selection,
calibration, stopping) and the checkpoint state. Its inputs are injected (the head, the
validation set, the batch stream, a ``report`` callback), so the Ray Train worker and the
single-process loop train exactly the same way. The loop counts steps, not epochs: warm-up +
cosine schedule over the step or time budget, whichever ends first.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from prn_ray.config import Config
from prn_ray.contracts import FEATURE_COLUMNS, GROUP_NORMAL, cpu_tensors
from prn_ray.data.product import Budget
from prn_ray.engine.optim import autocast, lr_factor, make_optimizer, resolve_precision
from prn_ray.engine.state import TrainState, load_checkpoint, save_checkpoint
from prn_ray.engine.validation import (
    ValidationSet,
    calibrate,
    head_calibration,
    predict_logits,
    selection_score,
    validation_metrics,
)
from prn_ray.model import PRNHead, PRNLoss


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
    # A real defect known by its image label has no pixel metrics (nan): not shown.
    return " ".join(f"{k} {record[k]:.3f}" for k in keys
                    if k in record and not math.isnan(record[k]))


class HeadTrainer:
    """Optimisation of one PRN head: steps, epoch ends (validation, best-epoch selection,
    calibration, stopping) and checkpoint state. Shared by the Ray Train worker loop and the
    single-process loop (:func:`prn_ray.engine.local.train_local`), so both train exactly the
    same way.

    ``report(record, stop)`` is called at every epoch end that validated or stops; the Ray
    loop turns it into ``ray.train.report`` with a checkpoint.
    """

    def __init__(self, head: PRNHead, cfg: Config, device: torch.device, epoch_rows: int,
                 world: int = 1, say=lambda msg: None, say_detail=None):
        tc = cfg.train
        self.cfg, self.device, self.world = cfg, device, world
        self._say = say
        # Epochs without validation and the untrained head's figures: detail lines (shown at
        # --log-level debug); validated epochs, resumes and long-epoch heartbeats: progress.
        self.say_detail = say_detail or say
        self.last_said = time.time()  # the heartbeat counts from the last progress line
        self.precision = resolve_precision(tc.precision, device)
        self.head = head.to(device)
        if tc.channels_last and device.type == "cpu":
            self.head = self.head.to(memory_format=torch.channels_last)
        self.model: torch.nn.Module = self.head
        self.optimizer = make_optimizer(self.head, tc)
        self.loss_fn = PRNLoss.from_config(tc, cfg.model.score_topk)
        self.state, self.best = TrainState(), None
        self.epoch_rows = epoch_rows
        self.budget = Budget.of(cfg, epoch_rows, world)
        self.steps_per_epoch = self.budget.steps_per_epoch
        self.budget_epochs = self.budget.epochs  # fewer than train.epochs under a step budget
        self.total_steps = self.budget.total_steps
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.val: ValidationSet | None = None
        self._val_epoch: tuple[ValidationSet, ValidationSet] | None = None  # (all, per epoch)
        self._mark = 0.0
        self._step_s = 0.0  # this epoch's time inside steps (train_s less the data waits)
        self.say_every_s = 120.0

    def say(self, message: str) -> None:
        self.last_said = time.time()
        self._say(message)

    # -- state ------------------------------------------------------------------------------

    def restore(self, directory: str) -> None:
        self.state, self.best = load_checkpoint(directory, self.head, self.optimizer)
        self.state.restarts += 1

    def save(self, directory: str) -> None:
        save_checkpoint(directory, self.head, self.best, self.optimizer, self.state)

    def start(self) -> None:
        """Before the first step (``fit`` calls it): calibrate the prior on the held-out normals
        if that was not done yet, validate the untrained head, set up the schedule."""
        tc = self.cfg.train
        if self.head.memory is not None and not self.head.memory.calibrated:
            self._calibrate_prior()
        if self.state.step == 0 and self.state.best_epoch < 0 and self.val is not None:
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
        with autocast(self.device, self.precision):
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
                                  "elapsed_s": 0.0, "train_s": 0.0, "step_s": 0.0}
        t0 = time.time()
        self._validate_and_select(-1, record)
        record["val_s"] = round(time.time() - t0, 3)
        self.state.history.append(record)
        self.say_detail("before training: " + _shown(record))

    # -- epoch end --------------------------------------------------------------------------

    def _validate_and_select(self, epoch: int, record: dict[str, Any]) -> None:
        state = self.state
        logits, val = self.validation_maps()
        vm, scores, labels, groups = validation_metrics(logits, val, self.cfg)
        score = selection_score(vm, self.cfg)
        vm["val_selection"] = score
        record.update(vm)
        if not math.isnan(score) and score > state.best_score:
            state.best_score, state.best_epoch, state.best_metrics = score, epoch, vm
            if self.cfg.model.image_head:  # fitted on this validation's maps
                state.calibration = head_calibration(logits, val, self.cfg, scores, labels,
                                                     groups)
            else:
                state.calibration = calibrate(scores, labels, groups, self.cfg)
            self.best = cpu_tensors(self.head.state_dict())
            state.stale_validations = 0
        else:
            state.stale_validations += 1

    def validation_maps(self) -> tuple[torch.Tensor, ValidationSet]:
        """The head's logit maps of this epoch's validation views, and those views."""
        if self._val_epoch is None or self._val_epoch[0] is not self.val:
            self._val_epoch = (self.val, self.val.limited(self.cfg.train.val_normal_views))
        val = self._val_epoch[1]
        return predict_logits(self.head, val.features, self.cfg.train.batch_size, self.device,
                              self.precision), val

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
                                  "train_s": round(train_s, 3), "step_s": round(self._step_s, 3)}
        self._step_s = 0.0
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
        (self.say if due or stop else self.say_detail)(
            f"epoch {epoch + 1}/{self.budget_epochs} step {state.step}/{self.total_steps} "
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
        self.start()
        loss_sum, n, in_epoch, skipped = 0.0, 0, 0, 0
        epoch = self.state.epoch + 1  # the checkpoint, not the data stream, says where we are
        first = True
        stopped = (self.state.step >= self.total_steps or epoch >= self.cfg.train.epochs
                   or bool(self.state.stopped))  # restored from a finished run: nothing to do
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
            t_step = time.perf_counter()
            loss_sum += self.step([batch[c] for c in FEATURE_COLUMNS], batch["mask"])
            self._step_s += time.perf_counter() - t_step
            n, in_epoch = n + 1, in_epoch + 1
            if time.time() - self.last_said >= self.say_every_s:  # long epochs: show life
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
