"""Model registry: one immutable folder per trained version, ``LATEST`` written last.

Layout under ``storage.models_uri``::

    <product>/<version>/model.safetensors     PRN head weights + prototypes (buffers)
    <product>/<version>/backbone.safetensors  frozen backbone weights (extension: a version is
                                              self-contained, so nightly scoring in an
                                              air-gapped plant needs no hub or weights URI)
    <product>/<version>/config.json           full config (model incl. backbone + weight source),
                                              image_size and the geometry (extension: how an
                                              image becomes the model's inputs)
    <product>/<version>/calibration.json      decision threshold and how it was chosen
    <product>/<version>/metrics.json          validation metrics, training summary
    <product>/<version>/check_views.safetensors  optional (extension): a few of the held-out
                                              images' views as the model sees them (uint8),
                                              on which an exported graph is compared with
                                              the eager model before it scores anything
    <product>/LATEST                          the current version (plain text), written last

Weights are stored and read only as safetensors: loading never unpickles anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prn_ray import storage
from prn_ray.config import Config, StorageConfig, from_dict
from prn_ray.contracts import cpu_tensors, dumps, id_time, new_id
from prn_ray.errors import RegistryError  # noqa: F401 - raised here, caught by the CLIs
from prn_ray.geometry import Geometry, as_size
from prn_ray.thresholds import ThresholdRuleError, held_out_counts, own_rule, threshold_for

if TYPE_CHECKING:  # torch is imported where weights are read or written: resolving a model
    import torch  # (the scoring driver's part) stays free of it

REQUIRED_FILES = ("model.safetensors", "backbone.safetensors", "config.json", "calibration.json",
                  "metrics.json")
CHECK_VIEWS_FILE = "check_views.safetensors"  # optional: versions before it have none


@dataclass
class ModelVersion:
    """A registered model as read back from the registry."""

    product: str
    version: str
    uri: str
    config: Config
    geometry: Geometry
    calibration: dict[str, Any]
    metrics: dict[str, Any]
    head_state: dict[str, torch.Tensor]
    backbone_state: dict[str, torch.Tensor]
    check_views: Any = None  # V x h x w x 3 uint8 (numpy) of held-out images, or None

    @property
    def image_size(self) -> tuple[int, int]:
        """The model's input (h, w): one tile when tiled."""
        return self.geometry.size

    @property
    def threshold(self) -> float:
        return float(self.calibration["threshold"])

    @property
    def image_head(self):
        """The version's learned image scorer (:class:`prn_ray.image_head.ImageHead`), or None:
        trained with ``model.image_head``, its threshold is on the head's scores."""
        from prn_ray.image_head import ImageHead

        doc = self.calibration.get("image_head")
        return ImageHead.from_doc(doc) if doc else None

    def build(self, device: str | torch.device = "cpu"):
        """The exportable :class:`~prn_ray.model.PRN` with this version's weights, in eval mode."""
        from prn_ray.model import build_prn

        # The backbone's weights come from backbone.safetensors, not from their original source.
        prn = build_prn(self.config.model, self.image_size, storage_cfg=self.config.storage,
                        backbone_state=self.backbone_state)
        prn.head.load_state_dict(self.head_state, strict=True)
        prn.image_head = self.image_head  # read by prn_ray.inference.ScoreRule.of
        return prn.to(device).eval()


def new_version() -> str:
    """Sortable, unique: UTC timestamp plus a random suffix (two jobs in one second differ)."""
    return new_id("v")


def publish(
    cfg: Config,
    product: str,
    *,
    head_state: dict[str, torch.Tensor],
    backbone_state: dict[str, torch.Tensor],
    geometry: Geometry,
    calibration: dict[str, Any],
    metrics: dict[str, Any],
    version: str | None = None,
    check_views: Any = None,
) -> str:
    """Write a new version and then point ``LATEST`` at it. Returns the version.

    Existing versions are never overwritten: publishing to a version that already holds files
    raises :class:`RegistryError`. ``check_views`` (V x h x w x 3 uint8, optional): views of
    held-out images at the model's input size, kept with the version for the graph runtimes'
    parity check (:mod:`prn_ray.runtimes`).
    """
    from safetensors.torch import save as st_save

    if "threshold" not in calibration:
        raise RegistryError("calibration must contain a 'threshold'")
    scfg = cfg.storage
    version = version or new_version()
    root = storage.join(scfg.models_uri, product, version)
    if storage.exists(storage.join(root, "config.json"), scfg):
        raise RegistryError(f"model version {product}/{version} already exists; versions are immutable")
    meta = {"product": product, "version": version, "format": "prn_ray/1"}
    storage.write_bytes(
        storage.join(root, "model.safetensors"), st_save(cpu_tensors(head_state), metadata=meta), scfg
    )
    storage.write_bytes(
        storage.join(root, "backbone.safetensors"),
        st_save(cpu_tensors(backbone_state), metadata={**meta, "weights": cfg.model.weights}),
        scfg,
    )
    h, w = geometry.size
    config_doc = {"product": product, "version": version,
                  "image_size": h if h == w else [h, w], "geometry": geometry.to_doc(),
                  "config": cfg.to_dict()}
    if check_views is not None and len(check_views):
        import numpy as np
        import torch

        views = np.ascontiguousarray(check_views, dtype=np.uint8)
        if views.ndim != 4 or views.shape[1:] != (h, w, 3):
            raise RegistryError(f"check_views must be V x {h} x {w} x 3, got {views.shape}")
        storage.write_bytes(storage.join(root, CHECK_VIEWS_FILE),
                            st_save({"views": torch.from_numpy(views)}, metadata=meta), scfg)
    storage.write_text(storage.join(root, "calibration.json"), _dumps(calibration), scfg)
    storage.write_text(storage.join(root, "metrics.json"), _dumps(metrics), scfg)
    # config.json marks the version as complete; LATEST makes it current. Both written last.
    storage.write_text(storage.join(root, "config.json"), _dumps(config_doc), scfg)
    storage.write_text(storage.join(scfg.models_uri, product, "LATEST"), version + "\n", scfg)
    return version


