"""Importing PyTorch weights: the safe reader, layouts, embeddings equal to PyTorch's, training
initialisation from a converted checkpoint, and clear errors for bad files."""

import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference_models as trm  # noqa: E402

from ctl_jax import configs as config_lib  # noqa: E402
from ctl_jax.checkpoints import CheckpointStore, model_variables, restore_model  # noqa: E402
from ctl_jax.training import initialisation  # noqa: E402
from ctl_jax.weights import conversion, mapping, torch_pickle  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 64, 32
NUM_CLASSES = 7

# Two cores shared with XLA: more torch threads only contend.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_config():
    return config_lib.load_config(str(ROOT / "configs" / "default.py"))


@pytest.fixture(scope="module")
def images():
    """(calibration images for batch-norm statistics, test images), NCHW float32."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, HEIGHT, WIDTH, generator=gen), torch.randn(
        3, 3, HEIGHT, WIDTH, generator=gen
    )


def _jax_outputs(checkpoint_dir, images_nchw):
    restored = restore_model(checkpoint_dir)
    apply = jax.jit(lambda v, x: restored.model.apply(v, x, train=False))
    nhwc = np.ascontiguousarray(images_nchw.numpy().transpose(0, 2, 3, 1))
    return restored, jax.device_get(apply(restored.variables, nhwc))


def _agreement(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(smallest per-row cosine similarity, max |difference| / max |reference|)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    cos = np.sum(ours * reference, 1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    )
    return float(cos.min()), float(np.abs(ours - reference).max() / np.abs(reference).max())


# --- the reader -------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reader_returns_what_torch_load_returns(tmp_path, legacy):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    data = {
        "float": torch.randn(3, 5),
        "transposed_view": base.t(),  # non-contiguous, shares its storage with "base"
        "slice_view": base[1:3, 2:],  # storage offset
        "base": base,
        "half": torch.randn(4).half(),
        "bfloat16": torch.randn(4).bfloat16(),
        "long": torch.tensor([1, -2, 3]),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.ones(2)),
        "nested": [{"a": torch.ones(1)}, (1, "x", None, 2.0)],
    }
    if not legacy:  # dtypes without a legacy storage class: torch cannot write them there
        data["uint16"] = torch.tensor([[0, 1, 2], [3, 65535, 5]], dtype=torch.uint16).t()
    path = tmp_path / "mixed.pth"
    torch.save(data, path, _use_new_zipfile_serialization=not legacy)
    ours = torch_pickle.load(path)
    reference = torch.load(path, weights_only=True)
    assert ours.format == ("legacy" if legacy else "zip")
    assert ours.inert_names == []
    for key, value in reference.items():
        if key == "nested":
            continue
        got = ours.root[key]
        expected = value.detach().float().numpy() if key == "bfloat16" else value.detach().numpy()
        assert got.shape == expected.shape, key
        np.testing.assert_array_equal(np.asarray(got, expected.dtype), expected, err_msg=key)
    assert ours.root["bfloat16"].dtype.name == "bfloat16"
    assert ours.root["half"].dtype == np.float16
    np.testing.assert_array_equal(ours.root["nested"][0]["a"], [1.0])
    assert ours.root["nested"][1] == (1, "x", None, 2.0)


@pytest.mark.parametrize("dtype", ["float32", "uint16"])  # storage classes / raw bytes + dtype
def test_reader_handles_big_endian_archives(tmp_path, dtype):
    values = torch.arange(20).reshape(4, 5).to(getattr(torch, dtype))
    data = {"a": values[:, 1:], "b": values.t()}
    little, big = tmp_path / "little.pth", tmp_path / "big.pth"
    torch.save(data, little)
    # Rewrite as a big-endian machine would have: byte order record and swapped storages.
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for info in src.infolist():
            payload = src.read(info)
            if info.filename.endswith("/byteorder"):
                payload = b"big"
            elif "/data/" in info.filename:
                payload = np.frombuffer(payload, np.dtype(dtype)).byteswap().tobytes()
            dst.writestr(info.filename, payload)
    ours = torch_pickle.load(big)
    for key, value in data.items():
        np.testing.assert_array_equal(ours.root[key], value.numpy())
        assert ours.root[key].dtype == np.dtype(dtype)  # native byte order
    if dtype == "float32":  # torch 2.13 itself does not swap raw-byte (uint16) storages
        for key, value in torch.load(big, weights_only=True).items():
            np.testing.assert_array_equal(ours.root[key], value.numpy())


def test_reader_reads_pytorch_0_3_files_with_storage_views(tmp_path):
    root = torch.arange(20, dtype=torch.float32)
    path = tmp_path / "old.pth"
    trm.save_pre04_legacy_file(
        path,
        tensors={
            "whole": ("r", 0, (4, 5), (5, 1)),
            "transposed": ("r", 2, (3, 2), (1, 5)),
            "on_view": ("v", 1, (2, 3), (3, 1)),  # elements 8.. of the view at offset 7
        },
        storages={"r": root},
        views={"v": ("r", 7, 10)},
    )
    ours = torch_pickle.load(path)
    reference = torch.load(path, weights_only=True)
    assert ours.format == "legacy" and "torch._utils._rebuild_tensor" in ours.names
    for key, value in reference.items():
        np.testing.assert_array_equal(ours.root[key], value.numpy(), err_msg=key)
    np.testing.assert_array_equal(ours.root["on_view"], [[8, 9, 10], [11, 12, 13]])


def test_reader_refuses_tensors_outside_their_storage(tmp_path):
    path = tmp_path / "overflow.pth"
    trm.save_pre04_legacy_file(
        path, tensors={"big": ("r", 0, (64,), (1,))}, storages={"r": torch.zeros(16)}
    )
    with pytest.raises(torch_pickle.TorchFileError, match="reaches element 63 of a storage"):
        torch_pickle.load(path)


class _Exploit:
    """Unpickling this with a normal unpickler runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_reader_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pth"
    torch.save({"conv1.weight": torch.ones(1), "payload": _Exploit(marker)}, path)
    loaded = torch_pickle.load(path)
    assert not marker.exists()
    payload = loaded.root["payload"]
    assert isinstance(payload, torch_pickle.OpaqueObject)
    assert payload.pickled_name in ("posix.system", "nt.system")
    assert payload.args == (f"touch {marker}",)
    assert loaded.names[payload.pickled_name] == "inert"
    np.testing.assert_array_equal(loaded.root["conv1.weight"], [1.0])


