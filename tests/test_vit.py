"""ViT backbones: timm weights imported and embedded like the PyTorch reference (forward and
gradients, 224x224 and 256x128 with resampled position embeddings, overlapping stride 12),
position-embedding resampling against `F.interpolate`, training from a converted ViT,
stochastic depth, and one-line errors for mismatched files and settings."""

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ctl_jax  # noqa: E402
from benchmarks import torch_reference_vit as rv  # noqa: E402
from ctl_jax import configs as config_lib  # noqa: E402
from ctl_jax.build import build_model  # noqa: E402
from ctl_jax.checkpoints import CheckpointError, model_variables, restore_model  # noqa: E402
from ctl_jax.errors import ConfigError  # noqa: E402
from ctl_jax.models import vit  # noqa: E402
from ctl_jax.models.reid import feature_dim, init_variables  # noqa: E402
from ctl_jax.training import initialisation  # noqa: E402
from ctl_jax.training.optimizer import make_optimizer  # noqa: E402
from ctl_jax.weights import conversion, resample, torch_pickle  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
# vit_t16 (timm's vit_tiny_patch16): the smallest 16x16-patch ViT, 12 blocks of width 192.
ARCH, PATCH, WIDTH, DEPTH, HEADS = "vit_t16", 16, 192, 12, 3
# (height, width, vit_stride): timm's own grid, the re-ID size (16x8), TransReID's overlap
# (21x10); the file holds the 14x14 grid of 224x224, resampled for the other two.
CASES = {"224x224": (224, 224, None), "256x128": (256, 128, None), "256x128-s12": (256, 128, 12)}

torch.set_num_threads(1)


