"""Which model scores each product in a run: resolved once on the driver (LATEST or a pinned
version) from the registry's metadata, so every row of a run uses one version per product even
if ``LATEST`` moves while the run is going."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prn_ray import registry, storage
from prn_ray.config import Config
from prn_ray.geometry import Geometry
from prn_ray.scoring.table import NO_MODEL


@dataclass
class ResolvedModel:
    """What the driver decided for one product; shipped to every actor (plain, picklable)."""

    product: str
    version: str | None = None  # None: no usable model (see error)
    threshold: float | None = None  # the threshold applied (override, else calibrated)
    calibrated_threshold: float | None = None
    geometry: Geometry | None = None  # how its images become the model's inputs
    error: str | None = None  # "no_model: <registry message>"


def pinned_versions(spec: str | None) -> tuple[str | None, dict[str, str]]:
    """``score.model_version``: ``"v1"`` pins every product to v1; ``"a=v1,b=v2"`` pins per
    product (others use LATEST). Returns (global pin, per-product pins)."""
    if not spec or not spec.strip():
        return None, {}
    if "=" not in spec:
        return spec.strip(), {}
    pins = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"score.model_version: mix of 'product=version' and {item!r}")
        product, version = item.split("=", 1)
        pins[product.strip()] = version.strip()
    return None, pins


def resolve_models(cfg: Config, products: Iterable[str]) -> dict[str, ResolvedModel]:
    """Product -> version, read once here so every row of a run uses the same version even if
    ``LATEST`` moves while the run is going. Only metadata is read (no weights)."""
    everywhere, pins = pinned_versions(cfg.score.model_version)
    out = {}
    for product in products:
        try:
            version, geometry, calibrated = registry.describe(
                cfg.storage, product, pins.get(product, everywhere), cfg.score.threshold_rule)
        except Exception as exc:  # noqa: BLE001 - RegistryError, or unreadable files
            msg = str(exc) if isinstance(exc, registry.RegistryError) else \
                f"{type(exc).__name__}: {exc}"
            out[product] = ResolvedModel(product, error=storage.redact(f"{NO_MODEL}: {msg}"))
            continue
        threshold = cfg.score.threshold if cfg.score.threshold is not None else calibrated
        out[product] = ResolvedModel(product, version, float(threshold), calibrated, geometry)
    return out