def test_lightning_checkpoint_config_is_read_as_data(tmp_path, base_config):
    model = trm.CTLModel(trm.make_resnet("resnet18", stem_relu=False), NUM_CLASSES)
    path = tmp_path / "market.ckpt"
    trm.save_lightning_checkpoint(model, path, "resnet18", image_size=(256, 128), last_stride=2)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # why the safe reader exists
    loaded = torch_pickle.load(path)
    assert loaded.inert_names == [
        "pytorch_lightning.utilities.parsing.AttributeDict",
        "yacs.config.CfgNode",
    ]
    source = mapping.read_source(loaded.root, str(path))
    assert source.settings == {"name": "resnet18", "last_stride": 2, "image_size": (256, 128)}
    config, notes = conversion.resolve_config(base_config, source)
    assert config.model.last_stride == 2 and base_config.model.last_stride == 1
    assert (config.data.height, config.data.width) == (256, 128)
    assert config.model.arch == "resnet18" and config.model.stem_relu is None
    assert len(notes) == 2
    # The PyTorch network average-pools and has a linear classifier, whatever the base
    # config would train.
    assert (config.model.pooling, config.loss.classifier) == ("avg", "softmax")
    heads = ml_collections.ConfigDict(base_config.to_dict())
    heads.model.pooling, heads.model.gem_learnable = "gem", True
    heads.loss.classifier = "arcface"
    config, _ = conversion.resolve_config(heads, source)
    assert (config.model.pooling, config.model.gem_learnable) == ("avg", False)
    assert config.loss.classifier == "softmax"
    assert source.layout.name == "ctl_lightning"
    assert source.architecture.arch == "resnet18"
    assert source.num_classes == NUM_CLASSES


