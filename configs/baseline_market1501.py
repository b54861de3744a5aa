"""The BNNeck baseline on Market-1501: the CTL recipe without the centroid triplet loss."""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__, "market1501")
    config.name = "baseline_market1501"
    config.loss.centroid_weight = 0.0
    return config
