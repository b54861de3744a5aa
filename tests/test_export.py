"""`python -m ctl_jax.export`: the ONNX model run by onnxruntime and the deserialised
StableHLO give ctl_jax's own embeddings, for any batch size; bad input is a one-line error."""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny_model import REPO, random_images, save_random_model

import ctl_jax
from ctl_jax.deploy.verify import cosine_rows, run_exported
from ctl_jax.models import resnet
from ctl_jax.models.reid import ReidModel, init_variables

H, W = 32, 16
onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    save_random_model(directory, height=H, width=W)
    return directory


@pytest.fixture(scope="module")
def embedder(model_dir):
    return ctl_jax.Embedder.load(model_dir)


def export(*args):
    env = dict(os.environ)
    env.setdefault("CTL_JAX_COMPILATION_CACHE", str(REPO / ".cache" / "jax"))
    return subprocess.run(
        [sys.executable, "-m", "ctl_jax.export", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )


@pytest.mark.parametrize("fmt", ["onnx", "stablehlo"])
def test_export_matches_ctl_jax_for_every_image_and_batch_size(fmt, model_dir, embedder, tmp_path):
    output = tmp_path / f"model.{fmt}"
    verify = ["--verify"] if fmt == "onnx" else []  # one is enough: it compiles the model
    done = export(f"--checkpoint={model_dir}", f"--format={fmt}", f"--output={output}", *verify)
    assert done.returncode == 0, done.stderr
    assert f"uint8 (N, {H}, {W}, 3)" in done.stdout and "float32 (N, 512)" in done.stdout
    assert ("lowest cosine similarity to ctl_jax" in done.stdout) == bool(verify)
    for n in (1, 7):
        images = random_images(n, H, W, seed=10 + n)
        got = run_exported(output, fmt, images)
        want = embedder(images)
        assert got.shape == want.shape == (n, 512) and got.dtype == np.float32
        assert cosine_rows(got, want).min() >= 0.9999
        if n > 1:  # the images are told apart, so a mix-up of rows would fail
            assert cosine_rows(got, np.roll(want, 1, axis=0)).max() < 0.99
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        assert (inp.name, inp.type, inp.shape) == ("images", "tensor(uint8)", ["N", H, W, 3])
        assert (out.name, out.type, out.shape) == ("embeddings", "tensor(float)", ["N", 512])


def _onnx_and_jax(model, variables, images):
    """(ONNX proto, its embeddings of `images` under onnxruntime, the JAX model's)."""
    from ctl_jax.data import transforms
    from ctl_jax.deploy.onnx_graph import build_onnx_model

    want = np.asarray(
        model.apply(variables, transforms.normalize(images), train=False)["bn_features"]
    )
    proto = build_onnx_model(model, variables, H, W)
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return proto, session.run(["embeddings"], {"images": images})[0], want


def test_onnx_graph_of_bottleneck_ibn_blocks():
    """IBN-a, bottlenecks, stem ReLU and last stride 2 (a ResNet-50-IBN-a with one block per
    stage, so that it compiles quickly): the graph equals the JAX model."""

    backbone = functools.partial(resnet.ResNet50IBNa, stage_sizes=(1, 1, 1, 1), last_stride=2)
    model = ReidModel(backbone=backbone, num_classes=3)
    variables = init_variables(model, jax.random.key(1), (H, W, 3))
    rng = np.random.default_rng(1)
    variables["batch_stats"] = jax.tree.map(
        lambda x: np.asarray(x) * rng.uniform(0.5, 2.0, np.shape(x)).astype(np.float32),
        variables["batch_stats"],
    )
    proto, got, want = _onnx_and_jax(model, variables, random_images(5, H, W, seed=3))
    assert got.shape == (5, 2048)
    assert cosine_rows(got, want).min() >= 0.9999
    assert any(node.op_type == "InstanceNormalization" for node in proto.graph.node)


def test_bad_input_is_a_one_line_error(model_dir, tmp_path):
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"keep me")
    done = export(f"--checkpoint={model_dir}", "--format=onnx", f"--output={existing}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {existing} exists; pass --overwrite to replace it or choose another --output"
    ]
    assert existing.read_bytes() == b"keep me"
    missing = tmp_path / "no_such_run"
    new = tmp_path / "new.onnx"
    done = export(f"--workdir={missing}", "--format=onnx", f"--output={new}")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]
    assert not new.exists()
    done = export(f"--workdir={model_dir}", f"--output={new}")
    assert done.returncode == 2 and "give --format=onnx or --format=stablehlo" in done.stderr


@pytest.mark.parametrize(
    "pooling", [dict(pooling="max"), dict(pooling="gem", gem_p=3.0, gem_learnable=True)]
)
def test_onnx_graph_of_the_other_poolings(pooling):
    """MAC and GeM (with a learned p that has moved from its initial value) in the graph equal
    the JAX model's; R-MAC, which the graph cannot express, is a one-line error."""
    from ctl_jax.deploy.onnx_graph import build_onnx_model
    from ctl_jax.errors import InvalidValueError

    model = ReidModel(backbone=resnet.ResNet18, num_classes=3, **pooling)
    variables = init_variables(model, jax.random.key(2), (H, W, 3))
    if pooling["pooling"] == "gem":
        variables["params"]["pooling"]["p"] = np.array([2.4], np.float32)
    _, got, want = _onnx_and_jax(model, variables, random_images(4, H, W, seed=5))
    assert cosine_rows(got, want).min() >= 0.9999
    rmac = ReidModel(backbone=resnet.ResNet18, num_classes=3, pooling="rmac")
    with pytest.raises(InvalidValueError, match="stablehlo"):
        build_onnx_model(rmac, variables, H, W)
