"""What every entry point shares: absl flag parsing with one-line errors, the compilation
cache, the allocator settings, and turning user errors into a one-line message.

Exit codes: 2 for a usage error (a bad flag or a missing one, `fail`), 1 for a
`ctl_jax.errors.UserError` raised while running (printed as `error: <message>`), and
Python's traceback with exit code 1 for anything else: that is a bug, and the traceback is
what a bug report needs. A stopped training exits with 128 + the signal: 130 for Ctrl-C,
143 for SIGTERM (outside training, SIGTERM keeps its default action, which the shell also
reports as 143). `--debug` (or `CTL_JAX_DEBUG=1`) prints a user error's traceback too.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import sys
from collections.abc import Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ctl_jax import config_schema
from ctl_jax import configs as config_lib
from ctl_jax.cpu.process import apply_jax_settings, configure_process
from ctl_jax.errors import DEBUG_ENV, ConfigError, UserError, debug_requested, report_user_error

_DEBUG = flags.DEFINE_bool(
    "debug", False, f"Show the traceback of user errors too (same as {DEBUG_ENV}=1)."
)


CACHE_ENV = "CTL_JAX_COMPILATION_CACHE"
_OFF = ("off", "0", "false", "no", "none")
# Programs that compile faster than this are not cached (JAX's default): reading an entry
# costs a file read and deserialisation, which for tiny programs is not worth it.
_CACHE_MIN_COMPILE_SECONDS = 1.0


def compilation_cache_dir(environ=None) -> str | None:
    """The persistent compilation cache folder: `CTL_JAX_COMPILATION_CACHE` if set (`off`
    turns the cache off: None), else `$XDG_CACHE_HOME/ctl_jax/jax`, else
    `~/.cache/ctl_jax/jax`."""
    environ = os.environ if environ is None else environ
    value = environ.get(CACHE_ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return value
    base = environ.get("XDG_CACHE_HOME", "").strip()
    # The XDG spec: a relative $XDG_CACHE_HOME is invalid and is ignored.
    root = pathlib.Path(base) if base and os.path.isabs(base) else pathlib.Path.home() / ".cache"
    return str(root / "ctl_jax" / "jax")


def enable_compilation_cache() -> None:
    """Persists compiled XLA programs (see `compilation_cache_dir`), so a second run skips
    the 20-40 s of compilation. Does not import JAX (`apply_jax_settings`)."""
    cache = compilation_cache_dir()
    if cache is None:
        apply_jax_settings({"jax_enable_compilation_cache": False})
        return
    apply_jax_settings(
        {
            "jax_compilation_cache_dir": cache,
            "jax_persistent_cache_min_compile_time_secs": _CACHE_MIN_COMPILE_SECONDS,
        }
    )


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def refuse_existing_output(path, overwrite: bool, flag: str = "--output") -> None:
    """A usage error (exit 2) before any work when `path` exists and `--overwrite` is not
    given: nothing a user produced is replaced silently."""
    if path and os.path.exists(path) and not overwrite:
        fail(f"{path} exists; pass --overwrite to replace it or choose another {flag}")


def _one_line(error: BaseException) -> str:
    """ml_collections wraps KeyErrors in reprs with embedded newlines; make them readable."""
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    text = text.replace("\\n", " ").replace("\\", "").replace("'", "")
    return " ".join(text.split())


def _unknown_key(error: BaseException) -> str:
    """`bse_lr (did you mean base_lr?)` from ml_collections' `'bse_lr\\nDid you mean
    "base_lr" instead of "bse_lr"?'`."""
    text = _one_line(error)
    match = re.match(r'(\S+)\s+Did you mean "([^"]+)"', text)
    return f"{match.group(1)} (did you mean {match.group(2)}?)" if match else text.strip('"')


# (getter, default file) of the entry point's `--config` flag, for `--config_help` (`run`).
_CONFIG_FLAG: list[tuple[Callable[[], object], str | None]] = []


