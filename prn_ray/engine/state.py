"""A training run's state between steps: what a checkpoint holds and where a resumed data
stream starts.

A checkpoint folder has ``head.safetensors`` (current weights), ``best.safetensors`` (the best
validated weights), ``optimizer.pt`` (tensors and plain containers: read with
``weights_only=True``) and ``state.json`` (:class:`TrainState`). ``progress.json`` beside the
run's checkpoints records the last epoch whose checkpoint was reported, so a restarted data
stream starts after it instead of replaying epoch 0.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prn_ray import storage
from prn_ray.config import StorageConfig
from prn_ray.contracts import cpu_tensors, dumps

STATE_FILE = "state.json"
PROGRESS_FILE = "progress.json"


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
        return dumps(doc)


def save_checkpoint(directory: str, head: torch.nn.Module, best: dict[str, torch.Tensor] | None,
                    optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    save_file(cpu_tensors(head.state_dict()), os.path.join(directory, "head.safetensors"))
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


def write_progress(run_uri: str, epoch: int, storage_cfg: StorageConfig | None) -> None:
    """Record that the checkpoint after ``epoch`` was reported (rank 0, after the report)."""
    storage.write_text(storage.join(run_uri, PROGRESS_FILE), json.dumps({"epoch": int(epoch)}),
                       storage_cfg)


def resume_epoch(run_uri: str, storage_cfg: StorageConfig | None) -> int:
    """The epoch a restarted data stream starts at: after the last reported checkpoint (0 for
    a new run). If a worker died between reporting and recording, the stream replays that
    epoch and the trainer skips it (it trusts the checkpoint it restored, see
    :meth:`prn_ray.engine.trainer.HeadTrainer.fit`)."""
    uri = storage.join(run_uri, PROGRESS_FILE)
    if not storage.exists(uri, storage_cfg):
        return 0
    try:
        return int(json.loads(storage.read_text(uri, storage_cfg))["epoch"]) + 1
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"unreadable training progress {storage.redact(uri)}: {exc}") from exc
