"""CTL-S-R50 on Market-1501 (paper recipe): ResNet-50, 256x128, P16 x M4, Adam 3.5e-4, 120 epochs.

Expects `<data.root>/market1501/{bounding_box_train,query,bounding_box_test}`. Start from
ImageNet weights converted with `python -m ctl_jax.convert --source=resnet50-19c8e357.pth
--output=checkpoints/resnet50_imagenet` (then `--config.model.init_checkpoint=...`).
"""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__)
    config.name = "market1501"
    config.data.name = "market1501"
    config.data.root = "data"
    config.data.height, config.data.width = 256, 128
    config.data.num_identities, config.data.num_instances = 16, 4
    config.data.worker_count = 2
    config.model.arch = "resnet50"
    config.model.init_checkpoint = "checkpoints/resnet50_imagenet"
    config.solver.base_lr = 3.5e-4
    config.solver.warmup_epochs = 10
    config.solver.milestones = (40, 70)
    config.solver.num_epochs = 120
    config.train.log_every_steps = 50
    config.train.checkpoint_every_steps = 1000
    config.train.eval_every_epochs = 40
    config.eval.modes = ("instance", "centroid_camera", "centroid_camera_reference")
    return config
