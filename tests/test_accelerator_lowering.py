"""The accelerator path, checked without an accelerator.

The training step (`ctl_jax.training.step`, with the config's losses and optimiser) and the
embedding function (`ctl_jax.inference.make_embed_fn`) of the Market-1501 recipe (ResNet-50,
256x128, P16 x M4 = 64 images, last stride 1) in bfloat16 are lowered with `jax.export` for
CUDA and TPU (lowering needs no device), with the layers `ctl_jax.build.build_model` picks for
that platform. Each must lower, and the program must hold none of the CPU rewrites:
- no operation under the CPU layers' name scope (`ctl_jax.cpu.layers.SCOPE`);
- every convolution of the model is an XLA convolution: one per kernel in the embedding,
  three in the training step (forward, input gradient, kernel gradient) except the stem's
  input gradient (images get none); the CPU layers compute some of them as matrix products;
- the stem's max pool is XLA's reduce-window, differentiated by select-and-scatter;
- no custom call at all, hence no host callback (`jax.export` also refuses to serialise
  custom calls without a compatibility guarantee, which host callbacks are).
The same functions lowered with the CPU layers fail these checks: the checks can fail.

The ViT recipe (`configs/vit_market1501.py`: ViT-B/16, 256x128, overlapping stride 12) lowers
the same way: its one convolution (the patch embedding) is XLA's, its attention plain
matrix products (no fused-attention custom call), nothing of the CPU layers; so does the
OSNet recipe (`configs/osnet_market1501.py`).
"""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from ctl_jax import parallel
from ctl_jax.build import build_model
from ctl_jax.configs import load_config
from ctl_jax.cpu.layers import SCOPE
from ctl_jax.inference import make_embed_fn
from ctl_jax.models.layers import REFERENCE_LAYERS
from ctl_jax.models.reid import feature_dim, init_variables
from ctl_jax.training.optimizer import make_optimizer
from ctl_jax.training.state import create_train_state
from ctl_jax.training.step import make_train_step

pytestmark = pytest.mark.slow  # each lowering traces a whole ResNet-50: seconds

PLATFORMS = ("cuda", "tpu")
NUM_CLASSES = 751  # Market-1501's training identities


@pytest.fixture(scope="module")
def config():
    config = load_config("configs/market1501.py")
    config.model.dtype = "bfloat16"
    return config


def _image_shape(config) -> tuple[int, int, int]:
    return (config.data.height, config.data.width, 3)


def _abstract_variables(model, config):
    return jax.eval_shape(lambda: init_variables(model, jax.random.key(0), _image_shape(config)))


def _num_kernels(variables) -> int:
    """Convolution kernels (k, k, Cin, Cout) in the parameter tree: 53 for ResNet-50."""
    flat = traverse_util.flatten_dict(variables["params"])
    return sum(1 for path, leaf in flat.items() if path[-1] == "kernel" and leaf.ndim == 4)


