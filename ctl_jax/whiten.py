"""Learn a whitening of embeddings: `python -m ctl_jax.whiten --embeddings=train.npz
--output=whitening.npz [--method=pca|supervised] [--dim=D] [--labels=pids|folders]
[--images=DIR] [--shrinkage=A] [--overwrite]`.

The embeddings are an embeddings .npz (`ctl_jax.embed`), usually of the training images.
`--method=pca` (default) needs nothing else; `--method=supervised` learns from the pairs of
embeddings with the same identity: the Market-style `pids` of the file (`--labels=pids`), or
the first folder under the image root of each image (`--labels=folders [--images=DIR]`,
for folder-per-identity datasets: the rule of `embed --identity=folder`).
Apply the result with `ctl_jax.embed --whitening=FILE` or `ctl_jax.evaluate --whitening=FILE`
(see ctl_jax/retrieval/whitening.py for the definitions).
"""

from __future__ import annotations

import pathlib
import time

from absl import flags

from ctl_jax import cli

_EMBEDDINGS = flags.DEFINE_string("embeddings", None, "Embeddings .npz to learn from.")
_OUTPUT = flags.DEFINE_string("output", None, "Whitening .npz to write.")
_METHOD = flags.DEFINE_enum(
    "method",
    "pca",
    ["pca", "supervised"],
    "pca (unsupervised) or supervised (same-identity pairs).",
)
_DIM = flags.DEFINE_integer(
    "dim",
    None,
    "Output dimension (default: the embedding dimension, or fewer if the data span fewer).",
)
_LABELS = flags.DEFINE_enum(
    "labels",
    "pids",
    ["pids", "folders"],
    "Identities for --method=supervised: the file's pids, or each image's first folder under "
    "--images.",
)
_IMAGES = flags.DEFINE_string(
    "images",
    None,
    "With --labels=folders: the folder the images were embedded from (an image's identity is "
    "the first folder under it); default: the deepest folder all the images share.",
)
_SHRINKAGE = flags.DEFINE_float(
    "shrinkage",
    0.0,
    "Supervised only: shrink the pair covariance towards a multiple of the identity by this "
    "fraction in [0, 1) (needed when the pairs span fewer directions than the embedding has).",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow replacing an existing --output file.")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _EMBEDDINGS.value:
        cli.fail("give --embeddings=FILE.npz (e.g. the training images embedded by ctl_jax.embed)")
    if not _OUTPUT.value:
        cli.fail("give --output=FILE.npz")
    output = pathlib.Path(_OUTPUT.value)
    cli.refuse_existing_output(output, _OVERWRITE.value)
    if _DIM.value is not None and _DIM.value < 1:
        cli.fail(f"--dim must be >= 1, got {_DIM.value}")

    if _IMAGES.value and _LABELS.value != "folders":
        cli.fail("--images needs --labels=folders")

    from ctl_jax.retrieval import whitening
    from ctl_jax.retrieval.embedding_file import Embeddings
    from ctl_jax.retrieval.whitening import identity_labels

    start = time.time()
    data = Embeddings.load(_EMBEDDINGS.value)
    labels = None
    if _METHOD.value == "supervised":
        labels = identity_labels(data.pids, data.paths, _LABELS.value, _IMAGES.value)
        if _LABELS.value == "pids" and not (labels >= 0).any():
            cli.fail(
                f"--method=supervised needs identities: {_EMBEDDINGS.value} has no "
                f"Market-style pids (all -1); try --labels=folders"
            )
        if _LABELS.value == "folders" and not (labels >= 0).any():
            cli.fail(
                f"--labels=folders: no image of {_EMBEDDINGS.value} lies in a sub-folder of "
                f"{_IMAGES.value or 'the folder its images share'} (expected "
                "<images>/<identity>/.../x.jpg)"
            )
    result = whitening.learn(
        data.embeddings, _METHOD.value, labels=labels, dim=_DIM.value, shrinkage=_SHRINKAGE.value
    )
    result.save(output, overwrite=_OVERWRITE.value)
    print(
        f"{_METHOD.value} whitening learned from {len(data):,} embeddings "
        f"({result.input_dim}-d -> {result.output_dim}-d) in {time.time() - start:.1f} s, "
        f"written to {output}"
    )


if __name__ == "__main__":
    cli.run(main)
