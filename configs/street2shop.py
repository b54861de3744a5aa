"""Street2Shop fashion retrieval. Variants: `:large` (default, CTL-L-R50IBN: ResNet-50-IBN-a,
320x320, P12 x M4) and `:small` (CTL-S-R50: ResNet-50, 256x128, P16 x M4); Adam 1e-4.

Expects COCO-style JSON files (docs/datasets.md) under `data.root`; images pre-cropped to the
input size.
"""

from ctl_jax.configs import base_config
from ctl_jax.errors import ConfigError


def fashion_config(config, dataset: str, variant: str):
    """The fashion recipe shared by Street2Shop and DeepFashion."""
    if variant not in ("small", "large"):
        raise ConfigError(f"config variant must be 'small' or 'large', got {variant!r}")
    config.name = f"{dataset}_{variant}"
    config.data.name = dataset
    config.data.root = f"data/{dataset}"
    config.data.train_json = "train.json"
    config.data.query_json = "query.json"
    config.data.gallery_json = "gallery.json"
    config.solver.base_lr = 1e-4
    config.eval.modes = ("instance", "centroid")
    config.train.monitor = "centroid/mAP"
    if variant == "large":
        config.model.arch = "resnet50_ibn_a"
        config.model.init_checkpoint = "checkpoints/resnet50_ibn_a_imagenet"
        config.data.height, config.data.width = 320, 320
        config.data.num_identities = 12
    return config


# The `:variant` forms (`--config=configs/street2shop.py:<variant>`).
VARIANTS = ("large", "small")


def get_config(variant: str = "large"):
    config = base_config(__file__, "market1501")
    return fashion_config(config, "street2shop", variant)