def _lower_train_step(config, model, platform: str) -> tuple[str, int]:
    """The training step's StableHLO for `platform`, and the convolutions it should hold."""
    tx = make_optimizer(config.solver)
    variables = _abstract_variables(model, config)
    dim = feature_dim(config.model.arch)
    state = jax.eval_shape(
        lambda v: create_train_state(v, tx, NUM_CLASSES, dim, jax.random.key(1)), variables
    )
    n = config.data.num_identities * config.data.num_instances
    # As the training pipeline yields them: uint8, normalised and erased in the step.
    batch = {
        "images": jax.ShapeDtypeStruct((n, *_image_shape(config)), jnp.uint8),
        "erase": jax.ShapeDtypeStruct((n, 4), jnp.int32),
        "labels": jax.ShapeDtypeStruct((n,), jnp.int32),
        "valid": jax.ShapeDtypeStruct((n,), jnp.bool_),
    }
    mesh = parallel.make_mesh(1)
    replicated = parallel.replicated(mesh)
    step = jax.jit(
        make_train_step(model, tx, config),
        in_shardings=(replicated, parallel.batch_sharded(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    exported = jax.export.export(step, platforms=[platform])(state, batch)
    assert exported.platforms == (platform,)
    return exported.mlir_module(), 3 * _num_kernels(variables) - 1


def _lower_embedding(config, model, platform: str) -> tuple[str, int]:
    """The embedding function's StableHLO for `platform`, and the convolutions it should
    hold."""
    variables = _abstract_variables(model, config)
    images = jax.ShapeDtypeStruct((config.data.eval_batch_size, *_image_shape(config)), jnp.float32)
    embed = make_embed_fn(model, parallel.make_mesh(1))
    exported = jax.export.export(embed, platforms=[platform])(variables, images)
    assert exported.platforms == (platform,)
    return exported.mlir_module(), _num_kernels(variables)


def _cpu_rewrites_in(text: str, convolutions: int, train: bool) -> list[str]:
    """What in the lowered program `text` shows a CPU rewrite or a custom call ([]: none)."""
    found = []
    if SCOPE in text:
        found.append(f"operations under the CPU layers' name scope {SCOPE!r}")
    count = len(re.findall(r"\bstablehlo\.convolution\b", text))
    if count != convolutions:
        found.append(f"{count} XLA convolutions where the model has {convolutions}")
    pool_ops = ("reduce_window", "select_and_scatter") if train else ("reduce_window",)
    for op in pool_ops:
        if f"stablehlo.{op}" not in text:
            found.append(f"no {op}: the stem's max pool is not XLA's")
    if "custom_call" in text or "callback" in text:
        found.append("a custom call or host callback")
    return found


LOWERINGS = {"train_step": _lower_train_step, "embedding": _lower_embedding}


@pytest.mark.parametrize("function", LOWERINGS)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_lowers_for_accelerators_without_cpu_rewrites(config, platform, function):
    model = build_model(config, NUM_CLASSES, platform=platform)
    assert model.layers is REFERENCE_LAYERS
    assert model.dtype == jnp.bfloat16
    text, convolutions = LOWERINGS[function](config, model, platform)
    assert _cpu_rewrites_in(text, convolutions, function == "train_step") == []


@pytest.mark.parametrize("function", LOWERINGS)
def test_the_checks_find_the_cpu_layers(config, function):
    """Forced onto CUDA, the CPU layers lower too, and the checks above see them."""
    model = build_model(config, NUM_CLASSES, cpu_fast_path="on", platform="cuda")
    assert model.layers is not REFERENCE_LAYERS
    text, convolutions = LOWERINGS[function](config, model, "cuda")
    found = _cpu_rewrites_in(text, convolutions, function == "train_step")
    assert any("name scope" in f for f in found), found
    assert any("XLA convolutions" in f for f in found), found
    assert any("max pool" in f for f in found), found


@pytest.fixture(scope="module")
def vit_config():
    config = load_config("configs/vit_market1501.py")
    config.model.dtype = "bfloat16"
    return config


@pytest.mark.parametrize("function", LOWERINGS)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_vit_lowers_for_accelerators_as_plain_xla(vit_config, platform, function):
    # (The test's name must not hold the words searched for: the lowered text carries the
    # Python call stack in its locations.)
    model = build_model(vit_config, NUM_CLASSES, platform=platform)
    assert model.layers is REFERENCE_LAYERS
    text, convolutions = LOWERINGS[function](vit_config, model, platform)
    found = _cpu_rewrites_in(text, convolutions, function == "train_step")
    # A ViT has no max pool; everything else must hold.
    assert [f for f in found if "max pool" not in f] == []
    assert "stablehlo.dot_general" in text and "bf16" in text


@pytest.mark.parametrize("function", LOWERINGS)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_osnet_lowers_for_accelerators_as_plain_xla(platform, function):
    config = load_config("configs/osnet_market1501.py")
    config.model.dtype = "bfloat16"
    model = build_model(config, NUM_CLASSES, platform=platform)
    assert model.layers is REFERENCE_LAYERS
    text, convolutions = LOWERINGS[function](config, model, platform)
    found = _cpu_rewrites_in(text, convolutions, function == "train_step")
    # Each block's one gate is applied to four streams: more XLA convolutions than kernels,
    # so the count does not apply; the rest (no CPU layers, XLA's max pool, no custom call)
    # must hold.
    assert [f for f in found if "XLA convolutions" not in f] == []
    assert len(re.findall(r"\bstablehlo\.convolution\b", text)) >= convolutions