# --- conversion, compared with PyTorch ----------------------------------------------------

CASES = {
    # id: (arch, source kind); together the three file formats on the three architectures.
    "resnet18-torchvision-zip": ("resnet18", "torchvision"),
    "resnet18-ctl-ckpt": ("resnet18", "ctl"),
    "resnet50-torchvision-legacy": ("resnet50", "torchvision_legacy"),
    "resnet50-ctl-ckpt": ("resnet50", "ctl"),
    "resnet50_ibn_a-ibn-pth": ("resnet50_ibn_a", "ibn"),
    "resnet50_ibn_a-ctl-ckpt": ("resnet50_ibn_a", "ctl"),
}


def _make_source(kind, arch, directory, images, seed):
    """Writes a reference model in the format of `kind`.

    Returns:
      (file, torch model, (N, C) reference output: the BNNeck embedding for CTL checkpoints,
      the pooled feature for ImageNet backbones).
    """
    calibration, test_images = images
    ibn = arch.endswith("ibn_a")
    if kind == "ctl":
        # The original plain ResNet has no stem ReLU, its IBN-a backbone has one.
        base = trm.make_resnet(arch, stem_relu=ibn, num_classes=1000 if ibn else None)
        model = trm.randomise(trm.CTLModel(base, NUM_CLASSES), calibration, seed)
        path = directory / f"{arch}.ckpt"
        trm.save_lightning_checkpoint(model, path, arch, image_size=(HEIGHT, WIDTH))
        with torch.no_grad():
            return path, model, model.embed(test_images).numpy()
    model = trm.randomise(
        trm.make_resnet(arch, stem_relu=True, num_classes=1000), calibration, seed
    )
    path = directory / f"{arch}.pth"
    if kind == "ibn":
        trm.save_ibn_checkpoint(model, path)
    else:
        trm.save_state_dict(model, path, legacy=kind == "torchvision_legacy")
    with torch.no_grad():
        return path, model, model.pooled(test_images).numpy()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, images, base_config):
    """Lazily converts each case once: case id -> (report, output dir, torch model, outputs)."""
    cache = {}

    def get(case):
        if case not in cache:
            arch, kind = CASES[case]
            directory = tmp_path_factory.mktemp(case)
            seed = list(CASES).index(case)
            path, model, reference = _make_source(kind, arch, directory, images, seed)
            report = conversion.convert_checkpoint(path, directory / "converted", base_config)
            cache[case] = (report, directory / "converted", model, reference)
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_embeds_like_pytorch(case, converted, images):
    arch, kind = CASES[case]
    report, output, model, reference = converted(case)
    restored, outputs = _jax_outputs(output, images[1])

    assert report.arch == arch and restored.config.model.arch == arch
    assert restored.config.model.last_stride == 1
    if kind == "ctl":
        # The CTL embedding is the BNNeck output.
        cos, rel = _agreement(outputs["bn_features"], reference)
        assert report.layout == "ctl_lightning"
        assert restored.num_classes == NUM_CLASSES
        assert report.filled == []
        assert report.unused == (
            ["backbone.base.fc.bias", "backbone.base.fc.weight"] if arch.endswith("ibn_a") else []
        )
        assert restored.config.model.stem_relu is None  # automatic = the original's choice
        assert report.inert_objects == [
            "pytorch_lightning.utilities.parsing.AttributeDict",
            "yacs.config.CfgNode",
        ]
        state = CheckpointStore(output, read_only=True).restore_raw()
        np.testing.assert_array_equal(state["centers"], model.center_loss.centers.detach().numpy())
        logits = model.fc_query(torch.from_numpy(np.array(outputs["bn_features"])))
        np.testing.assert_allclose(outputs["logits"], logits.detach().numpy(), atol=1e-4)
    else:
        # ImageNet weights: the pooled feature; the BNNeck is the identity.
        cos, rel = _agreement(outputs["features"], reference)
        np.testing.assert_allclose(
            outputs["bn_features"], outputs["features"] / np.sqrt(1 + 1e-5), rtol=1e-6
        )
        assert restored.num_classes == 1000
        assert report.unused == ["fc.bias"]
        assert sorted(report.filled) == [
            "batch_stats/bnneck/mean",
            "batch_stats/bnneck/var",
            "params/bnneck/scale",
        ]
        assert restored.config.model.stem_relu is (None if kind == "ibn" else True)
        assert report.layout == ("resnet_ibn_a" if kind == "ibn" else "torchvision_resnet")
    assert report.ignored and all(k.endswith("num_batches_tracked") for k in report.ignored)
    print(f"{case}: cosine {cos:.10f} (1 - cos {1 - cos:.1e}), max relative diff {rel:.2e}")
    assert cos >= 0.9999
    # Float rounding through 16-50 layers, largest at the BNNeck output of a randomly
    # initialised CTL ResNet-50: 6.1e-5 with Winograd F(2x2, 3x3) only, 2.1e-4 with the
    # default F(4x4, 3x3) on maps of 8x8 and more (`cpu_winograd_tile`, docs/performance.md);
    # a wrong mapping (a transposed kernel, a swapped statistic) is off by O(0.1-1).
    assert rel < 4e-4