def _config(height=64, width=32, stride=None, arch="resnet18"):
    config = config_lib.load_config(str(ROOT / "configs" / "default.py"))
    config.data.height, config.data.width = height, width
    config.model.arch, config.model.vit_stride = arch, stride
    return config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A randomised reference ViT at 224x224 saved as a timm state dict: (path, model)."""
    model = rv.randomise_vit(rv.VisionTransformer((224, 224), PATCH, WIDTH, DEPTH, HEADS), 0)
    path = tmp_path_factory.mktemp("vit") / "vit_tiny.pth"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def converted(tmp_path_factory, source):
    """Lazily converts the file once per case: case -> (report, output dir, reference)."""
    cache = {}

    def get(case):
        if case not in cache:
            height, width, stride = CASES[case]
            output = tmp_path_factory.mktemp(case) / "converted"
            report = conversion.convert_checkpoint(
                source[0], output, _config(height, width, stride)
            )
            reference = rv.VisionTransformer(
                (height, width), PATCH, WIDTH, DEPTH, HEADS, stride=stride
            )
            rv.load_resampled(reference, source[1].state_dict(), (14, 14)).eval()
            cache[case] = (report, output, reference)
        return cache[case]

    return get


def _cosines(ours, reference) -> np.ndarray:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return np.sum(ours * reference, 1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    )


@pytest.mark.parametrize("case", list(CASES))
def test_converted_vit_embeds_like_the_reference(case, converted):
    height, width, stride = CASES[case]
    report, output, reference = converted(case)
    assert (report.arch, report.layout, report.num_classes) == (ARCH, "timm_vit", 1000)
    assert report.grid == vit.grid_size(height, width, PATCH, stride or PATCH)
    assert report.unused == ["head.bias"]
    assert sorted(report.filled) == [
        "batch_stats/bnneck/mean",
        "batch_stats/bnneck/var",
        "params/bnneck/scale",
    ]
    images = np.random.default_rng(1).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    embedder = ctl_jax.Embedder.load(output)
    assert embedder.dim == WIDTH
    ours = embedder(images)
    normalised = ((images / 255.0 - MEAN) / STD).astype(np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
        expected = reference.forward_features(torch.from_numpy(normalised)).numpy()
    # The fresh BNNeck of a converted backbone is the identity up to its epsilon.
    ours = ours * np.sqrt(1.0 + 1e-5)
    cos = _cosines(ours, expected)
    rel = np.abs(ours - expected).max() / np.abs(expected).max()
    print(f"{case}: min cosine {cos.min():.10f}, max relative diff {rel:.2e}")
    assert cos.min() >= 0.9999
    # Float32 rounding through 12 blocks: ~1e-6; a wrong mapping (a transposed kernel, the
    # qkv columns split another way, an unresampled grid) is off by O(0.1-1).
    assert rel < 1e-4


@pytest.mark.parametrize("case", ["224x224", "256x128-s12"])
def test_gradients_match_the_reference(case, converted):
    """The gradient of a scalar of the features, with respect to the images and to the
    position embeddings, the first block's qkv kernel and the patch embedding."""
    height, width, _ = CASES[case]
    _, output, reference = converted(case)
    restored = restore_model(output)
    rng = np.random.default_rng(2)
    images = rng.standard_normal((2, height, width, 3)).astype(np.float32)
    direction = rng.standard_normal((2, WIDTH)).astype(np.float32)

    def scalar(params, x):
        variables = {"params": params, "batch_stats": restored.variables["batch_stats"]}
        features = restored.model.apply(variables, x, train=False)["features"]
        return jnp.sum(jnp.tanh(features) * direction)

    grad_params, grad_images = jax.jit(jax.grad(scalar, argnums=(0, 1)))(
        restored.variables["params"], images
    )
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    reference.zero_grad()
    (torch.tanh(reference.forward_features(x)) * torch.from_numpy(direction)).sum().backward()
    backbone = grad_params["backbone"]
    pairs = {
        "images": (grad_images, x.grad.numpy().transpose(0, 2, 3, 1)),
        "pos_embed": (backbone["pos_embed"], reference.pos_embed.grad.numpy()),
        "qkv": (
            backbone["blocks_0"]["attn"]["qkv"]["kernel"],
            reference.blocks[0].attn.qkv.weight.grad.numpy().T,
        ),
        "patch_embed": (
            backbone["patch_embed"]["proj"]["kernel"],
            reference.patch_embed.proj.weight.grad.numpy().transpose(2, 3, 1, 0),
        ),
    }
    for name, (ours, expected) in pairs.items():
        ours, expected = np.asarray(ours).ravel()[None], np.asarray(expected).ravel()[None]
        cos = _cosines(ours, expected)[0]
        rel = np.abs(ours - expected).max() / np.abs(expected).max()
        print(f"{case} d/d{name}: cosine {cos:.10f}, max relative diff {rel:.2e}")
        assert cos >= 0.9999, name
        assert rel < 1e-3, name


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("grids", [((14, 14), (21, 10)), ((14, 14), (16, 8)), ((4, 4), (9, 3))])
def test_position_embeddings_resample_as_torch_interpolates(grids, antialias):
    old, new = grids
    rng = np.random.default_rng(3)
    pos = rng.standard_normal((1, 1 + old[0] * old[1], 5)).astype(np.float32)
    expected = rv.resample_abs_pos_embed(torch.from_numpy(pos), new, old, antialias).numpy()
    ours = resample.resample_pos_embed(pos, old, new, antialias=antialias)
    assert ours.shape == (1, 1 + new[0] * new[1], 5)
    np.testing.assert_array_equal(ours[:, 0], pos[:, 0])
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_training_starts_from_a_converted_vit_on_another_grid(converted, source):
    """A checkpoint converted at 224x224 starts a 256x128, stride-12 training: every backbone
    array taken, the position embeddings resampled as timm resamples them."""
    _, output, _ = converted("224x224")
    config = _config(256, 128, 12, ARCH)
    config.model.init_checkpoint = str(output)
    model = build_model(config, 5)
    tx = make_optimizer(config.solver)
    state = initialisation.init_train_state(model, tx, 5, WIDTH, (256, 128, 3), 0)
    logs = []
    state = initialisation.with_init_checkpoint(
        state, config.model, log=logs.append, image_size=(256, 128)
    )
    params = model_variables(state)["params"]
    expected = rv.resample_abs_pos_embed(source[1].pos_embed.detach(), (21, 10), (14, 14))
    np.testing.assert_allclose(params["backbone"]["pos_embed"], expected.numpy(), atol=1e-5)
    np.testing.assert_array_equal(
        params["backbone"]["blocks_11"]["mlp"]["fc2"]["bias"],
        source[1].blocks[11].mlp.fc2.bias.detach().numpy(),
    )
    assert params["classifier"]["kernel"].shape == (WIDTH, 5)  # fresh: not ImageNet's
    assert any("resampled from the checkpoint's 14x14 patch grid to 21x10" in m for m in logs)
    assert any("1 start fresh: params/classifier/kernel" in m for m in logs), logs


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("vit_s16", "width 192 there, 384 here"),
        ("vit_mini8", "patch 16 there, 8 here; depth 12 there, 4 here"),
        ("resnet50", "holds a vit_t16 (16x16 patches, width 192, depth 12), not a resnet50"),
    ],
)
def test_init_checkpoint_of_another_backbone_is_refused(converted, arch, expected):
    _, output, _ = converted("224x224")
    config = _config(64, 32, None, arch)
    config.model.init_checkpoint = str(output)
    model = build_model(config, 5)
    # The backbones are compared before any array is touched: an abstract state will do.
    state = jax.eval_shape(
        lambda: initialisation.init_train_state(
            model, make_optimizer(config.solver), 5, feature_dim(arch), (64, 32, 3), 0
        )
    )
    with pytest.raises(CheckpointError, match=re.escape(expected)) as error:
        initialisation.with_init_checkpoint(state, config.model, image_size=(64, 32))
    assert "\n" not in str(error.value)


