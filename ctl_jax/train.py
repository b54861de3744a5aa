"""Train a CTL model: `python -m ctl_jax.train [--config=configs/<name>.py] [--workdir=DIR]
[--config.<key>=<value> ...]`. Resumes from the latest checkpoint in the work directory."""

from __future__ import annotations

import pathlib

from absl import flags

from ctl_jax import cli, distributed

_CONFIG = cli.define_config_flag("configs/default.py", "Config file (configs/<name>.py[:variant]).")
flags.adopt_module_key_flags(distributed)  # --help lists the multi-process flags
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (default: runs/<config name>).")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    distributed.maybe_initialize()  # multi-process run: joins the others (see --distributed)
    from ctl_jax.training.loop import train_and_evaluate

    config = _CONFIG()
    workdir = pathlib.Path(_WORKDIR.value or f"runs/{config.name}")
    train_and_evaluate(config, workdir)  # logs the evaluation tables itself
    if distributed.is_primary():
        print(f"work directory: {workdir}")


if __name__ == "__main__":
    cli.run(main)