def _initial_variables(config, num_classes, logs):
    """The model variables of a new training run's initial state."""
    from ctl_jax.build import build_model
    from ctl_jax.models.reid import feature_dim
    from ctl_jax.training.optimizer import make_optimizer

    model = build_model(config, num_classes)
    dim = feature_dim(config.model.arch)
    tx = make_optimizer(config.solver)
    state = initialisation.init_train_state(model, tx, num_classes, dim, (HEIGHT, WIDTH, 3), 0)
    state = initialisation.with_init_checkpoint(state, config.model, log=logs.append)
    return model_variables(state)


def test_training_initialises_from_converted_imagenet_weights(converted, base_config):
    report, output, _, _ = converted("resnet18-torchvision-zip")
    config = ml_collections.ConfigDict(base_config.to_dict())
    config.model.init_checkpoint = str(output)
    num_classes = 5
    logs = []
    variables = _initial_variables(config, num_classes, logs)
    converted_state = CheckpointStore(output, read_only=True).restore_raw()
    backbone = converted_state["params"]["backbone"]
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["layer3_0"]["conv2"]["kernel"],
        backbone["layer3_0"]["conv2"]["kernel"],
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["backbone"]["bn1"]["var"],
        converted_state["batch_stats"]["backbone"]["bn1"]["var"],
    )
    classifier = np.asarray(variables["params"]["classifier"]["kernel"])
    assert classifier.shape == (512, num_classes)  # fresh: N(0, 0.001^2), not ImageNet's fc
    assert 0 < classifier.std() < 0.01
    assert "params/classifier/kernel" in logs[0]

    # Even when the class count equals ImageNet's, the ImageNet fc is not a re-ID classifier.
    imagenet_classes = converted_state["params"]["classifier"]["kernel"].shape[-1]
    variables = _initial_variables(config, imagenet_classes, logs)
    classifier = np.asarray(variables["params"]["classifier"]["kernel"])
    assert 0 < classifier.std() < 0.01

    # A GeM model with a learnable exponent takes the backbone; p starts at its initial value.
    config.model.pooling, config.model.gem_learnable, config.model.gem_p = "gem", True, 3.5
    config.loss.classifier = "arcface"
    variables = _initial_variables(config, num_classes, logs)
    np.testing.assert_array_equal(variables["params"]["pooling"]["p"], [3.5])
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["layer3_0"]["conv2"]["kernel"],
        backbone["layer3_0"]["conv2"]["kernel"],
    )
    assert "params/pooling/p" in logs[-1]