def define_config_flag(default: str | None, help_text: str) -> Callable[[], object]:
    """`--config=FILE[:variant]` with `--config.<key>=<value>` overrides, and `--config_help`
    (the keys of the chosen config with their defaults, ranges and meanings); returns a getter
    of the config, whose numeric values it checks against their ranges (`config_schema`).

    ml_collections applies overrides while the flag is defined (at import) and reports a
    config file that fails to load only when the value is first read; both become one line.
    """
    help_text += " --config_help lists its keys; override one with --config.<key>=<value>."
    try:
        holder = config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
    except (AttributeError, KeyError) as e:
        _unknown_key_or_not_a_config(e, default)
    except (TypeError, ValueError) as e:
        fail(f"bad config override: {_one_line(e)}")
    flags.DEFINE_bool(
        "config_help",
        False,
        "List the keys of --config with their values, valid ranges and meanings, and exit.",
    )

    def value():
        try:
            config = holder.value
            if config is not None and not isinstance(config, ml_collections.ConfigDict):
                config.keys()  # a file that failed to load raises on first attribute access
                _not_a_config(config, _config_argument(default))
            if config is not None:
                config_schema.check(config)
            return config
        except OSError as e:
            fail(f"cannot load the config file: {_one_line(e)}")
        except (AttributeError, KeyError) as e:
            _unknown_key_or_not_a_config(e, default)
        except ConfigError as e:
            fail(str(e))
        except (TypeError, ValueError) as e:
            fail(f"bad config override: {_one_line(e)}")

    _CONFIG_FLAG[:] = [(value, default)]
    return value


def _config_default() -> str | None:
    return _CONFIG_FLAG[0][1] if _CONFIG_FLAG else None


def _config_argument(default: str | None) -> str | None:
    """The `--config` value of the command line (FILE[:variant]), else `default`."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def _not_a_config(config, argument: str | None) -> None:
    path = (argument or "the config file").split(":", 1)[0]
    fail(
        f"{path}: get_config() returned {type(config).__name__}, "
        "expected an ml_collections.ConfigDict"
    )


def _unknown_key_or_not_a_config(error: BaseException, default: str | None) -> None:
    """ml_collections' AttributeError/KeyError: an unknown key in an override, unless the
    config file's `get_config` returned something that is not a config at all (which has no
    keys, so ml_collections reports any use of it the same way)."""
    argument = _config_argument(default)
    if argument:
        try:
            config = config_lib.load_config(argument)
        except Exception:  # reported as what ml_collections saw
            config = ml_collections.ConfigDict()
        if not isinstance(config, ml_collections.ConfigDict):
            _not_a_config(config, argument)
    fail(f"unknown config key in an override: {_unknown_key(error)}")


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if "Error whilst parsing config file" in str(e):
            # ml_collections puts the config file's error (e.g. an unknown `:variant`) under
            # its traceback: the last line holds it.
            last = [line for line in str(e).splitlines() if line.strip()][-1]
            argument = _config_argument(_config_default())
            fail(f"cannot load the config {argument}: {last.split(': ', 1)[-1]}")
        fail(f"{e}\nPass --help for usage.")
    except (AttributeError, KeyError) as e:  # ml_collections: unknown --config.<key>
        _unknown_key_or_not_a_config(e, _config_default())
    except (OSError, SyntaxError) as e:  # ml_collections: missing or broken config file
        fail(f"cannot load the config file: {e}")
    except (TypeError, ValueError) as e:  # ml_collections: override of the wrong type
        fail(f"bad config override: {e}")
    return []


def run(main: Callable[[list[str]], int | None]) -> None:
    """`absl.app.run(main)` with one-line errors for bad flags (exit 2) and for a `UserError`
    raised by `main` (exit 1); other exceptions propagate with their traceback."""

    def guarded(argv):
        # Allocator settings and synchronous CPU dispatch, before JAX starts its threads and
        # creates its CPU client.
        configure_process()
        # orbax and grain log every save and restore through absl (INFO), and warn about
        # routine things such as opening a checkpoint read-only; our own errors are explicit.
        logging.set_verbosity(logging.ERROR)
        enable_compilation_cache()
        if _CONFIG_FLAG and flags.FLAGS.config_help:
            getter, default = _CONFIG_FLAG[0]
            config = getter()
            if config is None:
                fail("--config_help needs a --config=FILE (this command has no default config)")
            print(config_schema.describe(config, _config_argument(default)))
            return 0
        try:
            return main(argv)
        except KeyboardInterrupt as e:
            print(f"\n{e or 'interrupted'}", file=sys.stderr)
            # 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM (training records which).
            sys.exit(128 + getattr(e, "signal_number", signal.SIGINT))
        except UserError as e:  # anything else is a bug: its traceback is printed
            sys.exit(report_user_error(e, debug_requested(_DEBUG.value)))

    # List --debug (and --config, --config_help) in the entry point's own --help (absl names
    # the main module by argv[0]; they are defined in this module).
    for name in ("debug", "config", "config_help"):
        if name in flags.FLAGS:
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    app.run(guarded, flags_parser=_parse_flags)