def latest_version(storage_cfg: StorageConfig, product: str) -> str | None:
    uri = storage.join(storage_cfg.models_uri, product, "LATEST")
    if not storage.exists(uri, storage_cfg):
        return None
    return storage.read_text(uri, storage_cfg).strip() or None


def list_versions(storage_cfg: StorageConfig, product: str) -> list[str]:
    """Complete versions (those with every required file), oldest first."""
    root = storage.join(storage_cfg.models_uri, product)
    out = []
    for name in storage.list_dirs(root, storage_cfg):
        if all(storage.exists(storage.join(root, name, f), storage_cfg) for f in REQUIRED_FILES):
            out.append(name)
    return out


def list_products(storage_cfg: StorageConfig) -> list[str]:
    root = storage_cfg.models_uri
    return [p for p in storage.list_dirs(root, storage_cfg)
            if storage.exists(storage.join(root, p, "LATEST"), storage_cfg)]


def geometry_of(config_doc: dict[str, Any]) -> Geometry:
    """A version's geometry; versions from before tiles stretched the image to image_size."""
    if "geometry" in config_doc:
        return Geometry.from_doc(config_doc["geometry"])
    return Geometry(as_size(config_doc["image_size"]))


def describe(storage_cfg: StorageConfig, product: str, version: str | None = None,
             rule: str | None = None) -> tuple[str, Geometry, float]:
    """(version, geometry, threshold) of a registered model without reading its weights: the
    calibrated threshold, or the one ``rule`` (``score.threshold_rule``) picks on the model's
    held-out scores. Raises :class:`RegistryError` with the reason when the product has no
    (complete) model, or cannot follow ``rule``."""
    version = version or latest_version(storage_cfg, product)
    root = storage.join(storage_cfg.models_uri, product, version) if version else None
    if root is None or not all(storage.exists(storage.join(root, f), storage_cfg)
                               for f in REQUIRED_FILES):
        mv = load(storage_cfg, product, version)  # raises, with the reason
        return mv.version, mv.geometry, _threshold(mv.calibration, rule)
    config_doc = json.loads(storage.read_text(storage.join(root, "config.json"), storage_cfg))
    calibration = json.loads(storage.read_text(storage.join(root, "calibration.json"),
                                               storage_cfg))
    return version, geometry_of(config_doc), _threshold(calibration, rule)


def calibration(storage_cfg: StorageConfig, product: str, version: str) -> dict[str, Any]:
    """A version's ``calibration.json`` (the threshold, its rule and the held-out figures)."""
    uri = storage.join(storage_cfg.models_uri, product, version, "calibration.json")
    return json.loads(storage.read_text(uri, storage_cfg))


def _threshold(calibration: dict[str, Any], rule: str | None) -> float:
    try:
        return threshold_for(calibration, rule)
    except ThresholdRuleError as exc:
        raise RegistryError(str(exc)) from None


# Validation metrics a model listing shows: the selection value, then the real-defect metrics.
LISTED_METRICS = ("val_selection", "val_real_image_auroc", "val_real_pixel_auroc",
                  "val_real_aupro", "val_real_pixel_ap")