def _initial_centers(config, num_classes, logs):
    """The center-loss centers of a new training run's initial state."""
    from ctl_jax.build import build_model
    from ctl_jax.models.reid import feature_dim
    from ctl_jax.training.optimizer import make_optimizer

    model = build_model(config, num_classes)
    tx = make_optimizer(config.solver)
    shape = (HEIGHT, WIDTH, 3)
    state = initialisation.init_train_state(
        model, tx, num_classes, feature_dim(config.model.arch), shape, 0
    )
    fresh = np.asarray(state.centers)
    state = initialisation.with_init_checkpoint(state, config.model, log=logs.append)
    return fresh, np.asarray(state.centers)


def test_training_from_a_converted_ctl_checkpoint_starts_from_its_centers(converted, base_config):
    _, output, model, _ = converted("resnet18-ctl-ckpt")
    original = model.center_loss.centers.detach().numpy()  # the PyTorch run's centers
    config = ml_collections.ConfigDict(base_config.to_dict())
    config.model.init_checkpoint = str(output)
    logs = []
    fresh, centers = _initial_centers(config, NUM_CLASSES, logs)
    np.testing.assert_array_equal(centers, original)
    assert not np.allclose(fresh, original)
    assert logs[-1] == f"centers taken from {output} ({NUM_CLASSES} classes)"

    # Another number of classes (a new dataset): the classifier and the centers start fresh.
    fresh, centers = _initial_centers(config, NUM_CLASSES + 2, logs)
    np.testing.assert_array_equal(centers, fresh)
    assert logs[-1].startswith(f"note: the centers of {output} ({NUM_CLASSES} classes x 512)")
    assert logs[-1].endswith(f"({NUM_CLASSES + 2} classes x 512); they start fresh")


def test_output_directory_is_not_overwritten_silently(converted, base_config, tmp_path):
    _, output, _, _ = converted("resnet18-torchvision-zip")
    first, second = tmp_path / "first.pth", tmp_path / "second.pth"
    trm.save_state_dict(trm.make_resnet("resnet18", stem_relu=True), first)
    replacement = trm.make_resnet("resnet18", stem_relu=True)
    trm.save_state_dict(replacement, second)
    with pytest.raises(FileExistsError, match="--overwrite"):
        conversion.convert_checkpoint(first, output, base_config)
    target = tmp_path / "out"
    conversion.convert_checkpoint(first, target, base_config)
    report = conversion.convert_checkpoint(second, target, base_config, overwrite=True)
    assert report.unused == []  # no fc in these models: a zero classifier is filled in
    assert "params/classifier/kernel" in report.filled
    store = CheckpointStore(target, read_only=True)
    assert store.all_steps() == [0]
    np.testing.assert_array_equal(
        store.restore_raw()["params"]["backbone"]["conv1"]["kernel"],
        replacement.conv1.weight.detach().numpy().transpose(2, 3, 1, 0),
    )


# --- errors -----------------------------------------------------------------------------


def _resnet18_file(tmp_path, legacy=False):
    path = tmp_path / ("legacy.pth" if legacy else "r18.pth")
    trm.save_state_dict(trm.make_resnet("resnet18", stem_relu=True), path, legacy=legacy)
    return path


