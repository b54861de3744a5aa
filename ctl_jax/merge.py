"""Join embeddings files: `python -m ctl_jax.merge --inputs=a.npz,b.npz,... --output=all.npz
[--overwrite]`.

Made for the parts of a sharded embedding (`python -m ctl_jax.embed --shard=K/N`): the
parts are joined in shard order (all N must be given) with the pids renumbered from the
joint labels, so the result equals the file one process would have written, row for row.
Other files are joined in the order given. Files from different models (their recorded
fingerprints differ), of different dimensions, or sharing an image path are refused with a
one-line error (`ctl_jax.retrieval.shards.merge`; docs/formats.md 'Sharded embedding').
Needs no model: JAX is not imported.
"""

from __future__ import annotations

import time

from absl import flags

from ctl_jax import cli

_INPUTS = flags.DEFINE_list("inputs", None, "Embeddings .npz files to join (comma-separated).")
_OUTPUT = flags.DEFINE_string("output", None, "Embeddings .npz to write.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow replacing an existing --output file.")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _INPUTS.value or len(_INPUTS.value) < 2:
        cli.fail("give --inputs=a.npz,b.npz,... (at least two embeddings files)")
    if not _OUTPUT.value:
        cli.fail("give --output=FILE.npz")
    cli.refuse_existing_output(_OUTPUT.value, _OVERWRITE.value)
    if _OUTPUT.value in _INPUTS.value:
        cli.fail(f"--output={_OUTPUT.value} is one of the --inputs; write the join elsewhere")
    from ctl_jax.retrieval.shards import merge

    start = time.time()
    merged = merge(_INPUTS.value)
    merged.save(_OUTPUT.value, overwrite=_OVERWRITE.value)
    print(
        f"joined {len(_INPUTS.value)} files: {len(merged):,} rows of {merged.dim}-d embeddings "
        f"written to {_OUTPUT.value} in {time.time() - start:.1f} s"
    )


if __name__ == "__main__":
    cli.run(main)
