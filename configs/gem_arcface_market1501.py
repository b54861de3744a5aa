"""CTL + GeM + ArcFace on Market-1501: the paper recipe (`market1501.py`: ResNet-50, 256x128,
P16 x M4, the four losses) with generalised-mean pooling (learnable p, initially 3) instead of
average pooling, and an ArcFace classifier (s = 30, m = 0.5, label smoothing kept) instead of
the linear one. Start from converted ImageNet weights as `market1501.py` does.
"""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__, "market1501")
    config.name = "gem_arcface_market1501"
    config.model.pooling = "gem"
    config.model.gem_p = 3.0
    config.model.gem_learnable = True
    config.loss.classifier = "arcface"
    config.loss.scale = 30.0
    config.loss.classifier_margin = 0.5
    return config
