"""Import PyTorch weights: `python -m ctl_jax.convert --source=FILE.(pth|ckpt) --output=DIR
[--config=configs/<name>.py] [--overwrite]`, or `--source=FILE --inspect` to look first.

Reads torchvision ResNet and ResNet-IBN-a `.pth` files and the original CTL Lightning
checkpoints without executing pickled code and without torch, infers the architecture from the
tensor names and writes a ctl_jax checkpoint that evaluate, embed and training
(`--config.model.init_checkpoint=DIR`) accept as is.
"""

from __future__ import annotations

import pathlib

from absl import flags
from ml_collections import config_flags

from ctl_jax import cli

_SOURCE = flags.DEFINE_string("source", None, "PyTorch file: .pth state dict or Lightning .ckpt.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the converted ctl_jax checkpoint.")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Base config whose data/eval settings the checkpoint carries (default: configs/default.py); "
    "the model settings come from the file.",
    lock_config=True,
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the checkpoints/ of a used --output.")
_DESCRIBE_ONLY = flags.DEFINE_bool(
    "inspect", False, "Only describe --source (format, pickled objects, architecture)."
)


def _default_config():
    """configs/default.py of the working directory, else of the source checkout."""
    from ctl_jax import configs as config_lib

    for root in (pathlib.Path.cwd(), pathlib.Path(__file__).resolve().parents[1]):
        candidate = root / "configs" / "default.py"
        if candidate.is_file():
            return config_lib.load_config(str(candidate))
    cli.fail("configs/default.py not found here; pass --config=<file>")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from ctl_jax.weights import conversion

    if not _SOURCE.value:
        cli.fail("--source=FILE is required")
    if _DESCRIBE_ONLY.value:
        print(conversion.inspect_source(_SOURCE.value))
        return
    if not _OUTPUT.value:
        cli.fail("--output=DIR is required (or pass --inspect to only look at the file)")
    config = _CONFIG.value if _CONFIG.value is not None else _default_config()
    report = conversion.convert_checkpoint(
        _SOURCE.value, _OUTPUT.value, config, overwrite=_OVERWRITE.value
    )
    print(conversion.format_report(report))


if __name__ == "__main__":
    cli.run(main)
