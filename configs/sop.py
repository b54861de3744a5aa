"""Stanford Online Products: ResNet-50, 224x224, P16 x M4, Adam 1e-4 (the fashion learning
rate), evaluated with Recall@1/10/100/1000, every test image querying all the others, and
its centroid variant. `data.root` is the unpacked `Stanford_Online_Products/`. Most classes
have 2-12 images: classes with fewer than M images are padded (`data.small_identities`)."""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__, "market1501")
    config.name = "sop"
    config.data.name = "sop"
    config.data.root = "data/Stanford_Online_Products"
    config.data.height, config.data.width = 224, 224
    config.solver.base_lr = 1e-4
    config.eval.protocol = "recall_at_k"
    config.eval.modes = ("instance", "centroid")
    config.train.monitor = "instance/recall@1"
    return config
