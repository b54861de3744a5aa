"""Export a trained model: `python -m ctl_jax.export (--workdir=DIR | --checkpoint=DIR)
--format=onnx|stablehlo --output=FILE [--step=N] [--verify] [--overwrite]`.

The exported function: input `images` uint8 (N, H, W, 3) RGB at the model's input size (the
training config's data.height x data.width; resize to it, bilinear), any batch size N;
output `embeddings` float32 (N, D), the un-normalised BNNeck embedding that
`python -m ctl_jax.embed` writes. The ImageNet normalisation is inside. Both formats are
built from the reference layers (`cpu_fast_path='off'`) and compute in float32.

  onnx       an ONNX model (opset 17) for onnxruntime, TensorRT, OpenCV, ... (`ctl_jax.deploy.
             onnx_graph`: written from the parameters, not traced).
  stablehlo  `jax.export` serialised, lowered for CPU, CUDA and TPU
             (`jax.export.deserialize(data).call(images)`).

`--verify` embeds a few random images with the export (onnxruntime, or JAX for stablehlo)
and with ctl_jax and prints the lowest cosine similarity.
"""

from __future__ import annotations

import pathlib
import time

from absl import flags

from ctl_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Training work directory holding checkpoints/.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Converted checkpoint directory (ctl_jax.convert output)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_FORMAT = flags.DEFINE_enum("format", None, ["onnx", "stablehlo"], "Export format.")
_OUTPUT = flags.DEFINE_string("output", None, "File to write (e.g. model.onnx).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow replacing an existing --output file.")
_VERIFY = flags.DEFINE_bool(
    "verify", False, "Compare the export with ctl_jax on random images and print the cosine."
)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from ctl_jax.retrieval.images import model_directory

    directory = model_directory(_WORKDIR.value, _CHECKPOINT.value)
    if not _FORMAT.value:
        cli.fail("give --format=onnx or --format=stablehlo")
    if not _OUTPUT.value:
        cli.fail(f"give --output=FILE (e.g. model.{_FORMAT.value})")
    output = pathlib.Path(_OUTPUT.value)
    if output.is_dir():
        cli.fail(f"--output={output} is a folder; give a file name such as {output}/model.onnx")
    cli.refuse_existing_output(output, _OVERWRITE.value)

    from ctl_jax import files
    from ctl_jax.embedder import Embedder

    start = time.time()
    # The reference layers: the CPU fast path's custom layers are for XLA CPU only.
    embedder = Embedder.load(directory, step=_STEP.value, cpu_fast_path="off")
    height, width = embedder.input_size
    if _FORMAT.value == "onnx":
        from ctl_jax.deploy.onnx_graph import build_onnx_model

        data = build_onnx_model(embedder.model, embedder.variables, height, width)
        data = data.SerializeToString()
    else:
        from ctl_jax.deploy.stablehlo import export_stablehlo

        data = export_stablehlo(embedder.model, embedder.variables, height, width)
    files.refuse_overwrite(output, _OVERWRITE.value)
    with files.atomic_open(output, "wb") as f:
        f.write(data)
    print(
        f"exported {directory} (step {embedder.step}, {embedder.config.model.arch}) as "
        f"{_FORMAT.value} to {output}: {len(data) / 1e6:.1f} MB; input images uint8 "
        f"(N, {height}, {width}, 3) RGB, output embeddings float32 (N, {embedder.dim}) in "
        f"{time.time() - start:.1f} s"
    )
    if _VERIFY.value:
        from ctl_jax.deploy.verify import verify_export

        cosine = verify_export(output, _FORMAT.value, embedder)
        print(f"verified on random images: lowest cosine similarity to ctl_jax {cosine:.6f}")


if __name__ == "__main__":
    cli.run(main)
