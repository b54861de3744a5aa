"""Evaluate retrieval: `python -m ctl_jax.evaluate --workdir=DIR [--config=...] [--step=N]
[--modes=instance,centroid_camera] [--output=FILE]`, or on precomputed embeddings:
`python -m ctl_jax.evaluate --query=Q.npz --gallery=G.npz --modes=... --output=FILE`.

Options as the re-ID toolkits report them: `--rerank` (k-reciprocal re-ranking, with
`--rerank_k1/k2/lambda`), `--aqe` (alpha-weighted query expansion, with
`--aqe_k/alpha/times`; applied before re-ranking), both on each mode's gallery items (images
or centroids); pair verification metrics (AUC, TPR at FPR and thresholds, on by default);
`--plot=DIR` for roc.png and cmc.png.
"""

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
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow replacing existing output files.")
_RERANK = flags.DEFINE_bool("rerank", False, "k-reciprocal re-ranking (Zhong et al. 2017).")
_RERANK_K1 = flags.DEFINE_integer("rerank_k1", 20, "Re-ranking: k-reciprocal neighbourhood.")
_RERANK_K2 = flags.DEFINE_integer("rerank_k2", 6, "Re-ranking: local query expansion size.")
_RERANK_LAMBDA = flags.DEFINE_float(
    "rerank_lambda", 0.3, "Re-ranking: weight of the original distance."
)
_AQE = flags.DEFINE_bool("aqe", False, "Alpha-weighted query expansion (queries and gallery).")
_AQE_K = flags.DEFINE_integer("aqe_k", 5, "Query expansion: neighbours averaged (self included).")
_AQE_ALPHA = flags.DEFINE_float("aqe_alpha", 3.0, "Query expansion: cosine weight exponent.")
_AQE_TIMES = flags.DEFINE_integer("aqe_times", 1, "Query expansion: rounds.")
_VERIFICATION = flags.DEFINE_bool(
    "verification", True, "Pair verification metrics (AUC, TPR at FPR, thresholds)."
)
_PLOT = flags.DEFINE_string("plot", None, "Folder for roc.png and cmc.png.")
_FLIP = flags.DEFINE_bool(
    "flip",
    False,
    "With --workdir: flip test, each image's embedding averaged with its mirror's "
    "(default: the config's eval.flip).",
)


def evaluation_options() -> dict:
    """The keyword arguments of `evaluation.evaluate` the flags ask for; raises ValueError
    (one line, naming the flag) for bad values or options given without their switch."""
    from ctl_jax.evaluation import QueryExpansionParams, RerankParams

    options = {"verification": _VERIFICATION.value, "return_curves": bool(_PLOT.value)}
    for switch, params in (
        (_RERANK, (_RERANK_K1, _RERANK_K2, _RERANK_LAMBDA)),
        (_AQE, (_AQE_K, _AQE_ALPHA, _AQE_TIMES)),
    ):
        given = [f"--{p.name}" for p in params if p.present]
        if given and not switch.value:
            raise ValueError(f"{', '.join(given)} need(s) --{switch.name}")
    if _RERANK.value:
        options["rerank"] = RerankParams(_RERANK_K1.value, _RERANK_K2.value, _RERANK_LAMBDA.value)
    if _AQE.value:
        options["query_expansion"] = QueryExpansionParams(
            _AQE_K.value, _AQE_ALPHA.value, _AQE_TIMES.value
        )
    return options


def options_meta(options: dict) -> dict:
    """What the metrics JSON `meta` records of the options applied."""
    rerank, expansion = options.get("rerank"), options.get("query_expansion")
    return {
        "rerank": rerank.as_dict() if rerank else None,
        "aqe": expansion.as_dict() if expansion else None,
        "verification": bool(options.get("verification")),
    }


