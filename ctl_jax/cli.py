"""What every entry point shares: absl flag parsing with one-line errors, the compilation
cache, and turning expected failures into a one-line message and a non-zero exit code."""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Callable

from absl import app, flags, logging

from ctl_jax.errors import CheckpointError

# Failures a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
    ValueError,
    KeyError,
    FloatingPointError,  # a non-finite training loss
    CheckpointError,
)


def enable_compilation_cache() -> None:
    """Persists compiled XLA programs, so a second run skips the 20-40 s of compilation."""
    import jax

    cache = os.environ.get("CTL_JAX_COMPILATION_CACHE") or str(
        pathlib.Path.home() / ".cache" / "ctl_jax" / "xla"
    )
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e}\nPass --help for usage.")
    except (AttributeError, KeyError) as e:  # ml_collections: unknown --config.<key>
        fail(f"unknown config key in an override: {e}. Pass --help for usage.")
    except (OSError, SyntaxError) as e:  # ml_collections: missing or broken config file
        fail(f"cannot load the config file: {e}")
    except (TypeError, ValueError) as e:  # ml_collections: override of the wrong type
        fail(f"bad config override: {e}")
    return []


def run(main: Callable[[list[str]], int | None]) -> None:
    """`absl.app.run(main)` with clean errors for bad flags and for user errors in `main`."""

    def guarded(argv):
        # orbax and grain log every save and restore at INFO through absl; keep warnings.
        logging.set_verbosity(logging.WARNING)
        enable_compilation_cache()
        try:
            return main(argv)
        except KeyboardInterrupt as e:
            print(f"\n{e or 'interrupted'}", file=sys.stderr)
            sys.exit(130)
        except USER_ERRORS as e:
            message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
            fail(message, code=1)

    app.run(guarded, flags_parser=_parse_flags)
