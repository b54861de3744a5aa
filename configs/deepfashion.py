"""DeepFashion consumer-to-shop. Variants `:small` (default, CTL-S-R50) and `:large`
(CTL-L-R50IBN), as in `street2shop.py`."""

from ctl_jax.configs import base_config, load_module

# The `:variant` forms (`--config=configs/deepfashion.py:<variant>`).
VARIANTS = ("small", "large")


def get_config(variant: str = "small"):
    street2shop = load_module(__file__.replace("deepfashion.py", "street2shop.py"))
    return street2shop.fashion_config(base_config(__file__, "market1501"), "deepfashion", variant)
