"""Speed of one PRN head training step: a plain fp32 PyTorch loop vs the project's step, with
each speed-up measured on its own, and how close each is to this machine's FLOP limit.

    python benchmarks/step_speed.py --config configs/magnetic_tile.yaml [--steps 8] [--compile]
                                    [--profile]

All variants train the same head (the config's model at its image size) on the same cached
feature batches in this process, with the same torch thread count:

* ``plain fp32``: ``head(feats)``, focal + L1 loss, ``backward``, ``Adam.step`` -- NCHW tensors,
  nothing else (the baseline a straightforward implementation runs);
* ``HeadTrainer.step``: the project's step (grad clipping, schedule, finiteness check) with the
  config's settings (channels_last on CPU, precision ``auto``);
* ``+ channels_last`` / ``+ bf16 autocast`` / ``+ torch.compile``: one change each on top of plain.

``--profile`` then splits the project's step by the head's modules, forward and backward apart
(module hooks; the memory search, the prior and the loss run without a module of their own
and are what is left of the forward), plus the optimizer step.

FLOPs per step come from ``torch.utils.flop_counter`` (forward + backward); the limit is the
best fp32 / bf16 GEMM rate measured here with a large matmul. Head features are random
(the step's cost does not depend on their values).
"""

from __future__ import annotations

import argparse
import time

from _common import REPO, ready_head


def gemm_rate(dtype, threads: int, n: int = 2048, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "magnetic_tile.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow start)")
    p.add_argument("--profile", action="store_true",
                   help="also split the project's step by module, forward and backward")
    args = p.parse_args()

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from prn_ray.config import load_config
    from prn_ray.engine.optim import native_bf16
    from prn_ray.engine.trainer import HeadTrainer
    from prn_ray.model.backbone import Backbone
    from prn_ray.model.loss import PRNLoss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config, ["model.weights=none", *args.overrides])
    size, bs = cfg.data.image_size, cfg.train.batch_size
    backbone = Backbone(cfg.model.backbone, "none", cfg.storage)
    channels, sizes = backbone.channels, backbone.feature_sizes((size, size))
    feats = [torch.randn(bs, c, h, w) for c, (h, w) in zip(channels, sizes)]
    mask = (torch.rand(bs, size, size) > 0.97).float()

    def fresh_head():
        torch.manual_seed(0)
        return ready_head(cfg.model, channels, sizes, size)

    loss_fn = PRNLoss.from_config(cfg.train)

    def plain(channels_last=False, bf16=False, compiled=False):
        head = fresh_head()
        x = feats
        if channels_last:
            head = head.to(memory_format=torch.channels_last)
            x = [f.contiguous(memory_format=torch.channels_last) for f in feats]
        model = torch.compile(head) if compiled else head
        opt = torch.optim.Adam(head.parameters(), lr=1e-4)
        target = mask[:, None]

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = loss_fn(logits.float(), target).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def project():
        trainer = HeadTrainer(fresh_head(), cfg, torch.device("cpu"), epoch_rows=bs * 1000)
        trainer.start()
        trainer.model.train()
        return lambda: trainer.step(feats, mask), trainer.precision

    with FlopCounterMode(display=False) as fc:
        plain()()
    flops = fc.get_total_flops()
    peak32 = gemm_rate(torch.float32, args.threads)
    peak16 = gemm_rate(torch.bfloat16, args.threads)

    variants = {"plain fp32 (baseline)": plain(), "+ channels_last": plain(channels_last=True),
                "+ bf16 autocast": plain(bf16=True)}
    step, precision = project()
    variants[f"HeadTrainer.step ({precision}, channels_last={cfg.train.channels_last})"] = step
    if args.compile:
        variants["+ torch.compile"] = plain(compiled=True)

    print(f"head of {cfg.model.backbone} at {size}px, batch {bs}, {args.threads} threads, "
          f"{sum(p.numel() for p in fresh_head().parameters() if p.requires_grad) / 1e6:.1f}M "
          f"trainable params; {flops / 1e9:.1f} GFLOP per step (fwd+bwd); native bf16: "
          f"{native_bf16(torch.device('cpu'))}")
    print(f"GEMM limit here: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s\n")
    print(f"{'variant':<52} {'s/step':>7} {'samples/s':>10} {'vs plain':>9} {'GFLOP/s':>8} "
          f"{'% of fp32 GEMM':>15}")
    base = None
    for name, fn in variants.items():
        t0 = time.perf_counter()
        fn()  # warm-up (and compilation)
        first = time.perf_counter() - t0
        # A variant far slower than the baseline (emulated bf16: minutes per step) is timed on
        # one more step only.
        n = 1 if base and first > 4 * base else args.steps
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        s = (time.perf_counter() - t0) / n
        base = base or s
        extra = f"   (first step {first:.0f}s)" if first > 5 * s else ""
        print(f"{name:<52} {s:>7.2f} {bs / s:>10.1f} {base / s:>8.2f}x {flops / s / 1e9:>8.0f} "
              f"{100 * flops / s / 1e9 / peak32:>14.0f}%{extra}", flush=True)
    if args.profile:
        trainer = HeadTrainer(fresh_head(), cfg, torch.device("cpu"), epoch_rows=bs * 1000)
        trainer.start()
        trainer.model.train()
        print_profile(trainer, feats, mask, args.steps)
    return 0


