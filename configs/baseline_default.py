"""The synthetic demo without the centroid triplet loss (to compare with `default.py`)."""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__)
    config.name = "baseline_default"
    config.loss.centroid_weight = 0.0
    return config
