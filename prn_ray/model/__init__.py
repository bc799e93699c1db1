"""PRN model: frozen backbone, prototypes, head (MF, MSA, decoder), loss. No Ray imports."""

from prn_ray.errors import WeightsError
from prn_ray.model.attention import MultiSizeAttention
from prn_ray.model.backbone import FEATURE_STRIDES, Backbone
from prn_ray.model.decoder import Decoder
from prn_ray.model.fusion import MultiScaleFusion
from prn_ray.model.loss import LossOutput, PRNLoss, focal_loss_with_logits
from prn_ray.model.prn import PRN, PRNHead, PRNOutput, area_kernel, build_prn, image_score
from prn_ray.model.prototypes import (
    fit_prototypes,
    kmeans,
    nearest_prototype,
    num_prototypes,
    prototype_residual,
)
from prn_ray.model.weights import (
    LITE0_PYPI,
    load_features_state_dict,
    map_lukemelas_to_timm,
    read_state_dict,
)

__all__ = [
    "FEATURE_STRIDES",
    "LITE0_PYPI",
    "Backbone",
    "Decoder",
    "LossOutput",
    "MultiScaleFusion",
    "MultiSizeAttention",
    "PRN",
    "PRNHead",
    "PRNLoss",
    "PRNOutput",
    "WeightsError",
    "area_kernel",
    "build_prn",
    "fit_prototypes",
    "focal_loss_with_logits",
    "image_score",
    "kmeans",
    "load_features_state_dict",
    "map_lukemelas_to_timm",
    "nearest_prototype",
    "num_prototypes",
    "prototype_residual",
    "read_state_dict",
]
