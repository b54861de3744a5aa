"""ViT-B/16 on Market-1501: TransReID's published recipe with CTL's losses added.

TransReID (He et al., ICCV 2021; its `configs/Market/vit_transreid_stride.yml` and defaults):
ViT-B/16 from ImageNet weights, 256x128 images, overlapping patch embedding with stride 12
(a 21x10 grid), stochastic depth 0.1, P16 x M4 = 64 images, SGD with momentum 0.9, learning
rate 0.008, weight decay 1e-4, 5 warm-up epochs, then a cosine schedule over 120 epochs
(floor 0.002 x the rate), flip 0.5, padding 10, random erasing 0.5. CTL's centroid triplet
and center losses are added to TransReID's ID + triplet losses (weights as configs/market1501.py).
TransReID's camera side information and jigsaw branch are not part of this recipe.

Deviations from TransReID (docs/backbones.md): ctl_jax normalises images with ImageNet's mean
and standard deviation (TransReID: 0.5 / 0.5, the statistics the original ViT weights were
trained with); TransReID doubles the biases' learning rate, here every parameter has the
same; its warm-up starts at 0.01 x the rate, ctl_jax's linear ramp at 1/5.

Start from timm ViT-B/16 ImageNet weights converted at this config's grid:
`python -m ctl_jax.convert --source=vit_base_patch16_224.pth --config=configs/vit_market1501.py
--output=checkpoints/vit_b16_imagenet` (the 14x14 position embeddings are resampled to 21x10).
"""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__, "market1501")
    config.name = "vit_market1501"
    config.model.arch = "vit_b16"
    config.model.vit_stride = 12
    config.model.drop_path = 0.1
    config.model.init_checkpoint = "checkpoints/vit_b16_imagenet"
    config.solver.optimizer = "sgd"
    config.solver.momentum = 0.9
    config.solver.base_lr = 0.008
    config.solver.weight_decay = 1e-4
    config.solver.warmup_epochs = 5
    config.solver.schedule = "cosine"
    config.solver.min_lr_factor = 0.002
    config.solver.milestones = ()
    config.solver.num_epochs = 120
    return config