def print_profile(trainer, feats, mask, steps: int) -> None:
    """Milliseconds per step in each module of the head, forward and backward.

    Forward: between a module's pre- and post-forward hooks (CPU work is synchronous). Backward
    runs the modules in reverse order: a hook on each module's outputs marks when their
    gradient arrives, i.e. when the module's own backward starts, and it runs until the next
    module's mark (the last one until the optimizer step). The optimizer step is timed on its
    own; "the rest" is the step's time outside all of these (the prior's sum and blur, the
    loss, gradient clipping, the head's glue)."""
    import time as _t
    from collections import defaultdict

    head = trainer.head
    mods = [(n, m) for n, m in head.named_children() if not isinstance(m, torch_nn().ModuleList)]
    if head.attention is not None:
        mods[-1:-1] = [(f"attention.{i}", b) for i, b in enumerate(head.attention)]
    fwd, bwd, opened, marks = defaultdict(float), defaultdict(float), {}, []
    handles = []

    def outputs(o):
        if isinstance(o, (list, tuple)):
            for x in o:
                yield from outputs(x)
        elif hasattr(o, "requires_grad") and o.requires_grad:
            yield o

    for name, mod in mods:
        def pre(_m, _i, name=name):
            opened[name] = _t.perf_counter()

        def post(_m, _i, out, name=name):
            fwd[name] += _t.perf_counter() - opened.pop(name)
            for t in outputs(out):
                t.register_hook(lambda g, name=name: marks.append((_t.perf_counter(), name)))
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    opt_s, ends = [0.0], []
    orig_step = trainer.optimizer.step

    def timed_step(*a, **k):
        t = _t.perf_counter()
        ends.append(t)
        out = orig_step(*a, **k)
        opt_s[0] += _t.perf_counter() - t
        return out
    trainer.optimizer.step = timed_step

    def run(n):
        total = 0.0
        for _ in range(n):
            marks.clear()
            t0 = _t.perf_counter()
            trainer.step(feats, mask)
            total += _t.perf_counter() - t0
            first = {}
            for t, name in marks:  # a module with several outputs: its first gradient
                first.setdefault(name, t)
            seq = sorted((t, name) for name, t in first.items())
            for (t, name), nxt in zip(seq, [*seq[1:], (ends[-1], None)]):
                bwd[name] += nxt[0] - t
        return total
    run(1)  # warm-up
    fwd.clear(), bwd.clear()
    opt_s[0] = 0.0
    total = run(steps) / steps
    for h in handles:
        h.remove()
    trainer.optimizer.step = orig_step
    ms = 1e3 / steps
    print(f"\nthe project's step by module ({trainer.precision}, ms per step of "
          f"{mask.shape[0]}; backward from gradient hooks):")
    print(f"{'module':<16} {'forward':>8} {'backward':>9} {'% of step':>10}")
    for name, _ in mods:
        f, b = ms * fwd[name], ms * bwd.get(name, 0.0)
        print(f"{name:<16} {f:>8.0f} {b:>9.0f} {100 * (f + b) / (1e3 * total):>9.0f}%")
    opt = ms * opt_s[0]
    rest = 1e3 * total - opt - ms * (sum(fwd.values()) + sum(bwd.values()))
    print(f"{'optimizer step':<16} {opt:>8.0f} {'':>9} {100 * opt / (1e3 * total):>9.0f}%")
    print(f"{'the rest':<16} {rest:>8.0f} {'':>9} {100 * rest / (1e3 * total):>9.0f}%   "
          "(prior sum and blur, loss, clipping, glue)")
    print(f"{'step':<16} {1e3 * total:>8.0f}")


def torch_nn():
    import torch

    return torch.nn


if __name__ == "__main__":
    raise SystemExit(main())
