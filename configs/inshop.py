"""DeepFashion In-Shop Clothes Retrieval: the fashion `small` recipe (CTL-S-R50, 256x128,
P16 x M4, Adam 1e-4), evaluated with Recall@1/10/20/30/40/50 of the queries against the
gallery split (and the centroid variant). `--config.eval.protocol=market` gives mAP too.
`data.root` is the unpacked `In-shop Clothes Retrieval Benchmark/` (Eval/, Img/)."""

from ctl_jax.configs import base_config, load_module


def get_config():
    street2shop = load_module(__file__.replace("inshop.py", "street2shop.py"))
    config = street2shop.fashion_config(base_config(__file__, "market1501"), "inshop", "small")
    config.name = "inshop"
    config.data.train_json = config.data.query_json = config.data.gallery_json = ""
    config.eval.modes = ("instance", "centroid")
    config.train.monitor = "instance/recall@1"
    return config
