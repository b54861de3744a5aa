"""CTL-S-R50 on VeRi-776 vehicle re-ID: the Market-1501 recipe with square 256x256 inputs
(vehicles are not tall). `data.root` is the unpacked `VeRi/` (image_train/, image_query/,
image_test/)."""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__, "market1501")
    config.name = "veri776"
    config.data.name = "veri776"
    config.data.root = "data/VeRi"
    config.data.height, config.data.width = 256, 256
    return config
