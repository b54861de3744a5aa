"""Evaluate retrieval: `python -m ctl_jax.evaluate --workdir=DIR [--config=...] [--step=N]
[--modes=instance,centroid_camera] [--protocol=...] [--output=FILE]`, or on precomputed
embeddings: `python -m ctl_jax.evaluate --query=Q.npz --gallery=G.npz --modes=...
--output=FILE`, e.g. Revisited Oxford: `--protocol=revisited --ground_truth=gnd_roxford5k.pkl`
(embeddings matched to the ground truth by file name)."""

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
_PROTOCOL = flags.DEFINE_enum(
    "protocol",
    None,
    ["market", "recall_at_k", "revisited", "holidays"],
    "Evaluation protocol (default: the dataset's published one; for .npz input market, or "
    "revisited with --ground_truth).",
)
_GROUND_TRUTH = flags.DEFINE_string(
    "ground_truth",
    None,
    "Revisited Oxford/Paris gnd_*.pkl (--protocol=revisited on .npz input).",
)
_DISTRACTORS = flags.DEFINE_string(
    "distractors", None, "Embeddings .npz of the revisitop +1M distractors, added to --gallery."
)
_KS = flags.DEFINE_list(
    "ks", None, "Recall@K's K for --protocol=recall_at_k (default: the dataset's published ones)."
)
_OUTPUT = flags.DEFINE_string("output", None, "Metrics JSON to write (default: print only).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow replacing an existing --output file.")


def evaluate_embedding_files(
    query_path: str,
    gallery_path: str,
    modes,
    protocol: str = "market",
    ground_truth: str | None = None,
    distractors: str | None = None,
    ks=None,
) -> tuple[dict, dict]:
    """Metrics of precomputed embeddings (no model needed)."""
    from ctl_jax import evaluation
    from ctl_jax.retrieval.embedding_file import Embeddings

    query, gallery = Embeddings.load(query_path), Embeddings.load(gallery_path)
    meta = {"query": str(query_path), "gallery": str(gallery_path)}
    if protocol != "market":
        from ctl_jax.retrieval.embedding_protocols import evaluate_embeddings

        results, extra = evaluate_embeddings(
            protocol, query, gallery, modes, ground_truth, distractors, ks
        )
        return results, {**meta, "protocol": protocol, **extra}
    results = evaluation.evaluate(
        query.embeddings,
        query.pids,
        query.camids,
        gallery.embeddings,
        gallery.pids,
        gallery.camids,
        modes=tuple(modes),
    )
    return results, meta


def evaluate_checkpoint(
    workdir: str, config=None, step=None, modes=None, protocol=None
) -> tuple[dict, dict]:
    """Metrics of a checkpoint on its (or `config`'s) dataset, under `protocol` (default:
    the config's `eval.protocol`, else the dataset's published one)."""
    from ctl_jax import parallel
    from ctl_jax.checkpoints import restore_model
    from ctl_jax.data.source import load_dataset
    from ctl_jax.evaluation.protocols import choose_protocol
    from ctl_jax.evaluator import Evaluator

    restored = restore_model(workdir, step=step, config=config)
    config = restored.config
    with config.unlocked():  # the command line's choices are the evaluator's config
        if protocol:
            config.eval.protocol = protocol
        if modes:
            config.eval.modes = tuple(modes)
    dataset, readers = load_dataset(config.data)
    if distributed.is_primary():
        print(dataset.statistics_table())
    evaluator = Evaluator(restored.model, dataset, readers, config, parallel.make_mesh())
    results = evaluator.run(restored.variables, tuple(config.eval.modes))
    meta = {
        "config": config.name,
        "checkpoint": str(workdir),
        "step": restored.step,
        "dataset": dataset.name,
        "protocol": choose_protocol(dataset.protocols, config.eval.get("protocol", "")),
    }
    return results, meta


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    distributed.maybe_initialize()  # multi-process run: joins the others (see --distributed)
    from ctl_jax.evaluation.protocols import PROTOCOL_MODES, check_modes
    from ctl_jax.evaluation.report import format_table, write_metrics_json

    if _OUTPUT.value and pathlib.Path(_OUTPUT.value).exists() and not _OVERWRITE.value:
        cli.fail(
            f"{_OUTPUT.value} exists; pass --overwrite to replace it or choose another --output"
        )
    all_modes = list(dict.fromkeys(m for v in PROTOCOL_MODES.values() for m in v))
    modes = _MODES.value
    if modes:
        valid = PROTOCOL_MODES[_PROTOCOL.value] if _PROTOCOL.value else all_modes
        unknown = sorted(set(modes) - set(valid))
        if unknown:
            cli.fail(f"unknown --modes {unknown}; valid: {', '.join(valid)}")
    ks = None
    if _KS.value:
        if not all(k.isdigit() and int(k) >= 1 for k in _KS.value):
            cli.fail(f"--ks must be positive integers, got {','.join(_KS.value)}")
        ks = tuple(int(k) for k in _KS.value)
    start = time.time()
    if _QUERY.value or _GALLERY.value:
        if not (_QUERY.value and _GALLERY.value):
            cli.fail("--query and --gallery go together")
        if _WORKDIR.value:
            cli.fail("give either --workdir or --query/--gallery, not both")
        protocol = _PROTOCOL.value or ("revisited" if _GROUND_TRUTH.value else "market")
        if protocol == "revisited" and not _GROUND_TRUTH.value:
            cli.fail("--protocol=revisited on .npz input needs --ground_truth=gnd_<dataset>.pkl")
        if protocol != "revisited" and (_GROUND_TRUTH.value or _DISTRACTORS.value):
            cli.fail("--ground_truth and --distractors go with --protocol=revisited")
        if modes:
            check_modes(protocol, modes)
        results, meta = evaluate_embedding_files(
            _QUERY.value,
            _GALLERY.value,
            modes or PROTOCOL_MODES[protocol],
            protocol,
            _GROUND_TRUTH.value,
            _DISTRACTORS.value,
            ks,
        )
    elif _WORKDIR.value:
        if _GROUND_TRUTH.value or _DISTRACTORS.value or ks:
            cli.fail(
                "--ground_truth, --distractors and --ks are for .npz input; with --workdir the "
                "config's dataset (data.distractors) gives them"
            )
        results, meta = evaluate_checkpoint(
            _WORKDIR.value, _CONFIG(), _STEP.value, modes, _PROTOCOL.value
        )
    else:
        cli.fail("give --workdir=DIR, or --query=Q.npz and --gallery=G.npz")
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
