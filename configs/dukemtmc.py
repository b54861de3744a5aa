"""CTL-S-R50 on DukeMTMC-reID: the Market-1501 recipe on `<data.root>/DukeMTMC-reID/`."""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__, "market1501")
    config.name = "dukemtmc"
    config.data.name = "dukemtmc"
    return config
