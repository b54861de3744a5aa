"""The re-ID model as an ONNX graph, written from the Flax parameters with `onnx.helper`.

Graph: `images` uint8 (N, H, W, 3) RGB -> Cast -> x * NORMALIZE_SCALE - NORMALIZE_SHIFT (the
ImageNet normalisation of `ctl_jax.data.transforms.normalize`) -> Transpose to NCHW -> the
ResNet (each convolution with its batch norm folded in: Conv with a bias; IBN-a blocks split
the channels into InstanceNormalization and a per-channel multiply-add) -> the global pooling
(average, max or GeM; R-MAC has no ONNX form here) -> the BNNeck as a per-channel
multiply-add -> `embeddings` float32 (N, D). The batch dimension is symbolic ("N"); H and W
are the model's input size. Opset 17, IR version 8, so that runtimes from 2022 on load it.

Why written directly rather than converted: the model is a fixed, small set of operations
(convolutions, batch norms, ReLU, max pool, instance norm, a mean), so the graph is about 150
lines that we control and test against JAX; jax2onnx pins an older orbax-checkpoint than ours
(and needs Python 3.11+), and the JAX -> TensorFlow -> tf2onnx route needs TensorFlow.
The architecture is read from the same module definition the JAX model is built from
(`ReidModel.backbone`), and the parameters by the names `ctl_jax.models` documents.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ctl_jax.data import transforms
from ctl_jax.errors import InvalidValueError
from ctl_jax.models import resnet
from ctl_jax.models.layers import REFERENCE_LAYERS, BatchNorm

OPSET = 17
IR_VERSION = 8
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
# The epsilons of the JAX model: `BatchNorm`'s default and the IBN-a instance norm's.
BN_EPSILON = BatchNorm.epsilon
IN_EPSILON = 1e-5


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float32)


@dataclasses.dataclass
class _GraphBuilder:
    """Accumulates nodes and initializers; names are unique by construction."""

    nodes: list = dataclasses.field(default_factory=list)
    initializers: list = dataclasses.field(default_factory=list)
    count: int = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        from onnx import helper

        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _bn_affine(bn_params, bn_stats) -> tuple[np.ndarray, np.ndarray]:
    """(mul, add) of an inference batch norm: y = x * mul + add, as `layers.normalize`."""
    mul = _np(bn_params["scale"]) / np.sqrt(_np(bn_stats["var"]) + BN_EPSILON)
    add = -_np(bn_stats["mean"]) * mul
    if "bias" in bn_params:
        add = add + _np(bn_params["bias"])
    return mul.astype(np.float32), add.astype(np.float32)


def _conv(g, x, kernel, strides, pads, bn=None, hint="conv") -> str:
    """Conv of an HWIO `kernel` (no bias) with padding `pads` each side, batch norm folded."""
    weight = np.transpose(_np(kernel), (3, 2, 0, 1))  # HWIO -> OIHW
    inputs = [x]
    if bn is not None:
        mul, add = _bn_affine(*bn)
        weight = weight * mul[:, None, None, None]
        bias = add
    else:
        bias = None
    inputs.append(g.const(f"{hint}_w", weight.astype(np.float32)))
    if bias is not None:
        inputs.append(g.const(f"{hint}_b", bias))
    kh, kw = weight.shape[2:]
    return g.op(
        "Conv",
        inputs,
        hint,
        kernel_shape=[kh, kw],
        strides=[strides, strides],
        pads=[pads, pads, pads, pads],
    )


def _channel_affine(g, x, mul, add, hint) -> str:
    """x * mul + add per channel of an NCHW tensor."""
    shape = (1, -1, 1, 1)
    y = g.op("Mul", [x, g.const(f"{hint}_mul", mul.reshape(shape))], f"{hint}_mul")
    return g.op("Add", [y, g.const(f"{hint}_add", add.reshape(shape))], f"{hint}_add")


def _ibn(g, x, params, stats, half: int, hint: str) -> str:
    """IBN-a: instance norm on channels [0:half], batch norm on the rest (resnet.IBN)."""
    from onnx import helper

    rest = len(_np(params["BN"]["scale"]))
    sizes = g.const(f"{hint}_sizes", np.asarray([half, rest], np.int64))
    a, b = g.name(f"{hint}_in_part"), g.name(f"{hint}_bn_part")
    g.nodes.append(helper.make_node("Split", [x, sizes], [a, b], name=g.name(hint), axis=1))
    x_in = g.op(
        "InstanceNormalization",
        [
            a,
            g.const(f"{hint}_in_scale", _np(params["IN"]["scale"])),
            g.const(f"{hint}_in_bias", _np(params["IN"]["bias"])),
        ],
        f"{hint}_in",
        epsilon=IN_EPSILON,
    )
    mul, add = _bn_affine(params["BN"], stats["BN"])
    x_bn = _channel_affine(g, b, mul, add, f"{hint}_bn")
    return g.op("Concat", [x_in, x_bn], f"{hint}_cat", axis=1)


def _block(g, x, block, params, stats, name: str) -> str:
    """One BasicBlock or Bottleneck (`resnet.py`), its batch norms folded."""
    p, s = params[name], stats[name]
    bottleneck = block["cls"] is resnet.Bottleneck
    stride = block["strides"]
    if bottleneck:
        if block["ibn"]:
            y = _conv(g, x, p["conv1"]["kernel"], 1, 0, hint=f"{name}_conv1")
            y = _ibn(g, y, p["bn1"], s["bn1"], block["planes"] // 2, f"{name}_ibn")
        else:
            y = _conv(g, x, p["conv1"]["kernel"], 1, 0, (p["bn1"], s["bn1"]), f"{name}_conv1")
        y = g.op("Relu", [y], f"{name}_relu1")
        y = _conv(g, y, p["conv2"]["kernel"], stride, 1, (p["bn2"], s["bn2"]), f"{name}_conv2")
        y = g.op("Relu", [y], f"{name}_relu2")
        y = _conv(g, y, p["conv3"]["kernel"], 1, 0, (p["bn3"], s["bn3"]), f"{name}_conv3")
    else:
        y = _conv(g, x, p["conv1"]["kernel"], stride, 1, (p["bn1"], s["bn1"]), f"{name}_conv1")
        y = g.op("Relu", [y], f"{name}_relu1")
        y = _conv(g, y, p["conv2"]["kernel"], 1, 1, (p["bn2"], s["bn2"]), f"{name}_conv2")
    if "downsample_conv" in p:
        shortcut = _conv(
            g,
            x,
            p["downsample_conv"]["kernel"],
            stride,
            0,
            (p["downsample_bn"], s["downsample_bn"]),
            f"{name}_down",
        )
    else:
        shortcut = x
    return g.op("Relu", [g.op("Add", [y, shortcut], f"{name}_add")], f"{name}_out")


def _backbone_spec(model) -> resnet.ResNet:
    """The (unbound) ResNet module the model builds: its stage sizes, block type, strides."""
    backbone = model.backbone(dtype=jnp.float32, layers=REFERENCE_LAYERS, name="backbone")
    if not isinstance(backbone, resnet.ResNet):
        raise InvalidValueError(
            f"ONNX export knows the ResNet backbones of ctl_jax.models, not "
            f"{type(backbone).__name__}; use --format=stablehlo for this model"
        )
    return backbone


# Global poolings the graph can express (`ctl_jax.models.pooling`); R-MAC's region grid is
# left to the StableHLO export, which runs the JAX function itself.
ONNX_POOLINGS = ("avg", "max", "gem")


def check_pooling(model) -> None:
    """A one-line error before anything is written if `model`'s pooling has no ONNX form."""
    if model.pooling not in ONNX_POOLINGS:
        raise InvalidValueError(
            f"ONNX export supports model.pooling {', '.join(ONNX_POOLINGS)}, not "
            f"{model.pooling!r}; use --format=stablehlo for this model"
        )


