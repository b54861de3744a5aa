"""OSNet backbones: torchreid weights imported and embedded like the PyTorch reference
(forward for every width and the IBN variant, gradients), training from a converted OSNet,
and one-line errors for mismatched files."""

import copy
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference_models as trm  # noqa: E402

import ctl_jax  # noqa: E402
from benchmarks import torch_reference_osnet as ro  # noqa: E402
from ctl_jax import configs as config_lib  # noqa: E402
from ctl_jax.build import build_model  # noqa: E402
from ctl_jax.checkpoints import CheckpointError, model_variables, restore_model  # noqa: E402
from ctl_jax.models.reid import feature_dim  # noqa: E402
from ctl_jax.training import initialisation  # noqa: E402
from ctl_jax.training.optimizer import make_optimizer  # noqa: E402
from ctl_jax.weights import conversion, torch_pickle  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
# arch -> (height, width) of the comparison: the re-ID size for the standard model.
CASES = {
    "osnet_x1_0": (256, 128),
    "osnet_x0_5": (64, 32),
    "osnet_x0_25": (64, 32),
    "osnet_ibn_x1_0": (64, 32),
}

torch.set_num_threads(1)


def _config(height=64, width=32, arch="resnet18"):
    config = config_lib.load_config(str(ROOT / "configs" / "default.py"))
    config.data.height, config.data.width = height, width
    config.model.arch = arch
    return config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Lazily writes and converts one randomised reference per arch: (report, dir, model).

    Batch-norm statistics are measured on random images (far from mean 0 / variance 1),
    norm scales and shifts are random (`torch_reference_models.randomise`)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            height, width = CASES[arch]
            gen = torch.Generator().manual_seed(0)
            calibration = torch.randn(8, 3, height, width, generator=gen)
            # Seeded here: the default initialisation draws from torch's global generator,
            # whose state would otherwise depend on which tests ran before.
            torch.manual_seed(list(CASES).index(arch))
            model = trm.randomise(ro.OSNet(arch), calibration, list(CASES).index(arch)).eval()
            directory = tmp_path_factory.mktemp(arch)
            torch.save(model.state_dict(), directory / f"{arch}.pth")
            report = conversion.convert_checkpoint(
                directory / f"{arch}.pth", directory / "converted", _config(height, width)
            )
            cache[arch] = (report, directory / "converted", model)
        return cache[arch]

    return get


def _cosines(ours, reference) -> np.ndarray:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return np.sum(ours * reference, 1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    )


