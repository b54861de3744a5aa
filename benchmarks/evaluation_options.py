"""The evaluation options of `python -m ctl_jax.evaluate` on a trained run: metrics and time.

Embeds the run's query and gallery once without and once with the flip test, then evaluates
every mode of the config with each option (plain, verification, --aqe, --rerank, --aqe
--rerank), timing the embedding and each evaluation separately: `seconds_first` includes
XLA compilation, `seconds` is the median of `--repeats` further calls. Prints one JSON
object with, per option and embedding, mAP / mINP / rank-1 per mode.

  python benchmarks/evaluation_options.py --workdir=runs/default [--repeats=3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax

from ctl_jax import cli, evaluation, parallel
from ctl_jax.checkpoints import restore_model
from ctl_jax.data.source import EVALUATION_SPLITS, load_dataset
from ctl_jax.evaluator import Evaluator, resolve_evaluation

OPTIONS = {
    "plain": {},
    "verification": {"verification": True},
    "aqe": {"query_expansion": evaluation.QueryExpansionParams()},
    "rerank": {"rerank": evaluation.RerankParams()},
    "aqe+rerank": {
        "query_expansion": evaluation.QueryExpansionParams(),
        "rerank": evaluation.RerankParams(),
    },
}


def timed(fn, repeats):
    """(result, first call seconds, median seconds of `repeats` more calls)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return result, round(first, 3), round(statistics.median(times), 3) if times else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/default")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # as the commands run
    cli.enable_compilation_cache()

    restored = restore_model(args.workdir)
    dataset, readers = load_dataset(restored.config.data, EVALUATION_SPLITS)
    config, _ = resolve_evaluation(restored.config, dataset)  # "auto" modes follow the data
    mesh = parallel.make_mesh()
    q, g = dataset.query, dataset.gallery
    modes = tuple(config.eval.modes)
    report = {
        "workdir": args.workdir,
        "step": restored.step,
        "num_query": len(q),
        "num_gallery": len(g),
        "modes": list(modes),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "embedding": {},
        "evaluation": {},
    }
    for flip in (False, True):
        evaluator = Evaluator(restored.model, dataset, readers, config, mesh, flip=flip)
        variables = parallel.replicate(restored.variables, mesh)
        embed = functools.partial(evaluator.embeddings, variables)
        (query, gallery), first, warm = timed(embed, 1)
        name = "flip" if flip else "plain"
        report["embedding"][name] = {"seconds_first": first, "seconds": warm}
        for option, kwargs in OPTIONS.items():
            if flip and option == "verification":
                continue
            run = functools.partial(
                evaluation.evaluate,
                query, q.pids, q.camids, gallery, g.pids, g.camids, modes, **kwargs,
            )  # fmt: skip
            results, first, warm = timed(run, args.repeats)
            entry = {"seconds_first": first, "seconds": warm}
            for mode in modes:
                m = results[mode]
                entry[mode] = {k: round(100 * m[k], 1) for k in ("mAP", "mINP", "rank1")}
            if "verification" in results:
                entry["verification"] = results["verification"]
            report["evaluation"][f"{name}/{option}"] = entry
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