def test_corrupt_file_is_rejected(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(torch_pickle.TorchFileError, match="not a PyTorch checkpoint"):
        torch_pickle.load(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_file_is_rejected(tmp_path, legacy):
    path = _resnet18_file(tmp_path, legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(torch_pickle.TorchFileError, match="truncated"):
        torch_pickle.load(path)


def test_non_resnet_state_dict_is_rejected(tmp_path, base_config):
    vgg_like = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    path = tmp_path / "vgg.pth"
    torch.save({"features." + k: v for k, v in vgg_like.state_dict().items()}, path)
    with pytest.raises(
        torch_pickle.TorchFileError,
        match="neither a ResNet, a timm ViT nor a torchreid OSNet state dict",
    ):
        conversion.convert_checkpoint(path, tmp_path / "out", base_config)
    assert not (tmp_path / "out").exists()


def test_incomplete_resnet_is_rejected(tmp_path, base_config):
    state = trm.make_resnet("resnet18", stem_relu=True).state_dict()
    del state["layer2.1.bn2.running_var"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(torch_pickle.TorchFileError, match=r"missing, e\.g\. layer2\.1\.bn2"):
        conversion.convert_checkpoint(path, tmp_path / "out", base_config)


def test_bnneck_with_a_shift_is_rejected(tmp_path, base_config):
    model = trm.CTLModel(trm.make_resnet("resnet18", stem_relu=False), NUM_CLASSES)
    with torch.no_grad():
        model.bn.bias.fill_(0.1)
    path = tmp_path / "shifted.ckpt"
    trm.save_lightning_checkpoint(model, path, "resnet18")
    with pytest.raises(torch_pickle.TorchFileError, match="bn.bias is not zero"):
        conversion.convert_checkpoint(path, tmp_path / "out", base_config)


def test_file_name_hash_is_checked(tmp_path):
    path = _resnet18_file(tmp_path)
    renamed = path.rename(tmp_path / "resnet18-0123abcd.pth")
    with pytest.raises(torch_pickle.TorchFileError, match="hash in its name"):
        torch_pickle.load(renamed)


def _run_convert(*args, block_torch=False):
    """Runs `python -m ctl_jax.convert ARGS`; with `block_torch`, `import torch` fails in it."""
    code = "import runpy, sys\n"
    if block_torch:
        code += "sys.modules['torch'] = None\n"
    code += "runpy.run_module('ctl_jax.convert', run_name='__main__', alter_sys=True)\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_cli_prints_one_line_errors(tmp_path):
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(b"\x00" * 100)
    failed = _run_convert(f"--source={noise}", f"--output={tmp_path / 'out'}")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        f"error: {noise}: not a PyTorch checkpoint (neither a zip archive nor a pickle stream)"
    ]


def test_cli_converts_without_torch_installed(tmp_path, converted):
    report, _, _, _ = converted("resnet18-ctl-ckpt")
    output = tmp_path / "converted"
    done = _run_convert(f"--source={report.source}", f"--output={output}", block_torch=True)
    assert done.returncode == 0, done.stderr
    assert "model: resnet18, stem ReLU off (automatic, as the original)" in done.stdout
    assert f"written to {output}" in done.stdout
    assert restore_model(output).num_classes == NUM_CLASSES


def test_inspect_describes_a_file_without_converting_it(converted):
    report, _, _, _ = converted("resnet18-ctl-ckpt")
    text = conversion.inspect_source(report.source)
    assert (
        "never imported or run): pytorch_lightning.utilities.parsing.AttributeDict, "
        "yacs.config.CfgNode" in text
    )
    assert "layout: ctl_lightning; architecture: resnet18" in text
    assert f"classes: {NUM_CLASSES}" in text


def test_convert_refuses_code_executing_globals_unless_allowed(tmp_path, base_config):
    marker = tmp_path / "pwned"
    path = tmp_path / "resnet18-hostile.pth"
    state = trm.make_resnet("resnet18", stem_relu=False).state_dict()
    state["payload"] = _Exploit(marker)
    torch.save(state, path)
    output = tmp_path / "out"
    with pytest.raises(torch_pickle.TorchFileError, match=r"system.*--allow_unsafe_globals"):
        conversion.convert_checkpoint(path, output, base_config)
    assert not output.exists() and not marker.exists()
    assert "code-executing globals" in conversion.inspect_source(path)
    report = conversion.convert_checkpoint(path, output, base_config, allow_unsafe_globals=True)
    assert report.arch == "resnet18" and not marker.exists()
    assert any(name.endswith(".system") for name in report.inert_objects)
