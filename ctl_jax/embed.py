"""Embed images: `python -m ctl_jax.embed (--workdir=DIR | --checkpoint=DIR) --images=PATH
--output=FILE.npz [--step=N] [--batch_size=N] [--flip] [--whitening=FILE] [--overwrite]`.

`--images` is one image or a folder, searched recursively for .jpg/.jpeg/.png files (other
files are skipped and counted). Each image gets the model's test-time preprocessing (resize
to the training input size, ImageNet normalisation) and the BNNeck embedding is written,
not normalised, to an embeddings .npz (docs/formats.md). `--identity` says which identity
each image shows (`labels` and `pids` in the file): `market` (Market-style names
`0002_c1s1_...jpg`), `folder` (`DIR/<identity>/x.jpg`) or `csv:FILE` (rows
`path,identity[,camera]`); by default Market names when every file follows them, else the
folder (`ctl_jax.retrieval.identities`). The camera comes from Market-style names (or the
CSV), -1 otherwise.

`--shard=K/N` embeds only the K-th (0-based) of N parts of the sorted image list, for array
jobs on many machines; `python -m ctl_jax.merge` joins the parts into the file one process
would have written (`ctl_jax.retrieval.shards`, docs/formats.md 'Sharded embedding'). The
file records the model's fingerprint (`model`), which the merge compares.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import time

from absl import flags

from ctl_jax import cli
from ctl_jax.retrieval.identities import FLAG_HELP

_WORKDIR = flags.DEFINE_string("workdir", None, "Training work directory holding checkpoints/.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Converted checkpoint directory (ctl_jax.convert output)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_IMAGES = flags.DEFINE_string("images", None, "An image, or a folder searched recursively.")
_OUTPUT = flags.DEFINE_string("output", None, "Embeddings .npz to write.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Images per batch (default: the config's data.eval_batch_size)."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow replacing an existing --output file.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_IDENTITY = flags.DEFINE_string("identity", None, FLAG_HELP)
_FLIP = flags.DEFINE_bool(
    "flip", False, "Flip test: average each image's embedding with its mirror's (2x time)."
)
_SHARD = flags.DEFINE_string(
    "shard",
    None,
    "K/N: embed only the K-th (0-based) of N equal parts of the sorted images (array jobs; "
    "join the parts with python -m ctl_jax.merge).",
)
_WHITENING = flags.DEFINE_string(
    "whitening",
    None,
    "Whitening .npz (ctl_jax.whiten) applied to the embeddings; they are then unit vectors.",
)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from ctl_jax.retrieval.images import model_directory

    directory = model_directory(_WORKDIR.value, _CHECKPOINT.value)
    if not _IMAGES.value:
        cli.fail("give --images=PATH (an image or a folder of images)")
    if not _OUTPUT.value:
        cli.fail("give --output=FILE.npz")
    output = pathlib.Path(_OUTPUT.value)
    cli.refuse_existing_output(output, _OVERWRITE.value)
    if output.is_dir():
        cli.fail(f"--output={output} is a folder; give a file name such as {output}/emb.npz")
    if _BATCH_SIZE.value is not None and _BATCH_SIZE.value < 1:
        cli.fail(f"--batch_size must be >= 1, got {_BATCH_SIZE.value}")

    from ctl_jax.embedder import Embedder
    from ctl_jax.retrieval.identities import IdentitySource, assign_identities
    from ctl_jax.retrieval.images import embed_images, list_images
    from ctl_jax.retrieval.shards import parse_shard

    # A bad --images, --identity, --shard or --whitening fails before the model is loaded.
    shard = parse_shard(_SHARD.value)
    identity = IdentitySource.parse(_IDENTITY.value)
    assign_identities(list_images(_IMAGES.value).paths, _IMAGES.value, identity)
    whitening = _load_whitening(_WHITENING.value)
    start = time.time()
    embedder = Embedder.load(
        directory, step=_STEP.value, batch_size=_BATCH_SIZE.value, flip=_FLIP.value
    )
    if whitening is not None:  # fail before embedding, not after
        whitening.check_input_dim(embedder.dim, f"{directory}'s model")
    embeddings, report = embed_images(
        embedder, _IMAGES.value, progress=_PROGRESS.value, identity=identity, shard=shard
    )
    model = embedder.fingerprint()
    if whitening is not None:
        embeddings = whitening.apply_to(embeddings)
        # Whitened vectors are another model's output: the whitening file is part of it.
        whitened = hashlib.sha256(model.encode() + pathlib.Path(_WHITENING.value).read_bytes())
        model = "sha256:" + whitened.hexdigest()[:16]
    embeddings = dataclasses.replace(embeddings, model=model)
    embeddings.save(output, overwrite=_OVERWRITE.value)
    part = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    print(
        f"{report.summary()}{part}{' (flip test)' if _FLIP.value else ''} with {directory} "
        f"(step {embedder.step}) in "
        f"{time.time() - start:.1f} s; {embeddings.dim}-d embeddings written to {output}"
    )


def _load_whitening(path: str | None):
    from ctl_jax.retrieval.whitening import Whitening

    return Whitening.load(path) if path else None


if __name__ == "__main__":
    cli.run(main)
