"""Evaluate retrieval: `python -m ctl_jax.evaluate --workdir=DIR [--config=...] [--step=N]
[--modes=instance,centroid_camera] [--protocol=...] [--whitening=FILE] [--output=FILE]`, or on
precomputed
embeddings: `python -m ctl_jax.evaluate --query=Q.npz --gallery=G.npz --modes=...
--output=FILE`, e.g. Revisited Oxford: `--protocol=revisited --ground_truth=gnd_roxford5k.pkl`
(embeddings matched to the ground truth by file name).

Options as the re-ID toolkits report them (Market protocol): `--rerank` (k-reciprocal
re-ranking, with `--rerank_k1/k2/lambda`), `--aqe` (alpha-weighted query expansion, with
`--aqe_k/alpha/times`; applied before re-ranking), both on each mode's gallery items (images
or centroids); pair verification metrics (AUC, TPR at FPR and thresholds, on by default);
`--plot=DIR` for roc.png and cmc.png. `--whitening=FILE` (`ctl_jax.whiten`) whitens query and
gallery embeddings (and distractors) before any protocol, query expansion or re-ranking.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
from absl import flags

from ctl_jax import cli, distributed
from ctl_jax.errors import FileContentError, OptionError

_CONFIG = cli.define_config_flag(None, "Config file; default: the one saved with the checkpoint.")
flags.adopt_module_key_flags(distributed)  # --help lists the multi-process flags
_WORKDIR = flags.DEFINE_string("workdir", None, "Training work directory or converted checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_QUERY = flags.DEFINE_string("query", None, "Query embeddings .npz (instead of --workdir).")
_GALLERY = flags.DEFINE_string(
    "gallery", None, "Gallery embeddings .npz (with --query; a,b,...: joined)."
)
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
_QUERY_CENTROIDS = flags.DEFINE_bool(
    "query_centroids",
    False,
    "Multi-image queries: replace the queries of each identity (and camera, in the camera-"
    "aware modes) by their centroid.",
)
_WHITENING = flags.DEFINE_string(
    "whitening",
    None,
    "Whitening .npz (ctl_jax.whiten) applied to query and gallery embeddings before evaluating.",
)
_FLIP = flags.DEFINE_bool(
    "flip",
    False,
    "With --workdir: flip test, each image's embedding averaged with its mirror's "
    "(default: the config's eval.flip).",
)


def evaluation_options() -> dict:
    """The keyword arguments of `evaluation.evaluate` the flags ask for; raises OptionError
    (one line, naming the flag) for bad values or options given without their switch."""
    from ctl_jax.evaluation import QueryExpansionParams, RerankParams

    options = {"verification": _VERIFICATION.value, "return_curves": bool(_PLOT.value)}
    if _QUERY_CENTROIDS.value:
        options["query_centroids"] = True
    for switch, params in (
        (_RERANK, (_RERANK_K1, _RERANK_K2, _RERANK_LAMBDA)),
        (_AQE, (_AQE_K, _AQE_ALPHA, _AQE_TIMES)),
    ):
        given = [f"--{p.name}" for p in params if p.present]
        if given and not switch.value:
            raise OptionError(f"{', '.join(given)} need(s) --{switch.name}")
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
        "query_centroids": bool(options.get("query_centroids")),
    }


def evaluate_embedding_files(
    query_path: str,
    gallery_path: str,
    modes,
    protocol: str = "market",
    ground_truth: str | None = None,
    distractors: str | None = None,
    ks=None,
    options: dict | None = None,
    whitening=None,
) -> tuple[dict, dict]:
    """Metrics of precomputed embeddings (no model needed). Under the Market protocol
    `options` go to `evaluation.evaluate`; with options["return_curves"] the results are
    (metrics, curves). `whitening` (`ctl_jax.retrieval.whitening.Whitening`) is applied to
    query, gallery and distractors as they are read, before anything else."""
    from ctl_jax import evaluation
    from ctl_jax.evaluation.query_centroids import evaluate_query_centroids
    from ctl_jax.retrieval.labels import pids_for_labels
    from ctl_jax.retrieval.shards import load_joined

    def load(path):
        embeddings = load_joined(path)  # a.npz or a.npz,b.npz,... (shards)
        if len(embeddings) == 0:
            raise FileContentError(f"embeddings file {path} has no rows; nothing to evaluate")
        return embeddings if whitening is None else whitening.apply_to(embeddings)

    query, gallery = load(query_path), load(gallery_path)
    # Files with named identities number them independently: one numbering from the labels
    # of both (unchanged for Market-style files, whose labels are their pids).
    if query.dim == gallery.dim:  # (else the evaluation names the mismatch)
        # From the labels alone (as `Embeddings.concatenate` numbers them), without copying
        # the embeddings (768 MB at MSMT17 scale).
        joint = pids_for_labels(np.concatenate([query.labels, gallery.labels]))
        query = query.with_joint_pids(joint[: len(query)])
        gallery = gallery.with_joint_pids(joint[len(query) :])
    # Whether the files hold flip-test embeddings was decided when they were embedded.
    meta = {"query": str(query_path), "gallery": str(gallery_path), "flip": None}
    if protocol != "market":
        from ctl_jax.retrieval.embedding_protocols import evaluate_embeddings

        results, extra = evaluate_embeddings(
            protocol, query, gallery, modes, ground_truth, distractors, ks, load=load
        )
        return results, {**meta, "protocol": protocol, **extra}
    # As `--workdir` reads a dataset: rows of identity -1 (Market junk, or an image with no
    # identity) are left out of the query and the gallery.
    query = _known_identities(query, query_path, "query")
    gallery = _known_identities(gallery, gallery_path, "gallery")
    options = dict(options or {})
    evaluate = (
        evaluate_query_centroids if options.pop("query_centroids", False) else evaluation.evaluate
    )
    results = evaluate(
        query.embeddings,
        query.pids,
        query.camids,
        gallery.embeddings,
        gallery.pids,
        gallery.camids,
        modes=tuple(modes),
        **options,
    )
    return results, meta


def _known_identities(embeddings, path, role: str):
    """The rows of `embeddings` with an identity (pid >= 0), saying how many were left out;
    an error when none is left."""
    known = embeddings.pids >= 0
    if known.all():
        return embeddings
    if not known.any():
        raise FileContentError(
            f"embeddings file {path} has no row with an identity (every pid is -1); the "
            f"{role} of the Market protocol needs identities: Market-style file names "
            "(0002_c1s1_...jpg), or `embed --identity=folder|csv:FILE`"
        )
    dropped = int((~known).sum())
    if distributed.is_primary():
        print(f"{role}: left out {dropped} of {len(known)} rows of identity -1 (junk) in {path}")
    return embeddings.select(known)


def evaluate_checkpoint(
    workdir: str,
    config=None,
    step=None,
    modes=None,
    protocol=None,
    options: dict | None = None,
    flip: bool | None = None,
    whitening=None,
) -> tuple[dict, dict]:
    """Metrics of a checkpoint on its (or `config`'s) dataset, under `protocol` (default:
    the config's `eval.protocol`, else the dataset's published one); `options` as for
    `evaluate_embedding_files`; `flip` overrides the config's eval.flip; `whitening` is
    applied to the embeddings before any metric (see `Evaluator`)."""
    from ctl_jax import parallel
    from ctl_jax.checkpoints import restore_model
    from ctl_jax.data.source import EVALUATION_SPLITS, load_dataset
    from ctl_jax.evaluation.protocols import choose_protocol
    from ctl_jax.evaluator import Evaluator, resolve_evaluation
    from ctl_jax.models import feature_dim

    restored = restore_model(workdir, step=step, config=config)
    config = restored.config
    if whitening is not None:  # fail before embedding, not after
        whitening.check_input_dim(feature_dim(config.model.arch), f"{workdir}'s model")
    with config.unlocked():  # the command line's choices are the evaluator's config
        if protocol:
            config.eval.protocol = protocol
        if modes:
            config.eval.modes = tuple(modes)
    # Only query and gallery: the training images need not be on disk.
    dataset, readers = load_dataset(config.data, EVALUATION_SPLITS)
    protocol = choose_protocol(dataset.protocols, config.eval.get("protocol", ""))
    _check_market_options(protocol, options or {})
    config, evaluation_line = resolve_evaluation(config, dataset, describe_monitor=False)
    if distributed.is_primary():
        print(dataset.statistics_table())
        if evaluation_line:
            print(evaluation_line)
    mesh = parallel.make_mesh()
    evaluator = Evaluator(
        restored.model, dataset, readers, config, mesh, flip=flip, whitening=whitening
    )
    market_options = (options or {}) if protocol == "market" else {}
    results = evaluator.run(restored.variables, tuple(config.eval.modes), **market_options)
    if options and options.get("return_curves") and protocol != "market":
        results = (results, None)
    meta = {
        "config": config.name,
        "checkpoint": str(workdir),
        "step": restored.step,
        "dataset": dataset.name,
        "protocol": protocol,
        "flip": evaluator.flip,
    }
    return results, meta


def _check_market_options(protocol: str, options: dict) -> None:
    """Re-ranking, query expansion and curves are defined for the Market protocol only."""
    asked = [
        flag
        for flag, key in (
            ("--rerank", "rerank"),
            ("--aqe", "query_expansion"),
            ("--plot", "return_curves"),
            ("--query_centroids", "query_centroids"),
        )
        if options.get(key)
    ]
    if protocol != "market" and asked:
        raise OptionError(
            f"{', '.join(asked)} apply to the market protocol only, not --protocol={protocol}"
        )


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    distributed.maybe_initialize()  # multi-process run: joins the others (see --distributed)
    from ctl_jax.evaluation.protocols import PROTOCOL_MODES, check_modes
    from ctl_jax.evaluation.report import format_table, format_verification, write_metrics_json

    cli.refuse_existing_output(_OUTPUT.value, _OVERWRITE.value)
    if _PLOT.value:
        for name in ("roc.png", "cmc.png"):
            if (pathlib.Path(_PLOT.value) / name).exists() and not _OVERWRITE.value:
                cli.fail(f"{_PLOT.value}/{name} exists; pass --overwrite or choose another --plot")
    options = evaluation_options()
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
        protocol = _PROTOCOL.value or ("revisited" if _GROUND_TRUTH.value else "market")
        if protocol == "revisited" and not _GROUND_TRUTH.value:
            cli.fail("--protocol=revisited on .npz input needs --ground_truth=gnd_<dataset>.pkl")
        if protocol != "revisited" and (_GROUND_TRUTH.value or _DISTRACTORS.value):
            cli.fail("--ground_truth and --distractors go with --protocol=revisited")
        if modes:
            check_modes(protocol, modes)
        if _FLIP.present:
            cli.fail(
                "--flip applies when embedding images (--workdir); embed the .npz files with "
                "python -m ctl_jax.embed --flip"
            )
        _check_market_options(protocol, options)
        if protocol != "market":
            options = {**options, "verification": False, "return_curves": False}
        results, meta = evaluate_embedding_files(
            _QUERY.value,
            _GALLERY.value,
            modes or PROTOCOL_MODES[protocol],
            protocol,
            _GROUND_TRUTH.value,
            _DISTRACTORS.value,
            ks,
            options,
            whitening,
        )
    elif _WORKDIR.value:
        if _GROUND_TRUTH.value or _DISTRACTORS.value or ks:
            cli.fail(
                "--ground_truth, --distractors and --ks are for .npz input; with --workdir the "
                "config's dataset (data.distractors) gives them"
            )
        flip = _FLIP.value if _FLIP.present else None
        results, meta = evaluate_checkpoint(
            _WORKDIR.value,
            _CONFIG(),
            _STEP.value,
            modes,
            _PROTOCOL.value,
            options,
            flip,
            whitening,
        )
        if meta["protocol"] != "market":
            options = {**options, "verification": False, "return_curves": False}
    else:
        cli.fail("give --workdir=DIR, or --query=Q.npz and --gallery=G.npz")
    results, curves = results if options["return_curves"] else (results, None)
    meta.update(options_meta(options))
    meta["whitening"] = _WHITENING.value
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
