"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from flags or environment.

One process runs per host (per TPU VM worker, per GPU node, or per GPU); together they form
one global device mesh (see `ctl_jax.parallel`). Every process must run the same
command with the same config and work directory; only the process id differs.

Settings, as a flag of `ctl_jax.train` / `ctl_jax.evaluate` or an environment variable (a
flag wins over the variable):

  --distributed       CTL_JAX_DISTRIBUTED       "off", "auto" or "on". Default: "on" when a
                                                coordinator address is given, else "off".
                                                "auto": JAX detects the cluster itself
                                                (Cloud TPU pods, SLURM, Open MPI, Kubernetes
                                                indexed jobs), no other setting needed.
  --coordinator       CTL_JAX_COORDINATOR       host:port of process 0 (any free port, the
                                                same for every process).
  --num_processes     CTL_JAX_NUM_PROCESSES     number of processes.
  --process_id        CTL_JAX_PROCESS_ID        this process, 0 .. num_processes - 1.
  --local_device_ids  CTL_JAX_LOCAL_DEVICE_IDS  optional: local devices this process uses,
                                                e.g. "0" for one process per GPU.

`CTL_JAX_DISTRIBUTED_TIMEOUT` (seconds, default 300) bounds how long a process waits for the
others to join. A single-process run needs none of this.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from ctl_jax.errors import DistributedSetupError

MODES = ("off", "auto", "on")

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    None,
    MODES,
    "Multi-process run: off, auto (detect TPU pod / SLURM / Open MPI), or on (needs "
    "--coordinator, --num_processes, --process_id). Env: CTL_JAX_DISTRIBUTED.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 in a multi-process run. Env: CTL_JAX_COORDINATOR."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of a multi-process run. Env: CTL_JAX_NUM_PROCESSES."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id, 0..num_processes-1. Env: CTL_JAX_PROCESS_ID."
)
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Local device ids this process uses. Env: CTL_JAX_LOCAL_DEVICE_IDS."
)


def _flag(holder):
    """A flag's value, or None when flags are not parsed (library use, notebooks)."""
    return holder.value if flags.FLAGS.is_parsed() else None


def _setting(holder, env: str, environ) -> str | None:
    value = _flag(holder)
    if value is not None:
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)
    value = environ.get(env, "").strip()
    return value or None


def _integer(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedSetupError(f"{name} must be an integer, got {text!r}") from None


def resolve_settings(environ=None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

    Reads the flags (when parsed) and the environment variables listed in the module
    docstring, and checks them.

    Raises:
      DistributedSetupError: a setting is missing, malformed or out of range.
    """
    environ = os.environ if environ is None else environ
    mode = _setting(_DISTRIBUTED, "CTL_JAX_DISTRIBUTED", environ)
    coordinator = _setting(_COORDINATOR, "CTL_JAX_COORDINATOR", environ)
    num_processes = _integer(
        _setting(_NUM_PROCESSES, "CTL_JAX_NUM_PROCESSES", environ), "num_processes"
    )
    process_id = _integer(_setting(_PROCESS_ID, "CTL_JAX_PROCESS_ID", environ), "process_id")
    local_ids = _setting(_LOCAL_DEVICE_IDS, "CTL_JAX_LOCAL_DEVICE_IDS", environ)
    timeout = _integer(environ.get("CTL_JAX_DISTRIBUTED_TIMEOUT", "300"), "timeout")

    mode = (mode or ("on" if coordinator else "off")).lower()
    aliases = {"0": "off", "false": "off", "no": "off", "1": "on", "true": "on", "yes": "on"}
    mode = aliases.get(mode, mode)
    if mode not in MODES:
        raise DistributedSetupError(
            f"CTL_JAX_DISTRIBUTED / --distributed must be one of {', '.join(MODES)}; got {mode!r}"
        )
    if mode == "off":
        return None
    kwargs = {"initialization_timeout": timeout}
    if local_ids:
        try:
            kwargs["local_device_ids"] = [int(i) for i in local_ids.split(",") if i.strip()]
        except ValueError:
            raise DistributedSetupError(
                f"local_device_ids must be comma-separated integers, got {local_ids!r}"
            ) from None
    if mode == "auto":
        # Whatever is given explicitly overrides the detected value.
        for key, value in (
            ("coordinator_address", coordinator),
            ("num_processes", num_processes),
            ("process_id", process_id),
        ):
            if value is not None:
                kwargs[key] = value
        return kwargs

    missing = [
        name
        for name, value in (
            ("coordinator (CTL_JAX_COORDINATOR)", coordinator),
            ("num_processes (CTL_JAX_NUM_PROCESSES)", num_processes),
            ("process_id (CTL_JAX_PROCESS_ID)", process_id),
        )
        if value is None
    ]
    if missing:
        raise DistributedSetupError(
            f"a multi-process run needs {', '.join(missing)}; or set CTL_JAX_DISTRIBUTED=auto "
            "on a TPU pod, SLURM or Open MPI cluster"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedSetupError(f"coordinator must be host:port, got {coordinator!r}")
    if num_processes < 1:
        raise DistributedSetupError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise DistributedSetupError(
            f"process_id must be in 0..{num_processes - 1}, got {process_id}"
        )
    if num_processes == 1:
        return None
    kwargs.update(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return kwargs


def maybe_initialize(environ=None) -> bool:
    """Joins the other processes of a multi-process run, if one is configured.

    Call at the start of an entry point, before anything touches a JAX device. Idempotent.

    Returns:
      True when JAX now runs as one of several processes.

    Raises:
      DistributedSetupError: bad settings, or the processes did not find each other in time.
    """
    if "jax" in sys.modules:
        import jax

        if jax.distributed.is_initialized():
            return jax.process_count() > 1
    kwargs = resolve_settings(environ)
    if kwargs is None:  # one process: JAX is not needed (nor imported) for that
        return False
    import jax

    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # jax raises RuntimeError / XlaRuntimeError with long messages
        where = kwargs.get("coordinator_address", "the auto-detected coordinator")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if "coordinator_address" not in kwargs:
            hint = (
                " (no TPU pod, SLURM, Open MPI or Kubernetes job detected: set "
                "CTL_JAX_COORDINATOR, CTL_JAX_NUM_PROCESSES and CTL_JAX_PROCESS_ID instead)"
            )
        raise DistributedSetupError(
            f"could not join the multi-process run via {where}: {first}{hint}"
        ) from e
    return jax.process_count() > 1


def is_primary() -> bool:
    """True in process 0, the one that writes logs, metrics and reports. Without JAX
    imported this is a single process (`maybe_initialize` imports it for several)."""
    if "jax" not in sys.modules:
        return True
    import jax

    return jax.process_index() == 0


def describe() -> str:
    """One line: process, process count, local and global devices."""
    import jax

    return (
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} "
        f"{jax.devices()[0].platform.upper()} devices"
    )