@pytest.mark.parametrize("arch", list(CASES))
def test_converted_osnet_embeds_like_the_reference(arch, converted):
    height, width = CASES[arch]
    report, output, reference = converted(arch)
    assert (report.arch, report.layout) == (arch, "torchreid_osnet")
    assert all(k.startswith(("fc.", "classifier.")) for k in report.unused)  # not the backbone
    images = np.random.default_rng(1).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    embedder = ctl_jax.Embedder.load(output)
    assert embedder.dim == feature_dim(arch)
    ours = embedder(images) * np.sqrt(1.0 + 1e-5)  # the identity BNNeck's epsilon
    normalised = ((images / 255.0 - MEAN) / STD).astype(np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
        expected = reference.pooled(torch.from_numpy(normalised)).numpy()
    cos = _cosines(ours, expected)
    rel = np.abs(ours - expected).max() / np.abs(expected).max()
    print(f"{arch}: min cosine {cos.min():.10f}, max relative diff {rel:.2e}")
    assert cos.min() >= 0.9999
    # Float rounding through ~50 convolutions (the CPU layers' matrix products on the 1x1
    # convolutions); a wrong mapping (an unshared gate, a transposed kernel) is off by O(1).
    assert rel < 2e-4


def test_gradients_match_the_reference(converted):
    """The gradient of a scalar of the features with respect to the images, a depthwise
    kernel and the shared gate's first convolution, in training mode (batch statistics)."""
    height, width = CASES["osnet_x0_25"]
    _, output, reference = converted("osnet_x0_25")
    restored = restore_model(output)
    rng = np.random.default_rng(2)
    images = rng.standard_normal((4, height, width, 3)).astype(np.float32)
    direction = rng.standard_normal((4, feature_dim("osnet_x0_25"))).astype(np.float32)

    def scalar(params, x):
        variables = {"params": params, "batch_stats": restored.variables["batch_stats"]}
        out, _ = restored.model.apply(variables, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.tanh(out["features"]) * direction)

    grad_params, grad_images = jax.jit(jax.grad(scalar, argnums=(0, 1)))(
        restored.variables["params"], images
    )
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    # A copy: a training-mode forward updates the running statistics other tests compare.
    reference = copy.deepcopy(reference).train()
    (torch.tanh(reference.pooled(x)) * torch.from_numpy(direction)).sum().backward()
    block = grad_params["backbone"]["conv3_1"]
    torch_block = reference.conv3[1]
    pairs = {
        "images": (grad_images, x.grad.numpy().transpose(0, 2, 3, 1)),
        "depthwise": (
            block["conv2c_1"]["conv2"]["kernel"],
            torch_block.conv2c[1].conv2.weight.grad.numpy().transpose(2, 3, 1, 0),
        ),
        "gate": (
            block["gate"]["fc1"]["kernel"],
            torch_block.gate.fc1.weight.grad.numpy().transpose(2, 3, 1, 0),
        ),
    }
    for name, (ours, expected) in pairs.items():
        ours, expected = np.asarray(ours).ravel()[None], np.asarray(expected).ravel()[None]
        cos = _cosines(ours, expected)[0]
        rel = np.abs(ours - expected).max() / np.abs(expected).max()
        print(f"d/d{name}: cosine {cos:.10f}, max relative diff {rel:.2e}")
        assert cos >= 0.9999, name
        assert rel < 1e-3, name


def test_training_starts_from_a_converted_osnet(converted):
    _, output, reference = converted("osnet_x0_25")
    config = _config(64, 32, "osnet_x0_25")
    config.model.init_checkpoint = str(output)
    model = build_model(config, 5)
    tx = make_optimizer(config.solver)
    state = initialisation.init_train_state(model, tx, 5, 128, (64, 32, 3), 0)
    logs = []
    state = initialisation.with_init_checkpoint(
        state, config.model, log=logs.append, image_size=(64, 32)
    )
    variables = model_variables(state)
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["conv4_1"]["gate"]["fc2"]["bias"],
        reference.conv4[1].gate.fc2.bias.detach().numpy(),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["backbone"]["conv2_2_0"]["bn"]["var"],
        reference.conv2[2][0].bn.running_var.numpy(),
    )
    assert any("1 start fresh: params/classifier/kernel" in m for m in logs), logs


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("vit_s16", "holds a osnet_x0_25, not a vit_s16"),
        ("osnet_x1_0", "holds a osnet_x0_25, not a osnet_x1_0"),
    ],
)
def test_an_osnet_checkpoint_for_another_arch_is_refused(converted, arch, expected):
    _, output, _ = converted("osnet_x0_25")
    config = _config(64, 32, arch)
    config.model.init_checkpoint = str(output)
    model = build_model(config, 5)
    state = jax.eval_shape(
        lambda: initialisation.init_train_state(
            model, make_optimizer(config.solver), 5, feature_dim(arch), (64, 32, 3), 0
        )
    )
    with pytest.raises(CheckpointError, match=re.escape(expected)) as error:
        initialisation.with_init_checkpoint(state, config.model, image_size=(64, 32))
    assert "\n" not in str(error.value)


def test_unknown_osnet_width_is_a_one_line_error(tmp_path):
    model = ro.OSNet("osnet_x0_25")
    model.conv5 = ro.ConvBN(128, 96)  # a width no OSNet has
    torch.save(model.state_dict(), tmp_path / "odd.pth")
    with pytest.raises(
        torch_pickle.TorchFileError,
        match=re.escape("an OSNet with channels (16, 64, 96, 96), which ctl_jax does not build"),
    ):
        conversion.convert_checkpoint(tmp_path / "odd.pth", tmp_path / "out", _config())
