"""CTL-S-R50 on CUHK03-NP (the new 767/700 protocol): the Market-1501 recipe. Variants
`:detected` (default) and `:labeled` choose the boxes. `data.root` is the unpacked
`cuhk03-np/` (holding `detected/` and `labeled/`)."""

from ctl_jax.configs import base_config
from ctl_jax.errors import ConfigError

# The `:variant` forms (`--config=configs/cuhk03.py:<variant>`).
VARIANTS = ("detected", "labeled")


def get_config(variant: str = "detected"):
    if variant not in ("detected", "labeled"):
        raise ConfigError(f"config variant must be 'detected' or 'labeled', got {variant!r}")
    config = base_config(__file__, "market1501")
    config.name = f"cuhk03_{variant}"
    config.data.name = f"cuhk03_{variant}"
    config.data.root = "data/cuhk03-np"
    return config
