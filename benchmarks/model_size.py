"""Parameters, FLOPs per module and forward time of PRN head layouts.

    python benchmarks/model_size.py [--size 256] [--batch 8] [--iters 3] [--threads N]
                                    [--layouts spec,bottleneck,stride4,cpu] [--precisions fp32]

Layouts (all on EfficientNet-Lite0, 1 attention block, patch sizes h/{1,2,4,8}, as
``configs/cpu.yaml``; ``paper`` is ResNet18 with N = 3 as ``configs/paper.yaml``):

* ``spec``: the spec's head (no standardisation, no input norm, the one-token branch as
  attention, the fuse block's 3×3 convolution on the full branch concatenation, logits at full
  resolution), no residual prior;
* ``affine``, ``bottleneck``, ``stride4``: ``spec`` with one of the compute options on
  (``model.single_token_affine``, ``model.msa_bottleneck``, ``model.logit_stride=4``);
* ``cpu``: every option on plus the residual prior (patch memory of 16384 rows per level);
* ``paper``: ``configs/paper.yaml``'s architecture (random ResNet18 weights: sizes only).

FLOPs are counted with ``torch.utils.flop_counter`` (a multiply-add = 2 FLOPs, convolutions and
matrix products only) for one image's forward pass, per module of the head; a training step
costs ≈ 3× the trainable modules' forward FLOPs (the memory search runs without gradient).
Prototypes and memory banks are random tensors of the real sizes (K = 68 as for 677 normals at
ratio 0.1), so matching and search costs are included; weights are random (sizes and speed
only).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _common import ready_head  # noqa: E402

from prn_ray.config import ModelConfig  # noqa: E402
from prn_ray.model import PRNHead  # noqa: E402

LITE0 = dict(backbone="tf_efficientnet_lite0", weights="none", attention_blocks=1,
             attention_patch_sizes=[1, 2, 4, 8])
SPEC = dict(standardize=False, msa_input_norm=False, single_token_affine=False,
            msa_bottleneck=False, logit_stride=1, residual_prior=False)
LAYOUTS = {
    "spec": ModelConfig(**LITE0, **SPEC),
    "affine": ModelConfig(**LITE0, **{**SPEC, "single_token_affine": True}),
    "bottleneck": ModelConfig(**LITE0, **{**SPEC, "msa_bottleneck": True}),
    "stride4": ModelConfig(**LITE0, **{**SPEC, "logit_stride": 4}),
    "cpu": ModelConfig(**LITE0),
    "paper": ModelConfig(backbone="resnet18", weights="none", attention_blocks=3, **SPEC),
}
CHANNELS = {"tf_efficientnet_lite0": [24, 40, 112, 320], "resnet18": [64, 128, 256, 512]}
STRIDES = [4, 8, 16, 32]


def build(cfg: ModelConfig, size: int) -> tuple[PRNHead, list[torch.Tensor]]:
    channels = CHANNELS[cfg.backbone]
    sizes = [(size // s, size // s) for s in STRIDES]
    head = ready_head(cfg, channels, sizes, size)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, c, *hw, generator=g) for c, hw in zip(channels, sizes)]
    return head.eval(), feats


GROUPS = ("mf1", "mf1_residual", "attention", "mf2", "decoder.stages", "decoder.final",
          "decoder.head", "memory")


def module_flops(head: PRNHead, feats: list[torch.Tensor]) -> dict[str, float]:
    """Forward GFLOP of one image per part of the head (prototype matching, the prior's blur
    and resizing are what is left: "other")."""
    counter = FlopCounterMode(display=False, depth=4)
    with torch.no_grad(), counter:
        head(feats)
    by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    total = by_module.get("PRNHead", 0)
    parts: dict[str, float] = {}
    for group in GROUPS:
        key = f"PRNHead.{group}"
        if key in by_module:
            parts[group] = by_module[key]
        else:  # a ModuleList is never called itself: add up its children
            parts[group] = sum(v for k, v in by_module.items()
                               if k.startswith(key + ".") and k.count(".") == key.count(".") + 1)
    parts["other"] = total - sum(parts.values())
    parts["total"] = total
    return {k: v / 1e9 for k, v in parts.items()}


def timed(fn, iters: int) -> float:
    fn()  # warm-up (allocations, oneDNN primitive cache)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def step_seconds(head: PRNHead, feats: list[torch.Tensor], batch: int, iters: int,
                 bf16: bool) -> tuple[float, float]:
    """(forward s, training step s) for a batch of cached features."""
    x = [f.expand(batch, -1, -1, -1).contiguous(memory_format=torch.channels_last) for f in feats]
    head = head.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-4)
    target = torch.zeros(batch, 1, *head.image_size)

    def fwd() -> None:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            head(x)

    def step() -> None:
        head.train()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = head(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        head.eval()

    return timed(fwd, iters), timed(step, iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layouts", default="spec,affine,bottleneck,stride4,cpu,paper")
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--no-timing", action="store_true", help="FLOPs and parameters only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.layouts.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.size} px, batch {args.batch}")
    tables, rows = {}, []
    for name in names:
        cfg = LAYOUTS[name]
        head, feats = build(cfg, args.size)
        tables[name] = module_flops(head, feats)
        trainable = sum(p.numel() for p in head.parameters() if p.requires_grad) / 1e6
        row = [name, f"{trainable:.2f}", f"{tables[name]['total']:.2f}"]
        if not args.no_timing:
            for precision in args.precisions.split(","):
                fwd, step = step_seconds(head, feats, args.batch, args.iters, precision == "bf16")
                row += [f"{1e3 * fwd / args.batch:.1f}", f"{args.batch / step:.2f}"]
        rows.append(row)
    keys = [*GROUPS, "other", "total"]
    print("\nForward GFLOP per image, by module of the head:\n")
    print("| module | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{tables[n].get(k, 0.0):.3f}" for n in names) + " |")
    header = ["layout", "trainable M params", "fwd GFLOP/img"]
    if not args.no_timing:
        for precision in args.precisions.split(","):
            header += [f"{precision} fwd ms/img", f"{precision} train samples/s"]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
