"""OSNet x1.0 on Market-1501: torchreid's recipe with CTL's losses.

torchreid (Zhou et al.; its `configs/im_osnet_x1_0_softmax_256x128_amsgrad_cosine.yaml`):
OSNet x1.0 from ImageNet weights, 256x128 images, batch 64, AMSGrad with learning rate
0.0015 and weight decay 5e-4, a cosine schedule over 250 epochs, random flips, label
smoothing. Here with CTL's batch-hard triplet, centroid triplet and center losses, which need
the P x M sampler: P16 x M4 = 64 images; the ID loss is on the BNNeck output of the pooled
conv5 map (torchreid's fc embedding layer is not part of the backbone).

Deviations from torchreid (docs/backbones.md): torchreid trains only its classifier for the
first 10 epochs (`fixbase_epoch`), here every parameter trains from the start after the
usual linear warm-up; ctl_jax's cosine decays to 0 as configured below (`min_lr_factor`),
torchreid's to 0 as well; random erasing and padding stay as in configs/market1501.py.

Start from torchreid's ImageNet weights converted with `python -m ctl_jax.convert
--source=osnet_x1_0_imagenet.pth --output=checkpoints/osnet_x1_0_imagenet`.
"""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__, "market1501")
    config.name = "osnet_market1501"
    config.model.arch = "osnet_x1_0"
    config.model.init_checkpoint = "checkpoints/osnet_x1_0_imagenet"
    config.solver.optimizer = "amsgrad"
    config.solver.base_lr = 0.0015
    config.solver.weight_decay = 5e-4
    config.solver.schedule = "cosine"
    config.solver.min_lr_factor = 0.0
    config.solver.milestones = ()
    config.solver.num_epochs = 250
    return config
