"""Evaluation on INRIA Holidays: `python -m ctl_jax.evaluate --workdir=runs/gldv2
--config=configs/holidays.py` (the model fields are those of `gldv2.py`). Protocol
`holidays`: mAP, the query itself excluded. `data.root` holds `jpg/`;
`--config.data.rotation_fix=exif` (or a list file) turns the sideways images upright. No
training split: training on it is an error."""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__, "gldv2")
    config.name = "holidays"
    config.data.name = "holidays"
    config.data.root = "data/holidays"
    config.data.eval_name = ""
    config.data.eval_root = ""
    config.train.monitor = "instance/mAP"
    return config
