"""The BNNeck baseline on DukeMTMC-reID: the CTL recipe without the centroid triplet loss."""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__, "dukemtmc")
    config.name = "baseline_dukemtmc"
    config.loss.centroid_weight = 0.0
    return config
