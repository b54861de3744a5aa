"""Exceptions for failures the user can fix.

Every error that comes from what the user gave (a flag, a config value, a file or folder they
named, the content of such a file) is a `UserError`. The command lines (`ctl_jax.cli.run`)
print a `UserError` as one line, `error: <message>`, and exit with code 1; any other exception
is a bug and keeps its traceback. So a message must say, on its own, what was wrong and where:
name the file, flag or config key and what was expected.

Most subclasses also inherit the builtin exception they stand for (`ValueError`,
`FileNotFoundError`, ...), so code that catches the builtin type keeps working.
"""

from __future__ import annotations

import os
import sys
import traceback

# Environment variable that makes the command lines print a user error's traceback too.
DEBUG_ENV = "CTL_JAX_DEBUG"
DEBUG_HELP = f"show the traceback of user errors too (same as {DEBUG_ENV}=1)"


class UserError(Exception):
    """A failure the user can fix: printed as one line by the command-line tools."""


class InvalidValueError(UserError, ValueError):
    """A value the user gave cannot work: data passed to a public function (e.g. query and
    gallery embeddings of different dimensions), a setting read from a flag or a file."""


class ConfigError(InvalidValueError):
    """A config value (`--config.<key>`, a config file) is invalid, or does not fit the data
    or the devices (e.g. more identities per batch than the dataset has)."""


class OptionError(InvalidValueError):
    """A command-line option has a value that cannot work; the message names the option."""


class FileContentError(InvalidValueError):
    """A file the user named exists but does not hold what it should (not an .npz, a missing
    key, a wrong format version, a damaged index); the message names the file."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """Writing would replace an existing file or folder and `--overwrite` was not given."""


class UnwritableOutputError(UserError, OSError):
    """An output file or folder cannot be written (no permission, a parent that is a file, a
    full disk); raised by `ctl_jax.files.writing` as `cannot write <path>: <reason>`."""


class NotAFolderError(UserError, NotADirectoryError):
    """A path that must be a folder (or a new one) is an existing file."""


class DatasetError(UserError, ValueError):
    """A dataset on disk is missing, malformed or inconsistent."""


class UnreadableImageError(UserError, OSError):
    """An image file is missing, truncated or not an image."""


class TorchFileError(FileContentError):
    """A file is not a readable PyTorch checkpoint (corrupt, truncated, or another format)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model being built."""


class WorkdirMismatchError(ConfigError):
    """The work directory holds checkpoints of a different config."""


class WorkdirInUseError(UserError, RuntimeError):
    """Another training holds the work directory (its lock file, see docs/formats.md)."""


class IndexInUseError(UserError, RuntimeError):
    """Another process is updating the index file (its `<index>.lock`, see
    ctl_jax/retrieval/index_lock.py) and did not finish in the time allowed."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss (too high a learning rate, or broken data)."""


class DistributedSetupError(UserError, ValueError):
    """The multi-process settings are incomplete or inconsistent, or the processes could not
    reach each other."""


class FaissUnavailableError(UserError, ImportError, ValueError):
    """faiss is not installed (an optional extra); the message says how to install it."""


class OptionalDependencyError(UserError, ImportError):
    """An optional package (an extra of setup.cfg, such as onnxruntime) is not installed; the
    message says how to install it."""


def debug_requested(flag: bool = False) -> bool:
    """True when `--debug` was given (`flag`) or `CTL_JAX_DEBUG` is set to a true value."""
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    return bool(flag) or value not in ("", "0", "false", "no", "off")


def report_user_error(error: UserError, debug: bool = False) -> int:
    """Prints `error: <message>` to stderr, after the traceback when `debug`; returns the exit
    code 1. Used by every command line (`ctl_jax.cli.run` and the argparse ones)."""
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    print(f"error: {message(error)}", file=sys.stderr)
    return 1


def message(error: BaseException) -> str:
    """The message of an exception: its first argument when that is a string (so that an
    OSError subclass prints without its errno and a KeyError without quotes)."""
    return error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
