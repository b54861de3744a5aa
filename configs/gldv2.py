"""Google Landmarks v2 (clean) as a training source, evaluated on Revisited Oxford (medium
and hard mAP) while training: ResNet-50, 256x256, P16 x M4, Adam 1e-4, 10 epochs.

`data.root` holds `train_clean.csv` and `train/a/b/c/*.jpg`; `data.eval_root` the unpacked
Revisited Oxford (`jpg/`, `gnd_roxford5k.pkl`). `data.small_identities="drop"` trains only
on landmarks with at least M images. Evaluate the result on the other landmark benchmarks
with `configs/rparis6k.py` and `configs/holidays.py` (same model fields).
"""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__, "market1501")
    config.name = "gldv2"
    config.data.name = "gldv2"
    config.data.root = "data/gldv2"
    config.data.eval_name = "roxford5k"
    config.data.eval_root = "data/roxford5k"
    config.data.height, config.data.width = 256, 256
    config.solver.base_lr = 1e-4
    config.solver.warmup_epochs = 1
    config.solver.milestones = (6, 8)
    config.solver.num_epochs = 10
    config.train.eval_every_epochs = 1
    config.eval.modes = ("instance",)
    config.train.monitor = "medium/mAP"
    return config
