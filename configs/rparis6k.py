"""Evaluation on Revisited Paris 6k: `python -m ctl_jax.evaluate --workdir=runs/gldv2
--config=configs/rparis6k.py` (the model fields are those of `gldv2.py`). Protocol
`revisited`: mAP and mP@1/5/10 for the easy, medium and hard settings, queries cropped to
their boxes. `data.root` holds `jpg/` and `gnd_rparis6k.pkl`; `--config.data.distractors=DIR`
adds the revisitop +1M distractors. No training split: training on it is an error."""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__, "gldv2")
    config.name = "rparis6k"
    config.data.name = "rparis6k"
    config.data.root = "data/rparis6k"
    config.data.eval_name = ""
    config.data.eval_root = ""
    return config
