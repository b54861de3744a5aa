"""CTL-S-R50 on MSMT17: the Market-1501 recipe (ResNet-50, 256x128, P16 x M4) on the MSMT17
list files. `data.root` is the unpacked `MSMT17_V1/` (or `MSMT17_V2/`, or the folder holding
either); `data.use_val` adds list_val.txt to training (the published 32,621-image set)."""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__, "market1501")
    config.name = "msmt17"
    config.data.name = "msmt17"
    config.data.root = "data/MSMT17_V1"
    return config
