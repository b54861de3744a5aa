"""Evaluate retrieval: `python -m ctl_jax.evaluate --workdir=DIR [--config=...] [--step=N]
[--modes=instance,centroid_camera] [--whitening=FILE] [--output=FILE]`, or on precomputed
embeddings: `python -m ctl_jax.evaluate --query=Q.npz --gallery=G.npz --modes=... --output=FILE`."""

from __future__ import annotations

import pathlib
import time

from absl import flags

from ctl_jax import cli, distributed

_CONFIG = cli.define_config_flag(None, "Config file; default: the one saved with the checkpoint.")
flags.adopt_module_key_flags(distributed)  # --help lists the multi-process flags
_WORKDIR = flags.DEFINE_string("workdir", None, "Training work directory or converted checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_QUERY = flags.DEFINE_string("query", None, "Query embeddings .npz (instead of --workdir).")
_GALLERY = flags.DEFINE_string("gallery", None, "Gallery embeddings .npz (with --query).")
_MODES = flags.DEFINE_list(
    "modes", None, "Evaluation modes (default: the config's eval.modes, or all for .npz input)."
)
_OUTPUT = flags.DEFINE_string("output", None, "Metrics JSON to write (default: print only).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow replacing an existing --output file.")
_WHITENING = flags.DEFINE_string(
    "whitening", None, "Whitening .npz (ctl_jax.whiten) applied to query and gallery embeddings."
)


def evaluate_embedding_files(
    query_path: str, gallery_path: str, modes, whitening=None
) -> tuple[dict, dict]:
    """Metrics of precomputed embeddings (no model needed), optionally whitened first."""
    from ctl_jax import evaluation
    from ctl_jax.retrieval.embedding_file import Embeddings

    query, gallery = Embeddings.load(query_path), Embeddings.load(gallery_path)
    if whitening is not None:
        query, gallery = whitening.apply_to(query), whitening.apply_to(gallery)
    results = evaluation.evaluate(
        query.embeddings,
        query.pids,
        query.camids,
        gallery.embeddings,
        gallery.pids,
        gallery.camids,
        modes=tuple(modes),
    )
    return results, {"query": str(query_path), "gallery": str(gallery_path)}


def evaluate_checkpoint(
    workdir: str, config=None, step=None, modes=None, whitening=None
) -> tuple[dict, dict]:
    """Metrics of a checkpoint on its (or `config`'s) dataset, optionally with a whitening
    (`ctl_jax.retrieval.whitening.Whitening`) applied to the embeddings."""
    from ctl_jax import evaluation
    from ctl_jax.data.source import load_dataset
    from ctl_jax.training import sharding
    from ctl_jax.training.evaluator import Evaluator
    from ctl_jax.training.restore import restore_model

    restored = restore_model(workdir, step=step, config=config)
    config = restored.config
    dataset, readers = load_dataset(config.data)
    if distributed.is_primary():
        print(dataset.statistics_table())
    evaluator = Evaluator(restored.model, dataset, readers, config, sharding.make_mesh())
    modes = tuple(modes or config.eval.modes)
    if whitening is None:
        results = evaluator.run(restored.variables, modes)
    else:
        query, gallery = map(whitening.apply, evaluator.embeddings(restored.variables))
        q, g = dataset.query, dataset.gallery
        results = evaluation.evaluate(
            query, q.pids, q.camids, gallery, g.pids, g.camids, modes=modes
        )
    meta = {
        "config": config.name,
        "checkpoint": str(workdir),
        "step": restored.step,
        "dataset": config.data.name,
    }
    return results, meta


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    distributed.maybe_initialize()  # multi-process run: joins the others (see --distributed)
    from ctl_jax.evaluation import MODES
    from ctl_jax.evaluation.report import format_table, write_metrics_json

    if _OUTPUT.value and pathlib.Path(_OUTPUT.value).exists() and not _OVERWRITE.value:
        cli.fail(
            f"{_OUTPUT.value} exists; pass --overwrite to replace it or choose another --output"
        )
    modes = _MODES.value
    if modes:
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            cli.fail(f"unknown --modes {unknown}; valid: {', '.join(MODES)}")
    whitening = None
    if _WHITENING.value:
        from ctl_jax.retrieval.whitening import Whitening

        whitening = Whitening.load(_WHITENING.value)
    start = time.time()
    if _QUERY.value or _GALLERY.value:
        if not (_QUERY.value and _GALLERY.value):
            cli.fail("--query and --gallery go together")
        if _WORKDIR.value:
            cli.fail("give either --workdir or --query/--gallery, not both")
        results, meta = evaluate_embedding_files(
            _QUERY.value, _GALLERY.value, modes or MODES, whitening
        )
    elif _WORKDIR.value:
        results, meta = evaluate_checkpoint(
            _WORKDIR.value, _CONFIG(), _STEP.value, modes, whitening
        )
    else:
        cli.fail("give --workdir=DIR, or --query=Q.npz and --gallery=G.npz")
    if _WHITENING.value:
        meta["whitening"] = _WHITENING.value
    meta["seconds"] = round(time.time() - start, 2)
    meta["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if not distributed.is_primary():  # every process computed the same results
        return
    print(format_table(results))
    if _OUTPUT.value:
        write_metrics_json(_OUTPUT.value, results, meta=meta, overwrite=_OVERWRITE.value)
        print(f"metrics written to {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