@dataclass
class ModelInfo:
    """One registered version as a listing shows it (read from its JSON files, no weights)."""

    product: str
    version: str
    latest: bool
    created_at: str | None  # UTC, from the version id
    threshold: float | None
    image_size: int | list[int] | None
    backbone: str | None
    weights: str | None
    selection_metric: str | None  # train.selection_metric of the run that registered it
    metrics: dict[str, float] = field(default_factory=dict)  # LISTED_METRICS that are present
    # The threshold's rule and what it is expected to cost on the held-out images it was
    # chosen on: false-alarm rate over n_normal good parts, recall over n_anomalous defects.
    threshold_rule: str | None = None
    expected_fpr: float | None = None
    expected_recall: float | None = None
    n_normal: int | None = None
    n_anomalous: int | None = None


def list_models(storage_cfg: StorageConfig, products: list[str] | None = None
                ) -> list[ModelInfo]:
    """Every complete version of ``products`` (default: every product with a ``LATEST``), by
    product, oldest version first. Raises :class:`RegistryError` for a named product without
    a model."""
    out = []
    for product in products if products is not None else list_products(storage_cfg):
        versions = list_versions(storage_cfg, product)
        if not versions:
            raise RegistryError(f"no model registered for product {product!r} under "
                                f"{storage_cfg.models_uri}")
        latest = latest_version(storage_cfg, product)
        for version in versions:
            root = storage.join(storage_cfg.models_uri, product, version)

            def doc(name: str, root: str = root) -> dict[str, Any]:
                return json.loads(storage.read_text(storage.join(root, name), storage_cfg))

            config_doc, calibration, metrics = (doc("config.json"), doc("calibration.json"),
                                                doc("metrics.json"))
            cfg = config_doc.get("config", {})
            validation = metrics.get("validation") or {}
            created = id_time(version)
            out.append(ModelInfo(
                product=product, version=version, latest=version == latest,
                created_at=created.isoformat() if created else None,
                threshold=calibration.get("threshold"),
                image_size=config_doc.get("image_size"),
                backbone=cfg.get("model", {}).get("backbone"),
                weights=cfg.get("model", {}).get("weights"),
                selection_metric=cfg.get("train", {}).get("selection_metric"),
                metrics={k: validation[k] for k in LISTED_METRICS if k in validation},
                threshold_rule=own_rule(calibration),
                expected_fpr=calibration.get("val_fpr"),
                expected_recall=calibration.get("val_tpr"),
                **dict(zip(("n_normal", "n_anomalous"), held_out_counts(calibration)))))
    return out


def load(storage_cfg: StorageConfig, product: str, version: str | None = None) -> ModelVersion:
    """Read a version (default: ``LATEST``). Raises :class:`RegistryError` with the reason."""
    from safetensors.torch import load as st_load

    version = version or latest_version(storage_cfg, product)
    if version is None:
        raise RegistryError(f"no model registered for product {product!r} under "
                            f"{storage_cfg.models_uri}")
    root = storage.join(storage_cfg.models_uri, product, version)
    missing = [f for f in REQUIRED_FILES if not storage.exists(storage.join(root, f), storage_cfg)]
    if len(missing) == len(REQUIRED_FILES):
        known = ", ".join(list_versions(storage_cfg, product)) or "none"
        raise RegistryError(f"no version {version!r} of product {product!r} under "
                            f"{storage_cfg.models_uri} (registered: {known})")
    if missing:
        raise RegistryError(f"model {product}/{version} is incomplete (missing {missing})")
    config_doc = json.loads(storage.read_text(storage.join(root, "config.json"), storage_cfg))
    doc = config_doc["config"]
    # A version registered before model.prior_vote existed ranks pixels by its own logits.
    if "prior_vote" not in doc.get("model", {}):
        doc = {**doc, "model": {**doc.get("model", {}), "prior_vote": 0.0}}
    cfg = from_dict(doc)
    # The registry's own location wins over whatever the training run was configured with.
    cfg = cfg.replace({"storage.models_uri": storage_cfg.models_uri,
                       "storage.endpoint_url": storage_cfg.endpoint_url})
    return ModelVersion(
        product=product,
        version=version,
        uri=root,
        config=cfg,
        geometry=geometry_of(config_doc),
        calibration=json.loads(storage.read_text(storage.join(root, "calibration.json"), storage_cfg)),
        metrics=json.loads(storage.read_text(storage.join(root, "metrics.json"), storage_cfg)),
        head_state=st_load(storage.read_bytes(storage.join(root, "model.safetensors"), storage_cfg)),
        backbone_state=st_load(
            storage.read_bytes(storage.join(root, "backbone.safetensors"), storage_cfg)
        ),
        check_views=_check_views(root, storage_cfg),
    )


def _check_views(root: str, storage_cfg: StorageConfig):
    uri = storage.join(root, CHECK_VIEWS_FILE)
    if not storage.exists(uri, storage_cfg):
        return None
    from safetensors.torch import load as st_load

    return st_load(storage.read_bytes(uri, storage_cfg))["views"].numpy()


def _dumps(doc: Any) -> str:
    return dumps(doc, indent=2, sort_keys=True) + "\n"