def evaluate_embedding_files(
    query_path: str, gallery_path: str, modes, options: dict | None = None
) -> tuple[dict, dict]:
    """Metrics of precomputed embeddings (no model needed); `options` go to
    `evaluation.evaluate`. With options["return_curves"] the results are (metrics, curves)."""
    from ctl_jax import evaluation
    from ctl_jax.retrieval.embedding_file import Embeddings

    query, gallery = Embeddings.load(query_path), Embeddings.load(gallery_path)
    results = evaluation.evaluate(
        query.embeddings,
        query.pids,
        query.camids,
        gallery.embeddings,
        gallery.pids,
        gallery.camids,
        modes=tuple(modes),
        **(options or {}),
    )
    # Whether the files hold flip-test embeddings was decided when they were embedded.
    meta = {"query": str(query_path), "gallery": str(gallery_path), "flip": None}
    return results, meta


def evaluate_checkpoint(
    workdir: str,
    config=None,
    step=None,
    modes=None,
    options: dict | None = None,
    flip: bool | None = None,
) -> tuple[dict, dict]:
    """Metrics of a checkpoint on its (or `config`'s) dataset; `options` as for
    `evaluate_embedding_files`; `flip` overrides the config's eval.flip."""
    from ctl_jax.data.source import load_dataset
    from ctl_jax.training import sharding
    from ctl_jax.training.evaluator import Evaluator
    from ctl_jax.training.restore import restore_model

    restored = restore_model(workdir, step=step, config=config)
    config = restored.config
    dataset, readers = load_dataset(config.data)
    if distributed.is_primary():
        print(dataset.statistics_table())
    evaluator = Evaluator(restored.model, dataset, readers, config, sharding.make_mesh(), flip=flip)
    results = evaluator.run(
        restored.variables, modes or tuple(config.eval.modes), **(options or {})
    )
    meta = {
        "config": config.name,
        "checkpoint": str(workdir),
        "step": restored.step,
        "dataset": config.data.name,
        "flip": evaluator.flip,
    }
    return results, meta


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    distributed.maybe_initialize()  # multi-process run: joins the others (see --distributed)
    from ctl_jax.evaluation import MODES
    from ctl_jax.evaluation.report import format_table, format_verification, write_metrics_json

    if _OUTPUT.value and pathlib.Path(_OUTPUT.value).exists() and not _OVERWRITE.value:
        cli.fail(
            f"{_OUTPUT.value} exists; pass --overwrite to replace it or choose another --output"
        )
    if _PLOT.value:
        for name in ("roc.png", "cmc.png"):
            if (pathlib.Path(_PLOT.value) / name).exists() and not _OVERWRITE.value:
                cli.fail(f"{_PLOT.value}/{name} exists; pass --overwrite or choose another --plot")
    options = evaluation_options()
    modes = _MODES.value
    if modes:
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            cli.fail(f"unknown --modes {unknown}; valid: {', '.join(MODES)}")
    start = time.time()
    if _QUERY.value or _GALLERY.value:
        if not (_QUERY.value and _GALLERY.value):
            cli.fail("--query and --gallery go together")
        if _WORKDIR.value:
            cli.fail("give either --workdir or --query/--gallery, not both")
        if _FLIP.present:
            cli.fail(
                "--flip applies when embedding images (--workdir); embed the .npz files with "
                "python -m ctl_jax.embed --flip"
            )
        results, meta = evaluate_embedding_files(
            _QUERY.value, _GALLERY.value, modes or MODES, options
        )
    elif _WORKDIR.value:
        flip = _FLIP.value if _FLIP.present else None
        results, meta = evaluate_checkpoint(
            _WORKDIR.value, _CONFIG(), _STEP.value, modes, options, flip
        )
    else:
        cli.fail("give --workdir=DIR, or --query=Q.npz and --gallery=G.npz")
    results, curves = results if options["return_curves"] else (results, None)
    meta.update(options_meta(options))
    meta["seconds"] = round(time.time() - start, 2)
    meta["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if not distributed.is_primary():  # every process computed the same results
        return
    print(format_table(results))
    if options["verification"]:
        print(format_verification(results))
    if _PLOT.value:
        from ctl_jax.evaluation.plots import write_plots

        written = write_plots(_PLOT.value, curves, overwrite=_OVERWRITE.value)
        print(f"plots written: {', '.join(str(p) for p in written)}")
    if _OUTPUT.value:
        write_metrics_json(_OUTPUT.value, results, meta=meta, overwrite=_OVERWRITE.value)
        print(f"metrics written to {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
