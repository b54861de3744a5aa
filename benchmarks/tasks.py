"""The two step benchmarks by task name, for the scripts that run either one."""

from __future__ import annotations

import argparse

try:
    from . import inference, train_step
except ImportError:  # run as a file: benchmarks/ is on sys.path (see common.py)
    import inference
    import train_step

TASKS = {"train": train_step, "inference": inference}


def parse_task(parser: argparse.ArgumentParser, argv=None, jax_only: bool = True):
    """Adds `--task` (train: `train_step.py`'s step, inference: `inference.py`'s) to `parser`,
    which parses its own options; that benchmark's parser takes the rest (`jax_only`:
    `--framework` must stay jax).

    Returns:
      (own args, benchmark module, benchmark args, the rest of argv, to parse again with
      other settings).
    """
    parser.add_argument("--task", choices=tuple(TASKS), default="train")
    # No abbreviations: the benchmark's options pass through, and e.g. `--m=4` (M images per
    # identity) must not be taken for an option of `parser` that starts the same.
    parser.allow_abbrev = False
    args, rest = parser.parse_known_args(argv)
    module = TASKS[args.task]
    benchmark_args = module.parse_args(rest)
    if jax_only and benchmark_args.framework != "jax":
        parser.error("this studies ctl_jax alone; --framework must stay jax")
    return args, module, benchmark_args, rest
