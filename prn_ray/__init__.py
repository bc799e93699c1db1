"""prn_ray: Prototypical Residual Networks (Zhang et al., CVPR 2023) for industrial inspection on Ray."""

__version__ = "0.1.0"