def _save_vit(path, patch=32, depth=2, extra=None):
    model = rv.VisionTransformer((64, 64), patch, WIDTH, depth, HEADS)
    state = model.state_dict()
    state.update(extra or {})
    torch.save(state, path)
    return path


def test_unknown_vit_shape_and_foreign_parts_are_one_line_errors(tmp_path):
    with pytest.raises(
        torch_pickle.TorchFileError,
        match=r"a ViT with 32x32 patches, width 192 and depth 2, which ctl_jax does not build",
    ):
        conversion.convert_checkpoint(_save_vit(tmp_path / "a.pth"), tmp_path / "a", _config())
    layer_scale = {"blocks.0.ls1.gamma": torch.ones(WIDTH)}
    with pytest.raises(torch_pickle.TorchFileError, match=r"parts ctl_jax's ViT does not have"):
        conversion.convert_checkpoint(
            _save_vit(tmp_path / "b.pth", 16, 12, layer_scale), tmp_path / "b", _config()
        )
    result = subprocess.run(
        [sys.executable, "-m", "ctl_jax.convert", f"--source={tmp_path / 'a.pth'}"]
        + [f"--output={tmp_path / 'c'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "32x32 patches" in lines[0], result.stderr


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("pooling", "gem", "feature is its class token"),
        ("vit_stride", 17, "vit_stride: expected an integer from 1 to"),
        ("drop_path", 1.0, "drop_path: expected a rate"),
    ],
)
def test_bad_vit_settings_are_config_errors(setting, value, message):
    config = _config(64, 32, None, "vit_mini8")
    config.model[setting] = value
    with pytest.raises(ConfigError, match=message):
        build_model(config, 3)


def test_stochastic_depth_drops_whole_samples_and_only_in_training():
    """DropPath keeps each row (x / keep) or zeroes it; the ViT's training output depends on
    the dropout stream, its evaluation output does not."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((64, 3, 5)) + 3.0, jnp.float32)
    out = np.asarray(
        vit.DropPath(0.25).apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
    )
    kept = np.all(np.isclose(out, np.asarray(x) / 0.75), axis=(1, 2))
    dropped = np.all(out == 0.0, axis=(1, 2))
    assert np.all(kept | dropped) and kept.any() and dropped.any()
    config = _config(64, 32, None, "vit_mini8")
    config.model.drop_path = 0.5
    model = build_model(config, 3)
    variables = init_variables(model, jax.random.key(0), (64, 32, 3))
    images = jnp.ones((4, 64, 32, 3))

    @jax.jit
    def train(seed):
        out, _ = model.apply(
            variables, images, train=True, mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(seed)},
        )  # fmt: skip
        return out["features"]

    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    evaluation = model.apply(variables, images, train=False)["features"]
    np.testing.assert_array_equal(
        evaluation, model.apply(variables, images, train=False)["features"]
    )