def _pooling(g, x, model, params):
    """(N, C, h, w) -> (N, C, 1, 1) as `ctl_jax.models.pooling.Pooling` computes it."""
    check_pooling(model)
    if model.pooling == "avg":
        return g.op("GlobalAveragePool", [x], "pool")
    if model.pooling == "max":
        return g.op("GlobalMaxPool", [x], "pool")
    # GeM: (mean of clamp(x, eps)^p)^(1/p), p the trained parameter when it is learnable.
    p = float(params["pooling"]["p"][0]) if model.gem_learnable else float(model.gem_p)
    clamped = g.op("Max", [x, g.const("gem_eps", np.float32(1e-6))], "gem_clamp")
    powered = g.op("Pow", [clamped, g.const("gem_p", np.float32(p))], "gem_pow")
    mean = g.op("GlobalAveragePool", [powered], "gem_mean")
    return g.op("Pow", [mean, g.const("gem_inv_p", np.float32(1.0 / p))], "pool")


def build_onnx_model(model, variables: dict, height: int, width: int):
    """The ONNX `ModelProto` of a `ReidModel` with its variables.

    Args:
      model: the `ReidModel` (any layer set: only its definition and parameters are read).
      variables: {"params", "batch_stats"}.
      height, width: the input size the graph is fixed to.

    Returns:
      An `onnx.ModelProto`: input `images` uint8 (N, height, width, 3), output
      `embeddings` float32 (N, D), the un-normalised BNNeck output.
    """
    import onnx
    from onnx import TensorProto, helper

    spec = _backbone_spec(model)
    params = variables["params"]["backbone"]
    stats = variables["batch_stats"]["backbone"]
    g = _GraphBuilder()

    x = g.op("Cast", [INPUT_NAME], "to_float", to=TensorProto.FLOAT)
    x = g.op("Mul", [x, g.const("norm_scale", transforms.NORMALIZE_SCALE)], "norm_mul")
    x = g.op("Sub", [x, g.const("norm_shift", transforms.NORMALIZE_SHIFT)], "norm_sub")
    x = g.op("Transpose", [x], "to_nchw", perm=[0, 3, 1, 2])

    x = _conv(g, x, params["conv1"]["kernel"], 2, 3, (params["bn1"], stats["bn1"]), "stem")
    if spec.stem_relu:
        x = g.op("Relu", [x], "stem_relu")
    x = g.op("MaxPool", [x], "stem_pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    for i, num_blocks in enumerate(spec.stage_sizes):
        stage_stride = 1 if i == 0 else (spec.last_stride if i == 3 else 2)
        for j in range(num_blocks):
            block = {
                "cls": spec.block_cls,
                "planes": 64 * 2**i,
                "strides": stage_stride if j == 0 else 1,
                "ibn": spec.ibn and i < 3,
            }
            x = _block(g, x, block, params, stats, f"layer{i + 1}_{j}")

    pooled = _pooling(g, x, model, variables["params"])
    flat = g.op("Flatten", [pooled], "flatten", axis=1)
    mul, add = _bn_affine(variables["params"]["bnneck"], variables["batch_stats"]["bnneck"])
    y = g.op("Mul", [flat, g.const("bnneck_mul", mul)], "bnneck_mul")
    g.nodes.append(
        helper.make_node("Add", [y, g.const("bnneck_add", add)], [OUTPUT_NAME], name="bnneck")
    )

    dim = len(mul)
    graph = helper.make_graph(
        g.nodes,
        "ctl_jax_reid",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", height, width, 3])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", dim])],
        initializer=g.initializers,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="ctl_jax",
        doc_string=(
            "Re-ID embedding: images uint8 (N, H, W, 3) RGB at the model's input size, "
            "ImageNet-normalised inside; embeddings float32 (N, D), the un-normalised BNNeck "
            "output (L2-normalise for cosine search)."
        ),
    )
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return proto
