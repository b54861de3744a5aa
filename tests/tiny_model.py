"""A random (untrained) model saved as a converted-checkpoint directory, for the embedder,
export and service tests: ResNet-18 at a small input size unless asked otherwise."""

import json
import pathlib

import jax
import numpy as np

from ctl_jax import configs
from ctl_jax.build import build_model
from ctl_jax.checkpoints import CheckpointStore
from ctl_jax.data import transforms
from ctl_jax.models.reid import init_variables

REPO = pathlib.Path(__file__).resolve().parents[1]


def random_images(n, height, width, seed=0):
    """(n, height, width, 3) uint8 noise images."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def save_random_model(directory, *, arch="resnet18", height=32, width=16, num_classes=5, seed=0):
    """Writes a checkpoint of a randomly initialised model to `directory`.

    The running variances are spread away from 1 and the BNNeck statistics are those of a few
    noise images, as training would set them, so that different images get clearly
    different embeddings (a mix-up between images would be caught).

    Returns:
      (model, {"params", "batch_stats"}) with the reference layers.
    """
    config = configs.load_config(str(REPO / "configs" / "default.py"))
    config.model.arch = arch
    config.data.height, config.data.width = height, width
    config.data.eval_batch_size = 8
    model = build_model(config, num_classes, cpu_fast_path="off")
    variables = init_variables(model, jax.random.key(seed), (height, width, 3))
    rng = np.random.default_rng(seed)
    batch_stats = jax.tree.map(
        lambda x: np.asarray(x) * rng.uniform(0.5, 2.0, np.shape(x)).astype(np.float32),
        variables["batch_stats"],
    )
    state = {"params": variables["params"], "batch_stats": batch_stats}
    calibration = transforms.normalize(random_images(8, height, width, seed=seed + 100))
    features = np.asarray(model.apply(state, calibration, train=False)["features"])
    batch_stats["bnneck"] = {"mean": features.mean(0), "var": features.var(0) + 1e-6}
    store = CheckpointStore(directory)
    meta = {"config": json.loads(configs.config_to_json(config)), "num_classes": num_classes}
    store.save(0, state, {"epoch": 0}, meta)
    store.close()
    return model, state


def direct_embeddings(model, state, images):
    """BNNeck outputs of the model applied directly to uint8 images at its input size."""
    out = model.apply(state, transforms.normalize(images), train=False)["bn_features"]
    return np.asarray(out)
